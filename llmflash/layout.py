"""The flash file layout: where each FFN neuron's weights live in ``ffn.bin``.

A layer's FFN is ``n`` neurons; neuron i owns three vectors of ``d`` values (gated FFN: gate row i, up row i and
down column i; plain FFN: up row i and down column i). A *segment* stores some of those parts for every neuron of
every layer, one row per neuron, each row padded to a multiple of 4096 bytes so that any run of neighbouring rows is
one aligned direct-I/O read:

- bundled (the paper's row-column bundling): one segment ``(gate, up, down)``: one read per neuron (or per run);
- unbundled (the ablation): segments ``(gate, up)`` and ``(down,)``: two reads per neuron.

File order is layer-major: layer 0's rows of segment 0, layer 0's rows of segment 1, layer 1's ...; each layer's
segment starts on a 4096-byte boundary.

Quantized layouts (``dtype`` int8 or int4, issue 13): each part of a row is its ``d`` values quantized symmetrically in
groups of ``group_size`` along d_model (int8: one byte each; int4: two per byte, low nibble first, stored + 8), followed
by the groups' float16 scales: ``part_bytes = d * bits / 8 + 2 * d / group_size``. A neuron's gate row, up row and down
column and their scales are one bundle, so one read brings everything; rows are padded to ``align_bytes`` (512 for
quantized layouts: the unit of direct I/O; at 4096 a SmolLM2 neuron would read 4096 bytes at every bit width) and
neighbouring rows still merge into one read. ``quant`` holds the codec.

An int4 layout may store its gate and up rows asymmetrically (``asym_parts``, ``convert --int4-gate-up``): each group
also has an int8 offset after the scales (``part_bytes`` + d / group_size, rounded up to even), which is how a Q4_1
source's blocks are kept. SmolLM2's bundle is then 342 + 342 + 324 = 1 008 bytes, still one 1 024-byte row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .native import cache_library
from .storage import ALIGN_BYTES, align_up

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
QUANT_BITS = {"int8": 8, "int4": 4}  # quantized row formats (``quant``): bits per weight
SCALE_BYTES = 2  # one float16 scale per group
QUANT_ALIGN_BYTES = 512  # row alignment of quantized layouts: direct I/O's unit (offsets, lengths)


OFFSET_BYTES = 1  # asymmetric int4 parts: one int8 offset per group (``quant``: in sixteenths of the group's scale)
ASYM_PARTS = ("gate", "up")  # the parts that may be asymmetric: those the FFN takes dot products with


def part_bytes(d_model: int, dtype: str, group_size: int = 0, asym: bool = False) -> int:
    """Bytes of one part (gate row, up row or down column: ``d_model`` values) in a row of ``ffn.bin``; ``asym``: an
    asymmetric int4 part (an offset per group after its scales)."""
    if dtype in QUANT_BITS:
        groups = d_model // group_size
        offsets = groups * OFFSET_BYTES + (groups * OFFSET_BYTES) % 2  # (even: the next part's scales stay aligned)
        return d_model * QUANT_BITS[dtype] // 8 + groups * SCALE_BYTES + (offsets if asym else 0)
    return d_model * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Segment:
    parts: tuple[str, ...]  # e.g. ("gate", "up", "down")
    row_bytes: int  # len(parts) * part_bytes
    stride_bytes: int  # row_bytes padded to the layout's align_bytes
    layer_offsets: tuple[int, ...]  # file offset of neuron 0's row, per layer

    def part_offset_elems(self, part: str, d_model: int) -> int:
        """Offset of a part in a row, in elements of a float row (bytes of a quantized one: ``part_bytes`` each)."""
        return self.parts.index(part) * d_model



@dataclass(frozen=True)
class FlashLayout:
    n_layers: int
    d_model: int
    d_ffn: int
    dtype: str
    bundled: bool
    segments: tuple[Segment, ...]
    file_bytes: int
    group_size: int = 0  # quantized layouts: values per scale along d_model; 0 for float rows
    align_bytes: int = ALIGN_BYTES  # rows are padded to a multiple of this (reads are multiples of it)
    asym_parts: tuple[str, ...] = ()  # int4: the parts stored asymmetrically (an int8 offset per group; ``quant``)

    @staticmethod
    def build(n_layers: int, d_model: int, d_ffn: int, gated: bool, dtype: str, bundled: bool,
              group_size: int = 0, align_bytes: Optional[int] = None,
              asym_parts: tuple[str, ...] = ()) -> "FlashLayout":
        """``group_size``: quantized dtypes (int8, int4) only: values per scale, dividing ``d_model``.
        ``align_bytes``: the rows' alignment (default: 4096 for float rows, 512 for quantized ones; rows kept in DRAM
        only may take less). ``asym_parts``: int4 only, some of ``ASYM_PARTS`` stored asymmetrically."""
        parts = ("gate", "up", "down") if gated else ("up", "down")
        asym_parts = tuple(p for p in parts if p in asym_parts)
        if set(asym_parts) - set(ASYM_PARTS) or (asym_parts and dtype != "int4"):
            raise ValueError(f"asymmetric parts {asym_parts}: only int4 gate and up rows can be")
        groups = [parts] if bundled else [parts[:-1], parts[-1:]]
        quantized = dtype in QUANT_BITS
        if dtype not in DTYPE_BYTES and not quantized:
            raise ValueError(f"unknown dtype {dtype!r}")
        if quantized and (group_size <= 0 or group_size % 2 or d_model % group_size):
            raise ValueError(f"{dtype}: the group size ({group_size}) must be even and divide d_model ({d_model})")
        if not quantized:
            group_size = 0
        align = align_bytes or (QUANT_ALIGN_BYTES if quantized else ALIGN_BYTES)
        row_bytes = [sum(part_bytes(d_model, dtype, group_size, p in asym_parts) for p in g) for g in groups]
        strides = [align_up(b, align) for b in row_bytes]
        offsets: list[list[int]] = [[] for _ in groups]
        pos = 0
        for _ in range(n_layers):
            for s, stride in enumerate(strides):
                pos = align_up(pos)  # each layer's segment starts on a page (whole-layer reads, checksums)
                offsets[s].append(pos)
                pos += stride * d_ffn
        segments = tuple(
            Segment(tuple(g), b, stride, tuple(off)) for g, b, stride, off in zip(groups, row_bytes, strides, offsets)
        )
        return FlashLayout(n_layers, d_model, d_ffn, dtype, bundled, segments, align_up(pos), group_size, align,
                           asym_parts)

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_BITS

    @property
    def bits(self) -> int:
        """Bits per stored weight (scales not counted)."""
        return QUANT_BITS[self.dtype] if self.quantized else 8 * DTYPE_BYTES[self.dtype]

    @property
    def elem_bytes(self) -> int:
        """Bytes per element of a row as a tensor: the float dtype's, 1 for quantized rows (held as uint8)."""
        return 1 if self.quantized else DTYPE_BYTES[self.dtype]

    @property
    def neuron_stride_bytes(self) -> int:
        """Bytes read from flash per neuron (all segments, padding included)."""
        return sum(s.stride_bytes for s in self.segments)

    @property
    def neuron_payload_bytes(self) -> int:
        """Bytes of weights per neuron (no padding)."""
        return sum(s.row_bytes for s in self.segments)

    def layer_region(self, layer: int) -> tuple[int, int]:
        """(offset, nbytes) of one layer's whole FFN in the file (all its segments are contiguous)."""
        start = min(s.layer_offsets[layer] for s in self.segments)
        return start, self.neuron_stride_bytes * self.d_ffn

    def locate(self, part: str) -> tuple[int, int]:
        """(segment index, offset of the part in a row tensor's elements: a float row's values, a quantized row's
        bytes) of a part."""
        for i, seg in enumerate(self.segments):
            if part in seg.parts:
                if self.quantized:
                    before = seg.parts[: seg.parts.index(part)]
                    return i, sum(part_bytes(self.d_model, self.dtype, self.group_size, p in self.asym_parts)
                                  for p in before)
                return i, seg.part_offset_elems(part, self.d_model)
        raise KeyError(part)

    def to_json(self) -> dict:
        d = asdict(self)
        d["segments"] = [asdict(s) for s in self.segments]
        if not self.quantized and self.align_bytes == ALIGN_BYTES:  # float layouts: the keys of format version 1
            del d["group_size"], d["align_bytes"]
        if not self.asym_parts:  # (the key of asymmetric layouts only: older readers load the others)
            del d["asym_parts"]
        else:
            d["asym_parts"] = list(self.asym_parts)
        return d

    @staticmethod
    def from_json(d: dict) -> "FlashLayout":
        segs = tuple(
            Segment(tuple(s["parts"]), int(s["row_bytes"]), int(s["stride_bytes"]), tuple(int(o) for o in s["layer_offsets"]))
            for s in d["segments"]
        )
        lay = FlashLayout(int(d["n_layers"]), int(d["d_model"]), int(d["d_ffn"]), d["dtype"], bool(d["bundled"]), segs,
                          int(d["file_bytes"]), int(d.get("group_size", 0)), int(d.get("align_bytes", ALIGN_BYTES)),
                          tuple(d.get("asym_parts", ())))
        if lay.dtype not in DTYPE_BYTES and lay.dtype not in QUANT_BITS:
            raise ValueError(f"unknown dtype {lay.dtype!r}")
        if lay.quantized and (lay.group_size <= 0 or lay.d_model % lay.group_size):
            raise ValueError(f"group_size {lay.group_size} does not divide d_model {lay.d_model}")
        return lay


def runs(ids: np.ndarray, max_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sorted neuron ids into runs of consecutive ids, each at most ``max_run`` long.

    Returns (first id of each run, run length), int64. ``ids`` must be sorted and unique.
    """
    if ids.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts_idx = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts_idx, [ids.size])))
    if max_run > 0 and lengths.max() > max_run:  # split long runs so reads spread over threads
        reps = (lengths + max_run - 1) // max_run
        ends = np.repeat(starts_idx + lengths, reps)
        k = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        starts_idx = np.repeat(starts_idx, reps) + k * max_run
        lengths = np.minimum(max_run, ends - starts_idx)
    return ids[starts_idx].astype(np.int64), lengths.astype(np.int64)


def bridge(ids: np.ndarray, max_gap: int, native: bool = True) -> np.ndarray:
    """Sorted unique ids with every gap of at most ``max_gap`` missing ids between two of them filled in: the rows to
    read so that neighbours a few rows apart become one longer read (fewer reads for a few more bytes). ``native``:
    through ``native/cache.cpp``'s loop where the library loads (the same ids), else numpy (the reference)."""
    if max_gap <= 0 or ids.size < 2:
        return ids
    lib = cache_library() if native else None
    if lib is not None and ids.dtype == np.int64 and ids[0] >= 0:  # the engine's per-layer call: one native loop
        ids = np.ascontiguousarray(ids)
        out = np.empty(int(ids[-1] - ids[0]) + 1, dtype=np.int64)
        n = lib.llmflash_bridge(ids.ctypes.data, ids.size, max_gap, out.ctypes.data)
        return ids if n == ids.size else out[:n]
    if max_gap == 1 and ids[0] >= 0:  # the common case (one float32 row of a small model): a mask, a third the time
        m = np.zeros(int(ids[-1]) + 1, dtype=bool)
        m[ids] = True
        fill = m[:-2] & m[2:] & ~m[1:-1]  # a missing id between two present ones
        if not fill.any():
            return ids
        m[1:-1] |= fill
        return np.flatnonzero(m).astype(ids.dtype)
    gaps = np.diff(ids) - 1
    fill = (gaps > 0) & (gaps <= max_gap)
    if not fill.any():
        return ids
    reps = np.where(fill, gaps + 1, 1)  # each kept id, followed by the ids that fill the gap after it
    starts = np.repeat(ids[:-1], reps)
    offset = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    return np.concatenate((starts + offset, ids[-1:])).astype(ids.dtype)


def read_plan(
    seg: Segment, layer: int, ids: np.ndarray, dest_row0: int, max_read_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads that bring rows ``ids`` (sorted) of one segment into consecutive destination rows from ``dest_row0``.

    Returns (file_offsets, nbytes, dest_offsets), int64, all multiples of 4096: neighbouring ids become one read.
    """
    max_run = max(1, max_read_bytes // seg.stride_bytes)
    first, length = runs(ids, max_run)
    dest_rows = dest_row0 + np.concatenate(([0], np.cumsum(length)[:-1])) if first.size else first
    stride = seg.stride_bytes
    return seg.layer_offsets[layer] + first * stride, length * stride, dest_rows * stride

"""The flash file layout: where each FFN neuron's weights live in ``ffn.bin``.

A layer's FFN is ``n`` neurons; neuron i owns three vectors of ``d`` values (gated FFN: gate row i, up row i and
down column i; plain FFN: up row i and down column i). A *segment* stores some of those parts for every neuron of
every layer, one row per neuron, each row padded to a multiple of 4096 bytes so that any run of neighbouring rows is
one aligned direct-I/O read:

- bundled (the paper's row-column bundling): one segment ``(gate, up, down)``: one read per neuron (or per run);
- unbundled (the ablation): segments ``(gate, up)`` and ``(down,)``: two reads per neuron.

File order is layer-major: layer 0's rows of segment 0, layer 0's rows of segment 1, layer 1's ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .storage import align_up

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Segment:
    parts: tuple[str, ...]  # e.g. ("gate", "up", "down")
    row_bytes: int  # len(parts) * d_model * dtype bytes
    stride_bytes: int  # row_bytes padded to ALIGN_BYTES
    layer_offsets: tuple[int, ...]  # file offset of neuron 0's row, per layer

    def part_offset_elems(self, part: str, d_model: int) -> int:
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

    @staticmethod
    def build(n_layers: int, d_model: int, d_ffn: int, gated: bool, dtype: str, bundled: bool) -> "FlashLayout":
        parts = ("gate", "up", "down") if gated else ("up", "down")
        groups = [parts] if bundled else [parts[:-1], parts[-1:]]
        elem = DTYPE_BYTES[dtype]
        strides = [align_up(len(g) * d_model * elem) for g in groups]
        offsets: list[list[int]] = [[] for _ in groups]
        pos = 0
        for _ in range(n_layers):
            for s, stride in enumerate(strides):
                offsets[s].append(pos)
                pos += stride * d_ffn
        segments = tuple(
            Segment(tuple(g), len(g) * d_model * elem, stride, tuple(off)) for g, stride, off in zip(groups, strides, offsets)
        )
        return FlashLayout(n_layers, d_model, d_ffn, dtype, bundled, segments, pos)

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

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
        """(segment index, element offset in the row) of a part."""
        for i, seg in enumerate(self.segments):
            if part in seg.parts:
                return i, seg.part_offset_elems(part, self.d_model)
        raise KeyError(part)

    def to_json(self) -> dict:
        d = asdict(self)
        d["segments"] = [asdict(s) for s in self.segments]
        return d

    @staticmethod
    def from_json(d: dict) -> "FlashLayout":
        segs = tuple(
            Segment(tuple(s["parts"]), int(s["row_bytes"]), int(s["stride_bytes"]), tuple(int(o) for o in s["layer_offsets"]))
            for s in d["segments"]
        )
        return FlashLayout(int(d["n_layers"]), int(d["d_model"]), int(d["d_ffn"]), d["dtype"], bool(d["bundled"]), segs,
                           int(d["file_bytes"]))


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

"""Streamed layers: decoder layers whose resident weights are read from flash every token, for budgets below the
resident weights' share of the model.

The paper keeps attention resident. On Llama-2-7B's geometry at 4 bits the attention projections, embeddings and
head are 36% of the model, so a budget of a quarter cannot hold them and the FFN caches too. A streamed layer's
tensors in ``resident.safetensors`` (its attention projections: everything under ``Adapter.attention_prefix``; the
norms, tiny, and the FFN's per-neuron biases stay resident) are not held from the start: just before the layer runs they are read
with direct I/O into one of a few preallocated slot buffers, while the read of the next streamed layer is already in
flight. Unlike FFN rows nothing is predicted: the order of the layers is known, so the next read always overlaps the
compute between two streamed layers (streamed layers are spread evenly over the model to give it the most).

Each streamed layer's tensors view its slot at fixed offsets, so the modules built over them (``nn.Linear``,
``quant.QLinear``, ...) never change; only the bytes under them do. Layers alternate between two slots (a third for
the last of an odd number, so the next token's first read never waits for the layer in use); a slot that still holds
its layer is not read again (one or two streamed layers are read once).

Pure file arithmetic (``tensor_index``, ``plan_stream``, ``spread_layers``, ``stream_holes``) is separate from the reading
(``LayerStream``), so plans are testable without a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from .flashdir import TensorEntry, safetensors_entries
from .storage import ALIGN_BYTES, READ_RANGE_CHUNK_BYTES, FlashReader, ReadTicket, align_up, aligned_buffer


def tensor_index(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file with their absolute byte ranges (only the header is read)."""
    with open(path, "rb") as f:
        def head(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        return safetensors_entries(head)


def _merged(ranges: Sequence[tuple[int, int]], gap: int = 0) -> list[list[int]]:
    """Sorted ranges [a, b) joined where one starts at most ``gap`` bytes after the previous ends."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def spread_layers(n_layers: int, m: int) -> tuple[int, ...]:
    """``m`` of ``n_layers`` layers spread evenly (each streamed layer's read overlaps the layers before it)."""
    m = max(0, min(m, n_layers))
    return tuple(sorted({(2 * i + 1) * n_layers // (2 * m) for i in range(m)})) if m else ()


@dataclass(frozen=True)
class Span:
    file_offset: int  # page-aligned
    nbytes: int  # page-aligned
    slot_offset: int  # where it lands in the layer's slot


@dataclass(frozen=True)
class StreamPlan:
    layers: tuple[int, ...]  # streamed layers, ascending
    names: tuple[tuple[str, ...], ...]  # per streamed layer: its tensors
    spans: tuple[tuple[Span, ...], ...]  # per streamed layer: the aligned file ranges read into its slot
    layer_bytes: tuple[int, ...]  # per streamed layer: its tensors' bytes (what no longer stays in DRAM)
    slot_bytes: int  # one slot: the largest layer's spans

    @property
    def n_slots(self) -> int:
        m = len(self.layers)
        return m if m <= 2 else 2 + m % 2

    @property
    def slots_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def saved_bytes(self) -> int:
        """DRAM the plan saves against holding these layers resident (negative for one to three layers)."""
        return sum(self.layer_bytes) - self.slots_bytes

    def rereads(self, i: int) -> bool:
        """Whether the i-th streamed layer is read on every pass (it shares its slot; a layer alone in its slot, as
        the third slot's, is read once)."""
        slot = self.slot_of(i)
        return sum(self.slot_of(j) == slot for j in range(len(self.layers))) > 1

    @property
    def read_bytes_per_pass(self) -> int:
        """Bytes one pass over the model reads (the aligned spans of the layers read on every pass)."""
        return sum(s.nbytes for i, spans in enumerate(self.spans) if self.rereads(i) for s in spans)

    def slot_of(self, i: int) -> int:
        """The slot of the i-th streamed layer: alternating, the last of an odd number (three or more) in a third."""
        m = len(self.layers)
        return 2 if m > 2 and m % 2 and i == m - 1 else i % 2


def plan_stream(index: dict[str, TensorEntry], prefixes: Sequence[str], layers: Sequence[int],
                merge_gap_bytes: int = 64 << 10) -> StreamPlan:
    """The reads and slot offsets of streaming ``layers`` (``prefixes[layer]``: the prefix of each layer's streamed
    tensors).
    A layer's tensors are grouped into page-aligned spans (neighbours closer than ``merge_gap_bytes`` read as one)."""
    names, spans, nbytes = [], [], []
    slot_bytes = 0
    for layer in layers:
        ts = sorted((n for n in index if n.startswith(prefixes[layer])), key=lambda n: index[n].start)
        ranges = _merged([(index[n].start // ALIGN_BYTES * ALIGN_BYTES, align_up(index[n].end)) for n in ts],
                         merge_gap_bytes)
        off, layer_spans = 0, []
        for a, b in ranges:
            layer_spans.append(Span(a, b - a, off))
            off += b - a
        slot_bytes = max(slot_bytes, off)
        names.append(tuple(ts))
        spans.append(tuple(layer_spans))
        nbytes.append(sum(index[n].end - index[n].start for n in ts))
    return StreamPlan(tuple(layers), tuple(names), tuple(spans), tuple(nbytes), slot_bytes)


def stream_holes(index: dict[str, TensorEntry], plan: StreamPlan) -> list[tuple[int, int]]:
    """Whole pages [a, b) of the file that only the plan's streamed tensors occupy: left out of the resident buffer
    (never touched, so never in DRAM). Pages a streamed tensor shares with a resident one are loaded."""
    out = []
    for a, b in _merged([(index[n].start, index[n].end) for names in plan.names for n in names]):
        pa, pb = align_up(a), b // ALIGN_BYTES * ALIGN_BYTES
        if pb > pa:
            out.append((pa, pb))
    return out


class LayerStream:
    """The slots of a ``StreamPlan`` and their reads. ``views()`` gives each streamed tensor as a view into its
    layer's slot; ``enter(layer)`` (a forward pre-hook of the decoder layer) makes sure the slot holds that layer's
    bytes, then starts the next streamed layer's read."""

    def __init__(self, plan: StreamPlan, index: dict[str, TensorEntry], reader: FlashReader) -> None:
        self.plan = plan
        self.index = index
        self.reader = reader
        self.slots = [aligned_buffer(plan.slot_bytes) for _ in range(plan.n_slots)]
        self.position = {layer: i for i, layer in enumerate(plan.layers)}
        self.holds = [-1] * plan.n_slots  # the streamed position whose bytes a slot holds (or is receiving)
        self.tickets: list[Optional[ReadTicket]] = [None] * plan.n_slots
        # per streamed layer, its reads (file offsets, bytes, slot offsets): a span in chunks, so they spread over the
        # reader's threads; planned once here, not every token
        self.reads: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for layer_spans in plan.spans:
            fo, nb, do = [], [], []
            for s in layer_spans:
                for off in range(0, s.nbytes, READ_RANGE_CHUNK_BYTES):
                    fo.append(s.file_offset + off)
                    nb.append(min(READ_RANGE_CHUNK_BYTES, s.nbytes - off))
                    do.append(s.slot_offset + off)
            self.reads.append((np.array(fo, np.int64), np.array(nb, np.int64), np.array(do, np.int64)))

    @property
    def nbytes(self) -> int:
        return sum(len(s) for s in self.slots)

    def views(self) -> dict[str, Tensor]:
        """Each streamed tensor over its layer's slot (zeros until the layer is first entered)."""
        out = {}
        for i, (names, spans) in enumerate(zip(self.plan.names, self.plan.spans)):
            buf = self.slots[self.plan.slot_of(i)]
            for name in names:
                e = self.index[name]
                span = next(s for s in spans if s.file_offset <= e.start and e.end <= s.file_offset + s.nbytes)
                out[name] = e.view(buf, span.slot_offset + e.start - span.file_offset)
        return out

    def _submit(self, i: int) -> None:
        slot = self.plan.slot_of(i)
        if self.holds[slot] == i:
            return
        self._wait_slot(slot)
        self.holds[slot] = i
        self.tickets[slot] = self.reader.submit(self.slots[slot], *self.reads[i])

    def _wait_slot(self, slot: int) -> None:
        t = self.tickets[slot]
        if t is not None:
            self.tickets[slot] = None
            try:
                self.reader.wait(t)
            except BaseException:
                self.holds[slot] = -1  # its bytes are not the layer's
                raise

    def enter(self, layer: int) -> float:
        """Before ``layer`` runs: its bytes in its slot (waiting for them), the next streamed layer's read started.
        Returns the milliseconds waited (0 for a layer not streamed)."""
        i = self.position.get(layer)
        if i is None:
            return 0.0
        t0 = time.perf_counter()
        self._submit(i)  # (nothing when it is in flight or already there)
        self._wait_slot(self.plan.slot_of(i))
        ms = (time.perf_counter() - t0) * 1e3
        nxt = (i + 1) % len(self.plan.layers)
        if self.plan.slot_of(nxt) != self.plan.slot_of(i):
            self._submit(nxt)
        return ms

    def drain(self) -> None:
        """Wait for every read in flight (before the reader closes)."""
        for slot in range(len(self.slots)):
            self._wait_slot(slot)

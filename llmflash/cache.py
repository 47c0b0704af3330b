"""The neuron cache: one preallocated DRAM matrix per layer (the paper's Section 3.3).

Per layer: a matrix of ``capacity`` rows (one per cached neuron, in the flash row format so direct-I/O reads land in
place), the original neuron id of each row, and a count of used rows. Which neurons stay is the ``CachePolicy``'s
decision (``cache_policy``; default the paper's sliding window: a neuron stays while it was active in one of the last
``window`` tokens); the cache does the row mechanics and counts hits, misses and evictions. Deleting moves the last
rows into the freed slots; inserting appends at the end; compute uses the first ``count`` rows in whatever order they
are. Nothing is allocated per token except small index arrays. With the engine on a GPU the matrix lives in GPU memory
(``DeviceRows``): reads land in a host buffer and are copied into rows [count, count + new); deletions move rows on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .cache_policy import CachePolicy, WindowPolicy
from .layout import FlashLayout
from .quant import part_rows, storage_dtype
from .storage import aligned_buffer

NEVER = np.iinfo(np.int64).min // 2


class _Rows:
    """``capacity`` rows of every segment of one layer: ``rows[s]`` is [capacity, stride_bytes / elem] (uint8 bytes
    for a quantized layout: the rows stay quantized, ``part`` dequantizes)."""

    layout: FlashLayout
    capacity: int
    rows: list[Tensor]
    dtype: torch.dtype  # the compute dtype ``part`` returns

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows)

    def part(self, name: str, n: int, start: int = 0) -> Tensor:
        """[n, d] of one part (gate/up/down) over rows [start, start + n): a view, or dequantized (``quant``)."""
        return part_rows(self.layout, self.rows, name, start, n, self.dtype)


class RowStore(_Rows):
    """Rows in page-aligned host buffers (direct-I/O destinations)."""

    def __init__(self, layout: FlashLayout, capacity: int, dtype: torch.dtype) -> None:
        self.layout = layout
        self.capacity = capacity
        self.dtype = dtype
        self.buffers = [aligned_buffer(max(1, capacity) * seg.stride_bytes) for seg in layout.segments]
        elem, held = layout.elem_bytes, storage_dtype(layout, dtype)
        self.rows: list[Tensor] = [  # per segment: [capacity, stride_bytes / elem]
            torch.frombuffer(buf, dtype=held, count=capacity * seg.stride_bytes // elem).view(capacity, -1)
            if capacity else torch.empty(0, seg.stride_bytes // elem, dtype=held)
            for buf, seg in zip(self.buffers, layout.segments)
        ]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.buffers)


class DeviceRows(_Rows):
    """Rows in an accelerator's memory: the compute copy of a neuron cache or staging buffer whose reads land in a
    host ``RowStore`` first (direct I/O cannot write into GPU memory) and are copied over with ``load``. With a float
    ``layout`` over a quantized host's rows (``EngineConfig.cache_form="compute"``), ``load`` dequantizes them."""

    def __init__(self, layout: FlashLayout, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.capacity = capacity
        self.dtype = dtype
        held = storage_dtype(layout, dtype)
        self.rows = [torch.zeros(capacity, seg.stride_bytes // layout.elem_bytes, dtype=held, device=device)
                     for seg in layout.segments]

    def load(self, host: RowStore, n: int, host_start: int, start: int) -> None:
        """Copy host rows [host_start, host_start + n) into rows [start, start + n) (synchronous)."""
        if n and host.layout.quantized and not self.layout.quantized:  # dequantized on arrival
            for seg in self.layout.segments:
                for name in seg.parts:
                    self.part(name, n, start).copy_(host.part(name, n, host_start))
        elif n:
            for dst, src in zip(self.rows, host.rows):
                dst[start : start + n].copy_(src[host_start : host_start + n])


@dataclass
class CacheUpdate:
    load_ids: np.ndarray  # sorted neuron ids to read into rows [dest_row, dest_row + len)
    dest_row: int
    overflow_ids: np.ndarray  # needed now but beyond capacity: computed from the staging buffer, not cached
    deleted: int  # rows freed this step (evictions)
    moved: int  # rows moved to fill holes
    hits: int = 0  # needed neurons already cached (0 for a lookahead guess: not a lookup)
    misses: int = 0  # needed neurons not cached: read into the cache (load_ids) or the staging buffer (overflow_ids)
    need: Optional[np.ndarray] = None  # the ids entered (sorted; a lookahead guess too)


@dataclass
class CacheCounters:
    """Totals since the cache was made (``clear`` keeps them): neuron lookups and what they cost. Per lookup
    hits + misses = the needed set's size; evictions <= loads over any run (a row is freed only after it was loaded)."""

    hits: int = 0  # needed neurons found in the cache
    misses: int = 0  # needed neurons not in it: read into it, or overflowed
    evictions: int = 0  # rows freed (expired by the policy, or dropped to make room)
    moves: int = 0  # rows moved to fill the holes
    overflows: int = 0  # needed neurons that did not fit (computed from the staging buffer)
    loads: int = 0  # rows read into the cache: misses that fit, a policy's preloaded rows, lookahead guesses


class NeuronCache:
    """One layer's cached neurons: ``update`` asks the policy what to delete and plans what to read."""

    def __init__(self, layout: FlashLayout, capacity: int, window: int, dtype: torch.dtype,
                 device: Optional[torch.device] = None, policy: Optional[CachePolicy] = None,
                 row_layout: Optional[FlashLayout] = None) -> None:
        """``device``: keep the rows there (``DeviceRows`` in ``row_layout``, default ``layout``; the engine lands
        reads in a host buffer and copies them in); None: in a host ``RowStore`` that the reads write directly.
        ``policy``: who stays (default: a sliding window of ``window`` tokens)."""
        self.d_ffn = layout.d_ffn
        self.capacity = min(capacity, layout.d_ffn)
        self.window = window
        self.policy: CachePolicy = policy if policy is not None else WindowPolicy(window)
        self._filled = False  # the policy's preload entered since the cache was (re)made empty
        self.store: RowStore | DeviceRows = (RowStore(layout, self.capacity, dtype) if device is None
                                             else DeviceRows(row_layout or layout, self.capacity, dtype, device))
        self.ids = np.full(self.capacity, -1, dtype=np.int64)  # neuron id of each row
        self.slot = np.full(self.d_ffn, -1, dtype=np.int64)  # row of each neuron, -1 if absent
        self.last = np.full(self.d_ffn, NEVER, dtype=np.int64)  # last step the neuron was needed
        self.count = 0
        self.counters = CacheCounters()

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.ids.nbytes + self.slot.nbytes + self.last.nbytes

    def cached_ids(self) -> np.ndarray:
        return self.ids[: self.count]

    def update(self, need: np.ndarray, step: int, evict: bool = True, lookup: bool = True) -> CacheUpdate:
        """Enter ``need`` (sorted unique ids, needed at ``step``): free what the policy expires, make room by its
        eviction order, and plan the reads.

        ``evict=False``: a second call for the same step while rows are being read in: nothing is deleted or moved,
        new rows only go after the existing ones, and what does not fit overflows. ``lookup=False``: ``need`` is a
        guess read ahead (lookahead), not a lookup: its rows count as loads, not as hits or misses.
        """
        self.last[need] = step
        deleted = moved = 0
        if evict:
            expired = self.policy.expired(self.ids[: self.count], self.last, step)
            deleted = expired.size
            moved = self._delete(expired)
        missing = need[self.slot[need] < 0]
        extra = np.empty(0, dtype=np.int64)
        if not self._filled:  # the policy's preload (a pinned hot set), after what is needed now
            pre = self.policy.preload()
            extra = np.setdiff1d(pre[self.slot[pre] < 0], missing)
            self._filled = True
        free = self.capacity - self.count
        if evict and missing.size > free:  # over capacity: drop what the policy lets go, first to go first
            candidates = self.policy.evictable(self.ids[: self.count], self.last, step)
            k = min(missing.size - free, candidates.size)
            if k:
                victims = candidates[:k]
                deleted += victims.size
                moved += self._delete(victims)
            free = self.capacity - self.count
        load, overflow = missing[:free], missing[free:]
        if extra.size and load.size < free:
            load = np.union1d(load, extra[: free - load.size])
        dest = self.count
        end = dest + load.size
        self.ids[dest:end] = load
        self.slot[load] = np.arange(dest, end)
        self.count = end
        hits, misses = (need.size - missing.size, missing.size) if lookup else (0, 0)
        c = self.counters
        c.hits += hits
        c.misses += misses
        c.evictions += deleted
        c.moves += moved
        c.overflows += overflow.size if lookup else 0  # a guess's overflow is dropped, not read
        c.loads += load.size
        return CacheUpdate(load, dest, overflow, deleted, moved, hits, misses, need)

    def _delete(self, rows: np.ndarray) -> int:
        """Remove ``rows`` by moving the last surviving rows into the holes. Returns the number of rows moved."""
        if rows.size == 0:
            return 0
        n_after = self.count - rows.size
        self.slot[self.ids[rows]] = -1
        holes = rows[rows < n_after]
        tail_keep = np.ones(self.count - n_after, dtype=bool)
        tail_keep[rows[rows >= n_after] - n_after] = False
        src = np.arange(n_after, self.count)[tail_keep]
        if holes.size:
            h, s = torch.from_numpy(holes), torch.from_numpy(src)
            for mat in self.store.rows:
                if mat.device != h.device:  # rows on an accelerator
                    h, s = h.to(mat.device), s.to(mat.device)
                mat[h] = mat[s]
            self.ids[holes] = self.ids[src]
            self.slot[self.ids[holes]] = holes
        self.ids[n_after : self.count] = -1
        self.count = n_after
        return int(holes.size)

    def clear(self) -> None:
        self.slot[self.ids[: self.count]] = -1
        self.ids[:] = -1
        self.last[:] = NEVER
        self.count = 0
        self._filled = False


def split_rows(total_rows: int, weights: list[float], cap: int, floor: int) -> list[int]:
    """Rows per layer proportional to ``weights`` (expected demand), each within [floor, cap], summing to at most
    ``total_rows`` (water-filling: what a capped layer cannot use goes to the others)."""
    n = len(weights)
    if total_rows >= cap * n:
        return [cap] * n
    rows = [floor] * n
    left = total_rows - floor * n
    open_ = [i for i in range(n) if rows[i] < cap]
    while left > 0 and open_:
        wsum = sum(max(weights[i], 1e-9) for i in open_)
        grant = {i: int(left * max(weights[i], 1e-9) / wsum) for i in open_}
        if not any(grant.values()):  # rounding: hand out the remainder one row at a time, heaviest first
            for i in sorted(open_, key=lambda i: -weights[i])[:left]:
                rows[i] += 1
            break
        for i in open_:
            add = min(grant[i], cap - rows[i])
            rows[i] += add
            left -= add
        open_ = [i for i in open_ if rows[i] < cap]
    return rows

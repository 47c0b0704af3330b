"""The neuron cache: one preallocated DRAM matrix per layer (the paper's Section 3.3), addressed by slot.

Per layer: a matrix of ``capacity`` rows (slots; one per cached neuron, in the flash row format so direct-I/O reads
land in place), the neuron id held by each slot (-1: free), the slot of each neuron, and a free list. Which neurons
stay is the ``CachePolicy``'s decision (``cache_policy``; default the paper's sliding window: a neuron stays while it
was active in one of the last ``window`` tokens); the cache does the slot bookkeeping and counts hits, misses and
evictions. Nothing moves: an evicted neuron's slot goes back to the free list, a loaded neuron takes the lowest free
slot, and compute gathers the rows of the used slots (``used_slots``). Before issue 15 deletions moved the last rows
into the holes so that the cached rows stayed a prefix of the matrix. Nothing is allocated per token except small
index arrays. With the engine on a GPU the matrix lives in GPU memory (``DeviceRows``): reads land in a host buffer and
are copied into their slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .cache_policy import CachePolicy, HotPolicy, LFUPolicy, LRUPolicy, WindowPolicy
from .layout import FlashLayout
from .native import cache_library
from .quant import part_rows, storage_dtype
from .storage import aligned_buffer, array_address

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

    def gather(self, name: str, slots: Tensor) -> Tensor:
        """Copy [n, d] of one part (gate/up/down) of rows ``slots`` (int64 [n], on the rows' device)."""
        s, off = self.layout.locate(name)
        return self.rows[s][slots, off : off + self.layout.d_model]

    def view(self, name: str) -> Tensor:
        """View [capacity, d] of one part over every row (row stride: the segment's; what the native step reads)."""
        return self.part(name, self.capacity)


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

    def load(self, host: RowStore, n: int, host_start: int, start: int | np.ndarray, non_blocking: bool = False,
             scratch: Optional[list[Tensor]] = None,
             indices: Optional[Callable[[list[np.ndarray]], list[Tensor]]] = None) -> None:
        """Copy host rows [host_start, host_start + n) into rows [start, start + n), or into the slots ``start``
        (int64 [n]) of a neuron cache; quantized host rows into float rows are dequantized on arrival.
        ``non_blocking`` (page-locked host rows): the copies are queued on the device's stream and the host rows must
        stay untouched until they are done (``backend.AcceleratorBackend`` records when). ``scratch``: per segment
        device rows (of this store's dtype) that rows bound for slots are copied into first, instead of a temporary
        allocated per call (used when the n rows fit). ``indices``: how the slots reach the device
        (``backend.Backend.indices``: page-locked, no wait), else a plain copy."""
        if not n:
            return
        slots = None
        if isinstance(start, np.ndarray):
            slots = (indices([start])[0] if indices is not None
                     else torch.from_numpy(start).to(self.rows[0].device, non_blocking=non_blocking))
        if host.layout.quantized and not self.layout.quantized:  # dequantized on arrival
            for seg in self.layout.segments:
                for name in seg.parts:
                    vals = host.part(name, n, host_start)  # [n, d]
                    if slots is None:
                        self.part(name, n, int(start)).copy_(vals)
                    else:
                        s, off = self.layout.locate(name)
                        self.rows[s][:, off : off + self.layout.d_model].index_copy_(
                            0, slots, vals.to(self.rows[s].device, self.rows[s].dtype))
            return
        if slots is not None:
            use = scratch if scratch is not None and n <= scratch[0].shape[0] else None
            for i, (dst, src) in enumerate(zip(self.rows, host.rows)):
                part = src[host_start : host_start + n]
                if use is not None:  # through preallocated device rows: no allocation
                    tmp = use[i][:n]
                    tmp.copy_(part, non_blocking=non_blocking)
                else:
                    tmp = part.to(dst.device, non_blocking=non_blocking)
                dst.index_copy_(0, slots, tmp)
            return
        for dst, src in zip(self.rows, host.rows):
            dst[start : start + n].copy_(src[host_start : host_start + n], non_blocking=non_blocking)


@dataclass
class CacheUpdate:
    load_ids: np.ndarray  # sorted neuron ids to read in, one per slot of ``dest_slots``
    dest_slots: np.ndarray  # int64, the slot each of ``load_ids`` is read into (ascending: lowest free slots first)
    overflow_ids: np.ndarray  # needed now but beyond capacity: computed from the staging buffer, not cached
    deleted: int  # slots freed this step (evictions)
    hits: int = 0  # needed neurons already cached (0 for a lookahead guess: not a lookup)
    misses: int = 0  # needed neurons not cached: read into the cache (load_ids) or the staging buffer (overflow_ids)
    need: Optional[np.ndarray] = None  # the ids entered (sorted; a lookahead guess too)
    # slots whose rows were there before this update (computable at once)
    ready_slots: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class CacheCounters:
    """Totals since the cache was made (``clear`` keeps them): neuron lookups and what they cost. Per lookup
    hits + misses = the needed set's size; evictions <= loads over any run (a row is freed only after it was loaded)."""

    hits: int = 0  # needed neurons found in the cache
    misses: int = 0  # needed neurons not in it: read into it, or overflowed
    evictions: int = 0  # slots freed (expired by the policy, or dropped to make room)
    overflows: int = 0  # needed neurons that did not fit (computed from the staging buffer)
    loads: int = 0  # rows read into the cache: misses that fit, a policy's preloaded rows, lookahead guesses


class NeuronCache:
    """One layer's cached neurons: ``update`` asks the policy what to free and plans what to read where."""

    def __init__(self, layout: FlashLayout, capacity: int, window: int, dtype: torch.dtype,
                 device: Optional[torch.device] = None, policy: Optional[CachePolicy] = None,
                 row_layout: Optional[FlashLayout] = None, native: bool = True) -> None:
        """``device``: keep the rows there (``DeviceRows`` in ``row_layout``, default ``layout``; the engine lands
        reads in a host buffer and copies them in); None: in a host ``RowStore`` that the reads write directly.
        ``policy``: who stays (default: a sliding window of ``window`` tokens). ``native``: ``update`` runs in the
        native library (``native/cache.cpp``: the same plan without numpy's per-call overheads) where it loads and the
        policy is the window, LRU or hot set; else numpy (the reference)."""
        self.d_ffn = layout.d_ffn
        self.capacity = min(capacity, layout.d_ffn)
        self.window = window
        self.policy: CachePolicy = policy if policy is not None else WindowPolicy(window)
        self._filled = False  # the policy's preload entered since the cache was (re)made empty
        self.store: RowStore | DeviceRows = (RowStore(layout, self.capacity, dtype) if device is None
                                             else DeviceRows(row_layout or layout, self.capacity, dtype, device))
        self.ids = np.full(self.capacity, -1, dtype=np.int64)  # neuron id held by each slot, -1 if free
        self.slot = np.full(self.d_ffn, -1, dtype=np.int64)  # slot of each neuron, -1 if absent
        self.last = np.full(self.d_ffn, NEVER, dtype=np.int64)  # last step the neuron was needed
        self.free = np.arange(self.capacity, dtype=np.int64)  # the free list: free slots, ascending
        self._used = np.empty(0, dtype=np.int64)  # used slots, ascending (kept in step with ``ids``)
        self.count = 0
        self.counters = CacheCounters()
        lib = cache_library() if native else None
        self._native: Optional[Callable[..., int]] = None if lib is None else lib.llmflash_cache_update
        if self._native is not None:  # the free and used lists in fixed buffers, with their lengths in ``_lens``
            self._free_buf = self.free.copy()
            self._used_buf = np.empty(self.capacity, dtype=np.int64)
            self._lens = np.array([self.capacity, 0], dtype=np.int64)  # free, used
            self._counts = np.zeros(5, dtype=np.int64)
            self._state_ptrs = tuple(array_address(a) for a in (self.ids, self.slot, self.last, self._free_buf))
            self._lens_ptr = array_address(self._lens)
            self._used_ptr = array_address(self._used_buf)
            self._counts_ptr = array_address(self._counts)
            self._sync_views()
        self._bound: Optional[tuple] = None  # (policy, its native code, window, pinned mask or None, its address)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.ids.nbytes + self.slot.nbytes + self.last.nbytes + self.free.nbytes

    def used_slots(self) -> np.ndarray:
        """The slots holding a neuron, ascending: the rows a token computes."""
        return self._used

    def cached_ids(self) -> np.ndarray:
        """The cached neurons, in slot order."""
        return self.ids[self._used]

    def update(self, need: np.ndarray, step: int, evict: bool = True, lookup: bool = True) -> CacheUpdate:
        """Enter ``need`` (sorted unique ids, needed at ``step``): free what the policy expires, make room by its
        eviction order, and give each neuron to read a free slot.

        ``evict=False``: a second call for the same step while rows are being read in (lookahead): nothing is freed,
        new rows only take free slots, and what does not fit overflows. ``lookup=False``: ``need`` is a guess read
        ahead (lookahead), not a lookup: its rows count as loads, not as hits or misses.
        """
        if self._native is not None and type(self.policy) in _NATIVE_POLICIES \
                and (self._filled or not self.policy.preload().size):
            return self._update_native(need, step, evict, lookup)
        self.policy.touch(need, self.last, step)
        self.last[need] = step
        deleted = 0
        if evict:
            used = self._used
            expired = self.policy.expired(self.ids[used], self.last, step)
            deleted = expired.size
            self._free_slots(used[expired])
        missing = need[self.slot[need] < 0]
        extra = np.empty(0, dtype=np.int64)
        if not self._filled:  # the policy's preload (a pinned hot set), after what is needed now
            pre = self.policy.preload()
            extra = np.setdiff1d(pre[self.slot[pre] < 0], missing)
            self._filled = True
        free = self.free.size
        worth = self.policy.value(missing) if missing.size > free else None
        if worth is not None:  # the most valuable newcomers first (ties: lower id)
            order = np.lexsort((missing, -worth))
            missing, worth = missing[order], worth[order]
        if evict and missing.size > free:  # over capacity: drop what the policy lets go, first to go first
            used = self._used
            candidates = self.policy.evictable(self.ids[used], self.last, step)
            k = min(missing.size - free, candidates.size)
            if worth is not None and k:  # a cached neuron goes only for a newcomer worth more (admission)
                held = self.policy.value(self.ids[used[candidates[:k]]])
                assert held is not None
                beats = held < worth[free : free + k]
                k = k if beats.all() else int(np.argmin(beats))
            if k:
                deleted += k
                self._free_slots(used[candidates[:k]])
            free = self.free.size
        ready = self._used
        load, overflow = missing[:free], missing[free:]
        if worth is not None:
            load, overflow = np.sort(load), np.sort(overflow)
        if extra.size and load.size < free:
            load = np.union1d(load, extra[: free - load.size])
        dest, self.free = self.free[: load.size], self.free[load.size :]
        self.ids[dest] = load
        self.slot[load] = dest
        if load.size:
            self._used = np.flatnonzero(self.ids >= 0)
        self.count = self._used.size
        hits, misses = (need.size - missing.size, missing.size) if lookup else (0, 0)
        c = self.counters
        c.hits += hits
        c.misses += misses
        c.evictions += deleted
        c.overflows += overflow.size if lookup else 0  # a guess's overflow is dropped, not read
        c.loads += load.size
        if self._native is not None:  # (the hot policy's preload): the native path goes on from this state
            ready, dest = ready.copy(), dest.copy()  # (views of the buffers rewritten below)
            self._free_buf[: self.free.size] = self.free
            self._used_buf[: self._used.size] = self._used
            self._lens[:] = (self.free.size, self._used.size)
            self._sync_views()
        return CacheUpdate(load, dest, overflow, deleted, hits, misses, need, ready)

    def _update_native(self, need: np.ndarray, step: int, evict: bool, lookup: bool) -> CacheUpdate:
        """``update`` in ``native/cache.cpp``: the same plan as the numpy reference, with the state in place."""
        need = np.ascontiguousarray(need, dtype=np.int64)
        n = need.size
        out = np.empty(3 * n + self.capacity, dtype=np.int64)  # load, dest, overflow [n] each, ready [capacity]
        base = array_address(out)
        self._filled = True
        if self._bound is None or self._bound[0] is not self.policy:  # (the engine may set a policy after start)
            pinned = getattr(self.policy, "pinned", None)
            pinned = None if pinned is None else np.ascontiguousarray(pinned, dtype=np.uint8)
            code = 2 if isinstance(self.policy, LFUPolicy) else 1 if isinstance(self.policy, LRUPolicy) else 0
            self._bound = (self.policy, code, getattr(self.policy, "window", 0), pinned,
                           0 if pinned is None else array_address(pinned))
        _, code, window, _, pinned_ptr = self._bound
        lfu = self.policy if code == 2 else None
        assert lfu is None or isinstance(lfu, LFUPolicy)
        score_ptr, inc = (0, 0.0) if lfu is None else (array_address(lfu.score), lfu.increment(step))
        ids_p, slot_p, last_p, free_p = self._state_ptrs
        lens = self._lens_ptr
        assert self._native is not None
        rc = self._native(step, int(evict), code, window, pinned_ptr,
                          self.capacity, ids_p, slot_p, last_p, free_p, lens, self._used_ptr, lens + 8,
                          array_address(need), n, base, base + 8 * n, base + 16 * n, base + 24 * n, self._counts_ptr,
                          score_ptr, inc)
        if rc != 0:
            raise RuntimeError(f"native cache update failed ({rc})")
        n_load, n_over, n_ready, deleted, n_missing = self._counts.tolist()
        self._sync_views()
        load, dest, overflow = out[:n_load], out[n : n + n_load], out[2 * n : 2 * n + n_over]
        ready = out[3 * n : 3 * n + n_ready]
        hits, misses = (n - n_missing, n_missing) if lookup else (0, 0)
        c = self.counters
        c.hits += hits
        c.misses += misses
        c.evictions += deleted
        c.overflows += n_over if lookup else 0
        c.loads += n_load
        return CacheUpdate(load, dest, overflow, deleted, hits, misses, need, ready)

    def _sync_views(self) -> None:
        """``free`` and ``_used`` as views of the native path's buffers, at their current lengths."""
        n_free, n_used = self._lens.tolist()
        self.free = self._free_buf[:n_free]
        self._used = self._used_buf[:n_used]
        self.count = n_used

    def _free_slots(self, slots: np.ndarray) -> None:
        """Put ``slots`` back on the free list (their rows stay where they are, unread until reused)."""
        if slots.size == 0:
            return
        self.slot[self.ids[slots]] = -1
        self.ids[slots] = -1
        self.free = np.sort(np.concatenate((self.free, slots)))  # disjoint: a freed slot was in use
        self._used = np.flatnonzero(self.ids >= 0)
        self.count = self._used.size

    def clear(self) -> None:
        self.policy.reset()
        self.slot[self.ids[self._used]] = -1
        self.ids[:] = -1
        self.last[:] = NEVER
        self.free = np.arange(self.capacity, dtype=np.int64)
        self._used = np.empty(0, dtype=np.int64)
        self.count = 0
        self._filled = False
        if self._native is not None:
            self._free_buf[:] = np.arange(self.capacity)
            self._lens[:] = (self.capacity, 0)
            self._sync_views()


_NATIVE_POLICIES = (WindowPolicy, LRUPolicy, HotPolicy, LFUPolicy)  # the policies native/cache.cpp implements


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

"""Cache policies: which neurons a layer's ``NeuronCache`` keeps. The cache stores the rows and plans the reads; the
policy only decides membership, from each cached neuron's last use and the step.

- ``WindowPolicy`` (the paper's sliding window, the default): a neuron stays while it was needed in one of the last
  ``window`` tokens; when the newcomers do not fit, cached neurons not needed now go, least recently used first.
- ``LRUPolicy``: nothing expires; neurons stay until the cache is full, then the least recently used neuron not needed
  now makes room.
- ``HotPolicy`` (PowerInfer-style): a static per-layer hot set (e.g. the most frequently active neurons on calibration
  text: ``hot_sets``) is loaded when the cache is (re)filled and never evicted; the window manages the other rows.
- ``LFUPolicy``: each neuron's uses, decayed by ``decay`` per token, say what it is worth; nothing expires. When the
  newcomers do not fit, the cached neurons worth least (not needed now) make room, but only for newcomers worth more:
  the others are read into the staging buffer and computed there without entering the cache (admission). The paper's
  window keeps what was needed in the last k tokens; at caches smaller than k tokens' sets it evicts neurons that come
  back often for ones needed once.

A policy never changes what is computed: the engine computes every cached row with the model's rule, so a cached
neuron that is not active gives zeros.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import LLMFlashError

POLICIES = ("window", "lru", "hot", "lfu")  # EngineConfig.cache_policy
# ``LFUPolicy``: each use counts ``decay ** tokens_since`` (0.98: a half-life of 34 tokens); measured against the
# other policies at equal DRAM in results/cache_policies, and against the best possible in results/cache_policies/replay
LFU_DECAY = 0.98


class CachePolicy:
    """Membership rule of one layer's cache. ``ids``: the cached neurons (one per used row, in row order); ``last``:
    the last step each neuron of the layer was needed (indexed by neuron id); ``step``: the token being computed."""

    name = "base"

    def expired(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        """Rows (positions in ``ids``) to free now, whether or not room is needed. Default: none."""
        return np.empty(0, dtype=np.int64)

    def evictable(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        """Rows that may be freed to make room, first to go first. Default: those not needed at ``step``, least
        recently used first (ties: row order)."""
        rows = np.flatnonzero(last[ids] < step)
        return rows[np.argsort(last[ids[rows]], kind="stable")]

    def preload(self) -> np.ndarray:
        """Sorted neuron ids to load whenever the cache is (re)filled from empty. Default: none."""
        return np.empty(0, dtype=np.int64)

    def touch(self, need: np.ndarray, last: np.ndarray, step: int) -> None:
        """``need`` is needed at ``step`` (called before ``last`` records it). Default: nothing to count."""

    def value(self, ids: np.ndarray) -> Optional[np.ndarray]:
        """What keeping each of ``ids`` is worth (a newcomer displaces only cached neurons worth less; the most valuable
        newcomers enter first), or None: newcomers always enter, lowest ids first. Default: None."""
        return None

    def reset(self) -> None:
        """The cache was emptied (a new sequence). Default: no state."""


class WindowPolicy(CachePolicy):
    """The paper's sliding window of ``window`` tokens (Section 3.3)."""

    name = "window"

    def __init__(self, window: int) -> None:
        self.window = window

    def expired(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        return np.flatnonzero(last[ids] <= step - self.window)


class LRUPolicy(CachePolicy):
    """Keep the most recently used neurons up to the cache's capacity."""

    name = "lru"


class HotPolicy(WindowPolicy):
    """A pinned hot set (neuron ids, loaded from empty and never evicted) plus a sliding window for the rest."""

    name = "hot"

    def __init__(self, window: int, hot_ids: np.ndarray | Sequence[int], d_ffn: int) -> None:
        super().__init__(window)
        self.hot_ids = np.unique(np.asarray(hot_ids, dtype=np.int64))
        self.pinned = np.zeros(d_ffn, dtype=bool)
        self.pinned[self.hot_ids] = True

    def expired(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        rows = super().expired(ids, last, step)
        return rows[~self.pinned[ids[rows]]]

    def evictable(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        rows = super().evictable(ids, last, step)
        return rows[~self.pinned[ids[rows]]]

    def preload(self) -> np.ndarray:
        return self.hot_ids


class LFUPolicy(CachePolicy):
    """Keep the neurons needed most often lately: each use counts ``decay ** tokens_since``.

    Held as ``score[i]`` = sum over uses at step t of ``decay ** -(t - base)`` (so a use adds the same amount to every
    neuron and no score decays step by step: the order is that of the decayed counts), rebased when the increment grows
    large. ``score`` is never reallocated (the native cache update adds to it in place)."""

    name = "lfu"

    def __init__(self, d_ffn: int, decay: float = LFU_DECAY) -> None:
        if not 0.0 < decay <= 1.0:
            raise LLMFlashError(f"the lfu policy's decay must be in (0, 1], not {decay}")
        self.decay = decay
        self.score = np.zeros(d_ffn, dtype=np.float64)
        self.base = 0

    def increment(self, step: int) -> float:
        """What a use at ``step`` adds (rebasing every score first when it would exceed 1e100)."""
        if step < self.base:  # (a new sequence without a reset: count on from here)
            self.base = step
        inc = self.decay ** -(step - self.base)
        if inc > 1e100:
            self.score *= self.decay ** (step - self.base)
            self.base = step
            inc = 1.0
        return inc

    def touch(self, need: np.ndarray, last: np.ndarray, step: int) -> None:
        inc = self.increment(step)  # (called on every update, as the native one does: the same rebasing)
        self.score[need[last[need] != step]] += inc  # once per step (lookahead enters a step's guess before its set)

    def evictable(self, ids: np.ndarray, last: np.ndarray, step: int) -> np.ndarray:
        """Rows not needed at ``step``, worth least first (ties: least recently used, then row order)."""
        rows = np.flatnonzero(last[ids] < step)
        held = ids[rows]
        return rows[np.lexsort((rows, last[held], self.score[held]))]

    def value(self, ids: np.ndarray) -> Optional[np.ndarray]:
        return self.score[ids]

    def reset(self) -> None:
        self.score[:] = 0.0
        self.base = 0


def hot_sets(counts: Sequence[np.ndarray], sizes: Sequence[int]) -> list[np.ndarray]:
    """Per layer: the ``sizes[l]`` most frequently needed neurons by ``counts[l]`` (times each neuron was needed),
    sorted by id; neurons never needed are not pinned. Ties go to the lower id."""
    out = []
    for c, k in zip(counts, sizes):
        order = np.argsort(-np.asarray(c), kind="stable")[: max(0, k)]
        out.append(np.sort(order[np.asarray(c)[order] > 0]).astype(np.int64))
    return out


def make_policy(name: str, window: int, d_ffn: int, hot_ids: np.ndarray | Sequence[int] = ()) -> CachePolicy:
    """The policy called ``name`` (one of ``POLICIES``) for one layer."""
    if name == "window":
        return WindowPolicy(window)
    if name == "lru":
        return LRUPolicy()
    if name == "hot":
        return HotPolicy(window, hot_ids, d_ffn)
    if name == "lfu":
        return LFUPolicy(d_ffn)
    raise LLMFlashError(f"unknown cache policy {name!r}: use one of {', '.join(POLICIES)}")

"""Cache policies: which neurons a layer's ``NeuronCache`` keeps. The cache stores the rows and plans the reads; the
policy only decides membership, from each cached neuron's last use and the step.

- ``WindowPolicy`` (the paper's sliding window, the default): a neuron stays while it was needed in one of the last
  ``window`` tokens; when the newcomers do not fit, cached neurons not needed now go, least recently used first.
- ``LRUPolicy``: nothing expires; neurons stay until the cache is full, then the least recently used neuron not needed
  now makes room.
- ``HotPolicy`` (PowerInfer-style): a static per-layer hot set (e.g. the most frequently active neurons on calibration
  text: ``hot_sets``) is loaded when the cache is (re)filled and never evicted; the window manages the other rows.

A policy never changes what is computed: the engine computes every cached row with the model's rule, so a cached
neuron that is not active gives zeros.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import LLMFlashError

POLICIES = ("window", "lru", "hot")  # EngineConfig.cache_policy


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
    raise LLMFlashError(f"unknown cache policy {name!r}: use one of {', '.join(POLICIES)}")

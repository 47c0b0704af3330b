"""Observer hooks: what an experiment attaches to an ``Engine`` to watch it, instead of patching it.

Subclass ``EngineObserver``, override the callbacks you need (each default does nothing) and pass instances as
``Engine(..., observers=[...])`` or append them to ``engine.observers``. Callbacks run on the engine's thread, inside
the measured token: keep them cheap (count, append), and do the analysis afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the engine imports this module
    from .cache import CacheUpdate
    from .metrics import TokenStats


class EngineObserver:
    def read_plan(self, layer: int, ids: np.ndarray) -> None:
        """A layer is about to read the rows ``ids`` (sorted row ids of ``ffn.bin``, after the cache's hits)."""

    def cache_updated(self, layer: int, update: CacheUpdate) -> None:
        """A layer's neuron cache entered a token's set: what it loads, where, what overflowed, what was deleted."""

    def reads_issued(self, source: str, nbytes: np.ndarray) -> None:
        """Reads were submitted: ``source`` is ``"ffn"`` or ``"resident"`` (naive mode's per-token re-read);
        ``nbytes`` holds each read's size (neighbouring rows already merged)."""

    def layer_done(self, layer: int, ms: float) -> None:
        """A layer's FFN module finished its forward, ``ms`` after it started (host wall time: on an accelerator its
        reads and copies are waited for, its compute may still run). Only timed when an observer overrides this."""

    def forward_done(self, step: int) -> None:
        """A forward pass finished: the prompt (step 0) or token ``step``."""

    def token_done(self, step: int, stats: TokenStats) -> None:
        """Generated token ``step`` is complete, with its measurements."""

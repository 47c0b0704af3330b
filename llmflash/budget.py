"""The DRAM budget, planned without a model: pure arithmetic over byte counts, testable on its own.

A budget (``--dram-budget``, a fraction of the model's weight bytes) covers the fixed parts (resident weights, the
staging buffer, the predictors; on an accelerator the device staging too) and then:

- sparse modes: one neuron cache per layer, rows split by each layer's expected demand (``cache.split_rows``),
  each at least ``min_cache_rows`` and at most the layer's neurons; a working reserve held back (not allocated) of
  ``reserve`` times the largest cache; on an accelerator a host landing buffer as large as the largest cache (two
  with lookahead: one layer's reads land while the next one's are already in flight);
- ``hybrid``: as many whole layers resident as fit, the rest streamed;
- sparse modes below the resident weights' share: decoder layers' attention streamed (``streamed_layer_count``);
- ``naive`` / ``dense``: nothing more (``dense`` is the reference and has no budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .cache import split_rows


@dataclass(frozen=True)
class SparsePlan:
    cache_rows: tuple[int, ...]  # per layer
    reserve_rows: int  # the working reserve, in rows: held back inside the budget, not allocated
    landing_rows: int  # accelerator: the host landing buffers' rows (each the largest cache); 0 on the CPU

    def planned_bytes(self, row_bytes: int) -> int:
        return (sum(self.cache_rows) + self.reserve_rows + self.landing_rows) * row_bytes


@dataclass(frozen=True)
class SparseBudget:
    budget_bytes: int
    fixed_bytes: int  # resident weights, staging, predictors (and device staging): what is held before the caches
    row_bytes: int  # one neuron's row in ffn.bin (all of its segments)
    n_layers: int
    d_ffn: int
    min_cache_rows: int
    reserve: float = 0.0  # working reserve, in multiples of the largest cache
    offload: bool = False  # accelerator: reads land in a host buffer before the device cache
    demand: Optional[Sequence[float]] = None  # expected share of each layer's neurons per token; None: alike
    landings: int = 1  # with ``offload``: host landing buffers (2 with lookahead)

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that holds ``min_cache_rows`` per layer with its landing and reserve share."""
        per_row = int(self.row_bytes * (self.n_layers + self.offload * self.landings + self.reserve))
        return self.fixed_bytes + self.min_cache_rows * per_row

    def plan(self) -> SparsePlan:
        if self.budget_bytes < self.minimum_bytes:
            raise ValueError(f"budget {self.budget_bytes} is below the minimum {self.minimum_bytes}")
        demand = list(self.demand or [1.0] * self.n_layers)
        total_rows = (self.budget_bytes - self.fixed_bytes) // self.row_bytes

        def split(rows_for_caches: int) -> list[int]:
            return split_rows(rows_for_caches, demand, self.d_ffn, self.min_cache_rows)

        def held(rows: list[int]) -> tuple[int, int]:  # (reserve, landing) rows, sized by the largest cache
            return int(self.reserve * max(rows)), (max(rows) * self.landings if self.offload else 0)

        rows = split(total_rows)
        reserve_rows, landing_rows = held(rows)
        if reserve_rows + landing_rows:
            rows = split(total_rows - reserve_rows - landing_rows)
            landing_rows = held(rows)[1]
        if sum(rows) + reserve_rows + landing_rows > total_rows:
            # near the minimum, sizing the held rows by the first split overshoots: the largest split that fits
            lo, hi = self.min_cache_rows * self.n_layers, total_rows
            while lo < hi:
                mid = (lo + hi + 1) // 2
                r = split(mid)
                if sum(r) + sum(held(r)) <= total_rows:
                    lo = mid
                else:
                    hi = mid - 1
            rows = split(lo)
            reserve_rows, landing_rows = held(rows)
        return SparsePlan(tuple(rows), reserve_rows, landing_rows)

def hybrid_resident_layers(budget_bytes: int, fixed_bytes: int, layer_payload_bytes: int, n_layers: int) -> int:
    """``hybrid``: how many whole layers stay resident (the first ones); the rest are streamed every token."""
    if budget_bytes < fixed_bytes:
        raise ValueError(f"budget {budget_bytes} is below the fixed {fixed_bytes}")
    return min(n_layers, (budget_bytes - fixed_bytes) // layer_payload_bytes)


def streamed_layer_count(budget_bytes: int, fixed_bytes: int, want_bytes: int, saved: Callable[[int], int],
                         n_layers: int) -> int:
    """Sparse modes (``layer_stream``): how many decoder layers to stream so that the budget holds ``fixed_bytes``
    (every resident weight, buffers, predictors) less what streaming ``m`` layers saves (``saved(m)``: their bytes
    less the slots') plus ``want_bytes`` of neuron caches. 0 when it fits as is; else the fewest that fit; else the
    count that saves the most (the budget check then says whether the minimum fits)."""
    if budget_bytes >= fixed_bytes + want_bytes:
        return 0
    savings = [0] + [saved(m) for m in range(1, n_layers + 1)]
    for m in range(1, n_layers + 1):
        if budget_bytes >= fixed_bytes - savings[m] + want_bytes:
            return m
    return max(range(n_layers + 1), key=lambda m: (savings[m], -m))

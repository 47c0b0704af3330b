"""The budget planner on byte counts alone (no model, no files)."""

from __future__ import annotations

import pytest

from llmflash.budget import SparseBudget, hybrid_resident_layers

ROW = 4096 * 3  # a gated layer's row: gate + up + down, 4 KiB each


def _budget(budget_bytes, **kw):
    args = dict(budget_bytes=budget_bytes, fixed_bytes=1_000_000, row_bytes=ROW, n_layers=4, d_ffn=1000,
                min_cache_rows=16)
    args.update(kw)
    return SparseBudget(**args)


def test_minimum_is_the_fixed_part_plus_the_floor_rows_with_their_shares():
    assert _budget(0).minimum_bytes == 1_000_000 + 16 * ROW * 4
    assert _budget(0, offload=True, reserve=2.0).minimum_bytes == 1_000_000 + 16 * int(ROW * (4 + 1 + 2.0))
    assert _budget(0, offload=True, landings=2).minimum_bytes == 1_000_000 + 16 * ROW * (4 + 2)
    with pytest.raises(ValueError, match="below the minimum"):
        _budget(_budget(0).minimum_bytes - 1).plan()


def test_the_caches_take_what_is_left_and_stay_within_the_budget():
    for budget in (3_000_000, 5_000_000, 20_000_000):
        for kw in ({}, {"offload": True}, {"reserve": 1.5}, {"offload": True, "reserve": 4.0},
                   {"offload": True, "landings": 2}):
            b = _budget(budget, **kw)
            plan = b.plan()
            assert len(plan.cache_rows) == 4 and all(16 <= r <= 1000 for r in plan.cache_rows)
            assert b.fixed_bytes + plan.planned_bytes(ROW) <= budget
            assert plan.landing_rows == (max(plan.cache_rows) * kw.get("landings", 1) if kw.get("offload") else 0)
            reserve = kw.get("reserve", 0.0)
            assert (plan.reserve_rows > 0) == (reserve > 0)
            assert plan.reserve_rows >= int(reserve * max(plan.cache_rows))  # sized before the caches gave way


def test_rows_follow_demand_and_stop_at_the_layer_size():
    plan = _budget(3_000_000, demand=(0.1, 0.1, 0.4, 0.4)).plan()
    assert plan.cache_rows[2] > plan.cache_rows[0] and plan.cache_rows[2] == plan.cache_rows[3]
    big = _budget(10**9).plan()
    assert big.cache_rows == (1000,) * 4


def test_hybrid_keeps_whole_layers():
    assert hybrid_resident_layers(10_000, 1_000, 3_000, 4) == 3
    assert hybrid_resident_layers(10**9, 1_000, 3_000, 4) == 4
    assert hybrid_resident_layers(1_000, 1_000, 3_000, 4) == 0
    with pytest.raises(ValueError):
        hybrid_resident_layers(999, 1_000, 3_000, 4)


def test_no_budget_above_the_minimum_is_overshot():
    """Sizing the reserve and landing rows by the first split used to overshoot budgets near the minimum."""
    for reserve in (0.0, 1.0, 4.0):
        for offload in (False, True):
            for demand in (None, (0.05, 0.2, 0.3, 0.45)):
                base = _budget(0, reserve=reserve, offload=offload, demand=demand)
                slack = int(ROW * (4 + offload + reserve + 1))
                for k in range(0, 400, 7):
                    b = _budget(base.minimum_bytes + slack + k * ROW, reserve=reserve, offload=offload, demand=demand)
                    assert b.fixed_bytes + b.plan().planned_bytes(ROW) <= b.budget_bytes, (reserve, offload, k)

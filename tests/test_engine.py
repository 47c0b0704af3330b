"""The flash engine on tiny random models: layout, cache, sparse == dense, byte accounting, budgets."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import llmflash.engine as engine_module
from llmflash.cache import NeuronCache
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig, SparseFFN
from llmflash.errors import BudgetError, LLMFlashError
from llmflash.flashdir import open_flash_dir
from llmflash.hooks import EngineObserver
from llmflash.layout import FlashLayout, bridge, read_plan, runs
from llmflash.models import load_in_memory
from llmflash.provider import ActiveSetProvider, OracleProvider
from llmflash.storage import proc_read_bytes

from tiny import engine_generate, engine_perplexity, save_tiny_models

CALIBRATION_TOKENS = 512  # cheap threshold calibration at convert time
BIG = 8.0  # tiny models are mostly padding: give them room
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])


@pytest.fixture(scope="module")
def flash_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    out = {}
    for name, src in save_tiny_models(root, ("llama", "opt", "silu")).items():
        # thresholds calibrated by convert on a few tokens (the SiLU model's are used)
        out[name] = convert(str(src), root / f"{name}-flash", progress=False, calibration_tokens=CALIBRATION_TOKENS)
    out["llama-unbundled"] = convert(str(root / "llama"), root / "llama-unb", bundled=False, progress=False,
                                     calibration_tokens=0)
    return out


def _gen(path, mode, n=12, **kw):
    return engine_generate(path, PROMPT, n, kw.pop("budget", BIG), mode=mode, **kw)


def _ppl(path, mode, ids, **kw):
    return engine_perplexity(path, ids, kw.pop("budget", BIG), mode=mode, **kw)


# ------------------------------------------------------------------------------------------------------------ layout


def test_runs_merge_neighbours_and_split_long_runs():
    first, length = runs(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 22, 23]), 4)
    assert first.tolist() == [0, 4, 8, 20, 22] and length.tolist() == [4, 4, 2, 1, 2]


def test_layout_rows_are_aligned_and_disjoint():
    for bundled in (True, False):
        lay = FlashLayout.build(3, 576, 1536, True, "float32", bundled)
        spans = []
        for seg in lay.segments:
            assert seg.stride_bytes % 4096 == 0 and seg.stride_bytes >= seg.row_bytes
            for off in seg.layer_offsets:
                assert off % 4096 == 0
                spans.append((off, off + seg.stride_bytes * lay.d_ffn))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == lay.file_bytes
    fo, nb, do = read_plan(lay.segments[0], 1, np.array([3, 4, 5, 9]), 10, 1 << 20)
    stride = lay.segments[0].stride_bytes
    assert nb.tolist() == [3 * stride, stride] and do.tolist() == [10 * stride, 13 * stride]


def test_convert_writes_manifest_and_resident_split(flash_dirs):
    fd = open_flash_dir(flash_dirs["llama"])
    m = fd.manifest
    assert m.gated and m.activation == "relu"
    assert m.bytes.model == m.bytes.resident_tensors + m.bytes.ffn_payload
    assert fd.ffn_path.stat().st_size == fd.layout.file_bytes
    assert (fd.path / "tokenizer_config.json").is_file()
    assert not open_flash_dir(flash_dirs["llama-unbundled"]).layout.bundled


# ------------------------------------------------------------------------------------------------------------- cache


def test_cache_keeps_exactly_the_window_and_rows_stay_in_their_slots():
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    cache = NeuronCache(lay, 40, window=3, dtype=torch.float32)
    rng = np.random.default_rng(0)
    history = []
    needed = hits = 0
    for step in range(40):
        need = np.unique(rng.choice(64, size=rng.integers(1, 12), replace=False))
        needed += need.size
        hits += int((cache.slot[need] >= 0).sum())
        before = cache.store.rows[0][:, 0].clone()
        kept = cache.used_slots().copy()
        upd = cache.update(need, step)
        survivors = np.setdiff1d(np.intersect1d(kept, cache.used_slots()), upd.dest_slots)  # kept, not reused
        assert torch.equal(cache.store.rows[0][survivors, 0], before[survivors])  # nothing moved
        assert np.array_equal(upd.ready_slots, survivors)  # computable at once: the rows that stayed
        assert not np.isin(upd.dest_slots, survivors).any() and np.all(np.diff(upd.dest_slots) > 0)
        # "read": write each loaded neuron's id into its slot so we can check rows stay with their ids
        for slot, nid in zip(upd.dest_slots, upd.load_ids):
            cache.store.rows[0][slot, 0] = float(nid)
        history.append(set(need.tolist()))
        window = set().union(*history[-3:])
        cached = cache.cached_ids()
        assert set(cached.tolist()) == window and len(cached) == len(window) == cache.count
        assert np.array_equal(cache.ids[cache.slot[cached]], cached)
        assert torch.equal(cache.store.rows[0][cache.slot[cached], 0], torch.from_numpy(cached).float())
        assert cache.free.size + cache.count == cache.capacity and not np.isin(cache.free, cache.used_slots()).any()
        assert upd.overflow_ids.size == 0
    c = cache.counters
    assert (c.hits, c.misses, c.overflows) == (hits, needed - hits, 0)
    assert c.misses - c.evictions == cache.count  # every row read in is in the cache or was evicted


def test_cache_over_capacity_evicts_least_recent_and_overflows():
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    cache = NeuronCache(lay, 8, window=5, dtype=torch.float32)
    cache.update(np.arange(0, 6), 0)
    upd = cache.update(np.arange(10, 20), 1)  # 10 needed, capacity 8: evict all old, 2 overflow
    assert cache.count == 8 and upd.overflow_ids.size == 2
    assert (cache.counters.misses, cache.counters.evictions, cache.counters.overflows) == (16, 6, 2)
    assert set(cache.cached_ids().tolist()) <= set(range(10, 20))


def test_cache_second_update_of_a_step_frees_nothing():
    """After a lookahead's update (its rows still being read), the real update may only take free slots or overflow."""
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    cache = NeuronCache(lay, 12, window=2, dtype=torch.float32)
    cache.update(np.arange(0, 8), 0)
    guess = cache.update(np.array([1, 2, 20, 21]), 1)  # slides the window (nothing expires yet), loads 20, 21
    assert guess.dest_slots.tolist() == [8, 9]
    before = cache.ids.copy()
    upd = cache.update(np.array([2, 3, 30, 31, 32, 33]), 1, evict=False)
    held = before >= 0
    assert np.array_equal(cache.ids[held], before[held])  # no slot freed or reused
    assert upd.dest_slots.tolist() == [10, 11] and upd.deleted == 0
    assert upd.load_ids.tolist() == [30, 31] and upd.overflow_ids.tolist() == [32, 33]  # full: the rest overflows


def test_cache_reuses_freed_slots_lowest_first():
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    cache = NeuronCache(lay, 6, window=1, dtype=torch.float32)
    first = cache.update(np.array([1, 2, 3, 4]), 0)
    assert first.dest_slots.tolist() == [0, 1, 2, 3]
    upd = cache.update(np.array([2, 4, 9, 10, 11]), 1)  # 1 and 3 expire: slots 0 and 2 go to the free list
    assert upd.deleted == 2 and upd.ready_slots.tolist() == [1, 3]
    assert upd.dest_slots.tolist() == [0, 2, 4] and upd.load_ids.tolist() == [9, 10, 11]
    assert cache.slot[[2, 4, 9, 10, 11]].tolist() == [1, 3, 0, 2, 4] and cache.free.tolist() == [5]


# ------------------------------------------------------------------------------------------------ sparse equals dense


@pytest.mark.parametrize("name", ["llama", "opt", "llama-unbundled"])
def test_every_mode_generates_the_dense_tokens(flash_dirs, name):
    ref = _gen(flash_dirs[name], "dense").tokens
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(flash_dirs[name], mode).tokens == ref, mode


def test_a_provider_declares_only_what_it_has(flash_dirs):
    """The base class supplies every optional capability: a provider with only ``active`` runs (no lookahead)."""

    class AllActive(ActiveSetProvider):
        counted = False

        def active(self, layer, x):
            return torch.ones(x.shape[0], 384, dtype=torch.bool)

    e = Engine(flash_dirs["llama"], EngineConfig(mode="oracle", dram_budget=BIG, lookahead=True), provider=AllActive())
    try:
        res = e.generate(PROMPT, 6, stop_at_eos=False)
    finally:
        e.close()
    assert res.tokens == _gen(flash_dirs["llama"], "dense", n=6).tokens
    src = open(engine_module.__file__, encoding="utf-8").read()
    assert set(re.findall(r"hasattr\((\w+)", src)) <= {"os"}  # capabilities are declared, not discovered


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_oracle_perplexity_equals_dense(flash_dirs, name):
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(3))
    dense, oracle = _ppl(flash_dirs[name], "dense", ids), _ppl(flash_dirs[name], "oracle", ids, window=2)
    assert abs(oracle - dense) / dense < 1e-5


def test_threshold_sparsity_oracle_equals_thresholded_dense(flash_dirs):
    kw = dict(sparsity="threshold", threshold_sparsity=0.8)
    dense = _gen(flash_dirs["silu"], "dense", **kw)
    oracle = _gen(flash_dirs["silu"], "oracle", **kw)
    assert oracle.tokens == dense.tokens
    plain = _gen(flash_dirs["silu"], "dense")
    assert plain.dram_bytes == dense.dram_bytes
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4))
    d, o = _ppl(flash_dirs["silu"], "dense", ids, **kw), _ppl(flash_dirs["silu"], "oracle", ids, **kw)
    assert abs(o - d) / d < 1e-5


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_lookahead_moves_reads_not_results(flash_dirs, name):
    """Reading the next layer's guessed neurons early changes when bytes arrive, never the output (oracle, ReLU)."""
    on = _gen(flash_dirs[name], "oracle", n=10, window=2, lookahead=True)
    off = _gen(flash_dirs[name], "oracle", n=10, window=2)
    assert on.tokens == off.tokens == _gen(flash_dirs[name], "dense", n=10).tokens
    assert sum(t.loaded_neurons for t in on.per_token) >= sum(t.loaded_neurons for t in off.per_token)
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(6))
    assert abs(_ppl(flash_dirs[name], "oracle", ids, window=2, lookahead=True) / _ppl(flash_dirs[name], "dense", ids) - 1) < 1e-5


@pytest.mark.parametrize("name", ["llama", "opt"])
@pytest.mark.parametrize("stand_in", [False, True])
def test_deeper_lookahead_moves_reads_not_results(flash_dirs, name, stand_in, monkeypatch):
    """Depth 2 (layer 0 starts the reads of layers 1 and 2, each later layer those of the layer two ahead): every
    layer after the first is read ahead once per token, into depth + 1 host buffers counted in the budget; the output
    stays exact, on the CPU and on the accelerator's code path (landing buffers)."""
    monkeypatch.setattr(Engine, "copy_on_cpu", stand_in)
    ref = _gen(flash_dirs[name], "dense", n=10).tokens
    calls: list[int] = []
    orig = SparseFFN.prefetch

    def prefetch(self, x_guess):
        calls.append(self.layer)
        return orig(self, x_guess)

    monkeypatch.setattr(SparseFFN, "prefetch", prefetch)
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    n = 10
    res = _gen(flash_dirs[name], "oracle", n=n, window=2, lookahead=True, lookahead_depth=2)
    assert res.tokens == ref
    assert res.config["lookahead_depth"] == 2
    assert calls == [1, 2] * (n - 1)  # the first token comes from the prefill; layer 0 starts both later layers
    if stand_in:
        landing = res.dram_breakdown["landing"]
        assert landing % 3 == 0 and landing > 0  # three landing buffers alike
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(6))
    deep = _ppl(flash_dirs[name], "oracle", ids, window=2, lookahead=True, lookahead_depth=2)
    assert abs(deep / _ppl(flash_dirs[name], "dense", ids) - 1) < 1e-5
    if not stand_in:  # caches too small for the guesses: the guessed rows beyond them go to three host buffers
        fixed = fd.resident_path.stat().st_size + 4 * 384 * lay.neuron_stride_bytes
        budget = (fixed + 20 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes
        tight = _gen(flash_dirs[name], "oracle", n=n, budget=budget, staging_rows=384, window=2, lookahead=True,
                     lookahead_rows=384, lookahead_depth=2)
        assert tight.tokens == ref and tight.dram_bytes <= budget * fd.model_bytes
        assert tight.dram_breakdown["lookahead"] == 3 * 384 * lay.neuron_stride_bytes
    with pytest.raises(LLMFlashError, match="lookahead-depth"):
        _gen(flash_dirs[name], "oracle", n=2, lookahead=True, lookahead_depth=0)


def test_auto_lookahead_only_while_the_caches_hold_less_than_a_token(flash_dirs, monkeypatch):
    """Lookahead's auto setting (where the machine would have it on) stays on while the caches, planned without it,
    hold fewer rows than a token's expected set, and is off when they hold more (with its one compute thread undone)."""
    monkeypatch.setattr(engine_module, "lookahead_pays", lambda cpu, accelerator: True)
    monkeypatch.setattr(OracleProvider, "layer_demand", [0.5, 0.5, 0.5])  # 384 of the 3 x 256 neurons per token
    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    tight = (fd.resident_path.stat().st_size + 384 * lay.neuron_stride_bytes
             + 40 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes  # 40 rows per layer: 120 < 384
    small = Engine(fd, EngineConfig(mode="oracle", dram_budget=tight, staging_rows=384))
    large = Engine(fd, EngineConfig(mode="oracle", dram_budget=BIG, staging_rows=384))
    forced = Engine(fd, EngineConfig(mode="oracle", dram_budget=BIG, staging_rows=384, lookahead=True))
    try:
        assert small.cfg.lookahead and sum(small.cache_rows) < 384
        assert not large.cfg.lookahead and sum(large.cache_rows) >= 384 and "lookahead" not in large.dram
        assert forced.cfg.lookahead  # asked for: kept whatever the caches
        assert large.compute_threads >= small.compute_threads
    finally:
        for e in (small, large, forced):
            e.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_row_bucket_pads_shapes_not_results(flash_dirs, name):
    """Computing cached rows in padded regions (fewer matmul shapes) leaves the output unchanged."""
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(7))
    plain = _ppl(flash_dirs[name], "oracle", ids, window=2)
    padded = _ppl(flash_dirs[name], "oracle", ids, window=2, row_bucket=64)
    assert abs(padded / plain - 1) < 1e-5
    assert _gen(flash_dirs[name], "oracle", n=8, row_bucket=64).tokens == _gen(flash_dirs[name], "dense", n=8).tokens


def test_tight_budget_with_overflow_still_exact(flash_dirs):
    """A cache too small for the active set computes the overflow from the staging buffer: still exact."""
    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + 384 * lay.neuron_stride_bytes
    budget = (fixed + 20 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes  # 20 rows per layer
    ref = _gen(flash_dirs["llama"], "dense").tokens
    res = _gen(flash_dirs["llama"], "oracle", budget=budget, staging_rows=384)
    assert res.tokens == ref and res.dram_bytes <= budget * fd.model_bytes


@pytest.mark.parametrize("lookahead", [False, True])
def test_native_read_plans_equal_the_python_plans(flash_dirs, lookahead):
    """The engine's hot path plans its reads in the native reader (``FlashReader.submit_rows``), also with an
    observer that counts reads by size (it gets the native plan's sizes: an experiment measures the path users run);
    ``native_plans=False`` plans them in numpy (the reference). Same tokens, per token the same reads and bytes, and
    the same read sizes counted, through a cache too small for the active set (overflow through the staging buffer)
    and with lookahead."""
    from llmflash.native import reader_library

    if reader_library() is None:
        pytest.skip("the native reader does not build here")

    class CountReads(EngineObserver):
        def __init__(self):
            self.sizes: list[int] = []

        def reads_issued(self, source, nbytes):
            self.sizes += np.asarray(nbytes).tolist()

    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + (3 if lookahead else 1) * 384 * lay.neuron_stride_bytes
    budget = (fixed + 20 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes  # 20 rows per layer
    cfg = EngineConfig(mode="oracle", dram_budget=budget, staging_rows=384, window=2, lookahead=lookahead,
                       lookahead_rows=384)
    runs_ = []
    native_count, python_count = CountReads(), CountReads()
    planned = {"numpy": 0}
    orig_plan, orig_slot = engine_module.read_plan, engine_module.slot_plan

    def count(f):
        def g(*a, **k):
            planned["numpy"] += 1
            return f(*a, **k)
        return g

    engine_module.read_plan, engine_module.slot_plan = count(orig_plan), count(orig_slot)
    try:
        for observers, c in (((), cfg), ((native_count,), cfg), ((python_count,), replace(cfg, native_plans=False))):
            e = Engine(flash_dirs["llama"], c, observers=observers)
            before = planned["numpy"]  # (the oracle's own copy of the weights is read at start with numpy plans)
            try:
                assert e.reader.native
                runs_.append(e.generate(PROMPT, 8, stop_at_eos=False))
            finally:
                e.close()
            assert (planned["numpy"] > before) == (not c.native_plans)  # an observer no longer forces numpy plans
    finally:
        engine_module.read_plan, engine_module.slot_plan = orig_plan, orig_slot
    native_run, python_run, off_run = runs_
    assert sorted(native_count.sizes) == sorted(python_count.sizes) and native_count.sizes
    assert off_run.tokens == native_run.tokens and off_run.config["native_plans"] is False
    assert [t.reads for t in off_run.per_token] == [t.reads for t in native_run.per_token]
    assert native_run.tokens == python_run.tokens == _gen(flash_dirs["llama"], "dense", n=8).tokens
    assert [t.reads for t in native_run.per_token] == [t.reads for t in python_run.per_token]
    assert [t.bytes_read for t in native_run.per_token] == [t.bytes_read for t in python_run.per_token]
    assert sum(t.reads for t in native_run.per_token) > 0


@pytest.mark.parametrize("native", [False, True])
def test_bridge_fills_short_gaps_only(native):
    ids = np.array([1, 2, 5, 9, 10, 20, 22], dtype=np.int64)
    assert bridge(ids, 0, native) is ids
    assert bridge(ids, 1, native).tolist() == [1, 2, 5, 9, 10, 20, 21, 22]
    assert bridge(ids, 3, native).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 21, 22]
    rng = np.random.default_rng(0)
    for _ in range(200):  # one-row gaps take a mask path: the same rows as the general one (gaps of at most 1)
        ids = np.sort(rng.choice(300, rng.integers(2, 200), replace=False)).astype(np.int64)
        gaps = np.diff(ids) - 1
        want = np.union1d(ids, ids[:-1][gaps == 1] + 1)
        got = bridge(ids, 1, native)
        assert got.dtype == ids.dtype and got.tolist() == want.tolist()
        assert bridge(ids, 4, native).tolist() == bridge(ids, 4, native=False).tolist()


@pytest.mark.parametrize("lookahead", [False, True])
def test_bridged_overflow_reads_are_fewer_and_exact(flash_dirs, lookahead):
    """Rows beyond the cache read with short gaps filled (``max_gap_rows``): fewer reads, more bytes, and the filled
    rows computed under the rule (inactive: exactly zero) unless cached or read ahead: oracle still equals dense."""
    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + (3 if lookahead else 1) * 384 * lay.neuron_stride_bytes
    budget = (fixed + 20 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes  # 20 rows per layer
    ref = _gen(flash_dirs["llama"], "dense", n=10).tokens
    kw = dict(n=10, budget=budget, staging_rows=384, window=2, lookahead=lookahead, lookahead_rows=384)
    plain, bridged = (_gen(flash_dirs["llama"], "oracle", max_gap_rows=g, **kw) for g in (0, 4))
    assert plain.tokens == bridged.tokens == ref
    reads = [sum(t.reads for t in r.per_token) for r in (plain, bridged)]
    nbytes = [sum(t.bytes_read for t in r.per_token) for r in (plain, bridged)]
    assert reads[1] < reads[0] and nbytes[1] > nbytes[0]
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(10))
    got = _ppl(flash_dirs["llama"], "oracle", ids, budget=budget, staging_rows=384, window=2, lookahead=lookahead,
               lookahead_rows=384, max_gap_rows=4)
    assert abs(got / _ppl(flash_dirs["llama"], "dense", ids) - 1) < 1e-5


def test_auto_gap_fills_the_rows_that_fit_8_kib(flash_dirs):
    """``max_gap_rows=-1`` (the default) resolves to the rows of the widest segment that fit in ``AUTO_GAP_BYTES``;
    the run records the resolved value."""
    from llmflash.engine import AUTO_GAP_BYTES

    fd = open_flash_dir(flash_dirs["llama"])
    want = AUTO_GAP_BYTES // max(seg.stride_bytes for seg in fd.layout.segments)
    res = _gen(flash_dirs["llama"], "oracle", n=2)
    assert res.config["max_gap_rows"] == want
    assert _gen(flash_dirs["llama"], "oracle", n=2, max_gap_rows=0).config["max_gap_rows"] == 0


def test_lookahead_beyond_the_cache_still_exact(flash_dirs):
    """With caches too small for the guessed sets, lookahead reads the guessed rows beyond them into its two host
    buffers (counted in the budget); the layer computes what it needs from there, or copies them into freed slots,
    and reads the rest: the output stays exact."""
    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + 3 * 384 * lay.neuron_stride_bytes  # staging + two lookahead buffers
    budget = (fixed + 20 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes  # 20 rows per layer
    ref = _gen(flash_dirs["llama"], "dense", n=10).tokens
    seen = {"ahead": 0}
    orig = SparseFFN._add

    def add(self, y, store, ids, x, start=0, slots=None):  # count the rows computed where lookahead read them
        seen["ahead"] += ids.size if any(store is b for b in self.e.aheads) else 0
        return orig(self, y, store, ids, x, start, slots)

    SparseFFN._add = add  # type: ignore[method-assign]
    try:
        res = _gen(flash_dirs["llama"], "oracle", n=10, budget=budget, staging_rows=384, window=2, lookahead=True,
                   lookahead_rows=384)
    finally:
        SparseFFN._add = orig  # type: ignore[method-assign]
    assert res.tokens == ref and res.dram_bytes <= budget * fd.model_bytes
    assert res.dram_breakdown["lookahead"] == 2 * 384 * lay.neuron_stride_bytes and seen["ahead"] > 0
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(9))
    tight = _ppl(flash_dirs["llama"], "oracle", ids, budget=budget, staging_rows=384, window=2, lookahead=True,
                 lookahead_rows=384)
    assert abs(tight / _ppl(flash_dirs["llama"], "dense", ids) - 1) < 1e-5


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_accelerator_path_on_cpu_gives_the_dense_tokens(flash_dirs, name, monkeypatch):
    """The accelerator's code path (compute rows kept apart from the host buffers that reads land in, rows copied
    over, resident weights copied again in naive), taken with CPU tensors: same tokens, same log-probabilities, and
    the host landing buffer inside the budget, also when the cache overflows into the staging buffer."""
    ref = _gen(flash_dirs[name], "dense").tokens
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(8))
    dense_ppl = _ppl(flash_dirs[name], "dense", ids)
    monkeypatch.setattr(Engine, "copy_on_cpu", True)
    for mode in ("dense", "naive", "hybrid", "oracle"):
        assert _gen(flash_dirs[name], mode).tokens == ref, mode
    assert abs(_ppl(flash_dirs[name], "oracle", ids, window=2) / dense_ppl - 1) < 1e-5
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + 2 * 384 * lay.neuron_stride_bytes
    budget = (fixed + 20 * lay.neuron_stride_bytes * (lay.n_layers + 1)) / fd.model_bytes  # 20 rows per layer
    res = _gen(flash_dirs[name], "oracle", budget=budget, staging_rows=384)
    assert res.tokens == ref and res.dram_bytes <= budget * fd.model_bytes
    assert {"landing", "staging_device"} <= set(res.dram_breakdown)
    # lookahead: layer l + 1's guessed rows land in the second landing buffer while layer l's are copied over
    ahead = _gen(flash_dirs[name], "oracle", n=10, window=2, lookahead=True)
    assert ahead.tokens == ref[:10]
    assert sum(t.loaded_neurons for t in ahead.per_token) >= sum(
        t.loaded_neurons for t in _gen(flash_dirs[name], "oracle", n=10, window=2).per_token)
    assert abs(_ppl(flash_dirs[name], "oracle", ids, window=2, lookahead=True) / dense_ppl - 1) < 1e-5
    tight = _gen(flash_dirs[name], "oracle", budget=budget + 20 * lay.neuron_stride_bytes / fd.model_bytes,
                 staging_rows=384, window=2, lookahead=True)
    assert tight.tokens == ref and tight.dram_bytes <= (budget + 20 * lay.neuron_stride_bytes / fd.model_bytes) * fd.model_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_cuda_engine_gives_its_dense_tokens(flash_dirs, name):
    """On a GPU every mode generates the GPU's dense tokens (same device: same arithmetic) and the budget holds."""
    ref = _gen(flash_dirs[name], "dense", device="cuda")
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(flash_dirs[name], mode, device="cuda").tokens == ref.tokens, mode
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    budget = (fd.resident_path.stat().st_size + 2 * 384 * lay.neuron_stride_bytes
              + 20 * lay.neuron_stride_bytes * (lay.n_layers + 1)) / fd.model_bytes
    # (gathered rows at these budgets: the masked step, the default on a GPU, has buffers of its own to fit)
    res = _gen(flash_dirs[name], "oracle", budget=budget, staging_rows=384, device="cuda", masked_compute=False)
    assert res.tokens == ref.tokens and res.dram_bytes <= budget * fd.model_bytes
    # lookahead: the next layer's rows land in the second page-locked landing buffer while this one's are copied
    assert _gen(flash_dirs[name], "oracle", window=2, lookahead=True, device="cuda").tokens == ref.tokens
    tight = budget + 20 * lay.neuron_stride_bytes / fd.model_bytes
    res = _gen(flash_dirs[name], "oracle", budget=tight, staging_rows=384, window=2, lookahead=True, device="cuda",
               masked_compute=False)
    assert res.tokens == ref.tokens and res.dram_bytes <= tight * fd.model_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_cuda_masked_compute_replays_one_graph_per_layer(flash_dirs, name):
    """``masked_compute`` on a GPU: each layer's step captured once as a CUDA graph and replayed (its inputs written
    into fixed buffers), with the GPU's dense tokens and log-probabilities within rounding; its buffers in the
    budget."""
    ref = _gen(flash_dirs[name], "dense", device="cuda")
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(3))
    dense_ppl = _ppl(flash_dirs[name], "dense", ids, device="cuda")
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    budget = (fd.resident_path.stat().st_size + 2 * 384 * lay.neuron_stride_bytes
              + 40 * lay.neuron_stride_bytes * (lay.n_layers + 1)) / fd.model_bytes
    for kw in ({}, {"budget": budget, "staging_rows": 384}, {"window": 2, "lookahead": True}):
        b = kw.pop("budget", BIG)
        e = Engine(flash_dirs[name], EngineConfig(mode="oracle", dram_budget=b, device="cuda", **kw))  # (the default)
        try:
            assert e.cfg.masked_compute is True
            res = e.generate(PROMPT, 12, stop_at_eos=False)
            assert res.tokens == ref.tokens, kw
            assert all(m.masked is not None and m.masked.graph is not None for m in e.ffn_modules)
            assert 0 < res.dram_breakdown["masked_buffers"] and res.dram_bytes <= b * fd.model_bytes
            assert abs(math.exp(-float(e.score(ids).double().mean())) / dense_ppl - 1) < 1e-4
        finally:
            e.close()


def test_bad_device_is_one_clear_error(flash_dirs):
    with pytest.raises(LLMFlashError, match="--device"):
        Engine(flash_dirs["llama"], EngineConfig(mode="oracle", device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(LLMFlashError, match="no CUDA device"):
            Engine(flash_dirs["llama"], EngineConfig(mode="oracle", device="cuda"))


# ------------------------------------------------------------------------------------------------ honest accounting


def test_working_reserve_is_held_back_from_the_caches(flash_dirs):
    """``working_reserve`` (auto for large models) takes rows from the caches, and the total stays in the budget."""
    fd = open_flash_dir(flash_dirs["llama"])
    lay = fd.layout
    budget = (fd.resident_path.stat().st_size + 384 * lay.neuron_stride_bytes
              + 60 * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes
    engines = [Engine(fd, EngineConfig(mode="oracle", dram_budget=budget, staging_rows=384, working_reserve=r))
               for r in (-1, 2)]
    try:
        plain, held = engines
        assert "working_reserve" not in plain.dram  # auto: none for small models
        assert held.dram["working_reserve"] == 2 * max(plain.cache_rows) * lay.neuron_stride_bytes
        assert sum(held.cache_rows) < sum(plain.cache_rows)
        assert held.dram_bytes <= budget * fd.model_bytes and plain.dram_bytes <= budget * fd.model_bytes
    finally:
        for e in engines:
            e.close()



@pytest.mark.parametrize("name", ["llama", "opt"])
def test_accelerator_gathers_into_its_reserve(flash_dirs, name, monkeypatch):
    """On an accelerator the working reserve is allocated as the rows that gathers of cached slots are copied into
    (``gather_scratch``, counted in the budget): no gather allocates, and the output is unchanged (stand-in path)."""
    monkeypatch.setattr(Engine, "copy_on_cpu", True)
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    budget = (fd.resident_path.stat().st_size + 3 * 384 * lay.neuron_stride_bytes
              + 80 * lay.neuron_stride_bytes * (lay.n_layers + 2)) / fd.model_bytes
    ref = _gen(flash_dirs[name], "dense", n=10).tokens
    allocated = {"n": 0}
    orig = torch.Tensor.index_select

    def index_select(self, dim, index):  # the method form allocates; the scratch path calls torch.index_select(out=)
        allocated["n"] += 1
        return orig(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", index_select)
    res = _gen(flash_dirs[name], "oracle", n=10, budget=budget, staging_rows=384, window=2, working_reserve=1.0)
    assert res.tokens == ref and res.dram_bytes <= budget * fd.model_bytes
    assert "gather_scratch" in res.dram_breakdown and "working_reserve" not in res.dram_breakdown
    assert allocated["n"] == 0
    assert _gen(flash_dirs[name], "oracle", n=10, budget=budget, staging_rows=384, window=2, working_reserve=0).tokens == ref
    assert allocated["n"] > 0  # without the reserve, every gather allocates its copy


def test_bytes_read_match_the_kernel(flash_dirs):
    """Everything the engine's readers count (prefill + per-token) is what the kernel read for the process."""
    if proc_read_bytes() < 0:
        pytest.skip("/proc/self/io unavailable")
    for mode in ("naive", "oracle"):
        e = Engine(flash_dirs["llama"], EngineConfig(mode=mode, dram_budget=BIG))
        try:
            e.generate(PROMPT[:2], 1, stop_at_eos=False)  # warm up lazy imports
            counted0, kernel0 = e.reader_totals()[0], proc_read_bytes()
            res = e.generate(PROMPT, 10, stop_at_eos=False)
            counted, kernel = e.reader_totals()[0] - counted0, proc_read_bytes() - kernel0
        finally:
            e.close()
        assert sum(t.bytes_read for t in res.per_token) > 0
        assert abs(kernel - counted) <= 0.05 * counted, (mode, kernel, counted)


def test_naive_reads_the_whole_model_every_token(flash_dirs):
    fd = open_flash_dir(flash_dirs["opt"])
    res = _gen(flash_dirs["opt"], "naive", n=6)
    whole = fd.layout.file_bytes + fd.resident_path.stat().st_size
    for t in res.per_token:
        assert whole <= t.bytes_read <= whole + 4096


def test_sparse_mode_reads_only_new_neurons(flash_dirs):
    res = _gen(flash_dirs["llama"], "oracle", n=16, window=4)
    fd = open_flash_dir(flash_dirs["llama"])
    per_neuron = fd.layout.neuron_stride_bytes
    for t in res.per_token:
        assert t.bytes_read == t.loaded_neurons * per_neuron


# ------------------------------------------------------------------------------------------------------------ budget


def test_budget_holds_and_too_small_budget_states_minimum(flash_dirs):
    fd = open_flash_dir(flash_dirs["llama"])
    for mode in ("naive", "hybrid", "oracle"):
        res = _gen(flash_dirs["llama"], mode, n=3, budget=3.0)
        assert res.dram_bytes <= 3.0 * fd.model_bytes
    with pytest.raises(BudgetError, match="minimum"):
        Engine(flash_dirs["llama"], EngineConfig(mode="oracle", dram_budget=0.05))


# ---------------------------------------------------------------------------------------------------- predictor mode


def _predictors(path, tmp_path, threshold_logit: float):
    from llmflash.predictor import LowRankPredictor, PredictorSet

    fd = open_flash_dir(path)
    lay = fd.layout
    torch.manual_seed(0)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": fd.name, "rule": {"kind": "relu"}}
    out = tmp_path / f"pred{threshold_logit}"
    PredictorSet.from_modules(mods, [threshold_logit] * lay.n_layers, meta).save(out)
    return out


def test_predictor_mode_reads_what_is_predicted_and_misses_are_missing(flash_dirs, tmp_path):
    path = flash_dirs["llama"]
    ref = _gen(path, "dense")
    everything = _gen(path, "predictor", predictors=str(_predictors(path, tmp_path, -1e9)))
    assert everything.tokens == ref.tokens  # predicting every neuron active is exact
    nothing = _gen(path, "predictor", predictors=str(_predictors(path, tmp_path, 1e9)))
    assert all(t.bytes_read == 0 for t in nothing.per_token)  # nothing predicted: nothing read, FFN output 0
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(5))
    pnone = str(_predictors(path, tmp_path, 1e9))
    assert abs(_ppl(path, "predictor", ids, predictors=pnone) - _ppl(path, "dense", ids)) > 1e-3
    assert nothing.dram_breakdown["predictors"] > 0


def test_predictors_for_another_model_are_refused(flash_dirs, tmp_path):
    from llmflash.errors import LLMFlashError

    with pytest.raises(LLMFlashError, match="trained for llama, not opt"):
        _gen(flash_dirs["opt"], "predictor", predictors=str(_predictors(flash_dirs["llama"], tmp_path, 0.0)))


def test_reordered_dir_same_model_same_sets(flash_dirs, tmp_path):
    """A reordered copy: loaded in memory it is the same model (neurons put back), predictor mode reads the rows of
    the same neurons and gives the same tokens, orders compose, and a damaged order file is refused."""
    from llmflash.errors import FlashFileError
    from llmflash.reorder import write_permuted_flash_dir

    src = flash_dirs["llama"]
    lay = open_flash_dir(src).layout
    perms = [np.random.default_rng(i).permutation(lay.d_ffn) for i in range(lay.n_layers)]
    dst = write_permuted_flash_dir(src, tmp_path / "perm", perms, progress=False)
    with torch.no_grad():
        a, b = (load_in_memory(d).model(PROMPT[None]).logits for d in (src, dst))
    assert torch.allclose(a, b, atol=1e-5)
    pred = str(_predictors(src, tmp_path, 0.0))  # random predictors: a partial set, misses really missing
    r0, r1 = _gen(src, "predictor", predictors=pred), _gen(dst, "predictor", predictors=pred)
    assert r0.tokens == r1.tokens
    assert [t.loaded_neurons for t in r0.per_token] == [t.loaded_neurons for t in r1.per_token]
    dst2 = write_permuted_flash_dir(dst, tmp_path / "perm2", perms, progress=False)
    assert np.array_equal(open_flash_dir(dst2).neuron_order[0], perms[0][perms[0]])
    np.save(dst / "permutation.npy", np.zeros((lay.n_layers, lay.d_ffn), np.int64))
    with pytest.raises(FlashFileError, match="permutation.npy"):
        _gen(dst, "predictor", predictors=pred)


def test_thresholds_come_from_the_manifest_and_reorder_carries_them(flash_dirs, tmp_path, capsys):
    """--sparsity threshold reads the thresholds convert stored (a reordered copy keeps them: they are per layer); a
    directory without them is refused in one line instead of calibrated behind the DRAM budget's back."""
    from llmflash.cli import main
    from llmflash.reorder import write_permuted_flash_dir

    kw = dict(sparsity="threshold", threshold_sparsity=0.8)
    src = flash_dirs["silu"]
    table = open_flash_dir(src).thresholds()
    assert table is not None and len(table["0.8"]) == 3
    lay = open_flash_dir(src).layout
    perms = [np.random.default_rng(i).permutation(lay.d_ffn) for i in range(lay.n_layers)]
    dst = write_permuted_flash_dir(src, tmp_path / "perm", perms, progress=False)
    assert open_flash_dir(dst).thresholds() == table
    assert _gen(dst, "oracle", **kw).tokens == _gen(src, "oracle", **kw).tokens
    bare = flash_dirs["llama-unbundled"]  # converted with calibration_tokens=0
    assert open_flash_dir(bare).thresholds() is None
    with pytest.raises(LLMFlashError, match="no calibrated thresholds.*llmflash convert") as err:
        Engine(bare, EngineConfig(mode="dense", dram_budget=BIG, **kw))
    assert "\n" not in str(err.value)
    assert main(["generate", str(bare), "--prompt", "Hi", "--sparsity", "threshold", "--max-new-tokens", "2"]) == 2
    assert "no calibrated thresholds" in capsys.readouterr().err


def test_cli_reorder_by_coactivation(flash_dirs, tmp_path):
    from llmflash.cli import main

    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"word{i % 97} token{i % 13}" for i in range(3000)))
    out = tmp_path / "reordered"
    assert main(["reorder", str(flash_dirs["llama"]), "--out", str(out), "--text-file", str(text),
                 "--max-tokens", "512"]) == 0
    fd = open_flash_dir(out)
    assert fd.manifest.neuron_order.kind == "coactivation" and fd.neuron_order.shape == (fd.layout.n_layers, fd.layout.d_ffn)
    assert _gen(out, "oracle").tokens == _gen(flash_dirs["llama"], "oracle").tokens
    assert main(["reorder", str(flash_dirs["llama"]), "--out", str(flash_dirs["llama"])]) == 2


def test_the_engine_leaves_torch_threads_as_it_found_them(flash_dirs):
    before = torch.get_num_threads()
    e = Engine(flash_dirs["llama"], EngineConfig(mode="dense", dram_budget=BIG, compute_threads=1 if before > 1 else 2))
    try:
        assert torch.get_num_threads() == before  # no process-wide side effect in the constructor
        res = e.generate(PROMPT, 3, stop_at_eos=False)
        assert torch.get_num_threads() == before and res.config["compute_threads"] == e.compute_threads
    finally:
        e.close()


def test_observers_see_every_read_and_forward(flash_dirs):
    class Watch(EngineObserver):
        def __init__(self):
            self.planned, self.issued, self.per_forward, self.forwards, self.tokens = 0, 0, [], [], []
            self.loaded = [0]
            self.layers = []

        def read_plan(self, layer, ids):
            self.planned += ids.size

        def reads_issued(self, source, nbytes):
            self.issued += int(nbytes.sum())

        def token_done(self, step, stats):
            self.tokens.append(stats)

        def cache_updated(self, layer, update):
            self.loaded[-1] += update.load_ids.size

        def layer_done(self, layer, ms):
            self.layers.append((layer, ms))

        def forward_done(self, step):
            self.forwards.append(step)
            self.per_forward.append(self.issued)
            self.issued = 0
            self.loaded.append(0)

    for mode in ("oracle", "naive"):
        w = Watch()
        e = Engine(flash_dirs["llama"], EngineConfig(mode=mode, dram_budget=BIG), observers=[w])
        try:
            res = e.generate(PROMPT, 6, stop_at_eos=False)
        finally:
            e.close()
        assert w.forwards == [0, 1, 2, 3, 4, 5] and w.tokens == res.per_token
        for issued, t in zip(w.per_forward[1:], res.per_token):  # the kernel returns all of it (naive: but the
            assert 0 <= issued - t.bytes_read < 4096  # aligned read of the resident file past its end)
            assert issued == t.bytes_read or mode == "naive"
        assert w.planned > 0
        n = open_flash_dir(flash_dirs["llama"]).layout.n_layers
        assert [layer for layer, _ in w.layers] == list(range(n)) * 6 and all(ms >= 0 for _, ms in w.layers)
        if mode == "oracle":  # per token: the loads the caches planned are the neurons it loaded
            assert w.loaded[1:-1] == [t.loaded_neurons for t in res.per_token]


def test_keep_resident_reads_the_resident_file_once(flash_dirs):
    fd = open_flash_dir(flash_dirs["opt"])
    assert fd.read_resident() is not fd.read_resident()  # by default every caller gets a fresh read
    fd.keep_resident = True
    first = fd.read_resident()
    assert fd.read_resident() is first
    e = Engine(fd, EngineConfig(mode="oracle", dram_budget=BIG))
    try:
        assert e.generate(PROMPT, 4, stop_at_eos=False).tokens == _gen(flash_dirs["opt"], "dense", n=4).tokens
    finally:
        e.close()


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_masked_compute_on_the_accelerator_path(flash_dirs, name, monkeypatch):
    """``masked_compute`` (the whole device cache computed with the rows not needed masked to zero) gives the gathered
    path's tokens and log-probabilities within rounding: with overflow into the staging buffer, and with lookahead's
    rows landing apart (stand-in path)."""
    monkeypatch.setattr(Engine, "copy_on_cpu", True)
    ref = _gen(flash_dirs[name], "dense").tokens
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(8))
    dense_ppl = _ppl(flash_dirs[name], "dense", ids)
    fd = open_flash_dir(flash_dirs[name])
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + 2 * 384 * lay.neuron_stride_bytes
    budget = (fixed + 20 * lay.neuron_stride_bytes * (lay.n_layers + 1)) / fd.model_bytes  # 20 rows per layer
    auto = Engine(flash_dirs[name], EngineConfig(mode="oracle", dram_budget=BIG))
    auto.close()
    assert auto.cfg.masked_compute is False and not any(m.masked for m in auto.ffn_modules)  # (auto: CUDA devices only)
    for kw in ({}, {"budget": budget, "staging_rows": 384}, {"window": 2, "lookahead": True}):
        e = Engine(flash_dirs[name], EngineConfig(mode="oracle", dram_budget=kw.pop("budget", BIG), masked_compute=True,
                                                 **kw))
        try:
            assert all(m.masked for m in e.ffn_modules)
            assert e.generate(PROMPT, 12, stop_at_eos=False).tokens == ref, kw
            assert abs(math.exp(-float(e.score(ids).double().mean())) / dense_ppl - 1) < 1e-5
        finally:
            e.close()


def test_an_engine_that_fails_half_built_closes_what_it_made(flash_dirs, monkeypatch):
    """An error late in construction closes the readers (and, on a GPU, unpins the host buffers) before it propagates:
    a buffer left page-locked and then freed made the next engine's pinning fail on the GPU machine."""
    from llmflash import decode_step, graph_step
    from llmflash.storage import FlashReader

    closed = []
    orig = FlashReader.close

    def close(self):
        closed.append(self)
        orig(self)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(FlashReader, "close", close)
    monkeypatch.setattr(decode_step, "install", boom)
    monkeypatch.setattr(graph_step, "install", boom)
    with pytest.raises(RuntimeError, match="boom"):
        Engine(flash_dirs["llama"], EngineConfig(mode="oracle", dram_budget=BIG))
    assert closed

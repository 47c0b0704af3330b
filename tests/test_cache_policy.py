"""Cache policies (window, LRU, pinned hot set + window): their membership on hand-made sequences of needed sets, and
on tiny models: every policy keeps the oracle equal to dense, and the hit/miss/eviction counters add up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmflash.cache import NeuronCache
from llmflash.cache_policy import HotPolicy, LFUPolicy, LRUPolicy, WindowPolicy, hot_sets, make_policy
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.errors import LLMFlashError
from llmflash.flashdir import open_flash_dir
from llmflash.hooks import EngineObserver
from llmflash.layout import FlashLayout

from tiny import save_tiny_models

BIG = 8.0
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
POLICIES = ("window", "lru", "hot", "lfu")


def _cache(capacity: int, policy) -> NeuronCache:
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    return NeuronCache(lay, capacity, window=2, dtype=torch.float32, policy=policy)


def _ids(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def _cached(cache: NeuronCache) -> set[int]:
    return set(cache.cached_ids().tolist())


# ------------------------------------------------------------------------------------------ policies without a model


def test_lru_keeps_the_most_recently_used_up_to_capacity():
    cache = _cache(4, LRUPolicy())
    cache.update(_ids(0, 1), 0)
    cache.update(_ids(2), 1)
    cache.update(_ids(3), 10)  # a window of 2 would have dropped 0, 1, 2 by now: LRU keeps them while there is room
    assert _cached(cache) == {0, 1, 2, 3}
    upd = cache.update(_ids(4, 5), 11)  # full: the two least recently used (0, 1) make room
    assert _cached(cache) == {2, 3, 4, 5} and upd.deleted == 2 and (upd.hits, upd.misses) == (0, 2)
    upd = cache.update(_ids(2, 6), 12)  # 2 is needed (a hit); 3 is the least recently used of the rest
    assert _cached(cache) == {2, 4, 5, 6} and upd.deleted == 1 and (upd.hits, upd.misses) == (1, 1)
    upd = cache.update(_ids(2, 4, 5, 6, 7), 13)  # all needed now: nothing may go, 7 overflows
    assert _cached(cache) == {2, 4, 5, 6} and upd.overflow_ids.tolist() == [7] and upd.deleted == 0
    c = cache.counters
    assert (c.hits, c.misses, c.evictions, c.overflows, c.loads) == (5, 8, 3, 1, 7)  # 13 needed


def test_hot_set_is_pinned_and_the_window_manages_the_rest():
    cache = _cache(6, HotPolicy(window=2, hot_ids=[8, 7], d_ffn=64))
    upd = cache.update(_ids(0), 0)  # from empty: the needed neuron and the hot set are read
    assert upd.load_ids.tolist() == [0, 7, 8] and (upd.hits, upd.misses) == (0, 1)
    cache.update(_ids(1), 1)
    upd = cache.update(_ids(2, 7), 2)  # 0 left the window; 7 is a hit; 8 never needed since, still pinned
    assert _cached(cache) == {1, 2, 7, 8} and upd.deleted == 1 and (upd.hits, upd.misses) == (1, 1)
    upd = cache.update(_ids(10, 11, 12, 13, 14), 3)  # 1 expires, 2 makes room, the hot rows stay; one overflows
    assert _cached(cache) == {7, 8, 10, 11, 12, 13} and upd.overflow_ids.tolist() == [14] and upd.deleted == 2
    for step in range(4, 20):  # never needed again: the hot rows stay whatever comes
        cache.update(_ids(20 + step), step)
        assert {7, 8} <= _cached(cache)
    cache.clear()  # emptied: the hot set comes back with the next fill
    assert cache.update(_ids(3), 30).load_ids.tolist() == [3, 7, 8]


@pytest.mark.parametrize("native", [False, True])
def test_lfu_keeps_the_often_needed_and_admits_only_newcomers_worth_more(native):
    cache = NeuronCache(FlashLayout.build(1, 16, 64, True, "float32", True), 3, window=2, dtype=torch.float32,
                        policy=LFUPolicy(64, decay=0.9), native=native)
    for step in range(3):  # 0 and 1 needed three times, 2 once (worth 0.9 ** 3 + 0.9 ** 2 + 0.9 and 0.9 ** 3 at step 3)
        cache.update(_ids(0, 1) if step else _ids(0, 1, 2), step)
    assert _cached(cache) == {0, 1, 2}
    upd = cache.update(_ids(5, 9), 3)  # full: 2 (0.73) makes room for one newcomer (1); 0 and 1 (2.44) stay
    assert upd.deleted == 1 and upd.load_ids.tolist() == [5] and upd.overflow_ids.tolist() == [9]
    assert _cached(cache) == {0, 1, 5} and (upd.hits, upd.misses) == (0, 2)
    upd = cache.update(_ids(9), 4)  # 9 (0.9 + 1) now beats 5 (0.9): 5 goes, not 0 or 1 (2.2)
    assert upd.deleted == 1 and upd.load_ids.tolist() == [9] and _cached(cache) == {0, 1, 9}
    upd = cache.update(_ids(7), 5)  # a newcomer (1) beats nothing cached (9: 1.71, 0 and 1: 1.98): it overflows
    assert upd.deleted == 0 and upd.overflow_ids.tolist() == [7] and _cached(cache) == {0, 1, 9}
    cache.clear()  # a new sequence: nothing is worth anything
    assert cache.policy.score.sum() == 0 and cache.update(_ids(4), 0).load_ids.tolist() == [4]


def test_lfu_rebases_its_scores_without_changing_their_order():
    pol = LFUPolicy(8, decay=0.5)
    last = np.full(8, -1, dtype=np.int64)
    pol.touch(_ids(1, 2), last, 0)
    pol.touch(_ids(2), last, 1)
    assert pol.value(_ids(2))[0] > pol.value(_ids(1))[0]
    pol.touch(_ids(3), last, 400)  # 0.5 ** -400 > 1e100: rebased to 400 first
    assert pol.base == 400 and pol.value(_ids(3))[0] == 1.0 and 0 < pol.value(_ids(1))[0] < pol.value(_ids(2))[0]
    with pytest.raises(LLMFlashError, match="decay"):
        LFUPolicy(8, decay=1.5)


def test_window_policy_is_the_cache_default_and_hot_without_ids_is_the_window():
    seq = [np.unique(np.random.default_rng(s).choice(64, size=9, replace=False)) for s in range(30)]
    caches = [_cache(12, None), _cache(12, WindowPolicy(2)), _cache(12, HotPolicy(2, [], 64))]
    for step, need in enumerate(seq):
        ups = [c.update(need, step) for c in caches]
        assert all(np.array_equal(u.load_ids, ups[0].load_ids) and u.deleted == ups[0].deleted for u in ups)
        assert all(np.array_equal(c.cached_ids(), caches[0].cached_ids()) for c in caches)


def test_hot_sets_are_the_most_frequent_needed_neurons():
    counts = [np.array([0, 5, 1, 5, 9]), np.array([0, 0, 2, 0, 0])]
    assert [h.tolist() for h in hot_sets(counts, [3, 3])] == [[1, 3, 4], [2]]  # never-needed neurons are not pinned
    with pytest.raises(LLMFlashError, match="unknown cache policy"):
        make_policy("fifo", 5, 64)


# ------------------------------------------------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def flash_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    out = {}
    for name, src in save_tiny_models(root).items():
        out[name] = convert(str(src), root / f"{name}-flash", progress=False)
    return out


class Lookups(EngineObserver):
    """Needed neurons per token (summed over layers) and the cache's evictions and loads."""

    def __init__(self) -> None:
        self.needed: dict[int, int] = {}
        self.step = 0
        self.loads = self.evictions = 0

    def cache_updated(self, layer, update) -> None:
        if update.hits + update.misses:
            self.needed[self.step] = self.needed.get(self.step, 0) + update.need.size
        self.loads += update.load_ids.size
        self.evictions += update.deleted

    def forward_done(self, step) -> None:
        self.step = step + 1


def _engine(path, mode, **kw) -> Engine:
    return Engine(path, EngineConfig(mode=mode, dram_budget=kw.pop("budget", BIG), **kw))


def _gen(path, mode, n=10, observers=(), **kw):
    e = _engine(path, mode, **kw)
    for o in observers:
        e.observe(o)
    try:
        return e.generate(PROMPT, n, stop_at_eos=False)
    finally:
        e.close()


def _ppl(path, mode, ids, **kw):
    e = _engine(path, mode, **kw)
    try:
        return math.exp(-float(e.score(ids).double().mean()))
    finally:
        e.close()


def _tight_budget(path, rows: int) -> float:
    fd = open_flash_dir(path)
    lay = fd.layout
    fixed = fd.resident_path.stat().st_size + 384 * lay.neuron_stride_bytes
    return (fixed + rows * lay.neuron_stride_bytes * lay.n_layers) / fd.model_bytes


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_every_policy_keeps_the_oracle_equal_to_dense(flash_dirs, name):
    path = flash_dirs[name]
    ref = _gen(path, "dense").tokens
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(3))
    dense = _ppl(path, "dense", ids)
    tight = _tight_budget(path, 40)  # caches smaller than the active sets: evictions and overflow on every path
    for policy in POLICIES:
        assert _gen(path, "oracle", window=2, cache_policy=policy).tokens == ref, policy
        assert _gen(path, "oracle", budget=tight, staging_rows=384, cache_policy=policy).tokens == ref, policy
        assert abs(_ppl(path, "oracle", ids, window=2, cache_policy=policy) / dense - 1) < 1e-5, policy


def test_window_policy_is_todays_cache(flash_dirs):
    a = _gen(flash_dirs["llama"], "oracle", window=2)
    b = _gen(flash_dirs["llama"], "oracle", window=2, cache_policy="window")
    assert [t.loaded_neurons for t in a.per_token] == [t.loaded_neurons for t in b.per_token]
    assert [t.cached_neurons for t in a.per_token] == [t.cached_neurons for t in b.per_token]


@pytest.mark.parametrize("policy", POLICIES)
def test_counters_add_up_per_token(flash_dirs, policy):
    path = flash_dirs["llama"]
    rec = Lookups()
    res = _gen(path, "oracle", window=2, budget=_tight_budget(path, 60), staging_rows=384, cache_policy=policy,
               observers=[rec])
    assert res.tokens == _gen(path, "dense").tokens
    for step, t in enumerate(res.per_token, start=1):
        assert t.cache_hits + t.cache_misses == rec.needed[step]  # one lookup per layer per token
        assert t.cache_misses >= 1 or t.cache_hits >= 1
    assert rec.evictions <= rec.loads  # a row is only freed after it was loaded
    assert sum(t.cache_evictions for t in res.per_token) >= 1  # the tight budget makes room
    s = res.summary()
    hits, misses = sum(t.cache_hits for t in res.per_token), sum(t.cache_misses for t in res.per_token)
    assert s["cache_hit_rate"] == pytest.approx(hits / (hits + misses))
    assert s["cache_misses_per_token"] == pytest.approx(misses / len(res.per_token))
    assert {"cache_hits", "cache_misses", "cache_evictions"} <= set(res.to_json()["per_token"][0])


def test_hot_policy_pins_the_calibrated_sets(flash_dirs):
    e = _engine(flash_dirs["llama"], "oracle", window=2, cache_policy="hot", hot_fraction=0.25, hot_calibration_tokens=16)
    try:
        for m in e.ffn_modules:
            pol = m.cache.policy
            assert isinstance(pol, HotPolicy) and 0 < pol.hot_ids.size <= int(0.25 * m.cache.capacity)
        e.generate(PROMPT, 6, stop_at_eos=False)
        for m in e.ffn_modules:  # after the prefill and five tokens the pinned neurons are all cached
            assert set(m.cache.policy.hot_ids.tolist()) <= set(m.cache.cached_ids().tolist())
        e.pin_hot_sets([np.array([1, 2, 3])] * len(e.ffn_modules))  # given as ids
        res = e.generate(PROMPT, 6, stop_at_eos=False)
        assert all({1, 2, 3} <= set(m.cache.cached_ids().tolist()) for m in e.ffn_modules)
    finally:
        e.close()
    assert res.tokens == _gen(flash_dirs["llama"], "dense", n=6).tokens


def test_unknown_policy_is_one_clear_error(flash_dirs):
    with pytest.raises(LLMFlashError, match="unknown cache policy 'fifo'"):
        _engine(flash_dirs["llama"], "oracle", cache_policy="fifo")


@pytest.mark.parametrize("policy", POLICIES)
def test_native_update_equals_the_numpy_reference_call_by_call(policy):
    """``native/cache.cpp`` plans exactly what the numpy reference does: the same loads, slots, overflow, ready slots,
    deletions and counters, over random needed sets with lookahead-style calls (no eviction, guesses) mixed in, and
    after a clear."""
    from llmflash.native import cache_library

    if cache_library() is None:
        pytest.skip("no native library here")
    rng = np.random.default_rng(3)
    d_ffn, capacity = 64, 20
    lay = FlashLayout.build(1, 16, d_ffn, True, "float32", True)

    def make(native: bool) -> NeuronCache:
        pol = make_policy(policy, 3, d_ffn) if policy != "hot" else HotPolicy(3, [1, 5, 9, 40], d_ffn)
        return NeuronCache(lay, capacity, window=3, dtype=torch.float32, policy=pol, native=native)

    ref, nat = make(False), make(True)
    assert nat._native is not None and ref._native is None
    for step in range(60):
        if step == 30:
            ref.clear()
            nat.clear()
        for evict, lookup in ((True, True),) if step % 3 else ((True, False), (False, True)):
            need = np.unique(rng.integers(0, d_ffn, size=int(rng.integers(0, 30))))
            a, b = ref.update(need, step, evict=evict, lookup=lookup), nat.update(need, step, evict=evict, lookup=lookup)
            for name in ("load_ids", "dest_slots", "overflow_ids", "ready_slots"):
                assert getattr(a, name).tolist() == getattr(b, name).tolist(), (step, name)
            assert (a.deleted, a.hits, a.misses) == (b.deleted, b.hits, b.misses)
            assert ref.ids.tolist() == nat.ids.tolist() and ref.slot.tolist() == nat.slot.tolist()
            assert ref.free.tolist() == nat.free.tolist() and ref.used_slots().tolist() == nat.used_slots().tolist()
            assert ref.count == nat.count
    assert ref.counters == nat.counters

"""The scale model writer and the trace source, on tiny geometries (fast)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmflash.cache import NeuronCache
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import MANIFEST, open_flash_dir
from llmflash.reorder import coactivation_order, popularity_order, write_permuted_flash_dir
from research.scale import TINY, ScaleGeometry, unbundled_scale_dir, write_scale_model
from research.trace import (
    PermutedProvider,
    TraceModel,
    TraceParams,
    TraceProvider,
    new_sets,
    paper_active_profile,
    persistence,
    read_sizes,
    window_stats,
)

from tiny import save_tiny, tiny_llama, tiny_opt

BIG = 8.0
# 2 * d_model * 2 bytes = 8 KiB: the bundled ffn.bin is also a valid unbundled file (hard-linked, not rewritten)
LINKABLE = ScaleGeometry(name="opt-link-scale", n_layers=2, d_model=2048, d_ffn=48, n_heads=16, vocab=300,
                         max_positions=32)


@pytest.fixture(scope="module")
def scale_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    tiny = write_scale_model(root / "tiny", TINY, progress=False)
    link = write_scale_model(root / "link", LINKABLE, progress=False)
    return {"tiny": tiny, "tiny_unb": unbundled_scale_dir(tiny, TINY, root / "tiny-unb", progress=False),
            "link": link, "link_unb": unbundled_scale_dir(link, LINKABLE, root / "link-unb", progress=False), "root": root}


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("config",):
            out |= _keys(v, prefix + k + ".")
    return out


def test_manifest_has_convert_schema_and_expected_bytes(scale_dirs, tmp_path):
    save_tiny(tiny_opt(d_model=64, d_ffn=256), tmp_path / "opt")
    ref = json.loads((convert(str(tmp_path / "opt"), tmp_path / "opt-flash", progress=False, calibration_tokens=0) / MANIFEST).read_text())
    mine = json.loads((scale_dirs["tiny"] / MANIFEST).read_text())
    assert _keys(mine) == _keys(ref)
    fd = open_flash_dir(scale_dirs["tiny"])
    assert fd.model_bytes == TINY.expected_bytes()["model"] and fd.layout.bundled and not fd.gated
    assert fd.config().model_type == "opt" and fd.config().ffn_dim == TINY.d_ffn


def test_engine_runs_every_mode_and_sparse_equals_dense(scale_dirs):
    prompt = torch.tensor([5, 6, 7, 8])
    toks = {}
    for mode in ("dense", "naive", "hybrid", "oracle"):
        e = Engine(scale_dirs["tiny"], EngineConfig(mode=mode, dram_budget=BIG))
        try:
            r = e.generate(prompt, 5, stop_at_eos=False)
        finally:
            e.close()
        toks[mode] = r.tokens
        if mode == "naive":  # the whole model from flash every token
            fd = open_flash_dir(scale_dirs["tiny"])
            want = fd.layout.file_bytes + fd.resident_path.stat().st_size
            assert abs(r.per_token[0].bytes_read - want) < 4096
    assert toks["dense"] == toks["naive"] == toks["hybrid"] == toks["oracle"]


def test_unbundled_copy_and_hard_link(scale_dirs):
    tiny_unb = open_flash_dir(scale_dirs["tiny_unb"])
    assert not tiny_unb.layout.bundled
    a, b = (os.stat(open_flash_dir(scale_dirs[k]).ffn_path) for k in ("link", "link_unb"))
    assert a.st_ino == b.st_ino  # no second copy of the FFN
    fd = open_flash_dir(scale_dirs["link_unb"])
    fd.verify_ffn()  # the halves' CRCs computed while writing match
    assert not fd.layout.bundled and fd.layout.file_bytes == open_flash_dir(scale_dirs["link"]).layout.file_bytes
    e = Engine(fd, EngineConfig(mode="oracle", dram_budget=BIG))
    try:
        r = e.generate(torch.tensor([5, 6]), 4, stop_at_eos=False)
    finally:
        e.close()
    assert all(t.reads >= 0 for t in r.per_token)


def test_paper_profile_and_predictor_rates():
    prof = paper_active_profile()
    assert abs(np.mean(prof) - 0.033) < 1e-6
    assert abs(prof[0] - 0.0156) < 1e-4 and abs(prof[15] - 0.0266) < 1e-4 and abs(prof[31] - 0.0536) < 1e-4
    tm = TraceModel(TraceParams((0.02, 0.05), 1.0, 0.66, flicker=0.2), 4096)
    for layer, a in enumerate((0.02, 0.05)):
        pairs = [tm.step(layer) for _ in range(120)]
        t = np.stack([p[0] for p in pairs])
        q = np.stack([p[1] for p in pairs])
        assert abs(t.mean() - a) / a < 0.1
        assert abs((t & q).sum() / t.sum() - 0.95) < 0.02
        assert abs((q & ~t).sum() / (~t).sum() - 0.07) < 0.01


def test_flicker_lowers_persistence_not_the_active_share():
    fr = {}
    for f in (0.0, 0.5):
        tm = TraceModel(TraceParams((0.05,), 1.0, 0.95, flicker=f), 2048)
        m = tm.masks(0, 150)
        fr[f] = (m.mean(), persistence([m]))
    assert abs(fr[0.5][0] - 0.05) < 0.01 and fr[0.5][1] < fr[0.0][1]


def test_window_stats_match_the_engines_cache():
    rng = np.random.default_rng(0)
    masks = rng.random((60, 50)) < 0.2
    ws = window_stats([masks], k_max=5, warm=5)
    for k in (1, 3, 5):
        loads = [len(s) for s in new_sets(masks, k)]
        cache = NeuronCache(_Lay(), capacity=50, window=k, dtype=torch.float32)
        engine_loads = []
        for t in range(60):
            upd = cache.update(np.flatnonzero(masks[t]), t)
            engine_loads.append(upd.load_ids.size)
        assert engine_loads == loads
        assert abs(np.mean(loads[5:]) / 50 - ws["new"][k]) < 1e-9
    assert abs(ws["new"][0] - masks[5:].mean()) < 1e-9
    assert abs(ws["union"][0] - masks[5:].mean()) < 1e-9
    u2 = np.mean([(masks[t] | masks[t - 1]).mean() for t in range(5, 60)])
    assert abs(ws["union"][1] - u2) < 1e-9
    assert 0 <= persistence([masks]) <= 1


class _Lay:  # the minimal layout NeuronCache needs
    d_ffn = 50
    d_model = 4
    elem_bytes = 4
    segments = ()
    quantized = False  # float rows (a quantized layout holds uint8 rows: ``quant``)


def test_orders_and_read_sizes():
    rng = np.random.default_rng(1)
    m = (rng.random((200, 40)) < 0.1).astype(np.float32)
    c = m.T @ m
    o = coactivation_order(c, np.diag(c))
    assert sorted(o.tolist()) == list(range(40))
    assert sorted(popularity_order(np.diag(c)).tolist()) == list(range(40))
    assert read_sizes(np.array([3, 1, 2, 9]), 4096).tolist() == [3 * 4096, 4096]
    assert read_sizes(np.arange(10), 4096, max_read_bytes=4 * 4096).tolist() == [4 * 4096, 4 * 4096, 2 * 4096]


def test_trace_provider_in_the_engine(scale_dirs):
    params = TraceParams((0.1, 0.2), 0.8, 0.6)
    fd = open_flash_dir(scale_dirs["tiny"])
    n = fd.layout.d_ffn
    perm = [np.random.default_rng(i).permutation(n) for i in range(2)]
    for prov in (TraceProvider(TraceModel(params, n), "true", d_model=TINY.d_model),
                 TraceProvider(TraceModel(params, n), "predicted", d_model=TINY.d_model, ranks=(8,), perm=perm)):
        e = Engine(fd, EngineConfig(mode="predictor", dram_budget=BIG), provider=prov)
        try:
            prov.reset()
            r = e.generate(torch.tensor([5]), 6, stop_at_eos=False)
        finally:
            e.close()
        assert prov.counted == (prov.kind == "predicted") and len(r.per_token) == 5
        if prov.counted:  # the predictor network is charged, drawing the trace's sets is not
            assert all(t.predictor_ms > 0 and t.excluded_ms > 0 for t in r.per_token)
            assert prov.replay_ms == 0.0  # every call's replay time was handed to the engine
    # the predicted provider holds real predictor weights that count in the budget
    assert TraceProvider(TraceModel(params, n), "predicted", d_model=TINY.d_model, ranks=(8,)).nbytes > 0
    # PermutedProvider: column j of its mask is the inner mask's column perm[j]
    inner = TraceProvider(TraceModel(params, n), "true", d_model=TINY.d_model)
    inner.reset()
    ref = inner.active(0, torch.zeros(1, TINY.d_model))
    inner.reset()
    got = PermutedProvider(inner, perm).active(0, torch.zeros(1, TINY.d_model))
    assert torch.equal(got, ref[:, perm[0]])


def test_trace_lookahead_guess_draws_ahead_without_changing_the_sets(scale_dirs, monkeypatch):
    """A guess draws the layer's next sets ahead (kept with probability guess_recall); ``active`` then returns exactly
    the sets it would have returned without the guess. In the engine (CPU, and the accelerator's path on the CPU:
    two landing buffers) lookahead moves reads earlier and reads the same sets' rows."""
    params = TraceParams((0.1, 0.2), 0.8, 0.6)
    n = 256
    x = torch.zeros(1, TINY.d_model)
    plain = TraceProvider(TraceModel(params, n), "true", d_model=TINY.d_model)
    ahead = TraceProvider(TraceModel(params, n), "true", d_model=TINY.d_model, guess_recall=0.5)
    plain.reset()
    ahead.reset()
    for _ in range(3):
        for layer in (0, 1):
            g = ahead.guess(layer, x)
            a = ahead.active(layer, x)
            assert torch.equal(a, plain.active(layer, x))
            assert not (g & ~a).any() and 0 < int(g.sum()) < int(a.sum())  # a subset: about half of the set
    fd = open_flash_dir(scale_dirs["tiny"])
    for stand_in in (False, True):
        monkeypatch.setattr(Engine, "copy_on_cpu", stand_in)
        got = {}
        for lookahead in (False, True):
            prov = TraceProvider(TraceModel(params, fd.layout.d_ffn), "predicted", d_model=TINY.d_model, ranks=(8,))
            e = Engine(fd, EngineConfig(mode="predictor", dram_budget=4 * BIG, window=2, lookahead=lookahead),
                       provider=prov)
            try:
                prov.reset()
                got[lookahead] = e.generate(torch.tensor([5]), 6, stop_at_eos=False)
            finally:
                e.close()
        assert got[True].tokens == got[False].tokens
        assert [t.loaded_neurons for t in got[True].per_token] == [t.loaded_neurons for t in got[False].per_token]


def test_no_reuse_loads_the_whole_set_each_token(scale_dirs):
    params = TraceParams((0.1, 0.2), 0.8, 0.9)
    fd = open_flash_dir(scale_dirs["tiny"])
    loads = {}
    for no_reuse in (False, True):
        prov = TraceProvider(TraceModel(params, fd.layout.d_ffn), "true", d_model=TINY.d_model)
        e = Engine(fd, EngineConfig(mode="oracle", dram_budget=BIG, window=1, reuse=not no_reuse), provider=prov)
        try:
            prov.reset()
            r = e.generate(torch.tensor([5]), 8, stop_at_eos=False)
        finally:
            e.close()
        loads[no_reuse] = sum(t.loaded_neurons for t in r.per_token)
    tm = TraceModel(params, fd.layout.d_ffn)
    sizes = [[int(tm.step(layer)[0].sum()) for layer in range(2)] for _ in range(8)]
    want = sum(sum(s) for s in sizes[1:])  # the first call is the prompt's (not in per_token)
    assert loads[True] == want and loads[False] < loads[True]


def test_permuted_flash_dir_gives_the_same_text(tmp_path):
    save_tiny(tiny_llama(relu=True, d_model=64, d_ffn=128), tmp_path / "m")
    src = convert(str(tmp_path / "m"), tmp_path / "flash", progress=False, calibration_tokens=0)
    perms = [np.random.default_rng(i).permutation(128) for i in range(3)]
    dst = write_permuted_flash_dir(src, tmp_path / "perm", perms, progress=False)
    out = {}
    for d in (src, dst):
        e = Engine(d, EngineConfig(mode="oracle", dram_budget=BIG))
        try:
            out[str(d)] = e.generate(torch.tensor([5, 17, 99, 3]), 8, stop_at_eos=False).tokens
        finally:
            e.close()
    assert out[str(src)] == out[str(dst)]
    assert np.array_equal(np.load(dst / "permutation.npy")[1], perms[1])

"""The native sparse step (``llmflash.step``, ``llmflash/native``) against the Python reference path, on tiny random
models: equal within float32 rounding (the kernel sums rows in another order than torch's matmuls, and computes its
activation with libm's exp/erf instead of torch's vectorised ones: differences of a few ulps, so tokens equal and
log-probabilities within 1e-5), in oracle and predictor modes, with reuse, evictions and overflow; on int8 / int4
group-quantized rows (dequantized inside the kernel) as on float ones; and one warning, never a traceback, where the
library cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import llmflash.native as native
from llmflash.cache import RowStore
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir
from llmflash.layout import FlashLayout, read_plan
from llmflash.step import NativeRows, slot_plan
from llmflash.storage import FlashReader, aligned_buffer

from tiny import save_tiny_models

BIG = 8.0
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
needs_native = pytest.mark.skipif(native.library() is None, reason="the native step does not build here")


@pytest.fixture(scope="module")
def flash_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    out = {}
    for name, src in save_tiny_models(root, ("llama", "opt", "silu")).items():
        out[name] = convert(str(src), root / f"{name}-flash", progress=False, calibration_tokens=512)
    return out


def _run(path: Path, native_on: bool, ids: torch.Tensor, n: int = 10, **kw):
    e = Engine(path, EngineConfig(dram_budget=kw.pop("budget", BIG), native=native_on, **kw))
    try:
        assert e.native == native_on
        gen = e.generate(PROMPT, n, stop_at_eos=False)
        logp = e.score(ids)
        return gen, logp
    finally:
        e.close()


def _tight(path: Path, rows: int) -> float:
    """A budget leaving ``rows`` cache rows per layer (the rest of each token's set overflows)."""
    fd = open_flash_dir(path)
    lay = fd.layout
    return (fd.resident_path.stat().st_size + (384 + rows * lay.n_layers) * lay.neuron_stride_bytes) / fd.model_bytes


@needs_native
@pytest.mark.parametrize("name,kw", [
    ("llama", {"mode": "oracle"}),
    ("llama", {"mode": "oracle", "window": 2, "cache_policy": "lru"}),
    ("opt", {"mode": "oracle", "window": 1}),  # plain FFN with an activation bias, evictions every token
    ("silu", {"mode": "oracle", "sparsity": "threshold"}),  # SwiGLU under the threshold rule
    ("llama", {"mode": "oracle", "reuse": False}),
    ("llama", {"mode": "oracle", "lookahead": True, "window": 2}),
    ("llama", {"mode": "naive"}),
    ("llama", {"mode": "hybrid", "budget": 0.7, "staging_rows": 64}),
])
def test_native_equals_the_python_path(flash_dirs, name, kw):
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(11))
    g_py, lp_py = _run(flash_dirs[name], False, ids, **dict(kw))
    g_nat, lp_nat = _run(flash_dirs[name], True, ids, **dict(kw))
    assert g_nat.tokens == g_py.tokens
    assert torch.allclose(lp_nat, lp_py, rtol=0, atol=1e-5)
    hits = [(t.cache_hits, t.cache_misses, t.cache_evictions) for t in g_py.per_token]
    assert hits == [(t.cache_hits, t.cache_misses, t.cache_evictions) for t in g_nat.per_token]


@needs_native
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_native_with_overflow_equals_dense(flash_dirs, name):
    """20 cache rows per layer: most of each set overflows into the staging buffer (and, at 8 staging rows, streams
    through it): still the dense tokens, and the Python path's log-probabilities."""
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(12))
    budget = _tight(flash_dirs[name], 20)
    dense = Engine(flash_dirs[name], EngineConfig(mode="dense", dram_budget=BIG))
    try:
        ref = dense.generate(PROMPT, 10, stop_at_eos=False).tokens
    finally:
        dense.close()
    for staging in (384, 8):
        g_py, lp_py = _run(flash_dirs[name], False, ids, budget=budget, mode="oracle", staging_rows=staging)
        g_nat, lp_nat = _run(flash_dirs[name], True, ids, budget=budget, mode="oracle", staging_rows=staging)
        assert g_nat.tokens == g_py.tokens == ref
        assert sum(t.cache_misses for t in g_nat.per_token) > sum(t.loaded_neurons for t in g_nat.per_token)  # overflow
        assert torch.allclose(lp_nat, lp_py, rtol=0, atol=1e-5)


def _random_predictors(path, out) -> None:
    """A random rank-8 predictor set for the flash directory ``path`` (relu rule, trained on nothing), saved to out."""
    from llmflash.predictor import LowRankPredictor, PredictorSet

    fd = open_flash_dir(path)
    lay = fd.layout
    torch.manual_seed(0)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": fd.name, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [0.0] * lay.n_layers, meta).save(out)


@needs_native
def test_native_equals_the_python_path_in_predictor_mode(flash_dirs, tmp_path):
    """Predictor mode (the cached rows that are not predicted are computed too, with the model's rule): a random
    low-rank predictor set trained on nothing, the same for both paths."""
    _random_predictors(flash_dirs["llama"], tmp_path / "pred")
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(13))
    for budget in (BIG, _tight(flash_dirs["llama"], 40)):
        kw = dict(mode="predictor", predictors=str(tmp_path / "pred"), budget=budget)
        g_py, lp_py = _run(flash_dirs["llama"], False, ids, **dict(kw))
        g_nat, lp_nat = _run(flash_dirs["llama"], True, ids, **dict(kw))
        assert g_nat.tokens == g_py.tokens
        assert torch.allclose(lp_nat, lp_py, rtol=0, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_pytorch_tanh"])
def test_kernel_equals_torch_on_random_rows(dtype, atol, activation):
    """The kernel alone: random rows in a store, a slot list with gaps, bias, threshold, gate mask; against the same
    formula in float32 torch (the weights rounded to ``dtype`` first)."""
    from llmflash.ffn import activation_fn, neuron_outputs

    d, n_ffn, cap = 64, 96, 48
    for gated in (True, False):
        lay = FlashLayout.build(1, d, n_ffn, gated, {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                                     torch.float16: "float16"}[dtype], bundled=gated)
        store = RowStore(lay, cap, dtype)
        g = torch.Generator().manual_seed(3)
        for r in store.rows:
            r.copy_(torch.randn(r.shape, generator=g).to(dtype) * 0.3)
        slots = np.array([0, 3, 4, 5, 17, 30, 47], dtype=np.int64)
        ids = np.array([2, 90, 11, 12, 40, 7, 0], dtype=np.int64)
        bias = torch.randn(n_ffn, generator=g)
        x = torch.randn(2, d, generator=g)
        mask = torch.rand(2, n_ffn, generator=g) > 0.2
        for threshold in (None, 0.05):
            k = NativeRows.make(activation, dtype, gated, threshold, bias)
            assert k is not None
            y = torch.zeros(2, d)
            k.add(y, x, store, slots, ids, mask)
            idx = torch.from_numpy(slots)
            a = store.gather("gate" if gated else "up", idx).float()
            u = store.gather("up", idx).float() if gated else None
            h = neuron_outputs(x, a, u, bias[torch.from_numpy(ids)], activation_fn(activation), threshold)
            h = h * mask[:, torch.from_numpy(ids)]
            ref = h @ store.gather("down", idx).float()
            assert torch.allclose(y, ref, rtol=1e-4, atol=atol if dtype != torch.float32 else 1e-5), (gated, threshold)


def _quantized_store(lay: FlashLayout, cap: int, seed: int) -> RowStore:
    """A store of ``cap`` random rows encoded in ``lay``'s quantized format (``quant.encode_rows``)."""
    from llmflash.quant import encode_rows

    g = torch.Generator().manual_seed(seed)
    store = RowStore(lay, cap, torch.float32)
    for seg, rows in zip(lay.segments, store.rows):
        parts = [torch.randn(cap, lay.d_model, generator=g) * 0.3 + 0.05 for _ in seg.parts]  # (offsets nonzero)
        rows.copy_(encode_rows(parts, lay, seg.stride_bytes, seg.parts))
    return store


def _reference(store: RowStore, x, slots, ids, bias, mask, activation, threshold, on_act=False):
    """The engine's Python path over quantized rows: the gathered rows dequantized (``quant.part_rows``), then the
    float32 formula."""
    from llmflash.ffn import activation_fn, neuron_outputs
    from llmflash.quant import part_rows

    lay, idx = store.layout, torch.from_numpy(slots)
    gathered = [r.index_select(0, idx) for r in store.rows]
    gated = "gate" in lay.segments[0].parts

    def part(name):
        return part_rows(lay, gathered, name, 0, slots.size, torch.float32)

    h = neuron_outputs(x, part("gate" if gated else "up"), part("up") if gated else None,
                       None if bias is None else bias[torch.from_numpy(ids)], activation_fn(activation), threshold,
                       on_act)
    if mask is not None:
        h = h * mask[:, torch.from_numpy(ids)]
    return h @ part("down")


@needs_native
@pytest.mark.parametrize("dtype", ["int8", "int4", "int4a"])  # int4a: gate and up rows asymmetric (``quant``)
@pytest.mark.parametrize("group", [32, 64, 8])  # 8: the kernel's plain loops (a group's codes under 16 bytes)
@pytest.mark.parametrize("activation,threshold", [("relu", None), ("silu", 0.05)])
def test_quantized_kernel_equals_the_python_path(dtype, group, activation, threshold):
    """Quantized rows (int8, int4, int4 with asymmetric gate and up rows; groups of 32, 64 and 8; gated and plain,
    bundled and not): the kernel, which dequantizes inside its dot products, equals the Python path's
    dequantize-then-matmul within float32 rounding: a slot list with gaps, a bias, a gate mask, one and three tokens,
    one and two threads."""
    d, n_ffn, cap = 128, 160, 96
    asym = ("gate", "up") if dtype == "int4a" else ()
    dtype = dtype.rstrip("a")
    for gated in (True, False):
        for bundled in (True, False):
            lay = FlashLayout.build(1, d, n_ffn, gated, dtype, bundled=bundled, group_size=group, asym_parts=asym)
            assert bool(lay.asym_parts) == bool(asym)
            store = _quantized_store(lay, cap, seed=group + gated + 2 * bundled)
            g = torch.Generator().manual_seed(7)
            slots = np.sort(np.random.default_rng(group).choice(cap, 80, replace=False)).astype(np.int64)
            ids = np.random.default_rng(1).choice(n_ffn, slots.size, replace=False).astype(np.int64)
            bias = None if gated else torch.randn(n_ffn, generator=g) * 0.1
            for T in (1, 3):
                x = torch.randn(T, d, generator=g)
                mask = torch.rand(T, n_ffn, generator=g) > 0.2 if gated else None
                ref = _reference(store, x, slots, ids, bias, mask, activation, threshold)
                k = NativeRows.make(activation, torch.float32, gated, threshold, bias)
                assert k is not None
                for threads in (1, 2):
                    k.threads = threads
                    y = torch.zeros(T, d)
                    k.add(y, x, store, slots, ids, mask)
                    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5), (gated, bundled, T, threads)
                    assert float(ref.abs().max()) > 0.1
                y = torch.ones(T, d)  # it adds
                k.threads = 1
                k.add(y, x, store, slots[:5], ids[:5], mask)
                ref5 = _reference(store, x, slots[:5], ids[:5], bias, mask, activation, threshold)
                assert torch.allclose(y, ref5 + 1, rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_a_decode_steps_blocked_sums_equal_the_row_by_row_ones(dtype):
    """One token's rows add their down parts to y four at a time (one pass over y per block); a step of several
    tokens adds them row by row. Each value takes the same terms in the same order: the first token of a two-token
    step equals the one-token step to the bit, for any number of rows (blocks and a remainder)."""
    d, n_ffn = 128, 160
    lay = FlashLayout.build(1, d, n_ffn, True, dtype, bundled=True, group_size=32 if dtype.startswith("int") else 0)
    if lay.quantized:
        store = _quantized_store(lay, n_ffn, seed=3)
    else:
        store = RowStore(lay, n_ffn, getattr(torch, dtype))
        for r in store.rows:
            r.copy_(torch.randn(r.shape, generator=torch.Generator().manual_seed(3)).to(r.dtype))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, d, generator=g)
    k = NativeRows.make("silu", torch.float32 if lay.quantized else getattr(torch, dtype), True, None, None)
    assert k is not None
    for n in (1, 4, 7, 90):
        slots = np.sort(np.random.default_rng(n).choice(n_ffn, n, replace=False)).astype(np.int64)
        one, two = torch.zeros(1, d), torch.zeros(2, d)
        k.add(one, x[:1].contiguous(), store, slots, slots)
        k.add(two, x, store, slots, slots)
        assert torch.equal(one[0], two[0]), n


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_kernel_with_the_threshold_on_the_activation(dtype):
    """``on_act`` (a CATS-style rule: |act(gate x)| > threshold decides, the up projection does not), float and
    quantized rows."""
    d, n_ffn, cap = 64, 96, 48
    if dtype == "float32":
        lay = FlashLayout.build(1, d, n_ffn, True, dtype, bundled=True)
        store = RowStore(lay, cap, torch.float32)
        store.rows[0].copy_(torch.randn(store.rows[0].shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    else:
        lay = FlashLayout.build(1, d, n_ffn, True, dtype, bundled=True, group_size=32)
        store = _quantized_store(lay, cap, seed=5)
    slots = np.array([1, 2, 3, 10, 20, 33, 47], dtype=np.int64)
    ids = np.array([5, 6, 7, 50, 60, 70, 95], dtype=np.int64)
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(6))
    ref = _reference(store, x, slots, ids, None, None, "silu", 0.3, on_act=True)
    assert not torch.allclose(ref, _reference(store, x, slots, ids, None, None, "silu", 0.3))  # another rule
    k = NativeRows.make("silu", torch.float32, True, 0.3, None, on_act=True)
    assert k is not None
    y = torch.zeros(2, d)
    k.add(y, x, store, slots, ids)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5)


def _one_resident_layer(path: Path, staging_rows: int) -> float:
    """A hybrid budget that keeps one layer resident (dequantized) and streams the others."""
    from llmflash.quant import dense_layer_bytes

    fd = open_flash_dir(path)
    fixed = fd.resident_path.stat().st_size + staging_rows * fd.layout.neuron_stride_bytes
    return (fixed + 1.5 * dense_layer_bytes(fd.layout, fd.dtype)) / fd.model_bytes


@pytest.fixture(scope="module")
def quant_dirs(flash_dirs):
    """{(model, dtype): flash dir} of the tiny models at int8 and int4 (groups of 32; llama also int4 g64)."""
    root = flash_dirs["llama"].parent
    out = {}
    for name in ("llama", "opt", "silu"):
        for dtype in ("int8", "int4"):
            out[name, dtype] = convert(str(root / name), root / f"{name}-{dtype}", dtype=dtype, progress=False,
                                       calibration_tokens=512 if name == "silu" else 0, gptq_tokens=512)
    out["llama", "int4g64"] = convert(str(root / "llama"), root / "llama-int4g64", dtype="int4", group_size=64,
                                      progress=False, calibration_tokens=0)
    out["llama", "int4a"] = convert(str(root / "llama"), root / "llama-int4a", dtype="int4", int4_gate_up="asym",
                                    progress=False, calibration_tokens=512, gptq_tokens=512)
    assert open_flash_dir(out["llama", "int4a"]).layout.asym_parts == ("gate", "up")
    return out


@needs_native
@pytest.mark.parametrize("dtype", ["int8", "int4", "int4g64", "int4a"])
@pytest.mark.parametrize("name,kw", [
    ("llama", {"mode": "oracle", "window": 2}),
    ("opt", {"mode": "oracle", "window": 1}),
    ("silu", {"mode": "oracle", "sparsity": "threshold"}),
    ("llama", {"mode": "naive"}),
    ("llama", {"mode": "hybrid", "staging_rows": 64}),  # one layer resident (``_one_resident_layer``), two streamed
    ("llama", {"mode": "oracle", "cache_form": "compute"}),  # float rows dequantized on read: the float kernel
])
def test_native_on_quantized_rows_equals_the_python_path_and_dense(quant_dirs, dtype, name, kw):
    """Quantized directories with the native step on: the Python path's tokens and log-probabilities (within 1e-5),
    and dense's tokens at the same dtype."""
    if (name, dtype) not in quant_dirs:
        pytest.skip("int4 g64 and asymmetric int4: the llama only")
    path = quant_dirs[name, dtype]
    kw = dict(kw)
    if kw["mode"] == "hybrid":
        kw["budget"] = _one_resident_layer(path, kw["staging_rows"])
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(14))
    g_py, lp_py = _run(path, False, ids, **dict(kw))
    g_nat, lp_nat = _run(path, True, ids, **dict(kw))
    assert g_nat.tokens == g_py.tokens
    assert torch.allclose(lp_nat, lp_py, rtol=0, atol=1e-5)
    rule = {"sparsity": kw["sparsity"]} if "sparsity" in kw else {}
    dense = Engine(path, EngineConfig(mode="dense", dram_budget=BIG, **rule))
    try:
        assert g_nat.tokens == dense.generate(PROMPT, 10, stop_at_eos=False).tokens
    finally:
        dense.close()


@needs_native
def test_native_on_quantized_rows_with_overflow_and_predictors(quant_dirs, tmp_path):
    """int4 rows, 20 cache rows per layer (most of every set overflows through the staging buffer), then predictor
    mode with 60: native on and off agree."""
    path = quant_dirs["llama", "int4"]
    _random_predictors(path, tmp_path / "pred")
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(15))
    for kw in ({"mode": "oracle", "budget": _tight(path, 20), "staging_rows": 8},  # (60: room for the predictors)
               {"mode": "predictor", "predictors": str(tmp_path / "pred"), "budget": _tight(path, 60)}):
        g_py, lp_py = _run(path, False, ids, **dict(kw))
        g_nat, lp_nat = _run(path, True, ids, **dict(kw))
        assert g_nat.tokens == g_py.tokens
        assert torch.allclose(lp_nat, lp_py, rtol=0, atol=1e-5)
        assert sum(t.cache_misses for t in g_nat.per_token) > sum(t.loaded_neurons for t in g_nat.per_token)  # overflow


def test_scatter_reads_land_in_their_slots_with_the_plans_reads(tmp_path):
    """A slot plan reads exactly what ``read_plan`` reads (same offsets, same sizes), each row into its slot."""
    lay = FlashLayout.build(2, 16, 64, True, "float32", True)
    seg = lay.segments[0]
    data = np.arange(lay.file_bytes // 4, dtype=np.float32)
    path = tmp_path / "ffn.bin"
    data.tofile(path)
    ids = np.array([3, 4, 5, 9, 10, 30], dtype=np.int64)
    slots = np.array([7, 2, 3, 0, 1, 5], dtype=np.int64)
    fo, nb, po = slot_plan(seg, 1, ids, slots, 1 << 20)
    fo2, nb2, _ = read_plan(seg, 1, ids, 0, 1 << 20)
    assert fo.tolist() == fo2.tolist() and nb.tolist() == nb2.tolist()
    buf = aligned_buffer(8 * seg.stride_bytes)
    with FlashReader(path, n_threads=2) as reader:
        reader.wait(reader.submit(buf, fo, nb, po, piece_bytes=seg.stride_bytes))
        assert reader.stats.reads == fo.size
    rows = np.frombuffer(buf, dtype=np.float32).reshape(8, -1)
    per_row = seg.stride_bytes // 4
    for nid, slot in zip(ids, slots):
        start = (seg.layer_offsets[1] + nid * seg.stride_bytes) // 4
        assert np.array_equal(rows[slot], data[start : start + per_row])


def test_no_compiler_is_one_warning_and_the_python_path(flash_dirs, monkeypatch, caplog):
    """Where the library cannot be built: one warning (no traceback), the engine on its Python path, same tokens."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        e = Engine(flash_dirs["llama"], EngineConfig(mode="oracle", dram_budget=BIG))
        e2 = Engine(flash_dirs["llama"], EngineConfig(mode="oracle", dram_budget=BIG))
    try:
        assert not e.native and not e2.native
        warnings = [r for r in caplog.records if r.name == "llmflash.native"]
        assert len(warnings) == 1 and "g++" in warnings[0].getMessage() and warnings[0].exc_info is None
        assert native.unavailable_reason() is not None
        toks = e.generate(PROMPT, 6, stop_at_eos=False).tokens
    finally:
        e.close()
        e2.close()
    monkeypatch.setattr(native, "_state", {})
    ref = Engine(flash_dirs["llama"], EngineConfig(mode="dense", dram_budget=BIG))
    try:
        assert toks == ref.generate(PROMPT, 6, stop_at_eos=False).tokens
    finally:
        ref.close()


def test_a_failing_compile_is_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    bad = tmp_path / "step.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        assert native.library() is None
        assert native.library() is None
    assert len([r for r in caplog.records if r.name == "llmflash.native"]) == 1
    assert not any((tmp_path / "cache").rglob("*.so"))  # nothing half-built left as a library
    monkeypatch.setattr(native, "_state", {})

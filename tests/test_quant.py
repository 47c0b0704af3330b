"""Flash directories at every stored dtype (float16, int8, int4) on tiny random models: every mode runs and the sparse
modes equal dense at the same dtype, eval-ppl works, bytes are counted exactly, quantization errors stay bounded."""

from __future__ import annotations

import math

import pytest
import torch

from llmflash import gptq
from llmflash.commands import eval_ppl
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir
from llmflash.quant import quantize

from tiny import engine_generate, engine_perplexity, save_tiny, save_tiny_models, tiny_llama

BIG = 8.0  # tiny models are mostly padding: give them room
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
DTYPES = ("float16", "int8", "int4")


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """{(model, dtype): flash dir} for a ReLU llama (gated) and OPT (plain FFN, biases), and a text file."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, src in save_tiny_models(root).items():
        for dtype in DTYPES:
            out[name, dtype] = convert(str(src), root / f"{name}-{dtype}", dtype=dtype, progress=False,
                                       calibration_tokens=0)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out["text"] = root / "text.txt"
    return out


def _gen(path, mode, n=10, **kw):
    return engine_generate(path, PROMPT, n, kw.pop("budget", BIG), mode=mode, **kw)


def _ppl(path, mode, ids, **kw):
    return engine_perplexity(path, ids, kw.pop("budget", BIG), mode=mode, **kw)


def _all_active_predictors(path, out):
    """Predictors that mark every neuron active (predictor mode must then equal dense)."""
    from llmflash.predictor import LowRankPredictor, PredictorSet

    fd = open_flash_dir(path)
    lay = fd.layout
    torch.manual_seed(0)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": fd.name, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [-1e9] * lay.n_layers, meta).save(out)
    return str(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_every_mode_runs_and_matches_dense(qdirs, name, dtype, tmp_path):
    path = qdirs[name, dtype]
    ref = _gen(path, "dense").tokens
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(path, mode).tokens == ref, mode
    assert _gen(path, "predictor", predictors=_all_active_predictors(path, tmp_path / "p")).tokens == ref
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(3))
    dense, oracle = _ppl(path, "dense", ids), _ppl(path, "oracle", ids, window=2)
    # float16: the sparse path sums the same products in another order (cached rows, then new rows), in float16
    assert abs(oracle / dense - 1) < (2e-3 if dtype == "float16" else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_ppl_at_every_dtype(qdirs, dtype, tmp_path):
    """eval-ppl (the whole model in DRAM) works on every stored dtype; oracle equals dense; predictor runs."""
    path = str(qdirs["llama", dtype])
    kw = dict(max_tokens=300, seq_len=64)
    dense = eval_ppl(path, str(qdirs["text"]), mode="dense", **kw)
    oracle = eval_ppl(path, str(qdirs["text"]), mode="oracle", **kw)
    pred = eval_ppl(path, str(qdirs["text"]), mode="predictor", predictors=_all_active_predictors(path, tmp_path / "p"), **kw)
    assert math.isfinite(dense["ppl"]) and dense["ppl"] == oracle["ppl"] == pred["ppl"]


# ------------------------------------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_quantize_round_trip_is_within_half_a_step(bits, group):
    from llmflash.quant import dequantize, error_bound, measure, quantize

    g = torch.Generator().manual_seed(bits * group)
    w = torch.randn(37, 128, generator=g) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different scales
    w[3, :group] = 0  # an all-zero group
    codes, scales = quantize(w, bits, group, search=False)
    assert codes.dtype == torch.uint8 and codes.shape == (37, 128 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (37, 128 // group)
    back = dequantize(codes, scales, bits, group)
    assert ((w - back).abs() <= error_bound(w, bits, group)).all()
    assert (back[3, :group] == 0).all()
    # the clipping search: no group's squared error grows
    searched = dequantize(*quantize(w, bits, group, search=True), bits, group)
    per_group = lambda b: (w - b).square().view(37, -1, group).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(back) * (1 + 1e-5) + 1e-12).all()
    e = measure(w, bits, group)
    assert e.bytes_per_value == bits / 8 + 2 / group
    assert e.rel_rms < (0.01 if bits == 8 else 0.15)
    for dtype in (torch.float16, torch.bfloat16):  # the same codes decode in any compute dtype
        assert torch.allclose(dequantize(codes, scales, bits, group, dtype).float(), back, rtol=1e-2, atol=1e-6)


def test_int4_codes_pack_two_values_per_byte_low_nibble_first():
    from llmflash.quant import quantize

    w = torch.tensor([[7.0, -7.0, 1.0, 0.0] * 8])  # one group of 32: scale 1
    codes, scales = quantize(w, 4, 32)
    assert float(scales[0, 0]) == 1.0
    assert codes[0, :2].tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]


def test_int4_search_uses_the_sixteenth_code():
    """int4's scale search also tries the code -8 (a scale whose sign puts the group's extreme value there): exact
    where a group's values are multiples of its extreme / 8, and never worse than the symmetric -7..7 codes."""
    from llmflash.quant import dequantize, quantize

    steps = torch.tensor([-8.0, -3, 0, 1, 5, 7, 2, -1] * 4)  # one group of 32: extreme -8, steps of 0.25
    w = torch.stack([steps * 0.25, -steps * 0.25])  # the second group's extreme is positive: a negative scale
    codes, scales = quantize(w, 4, 32)
    assert torch.equal(dequantize(codes, scales, 4, 32), w)
    assert float(scales[0, 0]) == 0.25 and float(scales[1, 0]) == -0.25
    assert (codes[:, 0] & 15).tolist() == [0, 0]  # the stored nibble of -8
    g = torch.Generator().manual_seed(5)
    r = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    sym = quantize(r, 4, 32, search=False)
    err = lambda cs: float((dequantize(*cs, 4, 32) - r).square().sum())  # noqa: E731
    assert err(quantize(r, 4, 32)) < 0.8 * err(sym)


def test_bad_group_size_is_refused():
    from llmflash.layout import FlashLayout
    from llmflash.quant import quantize

    with pytest.raises(ValueError):
        quantize(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="group size"):
        FlashLayout.build(2, 96, 8, True, "int8", True, group_size=64)


# ------------------------------------------------------------------------------------------------ format and bytes


def test_quantized_layout_rows_hold_codes_and_scales_aligned_to_512():
    from llmflash.layout import FlashLayout

    f16 = FlashLayout.build(30, 576, 1536, True, "float16", True)
    i8 = FlashLayout.build(30, 576, 1536, True, "int8", True, group_size=32)
    i4 = FlashLayout.build(30, 576, 1536, True, "int4", True, group_size=32)
    assert i8.segments[0].row_bytes == 3 * (576 + 2 * 18) and i8.neuron_stride_bytes == 2048
    assert i4.segments[0].row_bytes == 3 * (288 + 2 * 18) and i4.neuron_stride_bytes == 1024
    assert f16.neuron_stride_bytes == 4096  # float layouts unchanged (4096-aligned rows)
    assert i8.neuron_stride_bytes <= 0.55 * f16.neuron_stride_bytes and i4.neuron_stride_bytes <= 0.32 * f16.neuron_stride_bytes
    for lay in (i8, i4, FlashLayout.build(3, 96, 40, False, "int4", False, group_size=32)):
        assert lay.align_bytes == 512 and lay.file_bytes % 4096 == 0
        starts = sorted(o for s in lay.segments for o in s.layer_offsets)
        assert all(o % 4096 == 0 for o in starts)
        assert FlashLayout.from_json(lay.to_json()) == lay


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_manifest_round_trips_and_is_version_2(qdirs, dtype):
    import json

    from llmflash.manifest import MANIFEST, Manifest

    path = qdirs["llama", dtype]
    raw = json.loads((path / MANIFEST).read_text())
    m = Manifest.from_json(raw)
    assert json.loads(json.dumps(m.to_json())) == raw
    assert raw["format_version"] == 2 and m.quantization is not None
    assert (m.quantization.ffn, m.quantization.group_size, m.quantization.compute_dtype) == (dtype, 32, "float32")
    assert m.layout.group_size == 32 and m.compute_dtype == "float32"
    assert m.bytes.ffn_payload == m.layout.neuron_payload_bytes * m.layout.d_ffn * m.layout.n_layers
    assert m.bytes.model == m.bytes.resident_tensors + m.bytes.ffn_payload
    assert json.loads((qdirs["llama", "float16"] / MANIFEST).read_text())["format_version"] == 1
    broken = dict(raw)
    del broken["quantization"]
    from llmflash.errors import FlashFileError

    with pytest.raises(FlashFileError, match="lacks 'quantization'"):
        Manifest.from_json(broken, "x/manifest.json")


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_bytes_read_per_token_are_the_layouts(qdirs, dtype):
    """Sparse modes read loaded neurons x the layout's stride; naive the whole file + resident every token; the neuron
    cache holds rows at the stored size (DRAM per neuron shrinks with the bits)."""
    path = qdirs["llama", dtype]
    lay = open_flash_dir(path).layout
    f16 = open_flash_dir(qdirs["llama", "float16"]).layout
    assert lay.neuron_stride_bytes < f16.neuron_stride_bytes
    res = _gen(path, "oracle", n=8, window=2)
    assert sum(t.loaded_neurons for t in res.per_token) > 0
    for t in res.per_token:
        assert t.bytes_read == t.loaded_neurons * lay.neuron_stride_bytes
    fd = open_flash_dir(path)
    whole = fd.layout.file_bytes + fd.resident_path.stat().st_size
    for t in _gen(path, "naive", n=4).per_token:
        assert whole <= t.bytes_read <= whole + 4096
    e = Engine(path, EngineConfig(mode="oracle", dram_budget=BIG))
    try:
        caches = [m.cache for m in e.ffn_modules]
        assert all(c.store.nbytes == c.capacity * lay.neuron_stride_bytes for c in caches)
        assert e.dram["neuron_cache"] == sum(c.store.nbytes for c in caches)
    finally:
        e.close()


def test_512_byte_aligned_reads_match_the_kernel(qdirs):
    from llmflash.storage import proc_read_bytes

    if proc_read_bytes() < 0:
        pytest.skip("/proc/self/io unavailable")
    e = Engine(qdirs["llama", "int4"], EngineConfig(mode="oracle", dram_budget=BIG, window=1))
    try:
        assert e.reader.direct and e.reader.align_bytes == 512
        e.generate(PROMPT[:2], 1, stop_at_eos=False)
        counted0, kernel0 = e.reader_totals()[0], proc_read_bytes()
        res = e.generate(PROMPT, 10, stop_at_eos=False)
        counted, kernel = e.reader_totals()[0] - counted0, proc_read_bytes() - kernel0
    finally:
        e.close()
    assert sum(t.bytes_read for t in res.per_token) > 0
    assert abs(kernel - counted) <= 0.05 * counted


def test_threshold_rule_is_calibrated_on_the_quantized_weights(tmp_path):
    """A SiLU model under the threshold rule: convert calibrates on the dequantized weights, and oracle == dense."""
    save_tiny(tiny_llama(seed=1, d_model=128, d_ffn=384), tmp_path / "m")
    path = convert(str(tmp_path / "m"), tmp_path / "q", dtype="int4", progress=False, calibration_tokens=512,
                   gptq_tokens=512)
    kw = dict(sparsity="threshold", threshold_sparsity=0.8)
    assert _gen(path, "oracle", **kw).tokens == _gen(path, "dense", **kw).tokens
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(4))
    assert abs(_ppl(path, "oracle", ids, **kw) / _ppl(path, "dense", ids, **kw) - 1) < 1e-5
    # the calibrated fraction holds on the weights the directory holds (int4 with calibration: GPTQ's codes)
    assert open_flash_dir(path).manifest.quantization.rounding == "gptq:512:wiki:train+bigbench:;codes -8..7"
    out = eval_ppl(str(path), "wiki:train", max_tokens=512, seq_len=256, sparsity="threshold", threshold_sparsity=0.8)
    assert abs(out["ffn_active_fraction"] - 0.2) < 0.05


def test_gptq_without_correlations_is_round_to_nearest():
    """With uncorrelated inputs (H diagonal) no error has anywhere to go: GPTQ's codes and scales are round to
    nearest's, for the parts grouped along their inputs (gate, up) and along their outputs (down)."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    H = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5).double()
    for got in (gptq.quantize_inputs(w, H, 4, 32), gptq.quantize_inputs(w, H, 4, 32, act_order=True)):
        assert all(torch.equal(a, b) for a, b in zip(got, quantize(w, 4, 32)))
    Hn = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(2)) + 0.5).double()
    assert all(torch.equal(a, b) for a, b in zip(gptq.quantize_outputs(w, Hn, 4, 32), quantize(w, 4, 32)))


@pytest.mark.parametrize("part", ["inputs", "outputs"])
def test_gptq_lowers_the_output_error_on_correlated_inputs(part):
    """On correlated inputs GPTQ's codes (same format, decodable by ``dequantize``) give a smaller output error than
    round to nearest, on the calibration inputs and on fresh ones from the same distribution."""
    g = torch.Generator().manual_seed(3)
    n_in = 64 if part == "inputs" else 48
    mix = torch.randn(n_in, n_in, generator=g)
    X, Xt = (torch.randn(2048, n_in, generator=g) @ mix for _ in range(2))
    w = torch.randn(48, 64, generator=g)
    H, Ht = (x.double().T @ x.double() for x in (X, Xt))
    if part == "inputs":
        q = gptq.quantize_inputs(w, H, 4, 32)
    else:
        q = gptq.quantize_outputs(w, H, 4, 32)
    along = part == "inputs"
    for h in (H, Ht):
        assert gptq.output_error(w, q, h, 4, 32, along) < 0.8 * gptq.output_error(w, quantize(w, 4, 32), h, 4, 32, along)


@pytest.mark.parametrize("dtype", ["int4"])
def test_quantized_accelerator_path_and_reorder(qdirs, dtype, tmp_path, monkeypatch):
    """Device rows (the GPU path, on CPU tensors) hold quantized rows too; a reordered copy keeps the format."""
    from llmflash.reorder import reorder_flash_dir

    path = qdirs["llama", dtype]
    ref = _gen(path, "dense").tokens
    out = reorder_flash_dir(path, tmp_path / "r", source=str(qdirs["text"]), max_tokens=256, progress=False)
    fd = open_flash_dir(out)
    assert fd.manifest.quantization == open_flash_dir(path).manifest.quantization
    assert _gen(out, "oracle").tokens == ref
    monkeypatch.setattr(Engine, "copy_on_cpu", True)
    for mode in ("naive", "oracle"):
        assert _gen(path, mode).tokens == ref, mode


def test_cli_convert_int4_and_bad_dtype(qdirs, tmp_path, capsys):
    from llmflash.cli import main

    src = qdirs["llama", "int8"].parent / "llama"
    assert main(["convert", str(src), "--out", str(tmp_path / "q"), "--dtype", "int4", "--group-size", "64",
                 "--calibration-tokens", "0"]) == 0
    assert "512 bytes per neuron" in capsys.readouterr().out  # 128-wide rows: 3 * (64 + 2 * 2) -> 512
    assert open_flash_dir(tmp_path / "q").layout.group_size == 64
    assert main(["convert", str(src), "--out", str(tmp_path / "a"), "--dtype", "int4", "--int4-gate-up", "asym",
                 "--calibration-tokens", "0"]) == 0
    assert open_flash_dir(tmp_path / "a").layout.asym_parts == ("gate", "up")
    capsys.readouterr()
    for bad in (["--dtype", "int3"], ["--dtype", "int4", "--int4-gate-up", "q4"]):
        with pytest.raises(SystemExit) as err:
            main(["convert", str(src), "--out", str(tmp_path / "x"), *bad])
        assert err.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # GPTQ on a chosen number of tokens, recorded in the manifest; a negative count is one line
    assert main(["convert", str(src), "--out", str(tmp_path / "g"), "--dtype", "int4", "--calibration-tokens", "64",
                 "--gptq-tokens", "128"]) == 0
    assert open_flash_dir(tmp_path / "g").manifest.quantization.rounding == "gptq:128:wiki:train+bigbench:;codes -8..7"
    capsys.readouterr()
    assert main(["convert", str(src), "--out", str(tmp_path / "n"), "--dtype", "int4", "--gptq-tokens", "-1"]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- resident weights


def test_int8_linear_takes_weights_at_any_offset():
    """A weight viewing the resident buffer at an offset that is not a multiple of 64 bytes (safetensors aligns to 8)
    gives the aligned weight's output (torch's int8 kernel crashed on such a view: it gets an aligned copy for the
    call), and the module keeps the view (no second copy of the weight in DRAM)."""
    from llmflash.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 127, (128, 128), dtype=torch.int8, generator=g)
    buf = torch.zeros(q.numel() + 64, dtype=torch.int8)
    scale, x = torch.rand(128, generator=g), torch.randn(8, 128, generator=g)
    ref = Int8Linear(q.clone(), scale, None)(x)
    for off in (8, 40):
        view = buf[off : off + q.numel()].view(128, 128)
        view.copy_(q)
        lin = Int8Linear(view, scale, None)
        assert torch.equal(lin(x), ref) and lin.q.data_ptr() == view.data_ptr()


@pytest.mark.parametrize("resident", ["int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_quantized_resident_weights_every_mode(qdirs, name, resident, tmp_path, monkeypatch):
    """--resident-dtype int8 / int4: attention, embeddings and the tied head weight-only int8 (one scale per row), or
    attention in int4 (group-quantized rows: ``QLinear``, the manifest naming the group size) with the embedding and
    the tied head in int8; the resident file (what the engine counts in DRAM) shrinks; every mode gives dense's
    tokens, the accelerator's code path too; eval-ppl works."""
    from llmflash.quant import Int8Embedding, Int8Linear, QLinear

    emb_cls, lin_cls = (Int8Embedding, Int8Linear if resident == "int8" else QLinear)
    src = qdirs[name, "int8"].parent / name
    path = convert(str(src), tmp_path / resident, dtype="int4", resident_dtype=resident, progress=False,
                   calibration_tokens=0)
    fd = open_flash_dir(path)
    q = fd.manifest.quantization
    assert (q.resident, q.resident_group_size) == (resident, 32 if resident == "int4" else 0)
    plain = open_flash_dir(qdirs[name, "int4"])
    assert fd.manifest.bytes.resident_tensors < 0.5 * plain.manifest.bytes.resident_tensors  # OPT: positions stay float
    ref = _gen(path, "dense")
    assert ref.dram_breakdown["resident"] == fd.resident_path.stat().st_size
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(path, mode).tokens == ref.tokens, mode
    e = Engine(path, EngineConfig(mode="oracle", dram_budget=BIG))
    try:
        mods = list(e.model.modules())
        assert any(isinstance(m, emb_cls) for m in mods) and any(isinstance(m, lin_cls) for m in mods)
        assert not any(isinstance(m, torch.nn.Linear) for m in mods)
    finally:
        e.close()
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(3))
    # (int8: not 1e-5 as elsewhere, since torch's int8 kernel (a prefill's) rounds its activations to bfloat16, so a
    # float32 summation-order difference in the FFN's output can move one of them by a bfloat16 step: 3e-5 seen on
    # OPT; int4 resident weights are computed in float32 throughout)
    tol = 2e-4 if resident == "int8" else 1e-5
    assert abs(_ppl(path, "oracle", ids, window=2) / _ppl(path, "dense", ids) - 1) < tol
    out = eval_ppl(str(path), str(qdirs["text"]), max_tokens=200, seq_len=64)
    assert math.isfinite(out["ppl"])
    monkeypatch.setattr(Engine, "copy_on_cpu", True)
    assert _gen(path, "naive").tokens == ref.tokens


def test_int8_linear_matches_its_dequantized_weight():
    from llmflash.quant import Int8Linear, quantize_per_row

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    q, s = quantize_per_row(w)
    lin = Int8Linear(q, s, b)
    x = torch.randn(3, 5, 64, generator=g)
    ref = torch.nn.functional.linear(x, q.float() * s[:, None], b)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    got = lin(x)  # torch's int8 kernel on a bfloat16 hi/lo pair of each activation: 16 of its bits
    assert got.dtype == x.dtype and ((got - ref).norm() / ref.norm()) < 1e-2
    Int8Linear.split = False
    try:
        one = lin(x)  # the kernel on bfloat16 activations alone: 8 bits each, a larger error
    finally:
        Int8Linear.split = True
    assert (got - ref).norm() < 0.9 * (one - ref).norm()  # (the output's bfloat16 rounding stays in both)
    Int8Linear.kernel = False
    try:
        assert torch.allclose(lin(x), ref, atol=1e-5)  # dequantized per call: exact
    finally:
        Int8Linear.kernel = True
    # a weight 8 bytes off 16-byte alignment (a view into a resident.safetensors buffer can be): torch's kernel
    # crashed on it; Int8Linear hands it an aligned copy (test_int8_linear_takes_weights_at_any_offset)
    buf = torch.empty(q.numel() + 64, dtype=torch.int8)
    start = (-buf.data_ptr()) % 16 + 8
    q8 = buf[start:start + q.numel()].view_as(q).copy_(q)
    assert q8.data_ptr() % 16 == 8
    assert torch.equal(Int8Linear(q8, s, b)(x), got)


def _at_threads(lin, x, threads_list=(1, 2)):
    """lin(x) with torch's thread count set to each of ``threads_list`` in turn (restored after each)."""
    out = []
    before = torch.get_num_threads()
    for threads in threads_list:
        torch.set_num_threads(threads)
        try:
            out.append(lin(x))
        finally:
            torch.set_num_threads(before)
    return out


def test_int8_linear_decode_runs_the_native_kernel_in_float32():
    """A decode step's rows (at most NATIVE_MAX_TOKENS) go through llmflash's kernel: float32 activations, sums and
    output, so the result is the dequantized weight's product within float32 rounding (torch's kernel rounds x and y
    to bfloat16), for one or more threads, with or without a bias, and a row count that is not a multiple of 16."""
    from llmflash.native import library
    from llmflash.quant import NATIVE_MAX_TOKENS, Int8Linear, quantize_per_row

    if library() is None:
        pytest.skip("no native library here")
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(300, 96, generator=g), torch.randn(300, generator=g)
    q, s = quantize_per_row(w)
    for bias in (None, b):
        lin = Int8Linear(q, s, bias)
        for t in (1, 3, NATIVE_MAX_TOKENS):
            x = torch.randn(1, t, 96, generator=g)
            ref = torch.nn.functional.linear(x.double(), (q.double() * s.double()[:, None]),
                                             None if bias is None else bias.double())
            for got in _at_threads(lin, x):
                assert got.dtype == torch.float32 and got.shape == (1, t, 300)
                assert ((got.double() - ref).norm() / ref.norm()) < 1e-6
    x = torch.randn(NATIVE_MAX_TOKENS + 1, 96, generator=g)  # a prefill's rows: torch's kernel, bfloat16 rounding
    ref = torch.nn.functional.linear(x, q.float() * s[:, None], b)
    err = ((lin(x) - ref).norm() / ref.norm()).item()
    assert 1e-6 < err < 1e-2


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_cache_form_compute_dequantizes_on_read(qdirs, dtype):
    """cache_form="compute": the caches hold float rows (more DRAM per neuron), reads land in a landing buffer and
    are dequantized once; same tokens as the stored form and dense, same bytes read per token."""
    path = qdirs["llama", dtype]
    ref = _gen(path, "dense").tokens
    stored = _gen(path, "oracle", window=2, lookahead=False)  # (lookahead's auto would add a landing on 2 cores)
    comp = _gen(path, "oracle", window=2, cache_form="compute", lookahead=False)
    assert comp.tokens == stored.tokens == ref
    assert [t.bytes_read for t in comp.per_token] == [t.bytes_read for t in stored.per_token]
    assert "landing" in comp.dram_breakdown and "landing" not in stored.dram_breakdown
    e = Engine(path, EngineConfig(mode="oracle", dram_budget=BIG, cache_form="compute"))
    try:
        lay, rows = e.fd.layout, e.row_layout
        assert not rows.quantized and rows.neuron_stride_bytes == 3 * lay.d_model * 4 > lay.neuron_stride_bytes
        assert all(m.cache.store.nbytes == m.cache.capacity * rows.neuron_stride_bytes for m in e.ffn_modules)
    finally:
        e.close()
    assert _gen(path, "naive", cache_form="compute").tokens == ref
    # lookahead: the guessed rows land in a second landing buffer and are dequantized into their slots on arrival
    ahead = _gen(path, "oracle", window=2, cache_form="compute", lookahead=True)
    assert ahead.tokens == ref
    assert ahead.dram_breakdown["landing"] == 2 * comp.dram_breakdown["landing"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("dtype", ["int8", "int4", "int4a"])
def test_quantized_on_cuda_every_mode_gives_its_dense_tokens(qdirs, dtype, tmp_path):
    """On a GPU the caches hold quantized rows in GPU memory (or dequantized ones: cache_form="compute"), int8
    (and int4) resident weights dequantize per matmul there; every mode gives the GPU's dense tokens. int4a:
    asymmetric gate and up rows."""
    src = str(qdirs["llama", "int8"].parent / "llama")
    kw = {"int4_gate_up": "asym"} if dtype == "int4a" else {}
    dtype = dtype.rstrip("a")
    own = qdirs["llama", dtype] if not kw else convert(src, tmp_path / "a", dtype=dtype, progress=False,
                                                        calibration_tokens=0, **kw)
    for path in (own, *(convert(src, tmp_path / res, dtype=dtype, resident_dtype=res, progress=False,
                                calibration_tokens=0, **kw) for res in ("int8", "int4"))):
        ref = _gen(path, "dense", device="cuda").tokens
        for mode in ("naive", "hybrid", "oracle"):
            assert _gen(path, mode, device="cuda").tokens == ref, mode
        assert _gen(path, "oracle", device="cuda", cache_form="compute").tokens == ref


# ------------------------------------------------------------------------------ asymmetric int4 (gate and up rows)


def _q4_1(n: int, d: int, seed: int, group: int = 32) -> torch.Tensor:
    """Weights on Q4_1 grids (SmolLM2's GGUF): per group of ``group`` a float16 step d and minimum m, codes 0-15 with
    both ends used: w = q * d + m."""
    g = torch.Generator().manual_seed(seed)
    step = (torch.rand(n, d // group, generator=g) * 0.02 + 1e-3).half().float()
    low = (-(torch.rand(n, d // group, generator=g) * 12 + 1) * step).half().float()
    q = torch.randint(0, 16, (n, d // group, group), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (q * step[..., None] + low[..., None]).reshape(n, d)


def test_asymmetric_int4_keeps_q4_1_blocks_and_fits_smollm2_in_1024_bytes():
    from llmflash.layout import FlashLayout
    from llmflash.quant import dequantize, encode_rows, on_asym_grid, quantize_asym

    w = _q4_1(48, 128, seed=1)
    assert on_asym_grid(w, 32) and not on_asym_grid(torch.randn(48, 128), 32)
    few = w.clone()
    few[0, :32] = torch.randn(32)  # one group in 192 off its grid: still a Q4_1 source; one in 4 is not
    assert on_asym_grid(few, 32) and not on_asym_grid(few, 32, min_fraction=1.0)
    few[::4, :32] = torch.randn(12, 32)
    assert not on_asym_grid(few, 32)
    codes, scales, offsets = quantize_asym(w, 32)
    assert codes.shape == (48, 64) and scales.dtype == torch.float16 and offsets.dtype == torch.int8
    step = (w.view(48, 4, 32).amax(-1) - w.view(48, 4, 32).amin(-1)) / 15
    assert torch.equal(scales.float(), step)  # the source's own step
    back = dequantize(codes, scales, 4, 32, offsets=offsets)
    assert ((back - w).abs() <= step.repeat_interleave(32, 1) / 32 + 1e-7).all()  # within 1/32 of a step
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))  # off-grid weights: still no worse than sym
    rel = lambda b: float((b - x).norm() / x.norm())  # noqa: E731
    c, s, z = quantize_asym(x, 32)
    assert rel(dequantize(c, s, 4, 32, offsets=z)) < rel(dequantize(*quantize(x, 4, 32), 4, 32))
    # SmolLM2's bundle: gate and up asymmetric (288 + 36 + 18 bytes each), down symmetric (324): 1 008 -> 1 024
    lay = FlashLayout.build(30, 576, 1536, True, "int4", True, group_size=32, asym_parts=("gate", "up"))
    assert lay.segments[0].row_bytes == 1008 and lay.neuron_stride_bytes == 1024
    assert lay.locate("up") == (0, 342) and lay.locate("down") == (0, 684)
    assert FlashLayout.from_json(lay.to_json()) == lay and "asym_parts" not in FlashLayout.build(
        1, 64, 8, True, "int4", True, group_size=32).to_json()
    with pytest.raises(ValueError, match="only int4 gate and up"):
        FlashLayout.build(1, 64, 8, True, "int8", True, group_size=32, asym_parts=("gate",))
    with pytest.raises(ValueError, match="only int4 gate and up"):
        FlashLayout.build(1, 64, 8, True, "int4", True, group_size=32, asym_parts=("down",))
    small = FlashLayout.build(1, 128, 8, True, "int4", True, group_size=32, asym_parts=("gate", "up"))
    with pytest.raises(ValueError, match="names"):
        encode_rows([w[:8]] * 3, small, small.segments[0].stride_bytes)


def test_convert_keeps_a_q4_1_sources_gate_and_up(tmp_path, monkeypatch):
    """``--int4-gate-up auto``: gate and up rows on Q4_1 grids are stored asymmetrically (within 1/32 of a step of the
    source), random ones symmetrically; every mode equals dense on the asymmetric directory, the accelerator's device
    rows too (on CPU tensors); ``sym`` and ``asym`` force the form."""
    import numpy as np

    from llmflash.quant import part_rows

    model = tiny_llama(relu=True, d_model=128, d_ffn=384, seed=4)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in ("gate_proj", "up_proj"):
                lin = getattr(layer.mlp, name)
                lin.weight.copy_(_q4_1(*lin.weight.shape, seed=10 * i + len(name)))
    src = save_tiny(model, tmp_path / "q41")
    auto = convert(str(src), tmp_path / "auto", dtype="int4", progress=False, calibration_tokens=0)
    fd = open_flash_dir(auto)
    assert fd.layout.asym_parts == ("gate", "up") and "asymmetric" in fd.manifest.quantization.rounding
    assert fd.layout.neuron_stride_bytes == 512  # 3 * (64 + 8) + 2 * 4 (+ padding): no more than symmetric rows
    seg = fd.layout.segments[0]
    raw = np.fromfile(fd.ffn_path, dtype=np.uint8, count=seg.stride_bytes * 384, offset=seg.layer_offsets[0])
    rows = [torch.from_numpy(raw.reshape(384, seg.stride_bytes).copy())]
    for part in ("gate", "up"):
        ref = getattr(model.model.layers[0].mlp, f"{part}_proj").weight
        step = (ref.view(384, 4, 32).amax(-1) - ref.view(384, 4, 32).amin(-1)) / 15
        got = part_rows(fd.layout, rows, part, 0, 384, torch.float32)
        assert ((got - ref).abs() <= step.repeat_interleave(32, 1) / 32 + 1e-7).all()
    ref_tokens = _gen(auto, "dense").tokens
    for mode in ("naive", "hybrid", "oracle"):
        assert _gen(auto, mode).tokens == ref_tokens, mode
    assert _gen(auto, "predictor", predictors=_all_active_predictors(auto, tmp_path / "p")).tokens == ref_tokens
    with monkeypatch.context() as m:
        m.setattr(Engine, "copy_on_cpu", True)
        for mode in ("naive", "oracle"):
            assert _gen(auto, mode).tokens == ref_tokens, mode
    sym = convert(str(src), tmp_path / "sym", dtype="int4", progress=False, calibration_tokens=0, int4_gate_up="sym")
    assert open_flash_dir(sym).layout.asym_parts == ()
    plain = save_tiny(tiny_llama(relu=True, d_model=128, d_ffn=384, seed=4), tmp_path / "plain")
    assert open_flash_dir(convert(str(plain), tmp_path / "p-auto", dtype="int4", progress=False,
                                  calibration_tokens=0)).layout.asym_parts == ()
    forced = convert(str(plain), tmp_path / "p-asym", dtype="int4", progress=False, calibration_tokens=0,
                     int4_gate_up="asym")
    assert open_flash_dir(forced).layout.asym_parts == ("gate", "up")
    with pytest.raises(Exception, match="int4-gate-up"):
        convert(str(plain), tmp_path / "bad", dtype="int4", progress=False, calibration_tokens=0, int4_gate_up="x")


def test_q_linear_equals_its_dequantized_weight():
    """QLinear: llmflash's kernel for a decode step's float32 rows (one or two threads, with or without a bias, rows
    not a multiple of 16) and the dequantized weight for a prefill's rows both give the product with the
    dequantized weight within float32 rounding; the rows' round trip is close to the weight."""
    from llmflash.native import library
    from llmflash.quant import NATIVE_MAX_TOKENS, QEmbedding, QLinear, decode_rows, encode_part

    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(300, 128, generator=g), torch.randn(300, generator=g)
    for bits, gs in ((4, 32), (4, 64), (8, 32)):
        rows = encode_part(w, bits, gs)
        deq = decode_rows(rows, bits, gs)
        assert deq.shape == w.shape
        assert ((deq - w).norm() / w.norm()) < (0.12 if bits == 4 else 0.01)
        for bias in (None, b):
            lin = QLinear(rows, bits, gs, bias)
            assert (lin.in_features, lin.out_features) == (128, 300)
            for t in (1, 3, NATIVE_MAX_TOKENS, NATIVE_MAX_TOKENS + 5):
                x = torch.randn(t, 128, generator=g)
                ref = torch.nn.functional.linear(x.double(), deq.double(), None if bias is None else bias.double())
                for got in _at_threads(lin, x):
                    assert got.dtype == torch.float32 and got.shape == (t, 300)
                    assert ((got.double() - ref).norm() / ref.norm()) < 1e-6, (bits, gs, t)
    emb = QEmbedding(encode_part(w, 4, 32), 4, 32)
    ids = torch.tensor([[3, 0, 299], [7, 7, 1]])
    assert torch.equal(emb(ids), decode_rows(encode_part(w, 4, 32), 4, 32)[ids])
    if library() is None:
        pytest.skip("no native library here: the dequantized path alone was checked")


def test_resident_int4_manifest_is_checked(qdirs, tmp_path):
    """A manifest that says int4 resident weights without a group size (or the reverse) is refused in one line."""
    import json

    from llmflash.errors import FlashFileError
    from llmflash.flashdir import open_flash_dir as open_dir

    src = qdirs["llama", "int8"].parent / "llama"
    path = convert(str(src), tmp_path / "r4", dtype="float32", resident_dtype="int4", progress=False,
                   calibration_tokens=0)
    m = json.loads((path / "manifest.json").read_text())
    assert m["quantization"]["resident_group_size"] == 32 and m["quantization"]["ffn"] == "float32"
    del m["quantization"]["resident_group_size"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FlashFileError, match="quantization"):
        open_dir(path)

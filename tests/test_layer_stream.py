"""Streamed layers (``layer_stream``): decoder layers' resident weights read from flash every token."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from llmflash.budget import streamed_layer_count
from llmflash.commands import summary_line
from llmflash.convert import convert
from llmflash.engine import Engine, EngineConfig
from llmflash.errors import BudgetError, FlashFileError, LLMFlashError
from llmflash.flashdir import open_flash_dir
from llmflash.layer_stream import plan_stream, spread_layers, stream_holes, tensor_index
from llmflash.storage import ALIGN_BYTES

from tiny import save_tiny, tiny_llama, tiny_opt

PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 120, 64])
BIG = 8.0
LAYERS = 5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    src = save_tiny(tiny_llama(relu=True, layers=LAYERS, d_model=128, d_ffn=384), root / "llama")
    opt = save_tiny(tiny_opt(layers=LAYERS, d_model=128, d_ffn=384), root / "opt")
    return {"float32": convert(str(src), root / "f32", progress=False, calibration_tokens=0),
            "opt": convert(str(opt), root / "opt-f32", progress=False, calibration_tokens=0),
            "int4": convert(str(src), root / "q4", dtype="int4", resident_dtype="int4", progress=False,
                            calibration_tokens=0)}


def _engine(path, **kw):
    kw.setdefault("lookahead", False)  # (auto: from the machine's load at start, so two runs could differ)
    return Engine(path, EngineConfig(mode=kw.pop("mode", "oracle"), dram_budget=kw.pop("budget", BIG), **kw))


def _run(path, n=8, **kw):
    e = _engine(path, **kw)
    try:
        return e, e.generate(PROMPT, n, stop_at_eos=False)
    finally:
        e.close()


def test_spread_layers():
    assert spread_layers(32, 0) == () and spread_layers(4, 9) == (0, 1, 2, 3)
    assert spread_layers(32, 4) == (4, 12, 20, 28) and len(spread_layers(30, 17)) == 17


def test_plan_covers_each_layers_tensors_and_holes_stay_inside_them(dirs):
    fd = open_flash_dir(dirs["float32"])
    index = tensor_index(fd.resident_path)
    prefixes = [f"model.layers.{i}.self_attn." for i in range(LAYERS)]
    for m, slots in ((1, 1), (2, 2), (3, 3), (4, 2), (5, 3)):
        plan = plan_stream(index, prefixes, spread_layers(LAYERS, m))
        assert plan.n_slots == slots and len(plan.layers) == m
        # neighbours in the cycle (the next token's first layer after the last) never share a slot
        cyc = [plan.slot_of(i) for i in range(m)]
        assert m == 1 or all(cyc[i] != cyc[(i + 1) % m] for i in range(m))
        for layer, names, spans in zip(plan.layers, plan.names, plan.spans):
            assert names and all(n.startswith(f"model.layers.{layer}.self_attn.") for n in names)  # not the norms
            assert not any(n.startswith("llmflash.ffn.") for n in names)
            for n in names:  # each tensor inside one aligned span, the spans inside the slot
                e = index[n]
                assert sum(s.file_offset <= e.start and e.end <= s.file_offset + s.nbytes for s in spans) == 1
            assert all(s.file_offset % ALIGN_BYTES == 0 and s.nbytes % ALIGN_BYTES == 0 for s in spans)
            assert spans[-1].slot_offset + spans[-1].nbytes <= plan.slot_bytes
        streamed = [(index[n].start, index[n].end) for names in plan.names for n in names]
        for a, b in stream_holes(index, plan):  # a hole's bytes belong only to streamed tensors
            assert a % ALIGN_BYTES == 0 and b % ALIGN_BYTES == 0
            kept = [(e.start, e.end) for n, e in index.items() if (e.start, e.end) not in streamed]
            assert not any(s < b and a < t for s, t in kept)


def test_streamed_count_rule():
    saved = {1: -10, 2: 0, 3: 0, 4: 20, 5: 30}.__getitem__
    assert streamed_layer_count(100, 60, 40, saved, 5) == 0
    assert streamed_layer_count(100, 70, 40, saved, 5) == 4
    assert streamed_layer_count(100, 75, 50, saved, 5) == 5
    assert streamed_layer_count(100, 200, 50, saved, 5) == 5  # nothing fits: the most saved (the budget check decides)
    assert streamed_layer_count(100, 200, 50, {1: -3, 2: 0, 3: -3}.__getitem__, 3) == 0


@pytest.mark.parametrize("dtype", ["float32", "int4", "opt"])
@pytest.mark.parametrize("m", [1, 3, 4, 5])
def test_streamed_layers_give_the_same_tokens_and_read_their_bytes(dirs, dtype, m):
    """Streaming m layers changes nothing computed; every token reads each streamed layer's spans once more (when
    there are more streamed layers than slots); DRAM counts the slots and not the streamed tensors."""
    path = dirs[dtype]
    _, ref = _run(path)
    e, out = _run(path, stream_layers=m)
    plan = e.stream.plan if e.stream else None
    assert plan is not None and len(plan.layers) == m
    assert out.tokens == ref.tokens
    size = e.fd.resident_path.stat().st_size  # (the last span may reach past the end: the kernel returns less)
    per_pass = sum(min(s.file_offset + s.nbytes, size) - s.file_offset for i, spans in enumerate(plan.spans)
                   if plan.rereads(i) for s in spans)
    assert (per_pass > 0) == (m > plan.n_slots) and plan.read_bytes_per_pass >= per_pass
    extra = [t.bytes_read - r.bytes_read for t, r in zip(out.per_token, ref.per_token)]
    assert extra == [per_pass] * len(extra)
    assert out.dram_breakdown["layer_slots"] == plan.n_slots * plan.slot_bytes
    assert out.dram_breakdown["resident"] == ref.dram_breakdown["resident"] - sum(plan.layer_bytes)
    assert out.config["streamed_layers"] == list(plan.layers)
    assert f", {m} of {LAYERS} layers' attention streamed" in summary_line(out)
    assert "streamed" not in summary_line(ref)


def test_streamed_scores_equal(dirs):
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1))
    scores = []
    for m in (0, 4):
        e = _engine(dirs["int4"], stream_layers=m)
        try:
            scores.append(e.score(ids))
        finally:
            e.close()
    assert torch.equal(scores[0], scores[1])


def _resident_pages(base: int, a: int, b: int) -> int:
    """Pages of [base + a, base + b) (an anonymous mapping) that are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    n = (b - a) // ALIGN_BYTES
    vec = (ctypes.c_ubyte * n)()
    rc = libc.mincore(ctypes.c_void_p(base + a), ctypes.c_size_t(b - a), vec)
    assert rc == 0, ctypes.get_errno()
    return int(np.frombuffer(vec, np.uint8).astype(bool).sum() if n else 0)


def test_streamed_weights_take_no_dram(dirs):
    """The streamed layers' pages of the resident buffer are never touched (after generating); the rest is there."""
    e = _engine(dirs["float32"], stream_layers=4)
    try:
        e.generate(PROMPT, 4, stop_at_eos=False)
        index = tensor_index(e.fd.resident_path)
        holes = stream_holes(index, e.stream.plan)
        emb = index["model.embed_tokens.weight"]
        # the resident buffer holds the file at its own offsets: its address from a resident tensor's
        base = e.model.get_input_embeddings().weight.data_ptr() - emb.start
        assert e.fd.resident_buffer is None and e.resident_buffer is None  # (a buffer with holes is not named)
        assert holes and sum(b - a for a, b in holes) > 0.5 * sum(e.stream.plan.layer_bytes)
        assert all(_resident_pages(base, a, b) == 0 for a, b in holes)
        a = -(-emb.start // ALIGN_BYTES) * ALIGN_BYTES
        b = emb.end // ALIGN_BYTES * ALIGN_BYTES
        assert _resident_pages(base, a, b) == (b - a) // ALIGN_BYTES
    finally:
        e.close()


def test_auto_streams_only_below_the_resident_share(dirs):
    """Auto: no layer streamed when the budget holds everything; below the resident weights' share (where the
    engine used to refuse) layers are streamed and it runs within its budget, giving the same tokens."""
    path = dirs["float32"]
    e, ref = _run(path, staging_rows=16)
    assert e.stream is None and ref.config["streamed_layers"] == []
    fd = open_flash_dir(path)
    # (this tiny model's resident file is 28% of its bytes, the minimum 0.373 of them; streaming, 0.279)
    frac = 0.33
    with pytest.raises(BudgetError):
        _engine(path, stream_layers=0, budget=frac, staging_rows=16)
    e, out = _run(path, budget=frac, staging_rows=16)
    assert e.stream is not None and out.tokens == ref.tokens
    assert out.dram_bytes <= frac * fd.model_bytes


def test_stream_errors(dirs, tmp_path):
    with pytest.raises(LLMFlashError, match="sparse modes"):
        _engine(dirs["float32"], mode="dense", stream_layers=2)
    with pytest.raises(LLMFlashError, match="-1 .auto."):
        _engine(dirs["float32"], stream_layers=-3)
    # a corrupt byte where no resident tensor is held is still caught by the checksum
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(dirs["float32"], bad)
    fd = open_flash_dir(bad)
    index = tensor_index(fd.resident_path)
    e = _engine(dirs["float32"], stream_layers=4)
    a, _ = stream_holes(index, e.stream.plan)[0]
    e.close()
    with open(fd.resident_path, "r+b") as f:
        f.seek(a + 5)
        byte = f.read(1)
        f.seek(a + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FlashFileError, match="checksum"):
        _engine(bad, stream_layers=4)


def test_streamed_layers_with_lookahead(dirs):
    """Lookahead's maps read each layer's FFN norm at start: those stay resident, so a streamed run guesses (and
    generates) exactly as one that streams nothing."""
    _, ref = _run(dirs["float32"], lookahead=True, stream_layers=0)
    e, out = _run(dirs["float32"], lookahead=True, stream_layers=4)
    assert e.stream is not None and out.tokens == ref.tokens
    assert [t.loaded_neurons for t in out.per_token] == [t.loaded_neurons for t in ref.per_token]


def test_engines_sharing_a_directory(dirs):
    """Engines on one FlashDir that keeps its resident tensors (the demo's rows): one streaming layers reads its own
    buffer with holes and leaves the kept tensors and the named buffer alone, so a naive engine after it re-reads
    into the full one and generates dense's tokens."""
    fd = open_flash_dir(dirs["float32"])
    fd.keep_resident = True
    _, dense = _run(fd, mode="dense")
    full = fd.resident_buffer
    e, streamed = _run(fd, stream_layers=4)
    assert e.stream is not None and fd.resident_buffer is full
    e, naive = _run(fd, mode="naive")
    assert e.resident_buffer is full and naive.tokens == dense.tokens == streamed.tokens


@pytest.mark.parametrize("kw", [{"cache_form": "compute"}, {"cache_policy": "hot", "hot_calibration_tokens": 8},
                                {"native": False}])
def test_streamed_layers_with_other_engine_options(dirs, kw):
    """Rows dequantized on arrival (a landing buffer), a hot set calibrated at start (a scoring pass through the
    streamed layers), the Python reference path: each gives the same tokens streamed as not."""
    _, ref = _run(dirs["int4"], stream_layers=0, **kw)
    e, out = _run(dirs["int4"], stream_layers=4, **kw)
    assert e.stream is not None and out.tokens == ref.tokens

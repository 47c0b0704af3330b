"""The demo on tiny models: its rows (original, reference, baselines, method, upper bound), the table and the JSON
records, and the CLI's progress lines (no download: the rows are given instead of the aliases' conversions)."""

from __future__ import annotations

import json

import pytest
import torch

from llmflash import demo
from llmflash.cli import main
from llmflash.convert import convert
from llmflash.demo import DemoRow, common_prefix, format_table, run_demo
from llmflash.flashdir import open_flash_dir
from llmflash.predictor import LowRankPredictor, PredictorSet

from tiny import save_tiny, tiny_llama

BUDGET = 1.5  # tiny models: the resident part and the staging buffer are most of the model
SUMMARY_KEYS = ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "predictor_ms", "bytes_read_per_token",
                "reads_per_token", "tokens_per_s")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    save_tiny(tiny_llama(seed=1, relu=False, d_model=128, d_ffn=512), root / "original")
    save_tiny(tiny_llama(seed=0, relu=True, d_model=128, d_ffn=512), root / "sparse")
    orig = convert(str(root / "original"), root / "original-flash", progress=False, calibration_tokens=0)
    sparse = convert(str(root / "sparse"), root / "sparse-flash", progress=False, calibration_tokens=0)
    lay = open_flash_dir(sparse).layout
    torch.manual_seed(0)
    mods = [LowRankPredictor(lay.d_model, lay.d_ffn, 8) for _ in range(lay.n_layers)]
    meta = {"d_model": lay.d_model, "d_ffn": lay.d_ffn, "model": open_flash_dir(sparse).name, "rule": {"kind": "relu"}}
    PredictorSet.from_modules(mods, [-1e9] * lay.n_layers, meta).save(root / "pred")  # predicts every neuron
    kw = {"model": "sparse", "flash_dir": sparse, "sparsity": "relu"}
    return [
        DemoRow("dense", "original", orig, "auto", 1.0, "original"),
        DemoRow("dense", **kw, dram_budget=1.0, role="reference"),
        DemoRow("naive", **kw, dram_budget=BUDGET, role="baseline"),
        DemoRow("hybrid", **kw, dram_budget=BUDGET, role="baseline"),
        DemoRow("predictor", **kw, dram_budget=BUDGET, role="method", predictors=str(root / "pred")),
        DemoRow("oracle", **kw, dram_budget=BUDGET, role="upper bound"),
    ]


def test_rows_table_and_records(rows):
    lines = []
    res = run_demo(max_new_tokens=6, prompt="Hello world", dram_budget=BUDGET, rows=rows, progress=lines.append)
    assert len(lines) == 2 * len(rows) and lines[0].startswith("[1/6] dense on original")
    recs = res["rows"]
    assert [r["mode"] for r in recs] == ["dense", "dense", "naive", "hybrid", "predictor", "oracle"]
    assert [r["model"] for r in recs] == ["original"] + ["sparse"] * 5
    assert res["model"] == "sparse" and res["original"] == "original"
    for r in recs:
        for k in SUMMARY_KEYS:
            assert k in r, k
        assert r["io_threads"] >= 1 and r["compute_threads"] >= 1 and isinstance(r["busy"], bool)
        assert len(r["tokens"]) == 6
    # the same model dense, naive, hybrid and the oracle compute the same function (relu: exact zeros)
    by_mode = {r["mode"]: r for r in recs[1:]}
    for mode in ("naive", "oracle"):
        assert by_mode[mode]["same_tokens_as_reference"], mode
        assert by_mode[mode]["tokens_as_reference"] == 6
    assert recs[0]["dram_holds"] == "all weights" and recs[1]["dram_holds"] == "all weights"
    assert by_mode["naive"]["dram_holds"] == "embeddings+attention"
    assert "FFN layers" in by_mode["hybrid"]["dram_holds"]
    assert "predictors" in by_mode["predictor"]["dram_holds"] and "window 5" in by_mode["predictor"]["dram_holds"]
    assert "outside the budget" in by_mode["oracle"]["dram_holds"]
    assert by_mode["naive"]["speedup_vs_naive"] == 1.0
    table = format_table(res)
    for word in ("upper bound", "original", "reference", "baseline", "method", "same text as sparse dense",
                 "original dense (the original model)"):
        assert word in table, word
    assert ("was busy" in table) == any(r["busy"] for r in recs)
    busy = dict(res, rows=[dict(r, busy=(r["mode"] == "predictor"), load_cores=1.0) for r in recs])
    table = format_table(busy)
    assert "predictor*" in table and "the machine was busy" in table and "1.0 of" in table
    tagged = dict(res, rows=[dict(r, tag="low-bit", busy=False) if r["mode"] == "predictor" else r for r in recs])
    table = format_table(tagged)  # a row told from another of its mode by its predictors' kind
    assert "predictor (low-bit)" in table and "predictor low-bit on sparse:" in table


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2]) == 2
    assert common_prefix([], [1]) == 0


def test_cli_demo_prints_progress_and_writes_one_record_per_row(rows, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "demo_rows", lambda model, budget, progress=None, resident_dtype="int8": rows)
    out = tmp_path / "demo.json"
    assert main(["demo", "--max-new-tokens", "4", "--dram-budget", "0.5", "--json", str(out)]) == 0
    cap = capsys.readouterr()
    progress = [line for line in cap.err.splitlines() if line.startswith("llmflash demo: [")]
    assert len(progress) == 2 * len(rows)
    assert "ms/token" in cap.out and "upper bound" in cap.out
    d = json.loads(out.read_text())
    assert [r["mode"] for r in d["rows"]] == ["dense", "dense", "naive", "hybrid", "predictor", "oracle"]
    assert all({"mode", "model", "ms_per_token", "busy", "io_threads"} <= set(r) for r in d["rows"])


def test_int8_resident_rows_equal_their_dense_reference(tmp_path):
    """The demo's sparse directory holds its resident weights in int8: naive, hybrid and the oracle still produce the
    reference's tokens (the int8 weights are multiplied in float32 at decode), and the table says what it runs."""
    save_tiny(tiny_llama(seed=0, relu=True, d_model=128, d_ffn=512), tmp_path / "sparse")
    path = convert(str(tmp_path / "sparse"), tmp_path / "r8", progress=False, calibration_tokens=0,
                   resident_dtype="int8")
    kw = {"model": "sparse", "flash_dir": path, "sparsity": "relu"}
    rows = [DemoRow("dense", **kw, dram_budget=1.0, role="reference"),
            DemoRow("naive", **kw, dram_budget=BUDGET, role="baseline"),
            DemoRow("hybrid", **kw, dram_budget=BUDGET, role="baseline"),
            DemoRow("oracle", **kw, dram_budget=BUDGET, role="upper bound"),
            DemoRow("oracle", **kw, dram_budget=BUDGET, role="upper bound", tag="lfu", cache_policy="lfu")]
    res = run_demo(max_new_tokens=8, prompt="Hello world", dram_budget=BUDGET, rows=rows)
    assert res["resident_dtype"] == "int8" and "resident weights in int8" in format_table(res)
    assert all(r["same_tokens_as_reference"] for r in res["rows"])
    assert res["rows"][-1]["cache_policy"] == "lfu" and "neuron cache (lfu)" in res["rows"][-1]["dram_holds"]
    assert "neuron cache (window 5)" in res["rows"][-2]["dram_holds"]


def test_cli_demo_passes_the_resident_dtype(rows, monkeypatch, capsys):
    seen = []
    real_rows = demo.demo_rows

    def fake_rows(model, budget, progress=None, resident_dtype="int8"):
        seen.append(resident_dtype)
        return rows

    monkeypatch.setattr(demo, "demo_rows", fake_rows)
    assert main(["demo", "--max-new-tokens", "3", "--resident-dtype", "auto"]) == 0
    assert main(["demo", "--max-new-tokens", "3"]) == 0
    assert seen == ["auto", "int8"]
    with pytest.raises(demo.LLMFlashError, match="int8, int4 or auto"):
        real_rows("smollm2-relu", 0.5, resident_dtype="int2")
    capsys.readouterr()


def _minimum(path, **kw) -> float:
    """The smallest --dram-budget the oracle accepts on ``path`` (from the engine's refusal)."""
    import re

    from llmflash.engine import Engine, EngineConfig
    from llmflash.errors import BudgetError

    with pytest.raises(BudgetError) as err:
        Engine(path, EngineConfig(mode="oracle", dram_budget=1e-4, **kw))
    return float(re.search(r"below the minimum ([0-9.]+)", str(err.value)).group(1))


def test_half_budget_row_streams_attention_or_is_dropped(tmp_path):
    """The half-budget row: below the resident weights' share the engine streams layers' attention and the row says
    so; below even that minimum the optional row is dropped with a progress line, the demo goes on."""
    save_tiny(tiny_llama(seed=0, relu=True, layers=5, d_model=128, d_ffn=384), tmp_path / "sparse")
    kw = {"model": "sparse", "flash_dir": convert(str(tmp_path / "sparse"), tmp_path / "f", progress=False,
                                                  calibration_tokens=0), "sparsity": "relu"}
    resident, streamed = _minimum(kw["flash_dir"], stream_layers=0), _minimum(kw["flash_dir"])
    assert streamed < resident
    low = (resident + streamed) / 2  # the engine streams, or it cannot run
    lines: list[str] = []
    demo_rows = [DemoRow("dense", **kw, dram_budget=1.0, role="reference"),
                 DemoRow("naive", **kw, dram_budget=BUDGET, role="baseline"),
                 DemoRow("oracle", **kw, dram_budget=low, role="method", tag="half budget", optional=True),
                 DemoRow("oracle", **kw, dram_budget=1e-3, role="method", tag="too small", optional=True)]
    res = run_demo(max_new_tokens=6, prompt="Hello world", dram_budget=BUDGET, rows=demo_rows, progress=lines.append)
    assert [r["tag"] for r in res["rows"]] == ["", "", "half budget"]
    assert "of 5 layers' attention read per token)" in res["rows"][-1]["dram_holds"]
    assert res["rows"][-1]["same_tokens_as_reference"]
    assert any("too small on sparse: skipped (--dram-budget" in ln for ln in lines), lines
    assert "half budget" in format_table(res)

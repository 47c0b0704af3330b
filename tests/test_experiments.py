"""The experiment glue (experiments/common.py, memlimit.py, coactivation helpers) and ``llmflash reproduce`` (fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmflash import metrics
from llmflash.cli import build_parser, main
from llmflash.convert import convert
from llmflash.engine import EngineConfig

from tiny import save_tiny, tiny_llama

EXP = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXP))

import memlimit  # noqa: E402

import engine_runs  # noqa: E402


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    save_tiny(tiny_llama(relu=True, d_model=64, d_ffn=256), root / "m")
    return convert(str(root / "m"), root / "flash", progress=False, calibration_tokens=0)


def test_bandwidth_interpolation_and_computed_io():
    table = [(4096, 0.3), (16384, 0.8), (65536, 1.2)]
    assert metrics.profiled_gbps(table, 4096) == 0.3 and metrics.profiled_gbps(table, 1 << 20) == 1.2
    assert abs(metrics.profiled_gbps(table, 8192) - 0.55) < 1e-9  # halfway in log2
    ms = metrics.profiled_read_ms({16384: 1000, 65536: 10}, table)
    assert abs(ms - (16384 * 1000 / 0.8e9 + 65536 * 10 / 1.2e9) * 1e3) < 1e-9


def test_run_records_every_read_and_shares_within_a_session(flash, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFLASH_SESSION", "test")
    table = [(4096, 0.5), (1 << 20, 1.0)]
    cfg = EngineConfig(mode="oracle", dram_budget=8.0)
    r = engine_runs.run(flash, cfg, 6, prompt=torch.tensor([5, 17, 99, 3]), warmup=1, table=table, no_reuse=True)
    s = r["summary"]
    assert s["tokens_measured"] == 4 and s["warmup_tokens"] == 1
    hist = {int(k): v for k, v in s["read_size_histogram"].items()}
    assert sum(k * v for k, v in hist.items()) == s["bytes_read_per_token"] * 4  # the recorder saw every byte
    assert sum(hist.values()) == s["reads_per_token"] * 4
    assert s["computed_io_ms"] > 0 and 0 < s["read_efficiency"]
    assert abs(s["read_efficiency"] - s["read_gbps"] / s["computed_gbps"]) < 1e-9  # one definition (llmflash.metrics)
    assert s["io_wait_gbps"] >= s["read_gbps"] * 0.999  # waiting is at most the reads' time in flight
    assert all(0 <= t["queue_ms"] <= t["io_ms"] for t in r["per_token"])  # handing reads over is part of I/O
    assert sum(t["queue_ms"] for t in r["per_token"]) > 0
    again = engine_runs.run(flash, cfg, 6, prompt=torch.tensor([5, 17, 99, 3]), warmup=1, table=table, no_reuse=True)
    assert again.get("shared_from") is not None and again["tokens"] == r["tokens"]
    w5 = engine_runs.run(flash, cfg, 6, prompt=torch.tensor([5, 17, 99, 3]), warmup=1, table=table)  # a new key
    assert w5.get("shared_from") is None and w5["tokens"] == r["tokens"]
    assert w5["summary"]["bytes_read_per_token"] <= s["bytes_read_per_token"]  # the window reuses rows


def test_friend_bundling_and_computed_reads():
    import coactivation

    seq = np.zeros((6, 8), bool)
    seq[:, 0] = True  # a hot neuron, everyone's friend
    seq[1, 3] = seq[3, 5] = True
    friend = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    r = coactivation.friend_bundling([seq], friend, window=2)
    assert r["plain_per_token"] == pytest.approx(3 / 6) and r["records_per_token"] == pytest.approx(3 / 6)
    reads = coactivation.computed_reads([seq], np.arange(8), 4096, 0, None)
    assert reads["reads_per_token"] == pytest.approx(8 / 6)
    order = np.array([3, 0, 5, 1, 2, 4, 6, 7])  # 3 and 5 on either side of 0: merged reads
    assert coactivation.computed_reads([seq], order, 4096, 0, None)["reads_per_token"] == pytest.approx(1.0)


@pytest.mark.skipif(memlimit.available() is not None, reason="needs root and cgroup v1 memory")
def test_cgroup_limit_is_enforced():
    code = "import sys; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); print('RESULT {}')"
    small = memlimit.run_limited([sys.executable, "-c", code], 100 << 20, "test-small", timeout_s=60)
    assert not small["completed"] and (small["oom_kills"] > 0 or small["returncode"] != 0)
    big = memlimit.run_limited([sys.executable, "-c", code], 1 << 30, "test-big", timeout_s=60)
    assert big["completed"] and big["max_usage_bytes"] >= 300 << 20
    assert not any(p.name.startswith("llmflash-test") for p in memlimit.CG_ROOT.iterdir())  # removed


def test_reproduce_command(capsys):
    parser = build_parser()
    args = parser.parse_args(["reproduce", "--quick", "--only", "profile_io"])
    assert args.quick and args.only == "profile_io"
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "--help"])
    assert "full settings" in capsys.readouterr().out
    assert main(["reproduce", "--only", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    from research.reproduce import NAMES

    assert "engine_options" in NAMES
    for name in NAMES:  # every experiment reproduce knows has its script
        assert (EXP / f"{name}.py").is_file()


def test_figures_replot_from_the_committed_data(tmp_path):
    """dram_budget and window_usage redraw from their saved data; the dotted minimum is the one the engine stated."""
    import shutil

    import dram_budget
    import window_usage

    root = EXP.parent
    shutil.copy(root / "results" / "dram_budget" / "dram_budget.csv", tmp_path)
    rows = dram_budget.read_rows(tmp_path / "dram_budget.csv")
    refused = [r for r in rows if "error" in r]
    assert refused and all(r["minimum"] > r["budget"] for r in refused)
    assert dram_budget.minimum_of("... is below the minimum 0.429 (220.0 MiB ...)") == 0.429
    dram_budget.plot(rows, tmp_path / "dram_budget.png")
    curves = json.loads((root / "results" / "window_usage" / "window_usage.json").read_text())
    window_usage.plot(curves, tmp_path / "window_usage.png")
    assert (tmp_path / "dram_budget.png").stat().st_size > 0 and (tmp_path / "window_usage.png").stat().st_size > 0


def test_cache_policies_experiment_on_a_tiny_model(flash, tmp_path, monkeypatch):
    import cache_policies

    out = tmp_path / "cp"
    monkeypatch.setattr(sys, "argv", ["experiments/cache_policies.py", "--flash-dir", str(flash), "--budget", "2.0",
                                      "--repeats", "2", "--tokens", "6", "--window", "2", "--out", str(out)])
    cache_policies.main()
    data = json.loads((out / "cache_policies.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert set(rows) == {"window", "lru", "hot", "lfu"} and all(r["same_tokens_as_window"] for r in rows.values())
    assert len({r["dram_bytes"] for r in rows.values()}) == 1  # equal DRAM
    assert all(0 <= r["cache_hit_rate"] <= 1 for r in rows.values())
    assert (out / "cache_policies.csv").is_file() and (out / "cache_policies.png").is_file()


def test_belady_replay_is_the_bound_of_every_policy():
    import cache_replay

    from llmflash.layout import FlashLayout

    assert cache_replay.belady([np.array([1]), np.array([2]), np.array([1])], 1) == 2  # 2 bypasses: 1 is needed next
    lay = FlashLayout.build(1, 16, 64, True, "float32", True)
    rng = np.random.default_rng(1)
    sets = [np.unique(rng.choice(64, size=int(rng.integers(3, 15)), replace=False)) for _ in range(40)]
    best = cache_replay.belady(sets, 12)
    for pol in ("window", "lru", "lfu"):
        assert best <= cache_replay.replay(sets, pol, 12, 3, lay)


def test_sampled_profile_tables_leave_out_the_prompt_and_other_threads(tmp_path, monkeypatch):
    import sampled

    from llmflash.errors import LLMFlashError
    from llmflash.metrics import TokenStats

    gen = "thread (7): MainThread;<module> (run.py:1);Engine.generate (llmflash/engine.py:10)"
    raw = tmp_path / "s.raw"
    raw.write_text("\n".join([
        f"{gen};Engine._prefill (llmflash/engine.py:20);f (llmflash/a.py:3) 50",  # the prompt: left out
        f"{gen};Engine._forward (llmflash/engine.py:30);g (llmflash/b.py:4) 30",
        f"{gen};Engine._forward (llmflash/engine.py:30);h (torch/x.py:5) 10",
        "thread (8): Reader;run (threading.py:1) 100",  # not under generate
    ]) + "\n")
    # two tokens' steps, 18 ms each counted and 2 excluded: 20 ms of wall time per token over 40 samples
    text = sampled.summarize(raw, [TokenStats(total_ms=18.0, io_ms=8.0, excluded_ms=2.0)] * 2)
    assert "40 samples of 2 tokens' steps" in text and "wall 20.0 ms" in text
    rows = {parts[3]: parts for parts in (line.split(None, 3) for line in text.splitlines() if line.startswith(" "))}
    assert rows["g (llmflash/b.py)"][2] == "15.00" and rows["g (llmflash/b.py:4)"][0] == "30"
    assert rows["h (torch/x.py:5)"][2] == "5.00"  # a leaf outside our code
    assert not any(k.startswith(("f (", "run (")) for k in rows)
    monkeypatch.setattr(sampled.shutil, "which", lambda name: None)
    with pytest.raises(LLMFlashError, match="py-spy"):
        with sampled.pyspy(tmp_path / "x.raw"):
            pass

"""The engine's thread choice: a pure function of the cores it may use and the load other work puts on them."""

from __future__ import annotations

import pytest

from llmflash.threads import (
    BUSY_IO_THREADS_PER_CORE,
    IO_THREADS_PER_CORE,
    MAX_IO_THREADS,
    SPIN_WAIT_US,
    CpuState,
    choose_threads,
    load_from_samples,
    lookahead_pays,
    sense_cpu,
)


def test_quiet_two_cores_sparse_uses_both_for_compute():
    plan = choose_threads(CpuState(2, 0.05), sparse=True, large=False)
    assert plan.compute_threads == 2 and not plan.busy
    assert plan.io_threads == min(MAX_IO_THREADS, 2 * IO_THREADS_PER_CORE)


def test_one_core_busy_elsewhere_leaves_one_compute_thread_and_few_readers():
    plan = choose_threads(CpuState(2, 1.0), sparse=True, large=False)
    assert plan.busy and plan.compute_threads == 1
    assert plan.io_threads == max(2, BUSY_IO_THREADS_PER_CORE)
    quiet = choose_threads(CpuState(2, 0.0), sparse=True, large=False)
    assert plan.io_threads < quiet.io_threads


@pytest.mark.parametrize("load", [2.0, 5.0])
def test_every_core_busy_still_leaves_one_thread_of_each(load):
    plan = choose_threads(CpuState(2, min(load, 2.0)), sparse=True, large=True)
    assert plan.compute_threads == 1 and plan.io_threads >= 2 and plan.busy


def test_small_dense_and_streamed_modes_compute_on_one_thread_large_on_the_free_cores():
    for busy in (0.0, 1.0):
        assert choose_threads(CpuState(8, busy), sparse=False, large=False).compute_threads == 1
    assert choose_threads(CpuState(8, 3.0), sparse=False, large=True).compute_threads == 5


def test_lookahead_is_auto_on_a_quiet_cpu_of_two_cores_with_one_compute_thread():
    assert lookahead_pays(CpuState(2, 0.0), accelerator=False)
    assert not lookahead_pays(CpuState(2, 1.0), accelerator=False)  # busy: not measured
    assert not lookahead_pays(CpuState(8, 0.0), accelerator=False)  # more cores: not measured
    assert not lookahead_pays(CpuState(2, 0.0), accelerator=True)
    assert choose_threads(CpuState(2, 0.0), sparse=True, large=False, lookahead=True).compute_threads == 1
    assert choose_threads(CpuState(2, 0.0), sparse=True, large=True, lookahead=True).compute_threads == 2
    assert choose_threads(CpuState(8, 0.0), sparse=True, large=False, lookahead=True).compute_threads == 8
    assert choose_threads(CpuState(2, 0.0), sparse=True, large=False, lookahead=True,
                          compute_threads=2).compute_threads == 2


def test_many_cores_cap_the_readers():
    assert choose_threads(CpuState(64, 0.0), sparse=True, large=False).io_threads == MAX_IO_THREADS


def test_waits_poll_only_with_cores_to_spare():
    assert choose_threads(CpuState(2, 0.0), sparse=True, large=False).spin_wait_us == 0
    assert choose_threads(CpuState(16, 0.0), sparse=True, large=False).spin_wait_us == SPIN_WAIT_US > 0
    assert choose_threads(CpuState(16, 10.0), sparse=True, large=False).spin_wait_us == 0  # (6 free cores)


def test_explicit_settings_win():
    plan = choose_threads(CpuState(2, 1.5), sparse=True, large=False, io_threads=16, compute_threads=2)
    assert (plan.io_threads, plan.compute_threads, plan.busy) == (16, 2, True)


def test_load_from_proc_stat_samples():
    assert load_from_samples((100, 1000), (150, 1100), cores=2) == pytest.approx(1.0)
    assert load_from_samples((100, 1000), (100, 1000), cores=2) == 0.0  # no time passed
    assert load_from_samples((0, 0), (500, 100), cores=2) == 2.0  # clamped


def test_sense_cpu_sees_this_machine():
    cpu = sense_cpu(sample_ms=10)
    assert cpu.cores >= 1 and 0.0 <= cpu.load_cores <= cpu.cores and 1 <= cpu.free_cores <= cpu.cores


def test_engine_takes_explicit_threads_and_records_its_choice(tmp_path):
    from llmflash.convert import convert
    from llmflash.engine import Engine, EngineConfig

    from tiny import save_tiny, tiny_llama

    save_tiny(tiny_llama(relu=True), tmp_path / "m")
    path = convert(str(tmp_path / "m"), tmp_path / "f", progress=False, calibration_tokens=0)
    e = Engine(path, EngineConfig(mode="oracle", dram_budget=8.0, io_threads=3, compute_threads=1))
    try:
        assert e.reader.n_threads == 3 and e.compute_threads == 1
        ids = e.tokenizer("Hello", return_tensors="pt").input_ids[0]
        cfg = e.generate(ids, 3).config
    finally:
        e.close()
    assert (cfg["io_threads"], cfg["compute_threads"]) == (3, 1)
    assert isinstance(cfg["busy"], bool) and cfg["cores"] >= 1 and 0 <= cfg["load_cores"] <= cfg["cores"]
    assert isinstance(cfg["lookahead"], bool)  # auto (None) is resolved, and the run records what ran

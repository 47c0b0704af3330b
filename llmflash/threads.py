"""How many threads an engine uses, chosen to fit the machine it runs on.

Two kinds: reader threads (``FlashReader``: reads in flight at once) and compute threads (torch's intra-op threads).
Both compete for the cores the process may use (``os.sched_getaffinity``) with whatever else runs there. On a 2-core
machine with one core busy elsewhere, 16 reader threads plus a compute thread per core made the sparse path collapse
(memory management 99 ms and compute 284 ms per token against 13 and 141 alone): every wake-up and every torch
worker had to wait for a core. So the engine counts the free cores at start and sizes both kinds by them. Where the
native reader runs io_uring (the default where the kernel allows it), one thread does all the reads and the reader
thread count only sets a floor under the reads it keeps in flight (``storage.FlashReader``'s ``uring_depth``).

``sense_cpu`` sees the machine (the affinity mask, and /proc/stat sampled over ``SAMPLE_MS``: how many of those cores
other work kept busy); ``choose_threads`` is a pure function of what was seen, the mode and explicit settings
(which always win).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

SAMPLE_MS = 100  # how long /proc/stat is watched at start
BUSY_LOAD_CORES = 0.5  # other work keeping at least half a core busy: the machine is "busy"
MAX_IO_THREADS = 16  # small reads want many in flight (results/profile_io: 8 KiB reads 3x faster with 16 than 1)
IO_THREADS_PER_CORE = 8  # a quiet machine: 16 on 2 cores, the count the engine always used before
# a busy machine: each woken reader first waits for a core. With both cores kept busy elsewhere (one noisy session,
# alternating runs of predictor mode on smollm2-relu) 4 readers and 1 compute thread did at least as well as 2 or 8
# readers, and several times better than the old 16 readers with 2 compute threads (to be re-measured when quiet)
BUSY_IO_THREADS_PER_CORE = 4
# lookahead (``EngineConfig.lookahead``) on by default on a quiet CPU of at most this many cores, with one compute
# thread: the reads in flight then keep the second core. On the 2-core machine, predictor mode on smollm2-relu at half
# the model: 0.91-0.93x the time without it in three runs of five alternating repeats (results/engine_options/reads,
# results/relufy/reruns_c5/engine_options and engine_options_coact, lookahead_one_thread arm), while lookahead with two
# compute threads was 1.08x. Not measured on more cores, nor on a busy machine: off there
AUTO_LOOKAHEAD_MAX_CORES = 2
# a machine with at least this many free cores: a wait for reads polls (yielding its core) for up to SPIN_WAIT_US
# before it sleeps, so the last read's thread does not have to wake it (on the GPU machine's 16-core host the wake-up
# took 3.5 ms per token of the scale model, ~110 us per layer: results/gpu_scale/run_22nd, ``wait_extra_ms``); on
# fewer cores the poll would take a core from the readers and the compute
SPIN_MIN_FREE_CORES = 8
SPIN_WAIT_US = 20_000


@dataclass(frozen=True)
class CpuState:
    """The cores a process may use and how busy other work kept them when it was sampled."""

    cores: int  # os.sched_getaffinity(0)
    load_cores: float  # busy cores' worth of other work over the sample (0 .. cores); 0 when it could not be sampled

    @property
    def free_cores(self) -> int:
        """Whole cores left for this process (at least one)."""
        return max(1, min(self.cores, round(self.cores - self.load_cores)))

    @property
    def busy(self) -> bool:
        return self.load_cores >= BUSY_LOAD_CORES


@dataclass(frozen=True)
class ThreadPlan:
    io_threads: int
    compute_threads: int
    cores: int
    load_cores: float
    busy: bool
    spin_wait_us: int = 0  # a wait for reads polls this long before it sleeps (``SPIN_WAIT_US``)

    def to_json(self) -> dict:
        return asdict(self)


def lookahead_pays(cpu: CpuState, *, accelerator: bool) -> bool:
    """Whether ``EngineConfig.lookahead``'s auto setting turns it on: on a quiet CPU of at most
    ``AUTO_LOOKAHEAD_MAX_CORES`` cores (the case measured; an accelerator's engine keeps it off unless asked)."""
    return not accelerator and cpu.cores <= AUTO_LOOKAHEAD_MAX_CORES and not cpu.busy


def choose_threads(cpu: CpuState, *, sparse: bool, large: bool, io_threads: int = 0,
                   compute_threads: int = 0, lookahead: bool = False) -> ThreadPlan:
    """Reader and compute threads for an engine; ``io_threads`` / ``compute_threads`` > 0 are taken as given.

    Compute: every free core in the sparse modes and for large models (``large``: GBs of matvecs per token), except
    with ``lookahead`` on a small model and at most ``AUTO_LOOKAHEAD_MAX_CORES`` free cores: one, so that the reads in
    flight keep the other core; one thread for small models in dense, naive and hybrid, whose whole-layer reads keep
    another core busy (results/engine_options, results/latency). Readers: ``IO_THREADS_PER_CORE`` per free core on a
    quiet machine (``BUSY_IO_THREADS_PER_CORE`` on a busy one), at least 2 and at most ``MAX_IO_THREADS``.
    """
    free = cpu.free_cores
    if compute_threads <= 0:
        if sparse and lookahead and not large and free <= AUTO_LOOKAHEAD_MAX_CORES:
            compute_threads = 1
        else:
            compute_threads = free if (sparse or large) else 1
    if io_threads <= 0:
        per_core = BUSY_IO_THREADS_PER_CORE if cpu.busy else IO_THREADS_PER_CORE
        io_threads = max(2, min(MAX_IO_THREADS, per_core * free))
    spin = SPIN_WAIT_US if free >= SPIN_MIN_FREE_CORES else 0
    return ThreadPlan(io_threads, compute_threads, cpu.cores, round(cpu.load_cores, 2), cpu.busy, spin)


def allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> Optional[tuple[float, float]]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where it cannot be read."""
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    seen = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if not parts or parts[0] not in want:
                    continue
                vals = [float(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
                idle = vals[3] + vals[4]
                total += sum(vals)
                busy += sum(vals) - idle
                seen += 1
    except (OSError, ValueError):
        return None
    return (busy, total) if seen else None


def load_from_samples(before: tuple[float, float], after: tuple[float, float], cores: int) -> float:
    """Busy cores' worth of work between two (busy, total) /proc/stat samples of ``cores`` cores."""
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    if d_total <= 0:
        return 0.0
    return max(0.0, min(float(cores), cores * d_busy / d_total))


def sense_cpu(sample_ms: float = SAMPLE_MS) -> CpuState:
    """The cores this process may use and the load other work puts on them now (this process sleeps meanwhile, so
    what is busy is someone else). Where /proc/stat is missing, the 1-minute load average stands in."""
    cpus = allowed_cpus()
    cores = len(cpus)
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(sample_ms / 1e3)
        after = _cpu_times(cpus)
        if after is not None:
            return CpuState(cores, load_from_samples(before, after, cores))
    try:
        return CpuState(cores, min(float(cores), os.getloadavg()[0]))
    except OSError:
        return CpuState(cores, 0.0)

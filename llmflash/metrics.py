"""What a generation run measured: one record per generated token (``TokenStats``), filled while the token is
computed (the FFN modules add their I/O, memory and predictor time to it) and completed at its end; and the run's
result (``GenerationResult``) with its summary.

Times are milliseconds; ``total_ms`` is the token's wall time less ``excluded_ms`` (the oracle's cost of finding the
true set, a trace's replay), and ``compute_ms`` is what remains of it after I/O waits and memory management.

One definition per metric (every summary, experiment and report uses these functions; GB = 1e9 bytes):

- ``read_gbps`` (GB/s): bytes read / the time the reads were in flight (``read_ms``: submit to completion, which
  may overlap compute). The storage throughput the engine achieved; ``read_gbps(bytes, read_ms)``.
- ``io_wait_gbps`` (GB/s): bytes read / the token's I/O time (``io_ms``: handing the reads over and waiting for them).
  What a token sees; higher than ``read_gbps`` when reads overlap compute (lookahead). ``io_wait_gbps(bytes, io_ms)``.
- ``profiled_gbps`` (GB/s): the machine's throughput at a read size, measured by ``profile-io`` and interpolated in
  log2(size) (``profiled_gbps(table, nbytes)``); for a mix of sizes, bytes / ``profiled_read_ms(histogram, table)``
  (the time every read would take at the profiled throughput for its size; the experiments' ``computed_io_ms``, and
  ``computed_gbps`` = bytes / that time).
- ``read_efficiency`` (ratio): ``read_gbps`` / ``profiled_gbps`` at the same read sizes
  (``read_efficiency(read_gbps, profiled_gbps)``), i.e. profiled read time / measured read time. In [0, 1] up to the
  noise of the profile (a shared disk drifts; values a little above 1 mean the profile ran on a slower moment).
  Before issue 14 the experiments divided by the I/O *wait* time instead, which gave 1.86-2.53 with overlapped reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .report import median

BandwidthTable = Sequence[tuple[int, float]]  # (read size in bytes, GB/s), ascending sizes: profile-io's rows


def read_gbps(nbytes: float, read_ms: float) -> float:
    """GB/s: bytes read / the time the reads were in flight (submit to completion). 0 when nothing was timed."""
    return nbytes / (read_ms / 1e3) / 1e9 if read_ms > 0 else 0.0


def io_wait_gbps(nbytes: float, io_ms: float) -> float:
    """GB/s: bytes read / the time spent handing them over and waiting for them (``io_ms``). 0 when none was spent."""
    return nbytes / (io_ms / 1e3) / 1e9 if io_ms > 0 else 0.0


def profiled_gbps(table: BandwidthTable, nbytes: float) -> float:
    """GB/s that profile-io measured at a read size: interpolated in log2(size) between profiled sizes, flat outside."""
    xs = np.log2([c for c, _ in table])
    ys = [g for _, g in table]
    return float(np.interp(math.log2(max(nbytes, 1)), xs, ys))


def profiled_read_ms(histogram: Mapping[int, int], table: BandwidthTable) -> float:
    """Milliseconds the reads {size in bytes: count} take at the profiled throughput for each size:
    sum(size * count / profiled_gbps(size)). NaN without a table."""
    if not table:
        return float("nan")
    return sum(size * count / (profiled_gbps(table, size) * 1e9) for size, count in histogram.items()) * 1e3


def read_efficiency(achieved_gbps: float, reference_gbps: float) -> float:
    """``read_gbps`` / ``profiled_gbps`` at the same read sizes (profiled time / measured read time). NaN when either
    is missing."""
    if not reference_gbps or not achieved_gbps or math.isnan(reference_gbps):
        return float("nan")
    return achieved_gbps / reference_gbps


@dataclass
class TokenStats:
    io_ms: float = 0.0  # waiting for reads, and handing them to the kernel (``queue_ms``)
    mem_ms: float = 0.0  # the neuron caches' bookkeeping, planning the reads, copies between host and device rows
    compute_ms: float = 0.0
    total_ms: float = 0.0
    queue_ms: float = 0.0  # part of io_ms: the engine's time in the reader's submit calls (``ReadTicket.queue_ms``)
    bytes_read: int = 0
    reads: int = 0
    excluded_ms: float = 0.0  # oracle's cost of finding the true set (not counted: docs/cli.md); a trace's replay
    predictor_ms: float = 0.0  # part of compute_ms
    wait_extra_ms: float = 0.0  # part of compute_ms: waits for reads that outlasted their time in flight (wake-ups)
    read_ms: float = 0.0  # time the reads were in flight (submit to completion; overlaps compute): read_gbps' divisor
    loaded_neurons: int = 0  # rows read into the neuron caches (misses that fit, preloaded hot rows, lookahead guesses)
    cached_neurons: int = 0
    # neuron-cache lookups, summed over layers (sparse modes): per layer and token hits + misses = the needed set
    cache_hits: int = 0  # needed neurons already cached
    cache_misses: int = 0  # needed neurons not cached, so read from flash (into the cache, or the staging buffer)
    cache_evictions: int = 0  # cached rows freed (expired by the cache policy or dropped to make room)

    @property
    def read_time_ms(self) -> float:
        """``read_ms``, or ``io_ms`` for a record that did not time its reads (kept by older JSON)."""
        return self.read_ms or self.io_ms

    def finish(self, total_ms: float, bytes_read: int, reads: int, cached_neurons: int) -> None:
        """Complete the record at the end of its token (the rest was added while it was computed)."""
        self.total_ms = total_ms
        self.compute_ms = total_ms - self.io_ms - self.mem_ms
        self.bytes_read = bytes_read
        self.reads = reads
        self.cached_neurons = cached_neurons


@dataclass
class GenerationResult:
    mode: str
    model: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    dram_bytes: int
    model_bytes: int
    prefill_ms: float
    per_token: list[TokenStats] = field(default_factory=list)
    dram_breakdown: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        pt = self.per_token
        if not pt:
            return {}
        n_bytes = sum(t.bytes_read for t in pt)
        n_reads = sum(t.reads for t in pt)
        read_ms = sum(t.read_time_ms for t in pt)
        io_ms = sum(t.io_ms for t in pt)
        hits, misses = sum(t.cache_hits for t in pt), sum(t.cache_misses for t in pt)
        return {
            "ms_per_token": median([t.total_ms for t in pt]),
            "mean_ms_per_token": sum(t.total_ms for t in pt) / len(pt),
            "io_ms": median([t.io_ms for t in pt]),
            "mem_ms": median([t.mem_ms for t in pt]),
            "compute_ms": median([t.compute_ms for t in pt]),
            "predictor_ms": median([t.predictor_ms for t in pt]),
            "wait_extra_ms": median([t.wait_extra_ms for t in pt]),
            "queue_ms": median([t.queue_ms for t in pt]),
            "bytes_read_per_token": n_bytes / len(pt),
            "reads_per_token": n_reads / len(pt),
            "mean_read_bytes": n_bytes / n_reads if n_reads else 0.0,
            "read_gbps": read_gbps(n_bytes, read_ms),
            "io_wait_gbps": io_wait_gbps(n_bytes, io_ms),
            "tokens_per_s": 1e3 * len(pt) / sum(t.total_ms for t in pt),
            "loaded_neurons_per_token": sum(t.loaded_neurons for t in pt) / len(pt),
            "cache_hits_per_token": hits / len(pt),
            "cache_misses_per_token": misses / len(pt),
            "cache_evictions_per_token": sum(t.cache_evictions for t in pt) / len(pt),
            "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,  # hits / needed neurons
        }

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "model": self.model, "tokens": self.tokens, "text": self.text,
            "prompt_tokens": self.prompt_tokens, "dram_bytes": self.dram_bytes, "model_bytes": self.model_bytes,
            "dram_fraction": self.dram_bytes / self.model_bytes, "dram_breakdown": self.dram_breakdown,
            "prefill_ms": self.prefill_ms, "summary": self.summary(), "per_token": [asdict(t) for t in self.per_token],
            "config": self.config,
        }

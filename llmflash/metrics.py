"""What a generation run measured: one record per generated token (``TokenStats``), filled while the token is
computed (the FFN modules add their I/O, memory and predictor time to it) and completed at its end; and the run's
result (``GenerationResult``) with its summary.

Times are milliseconds; ``total_ms`` is the token's wall time less ``excluded_ms`` (the oracle's cost of finding the
true set, a trace's replay), and ``compute_ms`` is what remains of it after I/O waits and memory management.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .report import median


@dataclass
class TokenStats:
    io_ms: float = 0.0
    mem_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    bytes_read: int = 0
    reads: int = 0
    excluded_ms: float = 0.0  # oracle's cost of finding the true set (not counted: docs/cli.md); a trace's replay
    predictor_ms: float = 0.0  # part of compute_ms
    read_ms: float = 0.0  # time the reads took (submit to completion; overlaps compute): the throughput's divisor
    loaded_neurons: int = 0  # rows read into the neuron caches (misses that fit, preloaded hot rows, lookahead guesses)
    cached_neurons: int = 0
    # neuron-cache lookups, summed over layers (sparse modes): per layer and token hits + misses = the needed set
    cache_hits: int = 0  # needed neurons already cached
    cache_misses: int = 0  # needed neurons not cached, so read from flash (into the cache, or the staging buffer)
    cache_evictions: int = 0  # cached rows freed (expired by the cache policy or dropped to make room)

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
        read_s = sum(t.read_ms or t.io_ms for t in pt) / 1e3
        hits, misses = sum(t.cache_hits for t in pt), sum(t.cache_misses for t in pt)
        return {
            "ms_per_token": median([t.total_ms for t in pt]),
            "mean_ms_per_token": sum(t.total_ms for t in pt) / len(pt),
            "io_ms": median([t.io_ms for t in pt]),
            "mem_ms": median([t.mem_ms for t in pt]),
            "compute_ms": median([t.compute_ms for t in pt]),
            "predictor_ms": median([t.predictor_ms for t in pt]),
            "bytes_read_per_token": n_bytes / len(pt),
            "reads_per_token": n_reads / len(pt),
            "mean_read_bytes": n_bytes / n_reads if n_reads else 0.0,
            "read_gbps": n_bytes / read_s / 1e9 if read_s > 0 else 0.0,  # bytes / time the reads took
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

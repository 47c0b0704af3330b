"""Timed engine runs for the experiment scripts: ``run`` (one generation, its reads recorded by an observer and
summarized), the paper's standard rows (``standard_run``), and the bandwidth table that turns recorded reads into
computed I/O time. Model setups and output files: ``common``."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from llmflash import metrics
from llmflash.engine import Engine, EngineConfig, GenerationResult
from llmflash.errors import LLMFlashError
from llmflash.hooks import EngineObserver
from llmflash.paths import cache_dir
from llmflash.report import median, write_json

from common import (
    RESULTS,
    SCALE,
    open_shared,
    prompt_ids,
    real_coact_dir,
    real_unbundled_dir,
    scale_unbundled_dir,
    smoke,
)

# ---------------------------------------------------------------------------------------------------- engine runs


class ReadRecorder(EngineObserver):
    """Counts every read an engine issues by size, per forward pass (prefill, then one per generated token).

    It is called inside the engine's timed memory management (where reads are planned), so it only keeps each list
    of sizes there and counts them when the forward pass is done (until the thirteenth session a ``np.unique`` per
    read list, a hundred per token of the shipped model, was timed as the engine's memory management)."""

    def __init__(self, engine: Optional[Engine] = None) -> None:
        self._lists: list[np.ndarray] = []  # this forward pass's read sizes, as issued
        self.per_forward: list[dict[int, int]] = []
        if engine is not None:
            engine.observe(self)

    def reads_issued(self, source: str, nbytes: np.ndarray) -> None:
        self._lists.append(np.asarray(nbytes, dtype=np.int64))

    def forward_done(self, step: int) -> None:
        counts: dict[int, int] = {}
        if self._lists:
            sizes, n = np.unique(np.concatenate(self._lists), return_counts=True)
            counts = dict(zip(sizes.tolist(), n.tolist()))
        self.per_forward.append(counts)
        self._lists = []


def load_bandwidth(threads: int = 16) -> Optional[list[tuple[int, float]]]:
    """(chunk bytes, GB/s) at ``threads`` parallel reads from results/profile_io (the closest thread count)."""
    path = RESULTS / "profile_io" / "profile.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    ts = sorted({r["threads"] for r in rows}, key=lambda t: (abs(t - threads), -t))
    t = ts[0]
    return sorted((r["chunk_bytes"], r["gbps"]) for r in rows if r["threads"] == t)


def summarize(res: GenerationResult, rec: Optional[ReadRecorder], warmup: int, table=None) -> dict:
    """Per-token figures over generated tokens after ``warmup`` (medians of times, means of bytes and reads).

    Throughputs and the read efficiency follow ``llmflash.metrics`` (one definition each): ``read_gbps`` = bytes /
    read time in flight, ``io_wait_gbps`` = bytes / I/O wait, ``computed_io_ms`` = the reads' time at the profiled
    throughput for their sizes (``profiled_read_ms``), ``computed_gbps`` = bytes / that time, ``read_efficiency`` =
    ``read_gbps`` / ``computed_gbps``."""
    pt = res.per_token[warmup:] or res.per_token
    hists = rec.per_forward[1 + warmup: 1 + warmup + len(pt)] if rec is not None else []
    n = len(pt)
    b = sum(t.bytes_read for t in pt)
    r = sum(t.reads for t in pt)
    io_ms = sum(t.io_ms for t in pt)
    read_ms = sum(t.read_time_ms for t in pt)
    total = {}
    for h in hists:
        for s, c in h.items():
            total[s] = total.get(s, 0) + c
    comp = [metrics.profiled_read_ms(h, table) for h in hists] if table else []
    s = {
        "tokens_measured": n, "warmup_tokens": min(warmup, len(res.per_token)),
        "ms_per_token": median([t.total_ms for t in pt]), "mean_ms_per_token": sum(t.total_ms for t in pt) / n,
        "io_ms": median([t.io_ms for t in pt]), "mem_ms": median([t.mem_ms for t in pt]),
        "compute_ms": median([t.compute_ms for t in pt]), "predictor_ms": median([t.predictor_ms for t in pt]),
        "wait_extra_ms": median([t.wait_extra_ms for t in pt]), "queue_ms": median([t.queue_ms for t in pt]),
        "mean_io_ms": io_ms / n, "mean_read_ms": read_ms / n,
        "bytes_read_per_token": b / n, "reads_per_token": r / n, "mean_read_bytes": b / r if r else 0.0,
        "read_gbps": metrics.read_gbps(b, read_ms), "io_wait_gbps": metrics.io_wait_gbps(b, io_ms),
        "loaded_neurons_per_token": sum(t.loaded_neurons for t in pt) / n,
        "cached_neurons": median([t.cached_neurons for t in pt]),
        "cache_hits_per_token": sum(t.cache_hits for t in pt) / n,
        "cache_misses_per_token": sum(t.cache_misses for t in pt) / n,
        "cache_evictions_per_token": sum(t.cache_evictions for t in pt) / n,
        "cache_hit_rate": (sum(t.cache_hits for t in pt) / max(1, sum(t.cache_hits + t.cache_misses for t in pt))),
        "tokens_per_s": 1e3 / median([t.total_ms for t in pt]),
    }
    if comp:
        s["computed_io_ms"] = float(np.mean(comp))
        s["computed_gbps"] = metrics.read_gbps(b / n, s["computed_io_ms"])
        s["read_efficiency"] = metrics.read_efficiency(s["read_gbps"], s["computed_gbps"])
        s["read_size_histogram"] = {str(k): v for k, v in sorted(total.items())}
    return s


def _session_path(key: dict) -> Optional[Path]:
    session = os.environ.get("LLMFLASH_SESSION")
    if not session:
        return None
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "sessions" / session / f"{h}.json"


def run(flash_dir, cfg: EngineConfig, n_tokens: int, *, prompt: Optional[torch.Tensor] = None,
        provider_factory: Optional[Callable[[], object]] = None, provider_key: Optional[dict] = None,
        no_reuse: bool = False, perm: Optional[list] = None, warmup: int = 0, label: str = "", table=None,
        share: bool = True, profile_to: Optional[Path] = None, sample_to: Optional[Path] = None) -> dict:
    """One timed generation: Engine(flash_dir, cfg, provider) generating ``n_tokens`` greedy tokens.

    ``no_reuse``: each token loads its whole active set (no window reuse: ``EngineConfig.reuse=False``).
    ``perm``: the flash directory's rows are permuted (per layer: row -> original id; recorded in the directory, from
    which the engine maps its predictors' ids itself; the oracle needs nothing: it reads the permuted rows).
    Returns {label, mode, config, summary (see ``summarize``), per_token, dram_bytes, model_bytes, ...}. When
    ``LLMFLASH_SESSION`` is set (``llmflash reproduce``), a run with the same key made earlier in the session by
    another script is reused instead of measured again (marked ``shared_from``).
    ``profile_to``: the generation also runs under torch.profiler and cProfile, whose top tables are written to this
    text file (the times then include the profilers' own overhead: shares, not timings). ``sample_to``: the
    generation runs under py-spy instead (``sampled``: little distortion), its tables written to this text file.
    """
    key = {"dir": str(flash_dir), "cfg": asdict(cfg), "n": n_tokens, "warmup": warmup, "provider": provider_key,
           "prompt": None if prompt is None else prompt.tolist(), "no_reuse": no_reuse,
           "perm": None if perm is None else hashlib.sha256(np.concatenate(perm).tobytes()).hexdigest()[:12]}
    sp = _session_path(key) if share else None
    if sp is not None and sp.is_file():
        out = json.loads(sp.read_text())
        out["label"] = label or out["label"]
        out["shared_from"] = out.get("script")
        return out
    fd = open_shared(flash_dir)
    provider = provider_factory() if provider_factory else None
    cuda = cfg.device.startswith("cuda")
    if cuda:  # the GPU memory this run takes, from a clean slate (what the caching allocator holds counts)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rec = ReadRecorder()
    engine = Engine(fd, replace(cfg, reuse=False) if no_reuse else cfg, provider=provider, observers=[rec])
    try:
        if perm is not None and provider is None and fd.neuron_order is None:
            raise LLMFlashError(f"{flash_dir} records no neuron order: write it with llmflash.reorder.write_permuted_flash_dir")
        if engine.provider is not None:
            engine.provider.reset()
        ids = prompt if prompt is not None else prompt_ids(engine.tokenizer)
        t0 = time.perf_counter()
        if sample_to is not None:
            res = _sampled(functools.partial(engine.generate, ids, n_tokens, stop_at_eos=False), Path(sample_to))
        elif profile_to is None:
            res = engine.generate(ids, n_tokens, stop_at_eos=False)
        else:
            res = _profiled(functools.partial(engine.generate, ids, n_tokens, stop_at_eos=False), Path(profile_to), cuda)
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    extras = {"hybrid_resident_layers": getattr(engine, "hybrid_resident_layers", None),
              "cache_rows": getattr(engine, "cache_rows", None),
              "streamed_layers": res.config.get("streamed_layers", [])}
    if cuda:
        extras.update(gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                      gpu_peak_reserved_bytes=torch.cuda.max_memory_reserved())
    del engine, provider  # the FFN modules point back at the engine: free its GBs of buffers now, not at some
    gc.collect()  # later cyclic collection (several scale-model engines in one process ran out of memory)
    out = {
        "label": label, "mode": cfg.mode, "model": res.model, "flash_dir": str(flash_dir), "config": asdict(cfg),
        "provider": provider_key, "no_reuse": no_reuse, "permuted": perm is not None, "summary": summarize(res, rec, warmup, table),
        "prompt_tokens": res.prompt_tokens,
        "dram_bytes": res.dram_bytes, "model_bytes": res.model_bytes, "dram_fraction": res.dram_bytes / res.model_bytes,
        "dram_breakdown": res.dram_breakdown, "prefill_ms": res.prefill_ms, "wall_s": wall,
        "per_token": [asdict(t) for t in res.per_token], "text": res.text, "tokens": res.tokens,
        "load_average": os.getloadavg(), "script": Path(sys.argv[0]).stem,
        **extras,
    }
    if sp is not None:
        write_json(sp, out)
    return out


def _sampled(fn: Callable[[], GenerationResult], out: Path) -> GenerationResult:
    """``fn()`` under py-spy (``sampled.pyspy``); its tables go to ``out``, the raw stacks beside it."""
    import sampled

    raw = out.with_suffix(".raw")
    with sampled.pyspy(raw):
        res = fn()
    out.write_text(sampled.summarize(raw, res.per_token))
    return res


def _profiled(fn: Callable[[], GenerationResult], out: Path, cuda: bool) -> GenerationResult:
    """``fn()`` under torch.profiler (CPU, and CUDA when used) and cProfile; their top tables go to ``out``."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = cProfile.Profile()
    with profile(activities=activities) as tprof:
        prof.enable()
        res = fn()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    parts = [f"# {len(res.per_token)} tokens; cProfile, by own time\n", text.getvalue()]
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if cuda else ()):
        parts += [f"\n# torch.profiler, by {key}\n", tprof.key_averages().table(sort_by=key, row_limit=40)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts))
    return res


# ----------------------------------------------------------------------------------- the two models' standard runs


def real_cfg(setup: dict, mode: str, **kw) -> EngineConfig:
    return EngineConfig(mode=mode, sparsity=setup["sparsity"], threshold_sparsity=setup.get("threshold_sparsity") or 0.8,
                        predictors=setup["predictors"] if mode == "predictor" else None, **kw)


def trace_provider_factory(kind: str = "predicted", perm=None, seed: int = 0, guess_recall: float = 1.0):
    """A factory of scale-model providers (the trace source), and the key that identifies it. ``guess_recall``: the
    simulated lookahead guess's recall (``research.trace.TraceProvider``; used only with lookahead)."""
    from research.trace import PAPER_FLICKER, PAPER_RHO, PAPER_SIGMA_B, TraceModel, TraceProvider, paper_params

    def make():
        return TraceProvider(TraceModel(paper_params(seed=seed), 16384), kind=kind, perm=perm, guess_recall=guess_recall)

    key = {"trace": "paper_params", "sigma_b": PAPER_SIGMA_B, "rho": PAPER_RHO, "flicker": PAPER_FLICKER, "kind": kind,
           "seed": seed, "guess_recall": guess_recall,
           "perm": None if perm is None else hashlib.sha256(np.concatenate(perm).tobytes()).hexdigest()[:12]}
    return make, key


SCALE_PROMPT = torch.tensor([2])  # one token: no prefill streaming of the 8.6 GB FFN; the first tokens warm the window


def fmt_ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


# ------------------------------------------------------------------------------------ standard rows (shared keys)

ROWS = {
    "dense": "dense (all weights in DRAM)",
    "naive": "naive (whole model from flash per token)",
    "hybrid": "hybrid (half the FFN layers resident, rest streamed)",
    "predictor_noreuse": "hybrid + predictor (each token loads its predicted set)",
    "predictor_w1": "hybrid + predictor, window 1 (reuse of the previous token only)",
    "window_unbundled": "hybrid + predictor + window k=5 (unbundled layout)",
    "ours": "hybrid + predictor + window k=5 + bundling (ours)",
    "ours_coact": "ours + co-activation order (Ripple-style, beyond the paper)",
    "ours_coact_hot": "ours + co-activation order + pinned hot set (PowerInfer-style cache policy, beyond the paper)",
    "ours_lfu": "ours with the LFU cache policy (decayed use counts, admission; beyond the paper)",
    "ours_coact_lfu": "ours + co-activation order + the LFU cache policy (beyond the paper)",
    "ours_lookahead": "ours + lookahead (layer l+1's reads in flight while layer l computes)",
    "ours_masked": "ours, each layer computed over its whole device cache, unneeded rows masked (accelerator)",
    "ours_lookahead_masked": "ours + lookahead, computed over the whole device cache, unneeded rows masked",
    "ours_python": "ours, Python path (no native step or attention, Python reader threads: the reference)",
}


COACT_ROWS = ("ours_coact", "ours_coact_hot", "ours_coact_lfu")  # rows on the file reordered by co-activation
ROW_POLICIES = {"ours_coact_hot": "hot", "ours_lfu": "lfu", "ours_coact_lfu": "lfu"}  # rows with another cache policy


def n_tokens(quick: bool, model: str, row: str) -> tuple[int, int]:
    """(tokens to generate, warm-up tokens excluded from the statistics) for a row. ``LLMFLASH_SMOKE=1`` (the test
    suite's end-to-end tier): a few tokens, to check that a script runs, not what it measures."""
    if smoke():
        return (3, 1) if row not in ("naive", "hybrid", "dense") else (2, 0)
    if model == SCALE:  # ~12 s per naive token, ~6 s hybrid, ~1 s sparse on this VM
        if row in ("naive", "hybrid", "dense"):
            return (2, 0) if quick else (8, 0)
        return (9, 5) if quick else (40, 5)
    if row in ("naive", "hybrid", "dense"):
        return (12, 0) if quick else (64, 0)
    return (24, 2) if quick else (128, 2)


EAGER = "_eager"  # a row's name + this: that row with ``native_attention=False`` (transformers' attention)


def standard_run(setup: dict, row: str, quick: bool, budget: float = 0.5, table=None, n: Optional[int] = None,
                 warmup: Optional[int] = None, window: int = 5, compute_threads: Optional[int] = None,
                 perm=None, flash_dir: Optional[str] = None, label: Optional[str] = None, share: bool = True,
                 device: str = "cpu", io_threads: Optional[int] = None, guess_recall: float = 1.0,
                 native_reader: bool = True, lookahead_depth: int = 1, profile_to: Optional[Path] = None,
                 io_uring: bool = True, sample_to: Optional[Path] = None) -> dict:
    """One of the ``ROWS`` on the real model (``setup`` from ``real_setup``) or the scale model (``scale_setup``).
    ``guess_recall``: ``ours_lookahead`` on the scale model, the simulated guess's recall (``trace_provider_factory``);
    ``lookahead_depth``: ``ours_lookahead``'s depth (``EngineConfig.lookahead_depth``); ``profile_to``, ``sample_to``: see ``run``;
    ``io_uring=False``: the native reader's threads instead (``EngineConfig.io_uring``). A row's name + ``EAGER``: that
    row with transformers' attention instead of the fixed decode step (``EngineConfig.native_attention=False``)."""
    scale = "geometry" in setup
    model = SCALE if scale else "real"
    eager = row.endswith(EAGER)  # the row with transformers' attention instead of the fixed decode step
    row = row[: -len(EAGER)] if eager else row
    if eager:
        label = label or ROWS.get(row, row) + ", transformers' attention"
    n0, w0 = n_tokens(quick, model, row)
    n = n0 if n is None else n
    warmup = w0 if warmup is None else warmup
    extra = {} if compute_threads is None else {"compute_threads": compute_threads}
    if device != "cpu":
        extra["device"] = device
    if io_threads is not None:
        extra["io_threads"] = io_threads
    if row not in ("dense", "naive", "hybrid"):  # the rows keep their meaning whatever the engine's default
        extra["lookahead"] = row.startswith("ours_lookahead")
        if extra["lookahead"] and lookahead_depth != 1:
            extra["lookahead_depth"] = lookahead_depth
    if row not in ("dense", "naive", "hybrid"):  # (explicit: the rows keep their meaning whatever the engine's default)
        extra["masked_compute"] = row.endswith("_masked")
    if not native_reader or row == "ours_python":
        extra["native_reader"] = False
    if not io_uring:
        extra["io_uring"] = False
    if row == "ours_python":
        extra["native"] = extra["native_attention"] = False
    if eager:
        extra["native_attention"] = False
    if row in COACT_ROWS and scale:
        raise ValueError(f"the co-activation order needs real activations: the scale model has no {row} row")
    if row in ROW_POLICIES:
        extra["cache_policy"] = ROW_POLICIES[row]
    directory = flash_dir or (real_coact_dir(setup, quick) if row in COACT_ROWS else setup["flash_dir"]
                              if row not in ("predictor_noreuse", "predictor_w1", "window_unbundled")
                              else (scale_unbundled_dir() if scale else real_unbundled_dir(setup)))
    kw: dict = dict(table=table, warmup=warmup, label=label or ROWS.get(row, row), perm=perm, share=share,
                    profile_to=profile_to, sample_to=sample_to)
    if row in ("dense", "naive", "hybrid"):
        mode, win = row, window
    else:
        mode = "predictor" if scale else setup["sparse_mode"]
        win = 1 if row in ("predictor_noreuse", "predictor_w1") else window
        kw["no_reuse"] = row == "predictor_noreuse"
    if scale:
        cfg = EngineConfig(mode=mode, dram_budget=budget, window=win, **extra)
        if mode == "predictor":
            fac, key = trace_provider_factory("predicted", perm=perm, guess_recall=guess_recall)
            kw.update(provider_factory=fac, provider_key=key, perm=None)
        return run(directory, cfg, n, prompt=SCALE_PROMPT, **kw)
    cfg = real_cfg(setup, mode, dram_budget=budget, window=win, **extra)
    return run(directory, cfg, n, **kw)

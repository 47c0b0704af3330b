"""Glue shared by the experiment scripts: arguments, model setups, timed engine runs, output files.

Every script writes ``results/<name>/``: the data (JSON and/or CSV), the PNG drawn from it, and ``config.json`` (its
arguments, the setups and ``llmflash.report.environment()``). Numbers are labelled in the data:

- measured: wall-clock times and byte counts of real runs (reads bypass the page cache);
- computed: derived from measured quantities (bytes / bandwidth measured by profile-io at that read size);
- simulated: produced by the trace source (the scale model's active sets), or by replaying masks.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llmflash.engine import Engine, EngineConfig, GenerationResult  # noqa: E402
from llmflash.errors import LLMFlashError  # noqa: E402
from llmflash.flashdir import FlashDir, open_flash_dir  # noqa: E402
from llmflash.hooks import EngineObserver  # noqa: E402
from llmflash.paths import cache_dir  # noqa: E402
from llmflash.report import environment, median, write_json  # noqa: E402

RESULTS = REPO / "results"
SCALE = "scale"  # the --model value of the scale model
PROMPT_TEXT_SOURCE = "wiki:eval"
PROMPT_TOKENS = 128  # the paper's prompt length (real models)


# ------------------------------------------------------------------------------------------------------- arguments


def parser(name: str, doc: str, models: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings (part of `llmflash reproduce --quick`)")
    p.add_argument("--out", type=Path, default=RESULTS / name, help=f"output directory (default results/{name})")
    if models:
        p.add_argument("--model", default="auto",
                       help="real model: auto (smollm2-relu when its artifacts exist, else smollm2 with threshold "
                            "sparsity), smollm2 or smollm2-relu")
        p.add_argument("--models", default="real,scale",
                       help="which of the two models to run: real, scale or real,scale (default both)")
    return p


def wanted(args, which: str) -> bool:
    return which in [m.strip() for m in getattr(args, "models", "real").split(",")]


def save(out: Path, name: str, args, data=None, rows: Optional[list[dict]] = None, extra_config: Optional[dict] = None,
         csv_name: Optional[str] = None) -> None:
    """Write ``<name>.json`` (data), ``<csv_name or name>.csv`` (rows) and config.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if data is not None:
        write_json(out / f"{name}.json", data)
    if rows:
        write_csv(out / f"{csv_name or name}.csv", rows)
    cfg = {"script": sys.argv[0], "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
           "environment": environment(), "load_average": os.getloadavg(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    cfg.update(extra_config or {})
    write_json(out / "config.json", cfg)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys and not isinstance(r[k], (list, dict)):
                keys.append(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in keys})
    os.replace(tmp, path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def savefig(fig, path: Path) -> None:
    from llmflash.report import save_figure

    save_figure(fig, path)


def setups(args) -> list[tuple[str, dict]]:
    """The (kind, setup) pairs the script's --models asks for: the real model and/or the scale model."""
    out = []
    if wanted(args, "real"):
        out.append(("real", real_setup(args.model)))
    if wanted(args, "scale"):
        out.append(("scale", scale_setup()))
    return out


# -------------------------------------------------------------------------------------------------------- setups


def real_setup(model: str = "auto", threshold_sparsity: float = 0.8) -> dict:
    """The real model: flash dir, sparsity rule, sparse mode and predictors.

    ``auto``: smollm2-relu (+ its default predictors when they exist) once its artifacts exist, else smollm2 with the
    threshold rule at 80% sparsity (no predictors: the sparse mode is then the oracle).
    """
    from llmflash.demo import default_setup, flash_dir_for
    from llmflash.models import relu_artifact_dir

    if model == "auto":
        model = "smollm2-relu" if relu_artifact_dir().is_dir() else "smollm2"
    if model == "smollm2-relu" and not relu_artifact_dir().is_dir():
        raise LLMFlashError(f"smollm2-relu artifacts are missing ({relu_artifact_dir()}); use --model smollm2")
    if model not in ("smollm2", "smollm2-relu"):
        raise LLMFlashError(f"unknown --model {model!r}: use auto, smollm2 or smollm2-relu")
    s = default_setup(model)
    s = dict(s, threshold_sparsity=threshold_sparsity if s["sparsity"] == "threshold" else None)
    s["flash_dir"] = str(flash_dir_for(s["model"]))
    s["label"] = s["model"] + (f" (threshold {threshold_sparsity:.0%} sparsity)" if s["sparsity"] == "threshold" else "")
    return s


def scale_setup() -> dict:
    from research.scale import OPT_6_7B, scale_dir, write_scale_model

    path = write_scale_model(geometry=OPT_6_7B)
    return {"model": OPT_6_7B.name, "sparse_mode": "predictor", "sparsity": "relu", "predictors": None,
            "flash_dir": str(path), "unbundled_dir": str(scale_dir(OPT_6_7B, bundled=False)),
            "label": "OPT-6.7B-geometry scale model (synthetic weights, trace-driven active sets)",
            "geometry": asdict(OPT_6_7B)}


COACT_FIT_SOURCE = "wiki:train"  # the text the neuron order is fitted on (the prompts come from wiki:eval)


def coact_fit_tokens(quick: bool) -> int:
    return 2048 if quick else 16384


def real_coact_dir(setup: dict, quick: bool) -> str:
    """The real model reordered by co-activation (``llmflash reorder``), fitted on training text; cached beside the
    original and rebuilt when it was fitted otherwise or its source changed."""
    from llmflash.reorder import reorder_flash_dir

    out = cache_dir() / "flash" / f"{setup['model']}-coact-order"
    src = open_flash_dir(setup["flash_dir"])
    tokens = coact_fit_tokens(quick)
    try:
        order = open_flash_dir(out).manifest.neuron_order
        info = order.meta if order is not None else {}
        if (info.get("kind"), info.get("source"), info.get("requested_tokens"), info.get("src_checksums")) == (
                "coactivation", COACT_FIT_SOURCE, tokens, src.manifest.checksums.to_json()):
            return str(out)
    except LLMFlashError:
        pass
    reorder_flash_dir(src.path, out, "coactivation", setup["sparsity"], setup.get("threshold_sparsity") or 0.8,
                      source=COACT_FIT_SOURCE, max_tokens=tokens, progress=False,
                      extra_meta={"requested_tokens": tokens, "src_checksums": src.manifest.checksums.to_json()})
    return str(out)


def real_unbundled_dir(setup: dict) -> str:
    """The real model converted with --no-bundling (cached beside the bundled one)."""
    from llmflash.convert import convert

    out = cache_dir() / "flash" / f"{setup['model']}-unbundled"
    try:
        fd = open_flash_dir(out)
        if not fd.layout.bundled:
            return str(out)
    except LLMFlashError:
        pass
    src = open_flash_dir(setup["flash_dir"])
    convert(setup["model"], out, dtype=src.manifest.dtype, bundled=False, force=True)
    if src.thresholds() is not None:  # same weights, same calibrated thresholds
        open_flash_dir(out).save_thresholds(src.thresholds())
    return str(out)


def scale_unbundled_dir() -> str:
    from research.scale import OPT_6_7B, unbundled_scale_dir, write_scale_model

    return str(unbundled_scale_dir(write_scale_model(geometry=OPT_6_7B), OPT_6_7B))


_SHARED: dict[tuple[str, str], FlashDir] = {}


def open_shared(path) -> FlashDir:
    """A flash directory opened once per process (per version of its files), keeping its resident weights after the
    first engine read them (direct I/O, checksum-verified; ``FlashDir.keep_resident``) for every later engine: each
    scale-model Engine would otherwise spend ~10 s re-reading 4.7 GB. Naive mode still re-reads them from flash every
    token (into this same buffer: identical bytes)."""
    fd = open_flash_dir(path)
    key = (str(fd.path.resolve()), json.dumps(fd.manifest.checksums.to_json(), sort_keys=True))
    if key not in _SHARED:
        fd.keep_resident = True
        _SHARED[key] = fd
    return _SHARED[key]


def prompt_ids(tokenizer, n_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the first held-out Wikipedia article (fixed across runs)."""
    from llmflash.text import load_texts

    text = " ".join(load_texts(PROMPT_TEXT_SOURCE)[:3])
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:n_tokens]
    return ids


# ---------------------------------------------------------------------------------------------------- engine runs


class ReadRecorder(EngineObserver):
    """Counts every read an engine issues by size, per forward pass (prefill, then one per generated token)."""

    def __init__(self, engine: Optional[Engine] = None) -> None:
        self.current: dict[int, int] = {}
        self.per_forward: list[dict[int, int]] = []
        if engine is not None:
            engine.observe(self)

    def reads_issued(self, source: str, nbytes: np.ndarray) -> None:
        sizes, counts = np.unique(np.asarray(nbytes, dtype=np.int64), return_counts=True)
        for s, c in zip(sizes.tolist(), counts.tolist()):
            self.current[s] = self.current.get(s, 0) + c

    def forward_done(self, step: int) -> None:
        self.per_forward.append(self.current)
        self.current = {}


def load_bandwidth(threads: int = 16) -> Optional[list[tuple[int, float]]]:
    """(chunk bytes, GB/s) at ``threads`` parallel reads from results/profile_io (the closest thread count)."""
    path = RESULTS / "profile_io" / "profile.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    ts = sorted({r["threads"] for r in rows}, key=lambda t: (abs(t - threads), -t))
    t = ts[0]
    return sorted((r["chunk_bytes"], r["gbps"]) for r in rows if r["threads"] == t)


def bandwidth_at(table: Sequence[tuple[int, float]], nbytes: float) -> float:
    """GB/s at a read size: interpolated in log2(size) between profiled chunk sizes, flat outside."""
    xs = np.log2([c for c, _ in table])
    ys = [g for _, g in table]
    return float(np.interp(math.log2(max(nbytes, 1)), xs, ys))


def computed_io_ms(hist: dict[int, int], table) -> float:
    """I/O time if every read ran at the profiled bandwidth for its size: sum(bytes / bandwidth(size))."""
    if not table:
        return float("nan")
    return sum(size * count / (bandwidth_at(table, size) * 1e9) for size, count in hist.items()) * 1e3


def summarize(res: GenerationResult, rec: Optional[ReadRecorder], warmup: int, table=None) -> dict:
    """Per-token figures over generated tokens after ``warmup`` (medians of times, means of bytes and reads)."""
    pt = res.per_token[warmup:] or res.per_token
    hists = rec.per_forward[1 + warmup: 1 + warmup + len(pt)] if rec is not None else []
    n = len(pt)
    b = sum(t.bytes_read for t in pt)
    r = sum(t.reads for t in pt)
    io_s = sum(t.io_ms for t in pt) / 1e3
    total = {}
    for h in hists:
        for s, c in h.items():
            total[s] = total.get(s, 0) + c
    comp = [computed_io_ms(h, table) for h in hists] if table else []
    s = {
        "tokens_measured": n, "warmup_tokens": min(warmup, len(res.per_token)),
        "ms_per_token": median([t.total_ms for t in pt]), "mean_ms_per_token": sum(t.total_ms for t in pt) / n,
        "io_ms": median([t.io_ms for t in pt]), "mem_ms": median([t.mem_ms for t in pt]),
        "compute_ms": median([t.compute_ms for t in pt]), "predictor_ms": median([t.predictor_ms for t in pt]),
        "mean_io_ms": sum(t.io_ms for t in pt) / n,
        "bytes_read_per_token": b / n, "reads_per_token": r / n, "mean_read_bytes": b / r if r else 0.0,
        "read_gbps": b / io_s / 1e9 if io_s > 0 else 0.0,
        "loaded_neurons_per_token": sum(t.loaded_neurons for t in pt) / n,
        "cached_neurons": median([t.cached_neurons for t in pt]),
        "tokens_per_s": 1e3 / median([t.total_ms for t in pt]),
    }
    if comp:
        s["computed_io_ms"] = float(np.mean(comp))
        s["computed_gbps"] = (b / n) / (s["computed_io_ms"] / 1e3) / 1e9 if s["computed_io_ms"] > 0 else 0.0
        s["read_efficiency"] = s["computed_io_ms"] / s["mean_io_ms"] if s["mean_io_ms"] > 0 else float("nan")
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
        share: bool = True) -> dict:
    """One timed generation: Engine(flash_dir, cfg, provider) generating ``n_tokens`` greedy tokens.

    ``no_reuse``: each token loads its whole active set (no window reuse: ``EngineConfig.reuse=False``).
    ``perm``: the flash directory's rows are permuted (per layer: row -> original id; recorded in the directory, from
    which the engine maps its predictors' ids itself; the oracle needs nothing: it reads the permuted rows).
    Returns {label, mode, config, summary (see ``summarize``), per_token, dram_bytes, model_bytes, ...}. When
    ``LLMFLASH_SESSION`` is set (``llmflash reproduce``), a run with the same key made earlier in the session by
    another script is reused instead of measured again (marked ``shared_from``).
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
        res = engine.generate(ids, n_tokens, stop_at_eos=False)
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    extras = {"hybrid_resident_layers": getattr(engine, "hybrid_resident_layers", None),
              "cache_rows": getattr(engine, "cache_rows", None)}
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


# ----------------------------------------------------------------------------------- the two models' standard runs


def real_cfg(setup: dict, mode: str, **kw) -> EngineConfig:
    return EngineConfig(mode=mode, sparsity=setup["sparsity"], threshold_sparsity=setup.get("threshold_sparsity") or 0.8,
                        predictors=setup["predictors"] if mode == "predictor" else None, **kw)


def trace_provider_factory(kind: str = "predicted", perm=None, seed: int = 0):
    """A factory of scale-model providers (the trace source), and the key that identifies it."""
    from research.trace import PAPER_FLICKER, PAPER_RHO, PAPER_SIGMA_B, TraceModel, TraceProvider, paper_params

    def make():
        return TraceProvider(TraceModel(paper_params(seed=seed), 16384), kind=kind, perm=perm)

    key = {"trace": "paper_params", "sigma_b": PAPER_SIGMA_B, "rho": PAPER_RHO, "flicker": PAPER_FLICKER, "kind": kind,
           "seed": seed,
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
}


def n_tokens(quick: bool, model: str, row: str) -> tuple[int, int]:
    """(tokens to generate, warm-up tokens excluded from the statistics) for a row."""
    if model == SCALE:  # ~12 s per naive token, ~6 s hybrid, ~1 s sparse on this VM
        if row in ("naive", "hybrid", "dense"):
            return (2, 0) if quick else (8, 0)
        return (9, 5) if quick else (40, 5)
    if row in ("naive", "hybrid", "dense"):
        return (12, 0) if quick else (64, 0)
    return (24, 2) if quick else (128, 2)


def standard_run(setup: dict, row: str, quick: bool, budget: float = 0.5, table=None, n: Optional[int] = None,
                 warmup: Optional[int] = None, window: int = 5, compute_threads: Optional[int] = None,
                 perm=None, flash_dir: Optional[str] = None, label: Optional[str] = None, share: bool = True,
                 device: str = "cpu", io_threads: Optional[int] = None) -> dict:
    """One of the ``ROWS`` on the real model (``setup`` from ``real_setup``) or the scale model (``scale_setup``)."""
    scale = "geometry" in setup
    model = SCALE if scale else "real"
    n0, w0 = n_tokens(quick, model, row)
    n = n0 if n is None else n
    warmup = w0 if warmup is None else warmup
    extra = {} if compute_threads is None else {"compute_threads": compute_threads}
    if device != "cpu":
        extra["device"] = device
    if io_threads is not None:
        extra["io_threads"] = io_threads
    if row == "ours_coact" and scale:
        raise ValueError("the co-activation order needs real activations: the scale model has no ours_coact row")
    directory = flash_dir or (real_coact_dir(setup, quick) if row == "ours_coact" else setup["flash_dir"]
                              if row not in ("predictor_noreuse", "predictor_w1", "window_unbundled")
                              else (scale_unbundled_dir() if scale else real_unbundled_dir(setup)))
    kw: dict = dict(table=table, warmup=warmup, label=label or ROWS.get(row, row), perm=perm, share=share)
    if row in ("dense", "naive", "hybrid"):
        mode, win = row, window
    else:
        mode = "predictor" if scale else setup["sparse_mode"]
        win = 1 if row in ("predictor_noreuse", "predictor_w1") else window
        kw["no_reuse"] = row == "predictor_noreuse"
    if scale:
        cfg = EngineConfig(mode=mode, dram_budget=budget, window=win, **extra)
        if mode == "predictor":
            fac, key = trace_provider_factory("predicted", perm=perm)
            kw.update(provider_factory=fac, provider_key=key, perm=None)
        return run(directory, cfg, n, prompt=SCALE_PROMPT, **kw)
    cfg = real_cfg(setup, mode, dram_budget=budget, window=win, **extra)
    return run(directory, cfg, n, **kw)

"""``llmflash reproduce [--quick]``: run every experiment script of ``experiments/`` and write ``results/``.

Each experiment is a thin script (``experiments/<name>.py``) that calls the library and writes
``results/<name>/`` (JSON/CSV data, a PNG and config.json with the environment). This command runs them in order, each
in its own process (the scale model's runs need most of the machine's memory), sharing identical engine runs within
one invocation (``LLMFLASH_SESSION``: e.g. Table 3's naive/hybrid/ours rows are Table 2's runs), and writes
``results/reproduce.json`` (what ran, how long, exit status).

The scale model (OPT-6.7B geometry, 13.3 GB of synthetic bf16 weights) is written once into the cache directory
(about 3-5 minutes and 13.4 GB of free disk; ``python -m research.scale --unbundled``) and reused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from llmflash.errors import LLMFlashError
from llmflash.paths import repo_root

EXPERIMENTS = (  # name, what it reproduces, takes --model/--models
    ("profile_io", "Figure 2b: read throughput vs read size and parallel reads", False),
    ("active_fraction", "Figure 9: active neurons per layer", True),
    ("window_usage", "Figure 4a: aggregated usage and loads per token vs window size", True),
    ("trace_validation", "the scale model's trace source vs the real model and the paper", True),
    ("ablation", "Table 2: naive -> hybrid -> +predictor -> +window -> +bundling", True),
    ("latency", "Table 3: I/O / memory / compute / total per token", True),
    ("dram_budget", "Figure 7: latency vs DRAM budget", True),
    ("stability", "Figure 8: latency over 1000 generated tokens", True),
    ("engine_options", "engine: int8 vs fp16 predictors, compute threads, lookahead, A/B (real model)", False),
    ("coactivation", "Appendix D: closest friends, friend bundling, co-activation ordering", True),
    ("memory_limit", "ours vs mmap/from_pretrained loaders inside a memory cgroup", True),
    ("cgroup_budget", "issue 2: `llmflash generate --dram-budget 0.5` in a half-model cgroup", True),
    ("memory_growth", "engine: the scale model's memory per token, with and without row bucketing", False),
    ("gpu_scale", "Table 3 on a GPU: the scale model computed on CUDA, naive vs ours (needs CUDA; else redrawn)", False),
)
NAMES = tuple(e[0] for e in EXPERIMENTS)

FULL_SETTINGS = """\
full settings (without --quick; about 2-3 hours on this VM, most of it the scale model's naive/hybrid tokens at
~10 s each and the 1000-token stability run):
  profile_io        8 read sizes 4 KiB-1 MiB x 1/4/8/16/32 parallel reads, 5 interleaved runs per point (median)
  active_fraction   16384 wiki:eval tokens (real); trace: 256 tokens x 32 layers
  window_usage      16384 tokens, k = 1..32 (real); trace: 256 tokens x 32 layers
  trace_validation  16384 tokens; fitted trace simulated on 16 sequences of 512 tokens
  ablation          real: 64 tokens naive/hybrid, 128 sparse; scale: 8 tokens naive/hybrid, 5 + 35 sparse
  latency           the same, plus dense (scale dense needs ~14 GB free)
  dram_budget       budgets 35/40/45/50/55/60/70/80% of the model, ours and hybrid
  stability         1000 generated tokens per model
  coactivation      16384 tokens to fit (wiki:train) and evaluate (wiki:eval) the order; 128 (real) / 40 (scale) tokens measured
  memory_limit      64 (real) / 40 (scale) tokens ours, 32 / 4 tokens for the baselines, plus mmap without a limit
  cgroup_budget     64 tokens
  gpu_scale         on a CUDA machine only (elsewhere the committed run's figure is redrawn): the scale model written
                    there, its disk profiled, 3 alternating naive / ours rounds (3 and 30 tokens), hybrid and dense
--quick: the same experiments with small settings, about 15 minutes once the scale model exists.
Timings are noisy while other jobs share the 2 cores: re-measure with the machine quiet (load average < 0.5)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce", help="run the experiment scripts and write results/ (the paper's figures and tables)",
        description=__doc__.split("\n\n")[0] + "\n\n" + FULL_SETTINGS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings (about 15 minutes here)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(NAMES)}")
    p.add_argument("--skip", default="", help="comma-separated experiments to leave out")
    p.add_argument("--model", default="auto",
                   help="real model: auto (smollm2-relu when present, else smollm2 + threshold), smollm2, smollm2-relu")
    p.add_argument("--models", default="real,scale", help="real, scale or real,scale (default both)")
    p.add_argument("--results", type=Path, default=None, help="results root (default: the repository's results/)")
    p.set_defaults(func=_cmd_reproduce)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _experiments_dir() -> Path:
    d = repo_root() / "experiments"
    if not (d / "common.py").is_file():
        raise LLMFlashError(f"{d} has no experiment scripts: run `llmflash reproduce` from a source checkout of llmflash")
    return d


def _select(only: str | None, skip: str) -> list[str]:
    chosen = [n.strip() for n in only.split(",") if n.strip()] if only else list(NAMES)
    skipped = {n.strip() for n in skip.split(",") if n.strip()}
    bad = [n for n in chosen + list(skipped) if n not in NAMES]
    if bad:
        raise LLMFlashError(f"unknown experiment {bad[0]!r}: choose from {', '.join(NAMES)}")
    return [n for n in NAMES if n in chosen and n not in skipped]


def _cmd_reproduce(args: argparse.Namespace) -> int:
    exp = _experiments_dir()
    names = _select(args.only, args.skip)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("real", "scale") for m in models):
        raise LLMFlashError(f"--models takes real, scale or real,scale, not {args.models!r}")
    results = args.results or (repo_root() / "results")
    if "scale" in models and any(n != "profile_io" for n in names):
        from research.scale import OPT_6_7B, unbundled_scale_dir, write_scale_model

        print("scale model: checking (written once into the cache directory) ...", flush=True)
        unbundled_scale_dir(write_scale_model(geometry=OPT_6_7B), OPT_6_7B)
    session = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    env = dict(os.environ, LLMFLASH_SESSION=session, TQDM_DISABLE=os.environ.get("TQDM_DISABLE", "1"))
    takes_models = {n: m for n, _, m in EXPERIMENTS}
    log = []
    t_all = time.perf_counter()
    for name in names:
        cmd = [sys.executable, str(exp / f"{name}.py"), "--out", str(results / name)]
        if args.quick:
            cmd.append("--quick")
        if name == "gpu_scale" and not _has_cuda():  # measured on a GPU machine: here only its figure is redrawn
            cmd.append("--replot")
            print("== gpu_scale: no CUDA device here: redrawing results/gpu_scale from its committed JSON", flush=True)
        if takes_models[name]:
            cmd += ["--model", args.model]
            if name != "cgroup_budget":
                cmd += ["--models", ",".join(models)]
            elif "real" not in models:
                continue
        print(f"== {name}: {dict((n, w) for n, w, _ in EXPERIMENTS)[name]}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        dt = time.perf_counter() - t0
        log.append({"experiment": name, "returncode": rc, "seconds": round(dt, 1), "command": " ".join(cmd)})
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {dt:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    from llmflash.report import environment, write_json

    write_json(results / "reproduce.json", {"quick": args.quick, "model": args.model, "models": models,
                                             "session": session, "seconds": round(total, 1), "runs": log,
                                             "load_average_end": os.getloadavg(), "environment": environment()})
    failed = [r["experiment"] for r in log if r["returncode"] != 0]
    print(f"reproduce: {len(log) - len(failed)}/{len(log)} experiments ok in {total / 60:.1f} min; results in {results}")
    if failed:
        print(f"reproduce: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

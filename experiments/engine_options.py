"""Engine options, A/B on the real model: which settings make a token faster here (engine follow-ups of issues 4-5)?

Arms, each the default engine (smollm2-relu, predictor mode, half the model in DRAM, the experiments' 128-token wiki
prompt) with one change, run alternating (the disk and the machine drift) ``--repeats`` times each:

- ``default``: int8 predictors, compute threads and lookahead auto (on a quiet CPU of at most 2 cores: lookahead with
  one compute thread; elsewhere every core, no lookahead);
- ``no_lookahead``: lookahead off (the default before the eleventh session; compute threads auto: every core);
- ``fp16_predictors``: the predictors held in fp16 as stored (``EngineConfig.predictor_dtype``): their time and the
  cache's bytes (int8 frees 3 MiB of the budget for the neuron caches);
- ``one_thread``: one compute thread, no lookahead (the auto setting for dense, naive and hybrid on small models);
- ``lookahead``: on whatever the machine (compute threads auto: one on at most 2 free cores); layer l+1's set
  guessed from layer l's FFN input and its new neurons read early (into the caches, and beyond them into two host
  buffers: ``EngineConfig.lookahead_rows``);
- ``lookahead_one_thread``: lookahead and one compute thread (the reads in flight then keep the second core: the
  default on 2 cores); ``lookahead_two_threads``: with two (how it was measured before: 1.08x);
- ``no_bridge``, ``bridge_2``, ``bridge_4``: the rows beyond the cache read with gaps of up to 0, 2 or 4 rows filled
  in (``EngineConfig.max_gap_rows``; the default, auto, fills the rows that fit in 8 KiB: one float32 row of
  SmolLM2): fewer, longer reads for more bytes;
- ``python_plans``: the reads planned in numpy (``layout.read_plan`` / ``step.slot_plan``) and handed to the reader
  as lists, instead of from the neuron ids inside the native reader (``EngineConfig.native_plans``);
- ``python_cache``: the neuron caches' slot bookkeeping in numpy (the reference) instead of ``native/cache.cpp``
  (``EngineConfig.native_cache``);
- ``python_attention``: each layer's attention for one token through transformers' modules (the reference) instead
  of the native decode step (``EngineConfig.native_attention``, ``llmflash.decode_step``);
- ``reader_threads``: the native reader's C++ threads (one blocking read each) instead of io_uring
  (``EngineConfig.io_uring``); ``uring_depth_32``, ``_64``, ``_256``: io_uring with that many reads in flight at most
  (``EngineConfig.uring_depth``; default 128).

Measured: medians of the per-token I/O wait, memory management, predictor and compute times (and the predictor's
share of compute, issue 4's "< 5%"). Computed, when ``llmflash collect`` has made activations: how much of layer l's
predicted set the lookahead guess covers (layer l's predictor on layer l-1's FFN input rescaled by the ratio of the
two FFN norms' weights, as the engine does).

    python experiments/engine_options.py [--quick] [--repeats 5] [--tokens 24] [--arms A,B] [--order coactivation]
        [--model DIR --predictors PRED] [--budget 0.5]

``--model DIR --predictors PRED``: a flash directory and predictors trained on it instead (e.g. a tiny model in the
test suite's end-to-end tier).

Writes results/engine_options/{engine_options.json, engine_options.csv, engine_options.png, config.json}; with
``--profile`` also profile_ARM.txt (the first arm run once more under cProfile and torch.profiler).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmflash.engine import EngineConfig, lookahead_map
from llmflash.errors import BudgetError
from llmflash.paths import cache_dir

import common
import engine_runs

log = logging.getLogger("engine_options")
ARMS = {  # name -> EngineConfig changes
    "default": {},
    "fp16_predictors": {"predictor_dtype": "float16"},
    "one_thread": {"compute_threads": 1, "lookahead": False},
    "no_lookahead": {"lookahead": False},
    "lookahead": {"lookahead": True},
    "lookahead_one_thread": {"lookahead": True, "compute_threads": 1},
    "lookahead_two_threads": {"lookahead": True, "compute_threads": 2},
    "no_bridge": {"max_gap_rows": 0},
    "bridge_2": {"max_gap_rows": 2},
    "bridge_4": {"max_gap_rows": 4},
    "python_plans": {"native_plans": False},
    "python_cache": {"native_cache": False},
    "python_attention": {"native_attention": False},
    "reader_threads": {"io_uring": False},
    "uring_depth_32": {"uring_depth": 32},
    "uring_depth_64": {"uring_depth": 64},
    "uring_depth_256": {"uring_depth": 256},
}
PARTS = ("io_ms", "mem_ms", "predictor_ms", "compute_ms")  # compute_ms includes the predictor: shown without it


def guess_coverage(setup: dict, act_dir: Path, max_tokens: int = 4096) -> list[dict]:
    """Per layer l >= 1: |guess & predicted| / |predicted| and |guess| / |predicted| on collected activations."""
    from llmflash.arch import adapter_for
    from llmflash.models import ALIASES, load_any, predictor_dir
    from llmflash.predictor import PredictorSet

    ps = PredictorSet.load(predictor_dir(setup["predictors"]))
    model = load_any(setup["model"] if setup["model"] in ALIASES else setup["flash_dir"]).model
    adapter = adapter_for(model.config)
    rows = []
    x_prev = None
    for layer in range(ps.n_layers):
        x = torch.from_numpy(np.load(act_dir / f"x_{layer:02d}.npy", mmap_mode="r")[:max_tokens].astype(np.float32))
        if x_prev is not None:
            scale, shift = lookahead_map(adapter, model, layer - 1)  # what the engine does
            exact = ps.predict(layer, x)
            guess = ps.predict(layer, x_prev * scale + shift)
            rows.append({"layer": layer, "covered": float((exact & guess).sum() / exact.sum().clamp_min(1)),
                         "guess_over_predicted": float(guess.sum() / exact.sum().clamp_min(1))})
        x_prev = x
    return rows


def measure(setup: dict, changes: dict, tokens: int, warmup: int, budget: float = 0.5,
            profile_to: Optional[Path] = None) -> dict:
    cfg = EngineConfig(mode="predictor", dram_budget=budget, predictors=setup["predictors"], **changes)
    s = engine_runs.run(setup["flash_dir"], cfg, tokens + warmup, warmup=warmup, share=False,
                        profile_to=profile_to)["summary"]
    row = {"total_ms": s["ms_per_token"], **{k: s[k] for k in PARTS}}
    row["predictor_share_of_compute"] = s["predictor_ms"] / s["compute_ms"]
    row["reads_per_token"] = s["reads_per_token"]
    row["mb_per_token"] = s["bytes_read_per_token"] / 1e6
    return row


def plot(summary: dict, path: Path, model: str = "smollm2-relu", budget: float = 0.5) -> None:
    plt = common.plt()
    arms = [a for a in ARMS if a in summary]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bottom = np.zeros(len(arms))
    parts = {"I/O wait": "io_ms", "memory management": "mem_ms", "predictor": "predictor_ms"}
    for name, key in parts.items():
        v = np.array([summary[a][key] for a in arms])
        ax.bar(arms, v, bottom=bottom, label=name)
        bottom += v
    rest = np.array([summary[a]["compute_ms"] - summary[a]["predictor_ms"] for a in arms])
    ax.bar(arms, rest, bottom=bottom, label="other compute")
    for i, a in enumerate(arms):  # the parts' medians need not add up to the total's median
        ax.text(i, max(summary[a]["total_ms"], bottom[i] + rest[i]) * 1.01,
                f"total {summary[a]['total_ms']:.0f} ms\npredictor {100 * summary[a]['predictor_share_of_compute']:.1f}%"
                " of compute", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per token (median of run medians)")
    ax.margins(y=0.18)
    held = "half the model" if budget == 0.5 else f"{budget:.0%} of the model"
    ax.set_title(f"{model}, predictor mode, {held} in DRAM: one change per arm (measured)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    common.savefig(fig, path)


def main() -> None:
    ap = common.parser("engine_options", __doc__.splitlines()[0], models=False)
    ap.add_argument("--repeats", type=int, default=None, help="runs per arm (default 5, --quick 2)")
    ap.add_argument("--tokens", type=int, default=24, help="measured tokens per run (after 4 warm-up tokens)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's engine_options.json")
    ap.add_argument("--model", default="smollm2-relu", help="smollm2-relu (default) or a flash directory DIR")
    ap.add_argument("--predictors", default=None, help="the predictors (default: the model's committed ones)")
    ap.add_argument("--budget", type=float, default=0.5, help="--dram-budget of every arm (default 0.5)")
    ap.add_argument("--order", choices=("file", "coactivation"), default="file",
                    help="the real model's neurons as converted, or its co-activation-ordered copy (the demo's)")
    ap.add_argument("--profile", action="store_true",
                    help="after the repeats, run the first arm once more under cProfile and torch.profiler: "
                         "OUT/profile_ARM.txt (shares of the time, not timings)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot_only:
        import json

        data = json.loads((args.out / "engine_options.json").read_text())
        plot(data["summary"], args.out / "engine_options.png", data["setup"]["model"], data.get("budget", 0.5))
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms: choose from {', '.join(ARMS)}")
    repeats = args.repeats or (2 if args.quick else 5)
    setup = common.real_setup(args.model)
    if args.predictors:
        setup = dict(setup, predictors=args.predictors, sparse_mode="predictor")
    if args.order == "coactivation":
        setup = dict(setup, flash_dir=common.real_coact_dir(setup, args.quick))
    if not setup.get("predictors"):
        raise SystemExit(f"{args.model} has no predictors: these checks need predictor mode (--predictors)")
    act_dir = cache_dir() / "act" / f"{setup['model']}-eval"
    coverage = guess_coverage(setup, act_dir) if "lookahead" in arms and (act_dir / "x_00.npy").is_file() else []
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    refused: dict[str, str] = {}  # arms the budget cannot hold (e.g. a low-bit set held in fp16): said, not run
    for r in range(repeats):
        for a in [a for a in arms if a not in refused]:  # alternating: the disk and the machine drift
            try:
                runs[a].append(measure(setup, ARMS[a], args.tokens, warmup=4, budget=args.budget))
            except BudgetError as err:
                refused[a] = str(err)
                log.info("arm %s refused: %s", a, err)
                continue
            log.info("run %d %s: %s", r, a, {k: round(v, 3) for k, v in runs[a][-1].items()})
    arms = [a for a in arms if a not in refused]
    runs = {a: runs[a] for a in arms}
    summary = {a: {f: statistics.median(r[f] for r in v) for f in v[0]} for a, v in runs.items()}
    ratios = {f"{a}_over_default_total": summary[a]["total_ms"] / summary["default"]["total_ms"]
              for a in arms if a != "default" and "default" in summary}
    data = {"setup": setup, "repeats": repeats, "tokens": args.tokens, "budget": args.budget,
            "arms": {a: ARMS[a] for a in arms},
            "runs": runs, "summary": summary, "ratios": ratios, "refused": refused, "guess_coverage": coverage,
            "mean_guess_coverage": float(np.mean([c["covered"] for c in coverage])) if coverage else None,
            "labels": {"runs": "measured", "guess_coverage": f"computed from collected activations ({act_dir.name})"}}
    rows = [{"arm": a, "repeat": i, **row} for a in arms for i, row in enumerate(runs[a])]
    common.save(args.out, "engine_options", args, data, rows)
    if args.profile and arms:
        measure(setup, ARMS[arms[0]], args.tokens, warmup=4, budget=args.budget,
                profile_to=args.out / f"profile_{arms[0]}.txt")
    plot(summary, args.out / "engine_options.png", setup["model"], args.budget)
    for a in arms:
        log.info("%-16s total %.1f ms (predictor %.2f ms = %.1f%% of compute)%s", a, summary[a]["total_ms"],
                 summary[a]["predictor_ms"], 100 * summary[a]["predictor_share_of_compute"],
                 f", {ratios[a + '_over_default_total']:.3f}x default" if a + "_over_default_total" in ratios else "")


if __name__ == "__main__":
    main()

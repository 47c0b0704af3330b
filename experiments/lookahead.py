"""Cross-layer lookahead (engine follow-up of issue 5): does reading layer l+1's guessed neurons while layer l runs
make a token faster?

Two measurements on the real model (smollm2-relu, predictor mode, half the model in DRAM, the experiments' 128-token
wiki prompt):

- offline (computed from collected activations, if ``llmflash collect`` has made them): how much of layer l's
  predicted set the guess covers, i.e. layer l's predictor applied to layer l-1's FFN input rescaled by the ratio of
  the two FFN norms' weights (what the engine does);
- end to end (measured): the engine with lookahead off and on, alternating, ``--repeats`` runs each; medians of the
  per-token I/O wait, memory management, predictor and compute times.

    python experiments/lookahead.py [--quick] [--repeats 5] [--tokens 24]

Writes results/lookahead/{lookahead.json, lookahead.csv, lookahead.png, config.json}.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import numpy as np
import torch

import common
from llmflash.engine import EngineConfig, lookahead_map
from llmflash.paths import cache_dir

log = logging.getLogger("lookahead")
PARTS = ("io_ms", "mem_ms", "predictor_ms", "compute_ms")  # compute_ms includes the predictor: shown without it


def guess_coverage(setup: dict, act_dir: Path, max_tokens: int = 4096) -> list[dict]:
    """Per layer l >= 1: |guess & predicted| / |predicted| and |guess| / |predicted| on collected activations."""
    from llmflash.arch import adapter_for
    from llmflash.models import load_model
    from predictors.model import PredictorSet

    ps = PredictorSet.load(setup["predictors"])
    model, _, _ = load_model(setup["model"])
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


def measure(setup: dict, lookahead: bool, tokens: int, warmup: int) -> dict:
    cfg = EngineConfig(mode="predictor", dram_budget=0.5, predictors=setup["predictors"], lookahead=lookahead)
    s = common.run(setup["flash_dir"], cfg, tokens + warmup, warmup=warmup, share=False)["summary"]
    row = {"total_ms": s["ms_per_token"], **{k: s[k] for k in PARTS}}
    row["reads_per_token"] = s["reads_per_token"]
    row["mb_per_token"] = s["bytes_read_per_token"] / 1e6
    return row


def plot(summary: dict, path: Path) -> None:
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = ["lookahead off", "lookahead on"]
    bottom = np.zeros(2)
    parts = {"I/O wait": "io_ms", "memory management": "mem_ms", "predictor": "predictor_ms"}
    for name, key in parts.items():
        v = np.array([summary[k][key] for k in ("off", "on")])
        ax.bar(labels, v, bottom=bottom, label=name)
        bottom += v
    rest = np.array([summary[k]["compute_ms"] - summary[k]["predictor_ms"] for k in ("off", "on")])
    ax.bar(labels, rest, bottom=bottom, label="other compute")
    for i, k in enumerate(("off", "on")):  # the parts' medians need not add up to the total's median
        ax.text(i, max(summary[k]["total_ms"], bottom[i] + rest[i]) * 1.01, f"total {summary[k]['total_ms']:.0f} ms",
                ha="center", va="bottom")
    ax.set_ylabel("ms per token (median of run medians)")
    ax.margins(y=0.12)
    ax.set_title("smollm2-relu, predictor mode, half the model in DRAM")
    ax.legend(fontsize=8, loc="lower right")
    common.savefig(fig, path)


def main() -> None:
    ap = common.parser("lookahead", __doc__.splitlines()[0], models=False)
    ap.add_argument("--repeats", type=int, default=None, help="runs per setting (default 5, --quick 3)")
    ap.add_argument("--tokens", type=int, default=24, help="measured tokens per run (after 4 warm-up tokens)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's lookahead.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot_only:
        import json

        plot(json.loads((args.out / "lookahead.json").read_text())["summary"], args.out / "lookahead.png")
        return
    repeats = args.repeats or (3 if args.quick else 5)
    setup = common.real_setup("smollm2-relu")
    if not setup.get("predictors"):
        raise SystemExit("smollm2-relu has no predictors: the lookahead needs predictor mode")
    act_dir = cache_dir() / "act" / "smollm2-relu-eval"
    coverage = guess_coverage(setup, act_dir) if (act_dir / "x_00.npy").is_file() else []
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(repeats):
        for key, on in (("off", False), ("on", True)):  # alternating: the disk and the machine drift
            runs[key].append(measure(setup, on, args.tokens, warmup=4))
            log.info("run %d lookahead %s: %s", r, key, {k: round(v, 1) for k, v in runs[key][-1].items()})
    summary = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    summary["on_over_off_total"] = summary["on"]["total_ms"] / summary["off"]["total_ms"]
    data = {"setup": setup, "repeats": repeats, "tokens": args.tokens, "runs": runs, "summary": summary,
            "guess_coverage": coverage,
            "mean_guess_coverage": float(np.mean([c["covered"] for c in coverage])) if coverage else None,
            "labels": {"runs": "measured", "guess_coverage": "computed from collected activations (smollm2-relu-eval)"}}
    rows = [{"lookahead": k, "repeat": i, **row} for k in ("off", "on") for i, row in enumerate(runs[k])]
    common.save(args.out, "lookahead", args, data, rows)
    plot(summary, args.out / "lookahead.png")
    log.info("lookahead on/off total: %.3f (off %.1f ms, on %.1f ms); guess covers %.2f of the predicted set",
             summary["on_over_off_total"], summary["off"]["total_ms"], summary["on"]["total_ms"],
             data["mean_guess_coverage"] or float("nan"))


if __name__ == "__main__":
    main()

"""Training-free sparsity on the ORIGINAL SmolLM2: perplexity versus sparsity for the per-layer threshold rule.

Thresholds (|h| under a per-layer threshold, CATS-style) are calibrated on wiki:train with
``llmflash.sparsity.rule_for`` (16,384 tokens, cached under the cache directory, the same thresholds that
``--sparsity threshold`` uses) and evaluated on held-out wiki:eval (first 8,192 tokens, windows of 512), next to the
dense model. The relufied model's points (results/relufy/frontier.csv, if present) go on the same plot.

    python experiments/threshold_curve.py [--targets 0.5,0.7,0.8,0.9] [--max-tokens 8192] [--plot-only]
                                          [--model smollm2]   (another original: an alias or a model directory)

Writes results/threshold_curve/{threshold_curve.csv, threshold_curve.png, config.json}.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

from llmflash.evaluate import perplexity
from llmflash.ffn import SparsityRule
from llmflash.models import load_model
from llmflash.paths import repo_root
from llmflash.report import environment, save_figure, write_csv, write_json
from llmflash.sparsity import CALIBRATION_SEQ_LEN, CALIBRATION_SOURCE, CALIBRATION_TOKENS, rule_for
from llmflash.text import load_texts

log = logging.getLogger("threshold_curve")
OUT = repo_root() / "results" / "threshold_curve"
RELUFY_FRONTIER = repo_root() / "results" / "relufy" / "campaign" / "frontier.csv"


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/threshold_curve.py", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--model", default="smollm2", help="the original model (an alias or a model directory)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV (e.g. after new relufy results)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot_only:
        with open(args.out / "threshold_curve.csv") as f:
            rows = [{k: (v if k == "rule" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
        plot(rows, args.out / "threshold_curve.png")
        return
    targets = [float(t) for t in args.targets.split(",")]
    t0 = time.time()
    model, tok, src = load_model(args.model)
    docs = load_texts("wiki:eval")
    rows = []
    dense = perplexity(model, tok, docs, seq_len=args.seq_len, max_tokens=args.max_tokens, rule=SparsityRule("relu"))
    rows.append({"rule": "dense", "target_sparsity": 0.0, "ppl": dense["ppl"], "ppl_ratio": 1.0,
                 "active_fraction": dense["ffn_active_fraction"], "tokens": dense["tokens"]})
    log.info("dense: ppl %.3f, active %.4f", dense["ppl"], dense["ffn_active_fraction"])
    for target in targets:
        rule = rule_for(model, tok, "threshold", target, cache_key=src.name)
        res = perplexity(model, tok, docs, seq_len=args.seq_len, max_tokens=args.max_tokens, rule=rule)
        rows.append({"rule": "threshold", "target_sparsity": target, "ppl": res["ppl"], "ppl_ratio": res["ppl"] / dense["ppl"],
                     "active_fraction": res["ffn_active_fraction"], "tokens": res["tokens"]})
        log.info("threshold %.2f: ppl %.3f (x%.3f), active %.4f", target, res["ppl"], res["ppl"] / dense["ppl"],
                 res["ffn_active_fraction"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "threshold_curve.csv", rows)
    write_json(args.out / "config.json", {
        "model": ("smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)" if args.model == "smollm2"
                  else args.model),
        "rule": "per-layer threshold on |h| = |silu(gate x) * up x| (CATS-style), calibrated by llmflash.sparsity.rule_for",
        "calibration": {"text": CALIBRATION_SOURCE, "tokens": CALIBRATION_TOKENS, "seq_len": CALIBRATION_SEQ_LEN},
        "evaluation": {"text": "wiki:eval (articles held out by title hash)", "max_tokens": args.max_tokens,
                       "seq_len": args.seq_len, "function": "llmflash.evaluate.perplexity"},
        "targets": targets, "results": rows, "wall_s": round(time.time() - t0, 1), "environment": environment(),
        "command": "python experiments/threshold_curve.py",
    })
    plot(rows, args.out / "threshold_curve.png")


def relufy_points() -> list[dict]:
    if not RELUFY_FRONTIER.is_file():
        return []
    with open(RELUFY_FRONTIER) as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    th = [r for r in rows if r["rule"] == "threshold"]
    ax.plot([1 - r["active_fraction"] for r in th], [r["ppl_ratio"] for r in th], "o-", label="SmolLM2 + threshold (no training)")
    for r in th:
        ax.annotate(f"{r['target_sparsity']:g}", (1 - r["active_fraction"], r["ppl_ratio"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    pts = relufy_points()
    for kind, style, label in (("ramp", ".", "relufied: held-out evals along training (GPU)"),
                               ("posthoc_shift", "^", "relufied + extra uniform shift (GPU)"),
                               ("cpu", "*", "smollm2-relu as shipped (CPU)")):
        sel = [p for p in pts if p.get("kind") == kind and float(p["ppl_ratio"]) < 100]
        if sel:
            ax.plot([1 - float(p["active_fraction"]) for p in sel], [float(p["ppl_ratio"]) for p in sel], style,
                    label=label, markersize=12 if kind == "cpu" else 6)
    ax.axhline(1.3, color="grey", lw=0.8, ls="--")
    ax.axvline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("FFN sparsity on wiki:eval (1 - active fraction)")
    ax.set_ylabel("perplexity / dense SmolLM2 perplexity")
    ax.set_title("SmolLM2-135M: sparsity vs perplexity (held-out wiki:eval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

"""Report of the gated campaign (``python3 -m sparsetrain.gated``) and the device-trained predictors
(``python3 -m sparsetrain.predictors_job``), from the records the device calls returned (results/relufy/gated/,
results/relufy/predictors_gpu/linear_r128_256/). Measured on the device machine by committed code; this script only draws.

Left: held-out perplexity ratio (2048-token windows) against the fraction of FFN neurons read per token, for the
gated model at each gate setting (the gate alone, and the gate plus a threshold at half of it), beside the threshold
model's own predictors (fraction they must read for their measured recall, at the shipped model's 80%-zeros ratio).
Right: the training curves (KL to the original model) of both gated runs against the gates' scheduled keep.

    python3 experiments/gated_report.py [--dir results/relufy] [--out DIR]   (default --out: DIR/gated)
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CORPORA = ("kjv", "shakespeare", "pydoc", "wiki_eval")
COLORS = dict(zip(CORPORA, ("tab:blue", "tab:orange", "tab:green", "tab:red")))


def _curve(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/gated_report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("results/relufy"), help="the records (default results/relufy)")
    ap.add_argument("--out", type=Path, default=None, help="where gated.png goes (default DIR/gated)")
    args = ap.parse_args()
    gdir = args.dir / "gated"
    out = args.out or gdir
    final = json.loads((gdir / "run2_bce" / "final.json").read_text())
    preds = json.loads((args.dir / "predictors_gpu" / "linear_r128_256" / "predictors_train.json").read_text())["summary"]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for corpus in CORPORA:
        for over, style in ((1.0, "-o"), (2.0, "--s")):
            rows = sorted((r for r in final["frontier"] if r["corpus"] == corpus and r["over_prediction"] == over),
                          key=lambda r: r["read_fraction"])
            ax.plot([r["read_fraction"] for r in rows], [r["ppl_ratio"] for r in rows], style, color=COLORS[corpus],
                    ms=4, label=f"gated, {corpus}" + (" (gate only)" if over == 1.0 else " (gate + threshold)"))
        p = preds.get(corpus)
        if p:
            ax.axvline(p["predicted_active_fraction"], color=COLORS[corpus], lw=0.8, ls=":")
    ax.axhline(1.3, color="k", lw=0.8, ls="--")
    ax.text(0.99, 1.3, " target 1.3x", va="bottom", ha="right", transform=ax.get_yaxis_transform(), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of FFN neurons read per token")
    ax.set_ylabel("held-out perplexity / original's (2048 windows)")
    ax.set_title("gated model after 26M tokens (run 2); dotted: threshold model's\n"
                 "device-trained predictors, fraction read at their held-out recall", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    for run, style in (("run1_ste", "-"), ("run2_bce", "-")):
        rows = _curve(gdir / run / "curve.csv")
        bx.plot([r["step"] for r in rows], [r["kl"] for r in rows], style, lw=0.8,
                label=f"{run}: KL to the original" + (" (straight-through, one global clip)" if run == "run1_ste" else
                                                       " (BCE only, gates clipped apart)"))
    rows = _curve(gdir / "run2_bce" / "curve.csv")
    b2 = bx.twinx()
    b2.plot([r["step"] for r in rows], [r["gate_keep"] for r in rows], "k:", lw=1, label="run2 gate keep")
    b2.set_ylabel("fraction the gates let through (run 2)")
    bx.set_yscale("log")
    bx.set_xlabel("optimizer step (65,536 tokens)")
    bx.set_ylabel("KL(original || student), training batch")
    bx.legend(fontsize=7, loc="upper left")
    b2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "gated.png", dpi=130)
    print(f"wrote {out / 'gated.png'}")


if __name__ == "__main__":
    main()

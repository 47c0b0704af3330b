"""Report of a sparse-model campaign (``python3 -m sparsetrain.job``) from the tarballs the device calls returned.

Writes into ``--out`` (default results/relufy/campaign): ``arms.json`` (each arm's run record at the A/B point),
``final.json`` (the continued winner: record, held-out evaluation of the shipped artifact, probe), ``curve_<arm>.csv``,
``frontier.csv`` (held-out perplexity ratio vs FFN zeros, per corpus and window, for every model evaluated) and
``campaign.png``. All numbers are measured on the device machine by committed code (sparsetrain/).

    python3 experiments/sparse_campaign_report.py --ab AB_DIR --final FINAL_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CORPORA = ("kjv", "shakespeare", "pydoc", "wiki_eval")


def _last(path: Path) -> dict:
    return json.loads(path.read_text())["calls"][-1]


def _read_curve(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/sparse_campaign_report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ab", type=Path, required=True, help="the extracted ab.tar.gz of the A/B call")
    ap.add_argument("--final", type=Path, required=True, help="the extracted final.tar.gz of the continuation call")
    ap.add_argument("--out", type=Path, default=Path("results/relufy/campaign"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    arms = {arm: _last(args.ab / arm / "record.json") for arm in ("silu", "relu") if (args.ab / arm / "record.json").is_file()}
    final = json.loads((args.final / "final.json").read_text())
    winner = final["record"]["arm"]
    (out / "arms.json").write_text(json.dumps(arms, indent=1))
    (out / "final.json").write_text(json.dumps(final, indent=1))
    for name in ("teacher_eval.json", "generated.json"):
        shutil.copy(args.ab / name, out / name)
    # The winner's curve in the final call holds all its steps (A/B part included).
    curves = {arm: _read_curve(args.ab / arm / "curve.csv") for arm in arms if arm != winner}
    curves[f"{winner} (A/B, then continued)"] = _read_curve(args.final / winner / "curve.csv")
    for arm in arms:
        shutil.copy(args.ab / arm / "curve.csv", out / f"curve_{arm}.csv")
    shutil.copy(args.final / winner / "curve.csv", out / f"curve_{winner}_continued.csv")

    rows = []
    for label, rec in [*((f"{a} arm at the A/B point", r) for a, r in arms.items()),
                       (f"shipped ({winner}, continued)", {"frontier": final["frontier"]})]:
        for x in rec["frontier"]:
            rows.append({"model": label, **x})
    with (out / "frontier.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    for label, curve in curves.items():
        xs = [r["tokens"] / 1e6 for r in curve]
        ax[0].plot(xs, [r["kl"] for r in curve], label=f"{label}: KL", lw=1)
        ax[0].plot(xs, [1 - r["active_fraction"] for r in curve], ls=":", label=f"{label}: FFN zeros", lw=1)
    ax[0].set_xlabel("training tokens (millions)")
    ax[0].set_title("training (measured): KL to the original and FFN zeros")
    ax[0].legend(fontsize=7)
    styles = {"kjv": "o", "shakespeare": "s", "pydoc": "^", "wiki_eval": "D"}
    colors = {}
    for r in rows:
        if r["seq_len"] != 2048:
            continue
        c = colors.setdefault(r["model"], f"C{len(colors)}")
        ax[1].scatter(r["zeros"] * 100, r["ppl_ratio"], marker=styles.get(r["corpus"], "x"), color=c, s=18)
    for model, c in colors.items():
        pts = sorted((r["zeros"] * 100, r["ppl_ratio"]) for r in rows
                     if r["model"] == model and r["seq_len"] == 2048 and r["corpus"] == "kjv")
        ax[1].plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1, label=f"{model} (line: kjv)")
    for corpus, m in styles.items():
        ax[1].scatter([], [], marker=m, color="gray", label=corpus)
    ax[1].axhline(1.3, color="k", ls="--", lw=0.8)
    ax[1].axvline(85, color="k", ls=":", lw=0.8)
    ax[1].set_xlabel("FFN zeros on held-out text (%)")
    ax[1].set_ylabel("perplexity / original's (2048-token windows)")
    ax[1].set_title("held-out frontier (measured; thresholds recalibrated per point)")
    ax[1].legend(fontsize=7)
    for arm, rec in [*arms.items(), (f"{winner} shipped@0.9", {"probe_per_layer": final["probe"]["per_layer"]})]:
        per = rec["probe_per_layer"]
        ax[2].plot(range(len(per)), [p["predicted_active_fraction"] for p in per], label=f"{arm}: predicted (recall 0.95)")
        ax[2].plot(range(len(per)), [p["true_active_fraction"] for p in per], ls=":", label=f"{arm}: truly active")
    ax[2].set_xlabel("layer")
    ax[2].set_title("predictor probe (rank 128): fraction read at recall 0.95")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "campaign.png", dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

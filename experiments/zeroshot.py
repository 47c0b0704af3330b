"""Zero-shot BIG-bench multiple-choice accuracy: original SmolLM2 vs relufied (smollm2-relu), optionally vs the
original under the 80% threshold rule (the paper's Table 4 in spirit: Falcon-7B 74.62 -> 72.52 ARC-E when relufied).

    python experiments/zeroshot.py [--limit 30] [--tasks a,b,c] [--threshold]

Writes results/zeroshot/{zeroshot.csv, zeroshot.json, zeroshot.png, config.json}. Runs on the CPU in minutes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from llmflash.ffn import SparsityRule, install_dense_ffns
from llmflash.models import load_model
from llmflash.paths import repo_root
from llmflash.report import save_figure, write_csv
from llmflash.report import environment, write_json
from llmflash.sparsity import ActiveCounter, rule_for
from llmflash.zeroshot import BIGBENCH_VERSION, DEFAULT_TASKS, load_task, score_task

log = logging.getLogger("zeroshot")
OUT = repo_root() / "results" / "zeroshot"


def variants(with_threshold: bool) -> list[tuple[str, str, str]]:
    """(label, model alias, sparsity rule)."""
    out = [("smollm2", "smollm2", "relu"), ("smollm2-relu", "smollm2-relu", "relu")]
    if with_threshold:
        out.append(("smollm2 threshold 80%", "smollm2", "threshold"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=30, help="examples per task (seeded random subset)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--threshold", action="store_true", help="also score the original under the 80%% threshold rule")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    tasks = [load_task(name, limit=args.limit) for name in args.tasks.split(",")]
    rows, summary = [], {}
    for label, alias, sparsity in variants(args.threshold):
        model, tok, _ = load_model(alias)
        rule = rule_for(model, tok, "threshold", 0.8, cache_key="smollm2") if sparsity == "threshold" else SparsityRule("relu")
        n_layers = model.config.num_hidden_layers
        counter = ActiveCounter(n_layers)
        install_dense_ffns(model, rule, observer=counter)
        accs = []
        for task in tasks:
            res = score_task(model, tok, task)
            rows.append({"model": label, **res})
            accs.append(res)
            log.info("%s %s: acc %.3f acc_norm %.3f (chance %.3f, n %d)", label, task.name, res["acc"], res["acc_norm"],
                     res["chance"], res["n"])
        summary[label] = {"mean_acc": float(np.mean([r["acc"] for r in accs])),
                          "mean_acc_norm": float(np.mean([r["acc_norm"] for r in accs])),
                          "ffn_active_fraction": counter.overall()}
        log.info("%s: mean acc %.3f, FFN active %.3f", label, summary[label]["mean_acc"], counter.overall())
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "zeroshot.csv", rows)
    write_json(args.out / "zeroshot.json", {"per_task": rows, "summary": summary})
    write_json(args.out / "config.json", {
        "benchmark": f"BIG-bench {BIGBENCH_VERSION} JSON tasks (sdist, read with tarfile, not installed)",
        "tasks": [{"name": t.name, "examples_used": len(t.examples), "examples_in_task": t.total_examples,
                   "chance": t.chance} for t in tasks],
        "limit_per_task": args.limit, "subset": "seeded random subset (numpy RandomState(0)), stable order",
        "format": "BIG-bench default zero-shot format (choices appended to the input where the task says so)",
        "scoring": "sum of log-probabilities of the choice tokens (acc); per byte of the choice (acc_norm)",
        "task_choice": "short-input English multiple-choice tasks, chosen by input length before any scoring",
        "models": [{"label": v[0], "model": v[1], "sparsity": v[2]} for v in variants(args.threshold)],
        "wall_s": round(time.time() - t0, 1), "environment": environment(), "command": "python experiments/zeroshot.py",
    })
    plot(rows, summary, args.out / "zeroshot.png")


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    x = np.arange(len(tasks) + 1)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for i, label in enumerate(labels):
        acc = [next(r["acc"] for r in rows if r["model"] == label and r["task"] == t) for t in tasks]
        acc.append(summary[label]["mean_acc"])
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, acc, width, label=f"{label} (FFN active {summary[label]['ffn_active_fraction']:.0%})")
    chance = [next(r["chance"] for r in rows if r["task"] == t) for t in tasks]
    chance.append(float(np.mean(chance)))
    ax.scatter(x, chance, marker="_", s=300, color="black", label="chance", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([t.replace("_", "\n") for t in tasks] + ["MEAN"], fontsize=7)
    ax.set_ylabel("zero-shot accuracy")
    ax.set_title("BIG-bench multiple choice, zero-shot log-likelihood (SmolLM2-135M)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_ylim(0, 1)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

"""Zero-shot BIG-bench multiple-choice accuracy: original SmolLM2 vs relufied (smollm2-relu), the relufied model in
predictor mode (issue 4: neurons its predictors miss are really missing, window k=4), and optionally the original under
the 80% threshold rule (the paper's Table 4 in spirit: Falcon-7B 74.62 -> 72.52 ARC-E when relufied).

The relufied model's oracle mode computes exactly its true active set, so its oracle accuracy is the smollm2-relu row.

    python experiments/zeroshot.py [--limit 30] [--tasks a,b,c] [--variants smollm2,smollm2-relu,predictor,threshold]
                                   [--reuse [--rescore predictor]] [--original smollm2] [--sparse smollm2-relu]
                                   [--predictors DIR]

The variants name roles: ``smollm2`` is the original model (``--original``), ``smollm2-relu`` the relufied one
(``--sparse``, with its committed predictors unless ``--predictors``); other models (aliases or model directories, e.g.
tiny ones in the test suite's end-to-end tier) take their places and name the rows.

Writes results/zeroshot/{zeroshot.csv, zeroshot.json, zeroshot.png, config.json}. Runs on the CPU in minutes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from llmflash.arch import install_dense_ffns
from llmflash.models import load_model, resolve
from llmflash.paths import repo_root
from llmflash.report import environment, save_figure, write_csv, write_json
from llmflash.sparsity import ActiveCounter, rule_for
from research.zeroshot import BIGBENCH_VERSION, DEFAULT_TASKS, load_task, score_task

log = logging.getLogger("zeroshot")
OUT = repo_root() / "results" / "zeroshot"


PREDICTOR_WINDOW = 4
VARIANTS = {  # key: (label, model alias, sparsity rule or "predictor"); the aliases stand for --original / --sparse
    "smollm2": ("smollm2", "smollm2", "relu"),
    "smollm2-relu": ("smollm2-relu", "smollm2-relu", "relu"),
    "predictor": (f"smollm2-relu predictor k={PREDICTOR_WINDOW}", "smollm2-relu", "predictor"),
    "threshold": ("smollm2 threshold 80%", "smollm2", "threshold"),
}


def variants(keys: str, original: str = "smollm2", sparse: str = "smollm2-relu") -> list[tuple[str, str, str]]:
    """(label, model, sparsity rule) for a comma-separated list of VARIANTS keys, ``original`` and ``sparse`` in the
    places of smollm2 and smollm2-relu (in the labels too)."""
    unknown = [k for k in keys.split(",") if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    models = {"smollm2": original, "smollm2-relu": sparse}
    out = []
    for k in keys.split(","):
        label, alias, rule = VARIANTS[k]  # every label starts with its alias
        out.append((models[alias] + label[len(alias):], models[alias], rule))
    return out


def previous_rows(out: Path, tasks: list, limit: int) -> tuple[list[dict], dict]:
    """Rows and summaries of an earlier run with the same tasks and limit (for --reuse), else nothing."""
    import json

    try:
        cfg = json.loads((out / "config.json").read_text())
        old = json.loads((out / "zeroshot.json").read_text())
    except (OSError, ValueError):
        return [], {}
    if cfg.get("limit_per_task") != limit or [t["name"] for t in cfg.get("tasks", [])] != [t.name for t in tasks]:
        return [], {}
    return old["per_task"], old["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=30, help="examples per task (seeded random subset)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--variants", default="smollm2,smollm2-relu,predictor",
                    help=f"comma-separated, from: {', '.join(VARIANTS)} (threshold: the original under the 80%% rule)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the rows of variants already in --out (same tasks and limit) instead of scoring them again")
    ap.add_argument("--rescore", default="", help="with --reuse: comma-separated variants to score again anyway")
    ap.add_argument("--original", default="smollm2", help="the original model (an alias or a model directory)")
    ap.add_argument("--sparse", default="smollm2-relu", help="the relufied model (an alias or a model directory)")
    ap.add_argument("--predictors", default=None,
                    help="the predictors of the predictor variant (default: the relufied model's committed ones)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    tasks = [load_task(name, limit=args.limit) for name in args.tasks.split(",")]
    chosen = variants(args.variants, args.original, args.sparse)
    old_rows, old_summary = previous_rows(args.out, tasks, args.limit) if args.reuse else ([], {})
    rows, summary, reused = [], {}, []
    rescore = {label for label, _, _ in variants(args.rescore, args.original, args.sparse)} if args.rescore else set()
    for label, alias, sparsity in chosen:
        if label in old_summary and label not in rescore:
            rows += [r for r in old_rows if r["model"] == label]
            summary[label] = old_summary[label]
            reused.append(label)
            log.info("%s: reused from %s", label, args.out)
            continue
        model, tok, _ = load_model(alias)
        # A model's own rule (the sparse smollm2-relu's trained thresholds), else exact zeros; the original under the
        # calibrated 80% threshold rule for the "threshold" variant.
        rule = (rule_for(model, tok, "threshold", 0.8, cache_key=resolve(alias).name) if sparsity == "threshold"
                else rule_for(model, tok, "auto"))
        n_layers = model.config.num_hidden_layers
        counter = ActiveCounter(n_layers)
        mask_fn = None
        if sparsity == "predictor":
            from llmflash.models import predictor_dir
            from llmflash.predictor import PredictorSet
            from predictors import default_predictors, window_mask_fn

            found = args.predictors or default_predictors(resolve(alias).name)
            if found is None:
                raise SystemExit(f"the predictor variant needs --predictors: {alias} has no committed predictors")
            pset = PredictorSet.load(predictor_dir(found))
            pset.check_model(model, alias)
            mask_fn = window_mask_fn(pset, PREDICTOR_WINDOW)
        t_variant = time.time()
        install_dense_ffns(model, rule, observer=counter, mask_fn=mask_fn)
        accs = []
        for task in tasks:
            res = score_task(model, tok, task)
            rows.append({"model": label, **res})
            accs.append(res)
            log.info("%s %s: acc %.3f acc_norm %.3f (chance %.3f, n %d)", label, task.name, res["acc"], res["acc_norm"],
                     res["chance"], res["n"])
        summary[label] = {"mean_acc": float(np.mean([r["acc"] for r in accs])),
                          "mean_acc_norm": float(np.mean([r["acc_norm"] for r in accs])),
                          "ffn_active_fraction": counter.overall(), "wall_s": round(time.time() - t_variant, 1)}
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
        "models": [{"label": v[0], "model": v[1], "sparsity": v[2]} for v in chosen],
        "predictor_mode": f"{args.predictors or 'committed predictors of ' + args.sparse}, window union of the last "
                          f"{PREDICTOR_WINDOW} tokens' predicted sets (llmflash.predictors window_mask_fn); missed "
                          "neurons are really missing",
        "oracle": "oracle mode computes exactly the true active set: its accuracy is the smollm2-relu row",
        "reused_from_earlier_run": reused,
        "wall_s": round(time.time() - t0, 1), "environment": environment(),
        "command": "python experiments/zeroshot.py " + " ".join(__import__("sys").argv[1:]),
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
        active = summary[label]["ffn_active_fraction"]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, acc, width, label=f"{label} (FFN active {active:.0%})")
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

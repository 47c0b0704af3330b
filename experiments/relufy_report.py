"""Turn the relufication runs' raw outputs (results/relufy/v1/raw, brought back from the GPU) into results/relufy/v1/.

    python experiments/relufy_report.py [--dir results/relufy/v1] [--out DIR]   (default --out: --dir)

Reads raw/final (the shipped run: curve, frontier, config, log), raw/sweep-* (the first GPU call), raw/layer and
raw/layer-r56 (per-layer steering, plan layer2 of sparsetrain/relufy_v1_device.py, not shipped), cpu_eval.json
(experiments/relufy_cpu_eval.py) and results/threshold_curve/threshold_curve.csv if present. Writes curve.csv,
curve.png (loss, sparsity and held-out perplexity vs step), frontier.csv + frontier.png (sparsity vs perplexity ratio,
every point labelled with where it was measured) and config.json (recipe, data, hardware, device time, commands).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from llmflash.paths import atomic_file, repo_root
from llmflash.report import save_figure
from llmflash.report import write_json

RESULTS = repo_root() / "results" / "relufy" / "v1"
THRESHOLD = repo_root() / "results" / "threshold_curve" / "threshold_curve.csv"
# Device time this work spent (from the device tool's lease reports): stage 0.6 min + sweep 9.1 + stage 0.9 + final 8.2.
DEVICE_MINUTES = {"staging call 1": 0.6, "sweep (4 runs x 100 s)": 9.1, "staging call 2": 0.9, "final run": 8.2,
                  "per-layer runs (plan layer2, 2 runs side by side, staging excluded)": 8.6}
# Plan layer2 of sparsetrain/relufy_v1_device.py (run with '{"time_budget_s": 450}'): --steer layer, both runs on one H100.
PER_LAYER_RUNS = {"layer": "rank 40, ramp 0.55", "layer-r56": "rank 56, ramp 0.75"}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def num(x) -> float:
    return float(x) if x not in (None, "") else float("nan")


def frontier_rows(src: Path = RESULTS) -> list[dict]:
    """Every measured point of the runs under ``src/raw`` (and ``src/cpu_eval.json``)."""
    raw = src / "raw"
    rows = []
    final_cfg = json.loads((raw / "final" / "relufy_config.json").read_text())
    teacher8k = final_cfg["results"]["teacher_ppl"]
    for r in read_csv(raw / "final" / "curve.csv"):
        if r.get("eval_ppl"):
            rows.append({"kind": "ramp", "run": "final", "step": int(r["step"]), "where": "GPU fp32 (TF32 matmuls)",
                         "eval_tokens": 8176, "active_fraction": num(r["eval_active_fraction"]), "ppl": num(r["eval_ppl"]),
                         "reference_ppl": teacher8k, "ppl_ratio": num(r["eval_ppl_ratio"])})
    for r in read_csv(raw / "final" / "frontier.csv"):
        rows.append({"kind": r["kind"], "run": "final", "step": int(r["step"]), "where": "GPU fp32 (TF32 matmuls)",
                     "eval_tokens": int(r["eval_tokens"]), "active_fraction": num(r["eval_active_fraction"]),
                     "ppl": num(r["eval_ppl"]), "reference_ppl": num(r["teacher_ppl"]), "ppl_ratio": num(r["ppl_ratio"]),
                     "extra_shift_sigma": num(r["extra_shift_sigma"])})
    for sweep in sorted(raw.glob("sweep-*")):
        for r in read_csv(sweep / "frontier.csv"):
            rows.append({"kind": "sweep", "run": sweep.name, "step": int(r["step"]), "where": "GPU fp32 (TF32 matmuls)",
                         "eval_tokens": int(r["eval_tokens"]), "active_fraction": num(r["eval_active_fraction"]),
                         "ppl": num(r["eval_ppl"]), "reference_ppl": num(r["teacher_ppl"]), "ppl_ratio": num(r["ppl_ratio"])})
    for name in PER_LAYER_RUNS:  # the second GPU call (plan layer2): --steer layer, not shipped
        if not (raw / name).is_dir():
            continue
        cfg = json.loads((raw / name / "relufy_config.json").read_text())
        for r in read_csv(raw / name / "curve.csv"):
            if r.get("eval_ppl"):
                rows.append({"kind": "layer_ramp", "run": name, "step": int(r["step"]), "where": "GPU fp32 (TF32 matmuls)",
                             "eval_tokens": 8176, "active_fraction": num(r["eval_active_fraction"]), "ppl": num(r["eval_ppl"]),
                             "reference_ppl": cfg["results"]["teacher_ppl"], "ppl_ratio": num(r["eval_ppl_ratio"])})
        for r in read_csv(raw / name / "frontier.csv"):
            rows.append({"kind": "layer_" + r["kind"], "run": name, "step": int(r["step"]), "where": "GPU fp32 (TF32 matmuls)",
                         "eval_tokens": int(r["eval_tokens"]), "active_fraction": num(r["eval_active_fraction"]),
                         "ppl": num(r["eval_ppl"]), "reference_ppl": num(r["teacher_ppl"]), "ppl_ratio": num(r["ppl_ratio"]),
                         "extra_shift_sigma": num(r["extra_shift_sigma"])})
    cpu = src / "cpu_eval.json"
    if cpu.is_file():
        data = json.loads(cpu.read_text())
        for label, r in data["results"].items():
            if label == "smollm2":
                continue
            rows.append({"kind": "cpu", "run": label, "step": "", "where": "CPU fp32 (llmflash.evaluate.perplexity)",
                         "eval_tokens": r["tokens"], "active_fraction": r["ffn_active_fraction"], "ppl": r["ppl"],
                         "reference_ppl": data["results"]["smollm2"]["ppl"], "ppl_ratio": r["ppl_ratio"]})
    for r in rows:
        r["sparsity"] = 1.0 - r["active_fraction"]
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [int(r["step"]) for r in curve[1:]]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 8), sharex=True)
    axes[0].plot(step, [num(r["kl"]) for r in curve[1:]], lw=0.7, label="KL(teacher || student), train batch")
    axes[0].plot(step, [num(r["loss"]) for r in curve[1:]], lw=0.7, alpha=0.6, label="loss (KL + L1 term)")
    axes[0].set_ylabel("nats / token")
    axes[0].legend(fontsize=8)
    axes[1].plot(step, [num(r["target_sparsity"]) for r in curve[1:]], "k--", lw=1, label="target (ramp)")
    axes[1].plot(step, [num(r["sparsity"]) for r in curve[1:]], lw=0.7, label="train batch")
    ev = [r for r in curve if r.get("eval_ppl")]
    axes[1].plot([int(r["step"]) for r in ev], [1 - num(r["eval_active_fraction"]) for r in ev], "o", ms=3, label="held-out (wiki:eval)")
    axes[1].axhline(0.9, color="grey", lw=0.8, ls=":")
    axes[1].set_ylabel("FFN sparsity")
    axes[1].set_ylim(0.6, 1.0)
    axes[1].legend(fontsize=8)
    axes[2].semilogy([int(r["step"]) for r in ev], [num(r["eval_ppl_ratio"]) for r in ev], "o-", ms=3)
    axes[2].axhline(1.3, color="grey", lw=0.8, ls=":")
    axes[2].set_ylabel("held-out ppl / original")
    axes[2].set_xlabel("step (16,384 tokens each)")
    fig.suptitle("Relufying SmolLM2-135M on one H100 (the shipped run, 7 min of training)", fontsize=10)
    save_figure(fig, path)


def plot_frontier(rows: list[dict], path: Path, threshold: Path = THRESHOLD) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    styles = {"ramp": ("o", "final run, held-out evals along the ramp"), "trained": ("s", "final run, end (65k tokens)"),
              "posthoc_shift": ("^", "final run + extra uniform shift (no training)"), "sweep": ("x", "first GPU call (L1 controller)"),
              "cpu": ("*", "shipped smollm2-relu, CPU")}
    for kind, (marker, label) in styles.items():
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            ax.plot([r["sparsity"] for r in sel], [r["ppl_ratio"] for r in sel], marker, ls="", label=label,
                    ms=12 if kind == "cpu" else 5)
    for name, (marker, color) in zip(PER_LAYER_RUNS, (("P", "tab:brown"), ("X", "tab:pink"))):
        ramp = [r for r in rows if r["run"] == name and r["kind"] == "layer_ramp"]
        end = [r for r in rows if r["run"] == name and r["kind"] == "layer_trained"]
        if ramp:
            ax.plot([r["sparsity"] for r in ramp], [r["ppl_ratio"] for r in ramp], marker, ls="", color=color, ms=4, alpha=0.5,
                    label=f"per-layer steering (not shipped), {PER_LAYER_RUNS[name]}: evals along the ramp")
        if end:
            ax.plot([r["sparsity"] for r in end], [r["ppl_ratio"] for r in end], marker, ls="", color=color, ms=10,
                    markeredgecolor="black", label=f"per-layer steering (not shipped), {PER_LAYER_RUNS[name]}: end (65k tokens)")
    if threshold.is_file():
        th = [r for r in read_csv(threshold) if r["rule"] == "threshold"]
        ax.plot([1 - num(r["active_fraction"]) for r in th], [num(r["ppl_ratio"]) for r in th], "d-", color="grey",
                label="original + threshold rule (no training, CPU)")
    ax.axhline(1.3, color="grey", lw=0.8, ls="--")
    ax.axvline(0.9, color="grey", lw=0.8, ls="--")
    ax.fill_between([0.9, 1.0], 0.9, 1.3, color="green", alpha=0.08, label="issue 3 goal")
    ax.set_yscale("log")
    ax.set_xlim(0.45, 1.0)
    ax.set_xlabel("FFN sparsity on wiki:eval (1 - active fraction)")
    ax.set_ylabel("perplexity / original SmolLM2's")
    ax.set_title("SmolLM2-135M relufication frontier (held-out wiki:eval)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/relufy_report.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=RESULTS, help="the runs' directory: raw/ and cpu_eval.json "
                                                               "(default results/relufy/v1)")
    ap.add_argument("--threshold", type=Path, default=THRESHOLD,
                    help="the threshold rule's curve drawn beside (default results/threshold_curve/threshold_curve.csv)")
    ap.add_argument("--out", type=Path, default=None, help="where the report goes (default: --dir)")
    args = ap.parse_args()
    src, raw = args.dir, args.dir / "raw"
    out = args.out or src
    out.mkdir(parents=True, exist_ok=True)
    curve = read_csv(raw / "final" / "curve.csv")
    shutil.copy(raw / "final" / "curve.csv", out / "curve.csv")
    plot_curve(curve, out / "curve.png")
    rows = frontier_rows(src)
    write_rows(out / "frontier.csv", rows)
    plot_frontier(rows, out / "frontier.png", args.threshold)
    final_cfg = json.loads((raw / "final" / "relufy_config.json").read_text())
    cpu = json.loads((src / "cpu_eval.json").read_text()) if (src / "cpu_eval.json").is_file() else None
    write_json(out / "config.json", {
        "shipped": "llmflash/artifacts/smollm2-relu (the final run's --out, 15.6 MB)",
        "recipe": final_cfg["config"] | {"steer": "global"},
        "recipe_notes": [
            "steer=global: all layers' shifts moved by one multiple of sigma_l from the overall active fraction "
            "(the only steering the code had then; `--steer layer` was added after this run)",
            "loss = KL(teacher || student) on all logits (teacher = original SmolLM2, frozen, SiLU) + L1 weight "
            "(rising linearly to 0.3 over the ramp) x mean_l mean relu(z)/sigma_l; no cross-entropy on the text",
            "trainable: LoRA rank 40 on gate/up/down (fp16 in the artifact), per-neuron shifts, RMSNorm weights",
        ],
        "data": final_cfg["data"],
        "hardware": final_cfg["hardware"], "time": final_cfg["time"], "software": final_cfg["software"],
        "gpu_results": final_cfg["results"],
        "cpu_results": cpu,
        "device_minutes": DEVICE_MINUTES | {"total": round(sum(DEVICE_MINUTES.values()), 1)},
        "commands": {
            "final run (GPU)": "python3 sparsetrain/relufy_v1_device.py run final   (after `stage-a`; see the script's docstring)",
            "same, as a command": "python3 -m sparsetrain.relufy_v1 smollm2 --out OUT --shift --target-sparsity 0.905 --steer global "
                                  "--ramp-frac 0.55 --anneal-frac 0.1 --l1-final 0.3 --ffn-rank 40 --attn-rank 0 "
                                  "--batch-tokens 16384 --micro-batch-tokens 16384 --lr 1e-3 --bias-lr 2e-3 --time-budget-s 465 "
                                  "--steps 100000 --eval-every 50 --final-eval-tokens 65536 --posthoc 0.92,0.94,0.96 "
                                  "--keep-sparsities 0.85 --device cuda",
            "per-layer runs (GPU, not shipped)": "python3 sparsetrain/relufy_v1_device.py run layer2 '{\"time_budget_s\": 450}'   "
                                                 "(outputs in raw/layer, raw/layer-r56)",
            "CPU measurement": "python experiments/relufy_cpu_eval.py",
            "diagnostics (CPU)": "OMP_NUM_THREADS=2 python3 experiments/relufy_diagnostics.py",
            "this report": "python experiments/relufy_report.py",
        },
    })


if __name__ == "__main__":
    main()

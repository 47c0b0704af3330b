"""Figure 7: latency per token versus the DRAM budget (35% to 80% of the model's bytes), measured.

For each budget: ours (predictor + window k=5 + bundling; the neuron cache gets whatever the budget leaves after the
resident weights, predictors and staging buffer) and hybrid (as many FFN layers resident as fit, the rest streamed
every token; not run on the scale model in --quick), and ours on the Python path (``ours_python``: no native step,
Python reader threads, the engine's reference; same exceptions). A budget below a mode's minimum is recorded as such (the engine
refuses it and states the minimum, which the figure marks). ``--replot`` only redraws the figure from OUT's CSV.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

from llmflash.errors import BudgetError

import common
import engine_runs

FULL = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.70, 0.80)
QUICK = {"real": (0.35, 0.45, 0.50, 0.65, 0.80), "scale": (0.40, 0.50, 0.65)}


def main() -> None:
    p = common.parser("dram_budget", __doc__)
    p.add_argument("--budgets", default=None, help="comma-separated fractions (default: 0.35..0.8)")
    p.add_argument("--hybrid", choices=("auto", "yes", "no"), default="auto",
                   help="also run hybrid (auto: yes except for the scale model in --quick)")
    p.add_argument("--python-path", choices=("auto", "yes", "no"), default="auto",
                   help="also run ours on the Python path (no native step, Python reader threads: the reference) "
                        "(auto: yes except for the scale model in --quick)")
    p.add_argument("--replot", action="store_true", help="only redraw the figure from OUT/dram_budget.csv")
    args = p.parse_args()
    if args.replot:
        plot(read_rows(args.out / "dram_budget.csv"), args.out / "dram_budget.png")
        return
    table = engine_runs.load_bandwidth(16)
    setups = common.setups(args)
    rows, data = [], {"models": {}}
    for kind, setup in setups:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else (QUICK[kind] if args.quick else FULL)
        modes = ["ours"]
        if args.python_path == "yes" or (args.python_path == "auto" and not (args.quick and kind == "scale")):
            modes.append("ours_python")
        if args.hybrid == "yes" or (args.hybrid == "auto" and not (args.quick and kind == "scale")):
            modes.append("hybrid")
        runs = []
        for mode in modes:
            for b in budgets:
                print(f"[{setup['model']}] {mode} at {b:.0%} ...", flush=True)
                try:
                    r = engine_runs.standard_run(setup, mode, args.quick, budget=b, table=table)
                except BudgetError as err:
                    rows.append({"model": setup["model"], "mode": mode, "budget": b, "error": str(err),
                                 "minimum": minimum_of(str(err))})
                    print("    ", err)
                    continue
                s = r["summary"]
                runs.append(r)
                rows.append({"model": setup["model"], "mode": mode, "budget": b, "dram_fraction": r["dram_fraction"],
                             "ms_per_token": s["ms_per_token"], "io_ms": s["io_ms"], "mem_ms": s["mem_ms"],
                             "compute_ms": s["compute_ms"], "gb_read_per_token": s["bytes_read_per_token"] / 1e9,
                             "cache_rows_per_layer": r["cache_rows"], "hybrid_resident_layers": r["hybrid_resident_layers"],
                             "tokens_measured": s["tokens_measured"], "label": "measured"})
                print(f"     {s['ms_per_token']:.0f} ms/token, {s['bytes_read_per_token'] / 1e6:.1f} MB/token")
        data["models"][setup["model"]] = {"setup": setup, "runs": runs}
    common.save(args.out, "dram_budget", args, data=data, rows=rows, extra_config={"setups": [s for _, s in setups]})
    plot(rows, args.out / "dram_budget.png")


def minimum_of(error: str) -> Optional[float]:
    """The minimum budget (a fraction of the model) an engine's ``BudgetError`` states."""
    m = re.search(r"below the minimum ([0-9.]+)", error)
    return float(m.group(1)) if m else None


def read_rows(path: Path) -> list[dict]:
    """The rows ``main`` wrote to CSV, numbers as numbers (empty cells dropped); a refused budget's minimum is taken
    from its error where the CSV predates the ``minimum`` column."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            r: dict = {}
            for k, v in raw.items():
                if v in ("", None):
                    continue
                try:
                    r[k] = float(v)
                except ValueError:
                    r[k] = v
            if "error" in r and "minimum" not in r:
                r["minimum"] = minimum_of(r["error"])
            rows.append(r)
    return rows


def plot(rows: list[dict], png) -> None:
    plt = common.plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), squeeze=False)
    for ax, m in zip(axes[0], models):
        missing = []
        for mode, col in (("ours", "tab:blue"), ("ours_python", "tab:orange"), ("hybrid", "tab:grey")):
            rs = sorted((r for r in rows if r["model"] == m and r["mode"] == mode and "ms_per_token" in r),
                        key=lambda r: r["budget"])
            minima = {r["minimum"] for r in rows if r["model"] == m and r["mode"] == mode and r.get("minimum")}
            if not rs and not minima:
                if mode != "ours_python":  # an engine variant, not a method the caption promises
                    missing.append(mode)
                continue
            if rs:
                ax.plot([r["budget"] * 100 for r in rs], [r["ms_per_token"] for r in rs], "o-", color=col,
                        label=f"{mode}: total per token")
            if mode == "ours" and rs:
                ax.plot([r["budget"] * 100 for r in rs], [r["io_ms"] for r in rs], "s--", color=col, alpha=0.6,
                        label="ours: flash I/O part")
            for lo in sorted(minima):  # one per mode: the engine's minimum for this model
                ax.axvline(lo * 100, color=col, ls=":", lw=1.5, alpha=0.8, label=f"{mode}: minimum budget ({lo:.1%})")
        ax.set_yscale("log")
        ax.set_xlabel("DRAM budget (% of the model's weight bytes)")
        ax.set_ylabel("latency per token (ms, median, log scale)")
        note = f"; {' and '.join(missing)} not run for this model" if missing else ""
        ax.set_title(f"{m}: latency vs DRAM budget\n(measured; dotted: the mode's minimum budget{note})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

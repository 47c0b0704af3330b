"""Figure 7: latency per token versus the DRAM budget (35% to 80% of the model's bytes), measured.

For each budget: ours (predictor + window k=5 + bundling; the neuron cache gets whatever the budget leaves after the
resident weights, predictors and staging buffer) and hybrid (as many FFN layers resident as fit, the rest streamed
every token). A budget below a mode's minimum is recorded as such (the engine refuses it and states the minimum).
"""

from __future__ import annotations

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
    args = p.parse_args()
    table = engine_runs.load_bandwidth(16)
    setups = common.setups(args)
    rows, data = [], {"models": {}}
    for kind, setup in setups:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else (QUICK[kind] if args.quick else FULL)
        modes = ["ours"]
        if args.hybrid == "yes" or (args.hybrid == "auto" and not (args.quick and kind == "scale")):
            modes.append("hybrid")
        runs = []
        for mode in modes:
            for b in budgets:
                print(f"[{setup['model']}] {mode} at {b:.0%} ...", flush=True)
                try:
                    r = engine_runs.standard_run(setup, mode, args.quick, budget=b, table=table)
                except BudgetError as err:
                    rows.append({"model": setup["model"], "mode": mode, "budget": b, "error": str(err)})
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


def plot(rows: list[dict], png) -> None:
    plt = common.plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for mode, col in (("ours", "tab:blue"), ("hybrid", "tab:grey")):
            rs = sorted((r for r in rows if r["model"] == m and r["mode"] == mode and "ms_per_token" in r),
                        key=lambda r: r["budget"])
            if not rs:
                continue
            ax.plot([r["budget"] * 100 for r in rs], [r["ms_per_token"] for r in rs], "o-", color=col,
                    label=f"{mode}: total per token")
            if mode == "ours":
                ax.plot([r["budget"] * 100 for r in rs], [r["io_ms"] for r in rs], "s--", color=col, alpha=0.6,
                        label="ours: flash I/O part")
            bad = [r for r in rows if r["model"] == m and r["mode"] == mode and "error" in r]
            for r in bad:
                ax.axvline(r["budget"] * 100, color=col, ls=":", alpha=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("DRAM budget (% of the model's weight bytes)")
        ax.set_ylabel("latency per token (ms, median, log scale)")
        ax.set_title(f"{m}: latency vs DRAM budget (measured; dotted: below the mode's minimum)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

"""Table 3: end-to-end latency per token, split into flash I/O, memory management and compute (measured). Modes at half
the model in DRAM (dense: everything in DRAM, the reference): dense, naive, hybrid and ours (hybrid + predictor +
window k=5 + bundling) with two engine variants beside it (issue 15): ours_python (the Python path: no native step,
Python reader threads; the reference the native parts must equal) and ours_lookahead (layer l + 1's guessed rows read
while layer l computes), and for the real model ours_coact (ours on the file reordered by co-activation, beyond the
paper: see experiments/ablation.py), ours_coact_hot (that file with PowerInfer's cache policy: each layer's most
often needed neurons, counted at engine start, pinned in half its cache rows, the window managing the rest), and
ours_lfu / ours_coact_lfu (the LFU cache policy: decayed use counts, a newcomer entering only in place of a neuron worth
less; ``llmflash.cache_policy.LFUPolicy``). Each row's I/O floor (``floor_ms``, computed): its reads at the disk's
profiled throughput for their sizes (results/profile_io); ``x_floor`` = ms per token / floor. Times
are medians over generated tokens (after a warm-up of the window for the
sparse mode), added serially as in the paper: total = I/O + memory management + compute. This machine's disk and CPU
drift by up to 1.5x within minutes, so for the real model naive and the sparse rows are also measured again
``--repeats`` - 1 more times, alternating, and the speedup is reported as the median (and range) of the per-repeat
ratios as well as from the table's single run. The real model's sparse mode uses its predictors when they exist, else
the true (oracle) sets; the scale model's uses the trace source's predicted sets (simulated), with a real low-rank
predictor of the paper's size computed every token. The dense row of the scale model needs ~14 GB of free memory: it
is skipped in --quick and when that memory is not available.

Metric names follow ``llmflash.metrics`` (one definition each). Since issue 14, ``read_gbps`` / ``gbps_measured`` is
bytes / the time reads were in flight and ``read_efficiency`` = ``read_gbps`` / ``computed_gbps`` (in [0, 1] up to
profile noise); committed CSVs written before that hold bytes / I/O wait time in the first and computed / waited I/O
time in the second (hence "efficiencies" of 1.86-2.53 where reads overlap compute).
"""

from __future__ import annotations

import statistics

from llmflash.convert import RESIDENT_DTYPES

import common
import engine_runs

# ours' engine variants (issue 15) beside it: the Python path (the reference) and lookahead
ORDER = ["dense", "naive", "hybrid", "ours", "ours_python", "ours_lookahead", "ours_coact", "ours_coact_hot", "ours_lfu",
         "ours_coact_lfu"]
REAL_ONLY = engine_runs.COACT_ROWS + ("ours_lfu",)  # rows the scale model does not run
PAPER = {  # Table 3, OPT-6.7B on the CPU (M1 Max), ms: I/O, memory management, compute, total
    "naive": (2196, 0, 986, 3182), "ours": (105, 58, 506, 669),
}


def free_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = common.parser("latency", __doc__)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=None,
                   help="real model: alternating naive / sparse repeats for the speedup's median (default 3, full 5)")
    p.add_argument("--compute-threads", type=int, default=None,
                   help="torch threads (default: the engine's auto: see EngineConfig.compute_threads)")
    p.add_argument("--resident-dtype", default="auto", choices=RESIDENT_DTYPES,
                   help="real model: its resident weights as converted (auto: float32) or in int8 (the demo's "
                        "directory: convert --resident-dtype int8)")
    args = p.parse_args()
    table = engine_runs.load_bandwidth(16)
    setups = []
    if common.wanted(args, "real"):
        setups.append(common.real_setup(args.model, resident_dtype=args.resident_dtype))
    if common.wanted(args, "scale"):
        setups.append(common.scale_setup())
    data: dict = {"paper_opt_6_7b_cpu": PAPER, "models": {}}
    rows = []
    for setup in setups:
        runs = {}
        for key in ORDER:
            if key in REAL_ONLY and "geometry" in setup:
                continue
            if key == "dense" and "geometry" in setup:
                need = open_model_bytes(setup) + (4 << 30)
                if args.quick:
                    print(f"[{setup['model']}] dense skipped in --quick (13.3 GB of DRAM, ~1 min to load)")
                    runs[key] = None
                    continue
                if free_bytes() < need:
                    print(f"[{setup['model']}] dense skipped: {free_bytes() / 1e9:.1f} GB available, needs "
                          f"{need / 1e9:.1f} GB")
                    runs[key] = None
                    continue
            print(f"[{setup['model']}] {key} ...", flush=True)
            runs[key] = engine_runs.standard_run(setup, key, args.quick, budget=1.0 if key == "dense" else args.budget,
                                            table=table, compute_threads=args.compute_threads)
        data["models"][setup["model"]] = {"setup": setup, "runs": runs}
        naive = runs["naive"]["summary"]["ms_per_token"]
        ratios = repeated_speedups(setup, runs, args, table) if "geometry" not in setup else {}
        data["models"][setup["model"]]["repeated_speedups"] = ratios
        for key in ORDER:
            if key not in runs:
                continue
            r = runs[key]
            if r is None:
                rows.append({"model": setup["model"], "method": key, "skipped": "--quick or not enough free memory"})
                continue
            s = r["summary"]
            rows.append({"model": setup["model"], "method": key, "mode": r["mode"], "io_ms": s["io_ms"],
                         "mem_ms": s["mem_ms"], "compute_ms": s["compute_ms"], "total_ms": s["ms_per_token"],
                         "sum_of_parts_ms": s["io_ms"] + s["mem_ms"] + s["compute_ms"],
                         "predictor_ms": s["predictor_ms"], "tokens_per_s": s["tokens_per_s"],
                         "speedup_vs_naive": naive / s["ms_per_token"], "dram_fraction": r["dram_fraction"],
                         "gb_read_per_token": s["bytes_read_per_token"] / 1e9, "read_gbps": s["read_gbps"],
                         "read_efficiency": s.get("read_efficiency"), "reads_per_token": s["reads_per_token"],
                         "floor_ms": s.get("computed_io_ms"),
                         "x_floor": s["ms_per_token"] / s["computed_io_ms"] if s.get("computed_io_ms") else None,
                         "tokens_measured": s["tokens_measured"],
                         "label": "measured", "shared_from": r.get("shared_from"),
                         **({"speedup_median_of_repeats": statistics.median(ratios[key]),
                             "speedup_min_of_repeats": min(ratios[key]), "speedup_max_of_repeats": max(ratios[key]),
                             "repeats": len(ratios[key])} if key in ratios else {})})
    common.save(args.out, "latency", args, data=data, rows=rows, csv_name="table3",
                extra_config={"budget": args.budget, "setups": setups})
    plot(rows, args.out / "latency.png")
    for r in rows:
        if "total_ms" in r:
            rep = (f"; median of {r['repeats']} repeats {r['speedup_median_of_repeats']:.2f}x "
                   f"({r['speedup_min_of_repeats']:.2f}-{r['speedup_max_of_repeats']:.2f})") if "repeats" in r else ""
            print(f"{r['model']:<16}{r['method']:<11} io {r['io_ms']:>9.1f}  mem {r['mem_ms']:>7.1f}  compute "
                  f"{r['compute_ms']:>8.1f}  total {r['total_ms']:>9.1f} ms  ({r['speedup_vs_naive']:.1f}x vs naive{rep})")


SPARSE_ROWS = ("ours", "ours_python", "ours_lookahead", "ours_coact", "ours_coact_hot", "ours_lfu", "ours_coact_lfu")


def repeated_speedups(setup: dict, runs: dict, args, table) -> dict[str, list[float]]:
    """Per sparse row: naive / row ms per token in the table's run and in ``repeats`` - 1 more alternating rounds
    (naive with fewer tokens: its per-token time is flat)."""
    repeats = args.repeats or (3 if args.quick else 5)
    rows = [k for k in SPARSE_ROWS if runs.get(k)]
    out = {k: [runs["naive"]["summary"]["ms_per_token"] / runs[k]["summary"]["ms_per_token"]] for k in rows}
    n_naive = 6 if args.quick else 16
    for i in range(repeats - 1):
        naive = engine_runs.standard_run(setup, "naive", args.quick, budget=args.budget, table=table, n=n_naive,
                                    share=False)["summary"]["ms_per_token"]
        for k in rows:
            ms = engine_runs.standard_run(setup, k, args.quick, budget=args.budget, table=table,
                                     share=False)["summary"]["ms_per_token"]
            out[k].append(naive / ms)
        print(f"[{setup['model']}] repeat {i + 2}: naive {naive:.0f} ms; "
              + ", ".join(f"{k} {out[k][-1]:.2f}x" for k in rows), flush=True)
    return out


def open_model_bytes(setup) -> int:
    from llmflash.flashdir import open_flash_dir

    return open_flash_dir(setup["flash_dir"]).model_bytes


def plot(rows: list[dict], png) -> None:
    import numpy as np

    plt = common.plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    bars = max(sum(1 for r in rows if r["model"] == m and "total_ms" in r) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.2, 1.0 * bars + 1.5) * len(models), 4.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m and "total_ms" in r]
        x = np.arange(len(rs))
        bottom = np.zeros(len(rs))
        for part, col in (("io_ms", "tab:red"), ("mem_ms", "tab:green"), ("compute_ms", "tab:blue")):
            v = np.array([max(r[part], 0) for r in rs])
            ax.bar(x, v, 0.6, bottom=bottom, color=col, label=part.replace("_ms", "").replace("mem", "memory mgmt")
                   .replace("io", "flash I/O"))
            bottom += v
        for i, r in enumerate(rs):
            rep = f"\n(median of {r['repeats']}: {r['speedup_median_of_repeats']:.1f}x)" if "repeats" in r else ""
            ax.annotate(f"{r['total_ms']:,.0f} ms\n{r['speedup_vs_naive']:.1f}x{rep}", (x[i], bottom[i]),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        floors = [(x[i], r["floor_ms"]) for i, r in enumerate(rs) if r.get("floor_ms")]
        if floors:
            ax.plot(*zip(*floors), "k_", ms=16, mew=2, label="I/O floor (computed: reads at the profiled GB/s)")
        ax.set_xticks(x)
        ax.set_xticklabels([r["method"].replace("_", "\n") for r in rs])
        ax.set_ylabel("latency per token (ms, median)")
        ax.set_ylim(0, bottom.max() * 1.2)
        ax.set_title(f"{m}: per-token latency (measured; label: total, speedup vs naive)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

"""Table 2: naive -> hybrid -> +predictor -> +window -> +bundling, at half the model in DRAM.

Each row is a real generation on the engine (reads bypass the page cache):
- naive: the whole model read from flash for every token (``mode=naive``);
- hybrid: the FFN layers that fit in half the model stay resident, the rest is streamed (``mode=hybrid``);
- +predictor: sparse loading of the predicted set, no reuse between tokens (the engine's cache is emptied before
  each token), on the unbundled layout; also "window 1" (the engine's smallest window: reuse of the previous token);
- +window: sliding window k=5, unbundled layout (up/gate rows and down rows in separate regions: 2 reads per neuron);
- +bundling: the same on the bundled layout (ours);
- real model only, beyond the paper: ours on a copy of the flash directory whose neurons are ordered by
  co-activation (Ripple-style, ``llmflash reorder``, fitted on wiki:train; the prompt is from wiki:eval), so that a
  token's neurons sit in fewer, longer runs of the file.
Per row: DRAM held (engine accounting), bytes and reads per token (measured), I/O ms (measured), throughput
(measured: bytes / the reads' time in flight) and, side by side, the I/O time computed as bytes / bandwidth, with the bandwidth that
profile-io measured at each read's size (16 parallel reads; results/profile_io). The real model's sparse rows use
its predictors when they exist, else the true (oracle) sets. The scale model's sparse rows use the trace source's
predicted sets (simulated); its reads, cache and compute are real.

Metric names follow ``llmflash.metrics`` (one definition each). Since issue 14, ``read_gbps`` / ``gbps_measured`` is
bytes / the time reads were in flight and ``read_efficiency`` = ``read_gbps`` / ``computed_gbps`` (in [0, 1] up to
profile noise); committed CSVs written before that hold bytes / I/O wait time in the first and computed / waited I/O
time in the second (hence "efficiencies" of 1.86-2.53 where reads overlap compute).
"""

from __future__ import annotations

import common
import engine_runs

ORDER = ["naive", "hybrid", "predictor_noreuse", "predictor_w1", "window_unbundled", "ours", "ours_coact"]
PAPER = [  # OPT-6.7B fp16 on the M1 Max, Table 2 (naive and hybrid rows computed at 6.1 GB/s in the paper)
    {"row": "naive", "dram_gb": 0.0, "gb_per_token": 13.4, "gbps": 6.10, "io_ms": 2196},
    {"row": "hybrid", "dram_gb": 6.7, "gb_per_token": 6.7, "gbps": 6.10, "io_ms": 1090},
    {"row": "predictor_noreuse", "dram_gb": 4.8, "gb_per_token": 0.9, "gbps": 1.25, "io_ms": 738},
    {"row": "window_unbundled", "dram_gb": 6.5, "gb_per_token": 0.2, "gbps": 1.25, "io_ms": 164},
    {"row": "ours", "dram_gb": 6.5, "gb_per_token": 0.2, "gbps": 2.25, "io_ms": 87},
]


def table_rows(model_label: str, runs: dict) -> list[dict]:
    out = []
    naive = runs.get("naive")
    for key in ORDER:
        r = runs.get(key)
        if r is None:
            continue
        s = r["summary"]
        out.append({
            "model": model_label, "row": key, "method": engine_runs.ROWS[key], "mode": r["mode"],
            "window": r["config"]["window"], "bundled": "unbundled" not in r["flash_dir"],
            "dram_gb": r["dram_bytes"] / 1e9, "dram_fraction": r["dram_fraction"],
            "gb_read_per_token": s["bytes_read_per_token"] / 1e9, "reads_per_token": s["reads_per_token"],
            "mean_read_kib": s["mean_read_bytes"] / 1024,
            "io_ms_measured": s["io_ms"], "gbps_measured": s["read_gbps"],
            "io_ms_computed": s.get("computed_io_ms"), "gbps_computed": s.get("computed_gbps"),
            "read_efficiency": s.get("read_efficiency"),
            "ms_per_token": s["ms_per_token"], "compute_ms": s["compute_ms"], "mem_ms": s["mem_ms"],
            "speedup_vs_naive": naive["summary"]["ms_per_token"] / s["ms_per_token"] if naive else None,
            "io_speedup_vs_naive": naive["summary"]["io_ms"] / s["io_ms"] if naive and s["io_ms"] > 0 else None,
            "tokens_measured": s["tokens_measured"], "shared_from": r.get("shared_from"),
        })
    return out


def main() -> None:
    p = common.parser("ablation", __doc__)
    p.add_argument("--budget", type=float, default=0.5, help="DRAM budget, fraction of the model (default 0.5)")
    args = p.parse_args()
    table = engine_runs.load_bandwidth(16)
    results: dict = {"paper_opt_6_7b_m1max": PAPER, "bandwidth_table_16_threads": table, "models": {}}
    rows: list[dict] = []
    setups = []
    if common.wanted(args, "real"):
        setups.append(common.real_setup(args.model))
    if common.wanted(args, "scale"):
        setups.append(common.scale_setup())
    for setup in setups:
        runs = {}
        for key in ORDER:
            if key == "ours_coact" and "geometry" in setup:
                continue  # the scale model's trace has no co-activation structure (see experiments/coactivation.py)
            print(f"[{setup['model']}] {engine_runs.ROWS[key]} ...", flush=True)
            runs[key] = engine_runs.standard_run(setup, key, args.quick, budget=args.budget, table=table)
            s = runs[key]["summary"]
            print(f"    {s['ms_per_token']:.0f} ms/token, io {s['io_ms']:.0f} ms, {s['bytes_read_per_token'] / 1e6:.1f} MB "
                  f"in {s['reads_per_token']:.0f} reads", flush=True)
        results["models"][setup["model"]] = {"setup": setup, "runs": runs}
        rows += table_rows(setup["model"], runs)
    common.save(args.out, "ablation", args, data=results, rows=rows, csv_name="table2",
                extra_config={"budget": args.budget, "setups": setups})
    plot(rows, args.out / "ablation.png", args.budget)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<16}{'row':<19}{'DRAM GB':>8}{'GB/tok':>9}{'reads':>8}{'KiB':>7}{'io ms':>9}{'io ms c':>9}"
          f"{'GB/s':>7}{'GB/s c':>7}{'ms/tok':>9}{'x naive':>8}")
    for r in rows:
        c = r["io_ms_computed"]
        print(f"{r['model']:<16}{r['row']:<19}{r['dram_gb']:>8.2f}{r['gb_read_per_token']:>9.3f}{r['reads_per_token']:>8.0f}"
              f"{r['mean_read_kib']:>7.0f}{r['io_ms_measured']:>9.1f}{(c if c is not None else float('nan')):>9.1f}"
              f"{r['gbps_measured']:>7.2f}{(r['gbps_computed'] or float('nan')):>7.2f}{r['ms_per_token']:>9.1f}"
              f"{r['speedup_vs_naive']:>7.1f}x")


def plot(rows: list[dict], png, budget: float = 0.5) -> None:
    import numpy as np

    plt = common.plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 4.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        x = np.arange(len(rs))
        meas = [r["io_ms_measured"] for r in rs]
        comp = [r["io_ms_computed"] if r["io_ms_computed"] is not None else np.nan for r in rs]
        ax.bar(x - 0.2, meas, 0.4, label="I/O ms, measured")
        ax.bar(x + 0.2, comp, 0.4, label="I/O ms, computed (bytes / profile-io bandwidth)")
        for i, r in enumerate(rs):
            ax.annotate(f"{r['gb_read_per_token'] * 1e3:.0f} MB", (x[i], max(meas[i], comp[i] or 0)),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([r["row"].replace("_", "\n") for r in rs], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("flash I/O per token (ms, log scale)")
        ax.set_title(f"{m}: Table 2 ablation, DRAM budget {budget:.0%} of the model\n"
                     "(labels: bytes read from flash per token)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

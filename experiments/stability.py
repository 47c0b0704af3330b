"""Figure 8: stability of the per-token latency over a long generation (measured).

Ours (predictor + window k=5 + bundling) at half the model in DRAM, greedy, 1000 generated tokens (--quick: 96 on
the real model, 20 on the scale model): per-token flash I/O, memory management and compute time and bytes read,
with a rolling median. The KV cache grows with the sequence, so attention compute rises slowly; the flash part
should stay flat once the window is warm.
"""

from __future__ import annotations

import numpy as np

import common
import engine_runs


def main() -> None:
    p = common.parser("stability", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="generated tokens (default 1000; quick 96 real / 20 scale)")
    args = p.parse_args()
    table = engine_runs.load_bandwidth(16)
    setups = common.setups(args)
    data: dict = {"models": {}}
    rows = []
    for kind, setup in setups:
        n = args.tokens or ((96 if kind == "real" else 20) if args.quick else 1000)
        print(f"[{setup['model']}] ours, {n} tokens ...", flush=True)
        r = engine_runs.standard_run(setup, "ours", args.quick, n=n, warmup=0 if kind == "real" else 5, table=table)
        data["models"][setup["model"]] = {"setup": setup, "run": r}
        pt = r["per_token"]
        for i, t in enumerate(pt):
            rows.append({"model": setup["model"], "token": i + 1, "io_ms": t["io_ms"], "mem_ms": t["mem_ms"],
                         "compute_ms": t["compute_ms"], "total_ms": t["total_ms"], "bytes_read": t["bytes_read"],
                         "reads": t["reads"], "label": "measured"})
        tot = np.array([t["total_ms"] for t in pt])
        half = len(tot) // 2
        r["stability"] = {"first_half_median_ms": float(np.median(tot[:half])),
                          "second_half_median_ms": float(np.median(tot[half:])),
                          "p10_ms": float(np.percentile(tot, 10)), "p90_ms": float(np.percentile(tot, 90))}
        print("    ", r["stability"])
    common.save(args.out, "stability", args, data=data, rows=rows, extra_config={"setups": [s for _, s in setups]})
    plot(data, args.out / "stability.png")


def rolling_median(v: np.ndarray, w: int) -> np.ndarray:
    return np.array([np.median(v[max(0, i - w + 1): i + 1]) for i in range(len(v))])


def plot(data: dict, png) -> None:
    plt = common.plt()
    models = list(data["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 6.5), squeeze=False, sharex="col")
    for j, m in enumerate(models):
        pt = data["models"][m]["run"]["per_token"]
        x = np.arange(1, len(pt) + 1)
        w = max(3, len(pt) // 25)
        ax = axes[0][j]
        for part, col in (("total_ms", "black"), ("compute_ms", "tab:blue"), ("io_ms", "tab:red"), ("mem_ms", "tab:green")):
            v = np.array([t[part] for t in pt])
            ax.plot(x, v, color=col, alpha=0.25, lw=0.8)
            ax.plot(x, rolling_median(v, w), color=col, lw=1.6,
                    label=f"{part.replace('_ms', '').replace('mem', 'memory mgmt').replace('io', 'flash I/O')}"
                          f" (rolling median of {w})")
        ax.set_ylabel("ms per token")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{m}: per-token latency over a long generation (measured)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(True, alpha=0.3)
        ax = axes[1][j]
        b = np.array([t["bytes_read"] for t in pt]) / 1e6
        ax.plot(x, b, color="tab:purple", alpha=0.35, lw=0.8)
        ax.plot(x, rolling_median(b, w), color="tab:purple", lw=1.6, label="MB read from flash per token")
        ax.set_xlabel("generated token")
        ax.set_ylabel("MB read per token")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

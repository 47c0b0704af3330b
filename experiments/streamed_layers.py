"""Streamed layers on the real model: budgets at and below the resident weights' share (``llmflash.layer_stream``).

The paper keeps attention in DRAM, so its budgets start at the resident weights' share; with float32 resident weights
that share is 40% of SmolLM2's bytes. For each budget of ``--budgets``, two arms in alternating repeats on the same
prompt: ``resident`` (``--stream-layers 0``: the paper's design) and ``streamed`` (the default, auto: the engine
streams the attention of the fewest layers that leave its neuron caches a token's expected set, reading them every
token into two slot buffers). An arm below its minimum budget is recorded as refused, with the minimum the engine
states. Times are measured on a shared machine: medians over ``--repeats``.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from llmflash.convert import RESIDENT_DTYPES
from llmflash.errors import BudgetError

import common
from engine_runs import real_cfg, run

ARMS = {"resident": 0, "streamed": -1}  # EngineConfig.stream_layers
METRICS = ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "bytes_read_per_token", "reads_per_token",
           "cache_hit_rate")


def main() -> None:
    p = common.parser("streamed_layers", __doc__)
    p.add_argument("--budgets", default="0.6,0.5,0.45,0.4,0.35,0.3",
                   help="DRAM budgets, fractions of the model's bytes (comma-separated)")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per run (the first two not measured)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per arm and budget")
    p.add_argument("--resident-dtype", default="auto", choices=RESIDENT_DTYPES,
                   help="the real model's resident weights: auto (float32, 40%% of the model) or int8 / int4")
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    setup = common.real_setup(args.model, resident_dtype=args.resident_dtype)
    base = real_cfg(setup, setup["sparse_mode"])
    warmup = min(2, args.tokens - 1)
    runs: dict[tuple[float, str], list[dict]] = {}
    refused: dict[tuple[float, str], str] = {}
    for rep in range(args.repeats):
        for budget in budgets:
            arms = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
            for arm in arms:
                key = (budget, arm)
                if key in refused:
                    continue
                cfg = replace(base, dram_budget=budget, stream_layers=ARMS[arm])
                try:
                    r = run(setup["flash_dir"], cfg, args.tokens, warmup=warmup, label=arm, share=False)
                except BudgetError as err:
                    refused[key] = str(err)
                    continue
                runs.setdefault(key, []).append(r)
    rows = []
    for budget in budgets:
        for arm in ARMS:
            key = (budget, arm)
            row: dict = {"budget": budget, "arm": arm, "label": "measured"}
            if key in refused:
                m = re.search(r"below the minimum ([0-9.]+)", refused[key])
                rows.append(row | {"refused": True, "minimum": float(m.group(1)) if m else None})
                continue
            rs = runs[key]
            streamed = rs[0]["streamed_layers"] or []
            row |= {"refused": False, "streamed_layers": len(streamed), "repeats": len(rs),
                    "dram_bytes": rs[0]["dram_bytes"], "slots_bytes": rs[0]["dram_breakdown"].get("layer_slots", 0),
                    "cache_bytes": rs[0]["dram_breakdown"].get("neuron_cache", 0)}
            row |= common.summary_medians(rs, METRICS)
            rows.append(row)
    data = {"setup": setup, "budgets": budgets, "tokens": args.tokens, "warmup": warmup, "rows": rows,
            "refused": {f"{b}/{a}": msg for (b, a), msg in refused.items()},
            "runs": {f"{b}/{a}": [{k: r[k] for k in ("summary", "dram_breakdown", "tokens", "load_average")}
                                  | {"streamed_layers": r["streamed_layers"]} for r in rs]
                     for (b, a), rs in runs.items()}}
    common.save(args.out, "streamed_layers", args, data=data, rows=rows)
    plot(rows, setup["label"], args.out / "streamed_layers.png")


def plot(rows: list[dict], label: str, path) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm, color in (("resident", "tab:orange"), ("streamed", "tab:blue")):
        ok = [r for r in rows if r["arm"] == arm and not r["refused"]]
        if ok:
            x = [100 * r["budget"] for r in ok]
            ms = [r["ms_per_token"] for r in ok]
            err = [[m - r["ms_per_token_min"] for m, r in zip(ms, ok)], [r["ms_per_token_max"] - m for m, r in zip(ms, ok)]]
            axes[0].errorbar(x, ms, yerr=err, marker="o", color=color, capsize=3, label=arm)
            axes[1].plot(x, [r["reads_per_token"] for r in ok], marker="o", color=color, label=f"{arm}: reads")
            for r, xi, m in zip(ok, x, ms):
                if r["streamed_layers"]:
                    axes[0].annotate(str(r["streamed_layers"]), (xi, m), textcoords="offset points", xytext=(4, 4),
                                     fontsize=7, color=color)
        for r in rows:
            if r["arm"] == arm and r["refused"]:
                axes[0].axvline(100 * r["budget"], color=color, alpha=0.25, linestyle=":")
    axes[0].set_xlabel("DRAM budget (% of the model's bytes)")
    axes[0].set_ylabel("ms per token (measured, median; bars: min-max)")
    axes[0].set_title("labels: layers streamed; dotted: refused (below the minimum)", fontsize=8)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("DRAM budget (% of the model's bytes)")
    axes[1].set_ylabel("reads per token")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Streamed layers: {label}", fontsize=10)
    fig.tight_layout()
    common.savefig(fig, path)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

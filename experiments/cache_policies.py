"""Cache policies at equal DRAM: the paper's sliding window, LRU, a PowerInfer-style pinned hot set + window, and LFU
(decayed use counts with admission: ``llmflash.cache_policy.LFUPolicy``).

Every policy runs with the same ``--dram-budget`` (so the same cache rows per layer: the budget planner does not look
at the policy) on the same prompt; per policy: hit rate, misses (neurons read from flash), evictions, bytes read and
the per-token times. Times are measured on a shared machine: medians over ``--repeats`` repeats that alternate the
policies. ``--flash-dir`` runs another flash directory (oracle mode; e.g. a tiny model in the tests).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from llmflash.cache_policy import POLICIES
from llmflash.convert import RESIDENT_DTYPES
from llmflash.engine import EngineConfig
from llmflash.flashdir import open_flash_dir

import common
from engine_runs import n_tokens, real_cfg, run

FIXED_PROMPT = "The history of the printing press begins in the fifteenth century, when"  # --flash-dir runs
METRICS = ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "bytes_read_per_token", "reads_per_token", "loaded_neurons_per_token",
           "cache_hits_per_token", "cache_misses_per_token", "cache_evictions_per_token", "cache_hit_rate")


def main() -> None:
    p = common.parser("cache_policies", __doc__)
    p.add_argument("--budget", type=float, default=0.5, help="DRAM budget, a fraction of the model's bytes")
    p.add_argument("--tokens", type=int, default=None, help="generated tokens per run (default: the standard rows')")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per policy (times: their medians)")
    p.add_argument("--window", type=int, default=5, help="sliding window in tokens (window and hot)")
    p.add_argument("--hot-tokens", type=int, default=64, help="hot: calibration tokens that choose the hot sets")
    p.add_argument("--flash-dir", default=None, help="run this flash directory in oracle mode instead of the real model")
    p.add_argument("--resident-dtype", default="auto", choices=RESIDENT_DTYPES,
                   help="real model: its resident weights as converted (auto: float32) or in int8 (the demo's and "
                        "Table 3's directory)")
    args = p.parse_args()
    prompt = None  # the real model: the standard held-out prompt (``common.prompt_ids``)
    if args.flash_dir:
        setup = {"model": args.flash_dir, "flash_dir": args.flash_dir, "sparse_mode": "oracle", "label": args.flash_dir}
        base = EngineConfig(mode="oracle", dram_budget=args.budget, window=args.window)
        n, warmup = 8, 1
        prompt = open_flash_dir(args.flash_dir).tokenizer()(FIXED_PROMPT, return_tensors="pt").input_ids[0]
    else:
        setup = common.real_setup(args.model, resident_dtype=args.resident_dtype)
        base = real_cfg(setup, setup["sparse_mode"], dram_budget=args.budget, window=args.window)
        n, warmup = n_tokens(args.quick, "real", setup["sparse_mode"])
    n = args.tokens or n
    base = replace(base, hot_calibration_tokens=args.hot_tokens)
    runs: dict[str, list[dict]] = {pol: [] for pol in POLICIES}
    for rep in range(args.repeats):
        order = POLICIES if rep % 2 == 0 else tuple(reversed(POLICIES))
        for pol in order:
            cfg = replace(base, cache_policy=pol)
            runs[pol].append(run(setup["flash_dir"], cfg, n, prompt=prompt, warmup=warmup, label=pol, share=False))
    rows = []
    for pol, rs in runs.items():
        row = {"policy": pol, "label": "measured", "repeats": len(rs), "dram_bytes": rs[0]["dram_bytes"],
               "dram_fraction": rs[0]["dram_fraction"], "tokens_measured": rs[0]["summary"]["tokens_measured"],
               "same_tokens_as_window": rs[0]["tokens"] == runs["window"][0]["tokens"]}
        row |= common.summary_medians(rs, METRICS)
        rows.append(row)
    data = {"setup": {k: v for k, v in setup.items() if k != "geometry"}, "budget": args.budget, "window": args.window,
            "tokens": n, "warmup": warmup, "hot_calibration_tokens": args.hot_tokens, "rows": rows,
            "runs": {pol: [{k: r[k] for k in ("summary", "dram_breakdown", "tokens", "load_average")} for r in rs]
                     for pol, rs in runs.items()}}
    common.save(args.out, "cache_policies", args, data=data, rows=rows)
    plot(rows, setup["label"], args.budget, args.out / "cache_policies.png")


def plot(rows: list[dict], label: str, budget: float, path) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["policy"] for r in rows]
    axes[0].bar(names, [100 * r["cache_hit_rate"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("cache hit rate (%)")
    axes[1].bar(names, [r["bytes_read_per_token"] / 2**20 for r in rows], color="tab:orange")
    axes[1].set_ylabel("read per token (MiB)")
    ms = [r["ms_per_token"] for r in rows]
    err = [[m - r["ms_per_token_min"] for m, r in zip(ms, rows)], [r["ms_per_token_max"] - m for m, r in zip(ms, rows)]]
    axes[2].bar(names, ms, yerr=err, color="tab:green", capsize=4)
    axes[2].set_ylabel("ms per token (measured, median)")
    fig.suptitle(f"Cache policies at equal DRAM ({budget:.0%} of the model): {label}", fontsize=10)
    fig.tight_layout()
    common.savefig(fig, path)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

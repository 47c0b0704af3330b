"""How far the cache policies are from the best possible at equal DRAM (computed, on measured sets).

The real model generates ``--tokens`` tokens in its sparse mode at ``--budget`` (the window policy), and the sets each
layer's cache was asked for are recorded (measured). They are then replayed through ``llmflash.cache.NeuronCache``
with each policy (the engine's own bookkeeping, at the engine's cache sizes), and through Belady's rule with bypass,
which knows the future: after each token keep the neurons whose next need comes soonest, and leave out a newcomer needed
later than all of them. No policy can miss less (a miss is a row read from flash). Per policy: misses per token and
the share of the gap between LRU and Belady's rule it closes. A replay feeds every policy the same sets; in the engine
a policy may change the sets slightly (in predictor mode a cached neuron the predictor missed adds its true value).

The read bound (``--lines``, ``read_bound.png``; issue 15's "sparse at half DRAM <= dense" on this disk): Belady's
rule again over *lines* of B neighbouring rows on flash (a line is needed when any of its neurons is; one read of B
rows brings it; the cache holds capacity / B lines): whatever the line size, no policy reads fewer lines. Each bound's
I/O time per token is computed at the disk's profiled throughput for its read size (results/profile_io, 16 threads),
and set beside the dense model's token and the recording run's own compute + memory management (both measured in this
run): without overlap a sparse token takes at least floor + compute, with reads fully hidden behind compute at least
max(floor, compute). ``--coact`` replays the directory reordered by co-activation (neighbours on flash co-activate).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from llmflash.cache import CacheUpdate, NeuronCache
from llmflash.cache_policy import POLICIES, make_policy
from llmflash.convert import RESIDENT_DTYPES
from llmflash.engine import Engine
from llmflash.flashdir import open_flash_dir
from llmflash.hooks import EngineObserver
from llmflash.metrics import profiled_read_ms

import common
from engine_runs import load_bandwidth, real_cfg

BELADY = "belady"  # the replay's bound (not an engine policy)


class SetRecorder(EngineObserver):
    """Each decode step's lookups per layer (the prefill's, which look up several tokens' sets at once, left out)."""

    def __init__(self) -> None:
        self.step = 0
        self.sets: dict[int, list[np.ndarray]] = defaultdict(list)

    def cache_updated(self, layer: int, update: CacheUpdate) -> None:
        if self.step > 0 and update.hits + update.misses:
            self.sets[layer].append(update.need.copy())

    def forward_done(self, step: int) -> None:
        self.step = step + 1


def replay(sets: Sequence[np.ndarray], policy: str, capacity: int, window: int, layout) -> int:
    """Misses of one layer's cache under ``policy`` over ``sets``, from an empty cache (Belady's too)."""
    cache = NeuronCache(layout, capacity, window, torch.float32, policy=make_policy(policy, window, layout.d_ffn))
    return sum(cache.update(need, step).misses for step, need in enumerate(sets))


def belady(sets: Sequence[np.ndarray], capacity: int) -> int:
    """Misses of the best offline policy with bypass over ``sets``: after each lookup the cache keeps the ``capacity``
    neurons (among those cached and those just needed) whose next need is soonest."""
    nxt: list[dict[int, int]] = [{} for _ in sets]
    upcoming: dict[int, int] = {}
    for t in range(len(sets) - 1, -1, -1):  # next need after t of each neuron needed at t
        nxt[t] = {int(i): upcoming.get(int(i), 1 << 62) for i in sets[t]}
        for i in sets[t]:
            upcoming[int(i)] = t
    cached: dict[int, int] = {}  # neuron -> its next need
    misses = 0
    for t, need in enumerate(sets):
        misses += sum(1 for i in need if int(i) not in cached)
        cached.update(nxt[t])
        if len(cached) > capacity:
            cached = dict(sorted(cached.items(), key=lambda kv: (kv[1], kv[0]))[:capacity])
    return misses


def main() -> None:
    p = common.parser("cache_replay", __doc__)
    p.add_argument("--budget", type=float, default=0.5, help="DRAM budget, a fraction of the model's bytes")
    p.add_argument("--tokens", type=int, default=None, help="generated tokens (default 128, --quick 24)")
    p.add_argument("--window", type=int, default=5, help="sliding window in tokens (window and hot policies)")
    p.add_argument("--resident-dtype", default="auto", choices=RESIDENT_DTYPES,
                   help="real model: its resident weights as converted (auto) or in int8 (the demo's directory)")
    p.add_argument("--lines", default="1,2,4,8",
                   help="comma-separated line sizes (rows read together) for the read bound; '' for none")
    p.add_argument("--coact", action="store_true", help="replay the directory reordered by co-activation")
    p.add_argument("--replot", action="store_true", help="only redraw the figures from OUT/cache_replay.json")
    args = p.parse_args()
    if args.replot:
        data = json.loads((args.out / "cache_replay.json").read_text())
        label = data["setup"]["label"] + (", file in co-activation order" if "coact" in data.get("flash_dir", "") else "")
        plot(data["rows"], label, data["budget"], args.out / "cache_replay.png")
        if data.get("read_bound", {}).get("lines"):
            plot_bound(data["read_bound"], label, data["budget"], args.out / "read_bound.png")
        return
    n = args.tokens or (24 if args.quick else 128)
    setup = common.real_setup(args.model, resident_dtype=args.resident_dtype)
    directory = common.real_coact_dir(setup, args.quick) if args.coact else setup["flash_dir"]
    fd = open_flash_dir(directory)
    cfg = real_cfg(setup, setup["sparse_mode"], dram_budget=args.budget, window=args.window, lookahead=False)
    rec = SetRecorder()
    engine = Engine(fd, cfg, observers=[rec])
    try:
        res = engine.generate(common.prompt_ids(engine.tokenizer), n, stop_at_eos=False)
        caps = list(engine.cache_rows)
    finally:
        engine.close()
    layout = fd.layout
    steps = min(len(s) for s in rec.sets.values())
    policies = [p for p in POLICIES if p != "hot"] + [BELADY]  # (hot: its calibration needs the engine's own text)
    misses = {pol: 0 for pol in policies}
    for layer, cap in enumerate(caps):
        sets = rec.sets[layer][:steps]
        for pol in policies:
            misses[pol] += belady(sets, cap) if pol == BELADY else replay(sets, pol, cap, args.window, layout)
    needed = sum(int(s.size) for layer in range(len(caps)) for s in rec.sets[layer][:steps])
    lru, best = misses["lru"], misses[BELADY]
    rows = [{"policy": pol, "label": "computed (replay of measured sets)", "misses_per_token": m / steps,
             "needed_per_token": needed / steps, "hit_rate": 1 - m / needed if needed else 0.0,
             "misses_vs_lru": m / lru if lru else float("nan"),
             "gap_closed": (lru - m) / (lru - best) if lru > best else float("nan")} for pol, m in misses.items()]
    table = load_bandwidth(16)
    stride = sum(g.stride_bytes for g in layout.segments)  # (a row's bytes in every segment)
    for r in rows:  # (one read per missed row: what the engine issues, neighbours merged aside)
        r["io_floor_ms"] = profiled_read_ms({stride: r["misses_per_token"]}, table)
    bound = read_bound(rec, caps, steps, [int(b) for b in args.lines.split(",") if b.strip()], stride, table,
                       res, setup, args)
    data = {"setup": {k: v for k, v in setup.items() if k != "geometry"}, "flash_dir": str(directory),
            "budget": args.budget, "window": args.window, "tokens": n, "steps_replayed": steps, "cache_rows": caps,
            "row_stride_bytes": stride, "bandwidth_table_16_threads": table, "rows": rows, "read_bound": bound}
    common.save(args.out, "cache_replay", args, data=data, rows=rows)
    plot(rows, setup["label"], args.budget, args.out / "cache_replay.png")
    for r in rows:
        print(f"{r['policy']:<8} misses/token {r['misses_per_token']:9.1f}  hit rate {r['hit_rate']:.3f}  "
              f"vs lru {r['misses_vs_lru']:.3f}  gap to Belady closed {r['gap_closed']:.2f}  "
              f"I/O floor {r['io_floor_ms']:.1f} ms")
    if bound["lines"]:
        plot_bound(bound, setup["label"] + (", file in co-activation order" if args.coact else ""), args.budget,
                   args.out / "read_bound.png")
        for b in bound["lines"]:
            print(f"Belady over lines of {b['line_rows']}: {b['reads_per_token']:7.1f} reads/token of "
                  f"{b['read_bytes'] // 1024} KiB, I/O floor {b['io_floor_ms']:.1f} ms")
        print(f"dense {bound['dense_ms']:.1f} ms/token; the recording run's compute + memory management "
              f"{bound['compute_mem_ms']:.1f} ms; best floor {bound['best_floor_ms']:.1f} ms: no overlap >= "
              f"{bound['no_overlap_ms']:.1f} ms, reads fully hidden >= {bound['full_overlap_ms']:.1f} ms")


def read_bound(rec: SetRecorder, caps: Sequence[int], steps: int, lines: Sequence[int], stride: int, table,
               res, setup: dict, args) -> dict:
    """Belady's misses over lines of each size (computed), their I/O time at the profiled throughput (computed),
    the dense model's ms per token and the recording run's compute + memory management per token (measured)."""
    out: list[dict] = []
    for b in lines:
        misses = needed = 0
        for layer, cap in enumerate(caps):
            sets = [np.unique(s // b) for s in rec.sets[layer][:steps]]
            needed += sum(int(s.size) for s in sets)
            misses += belady(sets, max(1, cap // b))
        per = misses / steps
        out.append({"line_rows": b, "label": "computed (Belady over lines, replay of measured sets)",
                    "lines_needed_per_token": needed / steps, "reads_per_token": per, "rows_read_per_token": per * b,
                    "read_bytes": b * stride, "io_floor_ms": profiled_read_ms({b * stride: per}, table)})
    pt = res.per_token[min(5, len(res.per_token) - 1):]
    compute_mem = float(np.median([t.compute_ms + t.mem_ms for t in pt])) if pt else float("nan")
    dense_ms = float("nan")
    if out:
        cfg = real_cfg(setup, "dense", dram_budget=1.0)
        engine = Engine(open_flash_dir(setup["flash_dir"]), cfg)
        try:
            r = engine.generate(common.prompt_ids(engine.tokenizer), max(8, min(args.tokens or 32, 32)),
                                stop_at_eos=False)
            dense_ms = float(np.median([t.total_ms for t in r.per_token[2:] or r.per_token]))
        finally:
            engine.close()
    best = min((b["io_floor_ms"] for b in out), default=float("nan"))
    return {"lines": out, "dense_ms": dense_ms, "dense_label": "measured (this run, all weights in DRAM)",
            "compute_mem_ms": compute_mem, "compute_mem_label": "measured (the recording run: window policy)",
            "best_floor_ms": best, "no_overlap_ms": best + compute_mem, "full_overlap_ms": max(best, compute_mem)}


def plot_bound(bound: dict, label: str, budget: float, path) -> None:
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    names = [f"Belady,\nlines of {b['line_rows']}" for b in bound["lines"]]
    io = [b["io_floor_ms"] for b in bound["lines"]]
    x = np.arange(len(names))
    ax.bar(x, io, 0.6, color="tab:red", label="I/O floor: reads at the profiled throughput (computed)")
    ax.bar(x, [bound["compute_mem_ms"]] * len(x), 0.6, bottom=io, color="tab:blue", alpha=0.6,
           label="+ compute and memory management (measured)")
    for i, b in enumerate(bound["lines"]):
        ax.annotate(f"{b['reads_per_token']:,.0f} reads", (x[i], io[i] + bound["compute_mem_ms"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.axhline(bound["dense_ms"], color="k", ls="--", label=f"dense, all in DRAM ({bound['dense_ms']:.0f} ms, measured)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_title(f"The least any cache policy can read at {budget:.0%} DRAM, and what it costs\n{label}", fontsize=9)
    ax.set_ylim(0, max(io[i] + bound["compute_mem_ms"] for i in range(len(io))) * 1.35)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    common.savefig(fig, path)


def plot(rows: list[dict], label: str, budget: float, path) -> None:
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = [r["policy"] for r in rows]
    colors = ["tab:gray" if r["policy"] == BELADY else "tab:blue" for r in rows]
    ax.bar(names, [r["misses_per_token"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['misses_per_token']:,.0f}", (i, r["misses_per_token"]), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8)
    ax.set_ylabel("rows read per token (misses)")
    ax.set_title(f"Cache policies vs the best possible (Belady, bypass) at {budget:.0%} DRAM\n{label} "
                 "(computed: replay of measured sets)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    common.savefig(fig, path)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

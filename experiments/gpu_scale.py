"""Table 3 on a GPU: the scale model (OPT-6.7B geometry) computed on CUDA, naive against ours in the same run.

The paper's 15-25x speedups are GPU figures (its Table 3, OPT 6.7B on an RTX 4090: naive 2218 ms, ours 84 ms per
token); on its CPU it reports 4.75x. On this project's 2-core CPU the scale model is compute-bound (results/latency:
each token streams 4.3 GB of attention weights through two cores). This script runs the same engine with
``--device cuda``: embeddings, attention, the neuron caches and the predictors live in GPU memory, all of them
together within half the model's bytes (plus the host buffers that reads land in); FFN neurons are read from the
GPU machine's disk with parallel direct I/O into page-locked host buffers and copied to the GPU (that copy is
counted as memory management). Naive reads the whole model every token (resident weights too, as in the paper's
naive row) and copies it to the GPU.

It writes the scale model on that machine (13.4 GB, ``LLMFLASH_CACHE``), profiles its disk with ``profile-io`` (the
reference for the read efficiency; every run uses the reader thread count it finds fastest for ours' 16 KiB reads
among 16, 32 and 64), then runs naive, ours and ours with lookahead alternately ``--repeats`` times (the speedup of
each repeat is naive / ours from adjacent runs), then hybrid and dense once. Active sets come from the trace source
(simulated, as everywhere for the scale model); reads, copies and compute are measured. Lookahead
(``--lookahead-recall``, one row per value): layer l + 1's guessed rows are read while layer l computes; the guess is
simulated too (the set the trace gives layer l + 1 next, each neuron kept with that probability: 1.0 is a lookahead
predictor as good as the layer's own).

Each row's I/O floor (``floor_ms``, computed): its bytes read per token at the disk's profiled throughput for its
read sizes (``computed_io_ms``); ``x_floor`` = ms per token / floor; ``x_dense_compute`` = its compute ms / dense's.

On the GPU machine (see README, "Scale model on a GPU")::

    LLMFLASH_CACHE=/tmp/llmflash python experiments/gpu_scale.py --prepare-only   # model + disk profile
    LLMFLASH_CACHE=/tmp/llmflash python experiments/gpu_scale.py --out $OUT/gpu_scale

``--model DIR`` runs a flash directory instead (its own sparsity rule, oracle sets; with ``--device cpu``, e.g. a tiny
model in the test suite's end-to-end tier).

Metric names follow ``llmflash.metrics`` (one definition each). Since issue 14, ``read_gbps`` / ``gbps_measured`` is
bytes / the time reads were in flight and ``read_efficiency`` = ``read_gbps`` / ``computed_gbps`` (in [0, 1] up to
profile noise); committed CSVs written before that hold bytes / I/O wait time in the first and computed / waited I/O
time in the second (hence "efficiencies" of 1.86-2.53 where reads overlap compute).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time

from llmflash.paths import cache_dir
from llmflash.report import write_json

import common
import engine_runs

PAPER_GPU = {"naive": (2196, 0, 22, 2218), "ours": (30, 34, 20, 84)}  # Table 3, RTX 4090: I/O, mem, compute, total ms
PROFILE_CHUNKS = (4096, 16384, 65536, 262144, 1048576)
PROFILE_THREADS = (16, 32, 64)  # candidate reader thread counts (the engine's default is 16)
SMOKE_PROFILE = dict(chunk_sizes=(4096, 16384), thread_counts=(1, 16), repeats=1, reads_per_point=64)  # LLMFLASH_SMOKE
ENGINE_READ_BYTES = 16384  # ours' typical read on the scale model: one 16 KiB neuron bundle
WARMUP = 5  # ours: tokens that fill the window before the statistics start


def profile_disk(size_gb: float) -> list[dict]:
    """profile-io on the disk the model lives on (cached next to the model for a later call)."""
    from research.profile_io import profile_io

    path = cache_dir() / "gpu_profile.json"
    if path.is_file():
        return json.loads(path.read_text())
    (cache_dir() / "profile").mkdir(parents=True, exist_ok=True)
    kw = SMOKE_PROFILE if common.smoke() else dict(chunk_sizes=PROFILE_CHUNKS, thread_counts=(1, *PROFILE_THREADS),
                                                   repeats=2)
    rows = profile_io(cache_dir() / "profile", int(size_gb * 1e9), progress=False, **kw)
    write_json(path, rows)
    return rows


def summary_row(key: str, repeat: int, r: dict, naive_ms: float) -> dict:
    s = r["summary"]
    return {"method": key, "repeat": repeat, "device": r["config"].get("device", "cpu"), "io_ms": s["io_ms"],
            "mem_ms": s["mem_ms"], "compute_ms": s["compute_ms"], "total_ms": s["ms_per_token"],
            "predictor_ms": s["predictor_ms"], "wait_extra_ms": s.get("wait_extra_ms"), "speedup_vs_naive": naive_ms / s["ms_per_token"],
            "dram_fraction": r["dram_fraction"], "gb_read_per_token": s["bytes_read_per_token"] / 1e9,
            "mean_read_kib": s["mean_read_bytes"] / 1024, "read_gbps": s["read_gbps"],
            "read_efficiency": s.get("read_efficiency"), "tokens_measured": s["tokens_measured"], "label": "measured",
            "budget_gb": r["dram_bytes"] / 1e9, "host_buffers_gb": host_bytes(r) / 1e9,
            "gpu_accounted_gb": (r["dram_bytes"] - host_bytes(r)) / 1e9,
            "gpu_peak_reserved_gb": r.get("gpu_peak_reserved_bytes", float("nan")) / 1e9,
            "floor_ms": s.get("computed_io_ms"),
            "x_floor": s["ms_per_token"] / s["computed_io_ms"] if s.get("computed_io_ms") else None,
            "lookahead": bool(r["config"].get("lookahead")),
            "native_reader": r["config"].get("native_reader", True),
            "guess_recall": (r.get("provider") or {}).get("guess_recall") if r["config"].get("lookahead") else None,
            "lookahead_depth": r["config"].get("lookahead_depth", 1) if r["config"].get("lookahead") else None}


def report(head: str, row: dict) -> None:
    print(f"{head} {row['total_ms']:,.1f} ms per token: {row['speedup_vs_naive']:.1f}x (io {row['io_ms']:.1f}, "
          f"mem {row['mem_ms']:.1f}, compute {row['compute_ms']:.1f} ms; I/O floor {row['floor_ms'] or 0:.1f} ms, "
          f"x{row['x_floor'] or 0:.2f}; read efficiency {row['read_efficiency'] or 0:.2f}; GPU memory peak "
          f"{row['gpu_peak_reserved_gb']:.2f} GB of {row['gpu_accounted_gb']:.2f} accounted)", flush=True)


def host_bytes(r: dict) -> int:
    """The engine's host-side buffers (reads land there; counted in its budget with the GPU-side bytes)."""
    return sum(v for k, v in r["dram_breakdown"].items() if k in ("staging", "landing"))


def main() -> None:
    p = common.parser("gpu_scale", __doc__, models=False)
    p.add_argument("--model", default=common.SCALE, help="the scale model (default), or a flash directory DIR")
    p.add_argument("--device", default="cuda", help="compute device (default cuda)")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the model's bytes the engine may hold")
    p.add_argument("--repeats", type=int, default=3, help="alternating naive / ours rounds (default 3)")
    p.add_argument("--tokens", type=int, default=30, help=f"ours: tokens per run, the first {WARMUP} warm the window")
    p.add_argument("--naive-tokens", type=int, default=3, help="naive and hybrid: tokens per run (default 3)")
    p.add_argument("--profile-gb", type=float, default=2.0, help="size of the profile-io test file (GB)")
    p.add_argument("--skip", default="", help="comma-separated extra rows to skip: hybrid, dense")
    p.add_argument("--python-reader", action="store_true",
                   help="also run ours and ours + lookahead (the first recall) with the Python reader threads in every "
                        "repeat (rows *_pyreader: the native reader's effect, same run)")
    p.add_argument("--reader-threads", action="store_true",
                   help="also run ours and ours + lookahead (the first recall) with the native reader's threads instead "
                        "of io_uring in every repeat (rows *_threads: io_uring's effect, same run)")
    p.add_argument("--lookahead-depth", default="1",
                   help="comma-separated lookahead depths, one row per recall and depth (layer l starts layer l+D's "
                        "reads; default 1)")
    p.add_argument("--lookahead-recall", default="1.0",
                   help="comma-separated recalls of the simulated lookahead guess, one 'ours_lookahead' row each in "
                        "every repeat ('' for none; default 1.0)")
    p.add_argument("--masked", action="store_true",
                   help="also run 'ours_masked' and the first lookahead row masked: each layer computed over its whole "
                        "device cache with the rows not needed masked (EngineConfig.masked_compute)")
    p.add_argument("--eager", action="store_true",
                   help="also run 'ours_eager' (and 'ours_masked_eager' with --masked) in every repeat and 'dense_eager' "
                        "once: transformers' attention instead of the fixed decode step (EngineConfig.native_attention)")
    p.add_argument("--lfu", action="store_true",
                   help="also run 'ours_lfu': ours with the LFU cache policy (EngineConfig.cache_policy='lfu')")
    p.add_argument("--io-threads", type=int, default=0,
                   help="reader threads (0 = the count profile-io finds fastest for 16 KiB reads among 16, 32, 64)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figure from OUT/gpu_scale.json (no GPU needed)")
    p.add_argument("--prepare-only", action="store_true", help="write the scale model and profile the disk, then stop")
    p.add_argument("--profile", default="",
                   help="comma-separated rows (ours, ours_masked, dense, or a lookahead row's name, e.g. ours_lookahead_r1) to run "
                        "once more at the end under torch.profiler and cProfile: OUT/profile_ROW.txt (shares of the "
                        "time, not timings)")
    p.add_argument("--sample", default="",
                   help="comma-separated rows (as --profile's) to run once more at the end under py-spy (a sampling "
                        "profiler: little distortion; needs py-spy): OUT/sample_ROW.txt")
    args = p.parse_args()
    if args.replot:
        data = json.loads((args.out / "gpu_scale.json").read_text())
        naive_ms = [n["summary"]["ms_per_token"] for n in data["runs"]["naive"]]
        rows = [summary_row(k, i + 1, r, naive_ms[i] if k == "naive" or k.startswith("ours") else statistics.median(naive_ms))
                for k, rs in data["runs"].items() for i, r in enumerate(rs)]
        plot(rows, data, args.out / "gpu_scale.png")
        return
    if args.quick:
        args.repeats, args.skip = min(args.repeats, 2), "hybrid,dense"
    t_start = time.perf_counter()
    setup = common.scale_setup() if args.model == common.SCALE else common.flash_dir_setup(args.model)
    t_model = time.perf_counter() - t_start
    profile = profile_disk(args.profile_gb)
    t_profile = time.perf_counter() - t_start - t_model
    print(f"scale model ready in {t_model:.0f} s, disk profiled in {t_profile:.0f} s; "
          + ", ".join(f"{r['chunk_bytes'] // 1024} KiB x{r['threads']}: {r['gbps']:.2f} GB/s" for r in profile), flush=True)
    if args.prepare_only:
        return
    # reader threads for every run (naive and ours alike): the count profile-io found fastest at ours' read size
    io_threads = args.io_threads or max((r for r in profile if r["chunk_bytes"] == ENGINE_READ_BYTES
                                         and r["threads"] in PROFILE_THREADS), key=lambda r: r["gbps"])["threads"]
    table = sorted((r["chunk_bytes"], r["gbps"]) for r in profile if r["threads"] == io_threads)
    print(f"reader threads: {io_threads}", flush=True)
    recalls = [float(r) for r in args.lookahead_recall.split(",") if r.strip()]
    depths = [int(d) for d in args.lookahead_depth.split(",") if d.strip()]
    aheads = [(f"ours_lookahead_r{r:g}" + (f"_d{d}" if d > 1 else ""), r, d) for r in recalls for d in depths]
    ahead_keys = [k for k, _, _ in aheads]
    runs: dict[str, list[dict]] = {"naive": [], "ours": [], **{k: [] for k in ahead_keys}}
    rows: list[dict] = []
    data = {"paper_opt_6_7b_gpu": PAPER_GPU, "profile_io": profile, "setup": setup, "runs": runs,
            "disk_free_bytes": shutil.disk_usage(cache_dir()).free}

    def write() -> None:
        speedups = [n["summary"]["ms_per_token"] / o["summary"]["ms_per_token"] for n, o in zip(runs["naive"], runs["ours"])]
        data["speedups"] = speedups
        data["speedup_median"] = statistics.median(speedups) if speedups else None
        common.save(args.out, "gpu_scale", args, data=data, rows=rows,
                    extra_config={"budget": args.budget, "device": args.device, "io_threads": io_threads,
                                  "model_write_s": t_model, "profile_s": t_profile})

    for i in range(args.repeats):
        naive = engine_runs.standard_run(setup, "naive", False, budget=args.budget, table=table, n=args.naive_tokens,
                                    warmup=0, share=False, device=args.device, io_threads=io_threads)
        ours = engine_runs.standard_run(setup, "ours", False, budget=args.budget, table=table, n=args.tokens,
                                   warmup=WARMUP, share=False, device=args.device, io_threads=io_threads)
        runs["naive"].append(naive)
        runs["ours"].append(ours)
        n_ms = naive["summary"]["ms_per_token"]
        rows += [summary_row("naive", i + 1, naive, n_ms), summary_row("ours", i + 1, ours, n_ms)]
        report(f"repeat {i + 1}: naive {n_ms:,.0f} ms, ours", rows[-1])
        extra = [(k, "ours_lookahead", rc, True, d, True) for k, rc, d in aheads]
        if args.python_reader:
            extra += [("ours_pyreader", "ours", 1.0, False, 1, True)]
            extra += [(f"{ahead_keys[0]}_pyreader", "ours_lookahead", aheads[0][1], False, aheads[0][2], True)] \
                if aheads else []
        if args.masked:
            extra += [("ours_masked", "ours_masked", 1.0, True, 1, True)]
            extra += [(f"{ahead_keys[0]}_masked", "ours_lookahead_masked", aheads[0][1], True, aheads[0][2], True)] \
                if aheads else []
        if args.eager:
            extra += [("ours_eager", "ours_eager", 1.0, True, 1, True)]
            extra += [("ours_masked_eager", "ours_masked_eager", 1.0, True, 1, True)] if args.masked else []
        if args.lfu:
            extra += [("ours_lfu", "ours_lfu", 1.0, True, 1, True)]
        if args.reader_threads:
            extra += [("ours_threads", "ours", 1.0, True, 1, False)]
            extra += [(f"{ahead_keys[0]}_threads", "ours_lookahead", aheads[0][1], True, aheads[0][2], False)] \
                if aheads else []
        for key, row, recall, native_reader, depth, uring in extra:
            r = engine_runs.standard_run(setup, row, False, budget=args.budget, table=table, n=args.tokens,
                                         warmup=WARMUP, share=False, device=args.device, io_threads=io_threads,
                                         guess_recall=recall, native_reader=native_reader, lookahead_depth=depth,
                                         io_uring=uring)
            runs.setdefault(key, []).append(r)
            rows.append(summary_row(key, i + 1, r, n_ms))
            report(f"repeat {i + 1}: {key}", rows[-1])
        write()
    naive_ms = statistics.median(r["summary"]["ms_per_token"] for r in runs["naive"])
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    finals = [("hybrid", args.budget, args.naive_tokens)] + [("dense_eager", 1.0, 10)] * args.eager + [("dense", 1.0, 10)]
    for key, budget, n in finals:
        if key in skip or key == "dense_eager" and "dense" in skip:
            continue
        r = engine_runs.standard_run(setup, key, False, budget=budget, table=table, n=n, warmup=0 if key == "hybrid" else 2,
                                share=False, device=args.device, io_threads=io_threads)
        runs[key] = [r]
        rows.append(summary_row(key, 1, r, naive_ms))
        print(f"{key}: {r['summary']['ms_per_token']:,.1f} ms per token ({rows[-1]['speedup_vs_naive']:.1f}x)", flush=True)
        if key == "dense":  # (each row against dense on its own attention path: graphs, or transformers')
            eager = next((r2 for r2 in rows if r2["method"] == "dense_eager"), None)
            for row in rows:
                ref = eager if eager is not None and row["method"].endswith(engine_runs.EAGER) else rows[-1]
                row["x_dense_compute"] = row["compute_ms"] / ref["compute_ms"]
        write()
    profiled = {"ours": {"row": "ours"}, "dense": {"row": "dense", "budget": 1.0, "n": 10, "warmup": 2},
                "ours_masked": {"row": "ours_masked"},
                **{k: {"row": "ours_lookahead", "guess_recall": rc, "lookahead_depth": d} for k, rc, d in aheads}}
    for flag, names in (("profile", args.profile), ("sample", args.sample)):
        for key in (k.strip() for k in names.split(",") if k.strip()):
            if key not in profiled:
                raise SystemExit(f"--{flag}: {key} is not one of {', '.join(profiled)}")
            kw = {"budget": args.budget, "n": args.tokens, "warmup": WARMUP, **profiled[key]}
            to = args.out / f"{flag}_{key}.txt"
            r = engine_runs.standard_run(setup, kw.pop("row"), False, table=table, share=False, device=args.device,
                                         io_threads=io_threads, **{f"{flag}_to": to}, **kw)
            print(f"{flag} of {key}: {to} ({r['summary']['ms_per_token']:.1f} ms per token)", flush=True)
    plot(rows, data, args.out / "gpu_scale.png")
    print(f"speedup ours vs naive per repeat: {', '.join(f'{s:.1f}x' for s in data['speedups'])} "
          f"(median {data['speedup_median']:.1f}x); total {time.perf_counter() - t_start:.0f} s")


def short(key: str) -> str:
    """A row's name on the figure's axes."""
    out = key.replace("paper ", "paper\n").replace("ours_lookahead_r", "+ lookahead\nrecall ").replace("_d", "\ndepth ")
    out = out.replace("_pyreader", "\n(Python\nreader)").replace("_threads", "\n(reader\nthreads)")
    return out.replace("_eager", "\n(transformers'\nattention)")


def plot(rows: list[dict], data: dict, png) -> None:
    import numpy as np

    plt = common.plt()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6), gridspec_kw={"width_ratios": [1.3, 0.9, 0.9, 1]})
    ax, ax1, ax2, ax3 = axes
    best = {}
    methods = (["naive", "hybrid", "ours"] + sorted({r["method"] for r in rows if r["method"].startswith("ours_")})
               + ["dense_eager", "dense"])
    for key in methods:  # the median repeat of each method (of an even count, the slower of the middle two)
        rs = sorted((r for r in rows if r["method"] == key), key=lambda r: r["total_ms"])
        if rs:
            best[key] = rs[len(rs) // 2]
    paper = {f"paper {k}": dict(zip(("io_ms", "mem_ms", "compute_ms", "total_ms"), v)) for k, v in PAPER_GPU.items()}
    bars = list(best.items()) + list(paper.items())
    x = np.arange(len(bars))
    colors = ["tab:gray" if k.startswith("paper") else "tab:purple" for k, _ in bars]
    ax.bar(x, [b["total_ms"] for _, b in bars], 0.6, color=colors)
    for i, (_, b) in enumerate(bars):
        ax.annotate(f"{b['total_ms']:,.0f} ms", (x[i], b["total_ms"]), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([short(k) for k, _ in bars], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("latency per token (ms, log scale)")
    ax.set_title("Per-token latency: this GPU machine (measured, purple) vs the paper's RTX 4090 (grey)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    parts = [k for k in methods if k in best and k not in ("naive", "hybrid")] + ["paper ours"]
    bottom = np.zeros(len(parts))
    for part, col, name in (("io_ms", "tab:red", "flash I/O (waiting)"), ("mem_ms", "tab:green", "memory mgmt + host->GPU"),
                            ("compute_ms", "tab:blue", "compute")):
        v = np.array([(best.get(k) or paper.get(k))[part] for k in parts])
        ax1.bar(np.arange(len(parts)), v, 0.6, bottom=bottom, color=col, label=name)
        bottom += v
    ax1.set_xticks(np.arange(len(parts)))
    ax1.set_xticklabels([short(k) for k in parts], fontsize=7)
    floors = [(i, best[k]["floor_ms"]) for i, k in enumerate(parts) if k in best and best[k].get("floor_ms")]
    if floors:
        ax1.plot(*zip(*floors), "k_", ms=22, mew=2, label="I/O floor (computed: bytes / profiled GB/s)")
    ax1.set_ylabel("ms per token")
    ax1.set_title("Where ours' time goes (stacked)", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.grid(True, axis="y", alpha=0.3)
    sp = data["speedups"]
    ax2.plot(range(1, len(sp) + 1), sp, "o-", label="naive / ours, per repeat")
    for key in methods:
        if key.startswith("ours_lookahead"):
            v = [r["speedup_vs_naive"] for r in sorted((r for r in rows if r["method"] == key), key=lambda r: r["repeat"])]
            ax2.plot(range(1, len(v) + 1), v, "s--", label="naive / " + short(key).replace("\n", " "))
    ax2.axhline(25, color="grey", ls="--", label="target 25x (issue 15)")
    ax2.axhline(PAPER_GPU["naive"][3] / PAPER_GPU["ours"][3], color="tab:orange", ls=":", label="paper, RTX 4090 (26x)")
    ax2.set_xticks(range(1, len(sp) + 1))
    ax2.set_xlabel("repeat (naive and ours run back to back)")
    ax2.set_ylabel("speedup over naive (x)")
    ax2.set_ylim(0, max(sp + [30]) * 1.1)
    ahead = [r["speedup_vs_naive"] for r in rows if r["method"] == "ours_lookahead_r1"]
    extra = f"; + lookahead (recall 1) {statistics.median(ahead):.1f}x" if ahead else ""
    ax2.set_title(f"Speedup over naive, median: ours {data['speedup_median']:.1f}x{extra} (measured)", fontsize=9)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(True, alpha=0.3)
    prof = sorted((r["chunk_bytes"], r["gbps"], r["threads"]) for r in data["profile_io"])
    for t in sorted({r[2] for r in prof}):
        pts = [(c / 1024, g) for c, g, tt in prof if tt == t]
        ax3.plot(*zip(*pts), "o-", label=f"profile-io, {t} threads")
    for key, mk in (("ours", "*"), ("naive", "s")):
        if key in best and best[key]["mean_read_kib"]:
            ax3.plot(best[key]["mean_read_kib"], best[key]["read_gbps"], mk, ms=11,
                     label=f"{key} in the engine (mean read, bytes / time in flight)")
    ax3.set_xscale("log", base=2)
    ax3.set_xlabel("read size (KiB)")
    ax3.set_ylabel("GB/s")
    ax3.set_title("That machine's disk, direct I/O (measured)", fontsize=9)
    ax3.legend(fontsize=7)
    ax3.grid(True, alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

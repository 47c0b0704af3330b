"""Issue 15, item 1: the native sparse step against the Python path, per mode (measured).

One engine per (mode, path) is built once; then each repeat generates the same prompt (greedy, --tokens tokens,
EOS ignored) on every engine in turn, so every ratio is within one repeat of one run, and the reported figures are
medians over repeats of each run's median ms/token. Modes: dense (every weight in DRAM, the reference: its FFN is not
a flash layer, so it has one path), naive, oracle and predictor (when the model has predictors) at --budget of the
model, each with ``native=False`` (the Python reference: torch matmuls over rows gathered from the cache's slots) and
``native=True`` (``llmflash.step.NativeRows``: one fused C++ call per row set). Conditions: ``quiet`` (the machine as
it is) and ``busy`` (one core held by ``yes > /dev/null`` for the condition's runs, killed afterwards). Every
number written is measured on this machine in this run; the machine's load average is recorded beside it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

from llmflash.engine import Engine, EngineConfig

import common

PATHS = ("python", "native")


def _modes(setup: dict) -> list[str]:
    modes = ["dense", "naive", "oracle"]
    if setup.get("predictors"):
        modes.append("predictor")
    return modes


def _engine(setup: dict, mode: str, native: bool, budget: float, io_threads: int = 0, compute_threads: int = 0) -> Engine:
    cfg = EngineConfig(mode=mode, dram_budget=1.0 if mode == "dense" else budget, sparsity=setup.get("sparsity", "auto"),
                       predictors=setup.get("predictors") if mode == "predictor" else None, native=native,
                       io_threads=io_threads, compute_threads=compute_threads)
    return Engine(setup["flash_dir"], cfg)


def _busy_core() -> subprocess.Popen:
    return subprocess.Popen("exec yes > /dev/null", shell=True)


def main() -> None:
    p = common.parser("native_step", __doc__)
    p.add_argument("--budget", type=float, default=0.5, help="DRAM budget of the flash modes (fraction of the model)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per condition (default 5; quick 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens generated per run (default 16; quick 4)")
    p.add_argument("--conditions", default=None, help="quiet,busy (default; quick: quiet)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    tokens = args.tokens or (4 if args.quick else 16)
    conditions = (args.conditions or ("quiet" if args.quick else "quiet,busy")).split(",")
    setup = common.real_setup(args.model)
    modes = _modes(setup)
    engines: dict[tuple[str, str], Engine] = {}
    for mode in modes:
        for path in (("python",) if mode == "dense" else PATHS):
            # both paths of a mode get the same threads: those auto chose for the Python engine (chosen from the load
            # at construction, they differed between engines built a few seconds apart and swamped the comparison)
            ref = engines.get((mode, "python"))
            engines[(mode, path)] = _engine(setup, mode, path == "native", args.budget,
                                            *((ref.threads.io_threads, ref.compute_threads) if ref else (0, 0)))
            if path == "native" and not engines[(mode, path)].native:
                print(f"{mode}: the native step did not build or apply here; its row is the Python path")
    ids = common.prompt_ids(engines[("dense", "python")].tokenizer, 32)
    runs = []
    try:
        for cond in conditions:
            hog = _busy_core() if cond == "busy" else None
            try:
                time.sleep(0.5 if hog else 0)
                for rep in range(repeats):
                    for (mode, path), e in engines.items():
                        res = e.generate(ids, tokens, stop_at_eos=False)
                        s = res.summary()
                        runs.append({"condition": cond, "repeat": rep, "mode": mode, "path": path,
                                     "native_active": e.native, "label": "measured",
                                     **{k: s[k] for k in ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "predictor_ms",
                                                          "bytes_read_per_token", "reads_per_token")},
                                     "compute_threads": res.config["compute_threads"], "io_threads": res.config["io_threads"],
                                     "native_threads": e.native_threads,
                                     "tokens": res.tokens, "load_average_1m": os.getloadavg()[0]})
                        print(f"[{cond} {rep}] {mode:9s} {path:6s} {s['ms_per_token']:8.1f} ms/token "
                              f"(io {s['io_ms']:.1f}, mem {s['mem_ms']:.1f}, compute {s['compute_ms']:.1f})", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    finally:
        for e in engines.values():
            e.close()
    rows = summarize(runs, conditions, modes)
    common.save(args.out, "native_step", args, data={"setup": setup, "runs": runs, "summary": rows, "tokens": tokens,
                                                      "repeats": repeats, "budget": args.budget},
                rows=rows, extra_config={"engines": {f"{m}/{p}": e.native for (m, p), e in engines.items()}})
    plot(rows, conditions, modes, args.out / "native_step.png", setup.get("label", setup.get("model", "")))
    for r in rows:
        print(r)


def summarize(runs: list[dict], conditions: list[str], modes: list[str]) -> list[dict]:
    """Per condition, mode and path: the median over repeats of ms/token and its parts, and the median over repeats
    of the per-repeat ratios (native / python; each / dense)."""
    rows = []
    for cond in conditions:
        by = {(r["mode"], r["path"], r["repeat"]): r for r in runs if r["condition"] == cond}
        reps = sorted({r["repeat"] for r in runs if r["condition"] == cond})
        for mode in modes:
            for path in (("python",) if mode == "dense" else PATHS):
                mine = [by[(mode, path, k)] for k in reps]
                row = {"condition": cond, "mode": mode, "path": path, "label": "measured", "repeats": len(mine)}
                for key in ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "predictor_ms"):
                    row[key] = statistics.median(r[key] for r in mine)
                row["vs_dense"] = statistics.median(by[(mode, path, k)]["ms_per_token"] / by[("dense", "python", k)]["ms_per_token"]
                                                    for k in reps)
                if path == "native":
                    ratios = [by[(mode, "python", k)]["ms_per_token"] / by[(mode, "native", k)]["ms_per_token"] for k in reps]
                    row["speedup_vs_python"] = statistics.median(ratios)
                    row["speedup_min"], row["speedup_max"] = min(ratios), max(ratios)
                    row["same_tokens"] = all(by[(mode, "python", k)]["tokens"] == by[(mode, "native", k)]["tokens"] for k in reps)
                row["load_average_1m"] = statistics.median(r["load_average_1m"] for r in mine)
                rows.append(row)
    return rows


def plot(rows: list[dict], conditions: list[str], modes: list[str], out, title: str) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.5 * len(conditions), 4), squeeze=False)
    for ax, cond in zip(axes[0], conditions):
        mine = {(r["mode"], r["path"]): r for r in rows if r["condition"] == cond}
        width = 0.38
        for j, path in enumerate(PATHS):
            xs, ys = [], []
            for i, mode in enumerate(modes):
                r = mine.get((mode, path)) or (mine.get((mode, "python")) if mode == "dense" and path == "python" else None)
                if r is not None:
                    xs.append(i + (j - 0.5) * width if mode != "dense" else i)
                    ys.append(r["ms_per_token"])
            bars = ax.bar(xs, ys, width, label=f"{path} path (measured)")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel("ms per token (median of repeats)")
        ax.set_title(f"{cond}: {title}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.savefig(fig, out)


if __name__ == "__main__":
    main()

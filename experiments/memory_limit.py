"""Real memory limits: ours against plain mmap / from_pretrained loaders inside a memory cgroup (measured).

For each model, the limit is half the model's weight bytes plus the runtime overhead, measured first: the peak
cgroup usage of a process holding the model skeleton with its resident weights and a zero FFN, after a prompt and a
few tokens, minus the resident weights (see ``memlimit.measure_overhead``). When the real model's sparse mode is the
oracle (a model without predictors), the oracle's weights, held outside the budget by contract, are added to the limit for
every loader alike. Inside that limit (page cache charged to the group):
- ours: ``llmflash generate DIR --mode <sparse> --dram-budget 0.5`` (scale model: the engine with the trace provider);
  if it is killed, again with ``--dram-budget 0.48`` in the same limit (room for the engine's working memory that its
  budget does not count: cache index arrays, compute temporaries);
- mmap: the same flash directory's files mmap-ed, dense compute over zero-copy views (llama.cpp-style loading);
- from_pretrained: transformers' loader of the original Hugging Face directory (real model, when one is cached).
Every run starts with the whole page cache dropped (``memlimit.run_limited``: libraries included, else pages cached
earlier, charged to another group, would be free for the child); pages this parent maps (it has torch loaded) stay
shared with the child: ``experiments/peer_llamacpp.py`` keeps its parent free of torch and gives its children a
private copy. Reported: completed or not (OOM kill, timeout), ms per token (median), peak
cgroup usage.
"""

from __future__ import annotations

import memlimit

from llmflash.flashdir import open_flash_dir
from llmflash.paths import cache_dir

import common


def hf_dir_for(setup: dict):
    """A private copy of the model's Hugging Face directory (another process mapping the shared copy would keep its
    pages cached and charged to another group: free memory for the child). None when there is no such directory."""
    import shutil

    if setup["model"] != "smollm2":
        return None
    src = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (src / "config.json").is_file():
        return None
    dst = cache_dir() / "memory_limit" / "hf-smollm2"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (not (dst / f.name).is_file() or (dst / f.name).stat().st_size != f.stat().st_size):
            shutil.copyfile(f, dst / f.name)
    return dst


def main() -> None:
    p = common.parser("memory_limit", __doc__)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--retry-step", type=float, default=0.02,
                   help="if ours fails in the limit, run it again with the engine's budget this much lower (same limit)")
    args = p.parse_args()
    why = memlimit.available()
    if why:
        raise SystemExit(f"memory_limit: {why}")
    data: dict = {"models": {}}
    rows = []
    setups = common.setups(args)
    work = cache_dir() / "memory_limit"
    for kind, setup in setups:
        fd = open_flash_dir(setup["flash_dir"])
        real = kind == "real"
        ptoks = common.PROMPT_TOKENS if real else 1
        ours_tokens = (24 if args.quick else 64) if real else (9 if args.quick else 40)
        base_tokens = (12 if args.quick else 32) if real else (1 if args.quick else 4)
        if common.smoke():  # the test suite's end-to-end tier: a few tokens
            ours_tokens, base_tokens = 3, 2
        print(f"[{setup['model']}] measuring the runtime overhead ...", flush=True)
        ov = memlimit.measure_overhead(setup["flash_dir"], ptoks, ours_tokens)
        allowance = memlimit.oracle_allowance(setup) if real else 0
        limit = int(args.budget * fd.model_bytes) + ov["overhead_bytes"] + allowance
        print(f"    overhead {ov['overhead_bytes'] / 1e6:.0f} MB; limit {limit / 1e9:.3f} GB "
              f"(= {args.budget:g} x {fd.model_bytes / 1e9:.3f} GB + overhead + oracle allowance {allowance / 1e6:.0f} MB)")
        runs = {}
        timeout = 300 if args.quick else 900
        def ours(budget: float, name: str) -> dict:
            print(f"[{setup['model']}] {name} (engine budget {budget:g}) in the limit ...", flush=True)
            if real:
                r = memlimit.run_cli_limited(setup, limit, ours_tokens, work, name, timeout, budget=budget)
            else:
                r = memlimit.run_limited(
                    memlimit.python_child("engine", setup["flash_dir"], "--tokens", str(ours_tokens), "--budget",
                                          str(budget)), limit, name, timeout, cold=[setup["flash_dir"]])
            r["engine_budget"] = budget
            return r

        runs["ours"] = ours(args.budget, "ours")
        if not runs["ours"].get("completed"):  # what the engine needs beyond its own accounting: leave it room
            b = round(args.budget - args.retry_step, 3)
            runs[f"ours_budget_{b:g}"] = ours(b, f"ours_budget_{b:g}")
        print(f"[{setup['model']}] mmap loader in the limit ...", flush=True)
        mmap_cmd = memlimit.python_child("mmap", setup["flash_dir"], "--prompt-tokens", str(ptoks), "--tokens",
                                         str(base_tokens), "--sparsity", setup["sparsity"], "--threshold-sparsity",
                                         str(setup.get("threshold_sparsity") or 0.8))
        runs["mmap"] = memlimit.run_limited(mmap_cmd, limit, "mmap", timeout, cold=[setup["flash_dir"]])
        if not args.quick:
            print(f"[{setup['model']}] mmap loader without a limit (reference) ...", flush=True)
            runs["mmap_unlimited"] = memlimit.run_limited(mmap_cmd, None, "mmap-free", timeout, cold=[setup["flash_dir"]])
        hf = hf_dir_for(setup) if real else None
        if hf is not None:
            print(f"[{setup['model']}] from_pretrained in the limit ...", flush=True)
            runs["from_pretrained"] = memlimit.run_limited(
                memlimit.python_child("hf", str(hf), "--prompt-tokens", str(ptoks), "--tokens", str(base_tokens)),
                limit, "hf", timeout, cold=[hf])
        data["models"][setup["model"]] = {"setup": setup, "overhead": ov, "limit_bytes": limit,
                                          "oracle_allowance_bytes": allowance, "model_bytes": fd.model_bytes,
                                          "runs": runs}
        for name, r in runs.items():
            res = r.get("result") or {}
            rows.append({"model": setup["model"], "loader": name, "limit_gb": (r.get("limit_bytes") or 0) / 1e9,
                         "completed": r.get("completed"), "oom_kills": r.get("oom_kills"),
                         "timed_out": r.get("timed_out"), "returncode": r.get("returncode"),
                         "ms_per_token": res.get("ms_per_token"), "max_usage_gb": r.get("max_usage_bytes", -1) / 1e9,
                         "wall_s": r.get("wall_s"), "overhead_mb": ov["overhead_bytes"] / 1e6, "label": "measured"})
            ms = res.get("ms_per_token")
            print(f"    {name:<16} completed={r.get('completed')} ms/token={ms if ms is None else round(ms)} "
                  f"peak={r.get('max_usage_bytes', -1) / 1e9:.2f} GB oom_kills={r.get('oom_kills')}")
    common.save(args.out, "memory_limit", args, data=data, rows=rows, extra_config={"setups": [s for _, s in setups]})
    plot(rows, args.out / "memory_limit.png")


def plot(rows: list[dict], png) -> None:
    import numpy as np

    plt = common.plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.3), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        x = np.arange(len(rs))
        vals = [r["ms_per_token"] if r["completed"] and r["ms_per_token"] else 0 for r in rs]
        cols = ["tab:blue" if r["loader"].startswith("ours") else "tab:grey" for r in rs]
        ax.bar(x, vals, color=cols)
        for i, r in enumerate(rs):
            txt = f"{r['ms_per_token']:,.0f} ms" if r["completed"] and r["ms_per_token"] else \
                ("OOM-killed" if (r.get("oom_kills") or 0) > 0 else ("timeout" if r.get("timed_out") else "failed"))
            ax.annotate(f"{txt}\npeak {r['max_usage_gb']:.2f} GB", (x[i], vals[i]), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([r["loader"].replace("_", "\n") for r in rs], fontsize=8)
        lim = rs[0]["limit_gb"]
        ax.set_ylabel("latency per token (ms, median)")
        ax.set_ylim(0, max(vals + [1]) * 1.35)
        ax.set_title(f"{m}: inside a {lim:.2f} GB memory cgroup (measured)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

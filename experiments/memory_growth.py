"""Why the scale model outgrows a hard memory limit at exactly half the model: its anonymous memory per token.

The engine's budget counts resident weights, caches, staging buffer and predictors; a memory cgroup of that budget plus
the measured runtime overhead still OOM-kills the scale model at ``--dram-budget 0.5`` (results/memory_limit). This
measures the process's anonymous resident memory (``RssAnon`` of /proc/self/status) after every generated token, in a
fresh process per variant, for the scale model in predictor mode (trace source) at budget 0.48:

- ``no_bucket``: ``EngineConfig(row_bucket=0)``: every region of cached rows computed at its own size;
- ``row_bucket``: ``EngineConfig(row_bucket=256)`` (the engine's default for this model): cached rows computed in
  regions padded to multiples of 256 rows, so the FFN matmuls see few distinct shapes;
- ``onednn_off``: no bucketing and oneDNN disabled for every matmul (``torch.backends.mkldnn.flags(enabled=False)``);
- ``native``: the native sparse step (issue 15; the three above are the Python path): the FFN rows are read in place
  by one C++ call per row set, no matmul and no gathered copy, so no bucketing and no working reserve.

    python experiments/memory_growth.py [--quick] [--tokens 12] [--model DIR]

``--model DIR`` measures a flash directory instead (its own sparsity rule, oracle sets, the experiments' prompt; e.g.
a tiny model in the test suite's end-to-end tier).

Writes results/memory_growth/{memory_growth.json, memory_growth.csv, memory_growth.png, config.json}. Measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time

import common
import engine_runs

log = logging.getLogger("memory_growth")
VARIANTS = {"no_bucket": {"row_bucket": 0, "native": False}, "row_bucket": {"row_bucket": 256, "native": False},
            "onednn_off": {"row_bucket": 0, "native": False},
            # issue 15: the native step over the cache's slots (no FFN matmuls; working_reserve's auto is then 0)
            "native": {"native": True}}
BUDGET = 0.48


def rss_anon_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return -1


def child(variant: str, tokens: int, model: str = common.SCALE) -> dict:
    """One variant in this process: RssAnon after construction and after every token."""
    import torch

    from llmflash.engine import Engine, EngineConfig

    if model == common.SCALE:
        setup = common.scale_setup()
        factory, _ = engine_runs.trace_provider_factory("predicted")
        mode, provider = "predictor", factory()
    else:
        setup = common.flash_dir_setup(model)
        mode, provider = setup["sparse_mode"], None
    start = rss_anon_bytes()
    engine = Engine(setup["flash_dir"], EngineConfig(mode=mode, dram_budget=BUDGET, **VARIANTS[variant]),
                    provider=provider)
    built = rss_anon_bytes()
    prompt = engine_runs.SCALE_PROMPT if model == common.SCALE else common.prompt_ids(engine.tokenizer)
    per_token: list[int] = []
    last = engine.adapter.layers(engine.model)[-1]
    hook = last.register_forward_hook(lambda *_: per_token.append(rss_anon_bytes()))  # once per forward = per token
    ctx = torch.backends.mkldnn.flags(enabled=False) if variant == "onednn_off" else contextlib.nullcontext()
    with ctx:
        res = engine.generate(prompt, tokens, stop_at_eos=False)
    hook.remove()
    out = {"variant": variant, "engine_config": res.config, "dram_bytes": engine.dram_bytes, "rss_anon_start": start,
           "rss_anon_built": built, "rss_anon_per_token": per_token, "ms_per_token": [t.total_ms for t in res.per_token]}
    engine.close()
    return out


def plot(runs: list[dict], path, title: str = "OPT-6.7B-geometry scale model, predictor mode") -> None:
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in runs:
        base = r["dram_bytes"] + r["rss_anon_start"]
        y = [(v - base) / 2**20 for v in r["rss_anon_per_token"]]
        med = sorted(r["ms_per_token"])[len(r["ms_per_token"]) // 2]
        ax.plot(range(len(y)), y, marker="o", label=f"{r['variant']} (median {med:,.0f} ms/token)")
    ax.set_xlabel("forward pass (0 = prompt, then one per generated token)")
    ax.set_ylabel("RssAnon - (engine DRAM + interpreter) [MiB]")
    ax.set_title(f"{title}, budget 0.48")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.savefig(fig, path)


def main() -> None:
    ap = common.parser("memory_growth", __doc__.splitlines()[0], models=False)
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens per variant (default 12, --quick 8)")
    ap.add_argument("--child", default=None, help="internal: run one variant and print its JSON")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which variants to run, comma-separated")
    ap.add_argument("--model", default=common.SCALE, help="the scale model (default), or a flash directory DIR")
    args = ap.parse_args()
    tokens = args.tokens or (8 if args.quick else 12)
    if args.child:
        print(json.dumps(child(args.child, tokens, args.model)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = []
    for variant in args.variants.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--model", args.model]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed: {proc.stderr.strip().splitlines()[-1:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        growth = (run["rss_anon_per_token"][-1] - run["rss_anon_per_token"][0]) / 2**20
        run["growth_mib"] = growth
        run["growth_mib_per_token"] = growth / max(1, len(run["rss_anon_per_token"]) - 1)
        runs.append(run)
        log.info("%s: +%.0f MiB over %d tokens (%.1f MiB/token), %.0f s", variant, growth, tokens,
                 run["growth_mib_per_token"], time.time() - t0)
    rows = [{"variant": r["variant"], "token": i, "rss_anon_mib": v / 2**20,
             "ms_per_token": (r["ms_per_token"][i - 1] if 0 < i <= len(r["ms_per_token"]) else "")}
            for r in runs for i, v in enumerate(r["rss_anon_per_token"])]
    common.save(args.out, "memory_growth", args, {"budget": BUDGET, "tokens": tokens, "runs": runs, "label": "measured",
                                                  "model": args.model}, rows)
    plot(runs, args.out / "memory_growth.png", *(() if args.model == common.SCALE else (f"{args.model}, oracle mode",)))


if __name__ == "__main__":
    main()

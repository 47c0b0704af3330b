"""Issue 2's acceptance checks on a real model, in one process: naive and the sparse path against profile-io at
their read sizes (16 threads), the bytes the readers counted against the kernel's count, and the share of memory
management in a token. Run it on a quiet machine (the disk is shared and noisy: repeat and take medians).

    python experiments/engine_checks.py --model smollm2 --mode oracle          # threshold rule, 80% sparsity
    python experiments/engine_checks.py --model smollm2-relu --mode predictor  # relu rule, committed predictors
    python experiments/engine_checks.py --model DIR --profile-gb 0.01           # a flash directory (its own rule)

Metrics as defined in ``llmflash.metrics``: ``read_gbps`` = bytes / read time in flight, ``computed_gbps`` =
profile-io's throughput at the mode's mean read size, ``read_efficiency`` = their ratio. Committed results before
issue 14 name the reference ``profile_io_gbps_at_read_size`` (same meaning).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from llmflash import metrics
from llmflash.demo import default_setup, flash_dir_for
from llmflash.engine import Engine, EngineConfig
from llmflash.models import ALIASES
from llmflash.paths import cache_dir
from llmflash.report import environment, write_json
from llmflash.storage import proc_read_bytes
from research.profile_io import READS_PER_POINT, profile_io

import common

CHUNKS = (4096, 8192, 16384, 32768, 262144)
SMOKE_CHUNKS = (4096, 16384)  # LLMFLASH_SMOKE=1: a few small reads


def run(model: str, mode: str, tokens: int, prompt: str, profile_bytes: int = 1 << 30) -> dict:
    """``model``: an alias, or a flash directory (its own sparsity rule and predictors: none, so --mode oracle)."""
    if model in ALIASES:
        setup, path = default_setup(model), flash_dir_for(model)
    else:
        setup = common.flash_dir_setup(model)
        path = setup["flash_dir"]
    out: dict = {"model": model, "setup": setup, "tokens": tokens, "prompt": prompt}
    for m in ("naive", mode):
        e = Engine(path, EngineConfig(mode=m, dram_budget=0.5, sparsity=setup["sparsity"],
                                      predictors=setup["predictors"] if m == "predictor" else None))
        ids = e.tokenizer(prompt, return_tensors="pt").input_ids[0]
        e.generate(ids[:4], 2, stop_at_eos=False)  # warm-up
        counted0, kernel0 = e.reader_totals()[0], proc_read_bytes()
        res = e.generate(ids, tokens, stop_at_eos=False)
        counted, kernel = e.reader_totals()[0] - counted0, proc_read_bytes() - kernel0
        e.close()
        out[m] = {**res.summary(), "kernel_read_bytes": kernel, "counted_read_bytes": counted,
                  "mem_share": statistics.median(t.mem_ms / t.total_ms for t in res.per_token),
                  "dram_fraction": res.dram_bytes / res.model_bytes}
    smoke = common.smoke()
    rows = profile_io(cache_dir(), profile_bytes, chunk_sizes=SMOKE_CHUNKS if smoke else CHUNKS, thread_counts=(16,),
                      repeats=1 if smoke else 3, reads_per_point=64 if smoke else READS_PER_POINT, progress=not smoke)
    out["profile_io"] = rows
    table = sorted((r["chunk_bytes"], r["gbps"]) for r in rows)
    for m in ("naive", mode):  # profile-io's throughput at this mode's mean read size (llmflash.metrics)
        ref = metrics.profiled_gbps(table, out[m]["mean_read_bytes"])
        out[m]["computed_gbps"] = ref
        out[m]["read_efficiency"] = metrics.read_efficiency(out[m]["read_gbps"], ref)
    out["environment"] = environment()
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="experiments/engine_checks.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, smollm2-relu or a flash directory")
    p.add_argument("--mode", default="oracle", choices=("oracle", "predictor"))
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--prompt", default="The history of the printing press begins")
    p.add_argument("--profile-gb", type=float, default=1.0, help="size of profile-io's test file (GB)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results" / "engine_checks")
    args = p.parse_args()
    out = run(args.model, args.mode, args.tokens, args.prompt, int(args.profile_gb * 1e9))
    write_json(args.out / f"{Path(args.model).name}-{args.mode}.json", out)
    for m in ("naive", args.mode):
        r = out[m]
        print(f"{m}: {r['ms_per_token']:.1f} ms/token, reads {r['read_gbps']:.3f} GB/s at {r['mean_read_bytes'] / 1024:.1f} KiB "
              f"= {r['read_efficiency']:.0%} of profile-io ({r['computed_gbps']:.3f}); kernel/counted bytes "
              f"{r['kernel_read_bytes']}/{r['counted_read_bytes']}; memory management {r['mem_share']:.1%} of a token")


if __name__ == "__main__":
    main()

"""Issue 2's check: ``llmflash generate DIR --dram-budget 0.5`` inside a memory cgroup of half the model's bytes plus
the measured runtime overhead, completing without failure (measured).

The overhead is measured first (``memlimit.measure_overhead``: the peak cgroup usage of the model skeleton with its
resident weights and a zero FFN, after the prompt and a few tokens, minus the resident weights). When the sparse
mode is the oracle (a model without predictors), the oracle's held weights (outside the budget by contract) are added and
stated. Exits non-zero if the run does not complete.
"""

from __future__ import annotations

import sys

import memlimit

from llmflash.flashdir import open_flash_dir
from llmflash.paths import cache_dir

import common


def main() -> int:
    p = common.parser("cgroup_budget", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="tokens to generate (default 16 quick, 64 full)")
    p.add_argument("--budget", type=float, default=0.5)
    args = p.parse_args()
    why = memlimit.available()
    if why:
        print(f"cgroup_budget: {why}", file=sys.stderr)
        return 2
    setup = common.real_setup(args.model)
    fd = open_flash_dir(setup["flash_dir"])
    n = args.tokens or (16 if args.quick else 64)
    ov = memlimit.measure_overhead(setup["flash_dir"], common.PROMPT_TOKENS, n)
    allowance = memlimit.oracle_allowance(setup)
    limit = int(args.budget * fd.model_bytes) + ov["overhead_bytes"] + allowance
    r = memlimit.run_cli_limited(setup, limit, n, cache_dir() / "cgroup_budget", "generate", 600)
    res = r.get("result") or {}
    out = {
        "label": "measured", "setup": setup, "command": " ".join(r.get("cmd", [])), "model_bytes": fd.model_bytes,
        "budget": args.budget, "overhead": ov, "oracle_allowance_bytes": allowance, "limit_bytes": limit,
        "limit_formula": f"{args.budget:g} x model bytes + runtime overhead + oracle allowance",
        "completed": r.get("completed"), "returncode": r.get("returncode"), "oom_kills": r.get("oom_kills"),
        "failcnt": r.get("failcnt"), "max_usage_bytes": r.get("max_usage_bytes"), "ms_per_token": res.get("ms_per_token"),
        "engine_dram_bytes": res.get("dram_bytes"), "stderr_tail": r.get("stderr_tail"),
    }
    common.save(args.out, "cgroup_budget", args, data=out)
    print(f"{setup['model']}: limit {limit / 1e6:.0f} MB = {args.budget:g} x {fd.model_bytes / 1e6:.0f} MB + overhead "
          f"{ov['overhead_bytes'] / 1e6:.0f} MB + oracle allowance {allowance / 1e6:.0f} MB; "
          f"completed={r.get('completed')}, peak {r.get('max_usage_bytes', -1) / 1e6:.0f} MB, "
          f"{res.get('ms_per_token')} ms/token, memory.failcnt={r.get('failcnt')}")
    return 0 if r.get("completed") else 1


if __name__ == "__main__":
    raise SystemExit(main())

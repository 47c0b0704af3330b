"""Consistent perplexity ratios for frontiers recorded by ``sparsetrain.gated run`` before the fourth session.

Those runs scored the student on the first ``--frontier-tokens`` (65,536) tokens of each held-out corpus but divided by
the original's perplexity on the first ``--eval-tokens`` (131,072): different text. ``sparsetrain.gated frontier
--teacher-tokens 65536`` scored the original on the same 65,536 tokens (``teacher_at``); this script divides again and
writes a CSV per run (computed from measured perplexities).

    python3 experiments/sparse_frontier_ratios.py --teacher results/relufy/campaign4/frontier_lora20.json \
        results/relufy/campaign3/act_rule_final.json results/relufy/campaign4/relu_arm_final.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/sparse_frontier_ratios.py", description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="a frontier.json with teacher_at (the original's scores)")
    ap.add_argument("--tokens", default="65536", help="the frontier's token budget per corpus")
    ap.add_argument("finals", type=Path, nargs="+", help="final.json files whose frontier used that budget")
    ap.add_argument("--out", type=Path, default=None, help="where the CSVs go (default: beside each final.json)")
    args = ap.parse_args()
    teacher = json.loads(args.teacher.read_text())["teacher_at"][args.tokens]
    for path in args.finals:
        rows = json.loads(path.read_text())["frontier"]
        name = path.stem.replace("_final", "") + "_frontier.csv"
        out = args.out / name if args.out else path.with_name(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["target_sparsity", "seq_len", "corpus", "zeros", "ppl", "original_ppl", "ppl_ratio",
                        "ppl_ratio_as_recorded"])
            for r in rows:
                ref = teacher[str(r["seq_len"])][r["corpus"]]["ppl"]
                w.writerow([r["target_sparsity"], r["seq_len"], r["corpus"], round(r["zeros"], 4), round(r["ppl"], 3),
                            round(ref, 3), round(r["ppl"] / ref, 3), round(r["ppl_ratio"], 3)])
        print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()

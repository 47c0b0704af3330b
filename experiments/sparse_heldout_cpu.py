"""Held-out perplexity of the shipped `smollm2-relu` beside the original SmolLM2, measured on this CPU.

Each held-out corpus of the sparse-model campaign (never read by training: kjv, shakespeare, pydoc, wiki:eval), the
first ``--max-tokens`` tokens in windows of 512 and 2048, both models through `llmflash eval-ppl`'s Python API (the
sparse one under its own threshold rule, `--sparsity auto`). Writes results/relufy/heldout_cpu.json.

    python3 experiments/sparse_heldout_cpu.py [--max-tokens 16384] [--corpora kjv:,shakespeare:,pydoc:,wiki:eval]
                                              [--original smollm2] [--sparse smollm2-relu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmflash.commands import eval_ppl

CORPORA = ("kjv:", "shakespeare:", "pydoc:", "wiki:eval")


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/sparse_heldout_cpu.py", description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=16_384)
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--corpora", default=",".join(CORPORA), help="held-out text sources (comma-separated)")
    ap.add_argument("--original", default="smollm2", help="the original model (an alias or a model directory)")
    ap.add_argument("--sparse", default="smollm2-relu", help="the sparse model (an alias or a model directory)")
    ap.add_argument("--out", type=Path, default=Path("results/relufy/heldout_cpu.json"))
    args = ap.parse_args()
    rows = []
    t0 = time.time()
    for seq in (int(s) for s in args.seq_lens.split(",")):
        for corpus in args.corpora.split(","):
            dense = eval_ppl(args.original, corpus, max_tokens=args.max_tokens, seq_len=seq, sparsity="relu")
            sparse = eval_ppl(args.sparse, corpus, max_tokens=args.max_tokens, seq_len=seq, sparsity="auto")
            row = {"corpus": corpus, "seq_len": seq, "tokens": sparse["tokens"], "ppl_original": dense["ppl"],
                   "ppl_sparse": sparse["ppl"], "ratio": sparse["ppl"] / dense["ppl"],
                   "ffn_zeros": 1 - sparse["ffn_active_fraction"]}
            rows.append(row)
            print(f"{corpus:14s} {seq:5d}: original {row['ppl_original']:.2f}, sparse {row['ppl_sparse']:.2f} "
                  f"({row['ratio']:.3f}x) at {row['ffn_zeros']:.1%} zeros", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"max_tokens": args.max_tokens, "device": "cpu", "dtype": "float32",
                                    "seconds": round(time.time() - t0, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

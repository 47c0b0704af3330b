"""Greedy continuations of ten prompts by the original SmolLM2 and the sparse `smollm2-relu`, side by side.

Fluency check of the sparse-model issue: no continuation may have one token making up more than 40% of its tokens.
Both models run in DRAM (transformers, float32, CPU); the sparse one applies its own threshold rule.

    python3 experiments/sparse_continuations.py [--out results/relufy] [--max-new-tokens 48]
                                                [--original smollm2] [--sparse smollm2-relu]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from llmflash.models import load_model

PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "In 1492, Columbus",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "To make a cup of tea, first",
    "The most important invention of the twentieth century was",
    "def fibonacci(n):",
    "The French Revolution began in",
    "My favourite animal is the elephant because",
)


def continue_all(spec: str, max_new: int, prompts: tuple[str, ...] = PROMPTS) -> list[dict]:
    model, tok, _ = load_model(spec, torch.float32)
    rows = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        top = Counter(new).most_common(1)[0][1] / max(1, len(new)) if new else 0.0
        rows.append({"prompt": prompt, "continuation": tok.decode(new), "tokens": len(new),
                     "top_token_share": round(top, 3), "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/sparse_continuations.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/relufy"))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N of the {len(PROMPTS)} prompts")
    ap.add_argument("--original", default="smollm2", help="the original model (an alias or a model directory)")
    ap.add_argument("--sparse", default="smollm2-relu", help="the sparse model (an alias or a model directory)")
    args = ap.parse_args()
    res = {spec: continue_all(spec, args.max_new_tokens, PROMPTS[: args.prompts]) for spec in (args.original, args.sparse)}
    worst = max(r["top_token_share"] for r in res[args.sparse])
    summary = {"max_new_tokens": args.max_new_tokens, "decoding": "greedy", "sparse_worst_top_token_share": worst,
               "fluent": worst <= 0.40, "models": res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continuations.json").write_text(json.dumps(summary, indent=1))
    title = ("original SmolLM2 vs sparse smollm2-relu" if (args.original, args.sparse) == ("smollm2", "smollm2-relu")
             else f"original {args.original} vs sparse {args.sparse}")
    lines = [f"# Greedy continuations: {title}", "",
             f"{args.max_new_tokens} new tokens, greedy, CPU float32 (measured; `python3 experiments/sparse_continuations.py`). "
             f"Largest share of one token in a sparse continuation: {worst:.2f} (limit 0.40).", ""]
    for a, b in zip(res[args.original], res[args.sparse]):
        lines += [f"**{a['prompt']}**", "", f"- original: {a['continuation']!r}",
                  f"- sparse: {b['continuation']!r} (top-token share {b['top_token_share']})", ""]
    (args.out / "continuations.md").write_text("\n".join(lines))
    print(f"worst top-token share of the sparse model: {worst:.2f} ({'fluent' if worst <= 0.4 else 'NOT fluent'})")


if __name__ == "__main__":
    main()

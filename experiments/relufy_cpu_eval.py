"""CPU measurement of the shipped relufied model against the original, on the same held-out tokens.

    python experiments/relufy_cpu_eval.py [--max-tokens 8192] [--extra ARTIFACT_DIR:LABEL ...] [--dense-ppl P]
                                          [--original smollm2] [--sparse smollm2-relu]

Perplexity with ``llmflash.evaluate.perplexity`` (wiki:eval, first 8,192 tokens, windows of 512, float32) and the FFN
active fraction (relu rule: exact zeros, over all layers and tokens) of ``smollm2`` and ``smollm2-relu`` (loaded with
``llmflash.models.load_model`` from the committed artifact). ``--dense-ppl`` reuses the original's perplexity measured
the same way elsewhere (experiments/threshold_curve.py's dense row: same function, text, tokens) instead of measuring it
again (the shared 2-core machine is slow). Writes results/relufy/v1/cpu_eval.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from llmflash.evaluate import perplexity
from llmflash.ffn import SparsityRule
from llmflash.models import load_model
from llmflash.paths import repo_root
from llmflash.relufy_v1_format import apply_relufication
from llmflash.report import environment, write_json
from llmflash.text import load_texts

log = logging.getLogger("relufy_cpu_eval")
OUT = repo_root() / "results" / "relufy" / "v1" / "cpu_eval.json"


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/relufy_cpu_eval.py", description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--extra", nargs="*", default=[], help="more artifacts to measure, as DIR:LABEL")
    ap.add_argument("--dense-ppl", type=float, default=None, help="the original's perplexity, measured identically elsewhere")
    ap.add_argument("--original", default="smollm2", help="the original model (an alias or a model directory)")
    ap.add_argument("--sparse", default="smollm2-relu", help="the relufied model (an alias or a model directory)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    docs = load_texts("wiki:eval")
    results = {}
    todo = [(args.original, args.original, None)] if args.dense_ppl is None else []
    if args.dense_ppl is not None:
        results[args.original] = {"ppl": args.dense_ppl, "ffn_active_fraction": 1.0, "tokens": args.max_tokens - args.max_tokens // args.seq_len,
                              "source": "experiments/threshold_curve.py dense row (same function, text and tokens)"}
    todo.append((args.sparse, args.sparse, None))
    todo += [(e.rsplit(":", 1)[1], args.original, Path(e.rsplit(":", 1)[0])) for e in args.extra]
    for label, alias, art in todo:
        t0 = time.time()
        model, tok, _ = load_model(alias)
        if art is not None:
            model = apply_relufication(model, art)
        load_s = time.time() - t0
        res = perplexity(model, tok, docs, seq_len=args.seq_len, max_tokens=args.max_tokens, rule=SparsityRule("relu"))
        res |= {"load_s": round(load_s, 1), "eval_s": round(time.time() - t0 - load_s, 1)}
        results[label] = res
        log.info("%s: ppl %.3f, FFN active fraction %.4f (load %.0f s)", label, res["ppl"], res["ffn_active_fraction"], load_s)
    dense = results[args.original]["ppl"]
    for r in results.values():
        r["ppl_ratio"] = r["ppl"] / dense
    write_json(args.out, {
        "text": "wiki:eval (Wikipedia articles held out from wiki:train by title hash)", "max_tokens": args.max_tokens,
        "seq_len": args.seq_len, "dtype": "float32", "device": "cpu", "rule": "relu (exact zeros)", "results": results,
        "environment": environment(), "command": "python experiments/relufy_cpu_eval.py",
    })


if __name__ == "__main__":
    main()

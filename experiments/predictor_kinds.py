"""Low-rank against low-bit predictors on held-out corpora: recall, neurons read, window, perplexity, DRAM.

The paper's predictors are trained low-rank maps; a ``lowbit`` set is a 4-bit copy of the model's own gate and up
projections with calibrated cuts (``predictors.lowbit``). Both are measured here on the same held-out text, with the
same code as ``llmflash eval-predictors --ppl``: the model runs with its true FFN and the rule applied, each set
predicts from the true trajectory's inputs, and the perplexity of predictor mode (the window's union, missed neurons
really missing) is set beside oracle mode's on the same tokens.

The low-bit set is built here from ``--calibration-text`` activations (kept in the cache), with the same settings as
the model's committed default recipe, so the run checks what ships. Writes ``kinds.json``, ``kinds.csv``,
``kinds.png`` and ``config.json`` into ``--out``.

    python experiments/predictor_kinds.py --out results/predictors/lowbit
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmflash.models import load_any  # noqa: E402
from llmflash.paths import cache_dir, repo_root  # noqa: E402
from llmflash.predictor import PredictorSet  # noqa: E402
from llmflash.report import environment, write_json  # noqa: E402
from llmflash.sparsity import rule_for  # noqa: E402
from llmflash.text import load_texts  # noqa: E402
from predictors.collect import Activations, CollectConfig, collect  # noqa: E402
from predictors.evaluate import evaluate_set  # noqa: E402
from predictors.lowbit import LowBitConfig, build_lowbit  # noqa: E402

log = logging.getLogger("predictor_kinds")
LOWRANK_DEFAULT = repo_root() / "predictors" / "artifacts" / "smollm2-relu-lowrank"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-relu", help="model alias, directory or flash directory")
    p.add_argument("--lowrank", default=str(LOWRANK_DEFAULT) if LOWRANK_DEFAULT.is_dir() else "none",
                   help="the low-rank set to compare ('none': leave it out; default: the committed one, if any)")
    p.add_argument("--calibration-text", default="wiki:train", help="the low-bit cuts' calibration text")
    p.add_argument("--calibration-tokens", type=int, default=32_768)
    p.add_argument("--recall-target", type=float, default=0.96, help="the shipped recipe's (held-out recall >= 0.95)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--corpora", default="kjv:,shakespeare:,pydoc:,wiki:eval", help="held-out text, comma-separated")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per corpus")
    p.add_argument("--window", type=int, default=5, help="sliding window (the engine's default)")
    p.add_argument("--out", type=Path, default=repo_root() / "results" / "predictors" / "lowbit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_any(args.model)
    rule = rule_for(lm.model, lm.tokenizer, "auto", thresholds=lm.thresholds, cache_key=lm.name)
    key = hashlib.sha256(f"{args.model}|{args.calibration_text}|{args.calibration_tokens}|{rule}".encode()).hexdigest()[:12]
    act_dir = cache_dir() / "activations" / f"kinds-{key}"
    if not (act_dir / "manifest.json").is_file():
        collect(lm, load_texts(args.calibration_text), args.calibration_text, act_dir, rule,
                CollectConfig(max_tokens=args.calibration_tokens, seq_len=512))
    lm = load_any(args.model)  # collect swapped the FFN modules: a fresh copy
    t0 = time.perf_counter()
    lowbit = build_lowbit(Activations.open(act_dir), lm, LowBitConfig(group_size=args.group_size,
                                                                       recall_target=args.recall_target))
    build_s = time.perf_counter() - t0
    built = act_dir.with_name(f"{act_dir.name}-lowbit")  # the set in the cache; only its sidecar is a result
    lowbit.save(built)
    shutil.copy(built / "predictors.json", args.out / "lowbit_set.json")
    sets = {"lowbit": PredictorSet.load(built)}
    if args.lowrank != "none":
        sets["lowrank"] = PredictorSet.load(args.lowrank)
    rows = []
    for source in [s for s in args.corpora.split(",") if s]:
        docs = load_texts(source)
        for kind, pset in sets.items():
            lm = load_any(args.model)
            res = evaluate_set(lm, docs, pset, max_tokens=args.tokens, window=args.window, ppl=True)
            res.pop("per_layer", None)
            rows.append({"corpus": source, **res})
            log.info("%s %s: recall %.3f, read %.3f for %.3f active (%.2fx), ppl %.3f vs oracle %.3f (%+.2f%%)", source,
                     kind, res["recall"], res["predicted_active_fraction"], res["true_active_fraction"],
                     res["over_prediction"], res["ppl_predictor"], res["ppl_oracle"], 100 * (res["ppl_ratio"] - 1))
    cols = ["corpus", "kind", "tokens", "recall", "min_layer_recall", "precision", "predicted_active_fraction",
            "true_active_fraction", "over_prediction", "window_active_fraction", "window_new_fraction", "ppl_oracle",
            "ppl_predictor", "ppl_ratio", "predictor_bytes", "predictor_macs_per_token"]
    with open(args.out / "kinds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json(args.out / "kinds.json", {"what": "measured", "rows": rows, "lowbit_build_s": build_s})
    write_json(args.out / "config.json", {**{k: str(v) for k, v in vars(args).items()}, "environment": environment(),
                                          "calibration_activations": str(act_dir)})
    plot(rows, args.out / "kinds.png", args.recall_target)
    return 0


def plot(rows: list[dict], path: Path, target: float) -> None:
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        got = {r["corpus"]: r for r in rows if r["kind"] == kind}
        xs = [i + k * width for i in range(len(corpora))]
        mib = got[corpora[0]]["predictor_bytes"] / 2**20
        label = f"{kind} ({mib:.1f} MiB)"
        axes[0].bar(xs, [got[c]["recall"] for c in corpora], width, label=label)
        axes[1].bar(xs, [got[c]["over_prediction"] for c in corpora], width, label=label)
        axes[2].bar(xs, [100 * (got[c]["ppl_ratio"] - 1) for c in corpora], width, label=label)
    axes[0].axhline(target, color="k", lw=0.8, ls="--")
    axes[0].set_ylim(0.8, 1.0)
    axes[1].axhline(2.0, color="k", lw=0.8, ls="--")
    axes[2].axhline(3.0, color="k", lw=0.8, ls="--")
    for ax, title in zip(axes, ("recall (target dashed)", "neurons read / active (issue: <= 2)",
                                "predictor vs oracle perplexity, % (issue: <= 3)")):
        ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(corpora))], corpora, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out corpora, measured: low-rank (trained) vs low-bit (4-bit gate and up) predictors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""Commands ``collect``, ``train-predictors`` and ``eval-predictors`` (see the contract)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="record per layer the predictor input and the FFN activation labels")
    p.add_argument("model", metavar="DIR|MODEL")
    p.add_argument("--text-file", required=True, help="UTF-8 text file, wiki:train, or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--out", required=True, type=Path, metavar="ACTDIR")
    p.add_argument("--max-tokens", type=int, default=131_072)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sparsity", choices=("auto", "relu", "threshold"), default="auto", help="auto: the model's own rule, else relu")
    p.add_argument("--threshold-sparsity", type=float, default=0.8, help="target sparsity of the threshold rule")
    p.add_argument("--force", action="store_true", help="replace an existing ACTDIR")
    p.set_defaults(func=run_collect)

    p = sub.add_parser("train-predictors", help="train the low-rank activation predictors (or build low-bit ones)")
    p.add_argument("actdir", type=Path, metavar="ACTDIR")
    p.add_argument("--out", required=True, type=Path, metavar="PREDDIR")
    p.add_argument("--kind", choices=("lowrank", "lowbit"), default="lowrank",
                   help="lowrank: trained low-rank predictors (the paper's); lowbit: a 4-bit copy of the model's own gate "
                        "and up projections, only its thresholds calibrated (more DRAM, far fewer neurons read)")
    p.add_argument("--model", default=None, metavar="DIR|MODEL",
                   help="lowbit: the model ACTDIR was collected from (default: the model ACTDIR names)")
    p.add_argument("--group-size", type=int, default=64, help="lowbit: inputs per scale (32, 64, 128 or 256)")
    p.add_argument("--recipe", action="store_true",
                   help="lowbit, a model alias: write the thresholds alone (a few KB); the codes are derived from the "
                        "model's weights at first use")
    p.add_argument("--rank", type=int, default=48, help="rank of every layer but the last ones")
    p.add_argument("--rank-last", type=int, default=None, help="rank of the last --last-layers layers (default 2 x rank)")
    p.add_argument("--last-layers", type=int, default=4)
    p.add_argument("--ranks", default=None, help="explicit per-layer ranks, comma-separated (overrides --rank*)")
    p.add_argument("--recall-target", type=float, default=0.95, help="per-layer held-out recall the thresholds aim at")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--max-train-tokens", type=int, default=None, help="subsample the training tokens per layer")
    p.add_argument("--pin-ratio", type=float, default=0.5,
                   help="always predict neurons whose largest contribution reaches this x the layer's median token "
                        "contribution (massive-activation neurons); 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing PREDDIR")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval-predictors", help="recall / precision of predictors on held-out text")
    p.add_argument("model", metavar="DIR|MODEL")
    p.add_argument("--predictors", required=True, type=Path, metavar="PREDDIR")
    p.add_argument("--text-file", required=True)
    p.add_argument("--max-tokens", type=int, default=32_768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--window", type=int, default=4, help="sliding window (tokens) for the window figures and --ppl")
    p.add_argument("--sparsity", choices=("auto", "relu", "threshold"), default=None, help="default: the predictors' rule")
    p.add_argument("--ppl", action="store_true", help="also perplexity in predictor mode (window) vs oracle")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.set_defaults(func=run_eval)


def _spec_of(model) -> tuple[int, int, int]:
    from llmflash.arch import adapter_for

    spec = adapter_for(model.config).ffn_spec(model.config)
    return spec.n_layers, spec.d_model, spec.d_ffn


def run_collect(args: argparse.Namespace) -> int:
    from llmflash.errors import LLMFlashError
    from llmflash.models import load_any
    from llmflash.report import fmt_bytes
    from llmflash.sparsity import rule_for
    from llmflash.text import load_texts

    from .collect import CollectConfig, bytes_per_token, collect

    if args.max_tokens < 2 or args.seq_len < 2:
        raise LLMFlashError("--max-tokens and --seq-len must be at least 2")
    if args.out.exists() and not args.force:
        raise LLMFlashError(f"{args.out} already exists: choose another --out or pass --force to replace it")
    docs = load_texts(args.text_file)
    lm = load_any(args.model)
    rule = rule_for(lm.model, lm.tokenizer, args.sparsity, args.threshold_sparsity, thresholds=lm.thresholds, cache_key=lm.name)
    n_layers, d_model, d_ffn = _spec_of(lm.model)
    est = args.max_tokens * bytes_per_token(n_layers, d_model, d_ffn)
    print(f"collecting up to {args.max_tokens} tokens from {args.text_file} through {lm.name} ({args.sparsity} rule): "
          f"about {fmt_bytes(est)} in {args.out}", flush=True)
    man = collect(lm, docs, args.text_file, args.out, rule, CollectConfig(args.max_tokens, args.seq_len), overwrite=args.force)
    mean_active = sum(man["true_active_fraction"]) / len(man["true_active_fraction"])
    print(f"collected {man['tokens']} tokens x {man['n_layers']} layers in {args.out}: true active fraction "
          f"{mean_active:.3f} (mean over layers), data hash {man['data_hash'][:12]}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from llmflash.errors import LLMFlashError
    from llmflash.report import fmt_bytes, write_json

    from .collect import Activations
    from .train import TrainConfig, train_predictors

    if args.out.exists() and not args.force:
        raise LLMFlashError(f"{args.out} already exists: choose another --out or pass --force to replace it")
    if args.rank < 1 or (args.rank_last is not None and args.rank_last < 1) or args.epochs < 1:
        raise LLMFlashError("--rank, --rank-last and --epochs must be positive")
    act = Activations.open(args.actdir)
    if args.kind == "lowbit":
        return _run_lowbit(args, act)
    try:
        ranks = None if args.ranks is None else tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        raise LLMFlashError(f"--ranks {args.ranks!r} is not a comma-separated list of integers") from None
    if ranks is not None and min(ranks) < 1:
        raise LLMFlashError("--ranks must all be positive")
    cfg = TrainConfig(ranks=ranks,
        rank=args.rank, rank_last=args.rank_last or 2 * args.rank, last_layers=args.last_layers,
        recall_target=args.recall_target, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
        lr=args.lr, holdout_fraction=args.holdout_fraction, max_train_tokens=args.max_train_tokens, seed=args.seed,
        pin_ratio=args.pin_ratio if args.pin_ratio > 0 else None,
    )
    pset = train_predictors(act, cfg)
    pset.save(args.out, overwrite=args.force)
    layers = pset.meta["layers"]
    mean = lambda k: sum(s[k] for s in layers) / len(layers)  # noqa: E731
    pred, true = mean("predicted_active_fraction"), mean("true_active_fraction")
    n_pinned = sum(len(s["pinned"]) for s in layers)
    print(f"trained {pset.n_layers} predictors (ranks {min(pset.ranks)}-{max(pset.ranks)}, {fmt_bytes(2 * pset.n_params)} fp16, "
          f"{n_pinned} neurons pinned) "
          f"in {args.out}; held-out recall {mean('recall'):.3f}, precision {mean('precision'):.3f}, predicted/true active "
          f"{pred:.3f}/{true:.3f} = {pred / true:.2f}x")
    if args.json:
        write_json(args.json, {"predictors": str(args.out), **{k: v for k, v in pset.meta.items()}})
    return 0


def _run_lowbit(args: argparse.Namespace, act) -> int:
    from llmflash.errors import LLMFlashError
    from llmflash.models import load_any, resolve
    from llmflash.predictor import LOWBIT_GROUPS, PredictorSet
    from llmflash.report import fmt_bytes, write_json

    from .lowbit import LowBitConfig, build_lowbit

    if args.group_size not in LOWBIT_GROUPS:
        raise LLMFlashError(f"--group-size must be one of {', '.join(map(str, LOWBIT_GROUPS))}, not {args.group_size}")
    lm = load_any(args.model or act.model_name)
    cfg = LowBitConfig(group_size=args.group_size, recall_target=args.recall_target, holdout_fraction=args.holdout_fraction,
                       pin_ratio=args.pin_ratio if args.pin_ratio > 0 else None)
    if args.recipe and resolve(lm.name).kind != "alias":
        raise LLMFlashError(f"--recipe needs a model alias (its weights found by name at first use), not {lm.name}")
    pset = build_lowbit(act, lm, cfg)
    pset.save(args.out, overwrite=args.force)
    layers = pset.meta["layers"]
    mean = lambda k: sum(s[k] for s in layers) / len(layers)  # noqa: E731
    pred, true = mean("predicted_active_fraction"), mean("true_active_fraction")
    held = PredictorSet.load(args.out)  # the engine's form: what its DRAM holds
    if args.recipe:
        pset.save(args.out, overwrite=True, with_codes=False)
    print(f"built {pset.n_layers} low-bit predictors ({fmt_bytes(held.nbytes)} in the engine, groups of {args.group_size}) in {args.out}; "
          f"held-out recall {mean('recall'):.3f}, precision {mean('precision'):.3f}, predicted/true active "
          f"{pred:.3f}/{true:.3f} = {pred / true:.2f}x")
    if args.json:
        write_json(args.json, {"predictors": str(args.out), **{k: v for k, v in pset.meta.items()}})
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from llmflash.errors import LLMFlashError
    from llmflash.models import load_any, predictor_dir
    from llmflash.predictor import PredictorSet
    from llmflash.report import fmt_bytes, write_json
    from llmflash.text import load_texts

    from .evaluate import evaluate_set

    if args.window < 1:
        raise LLMFlashError("--window must be at least 1")
    pset = PredictorSet.load(predictor_dir(args.predictors))
    docs = load_texts(args.text_file)
    lm = load_any(args.model)
    pset.check_model(lm.model, lm.name, args.sparsity)
    res = evaluate_set(lm, docs, pset, max_tokens=args.max_tokens, seq_len=args.seq_len, window=args.window, ppl=args.ppl)
    res = {"predictors": str(args.predictors), **res}
    print(f"{lm.name} ({res['rule']} rule), {res['tokens']} tokens of {args.text_file}: recall {res['recall']:.3f} "
          f"(min layer {res['min_layer_recall']:.3f}), precision {res['precision']:.3f}, predicted/true active "
          f"{res['predicted_active_fraction']:.3f}/{res['true_active_fraction']:.3f} = {res['over_prediction']:.2f}x; "
          f"window {args.window}: holds {res['window_active_fraction']:.3f}, new per token {res['window_new_fraction']:.3f}; "
          f"predictors {fmt_bytes(pset.nbytes)}")
    if args.ppl:
        print(f"perplexity: oracle {res['ppl_oracle']:.3f}, predictor (window {args.window}) {res['ppl_predictor']:.3f} "
              f"({100 * (res['ppl_ratio'] - 1):+.2f}%)")
    if args.json:
        write_json(args.json, res)
    return 0

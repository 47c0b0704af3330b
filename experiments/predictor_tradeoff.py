"""The predictor trade-off: rank x recall target -> recall, precision, neurons marked, bytes per token, perplexity.

A predictor with higher recall keeps perplexity closer to oracle mode but marks (and loads) more neurons. For each
rank (the last ``--last-layers`` layers get twice the rank, as in the paper) predictors are trained once on wiki:train
activations; for each recall target the per-layer thresholds are re-calibrated on the held-out training tokens, then:

- recall / precision / predicted and true active fraction / over-prediction on held-out wiki:eval activations;
- bytes per token: predicted fraction x d_ffn x bundle bytes x layers (the predicted set alone), and the bytes that
  are new to the sliding window of ``--window`` tokens (what the engine really reads per token);
- perplexity on wiki:eval in predictor mode (window ``--window``; missed neurons really missing) vs oracle mode;
- predictor bytes (fp16 on disk, runtime dtype in DRAM) and predictor compute as a share of the dense per-token compute.

Writes ``results/predictors/{tradeoff.csv, tradeoff.png, config.json}``. Runs on CPU; trained predictor sets and
activations are cached, so a re-run with other targets is quick.

    python experiments/predictor_tradeoff.py --model smollm2-relu --sparsity relu
    python experiments/predictor_tradeoff.py --model smollm2 --sparsity threshold --tag smollm2-threshold0.8
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from llmflash.arch import adapter_for
from llmflash.evaluate import perplexity
from llmflash.models import load_any
from llmflash.paths import cache_dir, repo_root
from llmflash.predictor import PredictorSet
from llmflash.report import environment, write_json
from llmflash.sparsity import rule_for
from llmflash.text import load_texts
from predictors.collect import Activations, CollectConfig, collect
from predictors.evaluate import eval_on_activations, window_mask_fn
from predictors.train import TrainConfig, calibrate, pinned_neurons, train_predictors

log = logging.getLogger("predictor_tradeoff")

ALIGN_BYTES = 4096


def bundle_bytes(d_model: int, gated: bool, dtype_bytes: int) -> int:
    """One neuron's flash bundle (gate + up + down, or up + down), padded to 4 KiB reads."""
    raw = (3 if gated else 2) * d_model * dtype_bytes
    return -(-raw // ALIGN_BYTES) * ALIGN_BYTES


def dense_macs_per_token(model) -> int:
    """Multiply-adds of one token through the dense model (attention projections, FFN, LM head; no embeddings)."""
    cfg = model.config
    spec = adapter_for(cfg).ffn_spec(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim
    attn = cfg.hidden_size * (2 * cfg.hidden_size + 2 * kv)
    ffn = (3 if spec.gated else 2) * spec.d_model * spec.d_ffn
    return spec.n_layers * (attn + ffn) + cfg.vocab_size * cfg.hidden_size


def activations(lm, rule, source: str, tokens: int, tag: str, split: str) -> Activations:
    from llmflash.predictor import ffn_fingerprint, fingerprints_match

    path = cache_dir() / "activations" / f"{tag}-{split}-{tokens}"
    stale = False
    if (path / "manifest.json").is_file():  # a re-trained model of the same name: collect again
        cached = json.loads((path / "manifest.json").read_text()).get("model_fingerprint")
        stale = cached is not None and not fingerprints_match(cached, ffn_fingerprint(lm.model))
    if stale or not (path / "manifest.json").is_file():
        log.info("collecting %d tokens of %s into %s", tokens, source, path)
        collect(lm, load_texts(source), source, path, rule, CollectConfig(max_tokens=tokens), overwrite=True)
    act = Activations.open(path)
    if act.rule != _rule_dict(rule):
        raise SystemExit(f"{path} was collected with another rule: delete it")
    return act


def _rule_dict(rule) -> dict:
    from predictors.collect import rule_to_dict

    return json.loads(json.dumps(rule_to_dict(rule)))


def trained_set(act: Activations, cfg: TrainConfig, tag: str) -> PredictorSet:
    path = cache_dir() / "predictors" / f"{tag}-{act.data_hash[:12]}-r{cfg.rank}-{cfg.rank_last}-e{cfg.epochs}"
    if not (path / "predictors.json").is_file():
        log.info("training rank %d/%d predictors into %s", cfg.rank, cfg.rank_last, path)
        train_predictors(act, cfg).save(path)
    return PredictorSet.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/predictor_tradeoff.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-relu")
    ap.add_argument("--sparsity", choices=("relu", "threshold"), default="relu")
    ap.add_argument("--threshold-sparsity", type=float, default=0.8)
    ap.add_argument("--tag", default=None, help="name of this run's rows and cache entries (default: model-sparsity)")
    ap.add_argument("--ranks", default="24,48,96")
    ap.add_argument("--last-layers", type=int, default=4)
    ap.add_argument("--recall-targets", default="0.9,0.95,0.98,0.99")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=65_536)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--ppl-tokens", type=int, default=8_192)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--pin-ratio", type=float, default=0.5, help="pin massive-activation neurons (0: none)")
    ap.add_argument("--dtype-bytes", type=int, default=4, help="bytes per weight on flash (fp32 SmolLM2: 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is best on a busy machine)")
    ap.add_argument("--out", type=Path, default=repo_root() / "results" / "predictors")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tag = args.tag or f"{Path(args.model).name}-{args.sparsity}"  # an alias, or a directory's name
    t_start = time.time()

    lm = load_any(args.model)
    rule = rule_for(lm.model, lm.tokenizer, args.sparsity, args.threshold_sparsity, thresholds=lm.thresholds, cache_key=lm.name)
    spec = adapter_for(lm.model.config).ffn_spec(lm.model.config)
    bundle = bundle_bytes(spec.d_model, spec.gated, args.dtype_bytes)
    ffn_bytes_per_token = spec.n_layers * spec.d_ffn * bundle  # every neuron's bundle, all layers
    dense_macs = dense_macs_per_token(lm.model)
    train_act = activations(lm, rule, "wiki:train", args.train_tokens, tag, "train")
    eval_act = activations(lm, rule, "wiki:eval", args.eval_tokens, tag, "eval")
    eval_docs = load_texts("wiki:eval")
    oracle = perplexity(lm.model, lm.tokenizer, eval_docs, max_tokens=args.ppl_tokens, rule=rule)
    log.info("oracle perplexity %.3f (active fraction %.3f)", oracle["ppl"], oracle["ffn_active_fraction"])

    rows = []
    base = TrainConfig(epochs=args.epochs, last_layers=args.last_layers, pin_ratio=args.pin_ratio or None)
    pins = pinned_neurons(train_act, base.pin_ratio)
    for rank in [int(r) for r in args.ranks.split(",")]:
        cfg = replace(base, rank=rank, rank_last=2 * rank)
        pset = trained_set(train_act, cfg, tag)
        for layer, ids in enumerate(pins):  # pinning does not change training: applied to the cached sets
            pset.pin(layer, ids)
        for target in [float(t) for t in args.recall_targets.split(",")]:
            calibrate(pset, train_act, target, cfg.holdout_fraction)
            ev = eval_on_activations(pset, eval_act, args.window)
            ppl = perplexity(lm.model, lm.tokenizer, eval_docs, max_tokens=args.ppl_tokens, rule=rule,
                             mask_fn=window_mask_fn(pset, args.window))
            row = {
                "tag": tag, "model": lm.name, "rule": args.sparsity, "rank": rank, "rank_last": cfg.rank_last,
                "recall_target": target, "recall": ev["recall"], "min_layer_recall": ev["min_layer_recall"],
                "precision": ev["precision"], "predicted_active_fraction": ev["predicted_active_fraction"],
                "true_active_fraction": ev["true_active_fraction"], "over_prediction": ev["over_prediction"],
                "window": args.window, "window_active_fraction": ev["window_active_fraction"],
                "window_new_fraction": ev["window_new_fraction"],
                "predicted_bytes_per_token": ev["predicted_active_fraction"] * ffn_bytes_per_token,
                "true_bytes_per_token": ev["true_active_fraction"] * ffn_bytes_per_token,
                "window_new_bytes_per_token": ev["window_new_fraction"] * ffn_bytes_per_token,
                "ppl_oracle": oracle["ppl"], "ppl_predictor": ppl["ppl"], "ppl_ratio": ppl["ppl"] / oracle["ppl"],
                "pinned_neurons": sum(len(p) for p in pins),
                "predictor_bytes_fp16": 2 * pset.n_params, "predictor_macs_per_token": pset.macs_per_token,
                "predictor_compute_share": pset.macs_per_token / dense_macs,
            }
            rows.append(row)
            log.info("rank %d target %.2f: recall %.3f precision %.3f over %.2fx, ppl %.3f vs %.3f (%+.2f%%)", rank, target,
                     row["recall"], row["precision"], row["over_prediction"], row["ppl_predictor"], row["ppl_oracle"],
                     100 * (row["ppl_ratio"] - 1))

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "tradeoff.csv"
    old = []
    if csv_path.is_file():  # keep the other tags' rows (one file for every model / rule)
        with open(csv_path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r["tag"] != tag]
    fields = list(rows[0])
    from llmflash.paths import atomic_file

    with atomic_file(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for r in old + rows:
                w.writerow(r)
    plot(csv_path, args.out / "tradeoff.png")
    config_path = args.out / "config.json"
    configs = json.loads(config_path.read_text()) if config_path.is_file() else {}
    configs[tag] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_data_hash": train_act.data_hash, "eval_data_hash": eval_act.data_hash, "bundle_bytes": bundle,
        "ffn_bytes_per_token_dense": ffn_bytes_per_token, "dense_macs_per_token": dense_macs,
        "rule": _rule_dict(rule), "training": asdict(base),
        "oracle": {k: oracle[k] for k in ("ppl", "tokens", "ffn_active_fraction")},
        "seconds": time.time() - t_start, "environment": environment(),
    }
    write_json(config_path, configs)
    log.info("wrote %s, %s, %s", csv_path, args.out / "tradeoff.png", config_path)


def plot(csv_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    tags = sorted({r["tag"] for r in rows})
    fig, axes = plt.subplots(len(tags), 2, figsize=(11, 4 * len(tags)), squeeze=False)
    for (ax1, ax2), tag in zip(axes, tags):
        mine = [r for r in rows if r["tag"] == tag]
        for rank in sorted({int(r["rank"]) for r in mine}):
            rr = sorted((r for r in mine if int(r["rank"]) == rank), key=lambda r: float(r["recall"]))
            label = f"rank {rank}/{rr[0]['rank_last']}"
            ax1.plot([float(r["recall"]) for r in rr], [float(r["over_prediction"]) for r in rr], "o-", label=label)
            ax2.plot([float(r["predicted_bytes_per_token"]) / 2**20 for r in rr],
                     [100 * (float(r["ppl_ratio"]) - 1) for r in rr], "o-", label=label)
        ax1.axhline(2.0, color="gray", ls=":", lw=1)
        ax1.axvline(0.95, color="gray", ls=":", lw=1)
        ax1.set(xlabel="recall (held-out, mean over layers)", ylabel="over-prediction (predicted / true active)",
                title=f"{tag}: neurons marked vs recall")
        ax2.axhline(3.0, color="gray", ls=":", lw=1)
        ax2.set(xlabel="predicted-set bytes per token (MiB)", ylabel=f"perplexity vs oracle (%), window {mine[0]['window']}",
                title=f"{tag}: quality vs bytes")
        ax1.legend()
        ax2.legend()
    fig.tight_layout()
    from llmflash.paths import atomic_file

    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The shipped sparse model's default predictors, trained on the device from a million tokens (the CPU run had 16k).

A low-rank predictor of 200-400k parameters per layer is data-bound on the 16,384 tokens a CPU collection affords;
on the device the activations of a million training-mix tokens (wiki:train and BIG-bench task texts, the same
sources as the model's training, never the held-out corpora) fit in GPU memory at once. Per layer, the FFN input x
(after the post-attention norm) and the threshold rule's active set (|h| > t_l, fp32) are collected, the predictor is
trained with ``predictors.train.train_layer`` (class-balanced BCE, early stopping on recall-at-target), and its
threshold is calibrated to recall 0.95 on held-out *training-mix* windows. Then recall and the predicted fraction are
measured at that threshold on each held-out corpus (kjv, shakespeare, pydoc, wiki:eval).

Device calls (after ``python3 -m sparsetrain.job prepare``; see ``gated``): ``stage-a``, ``stage-b`` (the artifact),
then ``python3 -m sparsetrain.predictors_job --deadline-s 500`` with .device-stage/sparsify-2 carried. Writes
$OUT/predictors.{json,safetensors} and $OUT/predictors_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llmflash.predictor import PIN_LOGIT, PredictorSet
from predictors.train import TrainConfig, confusion, rates, threshold_for_recall, train_layer

from .data import WindowSampler, eval_windows
from .gated import start_student
from .job import MIX, base_files, load_streams, say, tmp_root
from .model import CompactLlama


@torch.no_grad()
def collect(model: CompactLlama, ids: torch.Tensor, batch: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: x bf16 [T, d], active bool [T, n] (the model's threshold rule), and per neuron the largest
    contribution |h_i| * ||down_i|| over the tokens divided by the median token's total contribution (for pins)."""
    L = len(model.layers)
    xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
    ys: list[list[torch.Tensor]] = [[] for _ in range(L)]
    peak = [torch.zeros(model.shape.d_ffn, device=ids.device) for _ in range(L)]
    masses: list[list[torch.Tensor]] = [[] for _ in range(L)]
    norms = [f.down_proj.weight.float().norm(dim=0) for f in model.ffns()]  # [n]: ||down column i||
    for b in range(0, ids.shape[0], batch):
        _, _, hs, ins = model(ids[b : b + batch])
        for i, (f, h, x) in enumerate(zip(model.ffns(), hs, ins)):
            h = h.float().reshape(-1, h.shape[-1])
            xs[i].append(x.reshape(-1, x.shape[-1]).to(torch.bfloat16))
            ys[i].append(h.abs() > f.threshold)
            contrib = h.abs() * norms[i]  # [T, n]
            peak[i] = torch.maximum(peak[i], contrib.amax(0))
            masses[i].append((contrib * (h.abs() > f.threshold)).sum(1))
    ratio = [p / torch.cat(m).median().clamp_min(1e-12) for p, m in zip(peak, masses)]
    return _cat_each(xs), _cat_each(ys), ratio


def _cat_each(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """One tensor per layer, freeing each layer's pieces as it goes (the peak is one layer, not a second copy)."""
    out = []
    for v in parts:
        out.append(torch.cat(v))
        v.clear()
    return out


def _scores(m: torch.nn.Module, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """A predictor's logits over bf16 inputs [T, d], in fp32 chunks."""
    return torch.cat([m(x[k : k + chunk].float()) for k in range(0, x.shape[0], chunk)])


def fingerprint(model: CompactLlama) -> list[float]:
    """``llmflash.predictor.ffn_fingerprint`` of the same weights (gate, up, down, act_bias norms per layer)."""
    out = []
    for f in model.ffns():
        for t in (f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight, f.act_bias):
            out.append(float(t.detach().float().norm()))
    return out


def run(args) -> None:
    t_call = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = args.device
    shape, state = base_files(work, args.base)
    artifact = None if args.artifact == "none" else Path(args.artifact)
    model, start = start_student(shape, state, artifact, 0)
    model = model.to(dev).eval()
    train, held, desc = load_streams(work)
    train = {k: v for k, v in train.items() if k in MIX}
    if artifact is None:  # a test without an artifact: thresholds for 80% zeros from one batch
        ids0 = WindowSampler(train, {k: MIX[k] for k in train}, args.seq_len, seed=1).batch(4).to(dev)
        with torch.no_grad():
            hs = model(ids0)[2]
            model.set_thresholds([float(h.abs().float().flatten().quantile(0.8)) for h in hs])
    sampler = WindowSampler(train, {k: MIX[k] for k in train}, args.seq_len, seed=2024)
    n_tr, n_cal = args.tokens // args.seq_len, args.calib_tokens // args.seq_len
    ids = sampler.batch(n_tr + n_cal).to(dev)
    t0 = time.perf_counter()
    x, y, peak = collect(model, ids)
    say(f"collected {ids.numel()} tokens x {len(x)} layers in {time.perf_counter() - t0:.0f} s")
    held_xy = {}
    for name, stream in held.items():
        w = eval_windows(stream, args.seq_len, args.eval_tokens).to(dev)
        hx, hy, _ = collect(model, w)
        held_xy[name] = (hx, hy)
    cut = n_tr * args.seq_len
    cfg = TrainConfig(rank=args.rank, rank_last=args.rank_last, last_layers=4, epochs=args.epochs, batch_size=args.batch,
                      lr=args.lr, recall_target=args.recall, pin_ratio=args.pin_ratio, hidden=args.hidden)
    modules, thresholds, layers = [], [], []
    for i in range(len(x)):
        t_l = time.perf_counter()
        pins = (peak[i] >= args.pin_ratio).nonzero().flatten().tolist() if args.pin_ratio else []
        rank = cfg.rank_for(i, len(x))
        m, _, epochs = train_layer(x[i][:cut].float(), y[i][:cut], x[i][cut:].float(), y[i][cut:], rank, cfg, i, pins,
                                   device=dev)
        with torch.no_grad():  # the weights as stored (fp16), the pins, then the threshold on what is loaded
            for p in m.parameters():
                p.copy_(p.to(torch.float16).float())
            m.up.bias[pins] = PIN_LOGIT
            scores = _scores(m, x[i][cut:])
            thr = threshold_for_recall(scores, y[i][cut:], args.recall, pins)
            r = rates(*confusion(scores >= thr, y[i][cut:]))
            per_corpus = {}
            for name, (hx, hy) in held_xy.items():
                s = _scores(m, hx[i])
                per_corpus[name] = rates(*confusion(s >= thr, hy[i]))
        modules.append(m.cpu())
        thresholds.append(thr)
        layers.append({"layer": i, "rank": rank, "threshold": float(torch.sigmoid(torch.tensor(thr))), "threshold_logit": thr,
                       **r, "samples": cut, "pinned": pins, "epochs": epochs, "seconds": round(time.perf_counter() - t_l, 2),
                       "held_out": per_corpus})
        say(f"layer {i}: rank {rank}, calibration {r['predicted_active_fraction']:.3f} read for {r['true_active_fraction']:.3f} "
            f"active; held-out " + ", ".join(f"{k} {v['recall']:.3f}/{v['predicted_active_fraction']:.3f}" for k, v in per_corpus.items()))
    cfg_art = start["config"]
    meta = {"model": "smollm2-relu", "model_fingerprint": fingerprint(model), "d_model": shape.d_model, "d_ffn": shape.d_ffn,
            "rule": {"kind": "threshold", "thresholds": model.thresholds(), "target_sparsity": cfg_art.get("target_sparsity")},
            "data_tokens": int(ids.numel()), "text_source": "training mix: " + ", ".join(sorted(train)),
            "training": {**asdict(cfg), "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
                         "train_tokens": cut, "calibration_tokens": int(ids.numel()) - cut, "seq_len": args.seq_len},
            "layers": layers}
    out = Path(args.out)
    pset = PredictorSet.from_modules(modules, thresholds, meta)
    pset.save(out)
    summary = {}
    for name in held_xy:
        tp = sum(L["held_out"][name]["recall"] * L["held_out"][name]["true_active_fraction"] for L in layers)
        ap = sum(L["held_out"][name]["true_active_fraction"] for L in layers)
        pp = sum(L["held_out"][name]["predicted_active_fraction"] for L in layers)
        summary[name] = {"recall": tp / ap, "predicted_active_fraction": pp / len(layers), "true_active_fraction": ap / len(layers),
                         "over_prediction": pp / ap}
    record = {"summary": summary, "layers": layers, "wall_seconds": round(time.perf_counter() - t_call, 1),
              "data": {k: v for k, v in desc.items() if k in train or k in held}, "config": vars(args)}
    (out / "predictors_train.json").write_text(json.dumps(record, indent=1, default=str))
    say(f"done in {record['wall_seconds']} s: " + json.dumps({k: {a: round(b, 4) for a, b in v.items()} for k, v in summary.items()}))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.predictors_job")
    ap.add_argument("--work", default=str(tmp_root()))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/predictors-out"))
    ap.add_argument("--base", default=None)
    ap.add_argument("--artifact", default=str(tmp_root() / "start" / "artifact"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--calib-tokens", type=int, default=65_536)
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--rank-last", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--pin-ratio", type=float, default=0.5)
    ap.add_argument("--hidden", action="store_true", help="a ReLU between the predictor's two layers (an MLP)")
    args = ap.parse_args(argv)
    np.random.seed(0)
    run(args)


if __name__ == "__main__":
    main()

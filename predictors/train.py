"""Training the per-layer low-rank predictors from an activation directory (see ``collect``).

Per layer: ``LowRankPredictor`` (Linear(d_model -> r, no bias) -> Linear(r -> d_ffn) + sigmoid), class-balanced BCE
(one ``pos_weight`` = inactive / active for the layer: a single weight keeps the ranking of (token, neuron) pairs by
probability intact, which is what one per-layer threshold needs), Adam with a cosine schedule, inputs standardized
per feature (folded into the weights at the end). After every epoch the layer's decision threshold is calibrated on
the held-out tokens to the recall target, and training stops when the fraction of neurons it must mark at that recall
no longer improves (early stopping on held-out recall-at-target); the best epoch is kept.

Pinned neurons: a few neurons per model fire rarely but enormously ("massive activations": the attention sink of the
first token, some delimiter tokens). Their count-based recall is irrelevant, their cost of being missed is not: one
miss can wreck the rest of the sequence. A neuron whose largest contribution |h_i| * ||down_i|| (from the collected
``neuron_stats``) reaches ``pin_ratio`` x the layer's median per-token contribution mass is pinned: always predicted
(its bias is set to ``PIN_LOGIT``). That costs a handful of always-resident neurons.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from llmflash.errors import LLMFlashError
from llmflash.predictor import PIN_LOGIT, LowRankPredictor, PredictorSet

from .collect import Activations, unpack_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 48  # layers 0 .. n_layers - last_layers - 1
    rank_last: int = 96  # the last ``last_layers`` layers (the paper gives the last layers more)
    last_layers: int = 4
    ranks: Optional[tuple[int, ...]] = None  # explicit per-layer ranks (override rank / rank_last)
    recall_target: float = 0.95  # per-layer threshold calibrated on held-out tokens to this recall
    epochs: int = 4
    patience: int = 1  # epochs without improvement before stopping
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    holdout_fraction: float = 0.1  # the last windows of the collected tokens
    max_train_tokens: Optional[int] = None  # subsample the training tokens (time); None: all
    pin_ratio: Optional[float] = 0.5  # pin neurons whose max contribution >= this x median token mass; None: never
    hidden: bool = False  # a ReLU between the two layers (Deja Vu's MLP predictor) instead of a linear low-rank map
    seed: int = 0

    def rank_for(self, layer: int, n_layers: int) -> int:
        if self.ranks is not None:
            return self.ranks[layer]
        return self.rank_last if layer >= n_layers - self.last_layers else self.rank


@dataclass(frozen=True)
class LayerStats:
    layer: int
    rank: int
    threshold: float  # probability
    threshold_logit: float
    recall: float  # held-out
    precision: float
    predicted_active_fraction: float
    true_active_fraction: float
    samples: int  # training tokens
    pinned: list  # neuron ids always predicted
    epochs: int
    seconds: float


def threshold_for_recall(scores: Tensor, labels: Tensor, recall_target: float, pinned: Optional[list[int]] = None) -> float:
    """The largest logit threshold t such that predicting ``scores >= t`` keeps recall >= target.

    scores, labels: [T, n]. ``pinned`` neurons are always predicted: they are left out, and the threshold gives the
    other neurons' positives the recall target on their own (so the overall recall is at least the target).
    """
    if pinned:
        free = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
        free[torch.as_tensor(pinned, dtype=torch.long, device=scores.device)] = False
        scores, labels = scores[:, free], labels[:, free]
    pos = scores[labels]  # [P]
    if pos.numel() == 0:
        return float("inf")
    k = int(np.floor((1.0 - recall_target) * pos.numel()))  # positives we may miss
    if k <= 0:
        return float(pos.min())
    return float(torch.kthvalue(pos, k + 1).values)  # the (k+1)-th smallest positive score stays above


def confusion(pred: Tensor, labels: Tensor) -> tuple[int, int, int, int]:
    """(true positives, predicted positives, actual positives, total) of bool tensors."""
    return int((pred & labels).sum()), int(pred.sum()), int(labels.sum()), labels.numel()


def rates(tp: int, pp: int, ap: int, total: int) -> dict:
    return {
        "recall": tp / ap if ap else 1.0,
        "precision": tp / pp if pp else 1.0,
        "predicted_active_fraction": pp / total if total else 0.0,
        "true_active_fraction": ap / total if total else 0.0,
    }


@torch.no_grad()
def _scores(model: LowRankPredictor, x: Tensor, chunk: int = 4096) -> Tensor:
    return torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def _layer_data(act: Activations, layer: int, rows: slice, max_tokens: Optional[int], seed: int) -> tuple[Tensor, Tensor]:
    x = np.asarray(act.x(layer)[rows], dtype=np.float32)  # [T, d]
    y = unpack_labels(np.asarray(act.labels(layer)[rows]), act.d_ffn)  # [T, n] bool
    if max_tokens is not None and x.shape[0] > max_tokens:
        keep = np.sort(np.random.default_rng(seed + layer).choice(x.shape[0], max_tokens, replace=False))
        x, y = x[keep], y[keep]
    return torch.from_numpy(x), torch.from_numpy(y)


def train_layer(
    x_train: Tensor, y_train: Tensor, x_hold: Tensor, y_hold: Tensor, rank: int, cfg: TrainConfig, layer: int = 0,
    pinned: Optional[list[int]] = None, device: str | torch.device = "cpu",
) -> tuple[LowRankPredictor, float, int]:
    """Fit one layer's predictor. x: float32 [T, d]; y: bool [T, n]. Returns (predictor on ``device``, threshold
    logit, epochs)."""
    gen = torch.Generator().manual_seed(cfg.seed + layer)
    torch.manual_seed(cfg.seed + layer)
    x_train, y_train, x_hold, y_hold = (t.to(device) for t in (x_train, y_train, x_hold, y_hold))
    d, n = x_train.shape[1], y_train.shape[1]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # [d]
    xs_train, xs_hold = (x_train - mean) / std, (x_hold - mean) / std
    model = LowRankPredictor(d, n, rank, hidden=cfg.hidden).to(device)
    pos = float(y_train.float().mean())
    pos = min(max(pos, 1e-6), 1 - 1e-6)
    with torch.no_grad():
        model.up.bias.copy_(torch.logit(y_train.float().mean(0).clamp(1e-4, 1 - 1e-4)))  # per-neuron base rate
    pos_weight = torch.tensor((1 - pos) / pos, device=device)
    steps_per_epoch = max(1, x_train.shape[0] // cfg.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)

    best = (float("inf"), None, 0.0, 0)  # (predicted fraction at target recall, state, threshold, epoch)
    stale = 0
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            logits = model(xs_train[idx])  # [B, n]
            loss = F.binary_cross_entropy_with_logits(logits, y_train[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        scores = _scores(model, xs_hold)
        thr = threshold_for_recall(scores, y_hold, cfg.recall_target, pinned)
        frac = float((scores >= thr).float().mean())
        log.info("layer %d epoch %d: loss %.4f, held-out predicted fraction %.4f at recall %.3f", layer, epoch,
                 float(loss.detach()), frac, cfg.recall_target)
        if frac < best[0] - 1e-4:
            best = (frac, {k: v.clone() for k, v in model.state_dict().items()}, thr, epoch)
            stale = 0
        else:
            stale += 1
            if stale > cfg.patience:
                break
    model.load_state_dict(best[1])
    # fold the standardization into the weights: z = B A ((x - mean) / std) + b
    with torch.no_grad():
        a = model.down.weight / std  # [r, d]
        if model.down.bias is not None:  # a hidden layer: the shift stays before the ReLU
            model.down.bias -= a @ mean
        else:
            model.up.bias -= model.up.weight @ (a @ mean)
        model.down.weight.copy_(a)
    return model, best[2], epoch


def pinned_neurons(act: Activations, pin_ratio: Optional[float]) -> list[list[int]]:
    """Per layer, the neurons to pin (see the module docstring); empty lists without statistics."""
    stats = act.neuron_stats()
    if pin_ratio is None or stats is None:
        if pin_ratio is not None:
            log.warning("%s has no neuron statistics (collected by an older version): no neurons pinned", act.path)
        return [[] for _ in range(act.n_layers)]
    out = []
    for layer in range(act.n_layers):
        median_mass = float(np.median(stats["token_mass"][layer]))
        out.append(np.flatnonzero(stats["max_contribution"][layer] >= pin_ratio * median_mass).tolist())
    return out


def set_meta(act: Activations, training: dict) -> dict:
    """A predictor set's metadata from the activations it was fitted on (``training``: how)."""
    return {
        "model": act.model_name,
        "model_fingerprint": act.manifest.get("model_fingerprint"),
        "d_model": act.d_model,
        "d_ffn": act.d_ffn,
        "rule": act.rule,
        "data_hash": act.data_hash,
        "data_tokens": act.n_tokens,
        "text_source": act.manifest.get("text_source"),
        "training": training,
    }


def train_predictors(act: Activations, cfg: TrainConfig = TrainConfig(), progress: bool = True) -> PredictorSet:
    """Train every layer's predictor from ``act``; thresholds calibrated on the held-out tokens."""
    if not 0.5 <= cfg.recall_target < 1.0:
        raise LLMFlashError(f"--recall-target {cfg.recall_target} is out of range: use a value in [0.5, 1)")
    if cfg.ranks is not None and len(cfg.ranks) != act.n_layers:
        raise LLMFlashError(f"--ranks gives {len(cfg.ranks)} ranks for a model of {act.n_layers} layers: give one per layer")
    train_rows, hold_rows = act.split(cfg.holdout_fraction)
    pins = pinned_neurons(act, cfg.pin_ratio)
    modules, thresholds, stats = [], [], []
    bar = tqdm(range(act.n_layers), desc="train predictors", unit="layer", disable=not progress)
    for layer in bar:
        t0 = time.perf_counter()
        x_tr, y_tr = _layer_data(act, layer, train_rows, cfg.max_train_tokens, cfg.seed)
        x_ho, y_ho = _layer_data(act, layer, hold_rows, None, cfg.seed)
        rank = cfg.rank_for(layer, act.n_layers)
        model, _, epochs = train_layer(x_tr, y_tr, x_ho, y_ho, rank, cfg, layer, pins[layer])
        with torch.no_grad():  # the weights as stored (fp16), so the threshold fits what is loaded
            for param in model.parameters():
                param.copy_(param.to(torch.float16).float())
            model.up.bias[pins[layer]] = PIN_LOGIT
        scores = _scores(model, x_ho)  # the runtime computation (float32)
        thr = threshold_for_recall(scores, y_ho, cfg.recall_target, pins[layer])
        r = rates(*confusion(scores >= thr, y_ho))
        modules.append(model)
        thresholds.append(thr)
        stats.append(LayerStats(
            layer, rank, float(torch.sigmoid(torch.tensor(thr))), thr, r["recall"], r["precision"],
            r["predicted_active_fraction"], r["true_active_fraction"], int(x_tr.shape[0]), pins[layer], epochs,
            time.perf_counter() - t0,
        ))
        bar.set_postfix(recall=f"{r['recall']:.3f}", over=f"{r['predicted_active_fraction'] / max(r['true_active_fraction'], 1e-9):.2f}")
    meta = {**set_meta(act, asdict(cfg)), "layers": [asdict(s) for s in stats]}
    return PredictorSet.from_modules(modules, thresholds, meta)


@torch.no_grad()
def calibrate(pset: PredictorSet, act: Activations, recall_target: float, holdout_fraction: float = 0.1) -> list[dict]:
    """Re-calibrate every layer's threshold of ``pset`` to ``recall_target`` on the held-out tokens of ``act``."""
    _, hold_rows = act.split(holdout_fraction)
    out = []
    for layer in range(act.n_layers):
        x_ho, y_ho = _layer_data(act, layer, hold_rows, None, 0)
        scores = pset.scores(layer, x_ho)
        thr = threshold_for_recall(scores, y_ho, recall_target, pset.pinned(layer))
        pset.set_threshold_logit(layer, thr)
        out.append({"layer": layer, **rates(*confusion(scores >= thr, y_ho))})
    return out

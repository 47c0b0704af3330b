"""A quick predictor probe: how predictable is a sparse model's active set? (decides between training arms)

Per layer, a low-rank predictor (d -> rank -> n, as in ``predictors/``) is fitted on the FFN inputs and active labels of
training tokens, then the cut is set on held-out tokens so that recall is ``recall_target``; the predicted fraction
at that recall is what the flash path would read (bytes at equal recall). Runs on any device in seconds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llmflash.predictor import LowRankPredictor
from predictors.train import confusion, rates, threshold_for_recall


def probe_layer(x_tr: Tensor, y_tr: Tensor, x_ho: Tensor, y_ho: Tensor, rank: int = 128, steps: int = 300,
                batch: int = 4096, lr: float = 3e-3, recall_target: float = 0.95, seed: int = 0) -> dict:
    """x: float [T, d], y: bool [T, n] (train and held-out). Returns recall/precision/predicted fraction at the cut."""
    torch.manual_seed(seed)
    dev = x_tr.device
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    xt, xh = (x_tr - mean) / std, (x_ho - mean) / std
    model = LowRankPredictor(x_tr.shape[1], y_tr.shape[1], rank).to(dev)
    pos = float(y_tr.float().mean().clamp(1e-6, 1 - 1e-6))
    with torch.no_grad():
        model.up.bias.copy_(torch.logit(y_tr.float().mean(0).clamp(1e-4, 1 - 1e-4)))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pw = torch.tensor((1 - pos) / pos, device=dev).clamp(max=50.0)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, xt.shape[0], (min(batch, xt.shape[0]),), device=dev, generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(xt[idx]), y_tr[idx].float(), pos_weight=pw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = model(xh)
        cut = threshold_for_recall(scores, y_ho, recall_target)
        out = rates(*confusion(scores >= cut, y_ho))
    out["over_prediction"] = (out["predicted_active_fraction"] / out["true_active_fraction"]
                              if out["true_active_fraction"] else float("nan"))
    return out


def summarize(per_layer: list[dict]) -> dict:
    keys = ("recall", "precision", "predicted_active_fraction", "true_active_fraction", "over_prediction")
    out = {k: float(np.mean([p[k] for p in per_layer])) for k in keys}
    out["min_recall"] = float(min(p["recall"] for p in per_layer))
    out["max_over_prediction"] = float(max(p["over_prediction"] for p in per_layer))
    return out

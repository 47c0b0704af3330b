"""A quick predictor probe: how predictable is a sparse model's active set? (decides between training arms)

Per layer, a low-rank predictor (d -> rank -> n, as in ``predictors/``) is fitted on the FFN inputs and active labels of
training tokens, then the cut is set on held-out tokens so that recall is ``recall_target``; the predicted fraction
at that recall is what the flash path would read (bytes at equal recall). Runs on any device in seconds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Pred(nn.Module):
    def __init__(self, d: int, n: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, n)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def probe_layer(x_tr: Tensor, y_tr: Tensor, x_ho: Tensor, y_ho: Tensor, rank: int = 128, steps: int = 300,
                batch: int = 4096, lr: float = 3e-3, recall_target: float = 0.95, seed: int = 0) -> dict:
    """x: float [T, d], y: bool [T, n] (train and held-out). Returns recall/precision/predicted fraction at the cut."""
    torch.manual_seed(seed)
    dev = x_tr.device
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    xt, xh = (x_tr - mean) / std, (x_ho - mean) / std
    model = _Pred(x_tr.shape[1], y_tr.shape[1], rank).to(dev)
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
        s = model(xh)
        pos_scores = s[y_ho]
        if pos_scores.numel() == 0:
            cut = float("inf")
        else:
            k = int(np.floor((1 - recall_target) * pos_scores.numel()))
            cut = float(pos_scores.min()) if k <= 0 else float(torch.kthvalue(pos_scores.float(), k + 1).values)
        pred = s >= cut
        tp, pp, ap = int((pred & y_ho).sum()), int(pred.sum()), int(y_ho.sum())
    total = y_ho.numel()
    return {"recall": tp / ap if ap else 1.0, "precision": tp / pp if pp else 1.0,
            "predicted_active_fraction": pp / total, "true_active_fraction": ap / total,
            "over_prediction": (pp / ap) if ap else float("nan")}


def summarize(per_layer: list[dict]) -> dict:
    keys = ("recall", "precision", "predicted_active_fraction", "true_active_fraction", "over_prediction")
    out = {k: float(np.mean([p[k] for p in per_layer])) for k in keys}
    out["min_recall"] = float(min(p["recall"] for p in per_layer))
    out["max_over_prediction"] = float(max(p["over_prediction"] for p in per_layer))
    return out

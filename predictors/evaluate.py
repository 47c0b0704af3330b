"""Measuring predictors: recall / precision against the true active sets, and predictor-mode masks for perplexity.

``eval_predictors`` runs held-out text through the model with the true FFN (the oracle trajectory) and compares, per
layer and token, the predicted set with the active set (h != 0 after the rule).

``window_mask_fn(predictors, k)`` is a ``DenseFFN`` mask: token t computes only the neurons in the union of the
predicted sets of tokens t-k+1 .. t of its sequence (the sliding window the engine keeps in DRAM); every other neuron
is really missing from the computation. With ``llmflash.evaluate.perplexity(..., mask_fn=...)`` this gives
predictor-mode perplexity. ``predicted_mask_fn`` is the window of one token (the predicted set only).
"""

from __future__ import annotations

import logging
from typing import Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmflash.arch import adapter_for, install_dense_ffns
from llmflash.ffn import SparsityRule
from llmflash.text import token_stream, windows

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What the masks and the evaluation need of a predictor set (``PredictorSet`` or a test double)."""

    n_layers: int

    def predict(self, layer: int, x: Tensor) -> Tensor: ...


def window_union(pred: Tensor, window: int, history: Optional[Tensor] = None) -> Tensor:
    """pred bool [..., T, n] -> bool [..., T, n]: OR over the last ``window`` tokens (dim -2), current one included.

    ``history`` bool [..., H, n] holds the predicted sets of the tokens just before (H <= window - 1), oldest first.
    """
    if history is not None and history.shape[-2] > 0:
        full = torch.cat([history, pred], dim=-2)  # [..., H + T, n]
        return window_union(full, window)[..., history.shape[-2] :, :]
    out = pred.clone()
    t = pred.shape[-2]
    for j in range(1, min(window, t)):
        out[..., j:, :] |= pred[..., : t - j, :]
    return out


class WindowMask:
    """A ``DenseFFN`` ``mask_fn``: keep the union of the predicted sets of the last ``window`` tokens.

    A call with several tokens starts a new sequence (a perplexity window, a prompt); a call with one token continues
    the sequence of the previous calls (incremental decoding with a KV cache). ``reset()`` starts over explicitly.
    """

    def __init__(self, predictors: Predictor, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.predictors = predictors
        self.window = window
        self._history: dict[int, Tensor] = {}  # layer -> bool [..., <= window - 1, n]

    def reset(self) -> None:
        self._history.clear()

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> Tensor:
        if x.dim() == 1:  # a single token without a time axis
            return self(layer, x.unsqueeze(0), h.unsqueeze(0)).squeeze(0)
        pred = self.predictors.predict(layer, x)  # bool [..., T, n]
        history = self._history.get(layer) if pred.shape[-2] == 1 else None
        if history is not None and history.shape[:-2] != pred.shape[:-2]:
            history = None
        keep = window_union(pred, self.window, history)
        if self.window > 1:
            seen = pred if history is None else torch.cat([history, pred], dim=-2)
            self._history[layer] = seen[..., -(self.window - 1) :, :]
        return keep


def window_mask_fn(predictors: Predictor, window: int) -> WindowMask:
    """Predictor-mode mask for ``llmflash.evaluate.perplexity``: the sliding window of ``window`` tokens."""
    return WindowMask(predictors, window)


def predicted_mask_fn(predictors: Predictor) -> WindowMask:
    """The predicted set only (a window of one token)."""
    return WindowMask(predictors, 1)


class Confusion:
    """An FFN observer accumulating per-layer counts of predicted vs truly active neurons (and window I/O)."""

    def __init__(self, predictors: Predictor, n_layers: int, window: int = 4) -> None:
        self.predictors = predictors
        self.window = window
        z = lambda: [0] * n_layers  # noqa: E731
        self.tp, self.pp, self.ap, self.total = z(), z(), z(), z()
        self.window_size, self.window_new = z(), z()  # neurons held in the window, neurons new to it (per token sums)

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> None:
        pred = self.predictors.predict(layer, x)  # bool [..., T, n]
        true = h != 0
        self.tp[layer] += int((pred & true).sum())
        self.pp[layer] += int(pred.sum())
        self.ap[layer] += int(true.sum())
        self.total[layer] += true.numel()
        win = window_union(pred, self.window)  # [..., T, n]: what must be in DRAM for token t
        prev = torch.zeros_like(win)
        prev[..., 1:, :] = win[..., :-1, :]
        self.window_size[layer] += int(win.sum())
        self.window_new[layer] += int((pred & ~prev).sum())  # loaded for token t: predicted, not in DRAM yet

    def per_layer(self) -> list[dict]:
        out = []
        for i in range(len(self.tp)):
            tp, pp, ap, total = self.tp[i], self.pp[i], self.ap[i], self.total[i]
            out.append({
                "layer": i,
                "recall": tp / ap if ap else 1.0,
                "precision": tp / pp if pp else 1.0,
                "predicted_active_fraction": pp / total if total else 0.0,
                "true_active_fraction": ap / total if total else 0.0,
                "window_active_fraction": self.window_size[i] / total if total else 0.0,
                "window_new_fraction": self.window_new[i] / total if total else 0.0,
            })
        return out

    def summary(self) -> dict:
        per = self.per_layer()
        mean = lambda k: sum(p[k] for p in per) / len(per)  # noqa: E731 - averaged over layers
        pred, true = mean("predicted_active_fraction"), mean("true_active_fraction")
        return {
            "recall": mean("recall"),
            "precision": mean("precision"),
            "predicted_active_fraction": pred,
            "true_active_fraction": true,
            "over_prediction": pred / true if true else float("inf"),
            "min_layer_recall": min(p["recall"] for p in per),
            "window": self.window,
            "window_active_fraction": mean("window_active_fraction"),
            "window_new_fraction": mean("window_new_fraction"),
            "per_layer": per,
        }


@torch.no_grad()
def eval_on_activations(predictors: Predictor, act, window: int = 4, progress: bool = False) -> dict:
    """The same figures as ``eval_predictors`` from a collected activation directory (no model run).

    ``act`` is a ``predictors.collect.Activations`` of held-out text collected with the predictors' rule.
    """
    import numpy as np

    from .collect import unpack_labels

    conf = Confusion(predictors, act.n_layers, window)
    for layer in tqdm(range(act.n_layers), desc="eval predictors", unit="layer", disable=not progress):
        xs, ys = act.x(layer), act.labels(layer)
        for start in range(0, act.n_tokens, act.seq_len):  # one collected window = one sequence
            stop = min(start + act.seq_len, act.n_tokens)
            x = torch.from_numpy(np.asarray(xs[start:stop], dtype=np.float32))  # [T, d]
            h = torch.from_numpy(unpack_labels(np.asarray(ys[start:stop]), act.d_ffn))  # [T, n] (active = nonzero)
            conf(layer, x, h)
    return {"tokens": act.n_tokens, **conf.summary()}


@torch.no_grad()
def eval_predictors(
    model, tokenizer, docs: list[str], predictors: Predictor, rule: SparsityRule, *, max_tokens: Optional[int] = 32_768,
    seq_len: int = 512, window: int = 4, progress: bool = True,
) -> dict:
    """Recall, precision, predicted / true active fraction (averaged over layers) on ``docs``, per layer too.

    The model runs with its true FFN (rule applied): the predictors see the oracle trajectory's inputs.
    """
    n_layers = adapter_for(model.config).ffn_spec(model.config).n_layers
    conf = Confusion(predictors, n_layers, window)
    install_dense_ffns(model, rule, observer=conf)
    stream = token_stream(tokenizer, docs, max_tokens=max_tokens)
    n_tokens = 0
    for ids in tqdm(list(windows(stream, seq_len)), desc="eval predictors", unit="win", disable=not progress):
        model(ids)
        n_tokens += ids.shape[1]
    return {"tokens": n_tokens, **conf.summary()}


def evaluate_set(lm, docs: list[str], pset, *, max_tokens: Optional[int] = 32_768, seq_len: int = 512, window: int = 4,
                 ppl: bool = False, progress: bool = True) -> dict:
    """``eval_predictors`` for a loaded model and a ``PredictorSet``, with its size and cost, and with ``ppl`` the
    perplexity in predictor mode (the window's union; missed neurons really missing) beside oracle mode."""
    from llmflash.evaluate import perplexity

    rule = pset.sparsity_rule()
    res = eval_predictors(lm.model, lm.tokenizer, docs, pset, rule, max_tokens=max_tokens, seq_len=seq_len, window=window,
                          progress=progress)
    res = {"model": lm.name, "kind": pset.kind, "rule": pset.rule.get("kind"), "predictor_bytes": pset.nbytes,
           "predictor_macs_per_token": pset.macs_per_token, **res}
    if ppl:
        oracle = perplexity(lm.model, lm.tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, rule=rule)
        pred = perplexity(lm.model, lm.tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, rule=rule,
                          mask_fn=window_mask_fn(pset, window))
        res.update(ppl_oracle=oracle["ppl"], ppl_predictor=pred["ppl"], ppl_ratio=pred["ppl"] / oracle["ppl"],
                   ppl_tokens=pred["tokens"])
    return res

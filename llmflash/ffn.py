"""FFN math shared by every path (dense reference, flash engine, predictors, calibration).

For one layer with ``n`` neurons (rows) and model width ``d``::

    z = x @ A.T + b            # A = gate (gated FFN) or up (plain FFN): [n, d]; b: per-neuron bias or -shift
    h = act(z) * (x @ U.T)     # gated (SwiGLU/GeGLU); plain FFN: h = act(z)
    h = h * (|h| > t)          # only with the ``threshold`` sparsity rule (CATS-style)
    y = h @ D + c              # D: [n, d], row i = neuron i's output vector; c: output bias

A neuron is *active* for a token when its ``h`` is non-zero after the rule. The sparse paths compute the same
formula over a subset of rows; skipping a row whose ``h`` is zero changes nothing, so sparse equals dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

RELU_FAMILY = ("relu", "relu2", "relu6")


@dataclass
class FFNWeights:
    """One layer's FFN as per-neuron rows (row i of each matrix belongs to neuron i)."""

    gate: Optional[Tensor]  # [n, d] or None for a plain FFN
    up: Tensor  # [n, d]
    down: Tensor  # [n, d]
    act_bias: Optional[Tensor]  # [n]: added to z (OPT's fc1 bias; minus the shift of a shifted ReLU)
    out_bias: Optional[Tensor]  # [d]

    @property
    def n_neurons(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    def to(self, dtype: torch.dtype) -> "FFNWeights":
        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(dtype).contiguous()

        return FFNWeights(cast(self.gate), self.up.to(dtype).contiguous(), self.down.to(dtype).contiguous(),
                          cast(self.act_bias), cast(self.out_bias))


@dataclass(frozen=True)
class SparsityRule:
    """Which neurons count as inactive.

    ``relu``: exact zeros of the activation (a ReLU model; a SiLU model then has almost none).
    ``threshold``: |h| under a per-layer threshold calibrated on text to a target sparsity; the thresholded model
    is then the reference that every mode computes. With ``on == "act"`` the threshold compares the activation
    |act(gate x + b)| alone (CATS-style: the gate projection decides, the up projection does not), the rule a sparse
    model trained that way carries.
    """

    kind: str = "relu"
    thresholds: Optional[tuple[float, ...]] = None  # per layer, for kind == "threshold"
    target_sparsity: Optional[float] = None
    on: str = "h"  # what a threshold compares: "h" (act(gate x) * up x) or "act" (act(gate x) alone)

    def __post_init__(self) -> None:
        if self.on not in ("h", "act"):
            raise ValueError(f"a threshold compares h or act, not {self.on!r}")

    @property
    def on_act(self) -> bool:
        return self.kind == "threshold" and self.on == "act"

    def threshold(self, layer: int) -> Optional[float]:
        if self.kind != "threshold":
            return None
        assert self.thresholds is not None
        return float(self.thresholds[layer])


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    return ACT2FN[name]


def neuron_outputs(
    x: Tensor, a: Tensor, u: Optional[Tensor], act_bias: Optional[Tensor], act: Callable[[Tensor], Tensor],
    threshold: Optional[float], on_act: bool = False,
) -> Tensor:
    """h for rows ``a`` (and ``u`` when gated): x [..., d] -> h [..., n], with the threshold rule applied (to |h|, or
    with ``on_act`` to the activation |act(a x + b)| alone)."""
    h = act(F.linear(x, a, act_bias))
    keep = (h.abs() > threshold) if threshold is not None and on_act else None
    if u is not None:
        h = h * F.linear(x, u)
    if keep is not None:
        return h * keep
    if threshold is not None:
        h = h * (h.abs() > threshold)
    return h


def ffn_output(h: Tensor, down: Tensor, out_bias: Optional[Tensor]) -> Tensor:
    """y = h @ D + c: h [..., n], D [n, d] -> [..., d]."""
    y = h @ down
    return y if out_bias is None else y + out_bias


Observer = Callable[[int, Tensor, Tensor], None]  # (layer, x [..., d], h [..., n]) -> None
MaskFn = Callable[[int, Tensor, Tensor], Tensor]  # (layer, x, h) -> keep mask [..., n] (bool)


class DenseFFN(nn.Module):
    """The reference FFN with every weight in DRAM, the sparsity rule applied.

    ``observer`` sees (layer, x, h) for every call (collecting predictor data, active fractions, thresholds).
    ``mask_fn`` can drop neurons (predictor-mode perplexity: neurons the predictor misses are really missing).
    """

    def __init__(
        self, layer: int, weights: FFNWeights, activation: str, threshold: Optional[float] = None,
        observer: Optional[Observer] = None, mask_fn: Optional[MaskFn] = None, on_act: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.w = weights
        self.act = activation_fn(activation)
        self.threshold = threshold
        self.on_act = on_act  # the threshold compares |act(gate x)| alone (``SparsityRule.on``)
        self.observer = observer
        self.mask_fn = mask_fn

    @property
    def a(self) -> Tensor:
        return self.w.up if self.w.gate is None else self.w.gate

    @property
    def u(self) -> Optional[Tensor]:
        return None if self.w.gate is None else self.w.up

    def forward(self, x: Tensor) -> Tensor:
        h = neuron_outputs(x, self.a, self.u, self.w.act_bias, self.act, self.threshold, self.on_act)  # [..., n]
        if self.mask_fn is not None:
            h = h * self.mask_fn(self.layer, x, h)
        if self.observer is not None:
            self.observer(self.layer, x, h)
        return ffn_output(h, self.w.down, self.w.out_bias)

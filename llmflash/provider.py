"""Active-set providers: which FFN neurons a sparse-mode engine reads for a token.

``ActiveSetProvider`` declares every capability a provider may have, each with its default, so the engine never
asks whether a method exists:

- ``active(layer, x)`` -> bool [T, n]: the set of ``layer`` for the rows of its FFN input x [T, d] (required);
- ``active_ids(layer, x)`` -> sorted ids of the union over the rows (default: from ``active``; a provider may have a
  faster path);
- ``supports_guess`` / ``guess(layer, x)``: the set guessed from an approximation of the layer's input (lookahead);
  a provider without it gets no lookahead;
- ``pop_replay_ms()``: ms of its calls since the last pop that replayed recorded or simulated sets (a trace standing
  in for a predictor's output), excluded from the token's time like the oracle's (default 0);
- ``device_mask(layer, x)`` / ``active_after(layer, x, mask)``: the provider's network as device operations alone
  (captured with the attention in a CUDA graph, ``graph_step``), and the sets given its result on the host (default:
  no such network / the mask itself);
- ``to_device(device)``: move what it computes with to the engine's accelerator (default: nothing to move);
- ``reset()``: start a new sequence (default: nothing);
- ``nbytes`` (DRAM it holds that counts in the budget), ``counted`` (False: its time is not charged to the token),
  ``layer_demand`` (expected share of each layer's neurons per token, to split the caches; None: alike).

``OracleProvider`` (the true set) and ``PredictorProvider`` (trained predictors) are the engine's own.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .ffn import FFNWeights, MaskFn, activation_fn, neuron_outputs
from .predictor import PredictorSet


class ActiveSetProvider:
    nbytes: int = 0
    counted: bool = True
    layer_demand: Optional[list[float]] = None
    supports_guess: bool = False

    def active(self, layer: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def active_ids(self, layer: int, x: Tensor) -> np.ndarray:
        return self.active(layer, x).any(dim=0).nonzero().flatten().cpu().numpy()

    def guess(self, layer: int, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} makes no guesses (supports_guess is False)")

    def device_mask(self, layer: int, x: Tensor) -> Optional[Tensor]:
        """The provider's network on x [T, d] as device operations alone (no host sync: it may be captured in a CUDA
        graph, ``graph_step``): bool [T, n] on x's device, or None where the provider has no such network."""
        return None

    def active_after(self, layer: int, x: Tensor, mask: Tensor) -> Tensor:
        """The active sets [T, n], given ``device_mask``'s result ``mask`` (brought to the host)."""
        return mask

    def pop_replay_ms(self) -> float:
        return 0.0

    def to_device(self, device: torch.device) -> None:
        pass

    def reset(self) -> None:
        pass


class WrappedProvider(ActiveSetProvider):
    """A provider that changes another one's sets; everything else is the inner provider's."""

    def __init__(self, inner: ActiveSetProvider) -> None:
        self.inner = inner
        self.nbytes = inner.nbytes
        self.counted = inner.counted
        self.layer_demand = inner.layer_demand

    def active(self, layer: int, x: Tensor) -> Tensor:
        return self.inner.active(layer, x)

    def pop_replay_ms(self) -> float:
        return self.inner.pop_replay_ms()

    def to_device(self, device: torch.device) -> None:
        self.inner.to_device(device)

    def reset(self) -> None:
        self.inner.reset()


class OracleProvider(ActiveSetProvider):
    """The true active set, from the real FFN activation (weights held outside the budget, time not counted)."""

    counted = False
    nbytes = 0
    supports_guess = True

    def __init__(self, weights: list[FFNWeights], activation: str, thresholds: list[Optional[float]],
                 mask_fn: Optional[MaskFn] = None, on_act: bool = False) -> None:
        self.mask_fn = mask_fn  # a gated model's gate: part of the rule
        self.on_act = on_act  # the thresholds compare |act(gate x)| alone
        self.w = weights
        self.act = activation_fn(activation)
        self.thresholds = thresholds
        self.held_bytes = sum(
            t.numel() * t.element_size() for w in weights for t in (w.gate, w.up) if t is not None
        )

    def active(self, layer: int, x: Tensor) -> Tensor:
        w = self.w[layer]
        a, u = (w.up, None) if w.gate is None else (w.gate, w.up)
        h = neuron_outputs(x, a, u, w.act_bias, self.act, self.thresholds[layer], self.on_act)
        return (h != 0) & self.mask_fn(layer, x, h) if self.mask_fn is not None else h != 0

    def guess(self, layer: int, x: Tensor) -> Tensor:
        return self.active(layer, x)


class PredictorProvider(ActiveSetProvider):
    """Trained low-rank predictors choose the active set (the paper's method)."""

    counted = True
    supports_guess = True

    def __init__(self, predictors: PredictorSet) -> None:
        self.p = predictors
        self.nbytes = int(predictors.nbytes)
        # expected rows each layer's cache needs: its predicted active fraction (the window adds to all alike)
        per_layer = predictors.meta.get("layers") or []
        fractions = [s.get("predicted_active_fraction") for s in per_layer if isinstance(s, dict)]
        if len(fractions) == predictors.n_layers and all(fractions):
            self.layer_demand = [float(f or 0.0) for f in fractions]

    def active(self, layer: int, x: Tensor) -> Tensor:
        return self.p.predict(layer, x)

    def active_ids(self, layer: int, x: Tensor) -> np.ndarray:
        return self.p.active_ids(layer, x)

    def guess(self, layer: int, x: Tensor) -> Tensor:
        return self.active(layer, x)

    def device_mask(self, layer: int, x: Tensor) -> Optional[Tensor]:
        return self.p.predict(layer, x)

    def to_device(self, device: torch.device) -> None:
        self.p.to_device(device)


class GateProvider(PredictorProvider):
    """A gated model's own gate as the predictor: its set is the model's exact candidate set (recall 1 by
    construction), and ``mask`` (the engine's per-layer cache of the gate) is computed once per layer and token."""

    def __init__(self, predictors: PredictorSet, mask: MaskFn) -> None:
        super().__init__(predictors)
        self.mask = mask

    def active(self, layer: int, x: Tensor) -> Tensor:
        return self.mask(layer, x, x)

    def device_mask(self, layer: int, x: Tensor) -> Optional[Tensor]:
        return None  # (the engine's gate mask is computed and cached per token outside any graph)

    def active_ids(self, layer: int, x: Tensor) -> np.ndarray:
        m = self.active(layer, x)
        return (m[0] if m.shape[0] == 1 else m.any(dim=0)).nonzero().flatten().cpu().numpy()

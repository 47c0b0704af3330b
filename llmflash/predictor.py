"""The predictor runtime: low-rank activation predictors (after Deja Vu), which FFN neurons will be active for a token.

Training, collection and evaluation live in the top-level ``predictors`` package; this module is what the engine
loads and runs.

Per layer, from the FFN input x (after the post-attention norm)::

    z = (x @ A.T) @ B.T + b        # A: [r, d_model] (no bias), B: [d_ffn, r], b: [d_ffn]
    active = sigmoid(z) >= p_l      # p_l: the layer's decision threshold, calibrated to a recall target

so ``predict`` is two small matmuls and a comparison against logit(p_l). On disk a predictor set is a directory::

    predictors.safetensors   fp16: layers.L.down [r_L, d_model], layers.L.up [d_ffn, r_L], layers.L.bias [d_ffn]
    predictors.json          model name, sizes, rule (thresholds), data hash, training config, per-layer stats

At run time (``ENGINE_DTYPE``) the engine holds them in int8, weight-only: each row of A and B quantized with its own
scale (bf16), the rank padded with zero rows to a multiple of 16, the activations in bf16, and the bias folded into a
per-neuron cut (``threshold - b``, fp32). Half the DRAM of fp16 and less time per token, because at decode the
predictor streams its weights from DRAM (smollm2-relu in the engine: 2.6 vs 3.7 ms per token, results/engine_options).
On held-out smollm2-relu tokens the sets barely move (recall 0.9913 vs 0.9914, over-prediction 1.444x for both:
results/predictors/eval_smollm2-relu.json and paper_notes.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import adapter_for
from .errors import LLMFlashError
from .ffn import SparsityRule
from .paths import atomic_dir

log = logging.getLogger(__name__)

WEIGHTS = "predictors.safetensors"
SIDECAR = "predictors.json"
FORMAT = "llmflash-predictors/1"
PIN_LOGIT = 30_000.0  # the bias of a pinned neuron: always predicted (fits fp16)


class LowRankPredictor(nn.Module):
    """Linear(d_model -> r, no bias) -> Linear(r -> d_ffn) -> logits (the sigmoid lives in the loss / threshold).

    ``hidden=True``: a two-layer MLP instead, Linear(d_model -> r, bias) -> ReLU -> Linear(r -> d_ffn) (Deja Vu's
    predictor shape); the same cost per token, a non-linear decision."""

    def __init__(self, d_model: int, d_ffn: int, rank: int, hidden: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.down = nn.Linear(d_model, rank, bias=hidden)
        self.up = nn.Linear(rank, d_ffn, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(x)  # [..., d] -> [..., r]
        return self.up(F.relu(h) if self.hidden else h)  # -> [..., n]


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


ENGINE_DTYPE = torch.int8  # the form the engine, eval-predictors and predictor-mode evaluations use
_INT8_K = 16  # torch's int8 weight-only kernel needs an inner dimension that is a multiple of this


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [m, k] -> (int8 [m, k], bf16 scales [m]) with w ~= q * scale[:, None] (symmetric, one scale per row)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    return torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


_INT8_MM = getattr(torch, "_weight_int8pack_mm", None)


def _int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [T, k] @ (q * scale[:, None]).T -> bf16 [T, m]; torch's int8 weight-only CPU kernel where it applies."""
    x = x.to(torch.bfloat16).contiguous()
    if _INT8_MM is not None and x.shape[1] % _INT8_K == 0 and x.shape[0] > 0:
        return _INT8_MM(x, q, scale)
    return F.linear(x.float(), q.float() * scale.float()[:, None]).to(torch.bfloat16)


@dataclass
class _Layer:
    down: Tensor  # [r, d] (int8 form: [r16, d], rows r.. zero)
    up: Tensor  # [n, r] (int8 form: [n, r16])
    bias: Tensor  # [n]
    threshold_logit: float  # predict active where z >= this
    rank: int = 0  # r (0: down.shape[0])
    down_scale: Optional[Tensor] = None  # int8 form: bf16 [r16]
    up_scale: Optional[Tensor] = None  # int8 form: bf16 [n]
    cut: Optional[np.ndarray] = None  # int8 form: float32 [n], threshold_logit - bias
    down_bias: Optional[Tensor] = None  # [r] (int8 form: [r16]): a hidden layer, z = B relu(A x + c) + b

    def __post_init__(self) -> None:
        self.rank = self.rank or int(self.down.shape[0])

    @property
    def quantized(self) -> bool:
        return self.down_scale is not None

    def set_cut(self) -> None:
        if self.quantized:
            self.cut = (self.threshold_logit - self.bias.float()).numpy()

    def float_weights(self) -> tuple[Tensor, Tensor]:
        """(A [r, d], B [n, r]) in fp32, dequantized from the int8 form if need be."""
        if not self.quantized:
            return self.down.float(), self.up.float()
        assert self.down_scale is not None and self.up_scale is not None
        a = self.down.float() * self.down_scale.float()[:, None]
        b = self.up.float() * self.up_scale.float()[:, None]
        return a[: self.rank], b[:, : self.rank]

    def quantize(self) -> None:
        """To the int8 form (in place)."""
        if self.quantized:
            return
        a, b = self.down.float(), self.up.float()
        pad = -self.rank % _INT8_K
        if pad:  # zero rows of A give zero features, whatever columns of B they meet
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        if self.down_bias is not None:
            self.down_bias = torch.cat([self.down_bias.float()[: self.rank], self.down_bias.new_zeros(pad).float()])
            self.down_bias = self.down_bias.to(torch.bfloat16).contiguous()  # zero rows: relu(0) = 0
        self.down, self.down_scale = _quantize_rows(a)
        self.up, self.up_scale = _quantize_rows(b)
        self.bias = self.bias.to(torch.float16)
        self.set_cut()

    def to_float(self, dtype: torch.dtype) -> None:
        a, b = self.float_weights()
        if self.down_bias is not None:
            self.down_bias = self.down_bias.float()[: self.rank].to(dtype).contiguous()
        self.down, self.up, self.bias = (t.to(dtype).contiguous() for t in (a, b, self.bias))
        self.down_scale = self.up_scale = self.cut = None

    def to_device(self, device: torch.device) -> None:
        self.down, self.up, self.bias = (t.to(device) for t in (self.down, self.up, self.bias))
        if self.down_bias is not None:
            self.down_bias = self.down_bias.to(device)
        if self.down_scale is not None and self.up_scale is not None:  # the int8 form
            self.down_scale, self.up_scale = self.down_scale.to(device), self.up_scale.to(device)

    def tensors(self) -> list:
        return [t for t in (self.down, self.up, self.bias, self.down_scale, self.up_scale, self.cut, self.down_bias)
                if t is not None]

    def features(self, x: Tensor) -> Tensor:
        """int8 form: (x A^T) B^T without the bias, bf16 [T, n] from x [T, d]."""
        assert self.down_scale is not None and self.up_scale is not None
        mid = _int8_linear(x, self.down, self.down_scale)  # bf16 [T, r16]
        if self.down_bias is not None:
            mid = F.relu(mid + self.down_bias)
        return _int8_linear(mid, self.up, self.up_scale)


def ffn_fingerprint(model: nn.Module) -> list[float]:
    """Per layer (||gate||, ||up||, ||down||, ||act_bias||): tells apart two versions of a model with one name (a
    re-trained relufication) while a flash directory of the same weights in fp16 / bf16 still matches."""
    adapter = adapter_for(model.config)
    out = []
    for layer in range(adapter.ffn_spec(model.config).n_layers):
        w = adapter.ffn_weights(model, layer)
        for t in (w.gate, w.up, w.down, w.act_bias):
            out.append(0.0 if t is None else float(t.float().norm()))
    return out


def fingerprints_match(a: list[float], b: list[float], rtol: float = 1e-2) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-6) for x, y in zip(a, b))


def same_model(a: str, b: str) -> bool:
    norm = lambda s: Path(str(s).rstrip("/")).name.lower()  # noqa: E731 - a directory path and its name match
    return norm(a) == norm(b)


class PredictorSet:
    """All layers' predictors, in the model's compute dtype, ready for ``predict`` on every generated token."""

    def __init__(self, layers: list[_Layer], meta: dict, dtype: torch.dtype = torch.float32) -> None:
        self._layers = layers
        self.meta = meta
        self.n_layers: int = len(layers)
        self.d_model: int = int(meta["d_model"])
        self.d_ffn: int = int(meta["d_ffn"])
        self.model_name: str = meta["model"]
        self.rule: dict = meta["rule"]
        self.dtype = dtype
        self.to(dtype)

    # -- runtime ----------------------------------------------------------------------------------------------------
    def predict(self, layer: int, x: Tensor) -> Tensor:
        """x [..., d_model] -> bool [..., d_ffn]: the neurons predicted active."""
        return self.scores(layer, x) >= self._layers[layer].threshold_logit

    def active_ids(self, layer: int, x: Tensor) -> np.ndarray:
        """Sorted ids of the neurons predicted active for any row of x [T, d_model]: the engine's per-token call
        (``predict`` + union + ids in as few tensor ops as possible: at decode the ops' overhead is the cost)."""
        p = self._layers[layer]
        t: Any
        if p.quantized:  # bias folded into the cut: two kernels, one comparison
            z, t = p.features(x.reshape(-1, x.shape[-1])).float().cpu().numpy(), p.cut  # [T, n]
        else:
            z, t = self.scores(layer, x.reshape(-1, x.shape[-1])).float().cpu().numpy(), p.threshold_logit
        return np.flatnonzero(z[0] >= t if z.shape[0] == 1 else (z >= t).any(axis=0))

    def scores(self, layer: int, x: Tensor) -> Tensor:
        """The logits z [..., d_ffn] (before the layer's threshold), computed in the predictors' own form (the engine
        keeps them in int8: ``ENGINE_DTYPE``)."""
        p = self._layers[layer]
        if p.quantized:
            z = p.features(x.reshape(-1, x.shape[-1])).float() + p.bias.float()
            return z.view(*x.shape[:-1], -1)
        mid = F.linear(x.to(self.dtype), p.down, p.down_bias)  # [..., r]
        return F.linear(F.relu(mid) if p.down_bias is not None else mid, p.up, p.bias)  # -> [..., n]

    def check_compatible(
        self, n_layers: int, d_model: int, d_ffn: int, model_name: Optional[str] = None, rule_kind: Optional[str] = None
    ) -> None:
        """Raise ``LLMFlashError`` unless these predictors were trained for a model of this shape (and name, rule)."""
        mine = (self.n_layers, self.d_model, self.d_ffn)
        if mine != (n_layers, d_model, d_ffn):
            raise LLMFlashError(
                f"predictors for {self.model_name} (layers, d_model, d_ffn = {mine}) do not fit this model "
                f"({(n_layers, d_model, d_ffn)}): train predictors for it with `llmflash collect` + `llmflash train-predictors`"
            )
        if model_name and not same_model(model_name, self.model_name):
            raise LLMFlashError(
                f"predictors were trained for {self.model_name}, not {model_name}: train predictors for {model_name} "
                "with `llmflash collect` + `llmflash train-predictors`"
            )
        if rule_kind and rule_kind != self.rule.get("kind"):
            raise LLMFlashError(
                f"predictors were trained for the {self.rule.get('kind')} sparsity rule, not {rule_kind}: "
                f"pass --sparsity {self.rule.get('kind')} or train predictors for {rule_kind}"
            )

    def check_model(self, model: nn.Module, model_name: Optional[str] = None, rule_kind: Optional[str] = None) -> None:
        """``check_compatible`` from an in-memory model, plus its FFN weights' fingerprint (same name, other weights)."""
        spec = adapter_for(model.config).ffn_spec(model.config)
        self.check_compatible(spec.n_layers, spec.d_model, spec.d_ffn, model_name, rule_kind)
        mine = self.meta.get("model_fingerprint")
        if mine and not fingerprints_match(mine, ffn_fingerprint(model)):
            raise LLMFlashError(
                f"predictors were trained for other weights of {self.model_name} (the FFN fingerprint differs: "
                "a re-trained model?): collect and train predictors again"
            )

    def sparsity_rule(self) -> SparsityRule:
        """The rule whose active sets the predictors were trained on (threshold rule: the same thresholds)."""
        if self.rule.get("kind") == "threshold":
            return SparsityRule("threshold", tuple(float(t) for t in self.rule["thresholds"]), self.rule.get("target_sparsity"))
        return SparsityRule(self.rule.get("kind", "relu"))

    def layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """(A [r, d], B [n, r], bias [n], threshold_logit) of one layer in fp32 (a trainer's starting point)."""
        p = self._layers[layer]
        a, b = p.float_weights()
        return a.clone(), b.clone(), p.bias.float().clone(), p.threshold_logit

    @property
    def ranks(self) -> list[int]:
        return [p.rank for p in self._layers]

    @property
    def nbytes(self) -> int:
        """DRAM the predictors take in their current form (counted in the engine's budget)."""
        return sum(int(t.nbytes) for p in self._layers for t in p.tensors())

    @property
    def n_params(self) -> int:
        return sum(p.rank * (self.d_model + self.d_ffn) + self.d_ffn for p in self._layers)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of one token's predictions over all layers."""
        return sum(p.rank * (self.d_model + self.d_ffn) for p in self._layers)

    @property
    def thresholds(self) -> list[float]:
        """Per-layer decision thresholds as probabilities."""
        return [1 / (1 + math.exp(-p.threshold_logit)) for p in self._layers]

    def set_threshold_logit(self, layer: int, value: float) -> None:
        self._layers[layer].threshold_logit = float(value)
        self._layers[layer].set_cut()

    def pin(self, layer: int, neurons: list[int]) -> None:
        """Always predict ``neurons`` of ``layer`` active (their bias becomes ``PIN_LOGIT``)."""
        if neurons:
            self._layers[layer].bias[torch.as_tensor(neurons, dtype=torch.long)] = PIN_LOGIT
            self._layers[layer].set_cut()

    def pinned(self, layer: int) -> list[int]:
        return (self._layers[layer].bias >= PIN_LOGIT / 2).nonzero().flatten().tolist()

    def permute_outputs(self, order: Sequence[np.ndarray] | np.ndarray) -> "PredictorSet":
        """Reorder every layer's outputs so that output j is neuron ``order[layer][j]`` (a reordered flash directory:
        ``FlashDir.neuron_order``): the sets then come out as the file's row ids at no cost per call. In place."""
        for layer, p in enumerate(self._layers):
            idx = torch.as_tensor(np.asarray(order[layer]), dtype=torch.long)
            if idx.shape != (self.d_ffn,):
                raise LLMFlashError(f"a neuron order of shape {tuple(idx.shape)} does not fit layer {layer}'s {self.d_ffn} neurons")
            p.up, p.bias = p.up[idx].contiguous(), p.bias[idx].contiguous()
            if p.up_scale is not None:  # the int8 form
                p.up_scale = p.up_scale[idx].contiguous()
                p.set_cut()
        return self

    def to_device(self, device: torch.device) -> "PredictorSet":
        """Move the weights to ``device`` (the engine on an accelerator; use a float form there: the int8 kernel is
        CPU-only). In place."""
        for p in self._layers:
            p.to_device(device)
        return self

    def to(self, dtype: torch.dtype) -> "PredictorSet":
        """A float dtype, or ``torch.int8``: the int8 weight-only form (see the module's docstring)."""
        for p in self._layers:
            p.quantize() if dtype == torch.int8 else p.to_float(dtype)
        self.dtype = dtype
        return self

    # -- building and files -----------------------------------------------------------------------------------------
    @classmethod
    def from_modules(cls, modules: list[LowRankPredictor], threshold_logits: list[float], meta: dict) -> "PredictorSet":
        layers = [
            _Layer(m.down.weight.detach().clone(), m.up.weight.detach().clone(), m.up.bias.detach().clone(), float(t),
                   down_bias=m.down.bias.detach().clone() if m.down.bias is not None else None)
            for m, t in zip(modules, threshold_logits)
        ]
        return cls(layers, meta, torch.float32)

    def save(self, path: str | Path, overwrite: bool = True) -> None:
        """Write PREDDIR atomically (fp16 weights + sidecar with the per-layer thresholds and stats)."""
        from safetensors.torch import save_file

        tensors = {}
        for i, p in enumerate(self._layers):
            a, b = p.float_weights()
            tensors[f"layers.{i}.down"] = a.to(torch.float16).contiguous()
            tensors[f"layers.{i}.up"] = b.to(torch.float16).contiguous()
            tensors[f"layers.{i}.bias"] = p.bias.to(torch.float16).contiguous()
            if p.down_bias is not None:
                tensors[f"layers.{i}.down_bias"] = p.down_bias.float()[: p.rank].to(torch.float16).contiguous()
        meta = dict(self.meta)
        meta["format"] = FORMAT
        meta["n_layers"] = self.n_layers
        meta["ranks"] = self.ranks
        meta["weights_dtype"] = "float16"
        meta["threshold_logits"] = [p.threshold_logit for p in self._layers]
        if any(p.down_bias is not None for p in self._layers):
            meta["hidden_activation"] = "relu"
        with atomic_dir(Path(path), overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "model": self.model_name})
            meta["weights_sha256"] = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
            (tmp / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
            for f in (WEIGHTS, SIDECAR):
                (tmp / f).chmod(0o644)
            tmp.chmod(0o755)  # a package artifact: readable by every user
        self.meta = meta

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = ENGINE_DTYPE) -> "PredictorSet":
        """Read PREDDIR (or its predictors.json / .safetensors); ``LLMFlashError`` if missing or corrupt. ``dtype``:
        the form to hold them in (default the engine's int8 form; torch.float32 for exact fp16-stored weights)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if path.is_file() and path.name in (WEIGHTS, SIDECAR):
            path = path.parent
        hint = "train them with `llmflash train-predictors`"
        if not (path / SIDECAR).is_file() or not (path / WEIGHTS).is_file():
            raise LLMFlashError(f"no predictors at {path} (need {SIDECAR} and {WEIGHTS}): {hint}")
        try:
            meta = json.loads((path / SIDECAR).read_text())
        except (OSError, ValueError) as err:
            raise LLMFlashError(f"{path / SIDECAR} is corrupt ({str(err)[:100]}): {hint}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LLMFlashError(f"{path / SIDECAR} is not a predictors file of format {FORMAT}: {hint}")
        raw = (path / WEIGHTS).read_bytes()
        if meta.get("weights_sha256") and hashlib.sha256(raw).hexdigest() != meta["weights_sha256"]:
            raise LLMFlashError(f"{path / WEIGHTS} does not match its checksum in {SIDECAR} (corrupt or replaced): {hint}")
        try:
            tensors = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as err:
            raise LLMFlashError(f"{path / WEIGHTS} is corrupt ({str(err)[:100]}): {hint}") from None
        try:
            n, d, n_layers = int(meta["d_ffn"]), int(meta["d_model"]), int(meta["n_layers"])
            layers = []
            for i in range(n_layers):
                down, up, bias = (tensors[f"layers.{i}.{k}"].float() for k in ("down", "up", "bias"))
                r = down.shape[0]
                if down.shape != (r, d) or up.shape != (n, r) or bias.shape != (n,):
                    raise ValueError(f"layer {i} has shapes {tuple(down.shape)}, {tuple(up.shape)}, {tuple(bias.shape)}")
                hb = tensors.get(f"layers.{i}.down_bias")
                if hb is not None and hb.shape != (r,):
                    raise ValueError(f"layer {i} has a hidden bias of shape {tuple(hb.shape)}")
                layers.append(_Layer(down, up, bias, float(meta["threshold_logits"][i]),
                                     down_bias=None if hb is None else hb.float()))
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise LLMFlashError(f"{path} holds inconsistent predictors ({str(err)[:120]}): {hint}") from None
        return cls(layers, meta, dtype)

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

A second kind, ``lowbit`` (``predictors.json``: ``"kind": "lowbit"``), is not trained: it is a 4-bit copy of the layer's
own gate and up projections (round to nearest, groups of ``group_size`` inputs, each group's scale chosen by squared
error; no data), and predicts from the rule's own quantity::

    z = |act(x G~^T + b) * (x U~^T)|    (|act(x G~^T + b)| for an ungated FFN or a rule on the activation alone)
    active = z >= t_l                   # t_l: calibrated to the recall target on collected activations

Its tensors are ``layers.L.codes`` (uint8 [n_rows * n, d / 2], two codes per byte, low nibble first; the gate's rows,
then the up's; code c means (c - 7.5) * scale) and ``layers.L.scales`` (fp16 [n_rows * n, d / group_size]), with
``layers.L.bias`` (0, or ``PIN_LOGIT`` for a pinned neuron) and ``layers.L.act_bias`` where the FFN has one. In the
engine's form the codes go to torch's int4 weight-only CPU kernel (one call per layer for gate and up together). It
costs more DRAM than a low-rank set (about 1/8 of the gate and up in fp32) and predicts far better: on smollm2-relu's
held-out corpora, at recall 0.96 it reads 1.15x the active neurons against the low-rank set's 3.8-4.0x at recall
0.88-0.95 (results/predictors/lowbit).
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
from .ffn import FFNWeights, SparsityRule, activation_fn
from .paths import atomic_dir

log = logging.getLogger(__name__)

WEIGHTS = "predictors.safetensors"
SIDECAR = "predictors.json"
FORMAT = "llmflash-predictors/1"
PIN_LOGIT = 30_000.0  # the bias of a pinned neuron: always predicted (fits fp16)
RECIPE = "derived from the model's weights at first use"  # a sidecar's "codes" when the weights are not stored


def _sidecar(path: str | Path) -> Optional[dict]:
    """A saved set's sidecar, or None where it cannot be read."""
    try:
        meta = json.loads((Path(path) / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_recipe(path: str | Path) -> bool:
    """A low-bit set saved without its codes (``save(with_codes=False)``)."""
    meta = _sidecar(path)
    return meta is not None and meta.get("codes") == RECIPE and not (Path(path) / WEIGHTS).is_file()


def set_kind(path: str | Path) -> Optional[str]:
    """A saved set's kind ("lowrank" or "lowbit"), or None where its sidecar cannot be read."""
    meta = _sidecar(path)
    return None if meta is None else str(meta.get("kind", "lowrank"))


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


LOWBIT_BITS = 4  # the only width with a CPU kernel (torch's int4 weight-only matmul)
LOWBIT_GROUPS = (32, 64, 128, 256)  # group sizes the kernel takes
_CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # each group's scale: the best of these fractions of max|w| / 8
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_INT4_PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)


def quantize_lowbit(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w [m, k] -> (codes uint8 [m, k / 2], scales fp16 [m, k / group_size]), w ~= (code - 7.5) * scale: the 16-level
    grid symmetric about zero, round to nearest, each group's scale the clipping ratio of least squared error."""
    m, k = w.shape
    if k % group_size or group_size % 2:
        raise LLMFlashError(f"a low-bit predictor needs groups that divide d_model {k}: {group_size} does not")
    g = w.detach().float().reshape(m, k // group_size, group_size)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    best_q = best_s = best_e = torch.empty(0)
    for i, r in enumerate(_CLIP_RATIOS):
        s = (amax * r / 8).to(torch.float16).float()
        q = torch.floor(g / s).clamp(-8, 7)  # level q + 0.5
        e = ((q + 0.5) * s - g).square().sum(-1, keepdim=True)
        if i == 0:
            best_q, best_s, best_e = q, s, e
        else:
            better = e < best_e
            best_q, best_s = torch.where(better, q, best_q), torch.where(better, s, best_s)
            best_e = torch.minimum(e, best_e)
    codes = (best_q + 8).to(torch.uint8).reshape(m, k)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), best_s.reshape(m, -1).to(torch.float16).contiguous()


def dequantize_lowbit(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The inverse of ``quantize_lowbit``: -> w [m, k] in ``dtype``."""
    m = codes.shape[0]
    c = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(m, -1).float() - 7.5  # [m, k]
    k = c.shape[1]
    w = c.view(m, scales.shape[1], -1) * scales.float()[..., None]
    return w.view(m, k).to(dtype)


@dataclass
class _LowBitLayer:
    """One layer of a ``lowbit`` set (see the module docstring). ``threshold_logit`` is the cut on z (named as the
    low-rank layers' threshold is, so that the set treats both kinds alike)."""

    codes: Optional[Tensor]  # uint8 [n_rows * n, d / 2] (None in the engine form)
    scales: Optional[Tensor]  # fp16 [n_rows * n, d / group] (None in the engine form)
    bias: Tensor  # fp32 [n]: 0, or PIN_LOGIT (always predicted)
    threshold_logit: float
    group_size: int
    activation: str
    gated: bool  # rows: gate then up (z = |act(g) * u|); else one matrix (z = |act(a)|)
    on_act: bool = False  # a rule on the activation alone: z = |act(g)| even when gated
    act_bias: Optional[Tensor] = None  # fp32 [n]
    rank: int = 0  # (no rank: a low-bit set; ``ranks`` reports 0)
    order: Optional[Tensor] = None  # long [n]: output j is neuron order[j] (a reordered flash directory)
    packed: Optional[Tensor] = None  # the engine form: the kernel's packed codes
    scale_zeros: Optional[Tensor] = None  # the engine form: bf16 [d / group, rows, 2] (scale, zero = scale / 2)
    weight: Optional[Tensor] = None  # a float form (or the engine form where the kernel does not apply): [rows, d]
    cut: Optional[np.ndarray] = None  # the engine form: float32 [n], threshold - bias (in output order)

    def __post_init__(self) -> None:
        self._act = activation_fn(self.activation)  # once: transformers' table builds a new module per lookup

    @property
    def quantized(self) -> bool:
        """The engine form: the stored codes went into the kernel's packing (or bf16 weights)."""
        return self.codes is None

    @property
    def n(self) -> int:
        return int(self.bias.shape[0])

    def set_cut(self) -> None:
        if self.quantized:
            self.cut = (self.threshold_logit - self.bias.float()).cpu().numpy()

    def _kernel_applies(self) -> bool:
        codes, _ = self._stored()
        rows, d = codes.shape[0], 2 * codes.shape[1]
        return (_INT4_MM is not None and _INT4_PACK is not None and self.group_size in LOWBIT_GROUPS
                and rows % 16 == 0 and d % self.group_size == 0 and codes.device.type == "cpu")

    def quantize(self) -> None:
        """To the engine form: the int4 kernel's packed codes (or bf16 weights where it does not apply). The stored
        codes are dropped (the form holds one copy): save or change the form of a set loaded again."""
        if self.quantized:
            return
        codes, scales = self._stored()
        self.weight = None
        if self._kernel_applies():
            assert _INT4_PACK is not None
            c = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)
            self.packed = _INT4_PACK(c.to(torch.int32).contiguous(), 1)
            s = scales.float().T.contiguous()  # [groups, rows]
            self.scale_zeros = torch.stack((s, s / 2), dim=-1).to(torch.bfloat16).contiguous()
        else:
            self.weight = dequantize_lowbit(codes, scales, torch.bfloat16).contiguous()
        self.codes = self.scales = None
        self.set_cut()

    def _stored(self) -> tuple[Tensor, Tensor]:
        if self.codes is None or self.scales is None:
            raise LLMFlashError("a low-bit predictor set in the engine's form has dropped its stored codes: load it again")
        return self.codes, self.scales

    def to_float(self, dtype: torch.dtype) -> None:
        codes, scales = self._stored()
        self.packed = self.scale_zeros = None
        self.cut = None
        self.weight = dequantize_lowbit(codes, scales, dtype).to(codes.device).contiguous()

    def to_device(self, device: torch.device) -> None:
        self.bias = self.bias.to(device)
        for name in ("codes", "scales", "act_bias", "order", "weight"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))

    def tensors(self) -> list:
        """Everything the layer holds (its DRAM)."""
        held = (self.codes, self.scales, self.packed, self.scale_zeros, self.weight, self.bias, self.act_bias, self.cut)
        return [t for t in held if t is not None]

    def features(self, x: Tensor) -> Tensor:
        """z without the pin bias: x [T, d] -> [T, n] (in output order)."""
        n = self.n
        if self.packed is not None:
            assert _INT4_MM is not None
            out = _INT4_MM(x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scale_zeros)
        else:
            assert self.weight is not None
            out = F.linear(x.to(self.weight.dtype), self.weight)  # [T, rows]
        a = out[:, :n].float()
        if self.act_bias is not None:
            a = a + self.act_bias
        z = self._act(a)
        if self.gated and not self.on_act:
            z = z * out[:, n:].float()
        z = z.abs()
        return z if self.order is None else z.index_select(1, self.order)

    def scores(self, x: Tensor) -> Tensor:
        return self.features(x) + self.bias.float()

    def permute(self, idx: Tensor) -> None:
        """Output j becomes neuron idx[j] (composed with an earlier order)."""
        idx = idx.to(self.bias.device)
        self.order = idx if self.order is None else self.order[idx]
        self.bias = self.bias[idx].contiguous()
        self.set_cut()

    @property
    def n_rows(self) -> int:
        return 2 if self.gated else 1


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

    def __init__(self, layers: Sequence[_Layer | _LowBitLayer], meta: dict, dtype: torch.dtype = torch.float32,
                 convert: bool = True) -> None:
        """``convert=False``: the layers as given (a low-bit set being built holds its codes alone: it can be pinned,
        given thresholds and saved, and ``in_form`` makes a copy that predicts)."""
        self._layers = list(layers)
        self.meta = meta
        self.n_layers: int = len(layers)
        self.d_model: int = int(meta["d_model"])
        self.d_ffn: int = int(meta["d_ffn"])
        self.model_name: str = meta["model"]
        self.rule: dict = meta["rule"]
        self.dtype = dtype
        if convert:
            self.to(dtype)

    def in_form(self, dtype: torch.dtype) -> "PredictorSet":
        """A low-bit set holding its codes, copied into ``dtype``'s form (the codes shared, not quantized again)."""
        layers = []
        for p in self._layers:
            if not isinstance(p, _LowBitLayer):
                raise LLMFlashError("in_form copies low-bit sets only")
            p._stored()
            layers.append(_LowBitLayer(p.codes, p.scales, p.bias.clone(), p.threshold_logit, p.group_size, p.activation,
                                       p.gated, p.on_act, p.act_bias, order=p.order))
        return PredictorSet(layers, dict(self.meta), dtype)

    @property
    def kind(self) -> str:
        """``lowrank`` (trained, the paper's) or ``lowbit`` (a 4-bit copy of the FFN's own gate and up)."""
        return "lowbit" if any(isinstance(p, _LowBitLayer) for p in self._layers) else "lowrank"

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
        if isinstance(p, _LowBitLayer):
            return p.scores(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
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
            return SparsityRule("threshold", tuple(float(t) for t in self.rule["thresholds"]), self.rule.get("target_sparsity"),
                                self.rule.get("on", "h"))
        return SparsityRule(self.rule.get("kind", "relu"))

    def layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """(A [r, d], B [n, r], bias [n], threshold_logit) of one layer in fp32 (a trainer's starting point)."""
        p = self._layers[layer]
        if not isinstance(p, _Layer):
            raise LLMFlashError("a low-bit predictor set has no low-rank weights")
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
        """Weights (a low-bit set: its 4-bit codes) and biases."""
        return sum(self._macs(p) + self.d_ffn for p in self._layers)

    def _macs(self, p: _Layer | _LowBitLayer) -> int:
        if isinstance(p, _LowBitLayer):
            return p.n_rows * self.d_ffn * self.d_model
        return p.rank * (self.d_model + self.d_ffn)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of one token's predictions over all layers."""
        return sum(self._macs(p) for p in self._layers)

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
            if isinstance(p, _LowBitLayer):
                p.permute(idx)
                continue
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

    def save(self, path: str | Path, overwrite: bool = True, with_codes: bool = True) -> None:
        """Write PREDDIR atomically (fp16 weights + sidecar with the per-layer thresholds and stats). ``with_codes=False``
        (a low-bit set of a model alias): the sidecar alone, a recipe whose codes are derived from the model's weights
        at first use (``models.predictor_dir``): a small artifact to commit."""
        if not with_codes and self.kind != "lowbit":
            raise LLMFlashError("only a low-bit predictor set can be saved without its weights")
        from safetensors.torch import save_file

        tensors = {}
        for i, p in enumerate(self._layers):
            if isinstance(p, _LowBitLayer):
                if p.order is not None:
                    raise LLMFlashError("a low-bit predictor set with permuted outputs cannot be saved: save it before permute_outputs")
                codes, scales = p._stored()
                tensors[f"layers.{i}.codes"], tensors[f"layers.{i}.scales"] = codes.cpu(), scales.cpu()
                tensors[f"layers.{i}.bias"] = p.bias.float().cpu().contiguous()
                if p.act_bias is not None:
                    tensors[f"layers.{i}.act_bias"] = p.act_bias.float().cpu().contiguous()
                continue
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
        meta["weights_dtype"] = "uint4 codes, fp16 group scales" if self.kind == "lowbit" else "float16"
        meta["kind"] = self.kind
        if self.kind == "lowbit":  # a recipe keeps its pins here (a full set in its bias as well)
            meta["pinned"] = [self.pinned(i) for i in range(self.n_layers)]
        meta["threshold_logits"] = [p.threshold_logit for p in self._layers]
        if any(isinstance(p, _Layer) and p.down_bias is not None for p in self._layers):
            meta["hidden_activation"] = "relu"
        meta.pop("codes", None)
        meta.pop("weights_sha256", None)
        with atomic_dir(Path(path), overwrite=overwrite) as tmp:
            if with_codes:
                save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "model": self.model_name})
                meta["weights_sha256"] = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
            else:
                meta["codes"] = RECIPE
            (tmp / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
            for f in (WEIGHTS, SIDECAR) if with_codes else (SIDECAR,):
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
        if is_recipe(path):
            raise LLMFlashError(f"{path} is a low-bit recipe (its codes come from the model's weights): leave --predictors "
                                "out to use a model's default ones, or build full ones with `train-predictors --kind lowbit`")
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
            if meta.get("kind", "lowrank") == "lowbit":
                return cls(_lowbit_layers(tensors, meta, n, d, n_layers), meta, dtype)
            if meta.get("kind", "lowrank") != "lowrank":
                raise ValueError(f"unknown kind {meta.get('kind')!r}")
            layers: list[_Layer | _LowBitLayer] = []
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

    @classmethod
    def lowbit(cls, weights: Sequence[FFNWeights], activation: str, meta: dict, group_size: int = 64,
               on_act: bool = False, dtype: Optional[torch.dtype] = ENGINE_DTYPE) -> "PredictorSet":
        """A ``lowbit`` set from each layer's FFN weights (no data: thresholds start at 0, every neuron predicted;
        calibrate them with ``set_threshold_logit``). ``meta`` as for any set (model, d_model, d_ffn, rule, ...).
        ``dtype=None``: the codes alone (see ``__init__``'s ``convert``)."""
        if group_size not in LOWBIT_GROUPS:
            raise LLMFlashError(f"--group-size must be one of {', '.join(map(str, LOWBIT_GROUPS))}, not {group_size}")
        layers = []
        for w in weights:
            rows = w.up if w.gate is None else torch.cat([w.gate, w.up])
            codes, scales = quantize_lowbit(rows, group_size)
            layers.append(_LowBitLayer(codes, scales, torch.zeros(w.n_neurons), 0.0, group_size, activation,
                                       gated=w.gate is not None, on_act=on_act,
                                       act_bias=None if w.act_bias is None else w.act_bias.float().clone()))
        meta = {**meta, "kind": "lowbit", "bits": LOWBIT_BITS, "group_size": group_size, "activation": activation,
                "on_act": on_act}
        return cls(layers, meta, dtype or torch.float32, convert=dtype is not None)


def _lowbit_layers(tensors: dict[str, Tensor], meta: dict, n: int, d: int, n_layers: int) -> list[_Layer | _LowBitLayer]:
    group = int(meta["group_size"])
    if int(meta.get("bits", LOWBIT_BITS)) != LOWBIT_BITS or d % group:
        raise ValueError(f"{meta.get('bits')}-bit codes in groups of {group} do not fit d_model {d}")
    layers: list[_Layer | _LowBitLayer] = []
    for i in range(n_layers):
        codes, scales, bias = (tensors[f"layers.{i}.{k}"] for k in ("codes", "scales", "bias"))
        rows = codes.shape[0]
        if codes.dtype != torch.uint8 or codes.shape != (rows, d // 2) or rows not in (n, 2 * n) or scales.shape != (rows, d // group) \
                or bias.shape != (n,):
            raise ValueError(f"layer {i} has shapes {tuple(codes.shape)}, {tuple(scales.shape)}, {tuple(bias.shape)}")
        gated = rows == 2 * n
        ab = tensors.get(f"layers.{i}.act_bias")
        layers.append(_LowBitLayer(codes, scales.to(torch.float16), bias.float(), float(meta["threshold_logits"][i]),
                                   group, str(meta["activation"]), gated, bool(meta.get("on_act", False)),
                                   None if ab is None else ab.float()))
    return layers


def apply_recipe(recipe: dict, weights: Sequence[FFNWeights], activation: str,
                 dtype: Optional[torch.dtype] = torch.float32) -> "PredictorSet":
    """The low-bit set a recipe (a sidecar saved with ``with_codes=False``) describes, from the model's FFN weights: the
    same codes (the quantizer is deterministic), pins and thresholds; ``dtype=None``: the codes alone, to save."""
    meta = {k: v for k, v in recipe.items() if k not in ("codes", "weights_sha256")}
    pset = PredictorSet.lowbit(weights, activation, meta, int(recipe["group_size"]), bool(recipe.get("on_act", False)),
                               dtype=dtype)
    for layer, pins in enumerate(recipe.get("pinned") or []):
        pset.pin(layer, list(pins))
    for layer, t in enumerate(recipe["threshold_logits"]):
        pset.set_threshold_logit(layer, float(t))
    return pset

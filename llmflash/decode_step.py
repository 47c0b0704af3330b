"""A fixed decode step for Llama-family decoder layers on the CPU: the attention part of one token in native code.

transformers' decoder layer computes a decode step's attention in about 35 tensor operations (two norms, three
projections, the rotary embedding, the grouped attention, the output projection, two residual adds), each a few
microseconds of dispatch: on SmolLM2 (d = 576) about 0.3 ms per layer of which the arithmetic is a third. ``LayerStep``
replaces the layer's ``forward`` for one token (batch 1, float32, on the CPU) with two native calls around the
key/value cache's append, which stays transformers' own (``Cache.update``)::

    llmflash_attn_in:   xn = rmsnorm(x) * w_in;  q, k, v = Wq xn, Wk xn, Wv xn (+ biases);  rotary q, k
    cache.update(k, v)  -> every position's keys and values
    llmflash_attn_out:  o = softmax(q K^T * scaling) V per head (grouped);  h = x + Wo o (+ bias);
                        xn = rmsnorm(h) * w_post
    h + layer.mlp(xn)   (the engine's FFN module: dense, streamed or sparse)

Everything else goes through transformers' forward unchanged (the reference: ``EngineConfig.native_attention=False``):
a prefill's many tokens, other devices or dtypes, an attention mask (padding), layers whose attention has more than
these parts (Gemma's scaled norms, Qwen3's per-head norms, a sliding window), weights in a form the kernel does not
take. The projections may be float32 ``nn.Linear``, ``quant.Int8Linear`` (int8 rows, a scale each) or
``quant.QLinear`` (int8 / int4 group-quantized rows); their addresses are read when a layer is first stepped and
checked on every call (streamed layers view fixed slots: the addresses do not move). The result equals transformers'
within float32 rounding (the sums run in another order; ``tests/test_decode_step.py``).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .native import library
from .quant import Int8Linear, QLinear

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")  # decoder layers of exactly these parts (``_supported``)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # x * rsqrt(mean(x^2) + eps) * w, in float32


class LinearDesc(ctypes.Structure):
    """``step.cpp``'s ``LinearDesc``: where a projection's weight is and how it is stored."""

    _fields_ = [("kind", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("stride", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("group_size", ctypes.c_int64), ("m", ctypes.c_int64), ("k", ctypes.c_int64)]


def _f32(t: Optional[Tensor]) -> bool:
    return t is not None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def linear_desc(mod: nn.Module) -> Optional[LinearDesc]:
    """The kernel's description of a projection, or None where it cannot compute it."""
    bias = getattr(mod, "bias", None)
    if bias is not None and not _f32(bias):
        return None
    b = 0 if bias is None else bias.data_ptr()
    if type(mod) is nn.Linear:
        w = mod.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.stride(1) != 1:
            return None
        return LinearDesc(0, w.data_ptr(), 0, b, w.stride(0), 0, 0, w.shape[0], w.shape[1])
    if isinstance(mod, Int8Linear):
        q, s = mod.q, mod.scale
        if q.device.type != "cpu" or not q.is_contiguous() or not _f32(s):
            return None
        return LinearDesc(1, q.data_ptr(), s.data_ptr(), b, q.shape[1], 8, 0, q.shape[0], q.shape[1])
    if isinstance(mod, QLinear):
        rows = mod.rows
        if rows.device.type != "cpu" or rows.stride(1) != 1:
            return None
        return LinearDesc(2, rows.data_ptr(), 0, b, rows.stride(0), mod.bits, mod.group_size, mod.out_features,
                          mod.in_features)
    return None


def _norm_weight(norm: Any) -> Optional[tuple[Tensor, float]]:
    """(weight, eps) of an RMSNorm computed as transformers' LlamaRMSNorm (x * rsqrt(mean(x^2) + eps) * w)."""
    w = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if w is None or not _f32(w) or eps is None or type(norm).__name__ not in RMS_NORMS:
        return None
    return w, float(eps)


def _supported(config: Any, layer: Any) -> bool:
    attn = getattr(layer, "self_attn", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES or attn is None:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False  # (a window changes which keys a token sees)
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        return False
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return False
    return all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))


class LayerStep:
    """One decoder layer's ``forward`` with the native decode step in front of transformers' own."""

    def __init__(self, layer: Any, layer_idx: int, config: Any, lib: ctypes.CDLL,
                 threads: Callable[[], int]) -> None:
        self.layer = layer
        self.idx = layer_idx
        self.lib = lib
        self.threads = threads
        self.orig: Callable[..., Any] = layer.forward
        attn = layer.self_attn
        self.hd = int(attn.head_dim)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.d = int(config.hidden_size)
        self.scaling = float(attn.scaling)
        self.tuple_out: Optional[bool] = None  # transformers' layer returns a tuple (older versions) or a tensor
        self._descs: Optional[tuple] = None
        self._key: Optional[tuple] = None
        self.steps = 0  # decode steps taken natively (tests)

    def _prepared(self) -> Optional[tuple]:
        """The weights' descriptions and norms, refreshed when an address moved; None where one is not computable."""
        attn, layer = self.layer.self_attn, self.layer
        mods = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        key = tuple(_address(m) for m in mods) + (_address(layer.input_layernorm),
                                                   _address(layer.post_attention_layernorm))
        if key != self._key:
            self._key = key
            descs = [linear_desc(m) for m in mods]
            norms = (_norm_weight(layer.input_layernorm), _norm_weight(layer.post_attention_layernorm))
            ok = all(d is not None for d in descs) and all(n is not None for n in norms)
            self._descs = (tuple(ctypes.pointer(d) for d in descs if d is not None), norms) if ok else None
        return self._descs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hidden: Any = args[0] if args else kwargs.get("hidden_states")
        cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
        pe: Any = kwargs.get("position_embeddings")
        fast = (len(args) <= 1 and isinstance(hidden, Tensor) and hidden.shape[:-1] == (1, 1)
                and hidden.dtype == torch.float32 and hidden.device.type == "cpu" and self.tuple_out is not None
                and kwargs.get("attention_mask") is None and cache is not None and hasattr(cache, "update")
                and isinstance(pe, tuple) and len(pe) == 2 and not torch.is_grad_enabled())
        prepared = self._prepared() if fast else None
        if prepared is None:
            out = self.orig(*args, **kwargs)
            self.tuple_out = isinstance(out, tuple)
            return out
        (wq, wk, wv, wo), ((w_in, eps_in), (w_post, eps_post)) = prepared
        cos, sin = (t.reshape(-1) for t in pe)
        if cos.numel() != self.hd or cos.dtype != torch.float32:
            return self.orig(*args, **kwargs)
        cos, sin = cos.contiguous(), sin.contiguous()
        x = hidden.reshape(self.d).contiguous()
        nt = self.threads()
        xn = torch.empty(self.d)
        q = torch.empty(self.n_heads * self.hd)
        k = torch.empty(self.n_kv * self.hd)
        v = torch.empty(self.n_kv * self.hd)
        rc = self.lib.llmflash_attn_in(x.data_ptr(), self.d, w_in.data_ptr(), eps_in, wq, wk, wv, cos.data_ptr(),
                                       sin.data_ptr(), self.hd, self.n_heads, self.n_kv, xn.data_ptr(), q.data_ptr(),
                                       k.data_ptr(), v.data_ptr(), nt)
        if rc != 0:
            raise RuntimeError(f"llmflash_attn_in failed ({rc})")
        keys, values = cache.update(k.view(1, self.n_kv, 1, self.hd), v.view(1, self.n_kv, 1, self.hd), self.idx)
        if keys.dtype != torch.float32 or keys.stride(-1) != 1 or values.stride() != keys.stride():
            keys, values = keys.float().contiguous(), values.float().contiguous()
        h = torch.empty(self.d)
        xn2 = torch.empty(self.d)
        rc = self.lib.llmflash_attn_out(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.shape[-2],
                                        keys.stride(1), keys.stride(2), self.hd, self.n_heads, self.n_kv, self.scaling,
                                        wo, x.data_ptr(), self.d, w_post.data_ptr(), eps_post, h.data_ptr(),
                                        xn2.data_ptr(), nt)
        if rc != 0:
            raise RuntimeError(f"llmflash_attn_out failed ({rc})")
        self.steps += 1
        out = h.view(1, 1, self.d) + self.layer.mlp(xn2.view(1, 1, self.d))
        return (out,) if self.tuple_out else out


def _address(mod: Any) -> int:
    """The data address of a module's weight (what ``linear_desc`` / ``_norm_weight`` read), 0 if it has none."""
    for name in ("weight", "q", "rows"):
        t = getattr(mod, name, None)
        if isinstance(t, Tensor):
            return t.data_ptr()
    return 0


def install(model: Any, layers: list[Any], threads: Callable[[], int]) -> list[LayerStep]:
    """Put ``LayerStep`` in front of every supported decoder layer's ``forward`` (``threads``: the native calls'
    thread count, asked per call); none where the native library does not load. Returns the steps installed."""
    config = model.config
    if not layers or not _supported(config, layers[0]):
        return []
    lib = library()
    if lib is None:
        return []
    steps = []
    for i, layer in enumerate(layers):
        if not _supported(config, layer):
            continue
        step = LayerStep(layer, i, config, lib, threads)
        layer.forward = step  # (an instance attribute: nn.Module.__call__ still runs the layer's hooks around it)
        steps.append(step)
    log.debug("native decode step on %d of %d layers", len(steps), len(layers))
    return steps

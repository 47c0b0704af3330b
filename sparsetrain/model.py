"""A compact Llama (SmolLM2-style: RMSNorm, RoPE, GQA, gated FFN, tied embeddings) for fast sparsity training.

gpt-fast style: flat modules, fixed shapes, no cache logic in training, so ``torch.compile`` sees one clean graph. It
loads the weights of a Hugging Face ``LlamaForCausalLM`` (``from_hf``) and computes the same function (tested against
transformers in tests/test_sparsetrain.py).

The FFN of layer l (``SparseFFN``)::

    z = gate(x) + act_bias          # act_bias: learned per-neuron shift (ReLU arm), zeros otherwise
    a = act(z)                      # silu (SiLU arm) or relu (ReLU arm; blended with silu(gate x) while annealing)
    h = a * up(x)                   # [B, T, n]
    h = h * (|h| > t_l)             # the threshold rule in the loop (t_l a per-layer buffer the trainer moves)
                                    # (rule on "act": h * (|a| > t_l), CATS-style: the gate projection alone decides)
    h = h * m                       # gated arm only: m = [gate(x) >= c_l], a low-rank predictor in the loop
    y = down(h)

Neurons under the threshold get no gradient through ``h`` (straight-through on the kept ones); the trainer keeps t_l
at the quantile of |h| that gives the scheduled sparsity. At inference the same rule with the final t_l is exactly
llmflash's ``threshold`` sparsity rule (``ffn.neuron_outputs``).

The gated arm (``Gate``): a low-rank predictor z = B(A x) + b (llmflash's ``LowRankPredictor`` shape) decides which
neurons the FFN may use at all; the mask is hard in the forward pass and straight-through in the backward pass
(the gradient of sigmoid((z - c_l) / temperature)). The trainer keeps c_l at the quantile of z that lets the scheduled
fraction of neurons through. The predictor is then part of the model: the neurons it does not select are never read,
so recall is 1 by construction and the bytes read per token are the gate's fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    vocab: int
    rope_theta: float
    eps: float

    @classmethod
    def from_hf_config(cls, cfg) -> "Shape":
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                   cfg.intermediate_size, cfg.vocab_size, theta, float(cfg.rms_norm_eps))

    def params(self) -> dict[str, int]:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.d_model * self.d_ffn
        return {"attention": attn * self.n_layers, "ffn": ffn * self.n_layers, "embedding": self.vocab * self.d_model}

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: 2 x the matmul weights (layers + tied head) + attention scores (causal, half)."""
        p = self.params()
        attn_scores = 2 * 2 * self.n_layers * self.n_heads * self.head_dim * seq_len // 2
        return 2 * (p["attention"] + p["ffn"] + p["embedding"]) + attn_scores


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(shape: Shape, seq_len: int, device) -> tuple[Tensor, Tensor]:
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, device=device, dtype=torch.float32) / shape.head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def _sdpa_has_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


# grouped-query attention inside the SDPA kernel (torch >= 2.5) instead of repeated k/v: off, because on the H200
# (torch 2.11, cuDNN attention) it measured slower than the repeat (124k against 158k tokens/s, sparsetrain.bench)
SDPA_GQA = False


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LoRA(nn.Module):
    """A trainable low-rank delta ``B @ A`` (B starts at zero) for a frozen linear map of shape [out, in]."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def delta(self) -> Tensor:
        return (self.B @ self.A) * self.scale  # [out, in]


class Attention(nn.Module):
    def __init__(self, shape: Shape, lora_rank: int = 0) -> None:
        super().__init__()
        s = shape
        self.s = s
        self.q_proj = nn.Linear(s.d_model, s.n_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.d_model, bias=False)
        self.lora = nn.ModuleDict()
        if lora_rank:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(self, name)
                self.lora[name] = LoRA(lin.in_features, lin.out_features, lora_rank)

    def _proj(self, name: str, x: Tensor) -> Tensor:
        y = getattr(self, name)(x)
        return y + self.lora[name](x) if name in self.lora else y

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape  # x [B, T, d]
        s = self.s
        q = self._proj("q_proj", x).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self._proj("k_proj", x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self._proj("v_proj", x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if s.n_kv_heads != s.n_heads and SDPA_GQA:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, hd]
        else:
            if s.n_kv_heads != s.n_heads:
                rep = s.n_heads // s.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return self._proj("o_proj", o.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim))


class Gate(nn.Module):
    """The gated arm's predictor in the loop: z = up(down(x)) [..., n]; neurons with z >= cut may be used."""

    def __init__(self, d_model: int, d_ffn: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_ffn, bias=True)
        self.register_buffer("cut", torch.zeros(()), persistent=True)
        self.register_buffer("temperature", torch.ones(()), persistent=True)
        self.ste = True  # straight-through gradient to the gate from the task loss (False: the mask is a constant)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # [..., d] -> [..., r] -> [..., n]

    def mask(self, z: Tensor) -> Tensor:
        """Hard 0/1 forward, straight-through sigmoid backward: [..., n] in z's dtype."""
        hard = (z >= self.cut.to(z.dtype)).to(z.dtype)
        if not self.ste:
            return hard.detach()
        soft = torch.sigmoid((z - self.cut.to(z.dtype)) / self.temperature.to(z.dtype))
        return hard + (soft - soft.detach())


class SparseFFN(nn.Module):
    """The gated FFN with the threshold rule in the loop (see the module docstring)."""

    def __init__(self, shape: Shape, act: str = "silu", sparse: bool = False) -> None:
        super().__init__()
        if act not in ("silu", "relu"):
            raise ValueError(f"act must be silu or relu, not {act!r}")
        self.act = act
        self.sparse = sparse
        self.gate_proj = nn.Linear(shape.d_model, shape.d_ffn, bias=False)
        self.up_proj = nn.Linear(shape.d_model, shape.d_ffn, bias=False)
        self.down_proj = nn.Linear(shape.d_ffn, shape.d_model, bias=False)
        self.act_bias = nn.Parameter(torch.zeros(shape.d_ffn), requires_grad=act == "relu")
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.register_buffer("silu_mix", torch.zeros(()), persistent=True)  # ReLU arm: blend while annealing
        self.gate: Gate | None = None  # the gated arm's predictor (``add_gate``)
        self.rule_on = "h"  # what the threshold compares: "h" (|act(z) * up x|) or "act" (|act(z)|: z decides alone)

    def add_gate(self, rank: int) -> Gate:
        self.gate = Gate(self.gate_proj.in_features, self.gate_proj.out_features, rank).to(self.gate_proj.weight.device)
        return self.gate

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, d] -> (y [B, T, d], the rule's score before the rule [B, T, n]: h, or a when ``rule_on`` is act)."""
        g = self.gate_proj(x)
        if self.act == "relu":
            a = F.relu(g + self.act_bias.to(g.dtype))
            a = a + self.silu_mix.to(g.dtype) * (F.silu(g) - a)
        else:
            a = F.silu(g)
        h = a * self.up_proj(x)
        score = a if self.rule_on == "act" else h
        kept = h * (score.abs() > self.threshold.to(h.dtype)) if self.sparse else h
        if self.sparse and self.gate is not None:
            kept = kept * self.gate.mask(self.gate(x).to(h.dtype))
        return self.down_proj(kept), score


class Block(nn.Module):
    def __init__(self, shape: Shape, act: str, sparse: bool, lora_rank: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.d_model, shape.eps)
        self.self_attn = Attention(shape, lora_rank)
        self.post_attention_layernorm = RMSNorm(shape.d_model, shape.eps)
        self.mlp = SparseFFN(shape, act, sparse)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        f_in = self.post_attention_layernorm(x)
        y, h = self.mlp(f_in)
        return x + y, y, h, f_in


Output = tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]
"""(hidden [B, T, d] after the final norm, per layer: FFN output [B, T, d], the rule's score before the rule [B, T, n] (h, or a), FFN input
[B, T, d] after the post-attention norm). A tuple, not a dataclass, so that ``torch.compile`` returns it as is."""


class CompactLlama(nn.Module):
    def __init__(self, shape: Shape, act: str = "silu", sparse: bool = False, lora_rank: int = 0,
                 max_seq_len: int = 4096) -> None:
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab, shape.d_model)
        self.layers = nn.ModuleList(Block(shape, act, sparse, lora_rank) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.d_model, shape.eps)
        cos, sin = rope_tables(shape, max_seq_len, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: Tensor, collect: bool = True) -> Output:
        """ids [B, T] -> the final hidden states and, with ``collect``, every layer's FFN output, h and input."""
        x = self.embed_tokens(ids)
        outs, hs, ins = [], [], []
        for layer in self.layers:
            x, y, h, f_in = layer(x, self.cos, self.sin)
            if collect:
                outs.append(y)
                hs.append(h)
                ins.append(f_in)
        return self.norm(x), outs, hs, ins

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed_tokens.weight.to(hidden.dtype))

    def ffns(self) -> list[SparseFFN]:
        return [layer.mlp for layer in self.layers]  # type: ignore[misc]

    def set_rule(self, on: str) -> None:
        """What every layer's threshold compares: "h" (the product, the default) or "act" (the activation alone)."""
        if on not in ("h", "act"):
            raise ValueError(f"rule_on must be h or act, not {on!r}")
        for ffn in self.ffns():
            ffn.rule_on = on

    def rule_on(self) -> str:
        return self.ffns()[0].rule_on

    def set_thresholds(self, values: list[float] | Tensor) -> None:
        for ffn, v in zip(self.ffns(), values):
            ffn.threshold.fill_(float(v))

    def thresholds(self) -> list[float]:
        return [float(f.threshold) for f in self.ffns()]


HF_RENAMES = (("model.embed_tokens.", "embed_tokens."), ("model.layers.", "layers."), ("model.norm.", "norm."))


def from_hf(hf_model: nn.Module, act: str = "silu", sparse: bool = False, lora_rank: int = 0,
            max_seq_len: int = 4096) -> CompactLlama:
    """A ``CompactLlama`` with the weights of a Hugging Face Llama-family causal LM (tied embeddings)."""
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral"):
        raise ValueError(f"the compact trainer supports Llama-family models, not {cfg.model_type!r}")
    model = CompactLlama(Shape.from_hf_config(cfg), act, sparse, lora_rank, max_seq_len)
    state = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight":
            continue
        for old, new in HF_RENAMES:
            if k.startswith(old):
                state[new + k[len(old):]] = v.detach().float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m.endswith(("act_bias", "threshold", "silu_mix")) or ".lora." in m)]
    if missing or unexpected:
        raise ValueError(f"weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def hf_state(model: CompactLlama) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names (LoRA deltas merged; act_bias kept under ``mlp.act_bias``)."""
    out = {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(attn, name).weight.detach().float()
            if name in attn.lora:
                w = w + attn.lora[name].delta().detach().float()
            out[f"model.layers.{i}.self_attn.{name}.weight"] = w
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"model.layers.{i}.mlp.{name}.weight"] = getattr(layer.mlp, name).weight.detach().float()
        out[f"model.layers.{i}.mlp.act_bias"] = layer.mlp.act_bias.detach().float()
        out[f"model.layers.{i}.input_layernorm.weight"] = layer.input_layernorm.weight.detach().float()
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach().float()
    out["model.norm.weight"] = model.norm.weight.detach().float()
    out["model.embed_tokens.weight"] = model.embed_tokens.weight.detach().float()
    return out


def load_hf_state(model: CompactLlama, state: dict[str, Tensor]) -> None:
    """Inverse of ``hf_state`` for a model without LoRA (used to rebuild a model from an applied artifact)."""
    own = {}
    for k, v in state.items():
        for old, new in HF_RENAMES:
            if k.startswith(old):
                own[new + k[len(old):]] = v
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [m for m in missing if not (m.endswith(("threshold", "silu_mix", "act_bias")) or ".lora." in m)]
    if missing or unexpected:
        raise ValueError(f"weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")

"""Text sampled from the original model: batched generation with a static KV cache (``CompactLlama`` weights).

Prompts are token-id lists (built on the CPU by ``data.build_prompts``), left-padded per batch; each row attends only
to its own tokens. Sampling is temperature + nucleus (top-p); a row stops at EOS. Eager PyTorch: each decode step is
a few hundred small launches whatever the batch, so large batches (thousands of rows) give the throughput.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import Tensor

from .model import CompactLlama, _rotate_half

log = logging.getLogger(__name__)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, H, Tq, hd], k/v [B, Hkv, L, hd], mask [B, 1, Tq, L] bool -> [B, H, Tq, hd] (GQA without copies)."""
    B, H, Tq, hd = q.shape
    hkv = k.shape[1]
    qg = q.reshape(B, hkv, H // hkv * Tq, hd)
    scores = (qg @ k.transpose(-1, -2)).float() / hd**0.5  # [B, Hkv, rep*Tq, L]
    scores = scores.reshape(B, hkv, H // hkv, Tq, -1).masked_fill(~mask.unsqueeze(1), float("-inf"))
    p = scores.softmax(-1).to(v.dtype).reshape(B, hkv, H // hkv * Tq, -1)
    return (p @ v).reshape(B, H, Tq, hd)


@torch.no_grad()
def _forward(model: CompactLlama, x_ids: Tensor, pos: Tensor, cache_k: list[Tensor], cache_v: list[Tensor],
             start: int, key_valid: Tensor) -> Tensor:
    """Run ids [B, T] at cache slots [start, start + T) with positions pos [B, T]; returns logits of the last token."""
    s = model.shape
    B, T = x_ids.shape
    x = model.embed_tokens(x_ids)
    cos = model.cos[pos].unsqueeze(1).to(x.dtype)  # [B, 1, T, hd]
    sin = model.sin[pos].unsqueeze(1).to(x.dtype)
    L = start + T
    causal = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(diagonal=start)
    mask = causal.unsqueeze(0) & key_valid[:, None, :L]  # [B, T, L]
    mask = mask | ~mask.any(-1, keepdim=True)  # a padding query (no valid key) attends anywhere: its output is unused
    mask = mask.unsqueeze(1)
    new_valid = key_valid[:, start:L].view(B, 1, T, 1)
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        hx = layer.input_layernorm(x)
        q = a._proj("q_proj", hx).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = a._proj("k_proj", hx).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = a._proj("v_proj", hx).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        cache_k[i][:, :, start:L] = k * new_valid  # padding keys/values stay zero (finite)
        cache_v[i][:, :, start:L] = v * new_valid
        o = _attend(q, cache_k[i][:, :, :L], cache_v[i][:, :, :L], mask)
        x = x + a._proj("o_proj", o.transpose(1, 2).reshape(B, T, -1))
        y, _ = layer.mlp(layer.post_attention_layernorm(x))
        x = x + y
    return model.logits(model.norm(x[:, -1]))  # [B, V]


def _sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        choice = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)
        return si.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: CompactLlama, prompts: list[list[int]], max_new_tokens: int, eos_id: int, batch_size: int = 1024,
             temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, time_budget_s: Optional[float] = None,
             pad_id: int = 0) -> list[list[int]]:
    """Prompt + continuation (up to and including EOS) for each prompt, in the prompts' order.

    Prompts are processed longest first; with ``time_budget_s`` generation stops after the batch that passes it and
    the prompts not reached are left out of the result (their entries are empty lists).
    """
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    s = model.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for b0 in range(0, len(order), batch_size):
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            log.info("generation stopped by its time budget after %d of %d prompts", b0, len(order))
            break
        idx = order[b0 : b0 + batch_size]
        B = len(idx)
        P = max(len(prompts[i]) for i in idx)
        L = P + max_new_tokens
        ids = torch.full((B, P), pad_id, dtype=torch.long)
        valid = torch.zeros(B, L, dtype=torch.bool)
        pad = torch.zeros(B, dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, P - len(p):] = torch.tensor(p)
            valid[r, P - len(p):] = True
            pad[r] = P - len(p)
        ids, valid, pad = ids.to(device), valid.to(device), pad.to(device)
        pos = (torch.arange(P, device=device).unsqueeze(0) - pad.unsqueeze(1)).clamp_min(0)
        cache_k = [torch.zeros(B, s.n_kv_heads, L, s.head_dim, dtype=dtype, device=device) for _ in range(s.n_layers)]
        cache_v = [torch.zeros_like(c) for c in cache_k]
        logits = _forward(model, ids, pos, cache_k, cache_v, 0, valid)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        new = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            tok = _sample(logits, temperature, top_p, gen)
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            new[:, t] = torch.where(done, torch.full_like(tok, -1), tok)
            done = done | (tok == eos_id)
            if t % 32 == 31 and bool(done.all()):
                break
            if t + 1 == max_new_tokens:
                break
            step_pos = (P + t - pad).unsqueeze(1)
            logits = _forward(model, tok.unsqueeze(1), step_pos, cache_k, cache_v, P + t, valid)
        new_cpu = new.cpu()
        for r, i in enumerate(idx):
            cont = [int(v) for v in new_cpu[r].tolist() if v >= 0]
            out[i] = list(prompts[i]) + cont
        del cache_k, cache_v
    return out

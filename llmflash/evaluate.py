"""Perplexity of an in-memory model under a sparsity rule (and optionally a predictor mask)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import adapter_for, install_dense_ffns
from .ffn import MaskFn, SparsityRule
from .sparsity import ActiveCounter
from .text import token_stream, windows


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, docs: list[str], *, seq_len: int = 512, max_tokens: Optional[int] = 8192,
    rule: SparsityRule = SparsityRule(), mask_fn: Optional[MaskFn] = None, bos: bool = False, progress: bool = True,
) -> dict:
    """Token-level perplexity over non-overlapping windows, with FFN active fractions.

    The model's FFNs are replaced (in place) by ``DenseFFN`` modules applying ``rule`` and ``mask_fn``.
    """
    n_layers = adapter_for(model.config).ffn_spec(model.config).n_layers
    counter = ActiveCounter(n_layers)
    install_dense_ffns(model, rule, observer=counter, mask_fn=mask_fn)
    stream = token_stream(tokenizer, docs, max_tokens=max_tokens, bos=bos)
    nll, count = 0.0, 0
    for ids in tqdm(list(windows(stream, seq_len)), desc="perplexity", disable=not progress):
        logits = model(ids).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return {
        "ppl": math.exp(nll / max(count, 1)),
        "tokens": count,
        "ffn_active_fraction": counter.overall(),
        "per_layer_active_fraction": counter.per_layer(),
    }

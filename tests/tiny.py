"""Tiny random models built from transformers configs (no downloads), for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

VOCAB = 256


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens (id = byte value); id 0 doubles as BOS/EOS."""
    vocab = {chr(b) if 32 <= b < 127 else f"<{b}>": b for b in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<0>", eos_token="<0>", unk_token="<0>")
    return fast


def tiny_llama(seed: int = 0, relu: bool = False, layers: int = 3, d_model: int = 64, d_ffn: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=d_model, intermediate_size=d_ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        hidden_act="relu" if relu else "silu", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, layers: int = 3, d_model: int = 64, d_ffn: int = 256) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=d_model, ffn_dim=d_ffn, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=d_model, activation_function="relu",
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero: make them count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def save_tiny(model, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


TINY_MODELS = {  # the tiny models the engine tests convert: a ReLU llama (gated FFN), OPT (plain FFN, biases), SiLU
    "llama": lambda: tiny_llama(relu=True, d_model=128, d_ffn=384),
    "opt": lambda: tiny_opt(d_model=128, d_ffn=384),
    "silu": lambda: tiny_llama(seed=1, d_model=128, d_ffn=384),
}


def save_tiny_models(root: Path, names: tuple[str, ...] = ("llama", "opt")) -> dict[str, Path]:
    """{name: model directory} of ``TINY_MODELS`` saved under ``root``."""
    return {name: save_tiny(TINY_MODELS[name](), Path(root) / name) for name in names}


def engine_generate(path, prompt: torch.Tensor, n: int, budget: float = 8.0, **config):
    """One engine's greedy generation of ``n`` tokens (``EngineConfig(dram_budget=budget, **config)``), closed after."""
    from llmflash.engine import Engine, EngineConfig

    e = Engine(path, EngineConfig(dram_budget=budget, **config))
    try:
        return e.generate(prompt, n, stop_at_eos=False)
    finally:
        e.close()


def engine_perplexity(path, ids: torch.Tensor, budget: float = 8.0, **config) -> float:
    """Perplexity of ``ids`` scored token by token through one engine, closed after."""
    import math

    from llmflash.engine import Engine, EngineConfig

    e = Engine(path, EngineConfig(dram_budget=budget, **config))
    try:
        return math.exp(-float(e.score(ids).double().mean()))
    finally:
        e.close()


def engine_score_and_generate(path, ids: torch.Tensor, budget: float = 8.0, prompt_tokens: int = 8, n: int = 12,
                              **config):
    """One engine's log-probabilities of ``ids`` (token by token) and its greedy tokens after ``ids[:prompt_tokens]``;
    returns (log-probabilities, tokens, the closed engine)."""
    from llmflash.engine import Engine, EngineConfig

    e = Engine(path, EngineConfig(dram_budget=budget, **config))
    try:
        lp = e.score(ids)
        tokens = e.generate(ids[:prompt_tokens], n, stop_at_eos=False).tokens
    finally:
        e.close()
    return lp, tokens, e

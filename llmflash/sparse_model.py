"""Sparse-model artifacts: a trained sparse version of a base model, stored as small deltas on top of it.

A directory written by ``write_artifact`` (format ``llmflash-sparse/1``)::

    sparse_model.json             format, base model, activation, per-layer thresholds, the delta encoding, file list,
                                  and the training run's record (tokens, tokens/s, data mix, held-out results)
    deltas-KKKKK-of-NNNNN.safetensors
        model.layers.L.mlp.{gate,up,down}_proj.weight.q4     uint8 [out, in / 2]: int4 delta codes, two per byte
        model.layers.L.mlp.{gate,up,down}_proj.weight.scale  float16 [out, in / group]: per-group scale
        model.layers.L.self_attn.{q,k,v,o}_proj.weight.lora_A / .lora_B   float16: a low-rank delta B @ A
            (or int8 factors with per-row float16 scales ``.lora_A.scale`` [r] and ``.lora_B.scale`` [out])
        model.layers.L.{input,post_attention}_layernorm.weight, model.norm.weight   float32: replaced outright
        model.layers.L.mlp.act_bias                           float32 [n]: the ReLU arm's per-neuron shift

The int4 delta of a weight W (rows = output features) is ``(code - 8) * scale`` per group of ``group`` consecutive
inputs; the applied weight is ``W_base + delta`` in float32, so the artifact reproduces the trained model up to the
delta's rounding (the training record reports the perplexity of the applied model, which is what ships).

The FFN of the applied model is ``down(h * (|h| > t_l))`` with ``h = act(gate x + act_bias) * up x``: llmflash's
``threshold`` sparsity rule with the artifact's own thresholds (``SparseMLP``; ``arch`` adapters read ``act_bias``
and the engine takes ``thresholds``).

A gated artifact (trained with its predictors in the loop: ``sparsetrain.gated``) adds ``gate/``, a low-rank predictor
set (``llmflash-predictors/1``) that is part of the model: ``h = h * (|h| > t_l) * [gate_l(x) >= c_l]``. The gate is
always computed in the engine's form (int8 weight-only, ``predictor.ENGINE_DTYPE``) so that every path takes the same
decisions; a flash directory converted from the model carries a copy (``GATE_DIR``) and the model's rule names it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LLMFlashError
from .ffn import MaskFn
from .paths import atomic_dir
from .predictor import ENGINE_DTYPE, PredictorSet

log = logging.getLogger(__name__)

FORMAT = "llmflash-sparse/1"
CONFIG_FILE = "sparse_model.json"
GATE_DIR = "gate"
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
ENCODED_SUFFIXES = (".q4", ".scale", ".lora_A", ".lora_B")  # parts of an encoded delta: the weight name + suffix


def quantize_int4(delta: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """delta [out, in] (in % group == 0) -> (codes uint8 [out, in / 2], scales float16 [out, in / group])."""
    out_f, in_f = delta.shape
    if in_f % group or group % 2:
        raise ValueError(f"input size {in_f} is not a multiple of the group {group}")
    g = delta.float().reshape(out_f, in_f // group, group)
    scale = (g.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-12).half()
    codes = (torch.round(g / scale.float()).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return packed, scale.reshape(out_f, in_f // group).contiguous()


def dequantize_int4(packed: Tensor, scale: Tensor) -> Tensor:
    """Inverse of ``quantize_int4`` (up to rounding): float32 [out, in]."""
    out_f, half = packed.shape
    codes = torch.empty(out_f, half * 2, dtype=torch.uint8, device=packed.device)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    n_groups = scale.shape[1]
    vals = (codes.float() - 8.0).reshape(out_f, n_groups, -1)
    return (vals * scale.float().unsqueeze(-1)).reshape(out_f, half * 2)


def encode_deltas(base: dict[str, Tensor], trained: dict[str, Tensor], lora: dict[str, tuple[Tensor, Tensor]],
                  n_layers: int, group: int = 64) -> dict[str, Tensor]:
    """The artifact's tensors: int4 FFN deltas, fp16 LoRA factors for attention, norms and act_bias outright.

    ``base`` and ``trained`` are Hugging Face state dicts (float32); ``lora`` maps an attention weight name to its
    (A [r, in], B [out, r]) factors (the trained attention weight is base + B @ A).
    """
    out: dict[str, Tensor] = {}
    for i in range(n_layers):
        for name in FFN_NAMES:
            key = f"model.layers.{i}.mlp.{name}.weight"
            q, s = quantize_int4(trained[key].float() - base[key].float(), group)
            out[key + ".q4"], out[key + ".scale"] = q, s
        for name in ATTN_NAMES:
            key = f"model.layers.{i}.self_attn.{name}.weight"
            if key in lora:
                a, b = lora[key]
                out[key + ".lora_A"], out[key + ".lora_B"] = a.half().contiguous(), b.half().contiguous()
        for name in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{name}.weight"
            out[key] = trained[key].float().contiguous()
        bias = trained.get(f"model.layers.{i}.mlp.act_bias")
        if bias is not None and bool(bias.abs().max() > 0):
            out[f"model.layers.{i}.mlp.act_bias"] = bias.float().contiguous()
    out["model.norm.weight"] = trained["model.norm.weight"].float().contiguous()
    return out


def quantize_int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [rows, cols] -> (int8 codes [rows, cols], float16 per-row scales [rows]): symmetric, x ~ codes * scale."""
    scale = (x.float().abs().amax(-1) / 127.0).clamp_min(1e-12).half()
    return torch.round(x.float() / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8).contiguous(), scale


def lora_factors(tensors: dict[str, Tensor], w: str) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) in float32 of weight ``w``'s low-rank delta B @ A: float16 factors, or int8 ones with
    per-row scales (``w.lora_A.scale`` [r], ``w.lora_B.scale`` [out])."""
    factors = []
    for part in (".lora_A", ".lora_B"):
        v = tensors[w + part]
        factors.append(v.float() * tensors[w + part + ".scale"].float().unsqueeze(-1) if v.dtype == torch.int8
                       else v.float())
    return factors[0], factors[1]


def lora_rank(tensors: dict[str, Tensor]) -> int:
    """The rank of an artifact's attention LoRA (0 without one)."""
    return next((int(v.shape[0]) for k, v in tensors.items() if k.endswith(".lora_A")), 0)


def decode_deltas(base: dict[str, Tensor], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply an artifact's tensors to a base state dict: the trained weights (float32), act_bias included."""
    state = {k: v.float().clone() for k, v in base.items()}
    for key, value in tensors.items():
        if key.endswith(".q4"):
            w = key[: -len(".q4")]
            state[w] = state[w] + dequantize_int4(value, tensors[w + ".scale"]).to(state[w].device)
        elif key.endswith(".lora_A"):
            w = key[: -len(".lora_A")]
            a, b = lora_factors(tensors, w)
            state[w] = state[w] + b @ a
        elif key.endswith((".scale", ".lora_B")):
            continue
        else:
            state[key] = value.float().clone()
    return state


def _shard_names(n: int) -> list[str]:
    return [f"deltas-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def write_artifact(out_dir: Path, tensors: dict[str, Tensor], config: dict, n_layers: int, shards: int = 4,
                   overwrite: bool = True) -> Path:
    """Write ``tensors`` (from ``encode_deltas``) in ``shards`` files split by layer, and ``sparse_model.json``."""
    from safetensors.torch import save_file

    names = _shard_names(shards)
    per = -(-n_layers // shards)
    groups: list[dict[str, Tensor]] = [{} for _ in range(shards)]
    for key, value in tensors.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else n_layers - 1
        groups[min(layer // per, shards - 1)][key] = value.detach().cpu().contiguous()
    cfg = dict(config, format=FORMAT, files=names)
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        for name, group in zip(names, groups):
            save_file(group, str(tmp / name), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    return Path(out_dir)


def read_artifact(art_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of an artifact directory; one-line errors for a missing or foreign directory."""
    from safetensors.torch import load_file

    art_dir = Path(art_dir)
    cfg_path = art_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise LLMFlashError(f"{art_dir} is not a sparse-model artifact (no {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as err:
        raise LLMFlashError(f"{cfg_path} is not valid JSON ({err}); restore it from git") from None
    if cfg.get("format") != FORMAT:
        raise LLMFlashError(f"{cfg_path} has format {cfg.get('format')!r}, expected {FORMAT!r}")
    for key in ("activation", "thresholds", "n_layers", "files"):
        if key not in cfg:
            raise LLMFlashError(f"{cfg_path} lacks {key!r}; restore it from git")
    tensors: dict[str, Tensor] = {}
    for name in cfg["files"]:
        path = art_dir / name
        if not path.is_file():
            raise LLMFlashError(f"{path} is missing; restore it from git (git lfs is not used)")
        try:
            tensors.update(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a corrupt file
            raise LLMFlashError(f"{path} is unreadable ({str(err).splitlines()[0][:120]}); restore it from git") from None
    return cfg, tensors


class SparseMLP(nn.Module):
    """A gated FFN with a per-neuron shift and the threshold rule: ``down(h * (|h| > t))``, ``h = act(gate x + b) * up x``.

    Keeps a Llama MLP's attribute names (``gate_proj``, ``up_proj``, ``down_proj``) plus ``act_bias`` [n] and
    ``threshold`` (a float), which ``arch.LlamaAdapter`` reads.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, activation: str,
                 act_bias: Optional[Tensor], threshold: float, gate: Optional[MaskFn] = None, layer: int = 0,
                 rule_on: str = "h") -> None:
        super().__init__()
        self.gate = gate  # a gated model: (layer, x, h) -> keep mask
        self.layer = layer
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation
        n = gate_proj.weight.shape[0]
        bias = act_bias if act_bias is not None else torch.zeros(n)
        self.act_bias = nn.Parameter(bias.to(gate_proj.weight.dtype).clone(), requires_grad=False)
        self.threshold = float(threshold)
        self.rule_on = rule_on  # what the threshold compares: "h" or "act" (|act(gate x + b)| alone)

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x) + self.act_bias.to(x.dtype)
        a = F.silu(g) if self.activation == "silu" else F.relu(g)
        h = a * self.up_proj(x)
        if self.threshold > 0:
            h = h * ((a if self.rule_on == "act" else h).abs() > self.threshold)
        if self.gate is not None:
            h = h * self.gate(self.layer, x, h)
        return self.down_proj(h)


def load_gate(path: Path) -> "GateMask":
    """The gate of a gated model (a predictor set directory), in the form every path computes it."""
    return GateMask(PredictorSet.load(path, dtype=ENGINE_DTYPE))


class GateMask:
    """A gated model's gate as a ``MaskFn``: (layer, x [..., d], h) -> bool [..., n], the neurons it lets through."""

    def __init__(self, predictors: PredictorSet) -> None:
        self.p = predictors

    def __call__(self, layer: int, x: Tensor, h: Optional[Tensor] = None) -> Tensor:
        return self.p.predict(layer, x)


def apply_artifact(model: Any, art_dir: Path) -> Any:
    """Turn an in-memory base model (Hugging Face Llama, float32) into the artifact's sparse model, in place."""
    cfg, tensors = read_artifact(art_dir)
    layers = list(model.model.layers)
    if len(layers) != cfg["n_layers"]:
        raise LLMFlashError(f"{art_dir} was trained for {cfg['n_layers']} layers, the base model has {len(layers)}")
    base = model.state_dict()
    touched = {k.rsplit(".", 1)[0] if k.endswith(ENCODED_SUFFIXES) else k for k in tensors}  # the weights replaced
    state = decode_deltas({k: base[k] for k in touched if k in base}, tensors)
    biases = {int(k.split(".")[2]): v for k, v in state.items() if k.endswith("mlp.act_bias")}
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("act_bias")}, strict=False)
    gate = None
    if cfg.get("gate"):
        gate = load_gate(Path(art_dir) / cfg["gate"].get("dir", GATE_DIR))
        gate.p.check_compatible(len(layers), model.config.hidden_size, model.config.intermediate_size)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        layer.mlp = SparseMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, cfg["activation"], biases.get(i),
                              cfg["thresholds"][i], gate, i, cfg.get("rule_on", "h"))
    model.config.hidden_act = cfg["activation"]
    model.config.llmflash_sparsity = {"kind": "threshold", "thresholds": list(cfg["thresholds"]),
                                      "target_sparsity": cfg.get("target_sparsity"), "on": cfg.get("rule_on", "h")}
    if gate is not None:  # the gate travels with the model object; convert copies its directory into the flash dir
        model.config.llmflash_sparsity["gate"] = GATE_DIR
        model.llmflash_gate = gate
        model.llmflash_gate_dir = Path(art_dir) / cfg["gate"].get("dir", GATE_DIR)
    return model

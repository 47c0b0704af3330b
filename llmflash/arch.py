"""Architecture adapters: where each model family keeps its FFN, and how to swap it for ours.

An adapter turns a Hugging Face model into the family-neutral view the rest of llmflash works with:

- ``ffn_spec(config)``: sizes and activation of the FFN;
- ``ffn_weights(model, layer)``: the FFN as per-neuron rows (see ``ffn.FFNWeights``);
- ``ffn_param_names(layer)``: the state-dict names of the weights that live on flash (everything else is resident);
- ``install_ffn(model, layer, module)``: replace the layer's FFN with a module mapping ``x [..., d] -> [..., d]``.

Adding a family (Qwen2, Mistral, Gemma, Phi, Falcon) is a small subclass: the Llama adapter already covers every
model whose decoder layers hold ``mlp.gate_proj / up_proj / down_proj`` (Llama, Mistral, Qwen2, Gemma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .errors import LLMFlashError
from .ffn import DenseFFN, FFNWeights, MaskFn, Observer, SparsityRule

# A transformers model (``PreTrainedModel``): its submodules are looked up by name, so it is typed dynamically.
HFModel = Any


@dataclass(frozen=True)
class FFNSpec:
    d_model: int
    d_ffn: int
    n_layers: int
    gated: bool  # True: h = act(gate x + b) * (up x); False: h = act(up x + b)
    activation: str  # a transformers ACT2FN name: "silu", "relu", "gelu", ...


class Adapter:
    """Base class. Subclasses name the model types they handle."""

    model_types: tuple[str, ...] = ()

    def layers(self, model: HFModel) -> list[Any]:
        raise NotImplementedError

    def ffn_spec(self, config: Any) -> FFNSpec:
        raise NotImplementedError

    def ffn_param_names(self, layer: int) -> list[str]:
        raise NotImplementedError

    def ffn_bias_names(self, layer: int) -> list[str]:
        """State-dict names of the FFN's per-neuron/output biases (stored resident under llmflash's own names)."""
        return []

    def ffn_weights(self, model: HFModel, layer: int) -> FFNWeights:
        raise NotImplementedError

    def install_ffn(self, model: HFModel, layer: int, module: nn.Module) -> None:
        raise NotImplementedError

    def layer_prefix(self, layer: int) -> str:
        raise NotImplementedError

    def attention_prefix(self, layer: int) -> str:
        """The prefix of a layer's attention weights (the projections, not the norms): what ``layer_stream`` streams."""
        return self.layer_prefix(layer) + "self_attn."

    def ffn_input_norm(self, model: HFModel, layer: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(weight, bias) of the norm whose output enters the FFN (x = normalized(h) * weight + bias); (None, None)
        when unknown. The engine's lookahead rescales one layer's FFN input into a guess of the next one's."""
        return None, None


class LlamaAdapter(Adapter):
    """Gated FFN in ``layer.mlp`` (SwiGLU/GeGLU): bundle = gate row + up row + down column."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

    def layers(self, model: HFModel) -> list[Any]:
        return list(model.model.layers)

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def ffn_spec(self, config: Any) -> FFNSpec:
        if getattr(config, "mlp_bias", False):
            raise LLMFlashError("models with FFN biases in gated FFNs (mlp_bias=True) are not supported yet")
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
        return FFNSpec(config.hidden_size, config.intermediate_size, config.num_hidden_layers, True, act)

    def ffn_param_names(self, layer: int) -> list[str]:
        p = f"{self.layer_prefix(layer)}mlp."
        return [p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"]

    def ffn_bias_names(self, layer: int) -> list[str]:
        return [f"{self.layer_prefix(layer)}mlp.act_bias"]  # a relufied model's learned shift

    def ffn_weights(self, model: HFModel, layer: int) -> FFNWeights:
        mlp = self.layers(model)[layer].mlp
        if isinstance(mlp, DenseFFN):  # already swapped: same weights
            return mlp.w
        bias = getattr(mlp, "act_bias", None)  # a relufied model's learned shift, if any
        return FFNWeights(
            gate=mlp.gate_proj.weight.detach(),  # [d_ffn, d]
            up=mlp.up_proj.weight.detach(),  # [d_ffn, d]
            down=mlp.down_proj.weight.detach().t(),  # [d_ffn, d]
            act_bias=None if bias is None else bias.detach(),
            out_bias=None,
        )

    def install_ffn(self, model: HFModel, layer: int, module: nn.Module) -> None:
        self.layers(model)[layer].mlp = module

    def ffn_input_norm(self, model: HFModel, layer: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        lyr = self.layers(model)[layer]
        norm = getattr(lyr, "pre_feedforward_layernorm", None) or getattr(lyr, "post_attention_layernorm", None)
        if norm is None or getattr(norm, "weight", None) is None:
            return None, None
        w = norm.weight.detach()
        if model.config.model_type.startswith("gemma"):  # Gemma's RMSNorm scales by (1 + weight)
            w = 1.0 + w
        return w, None


class OPTAdapter(Adapter):
    """Plain ReLU FFN inline in the decoder layer (``fc1`` -> act -> ``fc2``): bundle = up row + down column."""

    model_types = ("opt",)

    def layers(self, model: HFModel) -> list[Any]:
        return list(model.model.decoder.layers)

    def layer_prefix(self, layer: int) -> str:
        return f"model.decoder.layers.{layer}."

    def ffn_spec(self, config: Any) -> FFNSpec:
        return FFNSpec(config.hidden_size, config.ffn_dim, config.num_hidden_layers, False, config.activation_function)

    def ffn_param_names(self, layer: int) -> list[str]:
        # fc1.bias (one float per neuron) and fc2.bias (d floats) stay resident: they are tiny.
        p = self.layer_prefix(layer)
        return [p + "fc1.weight", p + "fc2.weight"]

    def ffn_bias_names(self, layer: int) -> list[str]:
        p = self.layer_prefix(layer)
        return [p + "fc1.bias", p + "fc2.bias"]

    def ffn_weights(self, model: HFModel, layer: int) -> FFNWeights:
        lyr = self.layers(model)[layer]
        if isinstance(lyr.fc1, DenseFFN):
            return lyr.fc1.w
        return FFNWeights(
            gate=None,
            up=lyr.fc1.weight.detach(),
            down=lyr.fc2.weight.detach().t(),
            act_bias=None if lyr.fc1.bias is None else lyr.fc1.bias.detach(),
            out_bias=None if lyr.fc2.bias is None else lyr.fc2.bias.detach(),
        )

    def install_ffn(self, model: HFModel, layer: int, module: nn.Module) -> None:
        # OPT computes fc2(act(fc1(x))) inline; our module does the whole FFN in place of fc1.
        lyr = self.layers(model)[layer]
        lyr.fc1 = module
        lyr.activation_fn = nn.Identity()
        lyr.fc2 = nn.Identity()

    def ffn_input_norm(self, model: HFModel, layer: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        norm = self.layers(model)[layer].final_layer_norm
        if not getattr(model.config, "do_layer_norm_before", True):  # post-norm OPT (350m): the FFN sees the raw stream
            return None, None
        return norm.weight.detach(), None if norm.bias is None else norm.bias.detach()


_ADAPTERS: list[Adapter] = [LlamaAdapter(), OPTAdapter()]


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in _ADAPTERS for t in a.model_types)
    raise LLMFlashError(f"model type {model_type!r} is not supported (supported: {', '.join(known)})")


def install_ffns(model: HFModel, make: Callable[[int], nn.Module]) -> None:
    """Replace every layer's FFN with ``make(layer)``."""
    adapter = adapter_for(model.config)
    for layer in range(adapter.ffn_spec(model.config).n_layers):
        adapter.install_ffn(model, layer, make(layer))


def ffn_input_dtype(model: HFModel) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def install_dense_ffns(
    model: HFModel, rule: SparsityRule = SparsityRule(), observer: Optional[Observer] = None,
    mask_fn: Optional[MaskFn] = None,
) -> list[DenseFFN]:
    """Swap every FFN of an in-memory Hugging Face model for a ``DenseFFN`` (same weights, the rule applied).

    A gated model's gate (``model.llmflash_gate``, see ``sparse_model``) is part of its function: it is applied
    whatever the rule, and combined with ``mask_fn``."""
    gate = getattr(model, "llmflash_gate", None)
    if gate is not None:
        mask_fn = gate if mask_fn is None else _both(gate, mask_fn)
    adapter = adapter_for(model.config)
    spec = adapter.ffn_spec(model.config)
    modules = []
    for layer in range(spec.n_layers):
        m = DenseFFN(layer, adapter.ffn_weights(model, layer), spec.activation, rule.threshold(layer), observer, mask_fn,
                     on_act=rule.on_act)
        adapter.install_ffn(model, layer, m)
        modules.append(m)
    return modules


def _both(a: MaskFn, b: MaskFn) -> MaskFn:
    def mask(layer: int, x: Tensor, h: Tensor) -> Tensor:
        return a(layer, x, h) & b(layer, x, h)

    return mask

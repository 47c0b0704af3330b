"""The first relufication format (``llmflash-relufy/1``), loading only: a LoRA + shifted-ReLU artifact merged into
its SiLU base model.

The relufied FFN of layer l is ``down(relu(gate(x) + b) * up(x))`` where ``b = act_bias`` is minus a learned
per-neuron shift (shifted ReLU). An artifact directory holds ``relufy.safetensors`` (LoRA factors of the FFN and
attention projections in fp16; act_bias and norms in fp32) and ``relufy_config.json`` (format, base model shape and
fingerprint, LoRA scales, and the run's record). ``apply_relufication(model, dir)`` merges it into a base model loaded
in float32: plain ``nn.Linear`` weights, a ``ReluMLP`` per layer whose ``act_bias`` llmflash's adapters pick up, and
``config.hidden_act = "relu"``.

The shipped ``smollm2-relu`` now uses the ``llmflash-sparse/1`` format (``sparse_model``); this one stays readable
for the first version's artifacts (``results/relufy/v1``). Training them is ``sparsetrain.relufy_v1``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import HFModel
from .errors import LLMFlashError

log = logging.getLogger(__name__)

FORMAT = "llmflash-relufy/1"
TENSORS_FILE = "relufy.safetensors"
CONFIG_FILE = "relufy_config.json"


class ReluMLP(nn.Module):
    """A relufied gated FFN: ``down(relu(gate(x) + act_bias) * up(x))``.

    Keeps the attribute names of a Llama MLP (``gate_proj``, ``up_proj``, ``down_proj``) plus ``act_bias`` [d_ffn],
    which is what ``arch.LlamaAdapter.ffn_weights`` reads.
    """

    def __init__(self, layer: int, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_bias: Tensor):
        super().__init__()
        self.layer = layer
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_bias = nn.Parameter(act_bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        return self.down_proj(F.relu(g + self.act_bias.to(g.dtype)) * self.up_proj(x))


def llama_layers(model: HFModel) -> list[Any]:
    if getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        raise LLMFlashError(f"relufication supports Llama-family gated FFNs, not {model.config.model_type!r}")
    return list(model.model.layers)


def relu_mlps(model: HFModel, cls: type[ReluMLP] = ReluMLP) -> list[ReluMLP]:
    """Replace each layer's MLP by a ``cls`` (same projection modules, act_bias zeros) unless it is one already."""
    out = []
    for i, layer in enumerate(llama_layers(model)):
        mlp = layer.mlp
        if not isinstance(mlp, cls):
            w = mlp.gate_proj.weight
            mlp = cls(i, mlp.gate_proj, mlp.up_proj, mlp.down_proj, torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            layer.mlp = mlp
        out.append(mlp)
    model.config.hidden_act = "relu"
    return out


def read_artifact(artifact_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors.torch import load_file

    artifact_dir = Path(artifact_dir)
    cfg_path, ten_path = artifact_dir / CONFIG_FILE, artifact_dir / TENSORS_FILE
    if not cfg_path.is_file() or not ten_path.is_file():
        raise LLMFlashError(f"{artifact_dir} is not a relufication artifact (needs {CONFIG_FILE} and {TENSORS_FILE})")
    try:
        meta = json.loads(cfg_path.read_text())
        tensors = load_file(str(ten_path))
    except Exception as err:  # noqa: BLE001 - corrupt files are a user-facing error
        raise LLMFlashError(f"cannot read relufication artifact {artifact_dir}: {str(err).splitlines()[0][:200]}") from None
    if meta.get("format") != FORMAT:
        raise LLMFlashError(f"{cfg_path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta, tensors


@torch.no_grad()
def apply_relufication(model: HFModel, artifact_dir: Path) -> HFModel:
    """Apply a relufication artifact to its base model (in place) and return the ReLU-sparse model.

    Afterwards each layer's MLP is a ``ReluMLP`` with plain ``nn.Linear`` projections (LoRA deltas merged), its
    ``act_bias`` set, the norms replaced, and ``config.hidden_act == "relu"``.
    """
    meta, tensors = read_artifact(Path(artifact_dir))
    layers = llama_layers(model)
    base = meta["base"]
    if len(layers) != base["n_layers"] or model.config.intermediate_size != base["d_ffn"] or model.config.hidden_size != base["d_model"]:
        raise LLMFlashError(
            f"relufication artifact {artifact_dir} was made for a model with {base['n_layers']} layers, d_model "
            f"{base['d_model']}, d_ffn {base['d_ffn']}: this model differs"
        )
    fp = base_fingerprint(model)
    if base.get("fingerprint") is not None and not math.isclose(fp, base["fingerprint"], rel_tol=1e-4):
        log.warning("base model fingerprint %.6g differs from the artifact's %.6g: wrong base model?", fp, base["fingerprint"])
    mlps = relu_mlps(model)
    scales = meta["lora"]["scales"]
    for name, tensor in tensors.items():
        if name.endswith(".lora_A"):
            prefix = name[: -len(".lora_A")]
            linear = model.get_submodule(prefix)
            b = tensors[prefix + ".lora_B"].float()
            delta = (b @ tensor.float()) * float(scales[prefix])
            linear.weight.add_(delta.to(linear.weight.dtype))
        elif name.endswith(".lora_B"):
            continue
        elif name.endswith(".act_bias"):
            layer = int(name.split(".")[2])
            mlps[layer].act_bias.copy_(tensor.to(mlps[layer].act_bias.dtype))
        elif name.endswith(".weight"):  # norms
            model.get_submodule(name[: -len(".weight")]).weight.copy_(tensor)
        else:
            raise LLMFlashError(f"relufication artifact {artifact_dir}: unexpected tensor {name}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def base_fingerprint(model: HFModel) -> float:
    """A cheap identity check of the base weights (sum of |w| of the first layer's FFN gate; its frozen base weight
    while training wraps it, see ``sparsetrain.relufy_v1``)."""
    w = llama_layers(model)[0].mlp.gate_proj
    w = getattr(w, "base", w)
    return float(w.weight.detach().double().abs().sum())

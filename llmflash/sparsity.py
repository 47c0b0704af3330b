"""Sparsity rules in practice: calibrating per-layer thresholds (CATS-style) and measuring active fractions.

A flash directory's thresholds are calibrated once, by ``convert`` (``calibrate_on_text``), and stored in its
manifest; the engine and the other readers only read them (``stored_thresholds``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import install_dense_ffns
from .errors import LLMFlashError
from .ffn import SparsityRule
from .flashdir import FlashDir
from .manifest import CalibratedThresholds
from .paths import atomic_file, cache_dir
from .text import load_texts, token_stream, windows

log = logging.getLogger(__name__)

DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_SAMPLES_PER_LAYER = 2_000_000  # |h| values kept per layer for the quantiles


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module, batches: Iterable[Tensor], targets: Sequence[float] = DEFAULT_TARGETS, progress: bool = True
) -> dict[str, list[float]]:
    """Per-layer thresholds t_l such that a fraction ``target`` of |h| values (over tokens and neurons) is below t_l.

    ``model`` is modified in place (its FFNs become ``DenseFFN`` without a threshold). Returns {"0.8": [t_0, ...]}.
    """
    samples: dict[int, list[Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def observe(layer: int, x: Tensor, h: Tensor) -> None:
        flat = h.detach().abs().reshape(-1).float()
        keep = max(1, _SAMPLES_PER_LAYER // 16)
        if flat.numel() > keep:
            flat = flat[torch.randint(0, flat.numel(), (keep,), generator=gen)]
        samples.setdefault(layer, []).append(flat)

    install_dense_ffns(model, SparsityRule("relu"), observer=observe)
    for ids in tqdm(list(batches), desc="calibrating thresholds", disable=not progress):
        model(ids)
    per_layer_sorted = [torch.cat(samples[layer]).sort().values for layer in sorted(samples)]
    out: dict[str, list[float]] = {}
    for target in targets:
        out[f"{target:g}"] = [float(v[min(int(target * v.numel()), v.numel() - 1)]) for v in per_layer_sorted]
    return out


def threshold_rule(thresholds: dict[str, list[float]], target: float) -> SparsityRule:
    key = f"{target:g}"
    if key not in thresholds:
        raise LLMFlashError(f"no thresholds calibrated for sparsity {target:g} (have: {', '.join(sorted(thresholds))})")
    return SparsityRule("threshold", tuple(thresholds[key]), target)


class ActiveCounter:
    """An FFN observer that counts active neurons per layer (h != 0 after the rule)."""

    def __init__(self, n_layers: int) -> None:
        self.active = [0] * n_layers
        self.total = [0] * n_layers

    def __call__(self, layer: int, x: Tensor, h: Tensor) -> None:
        self.active[layer] += int((h != 0).sum())
        self.total[layer] += h.numel()

    def per_layer(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.active, self.total)]

    def overall(self) -> float:
        t = sum(self.total)
        return sum(self.active) / t if t else float("nan")


def model_rule(config: Any) -> SparsityRule | None:
    """The sparsity rule a model carries (``llmflash_sparsity`` in its config: a trained sparse model's thresholds).

    ``config`` is a transformers config or its dict (a flash directory's manifest keeps the dict).
    """
    spec = config.get("llmflash_sparsity") if isinstance(config, dict) else getattr(config, "llmflash_sparsity", None)
    if not spec or spec.get("kind") != "threshold" or not spec.get("thresholds"):
        return None
    return SparsityRule("threshold", tuple(float(t) for t in spec["thresholds"]), spec.get("target_sparsity"),
                        spec.get("on", "h"))


def model_gate(config: Any) -> str | None:
    """A gated sparse model's gate directory (relative to its flash directory), from the same config entry."""
    spec = config.get("llmflash_sparsity") if isinstance(config, dict) else getattr(config, "llmflash_sparsity", None)
    return spec.get("gate") if spec else None


SPARSITY_CHOICES = ("auto", "relu", "threshold")


CALIBRATION_SOURCE = "wiki:train"
CALIBRATION_TOKENS = 16_384
CALIBRATION_SEQ_LEN = 512


def rule_for(
    model: nn.Module, tokenizer: Any, sparsity: str, target: float = 0.8, thresholds: dict | None = None,
    cache_key: str | None = None,
) -> SparsityRule:
    """The sparsity rule for a command's ``--sparsity auto|relu|threshold``.

    ``auto``: the model's own rule (a trained sparse model's thresholds, ``model_rule``), else ``relu``.

    Thresholds come from ``thresholds`` (a flash directory's manifest) or are calibrated on ``wiki:train``
    (``CALIBRATION_TOKENS`` tokens) and cached under the cache directory as ``thresholds/<cache_key>.json``. Calibration swaps the
    model's FFNs for ``DenseFFN`` modules (same weights).
    """
    if sparsity == "auto":
        return model_rule(model.config) or SparsityRule("relu")
    if sparsity == "relu":
        return SparsityRule("relu")
    if sparsity != "threshold":
        raise LLMFlashError(f"unknown sparsity {sparsity!r}: use auto, relu or threshold")
    if thresholds is None:
        path = cache_dir() / "thresholds" / f"{cache_key}.json" if cache_key else None
        if path is not None and path.is_file():
            thresholds = json.loads(path.read_text())
        else:
            thresholds = calibrate_on_text(model, tokenizer).table()
            if path is not None:
                with atomic_file(path) as tmp:
                    tmp.write_text(json.dumps(thresholds))
    return threshold_rule(thresholds, target)


def calibrate_on_text(
    model: nn.Module, tokenizer: Any, max_tokens: int = CALIBRATION_TOKENS, targets: Sequence[float] = DEFAULT_TARGETS,
    progress: bool = True,
) -> CalibratedThresholds:
    """``calibrate_thresholds`` on the first ``max_tokens`` tokens of ``CALIBRATION_SOURCE`` (windows of
    ``CALIBRATION_SEQ_LEN``). ``model`` is modified in place (its FFNs become ``DenseFFN`` modules, same weights)."""
    stream = token_stream(tokenizer, load_texts(CALIBRATION_SOURCE), max_tokens=max_tokens)
    table = calibrate_thresholds(model, windows(stream, CALIBRATION_SEQ_LEN), targets, progress)
    return CalibratedThresholds({k: tuple(v) for k, v in table.items()}, CALIBRATION_SOURCE, int(stream.numel()),
                                CALIBRATION_SEQ_LEN)


def stored_thresholds(fd: FlashDir) -> dict[str, list[float]]:
    """A flash directory's calibrated thresholds (its manifest's, or an older directory's ``thresholds.json``); a
    one-line ``LLMFlashError`` when it has none (converted with ``--calibration-tokens 0``, or by an older llmflash)."""
    table = fd.thresholds()
    if table is None:
        again = " (then reorder it again)" if fd.manifest.neuron_order is not None else ""
        raise LLMFlashError(f"{fd.path} has no calibrated thresholds for --sparsity threshold: re-run `llmflash convert "
                            f"{fd.manifest.model.source} --out DIR` to calibrate them{again}")
    return table

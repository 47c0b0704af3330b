"""Building a ``lowbit`` predictor set: a 4-bit copy of each layer's own gate and up projections, thresholds calibrated
on an activation directory (see ``llmflash.predictor`` for the runtime and the format).

Nothing is trained: the codes are the model's weights rounded to a 16-level grid (groups of ``group_size`` inputs,
each group's scale chosen by squared error, no data), so they predict as well on text unlike the calibration text as
on text like it. The activations serve only to pick each layer's cut on z = |act(x G~^T) * (x U~^T)| for the recall
target, on the directory's training part (measured on its held-out part, as for a low-rank set). Where the trained
low-rank predictors of the paper learn which neurons fire, this one recomputes the rule's own quantity at a quarter of
fp16's bytes: more DRAM, far fewer neurons read (results/predictors/lowbit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from llmflash.arch import adapter_for
from llmflash.errors import LLMFlashError
from llmflash.models import LoadedModel
from llmflash.predictor import ENGINE_DTYPE, PredictorSet, ffn_fingerprint, fingerprints_match

from .collect import Activations, rule_from_dict
from .train import LayerStats, _layer_data, confusion, pinned_neurons, rates, set_meta, threshold_for_recall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowBitConfig:
    group_size: int = 64  # inputs per fp16 scale (the int4 kernel takes 32, 64, 128, 256)
    recall_target: float = 0.95
    holdout_fraction: float = 0.1  # the last windows: where the reported recall is measured
    pin_ratio: Optional[float] = 0.5  # as for low-rank sets (``predictors.train``)
    max_calibration_tokens: Optional[int] = None  # subsample the calibration tokens per layer (time); None: all


@torch.no_grad()
def build_lowbit(act: Activations, lm: LoadedModel, cfg: LowBitConfig = LowBitConfig(), progress: bool = True) -> PredictorSet:
    """A ``lowbit`` set for ``lm`` (the model ``act`` was collected from), calibrated on ``act``."""
    if not 0.5 <= cfg.recall_target < 1.0:
        raise LLMFlashError(f"--recall-target {cfg.recall_target} is out of range: use a value in [0.5, 1)")
    model = lm.model
    adapter = adapter_for(model.config)
    spec = adapter.ffn_spec(model.config)
    if (spec.n_layers, spec.d_model, spec.d_ffn) != (act.n_layers, act.d_model, act.d_ffn):
        raise LLMFlashError(f"{lm.name} (layers, d_model, d_ffn = {(spec.n_layers, spec.d_model, spec.d_ffn)}) is not the "
                            f"model {act.path} was collected from ({(act.n_layers, act.d_model, act.d_ffn)})")
    mine = act.manifest.get("model_fingerprint")
    if mine and not fingerprints_match(mine, ffn_fingerprint(model)):
        raise LLMFlashError(f"{lm.name}'s FFN weights are not those {act.path} was collected from: pass the same model")
    rule = rule_from_dict(act.rule)
    weights = [adapter.ffn_weights(model, layer) for layer in range(spec.n_layers)]
    meta = set_meta(act, {"kind": "lowbit", **asdict(cfg)})
    stored = PredictorSet.lowbit(weights, spec.activation, meta, cfg.group_size, rule.on_act, dtype=None)  # codes
    pins = pinned_neurons(act, cfg.pin_ratio)
    for layer, pinned in enumerate(pins):
        stored.pin(layer, pinned)
    engine = stored.in_form(ENGINE_DTYPE)
    cal_rows, hold_rows = act.split(cfg.holdout_fraction)
    stats = []
    bar = tqdm(range(act.n_layers), desc="calibrate low-bit predictors", unit="layer", disable=not progress)
    for layer in bar:
        t0 = time.perf_counter()
        x_cal, y_cal = _layer_data(act, layer, cal_rows, cfg.max_calibration_tokens, 0)
        # the cut is chosen in the engine's form (the int4 kernel, bf16): the sets it marks are the ones the engine reads
        thr = threshold_for_recall(engine.scores(layer, x_cal), y_cal, cfg.recall_target, pins[layer])
        for s in (stored, engine):
            s.set_threshold_logit(layer, thr)
        x_ho, y_ho = _layer_data(act, layer, hold_rows, None, 0)
        r = rates(*confusion(engine.predict(layer, x_ho), y_ho))
        stats.append(LayerStats(layer, 0, thr, thr, r["recall"], r["precision"], r["predicted_active_fraction"],
                                r["true_active_fraction"], int(x_cal.shape[0]), pins[layer], 0, time.perf_counter() - t0))
        bar.set_postfix(recall=f"{r['recall']:.3f}", over=f"{r['predicted_active_fraction'] / max(r['true_active_fraction'], 1e-9):.2f}")
    stored.meta["layers"] = [asdict(s) for s in stats]
    return stored

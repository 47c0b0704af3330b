"""Activation predictors: the paper's per-layer low-rank predictors (after Deja Vu), and low-bit ones.

- ``collect``   run text through a model; store per layer the FFN input x and the active-neuron labels (ACTDIR)
- ``train``     per-layer Linear(d -> r) -> Linear(r -> d_ffn) + sigmoid, class-balanced BCE, thresholds calibrated
                on held-out tokens to a recall target
- ``lowbit``    a 4-bit copy of each layer's own gate and up projections (no training), cuts calibrated on ACTDIR
- ``evaluate``  recall / precision against the true active sets; ``window_mask_fn`` for predictor-mode perplexity
- ``cli``       the commands ``collect``, ``train-predictors``, ``eval-predictors``

The runtime (``PredictorSet``: ``load``, ``predict``, ``check_compatible``, ``nbytes``) is ``llmflash.predictor``, in
the core; this package depends on the core only.

Default predictors for ``smollm2-relu`` live in ``predictors/artifacts/smollm2-relu``: a low-bit recipe (its cuts and
pins; the codes are derived from the model's weights on first use, see ``default_predictors``). A low-rank set (the
paper's kind) for an alias goes in ``predictors/artifacts/<alias>-lowrank`` (``lowrank_predictors``): smollm2-relu's
was trained on the GPU by ``sparsetrain.predictors_job``.
"""

from __future__ import annotations

from pathlib import Path

from llmflash.predictor import PredictorSet

__all__ = ["PredictorSet", "default_predictors", "window_mask_fn", "predicted_mask_fn"]


def default_predictors(model_name: str) -> Path | None:
    """The committed default predictors of an alias (``smollm2-relu``), loadable (a low-bit recipe built from the
    model's weights once), or None when there are none: ``llmflash.models.default_predictors``."""
    from llmflash.models import default_predictors as find

    return find(model_name)


def __getattr__(name: str):
    if name in ("window_mask_fn", "predicted_mask_fn"):
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)

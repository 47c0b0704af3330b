"""Low-rank activation predictors (the paper's per-layer predictors, after Deja Vu).

- ``collect``   run text through a model; store per layer the FFN input x and the active-neuron labels (ACTDIR)
- ``train``     per-layer Linear(d -> r) -> Linear(r -> d_ffn) + sigmoid, class-balanced BCE, thresholds calibrated
                on held-out tokens to a recall target
- ``evaluate``  recall / precision against the true active sets; ``window_mask_fn`` for predictor-mode perplexity
- ``cli``       the commands ``collect``, ``train-predictors``, ``eval-predictors``

The runtime (``PredictorSet``: ``load``, ``predict``, ``check_compatible``, ``nbytes``) is ``llmflash.predictor``, in
the core; this package depends on the core only.

Default predictors for ``smollm2-relu`` live in ``predictors/artifacts/smollm2-relu`` (see ``default_predictors``).
"""

from __future__ import annotations

from pathlib import Path

from llmflash.predictor import PredictorSet

__all__ = ["PredictorSet", "default_predictors", "window_mask_fn", "predicted_mask_fn"]


def default_predictors(model_name: str) -> Path | None:
    """The committed predictor directory for an alias (``smollm2-relu``), or None when there is none."""
    path = Path(__file__).resolve().parent / "artifacts" / model_name
    return path if (path / "predictors.json").is_file() else None


def __getattr__(name: str):
    if name in ("window_mask_fn", "predicted_mask_fn"):
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)

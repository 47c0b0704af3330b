"""The main job: the default model run dense, naive, hybrid and sparse from flash under half-model DRAM."""

from __future__ import annotations

import logging
from pathlib import Path

from .convert import convert
from .engine import Engine, EngineConfig
from .errors import LLMFlashError
from .flashdir import open_flash_dir
from .models import default_predictors, relu_artifact_tag
from .paths import cache_dir
from .report import environment, fmt_bytes

log = logging.getLogger(__name__)


def default_setup(model: str = "smollm2") -> dict:
    """``smollm2``: the original model with the threshold rule (80% sparsity), exact oracle. ``smollm2-relu``: the
    relufied model with its committed predictors when they exist (its quality is still far from the original's)."""
    if model == "smollm2":
        return {"model": "smollm2", "sparse_mode": "oracle", "sparsity": "threshold", "predictors": None}
    if model != "smollm2-relu":
        raise LLMFlashError(f"demo runs smollm2 or smollm2-relu, not {model!r}")
    preds = default_predictors("smollm2-relu")
    if preds is not None:
        return {"model": "smollm2-relu", "sparse_mode": "predictor", "sparsity": "auto", "predictors": str(preds)}
    return {"model": "smollm2-relu", "sparse_mode": "oracle", "sparsity": "auto", "predictors": None}


def flash_dir_for(model: str) -> Path:
    """Convert once and reuse: the cache holds one flash directory per model."""
    out = cache_dir() / "flash" / (f"{model}-{relu_artifact_tag()}" if model == "smollm2-relu" else model)
    try:
        open_flash_dir(out)
        return out
    except LLMFlashError:
        return convert(model, out, force=True)


def run_demo(max_new_tokens: int = 32, prompt: str = "The history of the printing press begins",
             dram_budget: float = 0.5, model: str = "smollm2") -> dict:
    setup = default_setup(model)
    path = flash_dir_for(setup["model"])
    fd = open_flash_dir(path)
    rows = []
    reference = None
    runs = [("dense", 1.0), ("naive", dram_budget), ("hybrid", dram_budget), (setup["sparse_mode"], dram_budget)]
    for mode, budget in runs:
        cfg = EngineConfig(mode=mode, dram_budget=budget, sparsity=setup["sparsity"], predictors=setup["predictors"])
        engine = Engine(fd, cfg)
        try:
            ids = engine.tokenizer(prompt, return_tensors="pt").input_ids[0]
            res = engine.generate(ids, max_new_tokens, stop_at_eos=False)
        finally:
            engine.close()
        if mode == "dense":
            reference = res.tokens
        s = res.summary()
        rows.append({
            "mode": mode, "ms_per_token": s["ms_per_token"], "tokens_per_s": 1e3 / s["ms_per_token"],
            "io_ms": s["io_ms"], "mem_ms": s["mem_ms"], "compute_ms": s["compute_ms"],
            "bytes_read_per_token": s["bytes_read_per_token"], "reads_per_token": s["reads_per_token"],
            "dram_bytes": res.dram_bytes, "dram_fraction": res.dram_bytes / res.model_bytes,
            "same_tokens_as_dense": res.tokens == reference, "text": res.text,
        })
    naive = next(r for r in rows if r["mode"] == "naive")
    for r in rows:
        r["speedup_vs_naive"] = naive["ms_per_token"] / r["ms_per_token"]
    return {"setup": setup, "flash_dir": str(path), "model_bytes": fd.model_bytes, "prompt": prompt,
            "max_new_tokens": max_new_tokens, "dram_budget": dram_budget, "rows": rows, "environment": environment()}


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"llmflash demo: {s['model']} ({fmt_bytes(result['model_bytes'])} of weights), sparsity {s['sparsity']}, "
        f"DRAM budget {result['dram_budget']:.0%} of the model, {result['max_new_tokens']} tokens, greedy",
        f"prompt: {result['prompt']!r}",
        "",
        f"{'mode':<10}{'ms/token':>10}{'tokens/s':>10}{'vs naive':>10}{'read/token':>13}{'reads':>8}{'DRAM':>18}  same text as dense",
    ]
    for r in result["rows"]:
        dram = f"{fmt_bytes(r['dram_bytes'])} ({r['dram_fraction']:.0%})"
        lines.append(
            f"{r['mode']:<10}{r['ms_per_token']:>10.1f}{r['tokens_per_s']:>10.1f}{r['speedup_vs_naive']:>9.1f}x"
            f"{fmt_bytes(r['bytes_read_per_token']):>13}{r['reads_per_token']:>8.0f}{dram:>18}  "
            f"{'yes' if r['same_tokens_as_dense'] else 'NO'}"
        )
    lines += ["", f"dense text: {result['rows'][0]['text']!r}",
              "(ms/token: median over generated tokens, measured; reads bypass the page cache)"]
    return "\n".join(lines)

"""Training throughput of the sparsity trainer on a SmolLM2-135M-shaped model (random weights, random tokens).

Throughput does not depend on the weights' values, so this needs no staged model: one device call measures every
variant of the recipe that changes speed, and profiles one of them.

    python3 -m sparsetrain.bench --out $OUT [--variants base,gqa,...] [--steps 12] [--profile base]

Each variant builds a fresh student (sparse, threshold rule in the loop) and teacher, warms up (compiles) for
``--warmup`` steps and times ``--steps`` steps; the record holds the median tokens/s and MFU per variant
(``bench.json``) and, for the profiled variant, the kernels that take the most device time (``profile.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import model as model_mod
from .data import WindowSampler
from .model import CompactLlama, Shape
from .train import Recipe, Trainer, tokens_per_s_and_mfu

SMOLLM2_135M = Shape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ffn=1536, vocab=49152,
                     rope_theta=100000.0, eps=1e-5)
TINY = Shape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ffn=128, vocab=512, rope_theta=10000.0,
             eps=1e-5)

# name -> (recipe overrides, SDPA's own grouped-query attention)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "base": ({"fused_loss": False}, False),  # the third session's trainer (LoRA, eager loss, repeated k/v)
    "loss": ({"fused_loss": True}, False),  # + compiled head/KL/FFN-output loss
    "gqa": ({"fused_loss": True}, True),  # + SDPA's grouped-query attention
    "full_attn": ({"fused_loss": True, "lora_rank": 0, "attn_full": True}, True),  # + attention trained outright
    "mb16": ({"fused_loss": True, "lora_rank": 0, "attn_full": True, "micro_batch_seqs": 16}, True),
    "mb4": ({"fused_loss": True, "lora_rank": 0, "attn_full": True, "micro_batch_seqs": 4}, True),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(shape: Shape, recipe: Recipe, device: str) -> Trainer:
    torch.manual_seed(0)
    student = CompactLlama(shape, "silu", True, recipe.lora_rank)
    teacher = CompactLlama(shape, "silu", False, 0)
    teacher.load_state_dict(student.state_dict(), strict=False)
    if device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)
    rng = np.random.default_rng(0)
    streams = {"random": rng.integers(0, shape.vocab, size=4 * recipe.seq_len * 64, dtype=np.int64)}
    sampler = WindowSampler(streams, {"random": 1.0}, recipe.seq_len, seed=0)
    return Trainer(student, teacher, sampler, recipe, {}, device, log_fn=say)


def run_variant(name: str, shape: Shape, base: Recipe, device: str, warmup: int, steps: int,
                profile_dir: Optional[Path]) -> dict:
    overrides, gqa = VARIANTS[name]
    model_mod.SDPA_GQA = gqa and model_mod._sdpa_has_gqa()
    torch._dynamo.reset()
    recipe = replace(base, **overrides)
    t0 = time.perf_counter()
    trainer = build(shape, recipe, device)
    for _ in range(warmup):
        trainer.step()
    warm_s = time.perf_counter() - t0
    trainer.state.curve.clear()
    for _ in range(steps):
        trainer.state.curve.append(trainer.step())
    rate = tokens_per_s_and_mfu(trainer, torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")
    rec = {"variant": name, "overrides": overrides, "sdpa_gqa": model_mod.SDPA_GQA, "warmup_s": round(warm_s, 1),
           "steps": steps, "tokens_per_step": recipe.tokens_per_step,
           "tokens_per_s_all": [r["tokens_per_s"] for r in trainer.state.curve], **rate,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None}
    if profile_dir is not None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                trainer.step()
        sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        (profile_dir / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    del trainer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rec


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.bench")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/sparsify-bench")))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default="base,full_attn", help="variants to profile (two extra steps each)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, without compile (a smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    shape = TINY if args.tiny else SMOLLM2_135M
    base = (Recipe(tokens_per_step=2 * 2 * 64, micro_batch_seqs=2, seq_len=64, compile=False, eval_every=0,
                   target_sparsity=0.85, sparsity_start=0.85)
            if args.tiny else Recipe(target_sparsity=0.85, sparsity_start=0.85, eval_every=0))
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    profiled = set(args.profile.split(",")) if args.profile else set()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "shape": shape.__dict__, "recipe": base.__dict__}
    say(f"bench: {env['torch']} on {env['device']}")
    rows = []
    for name in names:
        rec = run_variant(name, shape, base, args.device, args.warmup, args.steps, args.out if name in profiled else None)
        say(f"{name}: {rec['tokens_per_s_median']} tokens/s, MFU {rec['mfu']}, warm-up {rec['warmup_s']} s, "
            f"peak {rec['peak_mem_gb']} GB")
        rows.append(rec)
        (args.out / "bench.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()

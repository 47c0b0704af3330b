"""Per-layer sparsity for a shipped sparse model: spend the zeros where they cost least (device machine).

The shipped thresholds give every layer the same share of zeros on training-mix text. Layers differ in what a zero
costs. After TEAL's greedy allocation: every layer starts at ``--start`` sparsity; at each step each layer in turn is
made ``--step`` sparser alone and the KL divergence of the model's next-token distributions from the original
model's is measured on training-mix windows (never a held-out corpus); the cheapest raise is kept; until the mean
sparsity reaches the largest target. A layer's threshold for a sparsity is the quantile of its |h| on the same windows
(tables taken once, at the shipped thresholds).

Then, for each target, the greedy thresholds and uniform ones (``job.calibrate``, what ships) are evaluated on every
held-out corpus (512 and 2048 windows) beside the original model on the same tokens: perplexity ratio and measured
zeros. Writes $OUT/allocate.json.

Here, once:     python3 -m sparsetrain.job prepare
Device call 1:  python3 -m sparsetrain.gated stage-a            (carry .device-stage/sparsify-1)
Device call 2:  python3 -m sparsetrain.gated stage-b            (the tree with llmflash/artifacts/smollm2-relu)
Device call 3:  python3 -m sparsetrain.allocate                 (carry .device-stage/sparsify-2)

On the CPU (tests/test_sparsetrain.py): ``--base DIR --artifact none --no-compile`` and small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .data import WindowSampler
from .gated import eval_trainer, evaluate_both
from .job import MIX, calibrate, say, teacher_eval, tmp_root
from .model import CompactLlama
from .train import Trainer


@torch.no_grad()
def quantile_tables(trainer: Trainer, model: CompactLlama, ids: torch.Tensor, batch: int = 8,
                    per_layer: int = 1 << 21) -> list[torch.Tensor]:
    """Per layer, a sorted sample of |h| on ``ids`` (the model's current thresholds upstream)."""
    vals: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for b in range(0, ids.shape[0], batch):
        with trainer.autocast:
            _, _, hs, _ = model(ids[b : b + batch])
        for i, h in enumerate(hs):
            flat = h.abs().float().reshape(-1)
            pick = torch.randint(0, flat.numel(), (min(flat.numel(), per_layer // max(1, ids.shape[0] // batch)),),
                                 device=flat.device)
            vals[i].append(flat[pick])
    return [torch.cat(v).sort().values for v in vals]


def thresholds_at(tables: list[torch.Tensor], sparsity: list[float]) -> list[float]:
    return [float(t[min(max(0, int(s * t.numel()) - 1), t.numel() - 1)]) for t, s in zip(tables, sparsity)]


@torch.no_grad()
def teacher_logprobs(trainer: Trainer, ids: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    out = []
    for b in range(0, ids.shape[0], batch):
        with trainer.autocast:
            hidden, _, _, _ = trainer.teacher(ids[b : b + batch], collect=False)
            out.append(trainer.teacher.logits(hidden).float().log_softmax(-1).to(torch.bfloat16))
    return out


@torch.no_grad()
def kl_from_teacher(trainer: Trainer, model: CompactLlama, ids: torch.Tensor, ref: list[torch.Tensor],
                    batch: int = 8) -> float:
    """Mean KL(original || model) per position on ``ids``."""
    total, n = 0.0, 0
    for k, b in enumerate(range(0, ids.shape[0], batch)):
        with trainer.autocast:
            hidden, _, _, _ = model(ids[b : b + batch], collect=False)
            lp = model.logits(hidden).float().log_softmax(-1)
        t = ref[k].float()
        total += float(F.kl_div(lp, t, log_target=True, reduction="sum"))
        n += lp.shape[0] * lp.shape[1]
    return total / max(n, 1)


def greedy(trainer: Trainer, model: CompactLlama, tables: list[torch.Tensor], ids: torch.Tensor,
           ref: list[torch.Tensor], start: float, stop: float, step: float, cap: float = 0.99,
           budget_s: float = float("inf")) -> list[dict]:
    """The greedy path from ``start`` in every layer until the mean sparsity reaches ``stop`` (or ``budget_s`` runs
    out: the targets beyond the path's end are then not reached): one row per step."""
    sp = [start] * len(tables)
    model.set_thresholds(thresholds_at(tables, sp))
    path = [{"mean": start, "kl": kl_from_teacher(trainer, model, ids, ref), "sparsity": list(sp), "layer": None}]
    t0 = time.perf_counter()
    while sum(sp) / len(sp) < stop - 1e-9 and time.perf_counter() - t0 < budget_s:
        best: Optional[tuple[float, int]] = None
        for layer in range(len(sp)):
            if sp[layer] + step > cap:
                continue
            trial = list(sp)
            trial[layer] += step
            model.set_thresholds(thresholds_at(tables, trial))
            kl = kl_from_teacher(trainer, model, ids, ref)
            if best is None or kl < best[0]:
                best = (kl, layer)
        if best is None:
            break
        sp[best[1]] += step
        path.append({"mean": sum(sp) / len(sp), "kl": best[0], "sparsity": list(sp), "layer": best[1]})
        if len(path) % 10 == 0:
            say(f"greedy: mean sparsity {path[-1]['mean']:.4f}, KL {best[0]:.5f} ({time.perf_counter() - t0:.0f} s)")
    return path


def at_target(path: list[dict], target: float) -> dict:
    return next((p for p in path if p["mean"] >= target - 1e-9), path[-1])


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.allocate")
    ap.add_argument("--work", default=str(tmp_root()))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparsify-out"))
    ap.add_argument("--base", default=None, help="a Hugging Face model directory instead of the staged GGUF")
    ap.add_argument("--artifact", default=str(tmp_root() / "start" / "artifact"), help="the shipped artifact, or none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=16_384, help="training-mix tokens of the KL and the tables")
    ap.add_argument("--start", type=float, default=0.84)
    ap.add_argument("--step", type=float, default=0.02)
    ap.add_argument("--targets", default="0.86,0.87,0.88")
    ap.add_argument("--eval-tokens", type=int, default=131_072)
    ap.add_argument("--greedy-budget-s", type=float, default=330.0, help="the greedy path stops here if not done")
    ap.add_argument("--micro-batch-seqs", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    t_call = time.perf_counter()
    targets = [float(t) for t in args.targets.split(",") if t]
    trainer, work = eval_trainer(args, "allocate")
    train, held = trainer.sampler.streams, trainer.held_out
    student = trainer.student
    shipped = student.thresholds()
    calib = WindowSampler(train, {k: v for k, v in MIX.items() if k in train}, args.seq_len, seed=4242)
    ids = calib.batch(max(1, args.calib_tokens // args.seq_len)).to(args.device)
    tables = quantile_tables(trainer, student, ids)
    ref = teacher_logprobs(trainer, ids)
    path = greedy(trainer, student, tables, ids, ref, args.start, max(targets), args.step,
                  budget_s=args.greedy_budget_s)
    targets = [t for t in targets if path[-1]["mean"] >= t - 1e-9] or [path[-1]["mean"]]
    teacher_ev = teacher_eval(trainer, work, args.eval_tokens)
    rows: list[dict] = []
    points: list[dict] = []
    for target in targets:
        for how in ("uniform", "greedy"):
            if how == "uniform":
                thr = calibrate(trainer, student, target)
                student.set_thresholds(thr)
                kl = kl_from_teacher(trainer, student, ids, ref)
                sparsity = [target] * len(thr)
            else:
                point = at_target(path, target)
                thr, kl, sparsity = thresholds_at(tables, point["sparsity"]), point["kl"], point["sparsity"]
                student.set_thresholds(thr)
            ev = evaluate_both(trainer, student, teacher_ev, args.eval_tokens)
            for seq, per in ev["student"].items():
                for corpus, v in per.items():
                    rows.append({"target": target, "allocation": how, "seq_len": int(seq), "corpus": corpus,
                                 "ppl": v["ppl"], "ppl_ratio": ev["ratio"][seq][corpus], "zeros": 1 - v["active_fraction"],
                                 "tokens": v["tokens"], "calibration_kl": kl})
            worst = max(r["ppl_ratio"] for r in rows[-len(ev["student"]) * len(held):])
            say(f"{how} {target}: calibration KL {kl:.5f}, worst held-out ratio {worst:.3f}")
            points.append({"target": target, "allocation": how, "calibration_kl": kl, "thresholds": thr,
                           "sparsity": sparsity})
    student.set_thresholds(shipped)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"artifact": str(args.artifact), "calib_tokens": args.calib_tokens, "start": args.start, "step": args.step,
           "targets": targets, "eval_tokens": args.eval_tokens, "path": path, "points": points, "rows": rows,
           "teacher": teacher_ev,
           "shipped_thresholds": shipped, "wall_seconds": round(time.perf_counter() - t_call, 1),
           "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"}
    (out / "allocate.json").write_text(json.dumps(rec, indent=1))
    say(f"done in {rec['wall_seconds']} s")


if __name__ == "__main__":
    main()

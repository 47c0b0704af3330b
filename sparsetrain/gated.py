"""The gated campaign: continue a shipped sparse model with a low-rank predictor in the loop (device machine).

The threshold-rule model (``job.py``'s campaign) keeps the text quality but its active sets are hard to predict:
at recall 0.95 a separately trained low-rank predictor marks about 3.5x the active neurons, so the flash path reads
most of the FFN. Here each layer's predictor becomes part of the model (``model.Gate``): the FFN may only use the
neurons the gate selects, and training (distillation, as before) teaches the FFN to live with that and the gate to
select well. Recall is then 1 by construction; what is measured is perplexity at a given fraction of neurons read.

Here, once:     python3 -m sparsetrain.job prepare              (the GGUF halves, tokenized corpora, prompts)
Device call 1:  python3 -m sparsetrain.gated stage-a            (carry .device-stage/sparsify-1; committed artifacts
                                                                 moved out of the tree so that it fits 64 MiB)
Device call 2:  python3 -m sparsetrain.gated stage-b            (the tree with llmflash/artifacts/smollm2-relu and
                                                                 predictors/artifacts/smollm2-relu: the starting point)
Device call 3:  python3 -m sparsetrain.gated run --deadline-s 560   (carry .device-stage/sparsify-2; artifacts out):
                samples text from the original model, trains, exports the artifact with its gate, evaluates the
                held-out corpora and a frontier of (fraction read, sparsity) points; all lands in $OUT (8 files).

On the CPU (tests/test_sparsetrain.py): ``--base DIR --no-compile``, and ``--artifact none --gate-init none`` to start
from the base model with fresh gates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Optional

import torch

from .data import WindowSampler
from .job import (
    MIX,
    REPO,
    base_files,
    build_model,
    load_streams,
    run_record,
    sample_text,
    say,
    stage,
    teacher_eval,
    tmp_root,
)
from .model import CompactLlama, Shape, hf_state, load_hf_state
from .train import Recipe, Trainer

ARTIFACT = REPO / "llmflash" / "artifacts" / "smollm2-relu"
PREDICTORS = REPO / "predictors" / "artifacts" / "smollm2-relu-lowrank"
GATE_DIR = "gate"  # the gate's predictor set inside the artifact directory
KEEPS = tuple(float(v) for v in os.environ.get("SPARSIFY_KEEPS", "0.16,0.20,0.24,0.28,0.32,0.40").split(","))
CALIB_TOKENS = int(os.environ.get("SPARSIFY_CALIB_TOKENS", "65536"))


def stage_b() -> None:
    """Copy the shipped artifact and its predictors (the starting point) to the device's /tmp."""
    root = tmp_root() / "start"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(ARTIFACT, root / "artifact")
    if PREDICTORS.is_dir():  # the gated campaign's starting gates (optional: a plain continuation needs none)
        shutil.copytree(PREDICTORS, root / "predictors")
    say(f"staged the starting point in {root}")


# ---------------------------------------------------------------------------------------------------------------
# The student


def start_student(shape: Shape, base_state: dict, artifact: Optional[Path], lora_rank: int,
                  act: Optional[str] = None) -> tuple[CompactLlama, dict]:
    """The student: the base model with the artifact's deltas applied (or the base itself), its thresholds set; ``act``
    swaps the activation (a SiLU model continued as the ReLU arm: SiLU blends into the shifted ReLU while training).
    Returns (student, the artifact's config and tensors, for composing the attention deltas at export)."""
    from llmflash.sparse_model import decode_deltas, read_artifact

    if artifact is None:
        model = build_model(shape, base_state, act=act or "silu", sparse=True, lora_rank=lora_rank)
        return model, {"config": {"activation": act or "silu", "target_sparsity": 0.0}, "tensors": {}}
    cfg, tensors = read_artifact(artifact)
    state = decode_deltas(base_state, tensors)
    model = CompactLlama(shape, act or cfg["activation"], True, lora_rank)
    load_hf_state(model, state)  # act_bias included, when the artifact has one
    model.set_rule(cfg.get("rule_on", "h"))
    model.set_thresholds(cfg["thresholds"])
    return model, {"config": cfg, "tensors": tensors}


def add_gates(model: CompactLlama, predictors: Optional[Path], rank: int) -> None:
    """A gate per layer: from a trained predictor set (weights and cuts), else fresh (rank ``rank``, cut 0)."""
    if predictors is None:
        for ffn in model.ffns():
            ffn.add_gate(rank)
        return
    from llmflash.predictor import PredictorSet

    ps = PredictorSet.load(predictors, dtype=torch.float32)
    ps.check_compatible(model.shape.n_layers, model.shape.d_model, model.shape.d_ffn)
    for i, ffn in enumerate(model.ffns()):
        a, b, bias, cut = ps.layer_weights(i)
        gate = ffn.add_gate(a.shape[0])
        with torch.no_grad():
            gate.down.weight.copy_(a)
            gate.up.weight.copy_(b)
            gate.up.bias.copy_(bias)
            gate.cut.fill_(cut)


@torch.no_grad()
def calibrate_gates(trainer: Trainer, model: CompactLlama, keep: float, sparsity: float, tokens: Optional[int] = None,
                    passes: int = 2) -> None:
    """Set every layer's cut (fraction ``keep`` let through) and threshold (``sparsity`` zeros overall, ungated
    neurons counted as zeros) on training-mix windows; ``passes`` rounds, since a layer's input moves with the cuts
    before it. ``sparsity <= 1 - keep`` means no threshold: the gate alone decides."""
    sampler = WindowSampler(trainer.sampler.streams, trainer.sampler.weights, trainer.r.seq_len, seed=12345)
    ids = sampler.batch(max(1, (tokens or CALIB_TOKENS) // trainer.r.seq_len)).to(trainer.device)
    for _ in range(passes):
        zs: list[list[torch.Tensor]] = [[] for _ in model.layers]
        hs_: list[list[torch.Tensor]] = [[] for _ in model.layers]
        for b in range(0, ids.shape[0], 8):
            with trainer.autocast:
                _, _, hs, ins = model(ids[b : b + 8])
                for i, (ffn, h, x) in enumerate(zip(model.ffns(), hs, ins)):
                    z = ffn.gate(x).float().reshape(-1)  # type: ignore[misc]
                    sel = torch.randint(0, z.numel(), (min(z.numel(), 1 << 18),), device=z.device)
                    zs[i].append(z[sel])
                    hs_[i].append(h.abs().float().reshape(-1)[sel])
        for ffn, z_parts, h_parts in zip(model.ffns(), zs, hs_):
            z, h = torch.cat(z_parts), torch.cat(h_parts)
            zs_sorted = z.sort().values
            cut = zs_sorted[min(max(0, int((1 - keep) * z.numel())), z.numel() - 1)]
            ffn.gate.cut.fill_(float(cut))  # type: ignore[union-attr]
            if sparsity <= 1 - keep:
                ffn.threshold.zero_()
                continue
            g = (h * (z >= cut)).sort().values
            ffn.threshold.fill_(float(g[min(max(0, int(sparsity * g.numel()) - 1), g.numel() - 1)]))


def evaluate_both(trainer: Trainer, model: CompactLlama, teacher: dict, max_tokens: int, seqs=(512, 2048)) -> dict:
    out: dict = {"student": {}, "teacher": teacher, "ratio": {}}
    for seq in seqs:
        ev = trainer.evaluate(seq, max_tokens, model=model)
        out["student"][str(seq)] = ev
        out["ratio"][str(seq)] = {k: ev[k]["ppl"] / teacher[str(seq)][k]["ppl"] for k in ev}
    return out


def frontier(trainer: Trainer, model: CompactLlama, teacher: dict, max_tokens: int) -> list[dict]:
    """Per fraction read (the gate's keep): the gate alone, and the gate plus a threshold at half of it (an
    over-prediction of 2 against the threshold rule). 2048-token windows."""
    saved = ([float(f.gate.cut) for f in model.ffns()], model.thresholds())  # type: ignore[union-attr]
    rows = []
    for keep in KEEPS:
        for over in (1.0, 2.0):
            calibrate_gates(trainer, model, keep, 1 - keep / over)
            ev = trainer.evaluate(2048, max_tokens, model=model)
            for name, v in ev.items():
                rows.append({"keep": keep, "over_prediction": over, "seq_len": 2048, "corpus": name, "ppl": v["ppl"],
                             "ppl_ratio": v["ppl"] / teacher["2048"][name]["ppl"], "zeros": 1 - v["active_fraction"],
                             "read_fraction": v["read_fraction"]})
            say(f"frontier keep {keep} over {over}: " + ", ".join(
                f"{r['corpus']} {r['ppl_ratio']:.3f}" for r in rows[-len(ev):]))
    for ffn, c, t in zip(model.ffns(), *saved):
        ffn.gate.cut.fill_(c)  # type: ignore[union-attr]
        ffn.threshold.fill_(t)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Export


def export(trainer: Trainer, start: dict, base_state: dict, out: Path, record: dict, args) -> dict:
    """Write the artifact (int4 FFN deltas, attention LoRA composed with the starting artifact's, the gate as a
    predictor set in ``gate/``) into ``out``, evaluate what ships."""
    from llmflash.predictor import LowRankPredictor, PredictorSet
    from llmflash.sparse_model import decode_deltas, encode_deltas, lora_factors, write_artifact

    student = trainer.student
    shape = student.shape
    trained = {k: v.cpu() for k, v in hf_state(student).items()}
    lora = {}
    old = start["tensors"]
    for i, layer in enumerate(student.layers):
        for name, mod in layer.self_attn.lora.items():
            key = f"model.layers.{i}.self_attn.{name}.weight"
            a, b = mod.A.detach().float().cpu() * mod.scale, mod.B.detach().float().cpu()
            if key + ".lora_A" in old:  # compose: B_old A_old + B A = [B_old B] [A_old; A]
                a_old, b_old = lora_factors(old, key)
                a = torch.cat([a_old, a])
                b = torch.cat([b_old, b], dim=1)
            lora[key] = (a, b)
    base_cpu = {k: v.cpu() for k, v in base_state.items()}
    tensors = encode_deltas(base_cpu, trained, lora, shape.n_layers)
    applied_state = decode_deltas(base_cpu, tensors)
    applied = CompactLlama(shape, trainer.r.arm, True, 0)
    load_hf_state(applied, applied_state)
    applied.set_rule(student.rule_on())
    if not trainer.gated:
        return _export_plain(trainer, applied.to(trainer.device), tensors, shape, out, record, args)
    for src, dst in zip(student.ffns(), applied.ffns()):
        gate = dst.add_gate(src.gate.down.weight.shape[0])  # type: ignore[union-attr]
        gate.load_state_dict({k: v.detach().cpu() for k, v in src.gate.state_dict().items()})  # type: ignore[union-attr]
    applied = applied.to(trainer.device)
    calibrate_gates(trainer, applied, trainer.r.gate_keep_final, trainer.r.target_sparsity)
    teacher = teacher_eval(trainer, Path(args.work), args.eval_tokens)
    ev = evaluate_both(trainer, applied, teacher, args.eval_tokens)
    say(f"shipped point (keep {trainer.r.gate_keep_final}, sparsity {trainer.r.target_sparsity}): ratio {json.dumps(ev['ratio'])}")
    fr = frontier(trainer, applied, teacher, args.frontier_tokens) if args.frontier_tokens else []
    cuts = [float(f.gate.cut) for f in applied.ffns()]  # type: ignore[union-attr]
    thresholds = applied.thresholds()
    cfg = {"base": "smollm2", "activation": trainer.r.arm, "n_layers": shape.n_layers, "d_ffn": shape.d_ffn,
           "target_sparsity": trainer.r.target_sparsity, "thresholds": thresholds,
           "gate": {"dir": GATE_DIR, "keep": trainer.r.gate_keep_final, "cuts": cuts},
           "delta_encoding": {"ffn": "int4, symmetric, groups of 64 inputs, fp16 scales",
                              "attention": f"LoRA rank {next(iter(lora.values()))[0].shape[0] if lora else 0}, fp16",
                              "norms": "fp32", "gate": "a low-rank predictor set (llmflash-predictors/1, fp16)"},
           "training": {**record, "shipped_eval": ev}}
    write_artifact(out, tensors, cfg, shape.n_layers, shards=4)
    modules = []
    for f in applied.ffns():
        g = f.gate
        m = LowRankPredictor(shape.d_model, shape.d_ffn, g.down.weight.shape[0])  # type: ignore[union-attr]
        m.down.weight.data.copy_(g.down.weight.detach().cpu())  # type: ignore[union-attr]
        m.up.weight.data.copy_(g.up.weight.detach().cpu())  # type: ignore[union-attr]
        m.up.bias.data.copy_(g.up.bias.detach().cpu())  # type: ignore[union-attr]
        modules.append(m)
    meta = {"model": "smollm2-relu", "d_model": shape.d_model, "d_ffn": shape.d_ffn, "gate": True,
            "rule": {"kind": "threshold", "thresholds": thresholds, "target_sparsity": trainer.r.target_sparsity},
            "training": {"in_the_loop": True, "keep": trainer.r.gate_keep_final, "tokens": record["tokens"]}}
    PredictorSet.from_modules(modules, cuts, meta).save(out / GATE_DIR)
    return {"eval": ev, "frontier": fr}


def _export_plain(trainer: Trainer, applied: CompactLlama, tensors: dict, shape: Shape, out: Path, record: dict,
                  args) -> dict:
    """A continuation without gates (e.g. ``--rule act``): thresholds recalibrated on the applied model, evaluation,
    the sparsity frontier and the probe (read fraction of a rank-128 predictor at recall 0.95)."""
    from llmflash.sparse_model import lora_rank, write_artifact

    from .job import calibrate, run_probe
    from .job import frontier as sparsity_frontier

    applied.set_thresholds(calibrate(trainer, applied, trainer.r.target_sparsity))
    teacher = teacher_eval(trainer, Path(args.work), args.eval_tokens)
    ev = evaluate_both(trainer, applied, teacher, args.eval_tokens)
    say(f"shipped point (sparsity {trainer.r.target_sparsity}, rule on {applied.rule_on()}): ratio {json.dumps(ev['ratio'])}")
    fr = sparsity_frontier(trainer, applied, teacher, args.frontier_tokens) if args.frontier_tokens else []
    probe = run_probe(trainer, applied)
    say(f"probe: {json.dumps(probe['summary'])}")
    rank = lora_rank(tensors)
    cfg = {"base": "smollm2", "activation": trainer.r.arm, "n_layers": shape.n_layers, "d_ffn": shape.d_ffn,
           "target_sparsity": trainer.r.target_sparsity, "thresholds": applied.thresholds(),
           "rule_on": applied.rule_on(),
           "delta_encoding": {"ffn": "int4, symmetric, groups of 64 inputs, fp16 scales",
                              "attention": f"LoRA rank {rank}, fp16", "norms": "fp32"},
           "training": {**record, "shipped_eval": ev, "shipped_probe": probe["summary"]}}
    write_artifact(out, tensors, cfg, shape.n_layers, shards=4)
    return {"eval": ev, "frontier": fr, "probe": probe}


# ---------------------------------------------------------------------------------------------------------------


def run(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline_at = time.time() + args.deadline_s
    t_call = time.perf_counter()
    shape, state = base_files(work, args.base)
    say(f"base ready: {shape}")
    if args.sample_budget_s > 0:
        sample_text(work, shape, state, args.device, args.sample_budget_s, args.sample_batch, args.sample_max_new)
    artifact = None if args.artifact == "none" else Path(args.artifact)
    gate_init = None if args.gate_init == "none" else Path(args.gate_init)
    student, start = start_student(shape, state, artifact, args.lora_rank, args.arm)
    if args.rule:
        student.set_rule(args.rule)
    if args.keep > 0:
        add_gates(student, gate_init, args.gate_rank)
    teacher = build_model(shape, state)
    if args.device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)
    train, held, _ = load_streams(work)
    sampler = WindowSampler(train, {k: v for k, v in MIX.items() if k in train}, args.seq_len, seed=7)
    recipe = Recipe(arm=args.arm or start["config"]["activation"], target_sparsity=args.target_sparsity,
                    sparsity_start=(args.sparsity_start if args.sparsity_start is not None
                                    else float(start["config"].get("target_sparsity") or 0.0)),
                    gate_keep_start=args.keep_start,
                    gate_keep_final=args.keep, total_steps=args.total_steps, ramp_start=0.0, ramp_end=args.ramp_end,
                    tokens_per_step=args.tokens_per_step, micro_batch_seqs=args.micro_batch_seqs, seq_len=args.seq_len,
                    lr_ffn=args.lr_ffn, lr_lora=args.lr_lora, lr_gate=args.lr_gate, warmup_steps=args.warmup_steps,
                    eval_every=args.eval_every, lora_rank=args.lora_rank, compile=not args.no_compile,
                    gate_loss_weight=args.gate_loss_weight, gate_ste=args.ste, l1_final=args.l1_final,
                    anneal_frac=args.anneal_frac)
    trainer = Trainer(student, teacher, sampler, recipe, held, args.device, log_fn=lambda m: say(f"gated: {m}"))
    gdir = work / "gated"
    gdir.mkdir(parents=True, exist_ok=True)
    ck = gdir / "ckpt.pt"
    if ck.is_file():
        trainer.resume(ck)
        say(f"resumed at step {trainer.state.step}")
    trainer.train(min(args.stop_step, args.total_steps), time_budget_s=max(0.0, deadline_at - args.reserve_s - time.time()),
                  curve_path=gdir / "curve.csv")
    trainer.checkpoint(ck)
    record = {**run_record(trainer, work, args, "gated" if trainer.gated else "continued"), "rule_on": student.rule_on(),
              "start": {"artifact": str(artifact), "gate_init": str(gate_init) if trainer.gated else None},
              "wall_seconds_this_call": None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = export(trainer, start, state, gdir / "artifact", record, args)
    record["wall_seconds_this_call"] = round(time.perf_counter() - t_call, 1)
    (gdir / "final.json").write_text(json.dumps({"record": record, **res}, indent=1))
    for p in (gdir / "artifact").rglob("*"):
        if p.is_file():
            dst = out / p.relative_to(gdir / "artifact").name
            shutil.copy(p, dst)  # flat: 4 delta shards, sparse_model.json, predictors.json/.safetensors
    with tarfile.open(out / "gated.tar.gz", "w:gz") as tf:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".csv") and "artifact" not in p.parts:
                tf.add(p, arcname=str(p.relative_to(work)))
    say(f"done: steps {trainer.state.step}, tokens {trainer.state.tokens}, ratio {json.dumps(res['eval']['ratio'])}")


def eval_trainer(args, tag: str) -> tuple[Trainer, Path]:
    """A trainer that only evaluates: the artifact ``args.artifact`` (or ``none``: the base) as the student beside
    the original, the staged streams, no compilation. Returns it and the work directory."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape, state = base_files(work, args.base)
    model, start = start_student(shape, state, None if args.artifact == "none" else Path(args.artifact), 0)
    teacher = build_model(shape, state)
    if args.device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)
    train, held, _ = load_streams(work)
    sampler = WindowSampler(train, {k: v for k, v in MIX.items() if k in train}, args.seq_len, seed=7)
    recipe = Recipe(arm=start["config"]["activation"], compile=False, seq_len=args.seq_len,
                    micro_batch_seqs=args.micro_batch_seqs, lora_rank=0)
    return Trainer(model, teacher, sampler, recipe, held, args.device, log_fn=lambda m: say(f"{tag}: {m}")), work


def frontier_main(args) -> None:
    """Evaluate an artifact (``--artifact``): first as it ships (its own thresholds: rows with target_sparsity
    "shipped"), then per target sparsity of ``SPARSIFY_FRONTIER``, thresholds calibrated on training-mix windows;
    perplexity on every held-out corpus (512 and 2048 windows, ``--eval-tokens`` each) beside the original's.
    Writes $OUT/frontier.json."""
    from .job import frontier as sparsity_frontier

    t0 = time.perf_counter()
    trainer, work = eval_trainer(args, "frontier")
    trainer.eval_batch_tokens = args.eval_batch_tokens
    if args.corpora:  # a subset of the held-out corpora (e.g. the hardest one, on a CPU)
        keep = args.corpora.split(",")
        missing = sorted(set(keep) - set(trainer.held_out))
        if missing:
            raise SystemExit(f"--corpora: no held-out corpus {', '.join(missing)} (have {', '.join(trainer.held_out)})")
        trainer.held_out = {k: v for k, v in trainer.held_out.items() if k in keep}
    model = trainer.student
    teacher_ev = teacher_eval(trainer, work, args.eval_tokens)
    rows = sparsity_frontier(trainer, model, teacher_ev, args.eval_tokens, shipped=True)
    for r in rows:
        say(f"{r['target_sparsity']} {r['seq_len']} {r['corpus']}: ratio {r['ppl_ratio']:.4f}, zeros {r['zeros']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [int(n) for n in args.teacher_tokens.split(",") if n]  # the original at other budgets (earlier runs' ratios)
    teacher_at = {str(n): {str(seq): trainer.evaluate(seq, n, model=trainer.teacher) for seq in (512, 2048)} for n in extra}
    rec = {"artifact": str(args.artifact), "rule_on": model.rule_on(), "eval_tokens": args.eval_tokens,
           "calibration": "training-mix windows (sources present in this call)", "teacher": teacher_ev, "rows": rows,
           "teacher_at": teacher_at, "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / "frontier.json").write_text(json.dumps(rec, indent=1))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.gated")
    ap.add_argument("what", choices=("stage-a", "stage-b", "run", "frontier"))
    ap.add_argument("--work", default=str(tmp_root()))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparsify-out"))
    ap.add_argument("--base", default=None, help="a Hugging Face model directory instead of the staged GGUF")
    ap.add_argument("--artifact", default=str(tmp_root() / "start" / "artifact"), help="starting artifact, or none")
    ap.add_argument("--gate-init", default=str(tmp_root() / "start" / "predictors"), help="predictor set, or none")
    ap.add_argument("--gate-rank", type=int, default=128, help="rank of fresh gates (--gate-init none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--deadline-s", type=float, default=560.0)
    ap.add_argument("--reserve-s", type=float, default=150.0)
    ap.add_argument("--stop-step", type=int, default=10**9)
    ap.add_argument("--total-steps", type=int, default=600)
    ap.add_argument("--ramp-end", type=float, default=0.5)
    ap.add_argument("--keep-start", type=float, default=0.6)
    ap.add_argument("--keep", type=float, default=0.28,
                    help="fraction of neurons the gates let through (final); 0: no gates, a plain continuation")
    ap.add_argument("--arm", choices=("silu", "relu"), default=None,
                    help="the activation to train (default: the starting artifact's); relu: SiLU blends into a shifted "
                         "ReLU over --anneal-frac of the plan, with the L1 pressure rising to --l1-final (ProSparse)")
    ap.add_argument("--anneal-frac", type=float, default=0.08)
    ap.add_argument("--l1-final", type=float, default=0.05)
    ap.add_argument("--rule", choices=("h", "act"), default=None,
                    help="what the thresholds compare: |h| (the product) or |act(gate x)| alone (default: the artifact's)")
    ap.add_argument("--sparsity-start", type=float, default=None,
                    help="scheduled sparsity before the ramp (default: the starting artifact's target)")
    ap.add_argument("--target-sparsity", type=float, default=0.86)
    ap.add_argument("--tokens-per-step", type=int, default=65_536)
    ap.add_argument("--micro-batch-seqs", type=int, default=16)  # 235k tokens/s on the H200, 8: 154k (bench)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lr-ffn", type=float, default=5e-5)
    ap.add_argument("--lr-lora", type=float, default=5e-4)
    ap.add_argument("--lr-gate", type=float, default=5e-4)
    ap.add_argument("--gate-loss-weight", type=float, default=0.1)
    ap.add_argument("--ste", action="store_true", help="straight-through gradient from the task loss to the gates")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=131_072)
    ap.add_argument("--eval-batch-tokens", type=int, default=0,
                    help="frontier: tokens per evaluation batch (0: 16 windows; a CPU wants about 4096)")
    ap.add_argument("--corpora", default="", help="frontier: only these held-out corpora (comma-separated; default all)")
    ap.add_argument("--frontier-tokens", type=int, default=65_536)
    ap.add_argument("--teacher-tokens", default="",
                    help="frontier: also score the original on the first N tokens of each corpus (comma-separated Ns)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sample-budget-s", type=float, default=45.0)
    ap.add_argument("--sample-batch", type=int, default=2048)
    ap.add_argument("--sample-max-new", type=int, default=384)
    args = ap.parse_args(argv)
    if args.what == "stage-a":
        stage()
    elif args.what == "stage-b":
        stage_b()
    elif args.what == "frontier":
        frontier_main(args)
    else:
        run(args)


if __name__ == "__main__":
    main()

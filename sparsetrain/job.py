"""The sparse-SmolLM2 campaign on the device machine, in three calls, and its preparation here.

The device machine has no network and none of the model files. SmolLM2's GGUF (98 MB) does not fit one call's 64 MiB,
so it travels in two git-ignored halves (``.device-stage/sparsify-1`` and ``-2``); the second half travels with the
tokenized corpora, the prompts and the ``gguf`` wheel. /tmp on that machine survives back-to-back calls (30 s warm).

Here, once:       python3 -m sparsetrain.job prepare            (tokenizes the corpora, builds prompts, splits the GGUF)
Device call 1:    python3 -m sparsetrain.job stage               (carry .device-stage/sparsify-1)
Device call 2:    python3 -m sparsetrain.job ab --deadline-s 570  (carry .device-stage/sparsify-2): assembles the GGUF,
                  samples text from the original model, trains both arms side by side (one process each), evaluates
                  and probes each, checkpoints both in /tmp
Device call 3:    python3 -m sparsetrain.job final --deadline-s 570: continues the winner, exports the artifact
                  (``llmflash.sparse_model`` format) and evaluates what ships; everything lands in $OUT.

For a CPU smoke test on a tiny model: ``--base DIR`` (a Hugging Face model directory) and ``--work DIR`` with
``--no-compile`` (tests/test_sparsetrain.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import HELD_OUT, TRAIN, WindowSampler, build_data, build_prompts, eval_windows, pack_samples
from .model import CompactLlama, Shape, hf_state, load_hf_state
from .probe import probe_layer, summarize
from .train import Recipe, Trainer, tokens_per_s_and_mfu

REPO = Path(__file__).resolve().parent.parent
STAGE_DIRS = [REPO / ".device-stage" / "sparsify-1", REPO / ".device-stage" / "sparsify-2"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PART1_BYTES = 50 * 1024 * 1024  # with part 2 and the tree, each call stays under 64 MiB
ARMS = ("silu", "relu")
FRONTIER = tuple(float(v) for v in os.environ.get("SPARSIFY_FRONTIER", "0.80,0.85,0.88,0.90,0.92,0.94").split(",")
                 if v.strip())  # "": no recalibrated targets (``gated frontier``: the shipped point alone)
CALIB_TOKENS = int(os.environ.get("SPARSIFY_CALIB_TOKENS", "65536"))  # training-mix tokens per threshold calibration
PROBE_STEPS = int(os.environ.get("SPARSIFY_PROBE_STEPS", "300"))  # optimizer steps of each layer's probe predictor
PROBE_TOKENS = int(os.environ.get("SPARSIFY_PROBE_TOKENS", "32768"))  # training tokens of the probe
MIX = {"generated": 0.55, "bigbench": 0.25, "wiki_train": 0.20}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Preparation (CPU, here)


def prepare(n_chat: int, n_raw: int) -> None:
    from transformers import AutoTokenizer

    from llmflash.models import smollm2_gguf_path
    from llmflash.text import wiki_articles

    from .data import source_docs

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for d in STAGE_DIRS:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    raw = gguf.read_bytes()
    (STAGE_DIRS[0] / "gguf.part-1").write_bytes(raw[:PART1_BYTES])
    (STAGE_DIRS[1] / "gguf.part-2").write_bytes(raw[PART1_BYTES:])
    (STAGE_DIRS[1] / "gguf.sha256").write_text(hashlib.sha256(raw).hexdigest())
    say("tokenizing corpora")
    desc = build_data(tok, STAGE_DIRS[1] / "tokens.npz")
    say(json.dumps(desc))
    import re

    titles = []
    for doc in wiki_articles("train"):
        m = re.match(r"([^.,;(]{3,60}?)\s+(is|was|are|were|refers)\b", doc)
        if m:
            titles.append(m.group(1).strip())
    openings = wiki_articles("train") + source_docs("bigbench:")
    prompts = build_prompts(tok, titles, openings, n_chat, n_raw)
    flat = np.concatenate([np.asarray(p, dtype=np.uint16) for p in prompts])
    lens = np.asarray([len(p) for p in prompts], dtype=np.int32)
    np.savez_compressed(STAGE_DIRS[1] / "prompts.npz", flat=flat, lens=lens)
    (STAGE_DIRS[1] / "prompts.json").write_text(json.dumps(
        {"prompts": len(prompts), "chat": n_chat, "raw": n_raw, "topics": len(titles),
         "eos_id": tok.eos_token_id, "examples": [tok.decode(p) for p in prompts[:3] + prompts[-2:]]}, indent=1))
    wheel_dir = STAGE_DIRS[1]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "gguf==0.19.0",
                    "-d", str(wheel_dir)], check=True)
    sizes = {str(d): sum(f.stat().st_size for f in d.iterdir()) / 2**20 for d in STAGE_DIRS}
    say(f"stage ready (MiB): {sizes}")


# ---------------------------------------------------------------------------------------------------------------
# On the device machine


def tmp_root() -> Path:
    return Path(os.environ.get("SPARSIFY_TMP", "/tmp/sparsify"))


def stage() -> None:
    root = tmp_root()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(STAGE_DIRS[0] / "gguf.part-1", root / "gguf.part-1")
    say(f"staged part 1 in {root}; GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")


def assemble() -> Path:
    root = tmp_root()
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = gguf_dir / GGUF_NAME
    if not out.is_file():
        data = (root / "gguf.part-1").read_bytes() + (STAGE_DIRS[1] / "gguf.part-2").read_bytes()
        want = (STAGE_DIRS[1] / "gguf.sha256").read_text().strip()
        if hashlib.sha256(data).hexdigest() != want:
            raise SystemExit("GGUF checksum mismatch: stage part 1 again")
        out.write_bytes(data)
    site = root / "site"
    if not site.is_dir():
        wheels = [str(p) for p in STAGE_DIRS[1].glob("gguf-*.whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                        *wheels], check=True)
    sys.path.insert(0, str(site))
    return out


def load_base(base: Optional[str]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if base is None:
        gguf = assemble()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.eval()


def base_files(work: Path, base: Optional[str]) -> tuple[Shape, dict]:
    """The base model's shape and float32 state (Hugging Face names), cached in ``work``."""
    path = work / "base.pt"
    if path.is_file():
        ck = torch.load(path, weights_only=False)
        return Shape(**ck["shape"]), ck["state"]
    hf = load_base(base)
    shape = Shape.from_hf_config(hf.config)
    state = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save({"shape": asdict(shape), "state": state}, path)
    return shape, state


def build_model(shape: Shape, state: dict, act: str = "silu", sparse: bool = False, lora_rank: int = 0) -> CompactLlama:
    model = CompactLlama(shape, act, sparse, lora_rank)
    load_hf_state(model, {k: v for k, v in state.items()})
    return model


def data_dir(work: Path) -> Path:
    """Where tokens.npz and prompts.npz are: $SPARSIFY_DATA, else the carried stage."""
    return Path(os.environ.get("SPARSIFY_DATA", str(STAGE_DIRS[1])))


def load_streams(work: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    d = data_dir(work)
    desc = json.loads((d / "tokens.json").read_text())
    z = np.load(d / "tokens.npz")
    train = {k: z[k] for k, v in desc.items() if v["split"] == "train"}
    held = {k: z[k] for k, v in desc.items() if v["split"] == "held_out"}
    gen = work / "generated.npy"
    if gen.is_file():
        train["generated"] = np.load(gen)
        desc["generated"] = {"split": "train", "source": "sampled from the original model", "tokens": int(train["generated"].size),
                             **json.loads((work / "generated.json").read_text())}
    return train, held, desc


def sample_text(work: Path, shape: Shape, state: dict, device: str, budget_s: float, batch: int, max_new: int) -> None:
    from .sample import generate

    if (work / "generated.npy").is_file():
        return
    d = data_dir(work)
    z = np.load(d / "prompts.npz")
    meta = json.loads((d / "prompts.json").read_text())
    flat, lens = z["flat"].astype(np.int64), z["lens"]
    offs = np.concatenate([[0], np.cumsum(lens)])
    prompts = [flat[offs[i] : offs[i + 1]].tolist() for i in range(len(lens))]
    rng = np.random.default_rng(int(time.time()))
    order = rng.permutation(len(prompts))  # a fresh draw of prompts every campaign
    prompts = [prompts[i] for i in order]
    model = build_model(shape, state).to(device).to(torch.bfloat16)
    t0 = time.perf_counter()
    samples = generate(model, prompts, max_new, meta["eos_id"], batch_size=batch, temperature=0.8, top_p=0.95,
                       seed=int(rng.integers(1 << 30)), time_budget_s=budget_s)
    dt = time.perf_counter() - t0
    done = [s for s in samples if s]
    arr = pack_samples(done, meta["eos_id"])
    new_tokens = sum(len(s) - len(p) for s, p in zip(samples, prompts) if s)
    np.save(work / "generated.npy", arr)
    info = {"prompts_used": len(done), "new_tokens": int(new_tokens), "seconds": round(dt, 1),
            "tokens_per_s": round(new_tokens / max(dt, 1e-9), 1), "temperature": 0.8, "top_p": 0.95,
            "max_new_tokens": max_new}
    (work / "generated.json").write_text(json.dumps(info))
    say(f"sampled {new_tokens} tokens from {len(done)} prompts in {dt:.0f} s")
    del model
    torch.cuda.empty_cache() if device.startswith("cuda") else None


def make_trainer(work: Path, arm: str, recipe: Recipe, device: str, base: Optional[str]) -> Trainer:
    shape, state = base_files(work, base)
    train, held, _ = load_streams(work)
    mix = {k: v for k, v in MIX.items() if k in train}
    sampler = WindowSampler(train, mix, recipe.seq_len, seed=recipe.seed + (0 if arm == "silu" else 1))
    student = build_model(shape, state, act=arm, sparse=True, lora_rank=recipe.lora_rank)
    teacher = build_model(shape, state)
    if device.startswith("cuda"):
        teacher = teacher.to(torch.bfloat16)
    return Trainer(student, teacher, sampler, replace(recipe, arm=arm), held, device, log_fn=lambda m: say(f"{arm}: {m}"))


@torch.no_grad()
def calibrate(trainer: Trainer, model: CompactLlama, sparsity: float, tokens: int = CALIB_TOKENS) -> list[float]:
    """Per-layer thresholds giving ``sparsity`` on training-mix windows (a fixed seed: the same text every time)."""
    sampler = WindowSampler(trainer.sampler.streams, trainer.sampler.weights, trainer.r.seq_len, seed=12345)
    n = max(1, tokens // trainer.r.seq_len)
    ids = sampler.batch(n).to(trainer.device)
    vals: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for b in range(0, n, 8):
        with trainer.autocast:
            _, _, hs, _ = model(ids[b : b + 8])
        for i, h in enumerate(hs):
            flat = h.abs().float().reshape(-1)
            idx = torch.randint(0, flat.numel(), (min(flat.numel(), 1 << 18),), device=flat.device)
            vals[i].append(flat[idx])
    out = []
    for v in vals:
        cat = torch.cat(v)
        if cat.numel() > 1 << 21:
            cat = cat[torch.randint(0, cat.numel(), (1 << 21,), device=cat.device)]
        srt = cat.sort().values
        out.append(float(srt[min(max(0, int(sparsity * srt.numel()) - 1), srt.numel() - 1)]))
    return out


@torch.no_grad()
def run_probe(trainer: Trainer, model: CompactLlama, train_tokens: int = PROBE_TOKENS, held_tokens: int = 16_384) -> dict:
    sampler = WindowSampler(trainer.sampler.streams, trainer.sampler.weights, trainer.r.seq_len, seed=777)
    ids_tr = sampler.batch(max(1, train_tokens // trainer.r.seq_len)).to(trainer.device)
    per = held_tokens // max(1, len(trainer.held_out))
    ho = [torch.from_numpy(s[: (min(per, s.size) // 512) * 512].astype(np.int64)).view(-1, 512)
          for s in trainer.held_out.values()]
    ids_ho = torch.cat(ho).to(trainer.device)

    def collect(ids: torch.Tensor, seq: int) -> tuple[list, list]:
        xs: list[list[torch.Tensor]] = [[] for _ in model.layers]
        ys: list[list[torch.Tensor]] = [[] for _ in model.layers]
        for b in range(0, ids.shape[0], max(1, 16384 // seq)):
            with trainer.autocast:
                _, _, hs, ins = model(ids[b : b + max(1, 16384 // seq)])
            for i, (ffn, h, x) in enumerate(zip(model.ffns(), hs, ins)):
                xs[i].append(x.reshape(-1, x.shape[-1]).float())
                ys[i].append((h.abs() > ffn.threshold.to(h.dtype)).reshape(-1, h.shape[-1]))
        return [torch.cat(v) for v in xs], [torch.cat(v) for v in ys]

    x_tr, y_tr = collect(ids_tr, ids_tr.shape[1])
    x_ho, y_ho = collect(ids_ho, 512)
    per_layer = []
    with torch.enable_grad():
        for i in range(len(model.layers)):
            per_layer.append(probe_layer(x_tr[i], y_tr[i], x_ho[i], y_ho[i], rank=128, steps=PROBE_STEPS))
    return {"summary": summarize(per_layer), "per_layer": per_layer, "rank": 128, "recall_target": 0.95,
            "train_tokens": int(ids_tr.numel()), "held_out_tokens": int(ids_ho.numel())}


def full_eval(trainer: Trainer, model: CompactLlama, teacher_eval: dict, max_tokens: int) -> dict:
    out: dict = {"student": {}, "teacher": teacher_eval}
    for seq in (512, 2048):
        out["student"][str(seq)] = trainer.evaluate(seq, max_tokens, model=model)
    out["ratio"] = {seq: {k: out["student"][seq][k]["ppl"] / teacher_eval[seq][k]["ppl"] for k in out["student"][seq]}
                    for seq in out["student"]}
    return out


def teacher_eval(trainer: Trainer, work: Path, max_tokens: int) -> dict:
    """The original model's held-out perplexities on the first ``max_tokens`` tokens of each corpus, computed once per
    work directory and budget (both arms share it)."""
    path = work / f"teacher_eval_{max_tokens}.json"
    if not path.is_file():
        ev = {str(seq): trainer.evaluate(seq, max_tokens, model=trainer.teacher) for seq in (512, 2048)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(ev))
        os.replace(tmp, path)
    return json.loads(path.read_text())


def recipe_from_args(args) -> Recipe:
    return Recipe(total_steps=args.total_steps, compile=not args.no_compile, ramp_end=args.ramp_end,
                  tokens_per_step=args.tokens_per_step, micro_batch_seqs=args.micro_batch_seqs, seq_len=args.seq_len,
                  eval_every=args.eval_every, target_sparsity=args.target_sparsity, lora_rank=args.lora_rank)


def run_record(trainer: Trainer, work: Path, args, arm: str) -> dict:
    """What a call's record says of its run: recipe, tokens, throughput, device, data."""
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    _, _, desc = load_streams(work)
    return {"arm": arm, "recipe": asdict(trainer.r), "steps": trainer.state.step, "tokens": trainer.state.tokens,
            "train_seconds": round(trainer.state.train_seconds, 1), **tokens_per_s_and_mfu(trainer, device_name),
            "device": device_name, "eval_tokens": args.eval_tokens, "data": desc, "mix": MIX,
            "held_out": {k: v[0] for k, v in HELD_OUT.items()}, "train_sources": {k: v[0] for k, v in TRAIN.items()}}


def export_and_record(trainer: Trainer, work: Path, arm: str, record: dict, base: Optional[str]) -> dict:
    """Export the arm's artifact into ``work/arm/artifact`` and append the call to ``work/arm/record.json``."""
    _, base_state = base_files(work, base)
    res = export(trainer, work, work / arm / "artifact", base_state, record)
    history = work / arm / "record.json"
    prev = json.loads(history.read_text()) if history.is_file() else {"calls": []}
    prev["calls"].append({**record, "eval": res["eval"], "probe": res["probe"]["summary"],
                          "probe_per_layer": res["probe"]["per_layer"], "frontier": res["frontier"]})
    history.write_text(json.dumps(prev, indent=1))
    return res


def arm_records(work: Path) -> dict[str, dict]:
    """Each arm's latest call record in the work directory."""
    return {arm: json.loads((work / arm / "record.json").read_text())["calls"][-1]
            for arm in ARMS if (work / arm / "record.json").is_file()}


def frontier(trainer: Trainer, model: CompactLlama, teacher_eval: dict, max_tokens: int,
             shipped: bool = False) -> list[dict]:
    """Per target sparsity (thresholds recalibrated on training-mix windows): each held-out corpus's perplexity, its
    ratio to the original's on the same tokens, and the measured zeros. ``shipped``: first the model as it is (its own
    thresholds), as rows whose target_sparsity is "shipped"."""
    saved = model.thresholds()
    rows = []
    same = {seq: all(teacher_eval[str(seq)][k]["tokens"] == eval_windows(v, seq, max_tokens).shape[0] * (seq - 1)
                     for k, v in trainer.held_out.items()) for seq in (512, 2048)}
    teacher = {str(seq): (teacher_eval[str(seq)] if same[seq] else trainer.evaluate(seq, max_tokens, model=trainer.teacher))
               for seq in (512, 2048)}  # the original on exactly the tokens the student is scored on
    for sp in (("shipped",) if shipped else ()) + FRONTIER:
        if sp != "shipped":
            model.set_thresholds(calibrate(trainer, model, sp))
        for seq in (512, 2048):
            ev = trainer.evaluate(seq, max_tokens, model=model)
            for name, v in ev.items():
                ref = teacher[str(seq)][name]
                assert ref["tokens"] == v["tokens"], (name, seq, ref["tokens"], v["tokens"])
                rows.append({"target_sparsity": sp, "seq_len": seq, "corpus": name, "ppl": v["ppl"],
                             "ppl_ratio": v["ppl"] / ref["ppl"], "tokens": v["tokens"],
                             "zeros": 1 - v["active_fraction"]})
    model.set_thresholds(saved)
    return rows


def arm_main(args) -> None:
    """One arm of the A/B (a process of its own): train until the deadline, checkpoint, evaluate, probe."""
    work = Path(args.work)
    recipe = recipe_from_args(args)
    trainer = make_trainer(work, args.arm, recipe, args.device, args.base)
    arm_dir = work / args.arm
    arm_dir.mkdir(parents=True, exist_ok=True)
    ck = arm_dir / "ckpt.pt"
    if ck.is_file():
        trainer.resume(ck)
        say(f"{args.arm}: resumed at step {trainer.state.step}")
    t0 = time.perf_counter()
    deadline = args.deadline_at - args.reserve_s
    trainer.train(args.stop_step, time_budget_s=max(0.0, deadline - time.time()), curve_path=arm_dir / "curve.csv")
    gpu_s = time.perf_counter() - t0
    trainer.checkpoint(ck)
    teacher_eval(trainer, work, args.eval_tokens)
    record = {**run_record(trainer, work, args, args.arm), "wall_seconds_this_call": round(gpu_s, 1)}
    res = export_and_record(trainer, work, args.arm, record, args.base)
    say(f"{args.arm}: done: steps {trainer.state.step}, ratio {json.dumps(res['eval']['ratio'])}, "
        f"zeros { {k: round(1 - v['active_fraction'], 4) for k, v in res['eval']['student']['2048'].items()} }, "
        f"probe {json.dumps(res['probe']['summary'])}")


def score(rec: dict) -> float:
    """Lower is better: mean held-out perplexity ratio (both windows) x (1 + predicted fraction at recall 0.95)."""
    ratios = [v for seq in rec["eval"]["ratio"].values() for v in seq.values()]
    return float(np.mean(ratios)) * (1 + rec["probe"]["predicted_active_fraction"])


def export(trainer: Trainer, work: Path, out_dir: Path, base_state: dict, record: dict) -> dict:
    from llmflash.sparse_model import decode_deltas, encode_deltas, write_artifact

    student = trainer.student
    shape = student.shape
    trained = hf_state(student)
    lora = {}
    for i, layer in enumerate(student.layers):
        for name, mod in layer.self_attn.lora.items():
            lora[f"model.layers.{i}.self_attn.{name}.weight"] = (mod.A.detach().float().cpu() * mod.scale,
                                                                 mod.B.detach().float().cpu())
    base_cpu = {k: v.cpu() for k, v in base_state.items()}
    tensors = encode_deltas(base_cpu, {k: v.cpu() for k, v in trained.items()}, lora, shape.n_layers)
    applied_state = decode_deltas(base_cpu, tensors)
    for i in range(shape.n_layers):
        applied_state.setdefault(f"model.layers.{i}.mlp.act_bias", torch.zeros(shape.d_ffn))
    applied = CompactLlama(shape, trainer.r.arm, True, 0).to(trainer.device)
    load_hf_state(applied, {k: v.to(trainer.device) for k, v in applied_state.items()})
    applied.set_thresholds(calibrate(trainer, applied, trainer.r.target_sparsity))
    teacher = teacher_eval(trainer, work, record["eval_tokens"])
    ev = full_eval(trainer, applied, teacher, record["eval_tokens"])
    fr = frontier(trainer, applied, teacher, record["eval_tokens"])
    probe = run_probe(trainer, applied)
    cfg = {"base": "smollm2", "activation": trainer.r.arm, "n_layers": shape.n_layers, "d_ffn": shape.d_ffn,
           "target_sparsity": trainer.r.target_sparsity, "thresholds": applied.thresholds(),
           "delta_encoding": {"ffn": "int4, symmetric, groups of 64 inputs, fp16 scales",
                              "attention": f"LoRA rank {trainer.r.lora_rank}, fp16", "norms": "fp32"},
           "training": {**record, "shipped_eval": ev, "shipped_probe": probe["summary"]}}
    write_artifact(out_dir, tensors, cfg, shape.n_layers, shards=4)
    return {"eval": ev, "frontier": fr, "probe": probe}


def orchestrate_ab(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    deadline_at = time.time() + args.deadline_s
    shape, state = base_files(work, args.base)
    say(f"base ready: {shape}")
    sample_text(work, shape, state, args.device, args.sample_budget_s, args.sample_batch, args.sample_max_new)
    procs = []
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms takes a comma list of {', '.join(ARMS)}, not {args.arms!r}")
    for arm in arms:  # one process each: side by side on the one GPU
        cmd = [sys.executable, "-m", "sparsetrain.job", "arm", "--arm", arm, "--work", str(work),
               "--deadline-at", str(deadline_at), "--stop-step", str(args.stop_step), *common_flags(args)]
        procs.append(subprocess.Popen(cmd, cwd=str(REPO)))
    codes = [p.wait() for p in procs]
    say(f"arms finished with exit codes {codes}")
    ship_winner(work, Path(args.out), args.arm)
    pack(work, Path(args.out), "ab")


def ship_winner(work: Path, out: Path, forced: Optional[str] = None) -> str:
    recs = arm_records(work)
    if not recs:
        raise SystemExit("no arm finished")
    winner = forced or min(recs, key=lambda a: score(recs[a]))
    say(f"scores: { {a: round(score(r), 4) for a, r in recs.items()} } -> winner {winner}")
    (work / "winner.txt").write_text(winner)
    dst = out / "artifact"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / winner / "artifact", dst)
    return winner


def common_flags(args) -> list[str]:
    flags = ["--device", args.device, "--total-steps", str(args.total_steps), "--ramp-end", str(args.ramp_end),
             "--tokens-per-step", str(args.tokens_per_step), "--micro-batch-seqs", str(args.micro_batch_seqs),
             "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every), "--eval-tokens", str(args.eval_tokens),
             "--reserve-s", str(args.reserve_s), "--target-sparsity", str(args.target_sparsity),
             "--lora-rank", str(args.lora_rank)]
    if args.base:
        flags += ["--base", args.base]
    if args.no_compile:
        flags.append("--no-compile")
    return flags


def pack(work: Path, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tf:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".csv", ".log"):
                tf.add(p, arcname=str(p.relative_to(work)))


def final_main(args) -> None:
    work = Path(args.work)
    deadline_at = time.time() + args.deadline_s
    recs = arm_records(work)
    if not recs:
        raise SystemExit("no arm records in the work directory: run `ab` first")
    chosen = work / "winner.txt"
    winner = args.arm or (chosen.read_text().strip() if chosen.is_file() else min(recs, key=lambda a: score(recs[a])))
    say(f"scores: { {a: round(score(r), 4) for a, r in recs.items()} } -> continuing {winner}")
    recipe = recipe_from_args(args)
    trainer = make_trainer(work, winner, recipe, args.device, args.base)
    trainer.resume(work / winner / "ckpt.pt")
    say(f"{winner}: resumed at step {trainer.state.step}")
    trainer.train(args.stop_step, time_budget_s=max(0.0, deadline_at - args.reserve_s - time.time()),
                  curve_path=work / winner / "curve.csv")
    trainer.checkpoint(work / winner / "ckpt.pt")
    record = {**run_record(trainer, work, args, winner), "arm_scores": {a: score(r) for a, r in recs.items()}}
    out = Path(args.out)
    res = export_and_record(trainer, work, winner, record, args.base)
    ship_winner(work, out, winner)
    (work / "final.json").write_text(json.dumps({"record": record, **res}, indent=1))
    say(f"shipped: ratio {json.dumps(res['eval']['ratio'])}; probe {json.dumps(res['probe']['summary'])}")
    pack(work, out, "final")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.job")
    ap.add_argument("what", choices=("prepare", "stage", "ab", "arm", "final"))
    ap.add_argument("--work", default=str(tmp_root()))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparsify-out"))
    ap.add_argument("--base", default=None, help="a Hugging Face model directory instead of the staged GGUF")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arm", default=None)
    ap.add_argument("--arms", default=",".join(ARMS), help="ab: the arms to train side by side (e.g. relu alone)")
    ap.add_argument("--deadline-s", type=float, default=570.0)
    ap.add_argument("--deadline-at", type=float, default=0.0)
    ap.add_argument("--reserve-s", type=float, default=150.0, help="seconds kept for checkpoint, evaluation, export")
    ap.add_argument("--stop-step", type=int, default=10**9)
    ap.add_argument("--total-steps", type=int, default=1100)
    ap.add_argument("--ramp-end", type=float, default=0.25)
    ap.add_argument("--tokens-per-step", type=int, default=65_536)
    ap.add_argument("--micro-batch-seqs", type=int, default=16)  # 235k tokens/s on the H200, 8: 154k (bench)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=131_072)
    ap.add_argument("--target-sparsity", type=float, default=0.90)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sample-budget-s", type=float, default=60.0)
    ap.add_argument("--sample-batch", type=int, default=2048)
    ap.add_argument("--sample-max-new", type=int, default=384)
    ap.add_argument("--n-chat", type=int, default=24_000)
    ap.add_argument("--n-raw", type=int, default=8_000)
    args = ap.parse_args(argv)
    if args.what == "prepare":
        prepare(args.n_chat, args.n_raw)
    elif args.what == "stage":
        stage()
    elif args.what == "ab":
        orchestrate_ab(args)
    elif args.what == "arm":
        arm_main(args)
    else:
        final_main(args)


if __name__ == "__main__":
    main()

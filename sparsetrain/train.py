"""Sparsity training by distillation: full-parameter FFN, LoRA attention, the threshold rule in the loop.

The student starts as the teacher (the original model) and learns, per step of ``tokens_per_step`` tokens:

- the KL divergence from the teacher's next-token distribution (all positions, full vocabulary);
- each layer's FFN output distilled to the teacher's (normalized squared error, weight ``ffn_loss_weight``);
- the ReLU arm only: an L1 pressure on |h| whose weight rises along a sine ramp (ProSparse);
- under a sparsity that rises along the same sine ramp to ``target_sparsity``: every step, each layer's threshold t_l
  is set to the quantile of |h| that gives the scheduled sparsity (measured on the step's first micro-batch).

Arms: ``silu`` keeps the original activation and learns to live with the threshold; ``relu`` swaps in a shifted ReLU
(blended from SiLU over ``anneal_frac`` of the run) and adds the L1 pressure.

Gated training (``gate_keep_final > 0``, the model's FFNs carry a ``Gate``): each layer's predictor is in the loop. Every
step its cut c_l is set to the quantile of its scores that lets the scheduled fraction of neurons through (from
``gate_keep_start`` down to ``gate_keep_final`` along the ramp), the threshold t_l is then the quantile of |h| over the
gated neurons that gives the scheduled sparsity, and the predictor learns from two signals: the task loss through the
straight-through mask, and a binary cross-entropy towards the threshold rule's own choice (|h| > t_l; weight
``gate_loss_weight``), which keeps it pointed at the neurons that matter.

A run is resumable (``checkpoint`` / ``resume``): the schedules are functions of the global step, so a campaign can be
chained from several shorter calls. The run record (``record.json``) holds tokens, tokens/s, MFU, GPU seconds, the
data mix and the loss curve (``curve.csv``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import WindowSampler, eval_windows
from .model import CompactLlama

log = logging.getLogger(__name__)

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Recipe:
    arm: str = "silu"  # silu | relu
    target_sparsity: float = 0.90
    total_steps: int = 2000  # the planned length: LR and sparsity schedules are fractions of it
    ramp_start: float = 0.02  # fraction of total_steps where the sparsity ramp starts
    ramp_end: float = 0.25  # ... and where it reaches the target (then holds)
    tokens_per_step: int = 65_536
    micro_batch_seqs: int = 16  # the H200 is launch-bound below this for a 135M model (sparsetrain.bench)
    seq_len: int = 2048
    lr_ffn: float = 1e-4
    lr_lora: float = 1e-3
    lr_norm: float = 3e-5
    lr_bias: float = 1e-3
    warmup_steps: int = 30
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ffn_loss_weight: float = 0.1
    l1_final: float = 0.05  # ReLU arm: weight of the relative L1 term at the end of the ramp
    anneal_frac: float = 0.08  # ReLU arm: fraction of total_steps over which SiLU blends into ReLU
    lora_rank: int = 16
    attn_full: bool = False  # train the attention weights outright (lr_ffn) instead of a LoRA on them
    compile: bool = True
    fused_loss: bool = True  # with ``compile``: the head, the KL and the FFN-output terms as one compiled graph
    quantile_tokens: int = 4096  # tokens of the first micro-batch whose |h| set the thresholds
    eval_every: int = 100
    eval_tokens: int = 16_384  # per held-out corpus, during training
    seed: int = 0
    sparsity_start: float = 0.0  # the scheduled sparsity before the ramp (a continuation starts where it was)
    gate_keep_start: float = 1.0  # gated training: fraction of neurons the gates let through before the ramp ...
    gate_keep_final: float = 0.0  # ... and after it (0: no gates)
    gate_loss_weight: float = 0.1
    lr_gate: float = 5e-4
    gate_ste: bool = False  # the task loss's straight-through gradient to the gates (else: BCE only)

    @property
    def micro_batches(self) -> int:
        return max(1, self.tokens_per_step // (self.micro_batch_seqs * self.seq_len))


def sine_ramp(step: int, total: int, start: float, end: float) -> float:
    """0 before ``start``, 1 after ``end`` (fractions of ``total``), sin^2 in between (a smooth S)."""
    a, b = start * total, end * total
    if step <= a:
        return 0.0
    if step >= b:
        return 1.0
    return math.sin(0.5 * math.pi * (step - a) / (b - a)) ** 2


def scheduled_sparsity(r: Recipe, step: int) -> float:
    return r.sparsity_start + (r.target_sparsity - r.sparsity_start) * sine_ramp(step, r.total_steps, r.ramp_start, r.ramp_end)


def scheduled_keep(r: Recipe, step: int) -> float:
    """Gated training: the fraction of neurons the gates let through at ``step``."""
    return r.gate_keep_start + (r.gate_keep_final - r.gate_keep_start) * sine_ramp(step, r.total_steps, r.ramp_start, r.ramp_end)


def lr_scale(r: Recipe, step: int) -> float:
    if step < r.warmup_steps:
        return (step + 1) / r.warmup_steps
    p = min(1.0, (step - r.warmup_steps) / max(1, r.total_steps - r.warmup_steps))
    return r.min_lr_frac + (1 - r.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p))


def kl_div(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || student); logits [N, V] (any float dtype)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distill_losses(s_hidden: Tensor, head: Tensor, t_logits: Tensor, s_outs: list[Tensor],
                   t_outs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(KL to the teacher over the vocabulary, the mean over layers of each FFN output's normalized squared error).

    s_hidden [B, T, d] (final norm applied), head [V, d] (the tied embedding), t_logits [B*T, V]; s_outs, t_outs per
    layer [B, T, d]. One function so that ``torch.compile`` fuses the log-softmaxes and the 30 small reductions."""
    s_logits = F.linear(s_hidden, head.to(s_hidden.dtype)).flatten(0, 1)
    kl = kl_div(s_logits, t_logits)
    terms = [((so.float() - to.float()).pow(2).mean() / to.float().pow(2).mean().clamp_min(1e-12))
             for so, to in zip(s_outs, t_outs)]
    return kl, torch.stack(terms).mean()


def param_groups(student: CompactLlama, r: Recipe) -> list[dict]:
    ffn, lora, norm, bias, gate = [], [], [], [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if ".mlp.gate." in name:
            gate.append(p)
        elif ".lora." in name:
            lora.append(p)
        elif name.endswith("act_bias"):
            bias.append(p)
        elif "norm" in name:
            norm.append(p)
        elif ".mlp." in name or ".self_attn." in name:  # full-parameter FFN (and attention with ``attn_full``)
            ffn.append(p)
    groups = [{"params": ffn, "lr": r.lr_ffn, "base_lr": r.lr_ffn, "weight_decay": r.weight_decay},
              {"params": lora, "lr": r.lr_lora, "base_lr": r.lr_lora, "weight_decay": 0.0},
              {"params": norm, "lr": r.lr_norm, "base_lr": r.lr_norm, "weight_decay": 0.0},
              {"params": bias, "lr": r.lr_bias, "base_lr": r.lr_bias, "weight_decay": 0.0},
              {"params": gate, "lr": r.lr_gate, "base_lr": r.lr_gate, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def freeze_for_training(student: CompactLlama, r: Recipe) -> None:
    """Train FFN weights, attention LoRA (or the attention weights with ``attn_full``), norms (and act_bias for the
    ReLU arm); freeze the embeddings (and the base attention weights under a LoRA)."""
    for name, p in student.named_parameters():
        trainable = (".mlp." in name and not name.endswith("act_bias")) or ".lora." in name or "norm" in name
        if r.attn_full and ".self_attn." in name and ".lora." not in name:
            trainable = True
        if name.endswith("act_bias"):
            trainable = r.arm == "relu"
        p.requires_grad_(trainable)


@dataclass
class State:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list = field(default_factory=list)


class Trainer:
    def __init__(self, student: CompactLlama, teacher: CompactLlama, sampler: WindowSampler, recipe: Recipe,
                 held_out: dict[str, np.ndarray], device: str, log_fn: Callable[[str], None] = print) -> None:
        self.r = recipe
        self.device = device
        self.student = student.to(device)
        self.teacher = teacher.to(device)
        self.sampler = sampler
        self.held_out = held_out
        self.eval_batch_tokens = 0  # tokens per evaluation batch; 0: 16 windows (a CPU wants fewer: full-vocabulary logits)
        self.log = log_fn
        for ffn in self.student.ffns():
            ffn.sparse = True
        freeze_for_training(self.student, recipe)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        fused = device.startswith("cuda")
        self.opt = torch.optim.AdamW(param_groups(self.student, recipe), betas=(0.9, 0.95), eps=1e-8, fused=fused)
        gate_ids = {id(p) for f in self.student.ffns() if f.gate is not None for p in f.gate.parameters()}
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self._model_params = [p for p in params if id(p) not in gate_ids]
        self._gate_params = [p for p in params if id(p) in gate_ids]
        self.state = State()
        self.gen = torch.Generator(device=device).manual_seed(recipe.seed)
        # bf16 autocast on the GPU; plain float32 on the CPU (tests), where bf16 matmuls of tiny shapes crawl
        self.autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if fused
                         else contextlib.nullcontext())
        for ffn in self.student.ffns():
            if ffn.gate is not None:
                ffn.gate.ste = recipe.gate_ste
        if recipe.compile:  # regional compilation: the 30 blocks share one compiled graph (fast to compile)
            for model in (self.student, self.teacher):
                for layer in model.layers:
                    layer.compile()
        self.s_fwd = self.student
        self.t_fwd = self.teacher
        self.flops_per_token = 4 * student.shape.flops_per_token(recipe.seq_len)  # student fwd+bwd (3x) + teacher fwd
        self.losses = (torch.compile(distill_losses) if recipe.compile and recipe.fused_loss and fused
                       else distill_losses)

    # ------------------------------------------------------------------------------------------------------------

    @property
    def gated(self) -> bool:
        return self.r.gate_keep_final > 0 and all(f.gate is not None for f in self.student.ffns())

    def _set_schedules(self, step: int) -> tuple[float, float]:
        r = self.r
        sp = scheduled_sparsity(r, step)
        l1 = r.l1_final * sine_ramp(step, r.total_steps, r.ramp_start, r.ramp_end) if r.arm == "relu" else 0.0
        mix = max(0.0, 1.0 - step / max(1.0, r.anneal_frac * r.total_steps)) if r.arm == "relu" else 0.0
        for ffn in self.student.ffns():
            ffn.silu_mix.fill_(mix)
        scale = lr_scale(r, step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        return sp, l1

    @torch.no_grad()
    def _sample_abs(self, hs: list[Tensor]) -> Tensor:
        """[L, S]: a strided sample of |h| per layer from the first ``quantile_tokens`` tokens (S <= 65536)."""
        return self._sample_rows(hs).abs()

    @torch.no_grad()
    def _sample_rows(self, ts: list[Tensor]) -> Tensor:
        """[L, S]: a strided sample of per-layer [B, T, n] tensors from the first ``quantile_tokens`` tokens."""
        n_tok = self.r.quantile_tokens
        rows = []
        for t in ts:
            flat = t.detach().reshape(-1, t.shape[-1])[:n_tok].reshape(-1)
            stride = max(1, flat.numel() // 65536)
            rows.append(flat[::stride][:65536])
        return torch.stack(rows).float()

    @torch.no_grad()
    def _update_gates(self, ins: list[Tensor], hs: list[Tensor], keep: float, sparsity: float) -> Tensor:
        """Gated training: cuts := the (1 - keep) quantile of each layer's scores, then thresholds := the ``sparsity``
        quantile of |h| with the ungated neurons counted as zeros. Returns the sampled gate-pass mask [L, S]."""
        ffns = self.student.ffns()
        z = self._sample_rows([f.gate(x) for f, x in zip(ffns, ins)])  # type: ignore[misc]
        k = min(max(0, int((1 - keep) * z.shape[1])), z.shape[1] - 1)
        cuts = z.sort(dim=1).values[:, k]
        for ffn, c in zip(ffns, cuts):
            ffn.gate.cut.copy_(c)  # type: ignore[union-attr]
        passed = z >= cuts.unsqueeze(1)
        self._update_thresholds(self._sample_abs(hs) * passed, sparsity)
        return passed

    @torch.no_grad()
    def _update_thresholds(self, sample: Tensor, sparsity: float) -> None:
        """Each layer's threshold := the ``sparsity`` quantile of its sampled |h| (one batched sort, no host sync)."""
        if sparsity <= 0:
            for ffn in self.student.ffns():
                ffn.threshold.zero_()
            return
        srt = sample.sort(dim=1).values
        k = min(max(0, int(sparsity * srt.shape[1]) - 1), srt.shape[1] - 1)
        for ffn, t in zip(self.student.ffns(), srt[:, k]):
            ffn.threshold.copy_(t)

    def step(self) -> dict:
        r = self.r
        st = self.state
        sp, l1_w = self._set_schedules(st.step)
        gated = self.gated
        keep = scheduled_keep(r, st.step) if gated else 1.0
        self.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        zero = torch.zeros((), device=self.device)
        stats = {"kl": zero, "ffn": zero, "l1": zero, "gate": zero}  # device tensors: one host sync per step
        active = zero
        for m in range(r.micro_batches):
            ids = self.sampler.batch(r.micro_batch_seqs).to(self.device, non_blocking=True)
            with torch.no_grad(), self.autocast:
                t_hidden, t_outs, _, _ = self.t_fwd(ids)
                t_logits = self.teacher.logits(t_hidden).flatten(0, 1)
            if gated and m == 0:  # cuts and thresholds from this micro-batch, before its forward pass
                with torch.no_grad(), self.autocast:
                    _, _, p_hs, p_ins = self.s_fwd(ids)
                    passed = self._update_gates(p_ins, p_hs, keep, sp)
                    del p_hs, p_ins
            with self.autocast:
                s_hidden, s_outs, s_hs, s_ins = self.s_fwd(ids)
                kl, ffn_loss = self.losses(s_hidden, self.student.embed_tokens.weight, t_logits, s_outs, t_outs)
            del t_logits
            loss = kl + r.ffn_loss_weight * ffn_loss
            if gated:
                with self.autocast:
                    pos_weight = torch.tensor(sp / max(1e-3, 1 - sp), device=self.device)  # inactive / active
                    bce_terms = [F.binary_cross_entropy_with_logits(
                        f.gate(x).float(), (h.detach().abs() > f.threshold).float(),  # type: ignore[misc]
                        pos_weight=pos_weight) for f, x, h in zip(self.student.ffns(), s_ins, s_hs)]
                gate_loss = torch.stack(bce_terms).mean()
                loss = loss + r.gate_loss_weight * gate_loss
                stats["gate"] = stats["gate"] + gate_loss.detach() / r.micro_batches
            if l1_w > 0:
                l1_terms = [h.float().abs().mean() / h.detach().float().abs().mean().clamp_min(1e-12) for h in s_hs]
                l1 = torch.stack(l1_terms).mean()
                loss = loss + l1_w * l1
                stats["l1"] = stats["l1"] + l1.detach() / r.micro_batches
            (loss / r.micro_batches).backward()
            stats["kl"] = stats["kl"] + kl.detach() / r.micro_batches
            stats["ffn"] = stats["ffn"] + ffn_loss.detach() / r.micro_batches
            if m == 0 and gated:
                with torch.no_grad():
                    thr = torch.stack([f.threshold for f in self.student.ffns()]).float().unsqueeze(1)
                    active = ((self._sample_abs(s_hs) > thr) & passed).float().mean()
            elif m == 0:
                with torch.no_grad():
                    sample = self._sample_abs(s_hs)  # [L, S]
                    thr = torch.stack([f.threshold for f in self.student.ffns()]).float().unsqueeze(1)
                    active = (sample > thr).float().mean()
                    self._update_thresholds(sample, sp)
        # the gates are clipped apart: their loss must not shrink the model's own updates through one global norm
        gnorm = torch.nn.utils.clip_grad_norm_(self._model_params, r.grad_clip)
        if self._gate_params:
            torch.nn.utils.clip_grad_norm_(self._gate_params, r.grad_clip)
        self.opt.step()
        vals = torch.stack([stats["kl"], stats["ffn"], stats["l1"], stats["gate"], active, gnorm.float()]).tolist()
        stats = dict(zip(("kl", "ffn", "l1", "gate"), vals[:4]))  # the step's one host sync
        active, gnorm = vals[4], vals[5]
        dt = time.perf_counter() - t0
        st.step += 1
        st.tokens += r.tokens_per_step
        st.train_seconds += dt
        row = {"step": st.step, "tokens": st.tokens, "seconds": round(st.train_seconds, 2), "sparsity_target": round(sp, 4),
               "active_fraction": round(float(active), 5), "kl": round(stats["kl"], 5), "ffn_mse": round(stats["ffn"], 5),
               "l1": round(stats["l1"], 4), "l1_weight": round(l1_w, 5), "gate_keep": round(keep, 4),
               "gate_bce": round(stats["gate"], 5), "lr_scale": round(lr_scale(r, st.step - 1), 4),
               "grad_norm": round(float(gnorm), 4), "tokens_per_s": round(r.tokens_per_step / dt, 1)}
        return row

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, seq_len: int, max_tokens: int, model: Optional[CompactLlama] = None,
                 corpora: Optional[dict[str, np.ndarray]] = None, batch_seqs: Optional[int] = None) -> dict:
        """Per held-out corpus: perplexity (all positions scored) and the active fraction under the thresholds."""
        model = model or self.student
        batch_seqs = batch_seqs or (max(1, self.eval_batch_tokens // seq_len) if self.eval_batch_tokens else 16)
        out = {}
        for name, stream in (corpora or self.held_out).items():
            wins = eval_windows(stream, seq_len, max_tokens)
            nll, count, act, act_n, read = 0.0, 0, 0.0, 0, 0.0
            for b in range(0, wins.shape[0], batch_seqs):
                ids = wins[b : b + batch_seqs].to(self.device)
                with self.autocast:
                    hidden, _, hs, ins = model(ids)
                    logits = model.logits(hidden)
                lp = logits[:, :-1].float().log_softmax(-1)
                nll += float(-lp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
                count += ids[:, 1:].numel()
                for ffn, h, x in zip(model.ffns(), hs, ins):
                    thr = ffn.threshold if ffn.sparse else torch.zeros((), device=h.device)
                    on = h.abs() > thr.to(h.dtype)
                    if ffn.sparse and ffn.gate is not None:
                        with self.autocast:
                            passed = ffn.gate(x) >= ffn.gate.cut
                        on = on & passed
                        read += float(passed.float().sum())
                    else:
                        read += h.numel()
                    act += float(on.float().sum())
                    act_n += h.numel()
            out[name] = {"ppl": math.exp(nll / max(count, 1)), "tokens": count,
                         "active_fraction": act / max(act_n, 1), "read_fraction": read / max(act_n, 1),
                         "seq_len": seq_len}
        return out

    def train(self, stop_step: int, time_budget_s: Optional[float] = None, curve_path: Optional[Path] = None,
              on_eval: Optional[Callable[[int], None]] = None) -> None:
        t_start = time.perf_counter()
        while self.state.step < stop_step:
            row = self.step()
            self.state.curve.append(row)
            if curve_path is not None:
                new = not curve_path.exists()
                with curve_path.open("a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
            if self.state.step % 10 == 0 or self.state.step == 1:
                self.log(" ".join(f"{k}={v}" for k, v in row.items()))
            if self.r.eval_every and self.state.step % self.r.eval_every == 0:
                ev = self.evaluate(512, self.r.eval_tokens)
                row["eval"] = {k: round(v["ppl"], 3) for k, v in ev.items()}
                row["eval_active"] = {k: round(v["active_fraction"], 4) for k, v in ev.items()}
                self.log(f"eval step {self.state.step}: {row['eval']} active {row['eval_active']}")
                if on_eval:
                    on_eval(self.state.step)
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                self.log(f"time budget reached at step {self.state.step}")
                break

    # ------------------------------------------------------------------------------------------------------------

    def checkpoint(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"student": self.student.state_dict(), "opt": self.opt.state_dict(), "state": asdict(self.state),
                    "recipe": asdict(self.r), "sampler": self.sampler.state()}, tmp)
        os.replace(tmp, path)

    def resume(self, path: Path, recipe: Optional[Recipe] = None) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.student.load_state_dict(ck["student"])
        self.opt.load_state_dict(ck["opt"])
        for g in self.opt.param_groups:  # keep this run's base LRs (a continuation may change the recipe)
            g.setdefault("base_lr", g["lr"])
        self.state = State(**ck["state"])
        self.sampler.load_state(ck["sampler"])


def tokens_per_s_and_mfu(trainer: Trainer, device_name: str) -> dict:
    rows = trainer.state.curve[5:] or trainer.state.curve
    tps = float(np.median([r["tokens_per_s"] for r in rows])) if rows else 0.0
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    mfu = tps * trainer.flops_per_token / (peak * 1e12) if peak else None
    return {"tokens_per_s_median": round(tps, 1), "flops_per_token": trainer.flops_per_token,
            "mfu": round(mfu, 4) if mfu is not None else None, "peak_bf16_tflops": peak}

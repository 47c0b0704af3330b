"""The first relufication (training layer): turn a SiLU (SwiGLU) model into a ReLU-sparse one by distillation.

Superseded by ``sparsetrain.job`` (the shipped ``smollm2-relu``); kept for ``sparsetrain.relufy_v1_device`` and the record
in ``results/relufy/v1``. Run: ``python3 -m sparsetrain.relufy_v1 MODEL --out PATH [...]``; the artifact format and its
loader are the core's ``llmflash.relufy_v1_format``.

The relufied FFN of layer l is ``down(relu(gate(x) + b) * up(x))`` where ``b = act_bias`` is minus a learned
per-neuron shift (shifted ReLU). Training (``relufy``) keeps the base weights frozen and learns a compact
parametrization on top of them:

- low-rank (LoRA) deltas on the FFN projections (gate/up/down) and on the attention projections (q/k/v/o);
- the per-neuron ``act_bias`` (``--shift``) and the RMSNorm weights.

The loss is the KL divergence from the original model (the teacher, frozen, SiLU) on the logits, plus an L1 penalty
on the FFN activations ``relu(gate x + b)`` whose weight rises linearly to ``--l1-final`` (ProSparse). With
``--target-sparsity`` (and ``--shift``) the sparsity is also steered directly: after every step the shifts move (in
units of each layer's pre-activation scale sigma_l) so that the measured active fraction follows a ramp (geometric in
the active fraction) from the plain-ReLU value to the target; the per-neuron shifts learned by gradient decide which
neurons stay active. ``--steer layer`` (default) steers every layer to the target; ``--steer global`` moves all
layers by the same multiple of sigma_l from the overall fraction, which on SmolLM2 left layers 1-5 at 0.1-1% active
and layer 0 at 49% (the shipped run; see results/relufy). A first version steered the L1 weight instead: its lag made
the weight explode and wrecked the model; steering the shift has no lag.

The artifact (``--out``) is small: ``relufy.safetensors`` (LoRA factors in fp16; act_bias and norms in fp32),
``relufy_config.json`` (hyperparameters, data description, hardware, time, results) and ``curve.csv``.
``llmflash.relufy_v1_format.apply_relufication(model, dir)`` merges it into a base model.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmflash.errors import LLMFlashError
from llmflash.paths import atomic_dir
from llmflash.relufy_v1_format import (
    CONFIG_FILE,
    FORMAT,
    TENSORS_FILE,
    ReluMLP,
    apply_relufication,
    base_fingerprint,
    llama_layers,
    relu_mlps,
)

log = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "CURVE_FILE", "FORMAT", "TENSORS_FILE", "RelufyConfig", "TrainableReluMLP", "apply_relufication",
           "balance_shifts", "main", "relufy"]

CURVE_FILE = "curve.csv"
FRONTIER_FILE = "frontier.csv"
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


# ---------------------------------------------------------------------------------------------------------------
# Modules


class TrainableReluMLP(ReluMLP):
    """``ReluMLP`` while training: ``observe`` sees (module, z, relu(z)); ``silu_mix`` blends in the original SiLU
    while annealing (0 = pure ReLU)."""

    def __init__(self, layer: int, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_bias: Tensor):
        super().__init__(layer, gate_proj, up_proj, down_proj, act_bias)
        self.observe: Optional[Callable[["TrainableReluMLP", Tensor, Tensor], None]] = None
        self.silu_mix = 0.0

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        z = g + self.act_bias.to(g.dtype)
        a = F.relu(z)
        if self.observe is not None:
            self.observe(self, z, a)
        if self.silu_mix > 0:
            a = (1.0 - self.silu_mix) * a + self.silu_mix * F.silu(g)
        return self.down_proj(a * self.up_proj(x))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank delta: ``base(x) + scale * B(A(x))``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: B = 0, so the delta starts at zero

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale


# ---------------------------------------------------------------------------------------------------------------
# Applying an artifact


@torch.no_grad()
def balance_shifts(model: nn.Module, ids: Tensor, active_fraction: float) -> list[float]:
    """Training-free: move each layer's shifts by one constant so that the layer is active on a fraction
    ``active_fraction`` of (token, neuron) pairs of ``ids`` [B, L]. Exact in one forward pass: each layer is
    calibrated on its real input, after the layers before it were. Returns the per-layer offsets subtracted."""
    mlps = relu_mlps(model)  # the layers' ReluMLPs (made where missing)
    offsets: list[float] = []

    def calibrate(mlp: ReluMLP, args) -> None:
        z = (mlp.gate_proj(args[0]) + mlp.act_bias).float().flatten()
        if z.numel() > 16_000_000:
            z = z[torch.randperm(z.numel(), device=z.device)[:16_000_000]]
        q = float(torch.quantile(z, 1.0 - active_fraction))
        mlp.act_bias.sub_(q)
        offsets.append(q)

    hooks = [m.register_forward_pre_hook(calibrate) for m in mlps]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return offsets


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RelufyConfig:
    """Everything that defines a relufication run (recorded in relufy_config.json)."""

    steps: int = 600
    time_budget_s: Optional[float] = None  # if set, steps shrink to what fits (measured after the first steps)
    batch_seqs: int = 64
    micro_batch_seqs: int = 16
    seq_len: int = 512
    lr: float = 1e-3  # LoRA factors
    bias_lr: float = 3e-3  # act_bias (per-neuron shift)
    norm_lr: float = 3e-4
    warmup_steps: int = 20
    min_lr_frac: float = 0.1  # cosine decay to this fraction of the peak
    ffn_rank: int = 32
    attn_rank: int = 8
    lora_scale: float = 1.0
    shift: bool = False  # learn the per-neuron shift (act_bias, shifted ReLU); else plain ReLU
    train_norms: bool = True
    target_sparsity: Optional[float] = None  # steer the shifts to this sparsity (needs shift); None: L1 alone
    ramp_frac: float = 0.5  # fraction of the steps over which the target (or the L1 weight) rises
    anneal_frac: float = 0.0  # fraction of the steps over which the activation goes from SiLU to ReLU (0: at once)
    l1_final: float = 1.0  # final weight of the L1 penalty (rises linearly over ramp_frac)
    shift_gain: float = 0.5  # steering: shift (in units of sigma_l) per unit of log(active / target active)
    steer: str = "layer"  # "layer": each layer to the target; "global": one multiple of sigma_l from the overall fraction
    kl_temperature: float = 1.0
    ce_weight: float = 0.0  # optional next-token cross-entropy on the text (0: pure distillation)
    text: str = "wiki:train"
    train_tokens: Optional[int] = None
    teacher_sample_tokens: int = 0  # extra training text sampled from the teacher (prompts from the training text)
    teacher_sample_share: float = 0.5  # share of each batch drawn from the teacher samples
    eval_text: str = "wiki:eval"
    eval_tokens: int = 8192
    eval_every: int = 50
    final_eval_tokens: int = 32768
    posthoc_sparsities: tuple[float, ...] = ()  # extra uniform shifts at the end (training-free frontier points)
    keep_sparsities: tuple[float, ...] = ()  # also save the artifact when the ramp first reaches these (out/sparsity-S)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA


class _Collector:
    """The FFN observer during training: the L1 term (differentiable) and active counts per layer."""

    def __init__(self, sigma: Tensor) -> None:
        self.sigma = sigma  # [n_layers] scale of the gate pre-activation per layer
        self.l1: list[Tensor] = []
        self.active: list[Tensor] = []
        self.want_l1 = True

    def __call__(self, mlp: TrainableReluMLP, z: Tensor, a: Tensor) -> None:
        if self.want_l1:
            self.l1.append(a.float().mean() / self.sigma[mlp.layer])
        self.active.append((z > 0).float().mean().detach())

    def reset(self) -> None:
        self.l1, self.active = [], []


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LLMFlashError("--device cuda: no CUDA GPU here; use --device cpu (only for tiny models)")
    return torch.device(name)


def _wrap_lora(model: nn.Module, cfg: RelufyConfig) -> dict[str, LoRALinear]:
    wrapped: dict[str, LoRALinear] = {}
    for i, layer in enumerate(llama_layers(model)):
        groups = [(layer.mlp, FFN_TARGETS, cfg.ffn_rank), (layer.self_attn, ATTN_TARGETS, cfg.attn_rank)]
        for parent, names, rank in groups:
            if rank <= 0:
                continue
            for name in names:
                base = getattr(parent, name)
                lora = LoRALinear(base, rank, cfg.lora_scale)
                setattr(parent, name, lora)
                owner = "mlp" if parent is layer.mlp else "self_attn"
                wrapped[f"model.layers.{i}.{owner}.{name}"] = lora
    return wrapped


def _lr_factor(step: int, total: int, cfg: RelufyConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def _evaluate(model: nn.Module, windows: Tensor, collector: Optional[_Collector], micro: int) -> dict:
    """Perplexity (fp32) over [n, L] windows and, for the student, the FFN active fraction (z > 0)."""
    nll, count = 0.0, 0
    if collector is not None:
        collector.reset()
        collector.want_l1 = False
    for start in range(0, windows.shape[0], micro):
        ids = windows[start : start + micro]
        logits = model(ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    out = {"ppl": math.exp(nll / max(count, 1)), "tokens": count}
    if collector is not None:
        per_layer = torch.stack(collector.active).view(-1, len(collector.sigma)).mean(0)
        out["active_fraction"] = float(per_layer.mean())
        out["per_layer_active_fraction"] = [round(float(v), 5) for v in per_layer]
        collector.reset()
        collector.want_l1 = True
    return out


def _windows_of(stream: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """Non-overlapping full windows [n, L] of the first ``max_tokens`` tokens (as ``evaluate.perplexity`` cuts them)."""
    stream = stream[:max_tokens]
    n = stream.numel() // seq_len
    if n == 0:
        raise LLMFlashError(f"evaluation text has fewer than {seq_len} tokens")
    return stream[: n * seq_len].view(n, seq_len)


def _hardware(device: torch.device) -> dict:
    hw = {"device": str(device), "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["gpu_count"] = torch.cuda.device_count()
    import os

    hw["cpus"] = os.cpu_count()
    return hw


def _sample_from_teacher(teacher, stream: Tensor, n_tokens: int, seq_len: int, gen: torch.Generator, device,
                         autocast) -> Tensor:
    """Sequences [n, seq_len] sampled from the teacher (temperature 1), each prompted by 16 tokens of the text."""
    prompt_len = min(16, seq_len // 4)
    n_seq = max(1, n_tokens // seq_len)
    batch = 512 if device.type == "cuda" else 2
    out = []
    for start in range(0, n_seq, batch):
        b = min(batch, n_seq - start)
        pos = torch.randint(0, stream.numel() - prompt_len, (b,), generator=gen)
        prompts = torch.stack([stream[p : p + prompt_len] for p in pos.tolist()]).to(device)
        with autocast():
            seqs = teacher.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=seq_len - prompt_len, min_new_tokens=seq_len - prompt_len,
                pad_token_id=teacher.config.eos_token_id,
            )
        out.append(seqs[:, :seq_len].cpu())
    return torch.cat(out)[:n_seq]


def _trainable_state(model: nn.Module, loras: dict[str, LoRALinear], mlps: list[TrainableReluMLP], cfg: RelufyConfig) -> dict[str, Tensor]:
    """The artifact's tensors (CPU): LoRA factors fp16, act_bias and norms fp32."""
    state: dict[str, Tensor] = {}
    for name, lora in loras.items():
        state[f"{name}.lora_A"] = lora.lora_A.detach().to("cpu", torch.float16).contiguous()
        state[f"{name}.lora_B"] = lora.lora_B.detach().to("cpu", torch.float16).contiguous()
    for i, mlp in enumerate(mlps):
        state[f"model.layers.{i}.mlp.act_bias"] = mlp.act_bias.detach().to("cpu", torch.float32).contiguous()
    if cfg.train_norms:
        for i, layer in enumerate(llama_layers(model)):
            for n in NORM_NAMES:
                state[f"model.layers.{i}.{n}.weight"] = getattr(layer, n).weight.detach().to("cpu", torch.float32).contiguous()
        state["model.norm.weight"] = model.model.norm.weight.detach().to("cpu", torch.float32).contiguous()
    return state


def _write_artifact(path: Path, state: dict[str, Tensor], meta: dict, curve: list[dict], frontier: list[dict]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / TENSORS_FILE), metadata={"format": FORMAT})
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    _write_csv(path / CURVE_FILE, curve)
    if frontier:
        _write_csv(path / FRONTIER_FILE, frontier)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def relufy(model_spec: str, out: Path, cfg: RelufyConfig = RelufyConfig(), *, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Train a relufication of ``model_spec`` and write the artifact to ``out`` (atomically). Returns the summary."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from llmflash.models import load_model
    from llmflash.text import load_texts, token_stream

    out = Path(out)
    if out.exists() and not overwrite:
        raise LLMFlashError(f"{out} already exists: choose another --out or pass --force")
    if cfg.target_sparsity is not None and not 0.0 < cfg.target_sparsity < 1.0:
        raise LLMFlashError("--target-sparsity must be between 0 and 1")
    if cfg.target_sparsity is not None and not cfg.shift:
        raise LLMFlashError("--target-sparsity steers the shifts: add --shift")
    if cfg.steer not in ("layer", "global"):
        raise LLMFlashError(f"--steer must be layer or global, not {cfg.steer!r}")
    if cfg.batch_seqs % cfg.micro_batch_seqs:
        raise LLMFlashError("the batch must be a whole number of micro-batches (--batch-tokens / --micro-batch-tokens)")
    t_start = time.time()
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    teacher, tok, src = load_model(model_spec, torch.float32)
    student, _, _ = load_model(model_spec, torch.float32)
    if getattr(teacher.config, "hidden_act", "silu") not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise LLMFlashError(f"cannot relufy activation {teacher.config.hidden_act!r}")
    teacher.to(device)
    student.to(device)
    base = {
        "model": model_spec, "source": src.kind, "n_layers": student.config.num_hidden_layers,
        "d_model": student.config.hidden_size, "d_ffn": student.config.intermediate_size,
        "activation": teacher.config.hidden_act, "fingerprint": base_fingerprint(student),
    }

    # Text: training stream (random crops), held-out evaluation windows.
    train_docs = load_texts(cfg.text)
    train_stream = token_stream(tok, train_docs, max_tokens=cfg.train_tokens)
    if train_stream.numel() < cfg.seq_len + 1:
        raise LLMFlashError(f"training text {cfg.text} has only {train_stream.numel()} tokens (< --seq-len {cfg.seq_len})")
    eval_docs = load_texts(cfg.eval_text)
    eval_stream = token_stream(tok, eval_docs, max_tokens=max(cfg.eval_tokens, cfg.final_eval_tokens))
    eval_windows = _windows_of(eval_stream, cfg.seq_len, cfg.eval_tokens).to(device)
    final_windows = _windows_of(eval_stream, cfg.seq_len, cfg.final_eval_tokens).to(device)

    samples = None
    if cfg.teacher_sample_tokens > 0:
        t0 = time.time()
        samples = _sample_from_teacher(teacher, train_stream, cfg.teacher_sample_tokens, cfg.seq_len, gen, device, autocast)
        log.info("sampled %d sequences from the teacher in %.1f s", samples.shape[0], time.time() - t0)

    # Student parametrization.
    mlps = cast(list[TrainableReluMLP], relu_mlps(student, TrainableReluMLP))
    loras = _wrap_lora(student, cfg)
    bias_params = [m.act_bias for m in mlps]
    for p in bias_params:
        p.requires_grad_(cfg.shift)
    norm_params = []
    if cfg.train_norms:
        for layer in llama_layers(student):
            norm_params += [getattr(layer, n).weight for n in NORM_NAMES]
        norm_params.append(student.model.norm.weight)
        for p in norm_params:
            p.requires_grad_(True)
    groups = [{"params": [p for m in loras.values() for p in (m.lora_A, m.lora_B)], "lr": cfg.lr, "name": "lora"}]
    if cfg.shift:
        groups.append({"params": bias_params, "lr": cfg.bias_lr, "name": "bias"})
    if norm_params:
        groups.append({"params": norm_params, "lr": cfg.norm_lr, "name": "norm"})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99), **({"fused": True} if device.type == "cuda" else {}))
    n_trainable = sum(p.numel() for g in groups for p in g["params"])

    def draw_batch() -> Tensor:
        rows = []
        n_samp = int(round(cfg.batch_seqs * cfg.teacher_sample_share)) if samples is not None else 0
        if n_samp:
            idx = torch.randint(0, samples.shape[0], (n_samp,), generator=gen)
            rows.append(samples[idx])
        n_text = cfg.batch_seqs - n_samp
        pos = torch.randint(0, train_stream.numel() - cfg.seq_len, (n_text,), generator=gen)
        rows.append(torch.stack([train_stream[p : p + cfg.seq_len] for p in pos.tolist()]))
        return torch.cat(rows).to(device, non_blocking=True)

    # Per-layer scale of the gate pre-activation, and the plain-ReLU sparsity we start from.
    first = draw_batch()
    sig: list[Tensor] = []

    def grab(m: TrainableReluMLP, z: Tensor, a: Tensor) -> None:
        sig.append(z.float().std())

    for m in mlps:
        m.observe = grab
    with torch.no_grad(), autocast():
        student(first[: cfg.micro_batch_seqs])
    sigma = torch.stack(sig).detach()
    collector = _Collector(sigma)
    for m in mlps:
        m.observe = collector

    teacher_eval = _evaluate(teacher, eval_windows, None, cfg.micro_batch_seqs)
    final_teacher = _evaluate(teacher, final_windows, None, cfg.micro_batch_seqs)
    start_eval = _evaluate(student, eval_windows, collector, cfg.micro_batch_seqs)
    start_sparsity = 1.0 - start_eval["active_fraction"]
    log.info("teacher held-out ppl %.3f; plain ReLU: ppl %.3f, sparsity %.3f", teacher_eval["ppl"], start_eval["ppl"], start_sparsity)

    total = cfg.steps
    l1_weight = 0.0
    curve: list[dict] = [{
        "step": 0, "tokens": 0, "eval_ppl": start_eval["ppl"], "eval_ppl_ratio": start_eval["ppl"] / teacher_eval["ppl"],
        "eval_active_fraction": start_eval["active_fraction"],
    }]
    kept: dict[str, tuple[int, dict[str, Tensor]]] = {}
    step_times: list[float] = []
    t_train = time.time()
    bar = tqdm(total=total, desc="relufy", disable=not progress)
    step = 0
    micro_n = cfg.batch_seqs // cfg.micro_batch_seqs
    while step < total:
        t_step = time.time()
        frac = step / max(1, total)
        ramp = min(1.0, frac / cfg.ramp_frac) if cfg.ramp_frac > 0 else 1.0
        l1_weight = cfg.l1_final * ramp
        if cfg.target_sparsity is not None:  # geometric in the active fraction: gentle near the end
            target = 1.0 - (1.0 - start_sparsity) * ((1.0 - cfg.target_sparsity) / (1.0 - start_sparsity)) ** ramp
        else:
            target = float("nan")
        lr_f = _lr_factor(step, total, cfg)
        mix = max(0.0, 1.0 - frac / cfg.anneal_frac) if cfg.anneal_frac > 0 else 0.0
        for m in mlps:
            m.silu_mix = mix
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_f
        batch = first if step == 0 else draw_batch()
        sums = {"loss": 0.0, "kl": 0.0, "l1": 0.0, "ce": 0.0}
        actives: list[Tensor] = []
        for mb in batch.split(cfg.micro_batch_seqs):
            collector.reset()
            with torch.no_grad(), autocast():
                t_logits = teacher(mb).logits
            with autocast():
                s_logits = student(mb).logits
            kl = _kl(s_logits, t_logits, cfg.kl_temperature)
            l1 = torch.stack(collector.l1).mean()
            loss = kl + l1_weight * l1
            if cfg.ce_weight > 0:
                ce = F.cross_entropy(s_logits[:, :-1].float().flatten(0, 1), mb[:, 1:].flatten())
                loss = loss + cfg.ce_weight * ce
                sums["ce"] += float(ce.detach()) / micro_n
            (loss / micro_n).backward()
            sums["loss"] += float(loss.detach()) / micro_n
            sums["kl"] += float(kl.detach()) / micro_n
            sums["l1"] += float(l1.detach()) / micro_n
            actives.append(torch.stack(collector.active))  # [n_layers]
            del t_logits, s_logits, kl, l1, loss
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        layer_active = torch.stack(actives).mean(0).float()  # [n_layers]
        sparsity = 1.0 - float(layer_active.mean())
        if cfg.target_sparsity is not None:  # steer the shifts (no lag: the active fraction follows at once)
            if cfg.steer == "global":
                delta = torch.full_like(layer_active, cfg.shift_gain * math.log(max(1e-6, 1.0 - sparsity) / (1.0 - target)))
            else:
                delta = cfg.shift_gain * torch.log(layer_active.clamp_min(1e-6) / (1.0 - target))
            with torch.no_grad():
                for m, s_l, d_l in zip(mlps, sigma, delta.to(sigma.device)):
                    m.act_bias.sub_(d_l * s_l)
        step += 1
        bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.time() - t_step)
        if cfg.time_budget_s is not None and step == 6:  # fit the run into the time budget
            per_step = sum(step_times[2:]) / len(step_times[2:])
            fits = int((cfg.time_budget_s - (time.time() - t_train)) / (per_step * 1.04)) + step
            if fits < total:
                log.info("%.3f s/step: %d steps fit in the %.0f s budget (asked %d)", per_step, fits, cfg.time_budget_s, total)
                total = max(step + 1, fits)
                bar.total = total
        row = {
            "step": step, "tokens": step * cfg.batch_seqs * cfg.seq_len, "lr_factor": lr_f, "target_sparsity": target,
            "l1_weight": l1_weight, "silu_mix": mix, "loss": sums["loss"], "kl": sums["kl"], "l1": sums["l1"], "sparsity": sparsity,
        }
        if cfg.ce_weight > 0:
            row["ce"] = sums["ce"]
        keep = [k for k in cfg.keep_sparsities if f"{k:g}" not in kept and target == target and target >= k - 1e-9]
        if step % cfg.eval_every == 0 or step == total or keep:
            for m in mlps:
                m.silu_mix = 0.0  # evaluate the pure ReLU model
            ev = _evaluate(student, eval_windows, collector, cfg.micro_batch_seqs)
            row.update(eval_ppl=ev["ppl"], eval_ppl_ratio=ev["ppl"] / teacher_eval["ppl"], eval_active_fraction=ev["active_fraction"])
            log.info("step %d: kl %.4f sparsity %.3f | held-out ppl %.3f (x%.3f) active %.3f | l1 %.3g",
                     step, sums["kl"], sparsity, ev["ppl"], ev["ppl"] / teacher_eval["ppl"], ev["active_fraction"], l1_weight)
            bar.set_postfix(kl=f"{sums['kl']:.3f}", sp=f"{sparsity:.3f}", ppl=f"{ev['ppl']:.2f}")
        curve.append(row)
        for k in keep:
            kept[f"{k:g}"] = (step, _trainable_state(student, loras, mlps, cfg))
    bar.close()
    train_s = time.time() - t_train
    for m in mlps:
        m.silu_mix = 0.0
    with torch.no_grad():  # the artifact stores the LoRA factors in fp16: evaluate exactly what is saved
        for lora in loras.values():
            lora.lora_A.copy_(lora.lora_A.half().float())
            lora.lora_B.copy_(lora.lora_B.half().float())

    end = _evaluate(student, eval_windows, collector, cfg.micro_batch_seqs)  # what the artifact gives
    # Final held-out evaluation on more tokens, and training-free extra shifts (frontier points).
    final = _evaluate(student, final_windows, collector, cfg.micro_batch_seqs)
    frontier = [{
        "kind": "trained", "step": total, "extra_shift_sigma": 0.0, "eval_tokens": final["tokens"],
        "eval_active_fraction": final["active_fraction"], "eval_ppl": final["ppl"], "teacher_ppl": final_teacher["ppl"],
        "ppl_ratio": final["ppl"] / final_teacher["ppl"],
    }]
    frontier += _posthoc_points(student, mlps, sigma, collector, draw_batch()[: cfg.micro_batch_seqs], final_windows,
                                cfg, final_teacher["ppl"], total)
    state = _trainable_state(student, loras, mlps, cfg)
    wall_s = time.time() - t_start
    summary = {
        "teacher_ppl": teacher_eval["ppl"], "final_ppl": end["ppl"], "final_ppl_ratio": end["ppl"] / teacher_eval["ppl"],
        "final_active_fraction": end["active_fraction"],
        "eval_tokens": teacher_eval["tokens"], "large_eval": frontier[0], "steps": total,
        "per_layer_active_fraction": end["per_layer_active_fraction"],
        "plain_relu": {"ppl": start_eval["ppl"], "active_fraction": start_eval["active_fraction"]},
    }
    meta = {
        "format": FORMAT,
        "base": base,
        "activation": "relu(gate x + act_bias) * up x; act_bias = -shift" if cfg.shift else "relu(gate x) * up x",
        "lora": {"scales": {name: cfg.lora_scale for name in loras}, "ffn_rank": cfg.ffn_rank, "attn_rank": cfg.attn_rank,
                 "dtype": "float16", "merged_as": "W += scale * B @ A"},
        "config": asdict(cfg) | {"steps_run": total},
        "data": {
            "train_text": cfg.text, "train_documents": len(train_docs), "train_stream_tokens": int(train_stream.numel()),
            "train_tokens_seen": total * cfg.batch_seqs * cfg.seq_len,
            "teacher_samples": None if samples is None else {"sequences": int(samples.shape[0]), "tokens": int(samples.numel()),
                                                             "share_of_batch": cfg.teacher_sample_share},
            "eval_text": cfg.eval_text, "eval_documents": len(eval_docs), "eval_tokens": int(teacher_eval["tokens"]),
            "final_eval_tokens": int(final["tokens"]),
            "held_out": ("wiki:eval = Wikipedia articles whose sha256(title) % 100 < 10 (llmflash.text.is_eval_article): "
                         "never in wiki:train" if cfg.eval_text == "wiki:eval" else cfg.eval_text),
        },
        "results": summary,
        "trainable_parameters": n_trainable,
        "hardware": _hardware(device),
        "time": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_start)), "train_s": round(train_s, 1),
                 "wall_s": round(wall_s, 1), "s_per_step": round(train_s / max(1, total), 4)},
        "software": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_artifact(tmp, state, meta, curve, frontier)
        for k, (at, st) in kept.items():
            _write_artifact(tmp / f"sparsity-{k}", st, meta | {"step": at}, [r for r in curve if r["step"] <= at], [])
    log.info("relufied %s in %.0f s: held-out ppl %.3f (x%.3f), active fraction %.4f", model_spec, wall_s,
             summary["final_ppl"], summary["final_ppl_ratio"], summary["final_active_fraction"])
    return meta


@torch.no_grad()
def _posthoc_points(student, mlps, sigma, collector, calib: Tensor, windows: Tensor, cfg: RelufyConfig,
                    teacher_ppl: float, step: int) -> list[dict]:
    """Extra uniform shifts (delta * sigma_l on every layer) that reach higher sparsities without training."""
    rows = []
    if not cfg.posthoc_sparsities:
        return rows
    saved = [m.act_bias.data.clone() for m in mlps]

    def set_shift(delta: float) -> float:
        for m, b, s in zip(mlps, saved, sigma):
            m.act_bias.data.copy_(b - delta * s)
        collector.reset()
        collector.want_l1 = False
        student(calib)
        sp = 1.0 - float(torch.stack(collector.active).mean())
        collector.reset()
        collector.want_l1 = True
        return sp

    try:
        for target in cfg.posthoc_sparsities:
            lo, hi = 0.0, 4.0
            if set_shift(0.0) >= target or set_shift(hi) < target:
                continue
            for _ in range(14):
                mid = 0.5 * (lo + hi)
                if set_shift(mid) < target:
                    lo = mid
                else:
                    hi = mid
            set_shift(hi)
            ev = _evaluate(student, windows, collector, cfg.micro_batch_seqs)
            rows.append({"kind": "posthoc_shift", "step": step, "extra_shift_sigma": hi, "eval_tokens": ev["tokens"],
                         "eval_active_fraction": ev["active_fraction"], "eval_ppl": ev["ppl"], "teacher_ppl": teacher_ppl,
                         "ppl_ratio": ev["ppl"] / teacher_ppl})
    finally:
        for m, b in zip(mlps, saved):
            m.act_bias.data.copy_(b)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m sparsetrain.relufy_v1", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The first relufication (superseded by sparsetrain.job): replace the FFN activation by (shifted) "
                    "ReLU and fine-tune a compact parametrization (LoRA, per-neuron shifts, norms) by distillation "
                    "from the original model, with a rising L1 penalty on the "
                    "FFN activations. Writes the artifact, config, data description and curve to --out.",
    )
    d = RelufyConfig()
    p.add_argument("model", help="MODEL: alias, model directory, .gguf file or hub id")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--time-budget-s", type=float, default=None, help="shrink --steps to fit this many seconds of training")
    p.add_argument("--shift", action="store_true", help="learn a per-neuron shift (shifted ReLU); default: plain ReLU")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="steer the shifts (needs --shift) so the sparsity ramps to this value (default: L1 alone)")
    p.add_argument("--ramp-frac", type=float, default=d.ramp_frac, help="share of the steps over which sparsity/L1 rises")
    p.add_argument("--anneal-frac", type=float, default=d.anneal_frac,
                   help="share of the steps over which the activation is blended from SiLU to ReLU (0: swap at once)")
    p.add_argument("--l1-final", type=float, default=d.l1_final, help="final weight of the rising L1 penalty")
    p.add_argument("--shift-gain", type=float, default=d.shift_gain, help="steering gain of --target-sparsity")
    p.add_argument("--steer", choices=("layer", "global"), default=d.steer,
                   help="steer each layer to the target (default) or all layers by one multiple of their scale")
    p.add_argument("--lr", type=float, default=d.lr, help="LoRA learning rate")
    p.add_argument("--bias-lr", type=float, default=d.bias_lr, help="shift learning rate")
    p.add_argument("--norm-lr", type=float, default=d.norm_lr)
    p.add_argument("--batch-tokens", type=int, default=d.batch_seqs * d.seq_len)
    p.add_argument("--micro-batch-tokens", type=int, default=d.micro_batch_seqs * d.seq_len)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--ffn-rank", type=int, default=d.ffn_rank)
    p.add_argument("--attn-rank", type=int, default=d.attn_rank)
    p.add_argument("--no-norms", action="store_true", help="keep the RMSNorm weights frozen")
    p.add_argument("--ce-weight", type=float, default=d.ce_weight)
    p.add_argument("--text", default=d.text, help="training text (wiki:train, a file, hf:NAME)")
    p.add_argument("--train-tokens", type=int, default=None, help="use only the first N tokens of the training text")
    p.add_argument("--teacher-sample-tokens", type=int, default=0, help="extra text sampled from the teacher")
    p.add_argument("--eval-text", default=d.eval_text, help="held-out text (default wiki:eval)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--final-eval-tokens", type=int, default=d.final_eval_tokens)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--posthoc", default="", help="comma-separated sparsities for training-free extra shifts at the end")
    p.add_argument("--keep-sparsities", default="",
                   help="comma-separated sparsities: also save the artifact when the ramp first reaches each")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--json", default=None, help="write the run's config and results here")
    return p


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise LLMFlashError(f"expected comma-separated numbers, got {s!r}") from None


def config_from_args(args) -> RelufyConfig:
    if args.batch_tokens % args.seq_len or args.micro_batch_tokens % args.seq_len:
        raise LLMFlashError("--batch-tokens and --micro-batch-tokens must be multiples of --seq-len")
    return RelufyConfig(
        steps=args.steps, time_budget_s=args.time_budget_s, batch_seqs=args.batch_tokens // args.seq_len,
        micro_batch_seqs=min(args.micro_batch_tokens, args.batch_tokens) // args.seq_len, seq_len=args.seq_len,
        lr=args.lr, bias_lr=args.bias_lr, norm_lr=args.norm_lr, ffn_rank=args.ffn_rank, attn_rank=args.attn_rank,
        shift=args.shift, train_norms=not args.no_norms, target_sparsity=args.target_sparsity, ramp_frac=args.ramp_frac,
        anneal_frac=args.anneal_frac,
        l1_final=args.l1_final, shift_gain=args.shift_gain, steer=args.steer, ce_weight=args.ce_weight, text=args.text,
        train_tokens=args.train_tokens, teacher_sample_tokens=args.teacher_sample_tokens, eval_text=args.eval_text,
        eval_tokens=args.eval_tokens, final_eval_tokens=args.final_eval_tokens, eval_every=args.eval_every,
        posthoc_sparsities=_floats(args.posthoc), keep_sparsities=_floats(args.keep_sparsities),
        seed=args.seed, device=args.device,
    )


def main(argv: Optional[list[str]] = None) -> int:
    """The command line; a user error ends with one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        meta = relufy(args.model, Path(args.out), cfg, overwrite=args.force)
    except LLMFlashError as err:
        print(f"sparsetrain.relufy_v1: error: {err}", file=sys.stderr)
        return 2
    r = meta["results"]
    print(f"relufied {args.model} -> {args.out}: held-out ppl {r['final_ppl']:.3f} (x{r['final_ppl_ratio']:.3f} of the "
          f"original {r['teacher_ppl']:.3f}), FFN active fraction {r['final_active_fraction']:.4f}, "
          f"{meta['config']['steps_run']} steps in {meta['time']['train_s']:.0f} s")
    if args.json:
        from llmflash.report import write_json

        write_json(args.json, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

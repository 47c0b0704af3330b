"""Why relufying SmolLM2 stalls near 90% zeros: two CPU diagnostics for results/relufy (issue 3).

    OMP_NUM_THREADS=2 python3 experiments/relufy_diagnostics.py [--eval-tokens 4096] [--calib-tokens 2048]
                                                                [--targets 0.7,0.8,0.9] [--position-tokens 4096]
    python3 experiments/relufy_diagnostics.py --plot-only      (redraw the PNG from the JSON)

``--original`` and ``--sparse`` name other models for (a) and (b) (aliases or model directories; e.g. tiny models in
the test suite's end-to-end tier); the JSON keeps its keys.

(a) Training-free masks on the ORIGINAL SmolLM2 (``load_model("smollm2")``, float32). Per-layer thresholds ``t`` are
    calibrated on the first ``--calib-tokens`` tokens of wiki:train (one batch of 512-token windows) as the quantile
    of the target sparsity of either the gate pre-activation ``g = gate_proj(x)`` or of ``|h|``, ``h = silu(g) * up(x)``.
    With ``u = up(x)``, the kinds are (each layer's FFN replaced by ``llmflash.ffn.DenseFFN`` with the same weights):

    - ``shift``:    relu(g - t) * u        (what a shifted ReLU computes before any training)
    - ``jump``:     g * 1[g > t] * u        (JumpReLU-style: keeps the value, masks by the gate)
    - ``silujump``: silu(g) * 1[g > t] * u  (the original output, masked by the gate alone)
    - ``habs``:     h * 1[|h| > t]          (llmflash's ``threshold`` rule, CATS-style: masks by the product)

    The three gate masks drop every neuron with g <= t, including those with negative g whose output silu(g) * u is
    large because |u| is; ``habs`` keeps them. Perplexity on the first ``--eval-tokens`` tokens of held-out wiki:eval,
    non-overlapping windows of 512 (as ``llmflash.evaluate.perplexity``; the loop is re-implemented here only to switch
    the activation per kind and to keep per-token losses), next to the dense model on the same tokens.

(b) Active fraction of the shipped ``smollm2-relu`` by position in the window: exact zeros of relu(g + act_bias) * u,
    over all layers, in bins of 64 positions of 512-token windows (the first ``--position-tokens`` tokens of wiki:eval,
    the same windows as (a)), observed with ``install_dense_ffns(..., observer=...)``. Per-bin perplexity ratios
    against the original's per-token losses on the same tokens ride along; so does the position profile of each
    mask of (a), for comparison (``habs`` at 90% has no steering and shows how much of the effect is the text's own).

Writes results/relufy/v1/diagnostics.json (everything, with the run's config: command, environment, load average, wall
time), diagnostics.csv (one row per mask point and per position bin) and diagnostics.png (two panels). Every number in
them is measured on this machine's CPU except the ratios, computed from two measured perplexities.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmflash.arch import install_dense_ffns
from llmflash.ffn import DenseFFN, SparsityRule, activation_fn
from llmflash.models import load_model
from llmflash.paths import repo_root
from llmflash.report import environment, save_figure, write_csv, write_json
from llmflash.text import load_texts, token_stream, windows

log = logging.getLogger("relufy_diagnostics")
OUT = repo_root() / "results" / "relufy" / "v1"
KINDS = ("shift", "jump", "silujump", "habs")
KIND_LABELS = {
    "shift": "shifted ReLU on gate: relu(g - t) * up",
    "jump": "jump on gate: g * 1[g > t] * up",
    "silujump": "gate mask: silu(g) * 1[g > t] * up",
    "habs": "|h| mask (llmflash threshold rule)",
}
SEQ_LEN = 512
BIN = 64


class PositionCounter:
    """FFN observer: active neurons (h != 0) per layer and per position in the window."""

    def __init__(self, n_layers: int, seq_len: int) -> None:
        self.active = torch.zeros(n_layers, seq_len, dtype=torch.float64)
        self.count = torch.zeros(n_layers, seq_len, dtype=torch.float64)

    def __call__(self, layer: int, x: torch.Tensor, h: torch.Tensor) -> None:
        frac = (h != 0).double().mean(-1).reshape(-1, h.shape[-2])  # [batch, L]
        self.active[layer, : frac.shape[1]] += frac.sum(0)
        self.count[layer, : frac.shape[1]] += frac.shape[0]

    def overall(self) -> float:
        return float(self.active.sum() / self.count.sum())

    def per_layer(self) -> list[float]:
        return (self.active.sum(1) / self.count.sum(1)).tolist()

    def per_position(self) -> torch.Tensor:  # [L], averaged over layers
        return self.active.sum(0) / self.count.sum(0)


class Act(nn.Module):
    """An activation from a plain function (DenseFFN keeps its activation as a submodule)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def set_kind(modules: list[DenseFFN], kind: str, thresholds: Optional[list[float]]) -> None:
    """Make every DenseFFN compute ``kind`` (DenseFFN computes act(gate x + act_bias) * up x, then the |h| rule)."""
    silu = activation_fn("silu")
    for m in modules:
        t = None if thresholds is None else thresholds[m.layer]
        m.threshold = None
        act: nn.Module
        if kind == "dense":
            act = silu
        elif kind == "shift":
            act = Act(lambda z, t=t: F.relu(z - t))
        elif kind == "jump":
            act = Act(lambda z, t=t: z * (z > t))
        elif kind == "silujump":
            act = Act(lambda z, t=t: silu(z) * (z > t))
        elif kind == "habs":
            act, m.threshold = silu, t
        else:
            raise ValueError(kind)
        m.act = act


@torch.no_grad()
def calibrate(model, modules: list[DenseFFN], calib: torch.Tensor, targets: list[float]) -> dict:
    """Per-layer quantiles of g and |h| on the calibration batch: {("g"|"habs", target): [t per layer]}."""
    qs = torch.tensor(targets, dtype=torch.float32)
    found: dict[tuple[str, float], list[float]] = {}

    def observe(layer: int, x: torch.Tensor, h: torch.Tensor) -> None:
        g = F.linear(x, modules[layer].w.gate).flatten()
        for name, v in (("g", g), ("habs", h.abs().flatten())):
            # torch.quantile refuses more than 2**24 elements; subsample deterministically beyond that
            v = v[:: max(1, math.ceil(v.numel() / 2**24))].float()
            for target, q in zip(targets, torch.quantile(v, qs).tolist()):
                found.setdefault((name, target), [0.0] * len(modules))[layer] = q

    set_kind(modules, "dense", None)
    for m in modules:
        m.observer = observe
    model(calib)
    return found


@torch.no_grad()
def evaluate(model, modules: list[DenseFFN], wins: list[torch.Tensor], n_layers: int) -> dict:
    """Perplexity (as llmflash.evaluate.perplexity) plus per-token losses [W, L-1] and position counts."""
    counter = PositionCounter(n_layers, SEQ_LEN)
    for m in modules:
        m.observer = counter
    losses = []
    t0 = time.time()
    for ids in wins:
        logits = model(ids).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
    nll = torch.stack(losses)  # [W, L-1]; position p predicts token p+1
    return {"ppl": math.exp(float(nll.mean())), "tokens": nll.numel(), "nll": nll, "counter": counter,
            "ffn_active_fraction": counter.overall(), "eval_s": round(time.time() - t0, 1)}


def position_bins(res: dict, dense_nll: Optional[torch.Tensor]) -> list[dict]:
    pos = res["counter"].per_position()
    nll = res["nll"]
    rows = []
    for lo in range(0, SEQ_LEN, BIN):
        hi = lo + BIN
        row = {"position_from": lo, "position_to": hi - 1, "active_fraction": float(pos[lo:hi].mean()),
               "ppl": math.exp(float(nll[:, lo : min(hi, nll.shape[1])].mean())),
               "per_layer_active_fraction": (res["counter"].active[:, lo:hi].sum(1) / res["counter"].count[:, lo:hi].sum(1)).tolist()}
        if dense_nll is not None:
            row["ppl_ratio"] = math.exp(float((nll - dense_nll)[:, lo : min(hi, nll.shape[1])].mean()))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="experiments/relufy_diagnostics.py", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.7,0.8,0.9", help="target sparsities of the training-free masks")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--calib-tokens", type=int, default=2048, help="wiki:train tokens for the thresholds")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="wiki:eval tokens for (a)")
    ap.add_argument("--position-tokens", type=int, default=4096, help="wiki:eval tokens for (b) (same windows)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared: 2 at most)")
    ap.add_argument("--original", default="smollm2", help="the original (SiLU) model of (a)")
    ap.add_argument("--sparse", default="smollm2-relu", help="the relufied model of (b)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot-only", action="store_true", help="redraw diagnostics.png from diagnostics.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot_only:
        plot(json.loads((args.out / "diagnostics.json").read_text()), args.out / "diagnostics.png")
        return
    torch.set_num_threads(args.threads)
    t_start = time.time()
    load_start = os.getloadavg()
    targets = [float(t) for t in args.targets.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]

    # (a) training-free masks on the original model
    model, tok, _ = load_model(args.original)
    n_layers = model.config.num_hidden_layers
    modules = install_dense_ffns(model, SparsityRule("relu"))
    eval_docs = load_texts("wiki:eval")
    stream = token_stream(tok, eval_docs, max_tokens=max(args.eval_tokens, args.position_tokens))
    all_wins = [w for w in windows(stream, SEQ_LEN) if w.shape[1] == SEQ_LEN]
    wins = all_wins[: args.eval_tokens // SEQ_LEN]
    calib = token_stream(tok, load_texts("wiki:train"), max_tokens=args.calib_tokens)
    calib = calib[: calib.numel() // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    th = calibrate(model, modules, calib, targets)
    log.info("calibrated %d layers on %d wiki:train tokens", n_layers, calib.numel())

    set_kind(modules, "dense", None)
    dense = evaluate(model, modules, wins, n_layers)
    log.info("dense: ppl %.3f on %d tokens (%.0f s)", dense["ppl"], dense["tokens"], dense["eval_s"])
    masks, mask_positions = [], {}
    for target in targets:
        for kind in kinds:
            t = th[("habs" if kind == "habs" else "g", target)]
            set_kind(modules, kind, t)
            res = evaluate(model, modules, wins, n_layers)
            row = {"kind": kind, "target_sparsity": target, "ppl": res["ppl"], "ppl_ratio": res["ppl"] / dense["ppl"],
                   "active_fraction": res["ffn_active_fraction"], "sparsity": 1 - res["ffn_active_fraction"],
                   "tokens": res["tokens"], "eval_s": res["eval_s"],
                   "per_layer_active_fraction": res["counter"].per_layer(), "thresholds": t}
            masks.append(row)
            mask_positions[f"{kind}@{target:g}"] = position_bins(res, dense["nll"])
            log.info("%-8s target %.2f: sparsity %.4f, ppl %.2f (x%.3f) (%.0f s)", kind, target, row["sparsity"],
                     row["ppl"], row["ppl_ratio"], res["eval_s"])
    dense_pos = position_bins(dense, None)
    del model, modules

    # (b) the shipped smollm2-relu by position
    model, tok_r, _ = load_model(args.sparse)
    modules = install_dense_ffns(model, SparsityRule("relu"))
    pwins = all_wins[: args.position_tokens // SEQ_LEN]
    relu = evaluate(model, modules, pwins, model.config.num_hidden_layers)
    dense_nll = dense["nll"][: len(pwins)] if len(pwins) <= len(wins) else None
    relu_pos = position_bins(relu, dense_nll)
    log.info("%s: ppl %.3f, active %.4f on %d tokens", args.sparse, relu["ppl"], relu["ffn_active_fraction"], relu["tokens"])
    for r in relu_pos:
        log.info("  positions %3d-%3d: active %.4f", r["position_from"], r["position_to"], r["active_fraction"])

    # outputs
    args.out.mkdir(parents=True, exist_ok=True)
    csv_rows = [{"part": "mask", "model": args.original, "kind": "dense", "target_sparsity": 0.0, "position_from": "",
                 "position_to": "", "active_fraction": dense["ffn_active_fraction"], "ppl": dense["ppl"], "ppl_ratio": 1.0,
                 "tokens": dense["tokens"]}]
    csv_rows += [{"part": "mask", "model": args.original, "kind": r["kind"], "target_sparsity": r["target_sparsity"],
                  "position_from": "", "position_to": "", "active_fraction": r["active_fraction"], "ppl": r["ppl"],
                  "ppl_ratio": r["ppl_ratio"], "tokens": r["tokens"]} for r in masks]
    for model_name, kind, rows in ([(args.sparse, "relu", relu_pos), (args.original, "dense", dense_pos)]
                                   + [(args.original, k, v) for k, v in mask_positions.items()]):
        csv_rows += [{"part": "position", "model": model_name, "kind": kind, "target_sparsity": "",
                      "position_from": r["position_from"], "position_to": r["position_to"],
                      "active_fraction": r["active_fraction"], "ppl": r["ppl"], "ppl_ratio": r.get("ppl_ratio", ""),
                      "tokens": len(pwins if model_name == args.sparse else wins) * (r["position_to"] - r["position_from"] + 1)}
                     for r in rows]
    write_csv(args.out / "diagnostics.csv", csv_rows)
    data = {
        "labels": "measured (CPU, float32) except ppl_ratio, computed as the ratio of two measured perplexities on the same tokens",
        "masks": {"model": f"{args.original} (original, SiLU)", "kinds": {k: KIND_LABELS[k] for k in kinds},
                  "calibration": {"text": "wiki:train", "tokens": int(calib.numel()), "quantile_of": {"shift/jump/silujump": "g = gate_proj(x)", "habs": "|silu(g) * up(x)|"}},
                  "evaluation": {"text": "wiki:eval", "tokens_predicted": dense["tokens"], "windows": len(wins), "seq_len": SEQ_LEN},
                  "dense": {"ppl": dense["ppl"], "active_fraction": dense["ffn_active_fraction"], "tokens": dense["tokens"]},
                  "results": masks},
        "position": {"model": f"{args.sparse} (shipped artifact)", "bin": BIN, "seq_len": SEQ_LEN, "windows": len(pwins),
                     "note": "active fraction = exact zeros of relu(gate x + act_bias) * up x, averaged over layers; "
                             "ppl_ratio = per-bin perplexity over the original's on the same tokens (position p predicts p+1)",
                     "smollm2-relu": {"ppl": relu["ppl"], "active_fraction": relu["ffn_active_fraction"],
                                      "ppl_ratio": (math.exp(float((relu["nll"] - dense_nll).mean()))
                                                    if dense_nll is not None else None),
                                      "per_layer_active_fraction": relu["counter"].per_layer(),
                                      "per_position_active_fraction": relu["counter"].per_position().tolist(),
                                      "bins": relu_pos},
                     "smollm2 dense": {"bins": dense_pos},
                     "smollm2 masks (a)": mask_positions},
        "config": {"command": "OMP_NUM_THREADS=2 python3 experiments/relufy_diagnostics.py " + " ".join(sys.argv[1:]),
                   "args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(),
                   "load_average_start": load_start, "load_average_end": os.getloadavg(),
                   "wall_s": round(time.time() - t_start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    write_json(args.out / "diagnostics.json", data)
    plot(data, args.out / "diagnostics.png")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    res = data["masks"]["results"]
    for kind, marker in zip(KINDS, "o^sD"):
        sel = [r for r in res if r["kind"] == kind]
        if sel:
            ax.plot([100 * r["sparsity"] for r in sel], [r["ppl_ratio"] for r in sel], marker + "-", label=KIND_LABELS[kind])
    relu = data["position"]["smollm2-relu"]
    if relu.get("ppl_ratio"):
        ax.plot([100 * (1 - relu["active_fraction"])], [relu["ppl_ratio"]], "*", ms=14, color="black",
                label="shipped smollm2-relu (trained; same tokens)")
    ax.axhline(1.3, color="grey", lw=0.8, ls="--", label="issue 3 goal: 1.3x")
    ax.set_yscale("log")
    ax.set_xlabel("FFN zeros on wiki:eval (%)")
    ax.set_ylabel("perplexity / dense SmolLM2 perplexity (log)")
    ev = data["masks"]["evaluation"]
    ax.set_title(f"(a) original SmolLM2, no training: which mask? ({ev['tokens_predicted']} wiki:eval tokens)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    pos = data["position"]
    centers = [r["position_from"] + BIN / 2 for r in pos["smollm2-relu"]["bins"]]
    bx.plot(centers, [100 * r["active_fraction"] for r in pos["smollm2-relu"]["bins"]], "o-", lw=2,
            label=f"shipped smollm2-relu (overall {100 * pos['smollm2-relu']['active_fraction']:.1f}%)")
    ref = pos["smollm2 masks (a)"].get("habs@0.9")
    if ref:
        bx.plot(centers, [100 * r["active_fraction"] for r in ref], "D--", color="grey",
                label="original + |h| mask at 90% (no steering)")
    cx = bx.twinx()
    cx.semilogy(centers, [r["ppl_ratio"] for r in pos["smollm2-relu"]["bins"]], "s:", color="tab:red", ms=5,
                label="smollm2-relu perplexity / original's in the bin (right axis)")
    cx.set_ylim(2, 200)
    cx.set_yticks([2, 5, 10, 20, 50, 100, 200], [f"x{v}" for v in (2, 5, 10, 20, 50, 100, 200)])
    cx.minorticks_off()
    cx.set_ylabel("perplexity / original's, per bin (log)", color="tab:red")
    cx.tick_params(axis="y", colors="tab:red")
    handles = bx.get_legend_handles_labels()
    more = cx.get_legend_handles_labels()
    bx.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="center right")
    bx.set_xticks([r["position_from"] for r in pos["smollm2-relu"]["bins"]] + [pos["seq_len"]])
    bx.set_xlim(0, pos["seq_len"])
    bx.set_ylim(bottom=0)
    bx.set_xlabel(f"position in the {pos['seq_len']}-token window (tokens; bins of {BIN})")
    bx.set_ylabel("FFN neurons active (%, mean over layers)")
    bx.set_title(f"(b) active fraction by position ({pos['windows']} windows of wiki:eval)", fontsize=9)
    bx.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

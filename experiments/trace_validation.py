"""Validation of the scale model's trace source (``research.trace``), against a real model and the paper.

1. Real model (measured activations, wiki:eval): the trace family (sigma_b, rho, flicker) is fitted to three
   numbers of its true sets (N(1) and N(5), the shares of neurons new to a 1- and a 5-token window, and U(5), the
   5-token window's size), with the real per-layer active fractions; then the whole curves U(k), N(k) for
   k = 1..32, the persistence P(active at t | active at t-1) and the popularity concentration (share of activations
   by the top 1/5/10/20/50% of neurons) of the fitted trace (simulated) are compared with the real model's.
2. Paper (OPT-6.7B): the scale trace (``paper_params``: the paper's per-layer active profile, the flicker share
   fitted on smollm2-relu, sigma_b and rho fitted to the paper's predicted-set window numbers) is simulated at full
   size (32 layers x 16384 neurons) and its statistics compared with the paper's: 3.3% active per layer
   (1.56% / 2.66% / 5.36% at layers 1 / 16 / 32),
   predicted sets ~10% of the FFN with ~5% false negatives and ~7% false positives, 2.4% of the FFN new per token
   with k = 5, a window of ~24%. ``--refit`` re-runs the fit of (sigma_b, rho) to the paper's numbers (flicker
   fixed at the value in use).
"""

from __future__ import annotations

import numpy as np

from llmflash.reorder import collect_masks
from research.trace import (
    PAPER_FLICKER,
    PAPER_RHO,
    PAPER_SIGMA_B,
    TraceModel,
    TraceParams,
    fit_trace,
    paper_params,
    persistence,
    popularity,
    window_stats,
)

import common

K = 32
PAPER_TARGETS = {"active_mean": 0.033, "active_layer1": 0.0156, "active_layer16": 0.0266, "active_layer32": 0.0536,
                 "predicted_mean": 0.10, "recall": 0.95, "fpr": 0.07, "new5_predicted": 0.024, "union5_predicted": 0.24}


def stats_of(seqs_per_layer: list[list[np.ndarray]]) -> dict:
    ws = [window_stats(seqs, K) for seqs in seqs_per_layer]
    pops = [popularity(seqs) for seqs in seqs_per_layer]
    return {
        "union": np.mean([w["union"] for w in ws], 0).tolist(), "new": np.mean([w["new"] for w in ws], 0).tolist(),
        "active": float(np.mean([w["active"] for w in ws])),
        "persistence": float(np.mean([persistence(s) for s in seqs_per_layer])),
        "top_share": {k: float(np.mean([p["top_share"][k] for p in pops])) for k in pops[0]["top_share"]},
        "rate_sorted": np.mean([p["rate_sorted"] for p in pops], 0).tolist(),
    }


def main() -> None:
    p = common.parser("trace_validation", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="real-model eval tokens (default 2048 quick, 16384 full)")
    p.add_argument("--refit", action="store_true", help="re-fit (sigma_b, rho) to the paper's numbers")
    args = p.parse_args()
    tokens = args.tokens or (2048 if args.quick else 16384)
    data: dict = {"paper_targets": PAPER_TARGETS}
    rows = []
    setup = None
    if common.wanted(args, "real"):
        setup = common.real_setup(args.model)
        r = collect_masks(setup["flash_dir"], setup["sparsity"], setup.get("threshold_sparsity") or 0.8,
                          max_tokens=tokens)
        real = stats_of(r["masks"])
        act = r["per_layer_active_fraction"]
        ws = [window_stats(seqs, K) for seqs in r["masks"]]
        targets = {"new1": [w["new"][1] for w in ws], "new5": [w["new"][5] for w in ws],
                   "union5": [w["union"][4] for w in ws]}
        fit = fit_trace(act, targets, kind="true", free=("sigma_b", "rho", "flicker"), n=r["n"], tokens=192,
                        n_layers_sim=6 if args.quick else 10, maxfev=60 if args.quick else 150)
        print(f"fitted to {setup['model']}: sigma_b {fit['sigma_b']:.3f}, rho {fit['rho']:.4f}, "
              f"flicker {fit['flicker']:.3f} (loss {fit['loss']:.3f})")
        tm = TraceModel(TraceParams(tuple(act), fit["sigma_b"], fit["rho"], flicker=fit["flicker"]), r["n"])
        seq_len = r["seq_len"]
        n_seq = max(1, min(len(r["masks"][0]), 4 if args.quick else 16))
        sim = []
        for layer in range(len(act)):
            seqs = []
            for _ in range(n_seq):
                tm.state[layer].z[:] = tm.state[layer].rng.standard_normal(r["n"], dtype=np.float32)  # new sequence
                seqs.append(tm.masks(layer, seq_len, "true"))
            sim.append(seqs)
        trace = stats_of(sim)
        err_u = np.abs(np.array(trace["union"]) - np.array(real["union"])) / np.array(real["union"])
        err_n = np.abs(np.array(trace["new"][1:]) - np.array(real["new"][1:])) / np.array(real["new"][1:])
        data["real"] = {"model": setup["label"], "label": "measured", "stats": real, "fit": fit,
                        "fitted_trace": {"label": "simulated", "stats": trace},
                        "max_rel_error_union_k1_32": float(err_u.max()), "max_rel_error_new_k1_32": float(err_n.max()),
                        "mean_rel_error_union": float(err_u.mean()), "mean_rel_error_new": float(err_n.mean())}
        for name, s in (("real (measured)", real), ("fitted trace (simulated)", trace)):
            rows.append({"series": name, "active": s["active"], "persistence": s["persistence"],
                         "union_k5": s["union"][4], "new_k5": s["new"][5], "union_k32": s["union"][-1],
                         "new_k32": s["new"][-1], **{f"top{k}": v for k, v in s["top_share"].items()}})
        print(f"real vs fitted trace: U(k) within {err_u.max():.0%} (mean {err_u.mean():.0%}), N(k) within "
              f"{err_n.max():.0%} (mean {err_n.mean():.0%}) for k = 1..{K}; persistence {real['persistence']:.2f} vs "
              f"{trace['persistence']:.2f}")
    if common.wanted(args, "scale"):
        params = paper_params()
        if args.refit:
            f = fit_trace(params.active, {"new5": PAPER_TARGETS["new5_predicted"],
                                          "union5": PAPER_TARGETS["union5_predicted"]},
                          kind="predicted", fixed={"flicker": PAPER_FLICKER}, tokens=160, maxfev=80)
            data["paper_refit"] = f
            print(f"refit to the paper: sigma_b {f['sigma_b']:.3f} (in use {PAPER_SIGMA_B}), rho {f['rho']:.3f} "
                  f"(in use {PAPER_RHO}), flicker {PAPER_FLICKER} fixed")
        tm = TraceModel(params, 16384)
        n_tok = 96 if args.quick else 256
        per_layer = []
        pred_seqs, true_seqs = [], []
        for layer in range(len(params.active)):
            tm.reset()
            pairs = [tm.step(layer) for _ in range(n_tok)]
            t = np.stack([a for a, _ in pairs])
            q = np.stack([b for _, b in pairs])
            per_layer.append({"layer": layer + 1, "active": float(t.mean()), "predicted": float(q.mean()),
                              "recall": float((t & q).sum() / max(t.sum(), 1)),
                              "fpr": float((q & ~t).sum() / max((~t).sum(), 1))})
            true_seqs.append([t])
            pred_seqs.append([q])
        ps, ts = stats_of(pred_seqs), stats_of(true_seqs)
        for st in (ps, ts):
            st.pop("rate_sorted")
        got = {"active_mean": float(np.mean([e["active"] for e in per_layer])),
               "active_layer1": per_layer[0]["active"], "active_layer16": per_layer[15]["active"],
               "active_layer32": per_layer[31]["active"],
               "predicted_mean": float(np.mean([e["predicted"] for e in per_layer])),
               "recall": float(np.mean([e["recall"] for e in per_layer])),
               "fpr": float(np.mean([e["fpr"] for e in per_layer])),
               "new5_predicted": ps["new"][5], "union5_predicted": ps["union"][4]}
        data["scale"] = {"label": "simulated", "params": params.to_json(), "tokens": n_tok, "per_layer": per_layer,
                         "stats_predicted": ps, "stats_true": ts, "vs_paper": {k: {"paper": PAPER_TARGETS[k],
                                                                                     "trace": got[k]} for k in got}}
        for k in got:
            rows.append({"series": "scale trace vs paper", "statistic": k, "paper": PAPER_TARGETS[k], "trace": got[k],
                         "rel_error": abs(got[k] - PAPER_TARGETS[k]) / PAPER_TARGETS[k]})
            print(f"  {k:<18} paper {PAPER_TARGETS[k]:.4f}  trace {got[k]:.4f}")
    common.save(args.out, "trace_validation", args, data=data, rows=rows, extra_config={"tokens": tokens, "setup": setup})
    plot(data, args.out / "trace_validation.png")


def plot(data: dict, png) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    k = np.arange(1, K + 1)
    if "real" in data:
        rs, ts = data["real"]["stats"], data["real"]["fitted_trace"]["stats"]
        ax = axes[0]
        ax.plot(k, np.array(rs["union"]) * 100, "b-", label="U(k) real (measured)")
        ax.plot(k, np.array(ts["union"]) * 100, "b--", label="U(k) fitted trace (simulated)")
        ax.plot(k, np.array(rs["new"][1:]) * 100, "r-", label="N(k) real (measured)")
        ax.plot(k, np.array(ts["new"][1:]) * 100, "r--", label="N(k) fitted trace (simulated)")
        ax.scatter([5, 1, 5], [rs["union"][4] * 100, rs["new"][1] * 100, rs["new"][5] * 100], marker="x", color="k",
                   zorder=5, label="the three fitted statistics (layer means)")
        ax.set_yscale("log")
        ax.set_xlabel("window size k (tokens)")
        ax.set_ylabel("% of FFN neurons (log)")
        ax.set_title(f"{data['real']['model']}: window curves, real vs fitted trace", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[1]
        for s, ls, lab in ((rs, "-", "real (measured)"), (ts, "--", "fitted trace (simulated)")):
            r = np.array(s["rate_sorted"])
            ax.plot(np.arange(1, r.size + 1) / r.size * 100, r * 100, ls, label=lab)
        ax.set_xscale("log")
        ax.set_xlabel("neuron rank by activation rate (% of the layer, log)")
        ax.set_ylabel("activation rate (% of tokens)")
        ax.set_title("Neuron popularity (mean over layers)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if "scale" in data:
        ax = axes[2]
        vs = data["scale"]["vs_paper"]
        keys = list(vs)
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [vs[q]["paper"] * 100 for q in keys], 0.4, label="paper OPT-6.7B", color="tab:red")
        ax.bar(x + 0.2, [vs[q]["trace"] * 100 for q in keys], 0.4, label="scale trace (simulated)", color="tab:orange")
        ax.set_xticks(x)
        ax.set_xticklabels([q.replace("_", "\n") for q in keys], fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("% (log)")
        ax.set_title("Scale-model trace vs the paper's OPT-6.7B statistics", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

"""Figure 4a: aggregated neuron usage vs window size k, and the share of the FFN loaded per token vs k.

For consecutive tokens with active sets S_t (per layer, averaged over layers and tokens):
- aggregated usage U(k) = |S_t u ... u S_{t-k+1}| / n: what a sliding window of k tokens keeps in DRAM;
- loaded per token N(k) = |S_t minus (S_{t-1} u ... u S_{t-k})| / n: what the window must read for a token (k=0: no
  window, the whole set every token).
Real model (measured activations on wiki:eval: true sets, and predicted sets when predictors exist) and the scale
model's trace source (simulated); the paper's OPT-6.7B points at k=5 for its predicted sets: window 24%, 2.4% new.
``--replot`` only redraws the figure from OUT/window_usage.json.
"""

from __future__ import annotations

import json

import numpy as np

from research.trace import TraceModel, paper_params, window_stats

import common

PAPER = {"k": 5, "union": 0.24, "new": 0.024, "predicted": 0.10}


def layer_mean(stats: list[dict]) -> dict:
    out = {k: stats[0][k] for k in ("k_union", "k_new")}
    for key in ("union", "new"):
        arr = np.array([s[key] for s in stats])
        out[key] = arr.mean(0).tolist()
        out[key + "_min"] = arr.min(0).tolist()
        out[key + "_max"] = arr.max(0).tolist()
    out["active"] = float(np.mean([s["active"] for s in stats]))
    return out


def main() -> None:
    p = common.parser("window_usage", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="real-model eval tokens (default 2048 quick, 16384 full)")
    p.add_argument("--k-max", type=int, default=32)
    p.add_argument("--replot", action="store_true", help="only redraw the figure from OUT/window_usage.json")
    args = p.parse_args()
    if args.replot:
        plot(json.loads((args.out / "window_usage.json").read_text()), args.out / "window_usage.png")
        return
    tokens = args.tokens or (2048 if args.quick else 16384)
    K = args.k_max
    curves: dict = {"paper_opt_6_7b": dict(PAPER, label="paper")}
    setup = None
    if common.wanted(args, "real"):
        from llmflash.reorder import collect_masks

        setup = common.real_setup(args.model)
        r = collect_masks(setup["flash_dir"], setup["sparsity"], setup.get("threshold_sparsity") or 0.8,
                          max_tokens=tokens, predictors=setup["predictors"])
        curves["real_true"] = dict(layer_mean([window_stats(ms, K) for ms in r["masks"]]), label="measured",
                                   name=f"{setup['model']}: true sets")
        if r.get("pred_masks"):
            curves["real_predicted"] = dict(layer_mean([window_stats(ms, K) for ms in r["pred_masks"]]),
                                            label="measured", name=f"{setup['model']}: predicted sets")
    if common.wanted(args, "scale"):
        params = paper_params()
        tm = TraceModel(params, 16384)
        n_tok = (K + 48) if args.quick else (K + 224)
        layers = range(0, 32, 4) if args.quick else range(32)
        for kind in ("predicted", "true"):
            st = []
            for layer in layers:
                tm.reset()
                st.append(window_stats([tm.masks(layer, n_tok, kind)], K))
            curves[f"scale_{kind}"] = dict(layer_mean(st), label="simulated", name=f"scale-model trace: {kind} sets",
                                           layers=list(layers))
    rows = []
    for key, c in curves.items():
        if key.startswith("paper"):
            continue
        for k, u in zip(c["k_union"], c["union"]):
            rows.append({"series": key, "k": k, "aggregated_usage": u, "label": c["label"]})
        for k, nw in zip(c["k_new"], c["new"]):
            rows.append({"series": key, "k": k, "loaded_per_token": nw, "label": c["label"]})
    common.save(args.out, "window_usage", args, data=curves, rows=rows, extra_config={"tokens": tokens, "setup": setup})
    plot(curves, args.out / "window_usage.png")
    for key, c in curves.items():
        if not key.startswith("paper"):
            print(f"{key}: active {c['active']:.2%}, window(5) {c['union'][4]:.1%}, new per token at k=5 {c['new'][5]:.2%}")


def plot(curves: dict, png) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    styles = {"real_true": ("tab:blue", "-"), "real_predicted": ("tab:blue", "--"),
              "scale_predicted": ("tab:orange", "--"), "scale_true": ("tab:orange", "-")}
    series = [(key, c) for key, c in curves.items() if not key.startswith("paper")]

    def band_area(c: dict) -> float:
        return float(np.sum(np.array(c["union_max"]) - np.array(c["union_min"])))

    # bands: the widest drawn first (lowest), each faint with its edges outlined in its series' style, so that a wide
    # band (a real model's layers differ a lot) does not hide the narrower ones; the means are drawn over all bands
    for z, (key, c) in enumerate(sorted(series, key=lambda kc: -band_area(kc[1]))):
        col, ls = styles.get(key, ("grey", "-"))
        k, lo, hi = c["k_union"], np.array(c["union_min"]) * 100, np.array(c["union_max"]) * 100
        axes[0].fill_between(k, lo, hi, color=col, alpha=0.07, lw=0, zorder=1 + z)
        for edge in (lo, hi):
            axes[0].plot(k, edge, color=col, ls=ls, lw=0.7, alpha=0.55, zorder=1 + z)
    for key, c in series:
        col, ls = styles.get(key, ("grey", "-"))
        lab = f"{c['name']} ({c['label']})"
        axes[0].plot(c["k_union"], np.array(c["union"]) * 100, color=col, ls=ls, lw=2, label=lab, zorder=10)
        axes[1].plot(c["k_new"], np.array(c["new"]) * 100, color=col, ls=ls, lw=2, label=lab, zorder=10)
    pp = curves["paper_opt_6_7b"]
    axes[0].scatter([pp["k"]], [pp["union"] * 100], marker="*", s=160, color="red", zorder=5,
                    label="paper OPT-6.7B predicted sets, k=5")
    axes[1].scatter([pp["k"]], [pp["new"] * 100], marker="*", s=160, color="red", zorder=5,
                    label="paper OPT-6.7B predicted sets, k=5")
    axes[1].scatter([0], [pp["predicted"] * 100], marker="*", s=100, color="darkred", zorder=5,
                    label="paper: predicted set alone (~10%)")
    axes[0].set_xlabel("window size k (tokens)")
    axes[0].set_ylabel("aggregated neuron usage (% of FFN neurons)")
    axes[0].set_title("What a window of k tokens holds\n(thick: mean over layers; band with thin edges: min-max over layers)",
                      fontsize=10)
    axes[1].set_xlabel("window size k (tokens)")
    axes[1].set_ylabel("neurons loaded per token (% of FFN neurons)")
    axes[1].set_title("What each token must load with a window of k\n(mean over layers)", fontsize=10)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        # under the panel: inside, the legend covered the bands
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

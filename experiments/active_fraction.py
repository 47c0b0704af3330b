"""Figure 9: share of FFN neurons active per layer.

- real model (measured): held-out Wikipedia text (wiki:eval) through the model in DRAM, the sparsity rule applied
  (``llmflash.reorder.collect_masks``: the same windows and ``ActiveCounter`` as ``llmflash.evaluate.perplexity``);
- scale model (simulated): the trace source's true sets (per-layer fractions follow the paper's OPT-6.7B profile);
- paper (reference): OPT-6.7B, 1.56% at layer 1, 2.66% at layer 16, 5.36% at layer 32, 3.30% on average.
"""

from __future__ import annotations

import numpy as np

from research.trace import TraceModel, paper_params

import common

PAPER_POINTS = {1: 1.56, 16: 2.66, 32: 5.36}
PAPER_MEAN = 3.30


def main() -> None:
    p = common.parser("active_fraction", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="eval tokens (default 2048 quick, 16384 full)")
    args = p.parse_args()
    tokens = args.tokens or (2048 if args.quick else 16384)
    data: dict = {"paper_opt_6_7b": {"points_percent": PAPER_POINTS, "mean_percent": PAPER_MEAN, "label": "paper"}}
    rows = []
    setup = None
    if common.wanted(args, "real"):
        from llmflash.reorder import collect_masks

        setup = common.real_setup(args.model)
        r = collect_masks(setup["flash_dir"], setup["sparsity"], setup.get("threshold_sparsity") or 0.8,
                          max_tokens=tokens, predictors=setup["predictors"])
        data["real"] = {"label": "measured", "model": setup["label"], "tokens": r["tokens"], "ppl": r["ppl"],
                        "per_layer": r["per_layer_active_fraction"], "mean": r["ffn_active_fraction"]}
        if r.get("pred_masks"):
            data["real"]["per_layer_predicted"] = [float(np.mean([m.mean() for m in ms])) for ms in r["pred_masks"]]
        for i, f in enumerate(r["per_layer_active_fraction"]):
            rows.append({"model": setup["model"], "layer": i + 1, "active_fraction": f, "label": "measured"})
    if common.wanted(args, "scale"):
        params = paper_params()
        tm = TraceModel(params, 16384)
        n_tok = 64 if args.quick else 256
        fr, pr = [], []
        for layer in range(len(params.active)):
            t = tm.masks(layer, n_tok, "true")
            tm.reset()
            q = tm.masks(layer, n_tok, "predicted")
            fr.append(float(t.mean()))
            pr.append(float(q.mean()))
        data["scale"] = {"label": "simulated", "per_layer": fr, "per_layer_predicted": pr, "mean": float(np.mean(fr)),
                         "mean_predicted": float(np.mean(pr)), "target_profile": list(params.active), "tokens": n_tok}
        for i, (f, q) in enumerate(zip(fr, pr)):
            rows.append({"model": "opt-6.7b-scale", "layer": i + 1, "active_fraction": f, "predicted_fraction": q,
                         "label": "simulated"})
    common.save(args.out, "active_fraction", args, data=data, rows=rows,
                extra_config={"tokens": tokens, "setup": setup})
    plot(data, args.out / "active_fraction.png")
    for k in ("real", "scale"):
        if k in data:
            print(f"{k}: mean active {data[k]['mean']:.2%}")


def plot(data: dict, png) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    if "real" in data:
        f = np.array(data["real"]["per_layer"]) * 100
        ax.bar(np.arange(1, f.size + 1), f, color="tab:blue",
               label=f"{data['real']['model']}: measured, mean {data['real']['mean']:.1%}")
        if "per_layer_predicted" in data["real"]:
            q = np.array(data["real"]["per_layer_predicted"]) * 100
            ax.plot(np.arange(1, q.size + 1), q, "k.-", label="predicted by its predictors")
        ax.set_ylim(0, max(f.max() * 1.25, 1))
    ax.set_xlabel("layer")
    ax.set_ylabel("active FFN neurons (% of the layer)")
    ax.set_title("Real model on held-out Wikipedia text")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    if "scale" in data:
        f = np.array(data["scale"]["per_layer"]) * 100
        ax.bar(np.arange(1, f.size + 1), f, color="tab:orange",
               label=f"scale-model trace: simulated, mean {data['scale']['mean']:.2%}")
        q = np.array(data["scale"]["per_layer_predicted"]) * 100
        ax.plot(np.arange(1, q.size + 1), q, "k.-", label=f"trace predicted sets, mean {data['scale']['mean_predicted']:.1%}")
    pts = data["paper_opt_6_7b"]["points_percent"]
    ax.scatter(list(map(int, pts)), list(pts.values()), marker="*", s=160, color="red", zorder=5,
               label=f"paper OPT-6.7B (mean {PAPER_MEAN}%)")
    ax.axhline(PAPER_MEAN, color="red", ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("active FFN neurons (% of the layer)")
    ax.set_title("OPT-6.7B: paper vs the scale model's trace source")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

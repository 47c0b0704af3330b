"""Appendix D: co-activation. Closest friends, the failed closest-friend bundling, and co-activation ordering.

1. Closest friends (measured activations, real model, wiki:eval): for each neuron, the neuron most often active when
   it is, and how often it co-fires; how many neurons' closest friend is one of the 1% most active neurons.
2. Closest-friend bundling (computed from the same activations): every neuron's flash record also carries a copy of
   its closest friend (records twice as large); a token reads the records of the neurons it needs that are not
   already in DRAM (window k=5) and not brought by another record. Bytes per token against plain bundles.
3. Ripple-style ordering: neurons of each layer stored in the file in a co-activation order (greedy chain on the
   co-activation similarity, fitted on wiki:train activations) so that neurons needed together are neighbours and
   the engine's read planner merges them into longer reads.
   - computed (real model, wiki:eval): reads per token and I/O time (bytes / profile-io bandwidth at each read's
     size) for the original order, a popularity order and the co-activation order;
   - measured (real model): the engine on a permuted copy of the flash directory against the original;
   - measured (scale model): the trace's neurons have no co-activation structure beyond popularity, so its
     reordering is the popularity order (from 256 simulated tokens), applied through the provider on the same file
     (random weights: a permuted file would be statistically identical).
"""

from __future__ import annotations

import numpy as np

from llmflash import metrics
from llmflash.reorder import coactivation, coactivation_order, collect_masks, popularity_order, write_permuted_flash_dir
from research.trace import TraceModel, closest_friends, new_sets, paper_params, read_sizes

import common
import engine_runs

WINDOW = 5
SHORT = {"original": "orig.", "popularity": "popul.", "coactivation": "coact."}


def friend_bundling(seqs, friend: np.ndarray, window: int) -> dict:
    """Records read per token when each record holds a neuron and a copy of its closest friend.

    A token needs its active neurons; those in DRAM (active, or brought as a friend, within the last ``window``
    tokens) are not read; of the rest, a neuron already brought by an earlier record of the same token is skipped.
    """
    recs = plain = tokens = 0
    for seq in seqs:
        n = seq.shape[1]
        in_dram_until = np.full(n, -1, np.int64)
        for t in range(seq.shape[0]):
            need = np.flatnonzero(seq[t])
            missing = need[in_dram_until[need] < t]
            plain += missing.size
            got = np.zeros(n, bool)
            for i in missing.tolist():
                if got[i]:
                    continue
                got[i] = True
                got[friend[i]] = True
                recs += 1
            brought = np.flatnonzero(got)
            in_dram_until[brought] = np.maximum(in_dram_until[brought], t + window - 1)
            in_dram_until[need] = t + window - 1
            tokens += 1
    return {"records_per_token": recs / tokens, "plain_per_token": plain / tokens}


def computed_reads(seqs, order: np.ndarray, stride: int, window: int, table) -> dict:
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    reads = nbytes = 0
    ms = 0.0
    tokens = 0
    for seq in seqs:
        for need in new_sets(seq, window):
            sizes = read_sizes(pos[need], stride)
            reads += sizes.size
            nbytes += int(sizes.sum())
            if table:
                u, c = np.unique(sizes, return_counts=True)
                ms += metrics.profiled_read_ms(dict(zip(u.tolist(), c.tolist())), table)
            tokens += 1
    return {"reads_per_token": reads / tokens, "bytes_per_token": nbytes / tokens, "computed_io_ms": ms / tokens,
            "mean_read_bytes": nbytes / max(reads, 1)}


def main() -> None:
    p = common.parser("coactivation", __doc__)
    p.add_argument("--tokens", type=int, default=None, help="activation tokens (default 2048 quick, 16384 full)")
    args = p.parse_args()
    tokens = args.tokens or (2048 if args.quick else 16384)
    table = engine_runs.load_bandwidth(16)
    data: dict = {}
    rows = []
    setups = []
    if common.wanted(args, "real"):
        setup = common.real_setup(args.model)
        setups.append(setup)
        thr = setup.get("threshold_sparsity") or 0.8
        ev = collect_masks(setup["flash_dir"], setup["sparsity"], thr, source="wiki:eval", max_tokens=tokens)
        tr = collect_masks(setup["flash_dir"], setup["sparsity"], thr, source="wiki:train", max_tokens=tokens)
        from llmflash.flashdir import open_flash_dir

        fd = open_flash_dir(setup["flash_dir"])
        stride = fd.layout.neuron_stride_bytes
        L = fd.layout.n_layers
        friends, orders, per_layer = [], [], []
        rates_all = []
        for layer in range(L):
            c, counts = coactivation(ev["masks"][layer])
            cf = closest_friends(c, counts)
            rates_all.append(cf["rate"][cf["alive"]])
            c_tr, counts_tr = coactivation(tr["masks"][layer])
            co = coactivation_order(c_tr, counts_tr)
            po = popularity_order(counts_tr)
            ident = np.arange(c.shape[0])
            fb0 = friend_bundling(ev["masks"][layer], cf["friend"], WINDOW)
            new_plain = fb0["plain_per_token"]
            entry = {"layer": layer + 1, "friend_rate_median": float(np.median(cf["rate"][cf["alive"]])),
                     "share_friend_rate_ge_95": float((cf["rate"][cf["alive"]] >= 0.95).mean()),
                     "friend_is_top1pct": cf["friend_is_top1pct"], "distinct_friends": cf["distinct_friends"],
                     "plain_neurons_loaded_per_token": new_plain,
                     "friend_records_per_token": fb0["records_per_token"],
                     "friend_bytes_ratio": 2 * fb0["records_per_token"] / max(new_plain, 1e-9)}
            for name, order in (("original", ident), ("popularity", po), ("coactivation", co)):
                for w in (0, WINDOW):
                    r = computed_reads(ev["masks"][layer], order, stride, w, table)
                    entry[f"{name}_w{w}_reads"] = r["reads_per_token"]
                    entry[f"{name}_w{w}_io_ms"] = r["computed_io_ms"]
            per_layer.append(entry)
            friends.append(cf)
            orders.append(co)
            rows.append(dict(entry, model=setup["model"], label="computed from measured activations"))
        tot = {k: float(np.sum([e[k] for e in per_layer])) for k in per_layer[0] if k.endswith(("_reads", "_io_ms"))}
        real = {
            "model": setup["label"], "tokens_eval": ev["tokens"], "tokens_fit": tr["tokens"], "label": "computed",
            "friend_rate_all": np.concatenate(rates_all).tolist(), "per_layer": per_layer, "totals_per_token": tot,
            "friend_bytes_ratio_mean": float(np.mean([e["friend_bytes_ratio"] for e in per_layer])),
        }
        # measured: the engine on the co-activation-ordered copy against the original
        from llmflash.paths import cache_dir

        label = "ours, co-activation order"
        base = engine_runs.standard_run(setup, "ours", args.quick, table=table)
        if tokens == common.coact_fit_tokens(args.quick):  # the directory Table 2 and 3 use (same order)
            reord = engine_runs.standard_run(setup, "ours_coact", args.quick, table=table, label=label)
        else:
            perm_dir = cache_dir() / "flash" / f"{setup['model']}-coact-order-{tokens}"
            write_permuted_flash_dir(setup["flash_dir"], perm_dir, orders, progress=False)
            reord = engine_runs.standard_run(setup, "ours", args.quick, table=table, perm=orders, flash_dir=str(perm_dir),
                                        label=label)
        real["measured"] = {"original": base, "coactivation_order": reord,
                            "same_tokens": base["tokens"] == reord["tokens"]}
        data["real"] = real
        print(f"real: closest friend co-fires >= 95% for {np.mean(np.concatenate(rates_all) >= 0.95):.1%} of neurons; "
              f"friend bundling loads {real['friend_bytes_ratio_mean']:.2f}x the bytes")
        print(f"real: reads/token window {WINDOW}: original {tot[f'original_w{WINDOW}_reads']:.0f}, popularity "
              f"{tot[f'popularity_w{WINDOW}_reads']:.0f}, co-activation {tot[f'coactivation_w{WINDOW}_reads']:.0f} "
              f"(computed); measured {base['summary']['reads_per_token']:.0f} -> {reord['summary']['reads_per_token']:.0f}"
              f", io {base['summary']['io_ms']:.1f} -> {reord['summary']['io_ms']:.1f} ms")
    if common.wanted(args, "scale"):
        setup = common.scale_setup()
        setups.append(setup)
        params = paper_params()
        tm = TraceModel(params, 16384)
        orders = []
        for layer in range(len(params.active)):
            counts = tm.masks(layer, 256, "predicted").sum(0)
            orders.append(popularity_order(counts))
        base = engine_runs.standard_run(setup, "ours", args.quick, table=table)
        reord = engine_runs.standard_run(setup, "ours", args.quick, table=table, perm=orders,
                                    label="ours, popularity order (trace)")
        data["scale"] = {"label": "measured (simulated active sets)", "original": base, "popularity_order": reord}
        print(f"scale: reads/token {base['summary']['reads_per_token']:.0f} -> {reord['summary']['reads_per_token']:.0f}, "
              f"io {base['summary']['io_ms']:.0f} -> {reord['summary']['io_ms']:.0f} ms")
    for key in ("real", "scale"):
        if key not in data:
            continue
        d = data[key]
        pairs = (("original", "coactivation_order") if key == "real" else ("original", "popularity_order"))
        src = d["measured"] if key == "real" else d
        for which in pairs:
            s = src[which]["summary"]
            rows.append({"model": src[which]["model"], "layout": which, "reads_per_token": s["reads_per_token"],
                         "mean_read_kib": s["mean_read_bytes"] / 1024, "io_ms": s["io_ms"],
                         "computed_io_ms": s.get("computed_io_ms"), "ms_per_token": s["ms_per_token"],
                         "bytes_per_token": s["bytes_read_per_token"], "label": "measured"})
    common.save(args.out, "coactivation", args, data=data, rows=rows, extra_config={"tokens": tokens, "window": WINDOW,
                                                                                    "setups": setups})
    plot(data, args.out / "coactivation.png")


def plot(data: dict, png) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    if "real" in data:
        r = np.array(data["real"]["friend_rate_all"])
        ax.hist(r * 100, bins=40, color="tab:blue")
        ax.axvline(95, color="red", ls=":", label=f"95% ({(r >= 0.95).mean():.1%} of neurons at or above)")
        ax.set_title(f"{data['real']['model']}: how often a neuron's closest friend\nco-fires with it "
                     "(computed from measured activations)", fontsize=9)
        ax.legend(fontsize=8)
    ax.set_xlabel("P(closest friend active | neuron active) (%)")
    ax.set_ylabel("neurons (all layers)")
    ax = axes[1]
    if "real" in data:
        pl = data["real"]["per_layer"]
        x = [e["layer"] for e in pl]
        ax.plot(x, [e["friend_bytes_ratio"] for e in pl], "o-", color="tab:red",
                label="closest-friend bundles / plain bundles (bytes read)")
        ax.plot(x, [e["friend_is_top1pct"] for e in pl], "s--", color="tab:grey",
                label="share of neurons whose friend is a top-1% hot neuron")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_title(f"Closest-friend bundling, window k={WINDOW} (computed)", fontsize=9)
        ax.legend(fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("ratio / share")
    ax.grid(True, alpha=0.3)
    ax = axes[2]
    labels, reads, ios, colors = [], [], [], []
    if "real" in data:
        t = data["real"]["totals_per_token"]
        for name in ("original", "popularity", "coactivation"):
            labels.append(f"real\n{SHORT[name]}\ncomputed*")
            reads.append(t[f"{name}_w{WINDOW}_reads"])
            ios.append(t[f"{name}_w{WINDOW}_io_ms"])
            colors.append("tab:blue")
        m = data["real"]["measured"]
        for name in ("original", "coactivation_order"):
            labels.append(f"real\n{SHORT[name.split('_')[0]]}\nmeasured")
            reads.append(m[name]["summary"]["reads_per_token"])
            ios.append(m[name]["summary"]["io_ms"])
            colors.append("tab:cyan")
    if "scale" in data:
        for name in ("original", "popularity_order"):
            labels.append(f"scale\n{SHORT[name.split('_')[0]]}\nmeasured")
            reads.append(data["scale"][name]["summary"]["reads_per_token"])
            ios.append(data["scale"][name]["summary"]["io_ms"])
            colors.append("tab:orange")
    x = np.arange(len(labels))
    ax.bar(x, reads, color=colors)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("reads per token (window k=5)")
    ax.set_yscale("log")
    for i, v in enumerate(ios):
        ax.annotate(f"{v:.0f} ms", (x[i], reads[i]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_title("Neuron order in the file (orig./popul./coact.): reads per token\n(labels: I/O ms per token; "
                 "*computed with an unlimited cache)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    common.savefig(fig, png)


if __name__ == "__main__":
    main()

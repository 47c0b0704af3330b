"""Predictor mode against naive at half the model in DRAM, per predictor kind: the issue's speed target, measured.

For each flash directory (``--dirs``; default the demo's co-activation-ordered smollm2-relu in float32, and the same
model with int8 resident weights), the rows ``naive``, ``predictor`` with the low-rank set (the paper's),
``predictor`` with the low-bit set (the model's default) and ``oracle`` run one after another, ``--repeats`` times,
alternating, so that each repeat gives each row's speed-up over the naive run beside it. Reported per row: the
median ms per token over generated tokens (after a warm-up of the window), bytes and reads per token, the cache's
hit rate, DRAM, and the speed-up over naive as the median (and range) of the per-repeat ratios. Writes
``speed.json``, ``speed.csv``, ``speed.png`` and ``config.json`` into ``--out``.

    python experiments/predictor_speed.py --out results/predictors/speed
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmflash.engine import EngineConfig
from llmflash.flashdir import open_flash_dir
from llmflash.models import default_predictors, lowrank_predictors
from llmflash.paths import cache_dir
from llmflash.report import median

from common import parser, plt, prompt_ids, save, savefig, smoke
from engine_runs import run

log = logging.getLogger("predictor_speed")
NAME = "predictor_speed"
DEFAULT_DIRS = ("smollm2-relu-*-coact-auto", "relu-r8-coact")  # in the cache's flash/: the demo's, int8 resident


def parse(argv=None):
    p = parser(NAME, __doc__.split("\n\n")[0], models=False)
    p.add_argument("--dirs", default=",".join(DEFAULT_DIRS),
                   help="flash directories, comma-separated (a name is looked up in the cache's flash/, globs allowed)")
    p.add_argument("--lowrank", default=None, help="low-rank predictors (default: smollm2-relu's committed ones)")
    p.add_argument("--lowbit", default=None, help="low-bit predictors (default: smollm2-relu's default ones)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8, help="tokens left out of the medians (the window filling)")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def resolve_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    found = sorted((cache_dir() / "flash").glob(spec))
    if not found:
        raise SystemExit(f"no flash directory {spec} (convert it, or pass a path)")
    return found[0]


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = {"lowrank": args.lowrank or lowrank_predictors("smollm2-relu"),
            "lowbit": args.lowbit or default_predictors("smollm2-relu")}
    rows_cfg = [("naive", None), ("predictor_lowrank", sets["lowrank"]), ("predictor_lowbit", sets["lowbit"]),
                ("oracle", None)]
    rows_cfg = [(label, preds) for label, preds in rows_cfg if preds is not None or not label.startswith("predictor")]
    rows = []
    for spec in [s for s in args.dirs.split(",") if s]:
        path = resolve_dir(spec)
        fd = open_flash_dir(path)
        prompt = prompt_ids(fd.tokenizer(), 16 if smoke() else 64)
        for rep in range(args.repeats):
            got = {}
            for label, preds in rows_cfg:
                if label.startswith("predictor") and preds is None:
                    continue
                mode = "predictor" if label.startswith("predictor") else label
                cfg = EngineConfig(mode=mode, dram_budget=args.budget, predictors=None if preds is None else str(preds))
                r = run(path, cfg, args.tokens, prompt=prompt, warmup=args.warmup, label=label, share=False)
                s = r["summary"]
                got[label] = s["ms_per_token"]
                rows.append({"dir": path.name, "repeat": rep, "row": label, "ms_per_token": s["ms_per_token"],
                             "io_ms": s["io_ms"], "mem_ms": s["mem_ms"], "compute_ms": s["compute_ms"],
                             "predictor_ms": s["predictor_ms"], "bytes_read_per_token": s["bytes_read_per_token"],
                             "reads_per_token": s["reads_per_token"], "cache_hit_rate": s["cache_hit_rate"],
                             "dram_bytes": r["dram_bytes"], "model_bytes": r["model_bytes"],
                             "predictor_bytes": r["dram_breakdown"].get("predictors", 0),
                             "load_average": r["load_average"][0], "text": r["text"]})
                log.info("%s repeat %d %s: %.1f ms/token, %.1f MiB read", path.name, rep, label, s["ms_per_token"],
                         s["bytes_read_per_token"] / 2**20)
            for row in rows[-len(got):]:
                row["speedup_vs_naive"] = got["naive"] / row["ms_per_token"]
    summary = []
    for d in dict.fromkeys(r["dir"] for r in rows):
        for label in dict.fromkeys(r["row"] for r in rows if r["dir"] == d):
            mine = [r for r in rows if r["dir"] == d and r["row"] == label]
            ratios = [r["speedup_vs_naive"] for r in mine]
            summary.append({"dir": d, "row": label, "ms_per_token": median([r["ms_per_token"] for r in mine]),
                            "speedup_vs_naive": median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                            "bytes_read_per_token": median([r["bytes_read_per_token"] for r in mine]),
                            "cache_hit_rate": median([r["cache_hit_rate"] for r in mine]),
                            "dram_fraction": mine[0]["dram_bytes"] / mine[0]["model_bytes"],
                            "predictor_bytes": mine[0]["predictor_bytes"], "repeats": len(mine)})
    save(args.out, "speed", args, {"what": "measured", "summary": summary, "runs": rows}, summary, csv_name="speed")
    plot(summary, args.out / "speed.png", args.budget)
    return 0


def plot(summary: list[dict], path: Path, budget: float) -> None:
    pyplot = plt()
    dirs = list(dict.fromkeys(r["dir"] for r in summary))
    fig, axes = pyplot.subplots(1, len(dirs), figsize=(5.5 * len(dirs), 3.8), squeeze=False)
    for ax, d in zip(axes[0], dirs):
        mine = [r for r in summary if r["dir"] == d]
        xs = range(len(mine))
        ax.bar(xs, [r["ms_per_token"] for r in mine], color=["0.6", "C0", "C1", "0.8"][: len(mine)])
        for x, r in zip(xs, mine):
            ax.text(x, r["ms_per_token"], f"{r['speedup_vs_naive']:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [r["row"].replace("predictor_", "pred. ") for r in mine], fontsize=8)
        ax.set_ylabel("ms per token (median)")
        ax.set_title(f"{d}, DRAM {budget:.0%} of the model", fontsize=9)
    fig.suptitle("measured: speed-up over naive (median of alternating repeats) above each bar", fontsize=10)
    fig.tight_layout()
    savefig(fig, path)
    pyplot.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

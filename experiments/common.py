"""Glue shared by the experiment scripts: arguments, model setups, output files (timed engine runs: ``runs``).

Every script writes ``results/<name>/``: the data (JSON and/or CSV), the PNG drawn from it, and ``config.json`` (its
arguments, the setups and ``llmflash.report.environment()``). Numbers are labelled in the data:

- measured: wall-clock times and byte counts of real runs (reads bypass the page cache);
- computed: derived from measured quantities (bytes / bandwidth measured by profile-io at that read size);
- simulated: produced by the trace source (the scale model's active sets), or by replaying masks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llmflash.errors import LLMFlashError  # noqa: E402
from llmflash.flashdir import FlashDir, open_flash_dir  # noqa: E402
from llmflash.paths import cache_dir  # noqa: E402
from llmflash.report import environment, write_json  # noqa: E402

RESULTS = REPO / "results"
SCALE = "scale"  # the --model value of the scale model
PROMPT_TEXT_SOURCE = "wiki:eval"
PROMPT_TOKENS = 128  # the paper's prompt length (real models)


# ------------------------------------------------------------------------------------------------------- arguments


def parser(name: str, doc: str, models: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings (part of `llmflash reproduce --quick`)")
    p.add_argument("--out", type=Path, default=RESULTS / name, help=f"output directory (default results/{name})")
    if models:
        p.add_argument("--model", default="auto",
                       help="real model: auto (smollm2-relu when its artifacts exist, else smollm2 with threshold "
                            "sparsity), smollm2, smollm2-relu, or a flash directory DIR (e.g. a tiny test model: its "
                            "own sparsity rule, oracle sets)")
        p.add_argument("--models", default="real,scale",
                       help="which of the two models to run: real, scale or real,scale (default both)")
    return p


def wanted(args, which: str) -> bool:
    return which in [m.strip() for m in getattr(args, "models", "real").split(",")]


def save(out: Path, name: str, args, data=None, rows: Optional[list[dict]] = None, extra_config: Optional[dict] = None,
         csv_name: Optional[str] = None) -> None:
    """Write ``<name>.json`` (data), ``<csv_name or name>.csv`` (rows) and config.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if data is not None:
        write_json(out / f"{name}.json", data)
    if rows:
        write_csv(out / f"{csv_name or name}.csv", rows)
    cfg = {"script": sys.argv[0], "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
           "environment": environment(), "load_average": os.getloadavg(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    cfg.update(extra_config or {})
    write_json(out / "config.json", cfg)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys and not isinstance(r[k], (list, dict)):
                keys.append(k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in keys})
    os.replace(tmp, path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def summary_medians(runs: list[dict], metrics: Sequence[str]) -> dict:
    """Each metric's median over the runs' summaries (``engine_runs.run``), and for times (``*_ms``, ``ms_per_token``)
    its range over them as ``<metric>_min`` / ``<metric>_max``."""
    from llmflash.report import median

    row: dict = {}
    for k in metrics:
        vals = [r["summary"][k] for r in runs]
        row[k] = median(vals)
        if k.endswith("_ms") or k == "ms_per_token":
            row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
    return row


def savefig(fig, path: Path) -> None:
    from llmflash.report import save_figure

    save_figure(fig, path)


def setups(args) -> list[tuple[str, dict]]:
    """The (kind, setup) pairs the script's --models asks for: the real model and/or the scale model."""
    out = []
    if wanted(args, "real"):
        out.append(("real", real_setup(args.model)))
    if wanted(args, "scale"):
        out.append(("scale", scale_setup()))
    return out


# -------------------------------------------------------------------------------------------------------- setups


def real_setup(model: str = "auto", threshold_sparsity: float = 0.8, resident_dtype: str = "auto") -> dict:
    """The real model: flash dir, sparsity rule, sparse mode and predictors.

    ``auto``: smollm2-relu (+ its default predictors when they exist) once its artifacts exist, else smollm2 with the
    threshold rule at 80% sparsity (no predictors: the sparse mode is then the oracle). ``resident_dtype`` ``int8`` /
    ``int4``: the directory converted with ``--resident-dtype`` so (int8: the demo's; ``demo.flash_dir_for``).
    """
    from llmflash.demo import default_setup, flash_dir_for
    from llmflash.models import relu_artifact_dir

    if model not in ("auto", "smollm2", "smollm2-relu") and Path(model).is_dir():
        return flash_dir_setup(model)
    if model == "auto":
        model = "smollm2-relu" if relu_artifact_dir().is_dir() else "smollm2"
    if model == "smollm2-relu" and not relu_artifact_dir().is_dir():
        raise LLMFlashError(f"smollm2-relu artifacts are missing ({relu_artifact_dir()}); use --model smollm2")
    if model not in ("smollm2", "smollm2-relu"):
        raise LLMFlashError(f"unknown --model {model!r}: use auto, smollm2 or smollm2-relu")
    s = default_setup(model)
    s = dict(s, threshold_sparsity=threshold_sparsity if s["sparsity"] == "threshold" else None)
    s["flash_dir"] = str(flash_dir_for(s["model"], resident_dtype))
    s["resident_dtype"] = resident_dtype
    s["label"] = s["model"] + (f" (threshold {threshold_sparsity:.0%} sparsity)" if s["sparsity"] == "threshold" else "")
    s["label"] += f", {resident_dtype} resident weights" if resident_dtype in ("int8", "int4") else ""
    return s


def flash_dir_setup(path: str | Path) -> dict:
    """Any converted flash directory as the real model (the experiment smoke tier runs a tiny one): its own sparsity
    rule, oracle sets, no predictors."""
    fd = open_flash_dir(path)
    name = fd.manifest.model.name
    return {"model": name, "source": fd.manifest.model.source, "sparse_mode": "oracle", "sparsity": "auto",
            "predictors": None, "threshold_sparsity": None, "flash_dir": str(fd.path), "label": f"{name} ({fd.path})"}


def scale_setup() -> dict:
    from research.scale import OPT_6_7B, scale_dir, write_scale_model

    path = write_scale_model(geometry=OPT_6_7B)
    return {"model": OPT_6_7B.name, "sparse_mode": "predictor", "sparsity": "relu", "predictors": None,
            "flash_dir": str(path), "unbundled_dir": str(scale_dir(OPT_6_7B, bundled=False)),
            "label": "OPT-6.7B-geometry scale model (synthetic weights, trace-driven active sets)",
            "geometry": asdict(OPT_6_7B)}


COACT_FIT_SOURCE = "wiki:train"  # the text the neuron order is fitted on (the prompts come from wiki:eval)


def smoke() -> bool:
    """``LLMFLASH_SMOKE=1``: the test suite's end-to-end tier runs the script on a tiny model, to check that it runs,
    not what it finds: the smallest settings that still pass through every stage."""
    return os.environ.get("LLMFLASH_SMOKE") == "1"


def coact_fit_tokens(quick: bool) -> int:
    if smoke():
        return 256
    return 2048 if quick else 16384


def real_coact_dir(setup: dict, quick: bool) -> str:
    """The real model reordered by co-activation (``llmflash reorder``), fitted on training text; cached beside the
    original and rebuilt when it was fitted otherwise or its source changed."""
    from llmflash.reorder import reorder_flash_dir

    r8 = {"int8": "-r8", "int4": "-r4"}.get(setup.get("resident_dtype", "auto"), "")
    out = cache_dir() / "flash" / f"{setup['model']}{r8}-coact-order"
    src = open_flash_dir(setup["flash_dir"])
    tokens = coact_fit_tokens(quick)
    try:
        order = open_flash_dir(out).manifest.neuron_order
        info = order.meta if order is not None else {}
        if (info.get("kind"), info.get("source"), info.get("requested_tokens"), info.get("src_checksums")) == (
                "coactivation", COACT_FIT_SOURCE, tokens, src.manifest.checksums.to_json()):
            return str(out)
    except LLMFlashError:
        pass
    reorder_flash_dir(src.path, out, "coactivation", setup["sparsity"], setup.get("threshold_sparsity") or 0.8,
                      source=COACT_FIT_SOURCE, max_tokens=tokens, progress=False,
                      extra_meta={"requested_tokens": tokens, "src_checksums": src.manifest.checksums.to_json()})
    return str(out)


def real_unbundled_dir(setup: dict) -> str:
    """The real model converted with --no-bundling (cached beside the bundled one)."""
    from llmflash.convert import convert

    out = cache_dir() / "flash" / f"{setup['model']}-unbundled"
    try:
        fd = open_flash_dir(out)
        if not fd.layout.bundled and fd.thresholds() is not None:
            return str(out)
    except LLMFlashError:
        pass
    src = open_flash_dir(setup["flash_dir"])
    cal = src.manifest.thresholds
    convert(setup.get("source") or setup["model"], out, dtype=src.manifest.dtype, bundled=False, force=True,
            calibration_tokens=cal.tokens if cal is not None else 0)  # thresholds calibrated alike
    return str(out)


def scale_unbundled_dir() -> str:
    from research.scale import OPT_6_7B, unbundled_scale_dir, write_scale_model

    return str(unbundled_scale_dir(write_scale_model(geometry=OPT_6_7B), OPT_6_7B))


_SHARED: dict[tuple[str, str], FlashDir] = {}


def open_shared(path) -> FlashDir:
    """A flash directory opened once per process (per version of its files), keeping its resident weights after the
    first engine read them (direct I/O, checksum-verified; ``FlashDir.keep_resident``) for every later engine: each
    scale-model Engine would otherwise spend ~10 s re-reading 4.7 GB. Naive mode still re-reads them from flash every
    token (into this same buffer: identical bytes)."""
    fd = open_flash_dir(path)
    key = (str(fd.path.resolve()), json.dumps(fd.manifest.checksums.to_json(), sort_keys=True))
    if key not in _SHARED:
        fd.keep_resident = True
        _SHARED[key] = fd
    return _SHARED[key]


def prompt_ids(tokenizer, n_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the first held-out Wikipedia article (fixed across runs)."""
    from llmflash.text import load_texts

    text = " ".join(load_texts(PROMPT_TEXT_SOURCE)[:3])
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:n_tokens]
    return ids

"""Choose the shipped operating point of a trained sparse-model artifact (CPU): recalibrate its thresholds.

A model trained at one sparsity can run at another: the per-layer thresholds are set to the quantile of |h| that
gives ``--target`` on training text (wiki:train and BIG-bench task texts, never the held-out corpora). The trained
thresholds stay in ``sparse_model.json`` as ``thresholds_trained``.

    python3 -m sparsetrain.ship llmflash/artifacts/smollm2-relu --target 0.80
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CALIBRATION = {"wiki:train": 16_384, "bigbench:": 16_384}
SEQ_LEN = 512


def calibrate_artifact(art: Path, target: float) -> dict:
    from llmflash.models import load_model
    from llmflash.sparse_model import CONFIG_FILE, apply_artifact
    from llmflash.sparsity import calibrate_thresholds
    from llmflash.text import windows

    from .data import _stream, source_docs

    model, tok, _ = load_model("smollm2", torch.float32)
    apply_artifact(model, art)
    batches = []
    for spec, n in CALIBRATION.items():
        stream = torch.from_numpy(_stream(tok, source_docs(spec)[:4000], n).astype("int64"))
        batches.extend(windows(stream, SEQ_LEN))
    table = calibrate_thresholds(model, batches, targets=(target,), progress=False)
    cfg_path = art / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("thresholds_trained", cfg["thresholds"])
    cfg.setdefault("target_sparsity_trained", cfg.get("target_sparsity"))
    cfg["thresholds"] = table[f"{target:g}"]
    cfg["target_sparsity"] = target
    cfg["calibration"] = {"sources": CALIBRATION, "seq_len": SEQ_LEN, "device": "cpu", "dtype": "float32"}
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=1))
    tmp.replace(cfg_path)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.ship")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--target", type=float, required=True)
    args = ap.parse_args()
    cfg = calibrate_artifact(args.artifact, args.target)
    print(f"{args.artifact}: thresholds for sparsity {args.target:g}: "
          f"{', '.join(f'{t:.4f}' for t in cfg['thresholds'][:5])} ...")


if __name__ == "__main__":
    main()

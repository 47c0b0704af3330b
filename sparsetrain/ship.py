"""Choose the shipped operating point of a trained sparse-model artifact (CPU): recalibrate its thresholds.

A model trained at one sparsity can run at another: the per-layer thresholds are set to the quantile of |h| that
gives ``--target`` on training text (wiki:train and BIG-bench task texts, never the held-out corpora). The trained
thresholds stay in ``sparse_model.json`` as ``thresholds_trained``.

    python3 -m sparsetrain.ship llmflash/artifacts/smollm2-relu --target 0.80 [--lora-rank 20] [--lora-int8]

``--lora-rank`` re-encodes the attention LoRA at a lower rank (the best rank-k approximation of each trained delta,
by SVD), ``--lora-int8`` as int8 factors, for an artifact that must fit a size limit: a continuation composes its
LoRA with its start's (16 + 16 + ...). Measured on the fourth campaign's model (results/relufy/campaign4): rank 20 in
fp16 (delta error 17%) and int8 at the full rank 36 (delta error 0.9%, 0.3 MB smaller) give the same held-out
perplexities to within 0.002 of the ratio.
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


def truncate_lora(art: Path, rank: int, int8: bool = False) -> dict:
    """Re-encode every attention LoRA delta B @ A of ``art`` in place: at rank ``rank`` (its best rank-k approximation,
    by SVD; 0 keeps the rank), with ``int8`` as int8 factors (balanced: sqrt of the singular values on each side) with
    per-row float16 scales. Returns the relative Frobenius error of the deltas (mean and max) and the bytes saved."""
    from llmflash.sparse_model import lora_factors, lora_rank, quantize_int8_rows, read_artifact, write_artifact

    cfg, tensors = read_artifact(art)
    errs, before = [], sum(v.numel() * v.element_size() for v in tensors.values())
    for key in [k for k in tensors if k.endswith(".lora_A")]:
        w = key[: -len(".lora_A")]
        a, b = lora_factors(tensors, w)
        k = rank or a.shape[0]
        if k >= a.shape[0] and not int8:
            continue
        delta = b @ a  # [out, in]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(k, s.numel())
        if int8:
            root = s[:k].sqrt()
            qa, sa = quantize_int8_rows(root.unsqueeze(1) * vh[:k])
            qb, sb = quantize_int8_rows(u[:, :k] * root)
            tensors.update({key: qa, key + ".scale": sa, w + ".lora_B": qb, w + ".lora_B.scale": sb})
        else:
            tensors[w + ".lora_B"] = (u[:, :k] * s[:k]).half().contiguous()
            tensors[key] = vh[:k].half().contiguous()
        a2, b2 = lora_factors(tensors, w)
        errs.append(float((b2 @ a2 - delta).norm() / delta.norm().clamp_min(1e-30)))
    after = sum(v.numel() * v.element_size() for v in tensors.values())
    new_rank = lora_rank(tensors)
    report = {"rank": new_rank, "int8": int8, "delta_rel_error_mean": sum(errs) / max(1, len(errs)),
              "delta_rel_error_max": max(errs, default=0.0), "bytes_saved": before - after}
    enc = dict(cfg.get("delta_encoding", {}))
    enc["attention"] = (f"LoRA rank {new_rank} (SVD of the trained delta), "
                        + ("int8 factors, per-row fp16 scales" if int8 else "fp16"))
    n_shards = len(cfg["files"])
    cfg = dict(cfg, delta_encoding=enc, lora_truncation=report)
    cfg.pop("files", None)
    write_artifact(art, tensors, cfg, int(cfg["n_layers"]), shards=n_shards)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 -m sparsetrain.ship")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--lora-rank", type=int, default=0, help="re-encode the attention LoRA at this rank first (0: keep)")
    ap.add_argument("--lora-int8", action="store_true", help="re-encode the attention LoRA as int8 factors first")
    args = ap.parse_args()
    if args.lora_rank or args.lora_int8:
        rep = truncate_lora(args.artifact, args.lora_rank, args.lora_int8)
        print(f"{args.artifact}: attention LoRA at rank {rep['rank']}: delta error mean {rep['delta_rel_error_mean']:.3f}, "
              f"max {rep['delta_rel_error_max']:.3f}; {rep['bytes_saved']} bytes saved")
    cfg = calibrate_artifact(args.artifact, args.target)
    print(f"{args.artifact}: thresholds for sparsity {args.target:g}: "
          f"{', '.join(f'{t:.4f}' for t in cfg['thresholds'][:5])} ...")


if __name__ == "__main__":
    main()

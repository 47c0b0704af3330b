"""``llmflash profile-io``: random-read throughput versus chunk size and parallel reads (the paper's Figure 2b).

A test file is written once (and reused), evicted from the page cache before every measurement and read at random
4 KiB-aligned offsets through ``FlashReader`` (O_DIRECT). The disk is shared and noisy: every point is the median of
several short runs, taken in interleaved sweeps so that a burst of the neighbours' traffic spreads over the points.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from llmflash.errors import LLMFlashError
from llmflash.paths import atomic_file, cache_dir
from llmflash.report import median, save_figure, write_json
from llmflash.storage import ALIGN_BYTES, FlashReader, aligned_buffer, drop_file_cache, proc_read_bytes

log = logging.getLogger(__name__)

PROFILE_FILE_NAME = "llmflash-profile.bin"
CHUNK_SIZES = (4096, 8192, 16384, 32768, 65536, 131072, 262144, 1048576)
THREAD_COUNTS = (1, 4, 8, 16, 32)
QUICK_CHUNK_SIZES = (4096, 16384, 65536, 262144)
QUICK_THREAD_COUNTS = (1, 16, 32)
READS_PER_POINT = 4000  # at most this many reads per run ...
BYTES_PER_POINT = 64 << 20  # ... and at most this many bytes (whichever is smaller)
MIN_READS_PER_POINT = 64  # large chunks: at least 2 reads per thread at 32 threads
WRITE_BLOCK_BYTES = 16 << 20
FREE_SPACE_MARGIN_BYTES = 256 << 20


def _check_dir(dir_path: Path, need_bytes: int) -> None:
    if not dir_path.is_dir():
        raise LLMFlashError(f"{dir_path} is not a directory; create it or pass --dir with an existing directory")
    if need_bytes == 0:
        return
    if not os.access(dir_path, os.W_OK | os.X_OK):
        raise LLMFlashError(f"{dir_path} is not writable; pass --dir with a writable directory")
    free = shutil.disk_usage(dir_path).free
    if free < need_bytes + FREE_SPACE_MARGIN_BYTES:
        raise LLMFlashError(
            f"not enough free space in {dir_path}: the test file needs {need_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; pass a smaller --size-gb or another --dir")


def ensure_profile_file(dir_path: Path, size_bytes: int, progress: bool = True) -> Path:
    """``dir_path/llmflash-profile.bin`` of exactly ``size_bytes`` non-zero bytes (reused if it already fits)."""
    path = dir_path / PROFILE_FILE_NAME
    if path.is_file() and path.stat().st_size == size_bytes:
        _check_dir(dir_path, 0)
        log.info("reusing %s (%d bytes)", path, size_bytes)
        return path
    _check_dir(dir_path, size_bytes)  # written beside the old file, then renamed over it
    rng = np.random.default_rng(1234)
    block = rng.integers(1, 256, WRITE_BLOCK_BYTES, dtype=np.uint8)  # no zero bytes
    stamps = block.view(np.uint64)[:: ALIGN_BYTES // 8]  # first 8 bytes of each page: its file offset (all unique)
    page_offsets = np.arange(len(stamps), dtype=np.uint64) * ALIGN_BYTES
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f, tqdm(
            total=size_bytes, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress
        ) as bar:
            written = 0
            while written < size_bytes:
                n = min(WRITE_BLOCK_BYTES, size_bytes - written)
                stamps[:] = page_offsets + np.uint64(written) + np.uint64(1)
                f.write(memoryview(block)[:n])
                written += n
                bar.update(n)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise LLMFlashError(f"cannot write the test file {path}: {err.strerror}; pass another --dir") from None
    return path


def _measure(reader: FlashReader, path: Path, buf, file_size: int, chunk: int, n_reads: int,
             rng: np.random.Generator) -> tuple[float, int, int]:
    """One run: ``n_reads`` random chunk-sized reads from a cold cache. Returns (GB/s, bytes counted, kernel bytes)."""
    file_offsets = rng.integers(0, (file_size - chunk) // ALIGN_BYTES + 1, n_reads, dtype=np.int64) * ALIGN_BYTES
    nbytes = np.full(n_reads, chunk, dtype=np.int64)
    dest_offsets = np.arange(n_reads, dtype=np.int64) * chunk
    drop_file_cache(path)
    before = reader.stats.bytes_read
    kernel0 = proc_read_bytes()
    t0 = time.perf_counter()
    reader.read(buf, file_offsets, nbytes, dest_offsets)
    seconds = time.perf_counter() - t0
    kernel1 = proc_read_bytes()
    counted = reader.stats.bytes_read - before
    kernel = kernel1 - kernel0 if kernel0 >= 0 and kernel1 >= 0 else -1
    return counted / seconds / 1e9, counted, kernel


def profile_io(
    dir_path, size_bytes: int, chunk_sizes: Sequence[int] = CHUNK_SIZES, thread_counts: Sequence[int] = THREAD_COUNTS,
    repeats: int = 3, reads_per_point: int = READS_PER_POINT, bytes_per_point: int = BYTES_PER_POINT, seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Random-read throughput of the filesystem at ``dir_path``, one row per (chunk size, thread count).

    Each row: ``chunk_bytes``, ``threads``, ``gbps`` (median of ``repeats`` runs; GB = 1e9 bytes), ``gbps_runs``,
    ``reads`` (per run), ``direct`` (O_DIRECT used), ``bytes_read`` (counted by the reader, all runs) and
    ``kernel_read_bytes`` (read_bytes of /proc/self/io over the same runs; -1 if unavailable).
    """
    dir_path = Path(dir_path)
    chunk_sizes, thread_counts = sorted(set(chunk_sizes)), sorted(set(thread_counts))
    if not chunk_sizes or not thread_counts or repeats < 1:
        raise LLMFlashError("profile-io needs at least one chunk size, one thread count and one repeat")
    if any(c <= 0 or c % ALIGN_BYTES for c in chunk_sizes):
        raise LLMFlashError(f"chunk sizes must be positive multiples of {ALIGN_BYTES} bytes, got {chunk_sizes}")
    size_bytes = size_bytes // ALIGN_BYTES * ALIGN_BYTES
    if size_bytes < 4 * max(chunk_sizes):
        raise LLMFlashError(f"the test file ({size_bytes} bytes) must hold at least 4 of the largest chunk "
                            f"({max(chunk_sizes)} bytes); pass a larger --size-gb")
    path = ensure_profile_file(dir_path, size_bytes, progress=progress)
    n_reads = {c: max(MIN_READS_PER_POINT, min(reads_per_point, bytes_per_point // c)) for c in chunk_sizes}
    buf = aligned_buffer(max(n * c for c, n in n_reads.items()))
    rng = np.random.default_rng(seed)
    runs: dict[tuple[int, int], list[tuple[float, int, int]]] = {(c, t): [] for c in chunk_sizes for t in thread_counts}
    readers = {t: FlashReader(path, n_threads=t) for t in thread_counts}
    try:
        direct = all(r.direct for r in readers.values())
        for r in readers.values():  # warm up each pool (first reads after open are slower)
            _measure(r, path, buf, size_bytes, ALIGN_BYTES, 2 * r.n_threads, rng)
        points = [(c, t) for c in chunk_sizes for t in thread_counts]
        with tqdm(total=repeats * len(points), desc="profile-io", disable=not progress) as bar:
            for _ in range(repeats):  # sweeps, not repeats per point: bursts of disk noise spread over points
                for c, t in points:
                    runs[(c, t)].append(_measure(readers[t], path, buf, size_bytes, c, n_reads[c], rng))
                    bar.update(1)
    finally:
        for r in readers.values():
            r.close()
        buf.close()

    rows = []
    for (c, t), rs in runs.items():
        counted, kernel = sum(r[1] for r in rs), sum(r[2] for r in rs)
        if any(r[2] < 0 for r in rs):
            kernel = -1
        elif counted and abs(kernel - counted) > 0.05 * counted:
            log.warning("chunk %d, %d threads: the kernel read %d bytes, the reader counted %d", c, t, kernel, counted)
        gbps_runs = [r[0] for r in rs]
        rows.append({"chunk_bytes": c, "threads": t, "gbps": median(gbps_runs), "gbps_runs": gbps_runs,
                     "reads": n_reads[c], "direct": direct, "bytes_read": counted, "kernel_read_bytes": kernel})
    return rows


def plot_profile(rows: list[dict], png_path, reference: Sequence[tuple[int, float, str]] = ()) -> None:
    """GB/s versus chunk size (log2 axis, in KiB), one line per thread count: the paper's Figure 2b.

    ``reference``: (chunk bytes, GB/s, label) points drawn as grey stars (e.g. the paper's SSD).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = sorted({r["chunk_bytes"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({r["threads"] for r in rows}):
        pts = sorted((r["chunk_bytes"], r["gbps"]) for r in rows if r["threads"] == t)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{t} thread{'s' if t > 1 else ''}")
    for c, g, label in reference:
        ax.scatter([c], [g], marker="*", s=120, color="grey", zorder=5)
        right = c < max(chunks)
        ax.annotate(label, (c, g), textcoords="offset points", xytext=(8, -3) if right else (-10, 6), fontsize=7,
                    ha="left" if right else "right")
    ax.set_xscale("log", base=2)
    ax.set_xticks(chunks)
    ax.set_xticklabels([f"{c // 1024}" for c in chunks])
    ax.minorticks_off()
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("random-read throughput (GB/s)")
    ax.set_ylim(bottom=0)
    direct = all(r.get("direct", True) for r in rows)
    ax.set_title(f"Random reads vs chunk size ({'O_DIRECT' if direct else 'buffered'}, median of runs)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="parallel reads", fontsize=8)
    save_figure(fig, png_path)


def format_table(rows: list[dict]) -> str:
    """Chunk size (rows) x threads (columns) -> GB/s."""
    chunks = sorted({r["chunk_bytes"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    gbps = {(r["chunk_bytes"], r["threads"]): r["gbps"] for r in rows}
    lines = ["GB/s      " + "".join(f"{t:>8d}" for t in threads) + "  threads"]
    for c in chunks:
        lines.append(f"{c // 1024:>5d} KiB " + "".join(f"{gbps[(c, t)]:8.3f}" for t in threads))
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile-io", help="random-read throughput vs chunk size and parallel reads (Figure 2b)",
        description="Measure random O_DIRECT read throughput of the filesystem at --dir versus chunk size and "
                    "number of parallel reads (page cache bypassed). GB = 1e9 bytes; each point is a median.")
    p.add_argument("--dir", type=Path, default=None,
                   help="directory on the filesystem to test (default: the llmflash cache dir)")
    p.add_argument("--size-gb", type=float, default=1.0, help="test file size in GB (default 1.0; reused if present)")
    p.add_argument("--quick", action="store_true", help="fewer chunk sizes and thread counts, shorter runs")
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported (default 3)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write the throughput plot here")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the rows as JSON here")
    p.set_defaults(func=_cmd_profile_io)


def _cmd_profile_io(args: argparse.Namespace) -> int:
    if not args.size_gb > 0:
        raise LLMFlashError(f"--size-gb must be positive, got {args.size_gb}")
    if args.repeats < 1:
        raise LLMFlashError(f"--repeats must be at least 1, got {args.repeats}")
    dir_path: Optional[Path] = args.dir if args.dir is not None else cache_dir()
    kwargs = {}
    if args.quick:
        kwargs = dict(chunk_sizes=QUICK_CHUNK_SIZES, thread_counts=QUICK_THREAD_COUNTS, reads_per_point=500)
    rows = profile_io(dir_path, int(args.size_gb * 1e9), repeats=args.repeats, **kwargs)
    print(f"random reads from {Path(dir_path) / PROFILE_FILE_NAME} "
          f"({'O_DIRECT' if rows[0]['direct'] else 'buffered: the filesystem refuses O_DIRECT'}), "
          f"median of {args.repeats} runs:")
    print(format_table(rows))
    counted = sum(r["bytes_read"] for r in rows)
    kernel = sum(r["kernel_read_bytes"] for r in rows)
    if all(r["kernel_read_bytes"] >= 0 for r in rows) and counted:
        print(f"bytes read: {counted} counted, {kernel} seen by the kernel ({kernel / counted:.1%})")
    if args.json is not None:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_profile(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0

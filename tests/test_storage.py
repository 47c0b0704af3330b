"""Aligned buffers, the parallel direct-I/O reader, and ``profile-io``."""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmflash import storage
from llmflash.errors import LLMFlashError
from llmflash.native import reader_library
from llmflash.storage import (
    ALIGN_BYTES,
    FlashReader,
    ReadStats,
    align_up,
    aligned_buffer,
    drop_file_cache,
    proc_read_bytes,
    read_range,
)

A = ALIGN_BYTES


def _random_file(path: Path, nbytes: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _random_reads(rng, file_bytes: int, n: int, max_pages: int = 16):
    """n reads of 1..max_pages pages at random aligned file offsets, into shuffled non-overlapping dest slots."""
    pages = rng.integers(1, max_pages + 1, n)
    nbytes = pages * A
    file_offsets = rng.integers(0, (file_bytes - max_pages * A) // A, n) * A
    order = rng.permutation(n)
    dest_offsets = np.zeros(n, dtype=np.int64)
    dest_offsets[order] = np.concatenate([[0], np.cumsum(nbytes[order])[:-1]])
    return file_offsets.astype(np.int64), nbytes.astype(np.int64), dest_offsets, int(nbytes.sum())


def _check(buf, data: bytes, file_offsets, nbytes, dest_offsets) -> None:
    for fo, nb, do in zip(file_offsets.tolist(), nbytes.tolist(), dest_offsets.tolist()):
        assert buf[do:do + nb] == data[fo:fo + nb]


@pytest.fixture
def flash_file(tmp_path):
    path = tmp_path / "flash.bin"
    return path, _random_file(path, 8 << 20)


@pytest.fixture(params=["python", "threads", "uring"], ids=["python-workers", "native-threads", "native-uring"])
def native(request):
    """Every reader, as FlashReader's keyword arguments: the Python workers (the reference), the native pool's threads
    and its io_uring (skipped where the native reader does not build; where the kernel refuses io_uring it runs its
    threads, and says so)."""
    if request.param != "python" and reader_library() is None:
        pytest.skip("the native reader does not build here")
    return {"native": request.param != "python", "io_uring": request.param == "uring"}


def test_align_up():
    assert [align_up(n) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]
    assert align_up(5, 4) == 8


def test_aligned_buffer_is_page_aligned_and_zeroed():
    for n in (1, 4096, 12345, 3 << 20):
        buf = aligned_buffer(n)
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % A == 0
        assert len(buf) == align_up(n)
        assert buf[:] == bytes(len(buf))
        buf.close()
    assert len(aligned_buffer(0)) == A  # never an empty mapping


def test_reader_reads_exact_bytes_and_counts(flash_file, native):
    path, data = flash_file
    rng = np.random.default_rng(1)
    with FlashReader(path, n_threads=8, **native) as reader:
        assert reader.direct  # ext4 under tmp_path
        total_bytes, total_reads = 0, 0
        for n in (1, 3, 17, 500):  # fewer reads than workers, and many per worker
            fo, nb, do, nbytes = _random_reads(rng, len(data), n)
            buf = aligned_buffer(nbytes)
            reader.read(buf, fo, nb, do)
            _check(buf, data, fo, nb, do)
            total_bytes += nbytes
            total_reads += n
            assert reader.stats.bytes_read == total_bytes and reader.stats.reads == total_reads
        assert reader.stats.wait_ms > 0
        snap = reader.stats.snapshot()
        reader.stats.reset()
        assert reader.stats == ReadStats() and snap.reads == total_reads


def test_a_polling_wait_gets_the_same_bytes(flash_file):
    """``spin_wait_us``: the native reader's waits poll before they sleep, with the same reads and accounting."""
    if reader_library() is None:
        pytest.skip("the native reader does not build here")
    path, data = flash_file
    rng = np.random.default_rng(5)
    with FlashReader(path, n_threads=4, spin_wait_us=50_000) as reader:
        for n in (1, 64):
            fo, nb, do, nbytes = _random_reads(rng, len(data), n)
            buf = aligned_buffer(nbytes)
            reader.read(buf, fo, nb, do)
            _check(buf, data, fo, nb, do)
        assert reader.stats.reads == 65


def test_reader_into_memoryview_and_buffer_released(flash_file, native):
    path, data = flash_file
    buf = aligned_buffer(64 * A)
    view = memoryview(buf)[8 * A:]  # an aligned window of the buffer
    with FlashReader(path, n_threads=4, **native) as reader:
        fo = np.array([0, 10 * A, 100 * A], dtype=np.int64)
        nb = np.array([A, 2 * A, 4 * A], dtype=np.int64)
        do = np.array([0, A, 3 * A], dtype=np.int64)
        reader.read(view, fo, nb, do)
        _check(memoryview(buf)[8 * A:], data, fo, nb, do)
        reader.read(buf, [], [], [])  # an empty list is fine
    view.release()
    buf.close()  # no views left behind by the reader


def test_short_read_at_eof_counts_returned_bytes(tmp_path, native):
    path = tmp_path / "odd.bin"
    data = _random_file(path, 3 * A + 1000)
    buf = aligned_buffer(4 * A)
    buf[:] = b"\xff" * len(buf)
    with FlashReader(path, n_threads=2, **native) as reader:
        reader.read(buf, np.array([2 * A], np.int64), np.array([2 * A], np.int64), np.array([0], np.int64))
        assert reader.stats.bytes_read == A + 1000 and reader.stats.reads == 1
    assert buf[:A + 1000] == data[2 * A:]
    assert buf[A + 1000:2 * A] == bytes(A - 1000)  # zero-filled remainder


def test_submit_wait_two_in_flight(flash_file, native):
    path, data = flash_file
    rng = np.random.default_rng(2)
    with FlashReader(path, n_threads=4, **native) as reader:
        fo1, nb1, do1, n1 = _random_reads(rng, len(data), 300)
        fo2, nb2, do2, n2 = _random_reads(rng, len(data), 40)
        buf1, buf2 = aligned_buffer(n1), aligned_buffer(n2)
        t1 = reader.submit(buf1, fo1, nb1, do1)
        t2 = reader.submit(buf2, fo2, nb2, do2)
        reader.wait(t2)
        reader.wait(t1)
        assert t1.done and t2.done and t1.bytes_read == n1 and t2.reads == 40
        reader.wait(t1)  # waiting twice is harmless
        _check(buf1, data, fo1, nb1, do1)
        _check(buf2, data, fo2, nb2, do2)
        assert reader.stats.bytes_read == n1 + n2 and reader.stats.reads == 340


def test_bad_read_lists_raise_clear_errors(flash_file, native):
    path, _ = flash_file
    buf = aligned_buffer(4 * A)
    one = np.zeros(1, np.int64)
    with FlashReader(path, n_threads=2, **native) as reader:
        with pytest.raises(ValueError, match="unaligned"):
            reader.read(buf, one, np.array([100], np.int64), one)
        with pytest.raises(ValueError, match="unaligned"):
            reader.read(buf, np.array([512], np.int64), np.array([A], np.int64), one)
        with pytest.raises(ValueError, match="unaligned"):  # destination address not aligned
            reader.read(memoryview(buf)[512:], one, np.array([A], np.int64), one)
        with pytest.raises(ValueError, match="too small"):
            reader.read(buf, one, np.array([8 * A], np.int64), one)
        with pytest.raises(ValueError, match="read-only"):
            reader.read(bytes(4 * A), one, np.array([A], np.int64), one)
        with pytest.raises(ValueError, match="differ in length"):
            reader.read(buf, one, np.array([A, A], np.int64), one)
        with pytest.raises(ValueError, match="negative"):
            reader.read(buf, np.array([-A], np.int64), np.array([A], np.int64), one)
        assert reader.stats.reads == 0
    buf.close()  # failed calls left no views behind


def test_worker_errors_reach_the_caller(flash_file, monkeypatch):
    path, data = flash_file
    real_preadv = os.preadv

    def failing_preadv(fd, buffers, offset, *args):
        if offset == 5 * A:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_preadv(fd, buffers, offset, *args)

    with FlashReader(path, n_threads=4, native=False) as reader:
        monkeypatch.setattr(os, "preadv", failing_preadv)
        fo = np.arange(40, dtype=np.int64) * A
        buf = aligned_buffer(40 * A)
        with pytest.raises(OSError, match="simulated"):
            reader.read(buf, fo, np.full(40, A, np.int64), fo)
        # the failing worker stops its slice (reads 0-9) at read 5; the others finish theirs; all counted exactly
        assert reader.stats.reads == 35 and reader.stats.bytes_read == 35 * A
        monkeypatch.setattr(os, "preadv", real_preadv)
        reader.read(buf, fo, np.full(40, A, np.int64), fo)  # the pool survives
        assert buf[:] == data[:40 * A]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(LLMFlashError, match="nope.bin"):
        FlashReader(tmp_path / "nope.bin")


def test_close_stops_threads_and_is_idempotent(flash_file):
    path, _ = flash_file
    before = threading.active_count()
    reader = FlashReader(path, n_threads=6, native=False)
    assert threading.active_count() == before + 6
    reader.close()
    reader.close()
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="closed"):
        reader.read(aligned_buffer(A), [0], [A], [0])
    fds = len(os.listdir("/proc/self/fd"))
    FlashReader(path, n_threads=6, native=False)  # dropped at once: __del__ stops its threads, the last one closes the file
    gc.collect()
    for _ in range(200):
        if threading.active_count() == before:
            break
        time.sleep(0.01)
    assert threading.active_count() == before
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_kernel_sees_the_bytes_we_count(tmp_path, native):
    """read_bytes of /proc/self/io sums over threads, so O_DIRECT reads from the workers show up."""
    if proc_read_bytes() < 0:
        pytest.skip("/proc/self/io is not available")
    path = tmp_path / "acct.bin"
    data = _random_file(path, 16 << 20)
    rng = np.random.default_rng(3)
    fo, nb, do, nbytes = _random_reads(rng, len(data), 400)
    buf = aligned_buffer(nbytes)
    with FlashReader(path, n_threads=16, **native) as reader:
        drop_file_cache(path)
        k0 = proc_read_bytes()
        reader.read(buf, fo, nb, do)
        kernel = proc_read_bytes() - k0
        assert reader.stats.bytes_read == nbytes
    assert abs(kernel - nbytes) <= 0.05 * nbytes, (kernel, nbytes)
    # and O_DIRECT left the page cache empty: a buffered read of the same bytes goes to the disk again
    k0 = proc_read_bytes()
    with open(path, "rb") as f:
        f.seek(int(fo[0]))
        assert f.read(int(nb[0])) == data[fo[0]:fo[0] + nb[0]]
    assert proc_read_bytes() - k0 >= nb[0]


def _shm_file(tmp_name: str) -> tuple[Path, bytes]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("/dev/shm is missing")
    path = Path("/dev/shm") / f"llmflash-test-{os.getpid()}-{tmp_name}"
    return path, _random_file(path, 2 << 20, seed=4)


@pytest.mark.parametrize("refuse", ["none", "open", "first_read"])
def test_fallback_without_o_direct(refuse, monkeypatch, caplog, native):
    """tmpfs refused O_DIRECT before Linux 6.6 (newer kernels accept it): refusals are also simulated."""
    path, data = _shm_file(refuse)
    try:
        real_open, real_preadv = os.open, os.preadv
        if refuse == "open":
            def fake_open(p, flags, *a, **k):
                if flags & os.O_DIRECT:
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real_open(p, flags, *a, **k)

            monkeypatch.setattr(storage.os, "open", fake_open)
        elif refuse == "first_read":
            direct_fds = set()

            def fake_open(p, flags, *a, **k):
                fd = real_open(p, flags, *a, **k)
                (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # fd numbers are reused
                return fd

            def fake_preadv(fd, bufs, off, *a):
                if fd in direct_fds:
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real_preadv(fd, bufs, off, *a)

            monkeypatch.setattr(storage.os, "open", fake_open)
            monkeypatch.setattr(storage.os, "preadv", fake_preadv)
        rng = np.random.default_rng(5)
        fo, nb, do, nbytes = _random_reads(rng, len(data), 50, max_pages=4)
        buf = aligned_buffer(nbytes)
        with caplog.at_level(logging.WARNING, logger="llmflash.storage"):
            with FlashReader(path, n_threads=4, **native) as reader:
                reader.read(buf, fo, nb, do)
                direct = reader.direct
        _check(buf, data, fo, nb, do)
        assert reader.stats.bytes_read == nbytes
        warnings = [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
        if refuse == "none":
            assert len(warnings) == (0 if direct else 1)
        else:
            assert not direct and len(warnings) == 1
    finally:
        path.unlink(missing_ok=True)


def test_read_range(flash_file):
    path, data = flash_file
    whole = read_range(path)
    assert len(whole) == len(data) and whole[:] == data
    part = read_range(path, 3 * A, 10000)
    assert len(part) == align_up(10000) and part[:10000] == data[3 * A:3 * A + 10000]
    assert part[10000:] == bytes(len(part) - 10000)
    with pytest.raises(LLMFlashError, match="truncated"):
        read_range(path, 0, len(data) + 1)
    with pytest.raises(ValueError):
        read_range(path, 100, 10)


# --- profile-io -----------------------------------------------------------------------------------------------
def test_profile_io_rows(tmp_path):
    from research.profile_io import PROFILE_FILE_NAME, plot_profile, profile_io

    rows = profile_io(tmp_path, 32 << 20, chunk_sizes=(4096, 65536), thread_counts=(1, 8), repeats=1,
                      reads_per_point=200, progress=False)
    assert sorted((r["chunk_bytes"], r["threads"]) for r in rows) == [(4096, 1), (4096, 8), (65536, 1), (65536, 8)]
    for r in rows:
        assert r["gbps"] > 0 and len(r["gbps_runs"]) == 1 and r["direct"] is True
        assert r["bytes_read"] == r["reads"] * r["chunk_bytes"]
        if r["kernel_read_bytes"] >= 0:
            assert abs(r["kernel_read_bytes"] - r["bytes_read"]) <= 0.05 * r["bytes_read"]
    test_file = tmp_path / PROFILE_FILE_NAME
    assert test_file.stat().st_size == 32 << 20
    with open(test_file, "rb") as f:
        assert f.read(A).count(0) < A // 16  # non-zero data
    mtime = test_file.stat().st_mtime_ns
    profile_io(tmp_path, 32 << 20, chunk_sizes=(8192,), thread_counts=(2,), repeats=1, progress=False)
    assert test_file.stat().st_mtime_ns == mtime  # reused
    plot_profile(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_io_cli(tmp_path, capsys):
    from llmflash.cli import main

    out = tmp_path / "out.json"
    assert main(["profile-io", "--dir", str(tmp_path), "--size-gb", "0.03", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    assert all({"chunk_bytes", "threads", "gbps"} <= set(r) for r in rows)
    assert "GB/s" in capsys.readouterr().out

    assert main(["profile-io", "--dir", str(tmp_path / "missing"), "--size-gb", "0.03"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["profile-io", "--dir", str(tmp_path), "--size-gb", "1000000"]) == 2
    assert "free space" in capsys.readouterr().err


def test_uring_reader_many_tickets_and_scatter_reads(flash_file):
    """io_uring (where the kernel allows it): more reads in flight than the ring holds, from several tickets queued
    before any wait, plain and scatter reads mixed, land exactly; the ring's thread stops on close."""
    if reader_library() is None:
        pytest.skip("the native reader does not build here")
    path, data = flash_file
    rng = np.random.default_rng(11)
    before = threading.active_count()
    with FlashReader(path, n_threads=2, io_uring=True, uring_depth=8) as reader:
        if not reader.uring:
            pytest.skip("the kernel refuses io_uring here (the reader runs its threads)")
        plain = []
        for _ in range(6):
            fo, nb, do, n = _random_reads(rng, len(data), 50)
            buf = aligned_buffer(n)
            plain.append((reader.submit(buf, fo, nb, do), buf, fo, nb, do))
        # scatter: 30 reads of 1-3 pages, each page to its own slot of a 200-slot buffer
        pages = rng.integers(1, 4, size=30)
        fo = rng.choice(len(data) // A - 4, size=30, replace=False).astype(np.int64) * A
        slots = rng.permutation(200)[: int(pages.sum())].astype(np.int64)
        sbuf = aligned_buffer(200 * A)
        scat = reader.submit(sbuf, fo, pages.astype(np.int64) * A, slots * A, piece_bytes=A)
        for t, buf, fo_, nb_, do_ in reversed(plain):
            reader.wait(t)
            _check(buf, data, fo_, nb_, do_)
        reader.wait(scat)
        k = 0
        for off, n in zip(fo.tolist(), pages.tolist()):
            for p in range(n):
                assert sbuf[slots[k] * A : (slots[k] + 1) * A] == data[off + p * A : off + (p + 1) * A]
                k += 1
        assert reader.stats.reads == 6 * 50 + 30
    assert threading.active_count() == before


def test_native_reader_errors_reach_the_caller_and_it_closes(flash_file):
    """The native pool: an error of the kernel (here a closed descriptor) is raised in the caller; close() stops the
    pool's threads (no Python threads were started)."""
    if reader_library() is None:
        pytest.skip("the native reader does not build here")
    path, data = flash_file
    before = threading.active_count()
    reader = FlashReader(path, n_threads=4)
    assert reader.native and threading.active_count() == before
    fo = np.arange(8, dtype=np.int64) * A
    buf = aligned_buffer(8 * A)
    reader.read(buf, fo, np.full(8, A, np.int64), fo)
    assert buf[:] == data[: 8 * A] and reader.stats.reads == 8
    shared = reader._shared
    os.close(shared.fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        reader.read(buf, fo, np.full(8, A, np.int64), fo)
    shared.fd = -1  # closed above
    reader.close()
    reader.close()


def _needs_native_reader() -> None:
    if reader_library() is None:
        pytest.skip("the native reader does not build here")


@pytest.mark.parametrize("max_run", [1, 3, 64])
def test_submit_rows_reads_what_the_python_plans_read(tmp_path, max_run):
    """The native planner (the engine's hot path) makes the reads ``read_plan`` / ``slot_plan`` make: same count, same
    bytes, each row landing where the Python plan puts it; into consecutive rows and into scattered slots, over two
    targets (an unbundled layout's segments) in one ticket."""
    from llmflash.layout import FlashLayout, read_plan
    from llmflash.step import slot_plan
    from llmflash.storage import RowsTarget

    _needs_native_reader()
    lay = FlashLayout.build(3, 16, 96, True, "float32", False)  # two segments: (gate, up) and (down,)
    data = np.random.default_rng(0).integers(0, 256, lay.file_bytes, dtype=np.uint8).tobytes()
    path = tmp_path / "ffn.bin"
    path.write_bytes(data)
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(96, 40, replace=False)).astype(np.int64)
    ids[:6] = np.arange(10, 16)  # a long run, split at max_run
    ids = np.unique(ids)
    layer, cap = 2, 64
    slots = rng.permutation(cap)[: ids.size].astype(np.int64)
    max_read = max_run * max(s.stride_bytes for s in lay.segments)
    with FlashReader(path, n_threads=4) as reader:
        for dest in (slots, 5):
            want_reads = 0
            bufs = [aligned_buffer(cap * s.stride_bytes) for s in lay.segments]
            targets = [RowsTarget(b, s.layer_offsets[layer], s.stride_bytes, max(1, max_read // s.stride_bytes))
                       for b, s in zip(bufs, lay.segments)]
            before = reader.stats.snapshot()
            if isinstance(dest, np.ndarray):
                t = reader.submit_rows(targets, ids, lay.d_ffn, slots=dest)
            else:
                t = reader.submit_rows(targets, ids, lay.d_ffn, dest_row0=dest)
            reader.wait(t)
            for s, b in zip(lay.segments, bufs):
                if isinstance(dest, np.ndarray):
                    fo, nb, po = slot_plan(s, layer, ids, dest, max_read)
                    rows = dest
                else:
                    fo, nb, po = read_plan(s, layer, ids, dest, max_read)
                    rows = dest + np.arange(ids.size)
                want_reads += fo.size
                for nid, row in zip(ids.tolist(), rows.tolist()):
                    src = s.layer_offsets[layer] + nid * s.stride_bytes
                    assert b[row * s.stride_bytes : (row + 1) * s.stride_bytes] == data[src : src + s.stride_bytes]
            assert t.reads == want_reads == reader.stats.reads - before.reads
            assert t.bytes_read == sum(ids.size * s.stride_bytes for s in lay.segments)
            assert reader.stats.bytes_read - before.bytes_read == t.bytes_read


def test_submit_rows_jobs_reads_two_sets_in_one_ticket(tmp_path):
    """submit_rows_jobs (a layer's cache loads into scattered slots and its rows beyond the cache into consecutive
    rows of another buffer): one ticket whose reads and bytes are those of the two submit_rows calls, every row where
    they put it; a bad job leaves nothing planned."""
    from llmflash.layout import FlashLayout
    from llmflash.storage import RowsJob, RowsTarget

    _needs_native_reader()
    lay = FlashLayout.build(2, 16, 80, True, "float32", True)
    data = np.random.default_rng(2).integers(0, 256, lay.file_bytes, dtype=np.uint8).tobytes()
    path = tmp_path / "ffn.bin"
    path.write_bytes(data)
    seg, layer = lay.segments[0], 1
    a, b = np.array([1, 2, 3, 9, 40], dtype=np.int64), np.array([5, 6, 60, 79], dtype=np.int64)
    slots = np.array([7, 0, 3, 2, 5], dtype=np.int64)

    def targets(buf):
        return (RowsTarget(buf, seg.layer_offsets[layer], seg.stride_bytes, 4),)

    with FlashReader(path, n_threads=2) as reader:
        sep = [aligned_buffer(8 * seg.stride_bytes) for _ in range(2)]
        t1 = reader.submit_rows(targets(sep[0]), a, lay.d_ffn, slots=slots)
        t2 = reader.submit_rows(targets(sep[1]), b, lay.d_ffn, dest_row0=1)
        reader.wait(t1)
        reader.wait(t2)
        one = [aligned_buffer(8 * seg.stride_bytes) for _ in range(2)]
        t = reader.submit_rows_jobs([RowsJob(targets(one[0]), a, slots), RowsJob(targets(one[1]), b, None, 1)],
                                    lay.d_ffn)
        reader.wait(t)
        assert (t.reads, t.bytes_read) == (t1.reads + t2.reads, t1.bytes_read + t2.bytes_read)
        assert bytes(one[0]) == bytes(sep[0]) and bytes(one[1]) == bytes(sep[1])
        for nid, row in zip(b.tolist(), range(1, 1 + b.size)):
            src = seg.layer_offsets[layer] + nid * seg.stride_bytes
            assert one[1][row * seg.stride_bytes : (row + 1) * seg.stride_bytes] == data[src : src + seg.stride_bytes]
        with pytest.raises(ValueError, match="sorted"):
            reader.submit_rows_jobs([RowsJob(targets(one[0]), a, slots), RowsJob(targets(one[1]), b[::-1], None)],
                                    lay.d_ffn)


def test_submit_rows_rejects_bad_ids_and_small_buffers(flash_file):
    from llmflash.storage import RowsTarget

    _needs_native_reader()
    path, _ = flash_file
    with FlashReader(path, n_threads=2) as reader:
        buf = aligned_buffer(4 * A)
        target = [RowsTarget(buf, 0, A, 8)]
        for ids, kw, msg in ((np.array([3, 1]), {}, "sorted"), (np.array([1, 1]), {}, "sorted"),
                             (np.array([0, 99]), {}, "sorted"), (np.array([0, 1]), {"slots": np.array([0, 4])}, "small"),
                             (np.array([0, 1]), {"dest_row0": 3}, "small"), (np.array([0]), {"slots": np.array([0, 1])},
                                                                           "slots")):
            with pytest.raises(ValueError, match=msg):
                reader.submit_rows(target, ids, 64, **kw)
        with pytest.raises(ValueError, match="unaligned"):
            reader.submit_rows([RowsTarget(buf, 512, A, 8)], np.array([0]), 64)
        with pytest.raises(ValueError, match="beyond the end"):
            reader.submit_rows(target, np.array([0]), 10 ** 6)
        t = reader.submit_rows(target, np.array([0, 1, 2]), 64, slots=np.array([2, 0, 1]))  # still usable
        reader.wait(t)
        assert t.reads == 1 and t.bytes_read == 3 * A
    with FlashReader(path, n_threads=2, native=False) as reader:
        with pytest.raises(ValueError, match="native reader"):
            reader.submit_rows([RowsTarget(aligned_buffer(A), 0, A, 1)], np.array([0]), 1)

"""Flash storage: page-aligned buffers and a parallel direct-I/O reader.

The paper reads FFN neurons from SSD with many small random reads kept in flight at once. On Linux the fastest way to
do that from Python (measured: see /work/shared/reference/machine.md) is

- files opened with ``O_DIRECT`` (no page cache: what we read is what the disk delivered, and DRAM use stays honest);
- reads into preallocated page-aligned buffers (``mmap.mmap(-1, n)``), offsets and lengths multiples of 4096;
- a persistent pool of 16-32 threads, each taking a contiguous slice of the read list and looping ``os.preadv``
  (which releases the GIL): about 1-2 us of Python per read against about 50 us of device time.

``FlashReader.submit`` returns a ticket so reads stay in flight while the caller computes; ``wait`` blocks on it.
Filesystems that refuse ``O_DIRECT`` (tmpfs) fall back to buffered reads followed by ``POSIX_FADV_DONTNEED``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, replace
from functools import reduce
from operator import add, or_
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

from .errors import LLMFlashError
from .native import reader_library

log = logging.getLogger(__name__)

ALIGN_BYTES = 4096  # O_DIRECT needs 512; 4096 matches pages and SSD sectors
SECTOR_BYTES = 512  # the smallest unit of direct I/O (FlashReader's align_bytes for quantized layouts)
URING_DEPTH = 128  # io_uring: reads in flight (FlashReader's default; experiments/engine_options.py's uring_depth arms)
MIN_READS_PER_WORKER = 2  # a small read list wakes fewer workers (a wake-up costs about as much as a read's Python)
_SMALL_LIST = 64  # read lists up to this length are validated in plain Python
READ_RANGE_CHUNK_BYTES = 4 << 20  # read_range: one preadv per 4 MiB, several in flight

Buffer = Union[mmap.mmap, memoryview]


def align_up(n: int, a: int = ALIGN_BYTES) -> int:
    return -(-n // a) * a


def aligned_buffer(nbytes: int, populate: bool = True) -> mmap.mmap:
    """A zero-filled, page-aligned anonymous buffer of ``align_up(nbytes)`` bytes (at least one page).

    Private and prefaulted (MAP_POPULATE, about 0.6-0.9 s/GiB on this VM): O_DIRECT reads into pages never touched
    fault them in one by one under the reads (measured: 4 KiB reads into a fresh 64 MiB buffer ran at half speed),
    and shared anonymous memory (``mmap.mmap(-1, n)``'s default) faults 2-3x slower than private. Transparent huge
    pages were tried: sometimes faster, sometimes 3-5x slower (direct compaction), so not used.

    ``populate=False``: pages fault in when first written, and pages never written take no memory (a buffer with
    holes: ``FlashDir.read_resident``).
    """
    flags = mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN_BYTES), flags=flags)


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a writable buffer (mmap, memoryview, bytearray, numpy array)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def array_address(a: np.ndarray) -> int:
    """Address of a numpy array's first element (for the native libraries). Through the buffer protocol where the
    array allows it (writable, contiguous, not empty: cheaper than ``__array_interface__``, which builds a dict; the
    engine asks a few hundred times per token), else from ``__array_interface__``."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a.data))
    except (TypeError, ValueError, BufferError):
        return int(a.__array_interface__["data"][0])


class RowsTarget(NamedTuple):
    """One destination of ``FlashReader.submit_rows``: rows of ``stride_bytes`` that start at byte
    ``file_base_bytes`` of the file (one layer's segment), landing in buffer ``dest``; reads span at most
    ``max_run_rows`` rows."""

    dest: Buffer
    file_base_bytes: int
    stride_bytes: int
    max_run_rows: int


class RowsJob(NamedTuple):
    """One set of rows for ``FlashReader.submit_rows_jobs``: rows ``ids`` (sorted, unique) read into each of
    ``targets`` at their rows ``slots`` (int64, one per id), or at consecutive rows from ``dest_row0``."""

    targets: tuple[RowsTarget, ...]
    ids: np.ndarray
    slots: Optional[np.ndarray] = None
    dest_row0: int = 0


def pin_buffer(buf: Buffer) -> bool:
    """Page-lock ``buf`` for CUDA (``cudaHostRegister``) so that host->GPU copies from it run at full speed and
    without a bounce buffer. False where CUDA is absent or refuses (the copies then still work, slower)."""
    import torch

    if not torch.cuda.is_available() or len(buf) == 0:
        return False
    try:
        rc = torch.cuda.cudart().cudaHostRegister(buffer_address(buf), len(buf), 0)
    except (AttributeError, RuntimeError, TypeError) as err:
        log.warning("could not pin a %d-byte buffer for CUDA: %s", len(buf), err)
        return False
    if int(rc) != 0:
        log.warning("cudaHostRegister of a %d-byte buffer failed (error %d): copies to the GPU will be slower",
                    len(buf), int(rc))
        return False
    return True


def unpin_buffer(buf: Buffer) -> None:
    """Undo ``pin_buffer`` (before the buffer is unmapped)."""
    import torch

    torch.cuda.cudart().cudaHostUnregister(buffer_address(buf))


def proc_read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (``read_bytes`` of /proc/self/io), or -1 if unknown.

    Summed over all threads of the process, including O_DIRECT reads from worker threads; page-cache hits do not count.
    """
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def drop_file_cache(path: Union[str, Path]) -> None:
    """Evict ``path`` from the page cache (dirty pages are written first, else they would stay)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LLMFlashError(f"{path} does not exist") from None
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass
class ReadStats:
    """Cumulative counters of a FlashReader (bytes actually returned by the kernel, not bytes requested)."""

    bytes_read: int = 0
    reads: int = 0
    wait_ms: float = 0.0  # caller time spent in read()/submit()/wait() (blocked on I/O or submitting)

    def reset(self) -> None:
        self.bytes_read, self.reads, self.wait_ms = 0, 0, 0.0

    def snapshot(self) -> "ReadStats":
        return replace(self)

    copy = snapshot

    def __sub__(self, other: "ReadStats") -> "ReadStats":
        return ReadStats(self.bytes_read - other.bytes_read, self.reads - other.reads, self.wait_ms - other.wait_ms)


def _open_flash(path: Union[str, Path], direct: bool) -> tuple[int, bool]:
    """Open ``path`` read-only, with O_DIRECT if asked and the filesystem allows it. Returns (fd, direct)."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except FileNotFoundError:
            raise LLMFlashError(f"flash file {path} does not exist; run `llmflash convert` to create it") from None
        except IsADirectoryError:
            raise LLMFlashError(f"{path} is a directory, not a flash file") from None
        except PermissionError:
            raise LLMFlashError(f"cannot read {path}: permission denied") from None
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise LLMFlashError(f"cannot open {path}: {err.strerror}") from None
        else:
            # Some filesystems accept O_DIRECT at open and refuse the reads: probe one aligned read.
            probe = aligned_buffer(ALIGN_BYTES)
            try:
                os.preadv(fd, [probe], 0)
                return fd, True
            except OSError as err:
                os.close(fd)
                if err.errno != errno.EINVAL:
                    raise LLMFlashError(f"cannot read {path}: {err.strerror}") from None
            finally:
                probe.close()
        log.warning("%s: the filesystem refuses O_DIRECT; using buffered reads + POSIX_FADV_DONTNEED "
                    "(slower, more CPU per read)", path)
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        raise LLMFlashError(f"flash file {path} does not exist; run `llmflash convert` to create it") from None
    except OSError as err:
        raise LLMFlashError(f"cannot open {path}: {err.strerror}") from None


class ReadTicket:
    """Reads in flight from one ``FlashReader.submit``; pass it to ``FlashReader.wait``."""

    __slots__ = ("n_reads", "bytes_read", "reads", "elapsed_ms", "queue_ms", "_remaining", "_done", "_error",
                 "_start_ns", "_queued_ns", "_views", "_fo", "_nb", "_do", "_native", "_keep")

    def __init__(self, n_reads: int, n_slices: int):
        self.n_reads = n_reads  # reads requested
        self.bytes_read = 0  # bytes returned by the kernel (filled in as slices finish)
        self.reads = 0  # reads performed
        self.elapsed_ms = 0.0  # submit -> the later of the last read's end and the submit call's return
        # the submit call's time after the reads were queued (handing them to the native pool, which hands them to the
        # kernel, or to the Python workers' queue): on a machine with few cores, mostly the kernel's work of starting
        # them, done by the pool's thread in the submitter's place. Within ``elapsed_ms``; known once waited (native)
        self.queue_ms = 0.0
        self._queued_ns = 0  # (Python workers) when the submit call returned
        self._remaining = n_slices
        self._error: Optional[BaseException] = None
        self._start_ns = time.perf_counter_ns()
        self._done = threading.Lock()
        self._views: tuple[memoryview, ...] = ()  # the caller's buffers, released when the last slice is done
        self._fo: Optional[list[int]] = None  # file offsets, byte counts and buffer offsets of the reads
        self._nb: Optional[list[int]] = None
        self._do: Optional[list[int]] = None
        self._native: Optional[int] = None  # the native reader's handle (until waited)
        self._keep: tuple = ()  # the arrays the native reader reads its list from (alive until waited)
        if n_slices:
            self._done.acquire()  # released by the worker that finishes the last slice

    @property
    def done(self) -> bool:
        """Whether the reads are done (a native reader's ticket: once waited)."""
        return self._remaining == 0


class _Shared:
    """What worker threads need (they must not reference the FlashReader, so that it can be garbage collected).

    Owns the file descriptor: it is closed by ``FlashReader.close`` or, if the reader is dropped without closing,
    when the last worker has exited (reads still in flight keep it open).
    """

    __slots__ = ("fd", "direct", "lock", "stats")

    def __init__(self, fd: int, direct: bool):
        self.fd, self.direct = fd, direct
        self.lock = threading.Lock()
        self.stats = ReadStats()

    def close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close_fd()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _read_slice(shared: _Shared, mv: memoryview, fo: list, nb: list, do: list, lo: int, hi: int) -> tuple[int, int]:
    """Reads lo..hi-1 of a ticket; returns (bytes, reads). Raises with the counts so far on the exception.

    ``do[j]`` is read j's destination offset, or (scatter reads) a tuple of (offset, bytes) pieces it fills in order."""
    fd, preadv = shared.fd, os.preadv
    total, j = 0, lo
    try:
        if do and isinstance(do[lo], tuple):
            for j in range(lo, hi):
                n = nb[j]
                got = preadv(fd, [mv[o:o + k] for o, k in do[j]], fo[j])
                if got != n:
                    got = _short_scatter(fd, mv, fo[j], do[j], got)
                if not shared.direct:
                    os.posix_fadvise(fd, fo[j], n, os.POSIX_FADV_DONTNEED)
                total += got
        elif shared.direct:
            for j in range(lo, hi):
                o = do[j]
                n = nb[j]
                got = preadv(fd, [mv[o:o + n]], fo[j])
                if got != n:
                    got = _short_read(fd, mv, fo[j], n, o, got)
                total += got
        else:
            fadvise, dontneed = os.posix_fadvise, os.POSIX_FADV_DONTNEED
            for j in range(lo, hi):
                o = do[j]
                n = nb[j]
                got = preadv(fd, [mv[o:o + n]], fo[j])
                if got != n:
                    got = _short_read(fd, mv, fo[j], n, o, got)
                fadvise(fd, fo[j], n, dontneed)
                total += got
    except BaseException as err:
        try:
            err.counts = (total, j - lo)  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise
    return total, hi - lo


def _short_read(fd: int, mv: memoryview, file_off: int, n: int, dest_off: int, got: int) -> int:
    """Finish a short read: retry while progress stays aligned, stop at EOF and zero the rest of the destination."""
    while 0 < got < n and got % SECTOR_BYTES == 0:
        more = os.preadv(fd, [mv[dest_off + got:dest_off + n]], file_off + got)
        if more == 0:
            break
        got += more
    if got < n:
        mv[dest_off + got:dest_off + n] = bytes(n - got)
    return got


def _short_scatter(fd: int, mv: memoryview, file_off: int, pieces: tuple, got: int) -> int:
    """Finish a short scatter read: each piece not fully filled is finished (or zeroed past EOF) by ``_short_read``."""
    total = pos = 0  # bytes returned so far; position in the read
    for o, k in pieces:
        have = min(max(got - pos, 0), k)
        total += _short_read(fd, mv, file_off + pos, k, o, have) if have < k else k
        pos += k
    return total


def _worker(tasks: SimpleQueue, shared: _Shared) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        ticket, mv, lo, hi = task
        error = None
        try:
            nbytes, nreads = _read_slice(shared, mv, ticket._fo, ticket._nb, ticket._do, lo, hi)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            error = err
            nbytes, nreads = getattr(err, "counts", (0, 0))
        del task, mv
        with shared.lock:
            shared.stats.bytes_read += nbytes
            shared.stats.reads += nreads
            ticket.bytes_read += nbytes
            ticket.reads += nreads
            if error is not None and ticket._error is None:
                ticket._error = error
            ticket._remaining -= 1
            last = ticket._remaining == 0
        if last:  # (the submit call may not have returned yet: ``wait`` takes the later of the two)
            ticket.elapsed_ms = (time.perf_counter_ns() - ticket._start_ns) / 1e6
            _release_views(ticket)
            ticket._done.release()


def _release_views(ticket: ReadTicket) -> None:
    views, ticket._views = ticket._views, ()
    ticket._fo = ticket._nb = ticket._do = None
    for v in reversed(views):  # lets the caller close its mmap once the reads are done
        try:
            v.release()
        except BufferError:
            pass


def _scatter_pieces(piece_offsets: np.ndarray, pieces_per_read: np.ndarray, piece_bytes: int) -> list:
    """Per read, its destination as a tuple of (offset, bytes) pieces, neighbouring pieces merged into one."""
    k = piece_offsets.size
    starts = np.concatenate(([0], np.cumsum(pieces_per_read)[:-1]))
    cut = np.ones(k, dtype=bool)  # a piece that starts a new buffer: first of its read, or not after the previous
    cut[1:] = piece_offsets[1:] != piece_offsets[:-1] + piece_bytes
    cut[starts] = True
    first = np.flatnonzero(cut)
    length = np.diff(np.append(first, k)) * piece_bytes
    bufs = list(zip(piece_offsets[first].tolist(), length.tolist()))
    read_of = np.searchsorted(first, np.append(starts, k)).tolist()  # buffers [read_of[j], read_of[j + 1]) per read
    return [tuple(bufs[read_of[j] : read_of[j + 1]]) for j in range(len(starts))]


def _check_reads(fo: np.ndarray, nb: np.ndarray, do: np.ndarray, fo_l: list, nb_l: list, do_l: list,
                 mv: Optional[memoryview], align: int = ALIGN_BYTES) -> None:
    """Alignment, sign and bounds of a read list (numpy for long lists, plain Python for short ones); without a
    destination ``mv``, only alignment (to ``align``) and sign."""
    if mv is None:
        bits = int(np.bitwise_or.reduce(fo | nb)) if len(fo_l) else 0
        if bits < 0 or bits & (align - 1):
            raise ValueError(f"file offsets and lengths must be non-negative multiples of {align} bytes")
        return
    if mv.readonly:
        raise ValueError("the destination buffer is read-only")
    if len(fo_l) <= _SMALL_LIST:  # plain Python beats numpy's per-call overhead on short lists
        bits = reduce(or_, fo_l) | reduce(or_, nb_l) | reduce(or_, do_l)
        end = max(map(add, do_l, nb_l))
    else:
        v = fo | nb
        v |= do
        bits = int(np.bitwise_or.reduce(v))
        end = int((do + nb).max())
    if bits < 0:
        raise ValueError("negative file offset, length or destination offset")
    if bits & (align - 1) or buffer_address(mv) % ALIGN_BYTES:
        raise ValueError(
            f"unaligned read: file offsets, lengths and destination offsets must be multiples of {align} bytes, the "
            f"destination address of {ALIGN_BYTES} (use aligned_buffer / align_up)")
    if end > mv.nbytes:
        raise ValueError(f"destination too small: reads end at byte {end}, buffer holds {mv.nbytes}")


class FlashReader:
    """Parallel positional reads from one file into aligned buffers, through a persistent thread pool.

    ``read(dest, file_offsets, nbytes, dest_offsets)`` performs read j = ``nbytes[j]`` bytes at ``file_offsets[j]``
    into ``dest[dest_offsets[j]:][:nbytes[j]]``; all values multiples of ``align_bytes`` (default ``ALIGN_BYTES``;
    a quantized layout's rows are 512-byte aligned, direct I/O's own unit: ``SECTOR_BYTES``). The read list is cut
    into contiguous slices, one per worker; each worker loops ``os.preadv``. ``stats`` counts bytes the kernel returned.

    ``native`` (default: where it builds, ``native.reader_library``): the reads are done by C++ that never holds the
    interpreter's lock (with Python workers every read takes it: 16-32 reader threads then slow the thread that
    computes): with ``io_uring`` (default) one thread keeping up to ``max(n_threads, uring_depth)`` reads in flight in
    an io_uring where the kernel allows it (less CPU per read than a thread's blocking read and wake-up: ``uring``
    says whether it does), else ``n_threads`` C++ threads that take the reads one at a time. The Python workers stay the
    reference and the fallback (``native=False``, or ``LLMFLASH_NATIVE=0``). ``spin_wait_us``: the native reader's
    waits poll (yielding the core) this long before they sleep, so that the last read need not wake the waiter
    (``threads.SPIN_WAIT_US``, on machines with cores to spare).
    """

    def __init__(self, path: Union[str, Path], n_threads: int = 16, direct: bool = True, align_bytes: int = ALIGN_BYTES,
                 native: bool = True, io_uring: bool = True, uring_depth: int = URING_DEPTH, spin_wait_us: int = 0):
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if align_bytes < SECTOR_BYTES or align_bytes & (align_bytes - 1) or align_bytes > ALIGN_BYTES:
            raise ValueError(f"align_bytes must be a power of two from {SECTOR_BYTES} to {ALIGN_BYTES}, got {align_bytes}")
        self.align_bytes = align_bytes
        self.path = Path(path)
        self.n_threads = n_threads
        self.spin_wait_us = spin_wait_us  # the native reader's waits poll this long before they sleep (0: none)
        self._shared: Optional[_Shared] = None
        fd, self.direct = _open_flash(self.path, direct)
        self.size_bytes = os.fstat(fd).st_size
        self._shared = _Shared(fd, self.direct)
        self.stats = self._shared.stats
        self._tasks: SimpleQueue = SimpleQueue()
        self._lib = reader_library() if native else None
        self._pool: Optional[int] = None  # the native reader's thread pool
        self._threads: list[threading.Thread] = []
        if self._lib is not None:
            depth = max(n_threads, uring_depth) if io_uring else 0
            self._pool = self._lib.llmflash_reader_new(fd, n_threads, int(self.direct), depth)
        else:
            self._threads = [
                threading.Thread(target=_worker, args=(self._tasks, self._shared), name=f"llmflash-io-{i}", daemon=True)
                for i in range(n_threads)
            ]
            for t in self._threads:
                t.start()

    @property
    def native(self) -> bool:
        """Whether the native reader does the reads."""
        return self._pool is not None

    @property
    def uring(self) -> bool:
        """Whether the native reader reads through io_uring (else its threads, or Python's)."""
        return self._pool is not None and self._lib is not None and bool(self._lib.llmflash_reader_uring(self._pool))

    # --- reading -----------------------------------------------------------------------------------------------
    def submit(
        self, dest: Buffer, file_offsets: np.ndarray, nbytes: np.ndarray, dest_offsets: np.ndarray,
        piece_bytes: int = 0,
    ) -> ReadTicket:
        """Start the reads and return at once; the destination must stay alive and untouched until ``wait``.

        ``piece_bytes`` > 0: scatter reads (one ``preadv`` with several buffers, still one read of the file): read j
        fills ``nbytes[j] / piece_bytes`` pieces of ``piece_bytes``, and ``dest_offsets`` holds one offset per piece,
        the pieces of read 0 first (a neuron cache's rows land in their slots, wherever the free list put them)."""
        t0 = time.perf_counter_ns()
        if self._shared is None:
            raise ValueError(f"FlashReader({self.path}) is closed")
        fo = np.asarray(file_offsets, dtype=np.int64)
        nb = np.asarray(nbytes, dtype=np.int64)
        do = np.asarray(dest_offsets, dtype=np.int64)
        n = len(fo)
        n_dest = int(nb.sum()) // piece_bytes if piece_bytes > 0 else n
        if len(nb) != n or len(do) != n_dest:
            raise ValueError(f"read lists differ in length: {n} file offsets, {len(nb)} lengths, "
                             f"{len(do)} dest offsets")
        if n == 0:
            return ReadTicket(0, 0)
        mv = memoryview(dest)
        views = [mv]
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
            views.append(mv)
        fo_l, nb_l = fo.tolist(), nb.tolist()
        do_l: list = do.tolist()
        try:
            if piece_bytes > 0:
                if piece_bytes % self.align_bytes or (nb % piece_bytes).any():
                    raise ValueError(f"scatter reads: lengths must be multiples of piece_bytes={piece_bytes}, "
                                     f"itself a multiple of {self.align_bytes}")
                pb = np.full(n_dest, piece_bytes, dtype=np.int64)
                _check_reads(do, pb, do, do_l, pb.tolist(), do_l, mv, self.align_bytes)
                _check_reads(fo, nb, fo, fo_l, nb_l, fo_l, None, self.align_bytes)
                if self._pool is None:  # the Python workers' form: per read, its (offset, bytes) pieces
                    do_l = _scatter_pieces(do, nb // piece_bytes, piece_bytes)
            else:
                _check_reads(fo, nb, do, fo_l, nb_l, do_l, mv, self.align_bytes)
        except ValueError:
            for v in reversed(views):
                v.release()
            raise
        if self._pool is not None:
            return self._submit_native(mv, views, fo, nb, do, piece_bytes, t0)

        k = min(len(self._threads), -(-n // MIN_READS_PER_WORKER))  # slices (= workers woken)
        ticket = ReadTicket(n, k)
        ticket._fo, ticket._nb, ticket._do = fo_l, nb_l, do_l
        ticket._views = tuple(views)
        put = self._tasks.put
        lo = 0
        q0 = time.perf_counter_ns()
        for i in range(1, k + 1):
            hi = i * n // k
            put((ticket, mv, lo, hi))
            lo = hi
        ticket._queued_ns = time.perf_counter_ns()
        ticket.queue_ms = (ticket._queued_ns - q0) / 1e6
        del mv, views
        with self._shared.lock:
            self.stats.wait_ms += (time.perf_counter_ns() - t0) / 1e6
        return ticket

    def submit_rows(self, targets: Sequence[RowsTarget], ids: np.ndarray, file_rows: int,
                    slots: Optional[np.ndarray] = None, dest_row0: int = 0,
                    on_sizes: Optional[Callable[[np.ndarray], None]] = None) -> ReadTicket:
        """Start the reads that bring rows ``ids`` (sorted, unique, < ``file_rows``) of each target's region of the
        file into its buffer: into its rows ``slots`` (int64, one per id: a neuron cache's slots) or into consecutive
        rows from ``dest_row0``. Runs of consecutive ids are one read each, split at the target's ``max_run_rows``:
        the reads ``layout.read_plan`` / ``step.slot_plan`` make, planned in native code (one call per target instead
        of a dozen numpy calls; the engine's hot path). Native reader only (``native``); one ticket for all targets.
        ``on_sizes``: called with the planned reads' byte counts (int64 [reads]) before they are queued (an observer
        counting reads by size)."""
        return self.submit_rows_jobs([RowsJob(tuple(targets), ids, slots, dest_row0)], file_rows, on_sizes)

    def submit_rows_jobs(self, jobs: Sequence["RowsJob"], file_rows: int,
                         on_sizes: Optional[Callable[[np.ndarray], None]] = None) -> ReadTicket:
        """``submit_rows`` for several sets of rows at once (a layer's cache loads and its rows beyond the cache, in
        two buffers): one plan, one hand-over to the kernel, one ticket for all of them."""
        if self._pool is None or self._lib is None:
            raise ValueError("submit_rows needs the native reader (FlashReader.native)")
        t0 = time.perf_counter_ns()
        lib = self._lib
        views = []
        plan = lib.llmflash_reader_plan_new()  # (it copies what each plan_rows call reads: ids and slots need not live on)
        try:
            for job in jobs:
                ids = np.ascontiguousarray(job.ids, dtype=np.int64)
                slots = job.slots
                if slots is not None:
                    slots = np.ascontiguousarray(slots, dtype=np.int64)
                    if slots.size != ids.size:
                        raise ValueError(f"{ids.size} ids but {slots.size} slots")
                for t in job.targets:
                    if t.stride_bytes % self.align_bytes or t.file_base_bytes % self.align_bytes or t.file_base_bytes < 0:
                        raise ValueError(f"unaligned rows: stride {t.stride_bytes} and file offset {t.file_base_bytes} "
                                         f"must be multiples of {self.align_bytes} bytes")
                    mv = memoryview(t.dest)
                    if mv.readonly:
                        raise ValueError("the destination buffer is read-only")
                    addr = buffer_address(t.dest)
                    if addr % ALIGN_BYTES:
                        raise ValueError(f"unaligned destination: its address must be a multiple of {ALIGN_BYTES}")
                    views.append(mv)
                    rc = lib.llmflash_reader_plan_rows(plan, addr, mv.nbytes, t.file_base_bytes, t.stride_bytes,
                                                       file_rows, ids.size, array_address(ids),
                                                       0 if slots is None else array_address(slots), job.dest_row0,
                                                       max(1, t.max_run_rows))
                    if rc == -1:
                        raise ValueError(f"row ids must be sorted, unique and in [0, {file_rows})")
                    if rc:
                        raise ValueError(f"destination too small: rows beyond its {mv.nbytes // t.stride_bytes}")
                    if t.file_base_bytes + file_rows * t.stride_bytes > self.size_bytes:
                        raise ValueError(f"rows beyond the end of {self.path}")
            if on_sizes is not None:
                sizes = np.empty(lib.llmflash_reader_plan_sizes(plan, None), dtype=np.int64)
                lib.llmflash_reader_plan_sizes(plan, sizes.ctypes.data)
                on_sizes(sizes)
        except BaseException:
            lib.llmflash_reader_plan_free(plan)
            for v in reversed(views):
                v.release()
            raise
        ticket = ReadTicket(0, 0)
        ticket._remaining = 1  # until waited
        ticket._views = tuple(views)
        ticket._native = lib.llmflash_reader_submit_plan(self._pool, plan)
        with self._shared.lock:  # type: ignore[union-attr]
            self.stats.wait_ms += (time.perf_counter_ns() - t0) / 1e6
        return ticket

    def _submit_native(self, mv: memoryview, views: list, fo: np.ndarray, nb: np.ndarray, do: np.ndarray,
                       piece_bytes: int, t0: int) -> ReadTicket:
        """Queue the reads on the native pool: read j fills the buffers iov[iov_start[j]:iov_start[j + 1]] (one, or
        its pieces for a scatter read)."""
        n = len(fo)
        iov_start = np.zeros(n + 1, dtype=np.int64)
        if piece_bytes > 0:
            np.cumsum(nb // piece_bytes, out=iov_start[1:])
            iov_len = np.full(len(do), piece_bytes, dtype=np.int64)
        else:
            iov_start[1:] = np.arange(1, n + 1)
            iov_len = nb
        keep = tuple(np.ascontiguousarray(a, dtype=np.int64) for a in (fo, nb, iov_start, do, iov_len))
        ticket = ReadTicket(n, 0)
        ticket._remaining = 1  # until waited
        ticket._views, ticket._keep = tuple(views), keep
        assert self._lib is not None
        ticket._native = self._lib.llmflash_reader_submit(self._pool, buffer_address(mv), n,
                                                          *(a.ctypes.data for a in keep))
        del mv, views
        with self._shared.lock:  # type: ignore[union-attr]
            self.stats.wait_ms += (time.perf_counter_ns() - t0) / 1e6
        return ticket

    def _wait_native(self, ticket: ReadTicket) -> None:
        out = np.zeros(5, dtype=np.int64)
        t0 = time.perf_counter_ns()
        assert self._lib is not None
        self._lib.llmflash_reader_wait(self._pool, ticket._native, out.ctypes.data, self.spin_wait_us * 1000)
        ticket._native = None
        nbytes, nreads, ns, err, queue_ns = out.tolist()
        ticket.bytes_read, ticket.reads, ticket.elapsed_ms, ticket._remaining = nbytes, nreads, ns / 1e6, 0
        ticket.queue_ms = queue_ns / 1e6
        with self._shared.lock:  # type: ignore[union-attr]
            self.stats.bytes_read += nbytes
            self.stats.reads += nreads
            self.stats.wait_ms += (time.perf_counter_ns() - t0) / 1e6
        _release_views(ticket)
        ticket._keep = ()
        if err:
            raise OSError(err, f"{os.strerror(err)} (while reading {self.path})")

    def wait(self, ticket: ReadTicket) -> None:
        """Block until the ticket's reads are done; re-raise the first error a worker met."""
        if ticket._native is not None:
            self._wait_native(ticket)
            return
        if ticket._remaining:
            t0 = time.perf_counter_ns()
            ticket._done.acquire()
            ticket._done.release()
            with self._shared.lock:  # type: ignore[union-attr]
                self.stats.wait_ms += (time.perf_counter_ns() - t0) / 1e6
        if ticket._queued_ns:  # in flight until the reads were done and the submit call had returned
            ticket.elapsed_ms = max(ticket.elapsed_ms, (ticket._queued_ns - ticket._start_ns) / 1e6)
        if ticket._error is not None:
            err, ticket._error = ticket._error, None
            try:
                err.add_note(f"while reading {self.path}")  # type: ignore[attr-defined,unused-ignore]  # Python 3.11+
            except AttributeError:  # Python < 3.11
                pass
            raise err

    def read(self, dest: Buffer, file_offsets: np.ndarray, nbytes: np.ndarray, dest_offsets: np.ndarray) -> None:
        """Blocking read: ``wait(submit(...))``."""
        self.wait(self.submit(dest, file_offsets, nbytes, dest_offsets))

    # --- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish reads in flight, stop the workers and close the file. Idempotent."""
        shared = self._stop_workers()
        if shared is None:
            return
        for t in self._threads:
            t.join()
        self._threads = []
        self._free_pool()
        shared.close_fd()

    def _free_pool(self) -> None:
        """The native pool finishes the reads queued, then its threads stop."""
        pool, self._pool = self._pool, None
        if pool is not None and self._lib is not None:
            self._lib.llmflash_reader_free(pool)

    def _stop_workers(self) -> Optional[_Shared]:
        shared, self._shared = self._shared, None
        if shared is not None:
            for _ in self._threads:
                self._tasks.put(None)  # after the tasks already queued
        return shared

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No join here (this may run at interpreter shutdown): the workers exit after the reads already queued and
        # the last one to go drops the _Shared, which closes the file.
        try:
            if self._pool is not None:  # the file closes when the _Shared goes
                self._free_pool()
            self._stop_workers()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        state = "closed" if self._shared is None else f"{self.n_threads} {'native ' if self.native else ''}threads"
        return f"FlashReader({str(self.path)!r}, direct={self.direct}, {state})"


def read_range(path: Union[str, Path], offset: int = 0, nbytes: Optional[int] = None, n_threads: int = 4) -> mmap.mmap:
    """Read ``nbytes`` (default: to the end of the file) at ``offset`` into a new aligned buffer, bypassing the cache.

    ``offset`` must be a multiple of ``ALIGN_BYTES``. The buffer holds ``align_up(nbytes)`` bytes; the data is
    ``buf[:nbytes]`` and the rest is zero. A file shorter than the range is an ``LLMFlashError``.
    """
    if offset % ALIGN_BYTES:
        raise ValueError(f"read_range offset {offset} is not a multiple of {ALIGN_BYTES}")
    with FlashReader(path, n_threads=n_threads) as reader:
        if nbytes is None:
            nbytes = max(reader.size_bytes - offset, 0)
        if offset + nbytes > reader.size_bytes:
            raise LLMFlashError(f"{path} is truncated: {reader.size_bytes} bytes, expected at least "
                                f"{offset + nbytes}; recreate it")
        buf = aligned_buffer(nbytes)
        total = align_up(nbytes)
        if total:
            dest_offsets = np.arange(0, total, READ_RANGE_CHUNK_BYTES, dtype=np.int64)
            lengths = np.minimum(READ_RANGE_CHUNK_BYTES, total - dest_offsets)
            reader.read(buf, dest_offsets + offset, lengths, dest_offsets)
        if len(buf) > nbytes:
            buf[nbytes:] = bytes(len(buf) - nbytes)  # bytes past the range (read for alignment) are not data
    return buf

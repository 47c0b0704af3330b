"""The native hot path, built on first use and loaded: ``step.cpp`` (one layer's FFN over cached rows, fused: float
rows, or int8 / int4 group-quantized ones dequantized on the fly: ``library()``), ``reader.cpp`` (the flash reader:
io_uring, or a pool of threads doing parallel ``preadv``, without the interpreter: ``reader_library()``) and
``cache.cpp`` (a neuron cache's slot bookkeeping per token: ``cache_library()``).

Built with the C++ compiler alone (``$CXX``, else ``g++``, else ``c++``: Debian's ``g++`` package) as a plain shared
library behind a C ABI, loaded with ``ctypes`` (which releases the GIL during the call, so reader threads go on): no
Python or torch headers, no ninja, about 2 s of compiling. The library goes to ``cache_dir()/native/<key>/`` where
the key hashes the source, the flags, the compiler's version and the CPU (``-march=native``), so a changed source or
another machine builds anew; the file appears atomically, so concurrent first uses are safe. Flags: ``-O3
-march=native -fopenmp`` where the compiler takes them, fewer where it does not (OpenMP: the runtime torch has already
loaded, by soname).

Where nothing builds or loads (no compiler, an exotic platform, ``LLMFLASH_NATIVE=0``), ``library()``,
``reader_library()`` and ``cache_library()`` each log ONE warning with the reason and return None; the engine then
runs its Python path (the reader its Python threads, the caches numpy).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

from ..errors import LLMFlashError
from ..paths import atomic_file, cache_dir

log = logging.getLogger(__name__)

ABI_VERSION = 7  # llmflash_step_version() of the library this loader speaks to
SOURCE = Path(__file__).with_name("step.cpp")
READER_SOURCE = Path(__file__).with_name("reader.cpp")
READER_ABI_VERSION = 6  # llmflash_reader_version()
CACHE_SOURCE = Path(__file__).with_name("cache.cpp")
CACHE_ABI_VERSION = 3  # llmflash_cache_version()
READER_FLAG_SETS: tuple[tuple[str, ...], ...] = (("-O2", "-pthread"), ("-O2",))
# tried in order: the first that compiles is used
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
BUILD_TIMEOUT_S = 300

_state: dict[str, object] = {}  # "lib" / "reader": the loaded library or None, once tried; "<key>_reason": why not


class _CompileError(Exception):
    pass


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (the library must not move to another CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(cxx: str, source: Optional[Path] = None, flag_sets: Optional[tuple[tuple[str, ...], ...]] = None,
           name: str = "libllmflash_step.so") -> Path:
    """Compile ``source`` (default ``SOURCE`` with ``FLAG_SETS``; cached); raise ``RuntimeError`` with the compiler's
    last line when no flag set works."""
    source = source or SOURCE
    flag_sets = flag_sets or FLAG_SETS
    src = source.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_key().encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        out = cache_dir() / "native" / key / name
        if out.is_file():
            return out
        try:
            with atomic_file(out) as tmp:  # renamed into place only if the compiler succeeded
                cmd = [cxx, *flags, "-shared", "-fPIC", "-std=c++17", "-o", str(tmp), str(source)]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                if res.returncode != 0:
                    raise _CompileError((res.stderr.strip().splitlines() or ["no output"])[-1])
        except _CompileError as err:
            errors.append(f"{' '.join(flags)}: {err}")
            continue
        log.info("built %s with %s %s -> %s", source.name, cxx, " ".join(flags), out)
        return out
    raise RuntimeError("; ".join(errors))


def _usable_compiler() -> str:
    """The compiler to build with; ``RuntimeError`` where native code is switched off or no compiler exists."""
    if os.environ.get("LLMFLASH_NATIVE", "1") == "0":
        raise RuntimeError("LLMFLASH_NATIVE=0")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (install g++: apt-get install g++)")
    return cxx


def _loaded(key: str, load: Callable[[], ctypes.CDLL], message: str) -> Optional[ctypes.CDLL]:
    """``load()``'s library, tried once per process (``_state[key]``); None after one warning where it fails."""
    if key not in _state:
        try:
            _state[key] = load()
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, LLMFlashError) as err:
            _state[key] = None
            _state[f"{key}_reason"] = str(err)
            _warn_once(message, err)
    lib = _state[key]
    return lib if isinstance(lib, ctypes.CDLL) else None


def _load() -> ctypes.CDLL:
    cxx = _usable_compiler()
    import torch  # noqa: F401 - its OpenMP runtime first, so that the library shares it

    lib = ctypes.CDLL(str(_build(cxx)))
    lib.llmflash_step_version.restype = ctypes.c_int32
    if lib.llmflash_step_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.llmflash_step_version()}, expected {ABI_VERSION}")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    f = lib.llmflash_sparse_ffn  # float rows
    f.argtypes = [p, i64, i64, p, p, p, i64, i64, i32, p, p, i64, p, p, i64, i32, f32, i32, p, i32]
    f.restype = i32
    q = lib.llmflash_sparse_ffn_q  # group-quantized rows (int8, int4)
    q.argtypes = [p, i64, i64, p, p, p, i64, i64, i32, i32, p, p, i64, p, p, i64, i32, f32, i32, p, i32, i32]
    q.restype = i32
    i8 = lib.llmflash_int8_linear  # int8 weight-only linear (resident weights), float32 activations
    i8.argtypes = [p, i64, i64, p, p, p, i64, p, i32]
    i8.restype = None
    ql = lib.llmflash_q_linear  # group-quantized weight-only linear (int4 / int8 resident weights)
    ql.argtypes = [p, i64, i64, p, i64, i32, i32, p, i64, p, i32]
    ql.restype = i32
    ai = lib.llmflash_attn_in  # a decoder layer's attention for one token, before the cache append (decode_step)
    ai.argtypes = [p, i64, p, f32, p, p, p, p, p, i64, i64, i64, p, p, p, p, i32]
    ai.restype = i32
    ao = lib.llmflash_attn_out  # ... and after it
    ao.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, f32, p, p, i64, p, f32, p, p, i32]
    ao.restype = i32
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The native step's library, built on first use; None (after one warning) where it cannot be built."""
    return _loaded("lib", _load, "native sparse step unavailable (%s): using the Python path")


def unavailable_reason() -> Optional[str]:
    """Why ``library()`` returned None (None while it has not been tried or when it loaded)."""
    reason = _state.get("lib_reason")
    return str(reason) if reason is not None else None


def _load_checked(source: Path, name: str, abi: int) -> ctypes.CDLL:
    """Build (cached) and load the library of ``source`` (``READER_FLAG_SETS``), its ``llmflash_<name>_version()``
    checked against ``abi``."""
    lib = ctypes.CDLL(str(_build(_usable_compiler(), source, READER_FLAG_SETS, f"libllmflash_{name}.so")))
    version = getattr(lib, f"llmflash_{name}_version")
    version.restype = ctypes.c_int32
    if version() != abi:
        raise RuntimeError(f"{name} library ABI {version()}, expected {abi}")
    return lib


def _load_reader() -> ctypes.CDLL:
    lib = _load_checked(READER_SOURCE, "reader", READER_ABI_VERSION)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.llmflash_reader_new.argtypes = [i32, i32, i32, i32]
    lib.llmflash_reader_new.restype = p
    lib.llmflash_reader_uring.argtypes = [p]
    lib.llmflash_reader_uring.restype = i32
    lib.llmflash_reader_submit.argtypes = [p, p, i64, p, p, p, p, p]
    lib.llmflash_reader_submit.restype = p
    lib.llmflash_reader_plan_new.argtypes = []
    lib.llmflash_reader_plan_new.restype = p
    lib.llmflash_reader_plan_rows.argtypes = [p, p, i64, i64, i64, i64, i64, p, p, i64, i64]
    lib.llmflash_reader_plan_rows.restype = i32
    lib.llmflash_reader_submit_plan.argtypes = [p, p]
    lib.llmflash_reader_submit_plan.restype = p
    lib.llmflash_reader_plan_free.argtypes = [p]
    lib.llmflash_reader_plan_free.restype = None
    lib.llmflash_reader_plan_sizes.argtypes = [p, p]
    lib.llmflash_reader_plan_sizes.restype = i64
    lib.llmflash_reader_wait.argtypes = [p, p, p, i64]
    lib.llmflash_reader_wait.restype = None
    lib.llmflash_reader_free.argtypes = [p]
    lib.llmflash_reader_free.restype = None
    return lib


def reader_library() -> Optional[ctypes.CDLL]:
    """The native reader's library, built on first use; None (after one warning) where it cannot be built."""
    return _loaded("reader", _load_reader, "native reader unavailable (%s): using Python reader threads")


def _load_cache() -> ctypes.CDLL:
    lib = _load_checked(CACHE_SOURCE, "cache", CACHE_ABI_VERSION)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    f = lib.llmflash_cache_update
    f.argtypes = [i64, i32, i32, i64, p, i64, p, p, p, p, p, p, p, p, i64, p, p, p, p, p, p, ctypes.c_double]
    f.restype = i32
    lib.llmflash_bridge.argtypes = [p, i64, i64, p]
    lib.llmflash_bridge.restype = i64
    return lib


def cache_library() -> Optional[ctypes.CDLL]:
    """The native cache bookkeeping's library, built on first use; None (after one warning) where it cannot be built."""
    return _loaded("cache", _load_cache, "native cache bookkeeping unavailable (%s): using numpy")


def load_all() -> None:
    """Build (cached) and load every native library the engine uses, e.g. before a memory-limited child starts."""
    for load in (library, reader_library, cache_library):
        load()


def _warn_once(message: str, err: BaseException) -> None:
    """One warning per reason: where neither library builds for the same reason (no compiler), the second is info."""
    seen = _state.setdefault("warned", set())
    assert isinstance(seen, set)
    reason = str(err)
    (log.info if reason in seen else log.warning)(message, reason)
    seen.add(reason)

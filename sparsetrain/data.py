"""Training and held-out token data for sparsity training, built on the CPU and carried to the GPU as one file.

``build_data`` tokenizes every corpus (documents separated by EOS) into uint16 streams and writes ``tokens.npz`` with
a JSON description of each source (kind, split, documents, tokens). The held-out corpora are named before any
training and no training step reads them: ``HELD_OUT`` below. ``build_prompts`` makes the prompts from which the
original model writes more training text on the GPU (``sample.generate``): chat-template instructions over many
topics and raw openings of training documents.

``WindowSampler`` draws training windows: a source by its weight, then a uniformly random offset, so every pass
sees the text cut differently.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from llmflash.text import token_stream

# Held out from every training step (kinds differ from each other; wiki:eval is the held-out part of a training corpus).
HELD_OUT = {
    "kjv": ("kjv:", "scripture, archaic prose"),
    "shakespeare": ("shakespeare:", "drama and verse"),
    "pydoc": ("pydoc:", "technical documentation"),
    "wiki_eval": ("wiki:eval", "encyclopedic (held-out articles of a training corpus)"),
}
TRAIN = {
    "wiki_train": ("wiki:train", "encyclopedic"),
    "bigbench": ("bigbench:", "task texts: questions, answers, puzzles, dialogue (zero-shot evaluation tasks excluded)"),
}
HELD_OUT_MAX_TOKENS = 131_072
ZEROSHOT_TASKS = ("human_organs_senses", "odd_one_out", "misconceptions", "phrase_relatedness", "social_iqa",
                  "similarities_abstraction")


def _stream(tokenizer, docs: list[str], max_tokens: Optional[int] = None) -> np.ndarray:
    """``token_stream`` (documents separated by EOS) as a uint16 array."""
    arr = token_stream(tokenizer, docs, max_tokens=max_tokens).numpy()
    if arr.max(initial=0) >= 1 << 16:
        raise ValueError("token ids do not fit uint16")
    return arr.astype(np.uint16)


def source_docs(spec: str) -> list[str]:
    from llmflash.corpora import bigbench_documents
    from llmflash.text import load_texts

    if spec == "bigbench:":
        return bigbench_documents(exclude=ZEROSHOT_TASKS)
    return load_texts(spec)


def build_data(tokenizer, out: Path, train: dict = TRAIN, held_out: dict = HELD_OUT,
               held_out_max_tokens: int = HELD_OUT_MAX_TOKENS, docs_override: Optional[dict] = None) -> dict:
    """Tokenize the corpora into ``out`` (a .npz) and return the description written beside it (``out``.json)."""
    arrays: dict[str, np.ndarray] = {}
    desc: dict[str, dict] = {}
    for split, table in (("train", train), ("held_out", held_out)):
        for name, (spec, kind) in table.items():
            docs = (docs_override or {}).get(name) or source_docs(spec)
            cap = held_out_max_tokens if split == "held_out" else None
            arr = _stream(tokenizer, docs, cap)
            arrays[name] = arr
            desc[name] = {"split": split, "source": spec, "kind": kind, "documents": len(docs), "tokens": int(arr.size)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(desc, indent=1))
    return desc


INSTRUCTIONS = (
    "Write a short essay about {t}.", "Explain {t} to a ten-year-old.", "What are the most important facts about {t}?",
    "Write a poem about {t}.", "Summarize the history of {t} in a few paragraphs.",
    "Give three questions and their answers about {t}.", "Write a dialogue between two friends who disagree about {t}.",
    "Describe {t} as if you were a tour guide.", "List five interesting things about {t}, with one sentence each.",
    "Write a short story in which {t} plays a part.", "What are common misconceptions about {t}?",
    "Compare {t} with something similar and explain the differences.", "Write an encyclopedia-style paragraph on {t}.",
    "How would you teach a class about {t}? Outline the lesson.", "Write a news report about a recent discovery related to {t}.",
    "Tell me about {t}.", "Why does {t} matter today?", "Write a letter to a friend describing {t}.",
)
GENERIC = (
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Solve this: a train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
    "Give me a recipe for a simple vegetable soup.", "What is the difference between weather and climate?",
    "Write a haiku about the sea.", "Explain how a bicycle stays upright.", "How do I write a good cover letter?",
    "What are the pros and cons of working from home?", "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a limerick about a cat who loves music.", "Explain recursion with an example.",
    "Plan a three-day trip to a city of your choice.", "What is photosynthesis?", "Write a SQL query that counts orders per customer.",
    "Give tips for learning a new language.", "Describe the water cycle.", "What causes the seasons on Earth?",
    "Write a motivational speech for a football team at half time.", "Explain what an API is to a non-programmer.",
    "Write a product description for a reusable water bottle.",
)


def build_prompts(tokenizer, topics: list[str], openings: list[str], n_chat: int, n_raw: int, seed: int = 0,
                  max_prompt_tokens: int = 160) -> list[list[int]]:
    """Token-id prompts: ``n_chat`` chat-template instructions (templates x topics, plus generic tasks) and ``n_raw``
    raw openings (the first sentences of training documents)."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for k in range(n_chat):
        if k % 5 == 4:
            text = rng.choice(GENERIC)
        else:
            text = rng.choice(INSTRUCTIONS).format(t=rng.choice(topics))
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts.append(list(ids)[:max_prompt_tokens])
    for _ in range(n_raw):
        doc = rng.choice(openings)
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        n = rng.randint(8, 48)
        if len(ids) > 4:
            prompts.append(ids[: min(n, len(ids))])
    return prompts


def pack_samples(samples: list[list[int]], eos_id: int) -> np.ndarray:
    """Concatenate generated texts into one uint16 stream, EOS-separated."""
    flat: list[int] = []
    for s in samples:
        if s:
            flat.extend(s)
            if s[-1] != eos_id:
                flat.append(eos_id)
    return np.asarray(flat, dtype=np.uint16)


@dataclass
class WindowSampler:
    """Random windows [B, T] from weighted token streams."""

    streams: dict[str, np.ndarray]
    weights: dict[str, float]
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.names = [n for n in self.weights if self.weights[n] > 0 and self.streams[n].size > self.seq_len + 1]
        w = np.array([self.weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.rng = np.random.default_rng(self.seed)
        self.torch_streams = {n: torch.from_numpy(self.streams[n].astype(np.int64)) for n in self.names}

    def batch(self, n: int) -> Tensor:
        picks = self.rng.choice(len(self.names), size=n, p=self.p)
        rows = []
        for k in picks:
            s = self.torch_streams[self.names[k]]
            start = int(self.rng.integers(0, s.numel() - self.seq_len))
            rows.append(s[start : start + self.seq_len])
        return torch.stack(rows)

    def state(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state(self, st: dict) -> None:
        self.rng.bit_generator.state = st["bit_generator"]


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> Tensor:
    """Non-overlapping windows [N, seq_len] from the start of a held-out stream (at most ``max_tokens`` tokens)."""
    n = min(stream.size, max_tokens) // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)

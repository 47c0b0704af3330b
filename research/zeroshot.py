"""Zero-shot multiple-choice evaluation by log-likelihood (BIG-bench JSON tasks), in the spirit of the paper's Table 4.

Tasks come from the ``bigbench`` sdist (1.0.0), which is downloaded once with
``pip download --no-deps --no-binary :all: bigbench==1.0.0`` into the cache and never installed: the task.json files
are read from the tarball with ``tarfile`` and cached as ``<cache>/bigbench/tasks/<name>.json``.

Formatting follows BIG-bench's ``default_format_fn`` (zero-shot): ``task_prefix + example_input_prefix + input``, the
choices appended as ``choice_prefix + choice`` (in BIG-bench's seeded order) when ``append_choices_to_input``, then
``example_output_prefix``. Each choice is scored by the sum of its tokens' log-probabilities after the prompt (BIG-bench's
absolute log-probability); ``acc`` takes the best sum, ``acc_norm`` the best sum per byte of the choice (as
lm-evaluation-harness). An example is correct when the chosen choice has the highest target score.

``score_task`` takes any in-memory causal LM: a plain Hugging Face model, or one whose FFNs were swapped for llmflash
``DenseFFN`` modules (a sparsity rule, a predictor mask, ...). Pass an ``observer`` to count active neurons.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmflash.corpora import SDISTS, sdist
from llmflash.errors import LLMFlashError
from llmflash.paths import atomic_file, cache_dir

log = logging.getLogger(__name__)

BIGBENCH_VERSION, BIGBENCH_SDIST = SDISTS["bigbench"]
# Short English multiple-choice tasks (chosen by their formatted length in tokens, so that the CPU scores them in
# minutes, before looking at any model's score).
DEFAULT_TASKS = (
    "human_organs_senses", "odd_one_out", "misconceptions", "phrase_relatedness", "social_iqa", "similarities_abstraction",
)


@dataclass(frozen=True)
class MCExample:
    prompt: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]  # BIG-bench target scores (the best is correct)


@dataclass(frozen=True)
class MCTask:
    name: str
    examples: tuple[MCExample, ...]
    total_examples: int  # in the task, before the limit

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess."""
        return float(np.mean([sum(s == max(e.scores) for s in e.scores) / len(e.scores) for e in self.examples]))


def bigbench_tarball(download: bool = True) -> Path:
    """The cached bigbench sdist; downloaded with pip (no install) on first use."""
    folder = cache_dir() / "bigbench"
    path = folder / BIGBENCH_SDIST
    if not download and not path.is_file():
        raise LLMFlashError(f"{path} is missing: run `pip download --no-deps --no-binary :all: bigbench=={BIGBENCH_VERSION} -d {folder}`")
    return sdist("bigbench", folder)


def task_json(name: str, tarball: Optional[Path] = None) -> dict:
    """A BIG-bench task's task.json (top-level task only), extracted once into the cache."""
    cached = cache_dir() / "bigbench" / "tasks" / f"{name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    tarball = tarball or bigbench_tarball()
    member = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/{name}/task.json"
    try:
        with tarfile.open(tarball) as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            raw = f.read()
    except KeyError:
        raise LLMFlashError(f"BIG-bench has no JSON task {name!r}") from None
    except (tarfile.TarError, OSError) as err:
        raise LLMFlashError(f"cannot read {tarball}: {err}") from None
    with atomic_file(cached) as tmp:
        tmp.write_bytes(raw)
    return json.loads(raw)


def format_examples(data: dict, seed: int = 42) -> list[MCExample]:
    """BIG-bench's zero-shot formatting of the multiple-choice examples (see the module docstring)."""
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    append = append if isinstance(append, bool) else str(append).lower() == "true"
    task_prefix = str(data.get("task_prefix", ""))
    out = []
    for ex in data.get("examples", []):
        scores = ex.get("target_scores")
        if not scores or len(scores) < 2:
            continue
        text = ex["input"]
        if append:
            rng = np.random.RandomState(seed=seed)  # BIG-bench reseeds per example
            text = text + choice_prefix + choice_prefix.join(rng.permutation(sorted(scores)))
        prompt = task_prefix + input_prefix + text + output_prefix
        out.append(MCExample(prompt, tuple(scores), tuple(float(v) for v in scores.values())))
    return out


def load_task(name: str, limit: Optional[int] = None, seed: int = 0, data: Optional[dict] = None) -> MCTask:
    """A task's multiple-choice examples, at most ``limit`` of them (a seeded random subset, in a stable order)."""
    data = data if data is not None else task_json(name)
    examples = format_examples(data)
    if not examples:
        raise LLMFlashError(f"BIG-bench task {name!r} has no multiple-choice examples")
    total = len(examples)
    if limit is not None and limit < total:
        idx = sorted(np.random.RandomState(seed).choice(total, limit, replace=False).tolist())
        examples = [examples[i] for i in idx]
    return MCTask(name, tuple(examples), total)


def _encode(tokenizer, prompt: str, choice: str) -> tuple[list[int], int]:
    """Token ids of prompt + choice and how many of the last ones belong to the choice.

    Trailing whitespace of the prompt moves to the choice (as lm-evaluation-harness does), so that e.g. "A:" + " Paris"
    tokenizes the way text does.
    """
    stripped = prompt.rstrip(" ")
    cont = prompt[len(stripped):] + choice
    ctx_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + cont, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx_ids)
    if n_cont <= 0 or whole[: len(ctx_ids)] != ctx_ids:  # tokenization merged across the boundary: encode apart
        cont_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        whole, n_cont = ctx_ids + cont_ids, len(cont_ids)
    return whole, n_cont


@torch.no_grad()
def choice_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                    max_len: int = 1024, progress: bool = False) -> list[float]:
    """Sum of log p(choice tokens | prompt) for each (prompt, choice), batched by length (right padding)."""
    encoded = [_encode(tokenizer, p, c) for p, c in pairs]
    encoded = [(ids[-max_len:], min(n, max_len - 1)) for ids, n in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out = [0.0] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring", disable=not progress):
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        for row, i in enumerate(batch):
            seq, n = encoded[i]
            targets = torch.tensor(seq[len(seq) - n :], device=device)
            pos = torch.arange(len(seq) - n - 1, len(seq) - 1, device=device)
            out[i] = float(logp[row, pos, targets].sum())
    return out


def score_task(model: nn.Module, tokenizer, task: MCTask, batch_size: int = 16, progress: bool = False) -> dict:
    """Zero-shot accuracy of ``model`` on ``task``: {acc, acc_norm, n, chance, choices}."""
    pairs = [(e.prompt, c) for e in task.examples for c in e.choices]
    lps = choice_logprobs(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    correct, correct_norm, k = 0, 0, 0
    for e in task.examples:
        lp = np.array(lps[k : k + len(e.choices)])
        k += len(e.choices)
        nbytes = np.array([max(1, len(c.encode())) for c in e.choices])
        best = max(e.scores)
        correct += e.scores[int(lp.argmax())] == best
        correct_norm += e.scores[int((lp / nbytes).argmax())] == best
    n = len(task.examples)
    return {"task": task.name, "n": n, "total_examples": task.total_examples, "acc": correct / n,
            "acc_norm": correct_norm / n, "chance": task.chance}

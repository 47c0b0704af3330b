"""Zero-shot multiple-choice scoring on a tiny model with a synthetic BIG-bench-style task."""

from __future__ import annotations

import pytest

from llmflash.arch import install_dense_ffns
from llmflash.ffn import SparsityRule
from research.zeroshot import choice_logprobs, format_examples, load_task, score_task

from tiny import tiny_llama, tiny_tokenizer

TASK = {
    "name": "synthetic",
    "examples": [
        {"input": f"What comes after {i}?", "target_scores": {str(i + 1): 1, str(i + 2): 0, "x": 0}} for i in range(12)
    ],
}


def test_format_follows_bigbench_defaults():
    ex = format_examples(TASK)[0]
    assert ex.prompt.startswith("\nQ: What comes after 0?\n  choice: ") and ex.prompt.endswith("\nA: ")
    assert ex.choices == ("1", "2", "x") and ex.scores == (1.0, 0.0, 0.0)
    no_choices = format_examples(TASK | {"append_choices_to_input": False, "example_output_prefix": "\nAnswer:"})[0]
    assert no_choices.prompt == "\nQ: What comes after 0?\nAnswer:"


def test_batched_scores_equal_one_by_one():
    model, tok = tiny_llama(seed=2), tiny_tokenizer()
    pairs = [("\nQ: a b c\nA: ", "d"), ("\nQ: hello\nA: ", "a much longer answer"), ("x", " y")]
    batched = choice_logprobs(model, tok, pairs, batch_size=3)
    single = [choice_logprobs(model, tok, [p], batch_size=1)[0] for p in pairs]
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-4)
    assert all(v < 0 for v in batched)


def test_score_task_with_dense_ffns_installed():
    model, tok = tiny_llama(seed=2, relu=True), tiny_tokenizer()
    task = load_task("synthetic", limit=8, data=TASK)
    assert len(task.examples) == 8 and task.total_examples == 12 and task.chance == pytest.approx(1 / 3)
    plain = score_task(model, tok, task, batch_size=5)
    seen = []
    install_dense_ffns(model, SparsityRule("relu"), observer=lambda layer, x, h: seen.append(h))
    swapped = score_task(model, tok, task, batch_size=5)
    assert seen and plain["n"] == 8 and 0.0 <= plain["acc"] <= 1.0
    assert swapped["acc"] == plain["acc"] and swapped["acc_norm"] == plain["acc_norm"]

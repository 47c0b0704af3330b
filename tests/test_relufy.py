"""The first relufication on tiny random Llama models (CPU, seconds): training (``sparsetrain.relufy_v1``), the
artifact, and applying it (the core's ``llmflash.relufy_v1_format``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmflash.errors import LLMFlashError
from llmflash.evaluate import perplexity
from llmflash.arch import install_dense_ffns
from llmflash.ffn import DenseFFN, SparsityRule
from llmflash.models import load_model
from llmflash.relufy_v1_format import CONFIG_FILE, TENSORS_FILE, ReluMLP, apply_relufication
from llmflash.text import load_texts
from sparsetrain.relufy_v1 import CURVE_FILE, RelufyConfig, main, relufy
from tiny import save_tiny, tiny_llama

TEXT = "\n\n".join(f"Article {i}: the quick brown fox number {i * 7} jumps over {i % 5} lazy dogs." for i in range(120))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("relufy")
    save_tiny(tiny_llama(seed=3), root / "model")
    (root / "train.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    return root


def _cfg(root: Path, **kw) -> RelufyConfig:
    base = dict(steps=3, batch_seqs=4, micro_batch_seqs=2, seq_len=64, eval_every=2, eval_tokens=256,
                final_eval_tokens=256, text=str(root / "train.txt"), eval_text=str(root / "eval.txt"), shift=True,
                target_sparsity=0.8, ffn_rank=4, attn_rank=2, lr=1e-2, bias_lr=5e-2, device="cpu")
    return RelufyConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained(tiny_dir) -> tuple[Path, dict]:
    out = tiny_dir / "art"
    meta = relufy(str(tiny_dir / "model"), out, _cfg(tiny_dir), progress=False)
    return out, meta


def test_artifact_files_and_metadata(trained):
    out, meta = trained
    assert {p.name for p in out.iterdir()} >= {TENSORS_FILE, CONFIG_FILE, CURVE_FILE}
    saved = json.loads((out / CONFIG_FILE).read_text())
    assert saved["config"]["target_sparsity"] == 0.8 and saved["config"]["steps_run"] == 3
    assert saved["data"]["train_tokens_seen"] == 3 * 4 * 64
    assert saved["hardware"]["device"] == "cpu" and saved["time"]["wall_s"] > 0
    rows = (out / CURVE_FILE).read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 4  # header, step 0, 3 steps


def test_apply_round_trip_matches_training_and_gives_exact_zeros(tiny_dir, trained):
    out, meta = trained
    model, tok, _ = load_model(str(tiny_dir / "model"))
    model = apply_relufication(model, out)
    assert model.config.hidden_act == "relu"
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(m, ReluMLP) and type(m.gate_proj) is torch.nn.Linear for m in mlps)
    assert any(float(m.act_bias.abs().max()) > 0 for m in mlps)  # the learned shift arrived
    # The applied (merged) model reproduces the perplexity measured on the trained student (same windows).
    docs = load_texts(str(tiny_dir / "eval.txt"))
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = model(x).logits
    res = perplexity(model, tok, docs, seq_len=64, max_tokens=256, rule=SparsityRule("relu"), progress=False)
    assert res["ppl"] == pytest.approx(meta["results"]["final_ppl"], rel=1e-4)
    assert res["ffn_active_fraction"] == pytest.approx(meta["results"]["final_active_fraction"], abs=1e-3)
    # llmflash's DenseFFN with the relu rule computes the same model, with exact zeros.
    zeros = []
    install_dense_ffns(model, SparsityRule("relu"), observer=lambda layer, xx, h: zeros.append(float((h == 0).float().mean())))
    assert all(isinstance(layer.mlp, DenseFFN) for layer in model.model.layers)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert min(zeros) > 0.2


def test_apply_rejects_other_shapes(trained, tmp_path):
    out, _ = trained
    other = tiny_llama(seed=1, d_ffn=128)
    with pytest.raises(LLMFlashError, match="made for a model"):
        apply_relufication(other, out)
    with pytest.raises(LLMFlashError, match="not a relufication artifact"):
        apply_relufication(tiny_llama(), tmp_path)


def test_cli_writes_the_artifact_atomically(tiny_dir, capsys):
    out = tiny_dir / "cli-out"
    args = [str(tiny_dir / "model"), "--out", str(out), "--steps", "2", "--shift", "--target-sparsity", "0.8",
            "--batch-tokens", "128", "--micro-batch-tokens", "64", "--seq-len", "64", "--eval-every", "1",
            "--eval-tokens", "128", "--final-eval-tokens", "128", "--text", str(tiny_dir / "train.txt"),
            "--eval-text", str(tiny_dir / "eval.txt"), "--ffn-rank", "2", "--attn-rank", "0", "--device", "cpu",
            "--posthoc", "0.9"]
    assert main(args) == 0
    assert "relufied" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {TENSORS_FILE, CONFIG_FILE, CURVE_FILE}
    assert not [p for p in tiny_dir.iterdir() if p.name.startswith(".tmp-")]
    assert main(args) == 2  # exists: refuses without --force
    assert "already exists" in capsys.readouterr().err
    bad = tiny_dir / "bad-out"
    assert main(args[:2] + [str(bad)] + args[3:] + ["--text", str(tiny_dir / "missing.txt")]) == 2
    assert not bad.exists() and not [p for p in tiny_dir.iterdir() if p.name.startswith(".tmp-")]


def test_fixed_l1_schedule_and_plain_relu(tiny_dir, tmp_path):
    meta = relufy(str(tiny_dir / "model"), tmp_path / "fixed", _cfg(tiny_dir, shift=False, target_sparsity=None,
                                                                   l1_final=0.5, anneal_frac=0.5), progress=False)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "fixed" / TENSORS_FILE))
    assert all(float(t.abs().max()) == 0 for k, t in tensors.items() if k.endswith("act_bias"))
    assert meta["results"]["steps"] == 3


def test_balance_shifts_sets_every_layer_to_the_target(tiny_dir, trained):
    from sparsetrain.relufy_v1 import balance_shifts

    out, _ = trained
    model, _, _ = load_model(str(tiny_dir / "model"))
    model = apply_relufication(model, out)
    ids = torch.randint(0, 256, (4, 64))
    balance_shifts(model, ids, 0.25)
    seen = []
    install_dense_ffns(model, SparsityRule("relu"), observer=lambda layer, x, h: seen.append(float((h != 0).float().mean())))
    with torch.no_grad():
        model(ids)
    assert seen == pytest.approx([0.25] * len(seen), abs=0.01)

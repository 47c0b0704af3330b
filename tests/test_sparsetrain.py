"""Sparsity training on tiny random models (CPU): the compact model equals transformers, generation equals greedy HF,
the artifact round-trips, and the device job runs end to end (A/B of both arms, continuation, export)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from llmflash.sparse_model import apply_artifact, dequantize_int4, quantize_int4, read_artifact
from sparsetrain.data import WindowSampler, pack_samples
from sparsetrain.model import from_hf, hf_state
from sparsetrain.sample import generate
from sparsetrain.train import Recipe, lr_scale, scheduled_sparsity, sine_ramp

from tiny import save_tiny, tiny_llama


def test_compact_model_equals_transformers():
    hf = tiny_llama(seed=1)
    model = from_hf(hf, max_seq_len=64).eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        hidden, outs, hs, ins = model(ids)
        got = model.logits(hidden)
    assert len(outs) == len(hs) == len(ins) == 3
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_generation_equals_hf_greedy():
    hf = tiny_llama(seed=2)
    model = from_hf(hf, max_seq_len=128).eval()
    prompts = [[5, 9, 17, 33, 2], [7, 8], [100, 101, 102]]
    out = generate(model, prompts, max_new_tokens=12, eos_id=10_000, batch_size=2, temperature=0.0)
    for p, o in zip(prompts, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
        assert o == ref.tolist()


def test_int4_roundtrip_error_is_small():
    d = torch.randn(48, 128) * 0.01
    q, s = quantize_int4(d, 64)
    assert q.dtype == torch.uint8 and q.shape == (48, 64) and s.shape == (48, 2)
    back = dequantize_int4(q, s)
    assert float((back - d).abs().max()) <= float(s.float().max()) / 2 + 1e-7


def test_schedules():
    assert sine_ramp(0, 100, 0.1, 0.5) == 0.0 and sine_ramp(60, 100, 0.1, 0.5) == 1.0
    assert 0 < sine_ramp(30, 100, 0.1, 0.5) < 1
    r = Recipe(total_steps=100, target_sparsity=0.9, warmup_steps=10)
    assert scheduled_sparsity(r, 99) == pytest.approx(0.9)
    assert lr_scale(r, 0) == pytest.approx(0.1) and lr_scale(r, 99) == pytest.approx(r.min_lr_frac, abs=1e-3)


def test_window_sampler_resumes_identically():
    streams = {"a": np.arange(1000, dtype=np.uint16), "b": np.arange(5000, 6000, dtype=np.uint16)}
    s1 = WindowSampler(streams, {"a": 1.0, "b": 1.0}, seq_len=16, seed=3)
    s1.batch(4)
    st = s1.state()
    want = s1.batch(4)
    s2 = WindowSampler(streams, {"a": 1.0, "b": 1.0}, seq_len=16, seed=99)
    s2.load_state(st)
    assert torch.equal(s2.batch(4), want)
    assert pack_samples([[1, 2], [3, 0]], eos_id=0).tolist() == [1, 2, 0, 3, 0]


@pytest.mark.slow
def test_device_job_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The three device steps on a tiny model: generate text, A/B both arms, continue the winner, export, apply."""
    from sparsetrain import job

    base = save_tiny(tiny_llama(seed=4, d_ffn=128), tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"wiki_train": rng.integers(1, 256, 6000), "bigbench": rng.integers(1, 256, 6000),
              "kjv": rng.integers(1, 256, 3000), "pydoc": rng.integers(1, 256, 3000)}
    np.savez_compressed(data / "tokens.npz", **{k: v.astype(np.uint16) for k, v in arrays.items()})
    desc = {k: {"split": "train" if k in ("wiki_train", "bigbench") else "held_out", "source": k, "kind": k,
                "documents": 1, "tokens": 6000} for k in arrays}
    (data / "tokens.json").write_text(json.dumps(desc))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]] * 4
    np.savez_compressed(data / "prompts.npz", flat=np.concatenate([np.array(p, dtype=np.uint16) for p in prompts]),
                        lens=np.array([len(p) for p in prompts], dtype=np.int32))
    (data / "prompts.json").write_text(json.dumps({"eos_id": 0}))
    monkeypatch.setenv("SPARSIFY_DATA", str(data))
    monkeypatch.setenv("SPARSIFY_CALIB_TOKENS", "1024")
    monkeypatch.setenv("SPARSIFY_FRONTIER", "0.7,0.8")
    monkeypatch.setenv("SPARSIFY_PROBE_STEPS", "20")
    monkeypatch.setenv("SPARSIFY_PROBE_TOKENS", "2048")
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--work", str(work), "--out", str(out), "--base", str(base), "--device", "cpu", "--no-compile",
              "--total-steps", "8", "--tokens-per-step", "256", "--micro-batch-seqs", "2", "--seq-len", "64",
              "--eval-every", "4", "--eval-tokens", "512", "--reserve-s", "0", "--lora-rank", "4",
              "--target-sparsity", "0.8", "--ramp-end", "0.5"]
    job.main(["ab", *common, "--stop-step", "4", "--sample-budget-s", "30", "--sample-batch", "8",
              "--sample-max-new", "16", "--deadline-s", "600"])
    assert (out / "ab.tar.gz").is_file()
    for arm in ("silu", "relu"):
        rec = json.loads((work / arm / "record.json").read_text())["calls"][-1]
        assert rec["steps"] == 4 and math.isfinite(rec["eval"]["ratio"]["512"]["kjv"])
        assert 0 < rec["probe"]["recall"] <= 1 and rec["frontier"]
    assert (out / "artifact" / "sparse_model.json").is_file()
    assert (work / "generated.npy").is_file()
    job.main(["final", *common, "--stop-step", "8", "--deadline-s", "600"])
    final = json.loads((work / "final.json").read_text())
    assert final["record"]["steps"] == 8
    cfg, tensors = read_artifact(out / "artifact")
    assert len(cfg["thresholds"]) == 3 and cfg["activation"] in ("silu", "relu")
    assert any(k.endswith(".q4") for k in tensors) and any(k.endswith(".lora_A") for k in tensors)
    # The artifact applied to the base equals the exported (applied) compact model, thresholds included.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    apply_artifact(hf, out / "artifact")
    state = hf_state(from_hf(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)))
    assert set(k for k in hf.state_dict() if "mlp" in k) >= {k for k in state if ".mlp." in k and "weight" in k}
    ids = torch.randint(1, 256, (1, 32))
    with torch.no_grad():
        logits = hf(ids).logits
    assert torch.isfinite(logits).all()
    # The shipped thresholds make the FFN sparse.
    seen = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(float((i[0] == 0).float().mean())))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(torch.randint(1, 256, (2, 64)))
    for h in hooks:
        h.remove()
    assert np.mean(seen) > 0.5


def test_applied_artifact_equals_the_compact_model(tmp_path):
    """What ships (the artifact applied to a Hugging Face base) computes what the trainer evaluated."""
    from llmflash.sparse_model import decode_deltas, encode_deltas, write_artifact
    from sparsetrain.model import CompactLlama, Shape, load_hf_state

    base = tiny_llama(seed=6, d_ffn=128)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(1)
    trained = {k: v + 0.02 * torch.randn_like(v) if ".mlp." in k or "norm" in k else v.clone() for k, v in state.items()}
    lora = {f"model.layers.{i}.self_attn.q_proj.weight": (torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1)
            for i in range(3)}
    tensors = encode_deltas(state, trained, lora, n_layers=3)
    shape = Shape.from_hf_config(base.config)
    applied = decode_deltas(state, tensors)
    compact = CompactLlama(shape, "silu", True, 0, max_seq_len=64)
    load_hf_state(compact, applied)
    ids = torch.randint(1, 256, (2, 48))
    with torch.no_grad():
        hs = compact(ids)[2]
    thresholds = [float(h.abs().flatten().kthvalue(int(0.7 * h.numel())).values) for h in hs]
    compact.set_thresholds(thresholds)
    write_artifact(tmp_path / "art", tensors, {"activation": "silu", "thresholds": thresholds, "n_layers": 3,
                                               "target_sparsity": 0.7}, n_layers=3, shards=2)
    hf = apply_artifact(tiny_llama(seed=6, d_ffn=128), tmp_path / "art")
    with torch.no_grad():
        want = compact.logits(compact(ids)[0])
        got = hf(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert hf.config.llmflash_sparsity["thresholds"] == thresholds


def _tiny_streams(tmp_path, monkeypatch) -> None:
    """Tokenized train (wiki_train, bigbench) and held-out (kjv) streams for the device jobs, via $SPARSIFY_DATA."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"wiki_train": rng.integers(1, 256, 6000), "bigbench": rng.integers(1, 256, 6000),
              "kjv": rng.integers(1, 256, 3000)}
    np.savez_compressed(data / "tokens.npz", **{k: v.astype(np.uint16) for k, v in arrays.items()})
    desc = {k: {"split": "train" if k != "kjv" else "held_out", "source": k, "kind": k, "documents": 1, "tokens": 6000}
            for k in arrays}
    (data / "tokens.json").write_text(json.dumps(desc))
    monkeypatch.setenv("SPARSIFY_DATA", str(data))


def test_gated_run_on_cpu_chains_from_its_own_artifact(tmp_path, monkeypatch):
    """The gated campaign step on a tiny model: fresh gates from the base, then a second run from the first's output
    (artifact + gate); the gates let through the scheduled fraction and the exported gate is a predictor set."""
    from llmflash.predictor import PredictorSet
    from sparsetrain import gated

    base = save_tiny(tiny_llama(seed=4, d_ffn=128), tmp_path / "base")
    _tiny_streams(tmp_path, monkeypatch)
    monkeypatch.setattr(gated, "KEEPS", (0.3,))
    monkeypatch.setattr(gated, "CALIB_TOKENS", 1024)
    common = ["--base", str(base), "--device", "cpu", "--no-compile", "--total-steps", "6", "--tokens-per-step", "256",
              "--micro-batch-seqs", "2", "--seq-len", "64", "--eval-every", "3", "--eval-tokens", "512",
              "--frontier-tokens", "512", "--reserve-s", "0", "--lora-rank", "4", "--sample-budget-s", "0",
              "--keep-start", "0.8", "--keep", "0.3", "--target-sparsity", "0.85", "--ramp-end", "0.5"]
    out1 = tmp_path / "out1"
    gated.main(["run", *common, "--work", str(tmp_path / "w1"), "--out", str(out1), "--artifact", "none",
                "--gate-init", "none", "--gate-rank", "8"])
    final = json.loads((tmp_path / "w1" / "gated" / "final.json").read_text())
    ev = final["eval"]["student"]["512"]["kjv"]
    assert ev["read_fraction"] == pytest.approx(0.3, abs=0.12)
    assert 1 - ev["active_fraction"] == pytest.approx(0.85, abs=0.08)
    assert {r["over_prediction"] for r in final["frontier"]} == {1.0, 2.0}
    assert len([p for p in out1.iterdir()]) <= 8 and (out1 / "gated.tar.gz").is_file()
    cfg, tensors = read_artifact(out1)
    assert cfg["gate"]["keep"] == 0.3 and len(cfg["gate"]["cuts"]) == 3
    ps = PredictorSet.load(out1, dtype=torch.float32)
    assert ps.ranks == [8, 8, 8] and ps.meta["gate"] is True
    # A second call continues from the first one's output: artifact deltas and LoRA composed, gates loaded.
    out2 = tmp_path / "out2"
    gated.main(["run", *common, "--work", str(tmp_path / "w2"), "--out", str(out2), "--artifact", str(out1),
                "--gate-init", str(out1)])
    cfg2, tensors2 = read_artifact(out2)
    key = "model.layers.0.self_attn.q_proj.weight.lora_A"
    assert tensors2[key].shape[0] == 2 * tensors[key].shape[0]


def test_predictors_job_on_cpu(tmp_path, monkeypatch):
    """The device predictor job on a tiny model: collects, trains, calibrates, writes a loadable predictor set whose
    record has held-out recall per corpus."""
    from llmflash.predictor import PredictorSet
    from sparsetrain import predictors_job

    base = save_tiny(tiny_llama(seed=4, d_ffn=128), tmp_path / "base")
    _tiny_streams(tmp_path, monkeypatch)
    out = tmp_path / "out"
    predictors_job.main(["--work", str(tmp_path / "w"), "--out", str(out), "--base", str(base), "--artifact", "none",
                         "--device", "cpu", "--tokens", "4096", "--calib-tokens", "1024", "--eval-tokens", "512",
                         "--seq-len", "64", "--rank", "8", "--rank-last", "8", "--epochs", "2", "--batch", "256", "--hidden"])
    ps = PredictorSet.load(out)
    assert ps.ranks == [8, 8, 8] and ps.model_name == "smollm2-relu"
    rec = json.loads((out / "predictors_train.json").read_text())
    assert rec["summary"]["kjv"]["recall"] > 0.5 and 0 < rec["summary"]["kjv"]["predicted_active_fraction"] <= 1
    assert all(L["recall"] >= 0.94 for L in rec["layers"])  # calibrated to 0.95 on its calibration windows


def _continuation_setup(tmp_path, monkeypatch, seed: int):
    """A tiny base model saved in tmp_path/base, tiny streams, and the run's calibration, frontier and probe shrunk."""
    from sparsetrain import gated, job

    base = save_tiny(tiny_llama(seed=seed, d_ffn=128), tmp_path / "base")
    _tiny_streams(tmp_path, monkeypatch)
    monkeypatch.setattr(gated, "CALIB_TOKENS", 1024)
    monkeypatch.setattr(job, "CALIB_TOKENS", 1024)
    monkeypatch.setattr(job, "FRONTIER", (0.8,))
    monkeypatch.setattr(job, "PROBE_STEPS", 5)
    probe = job.run_probe
    monkeypatch.setattr(job, "run_probe", lambda t, m: probe(t, m, train_tokens=1024, held_tokens=512))
    return base


def test_continuation_with_the_act_rule_on_cpu(tmp_path, monkeypatch):
    """``gated run --keep 0 --rule act``: a plain continuation (no gates) whose thresholds compare |act(gate x)|; the
    exported artifact carries the rule, loads into the Hugging Face model with it, and the predictor job reads it."""
    from llmflash.sparsity import model_rule
    from sparsetrain import gated, predictors_job

    base = _continuation_setup(tmp_path, monkeypatch, seed=4)
    out = tmp_path / "out"
    gated.main(["run", "--base", str(base), "--device", "cpu", "--no-compile", "--total-steps", "4", "--tokens-per-step",
                "256", "--micro-batch-seqs", "2", "--seq-len", "64", "--eval-every", "2", "--eval-tokens", "512",
                "--frontier-tokens", "512", "--reserve-s", "0", "--lora-rank", "4", "--sample-budget-s", "0",
                "--keep", "0", "--rule", "act", "--sparsity-start", "0.5", "--target-sparsity", "0.8",
                "--ramp-end", "0.5", "--work", str(tmp_path / "w"), "--out", str(out), "--artifact", "none"])
    cfg, _ = read_artifact(out)
    assert cfg["rule_on"] == "act" and "gate" not in cfg
    final = json.loads((tmp_path / "w" / "gated" / "final.json").read_text())
    assert final["record"]["rule_on"] == "act" and final["frontier"] and final["probe"]["summary"]
    assert 1 - final["eval"]["student"]["512"]["kjv"]["active_fraction"] == pytest.approx(0.8, abs=0.1)
    hf = apply_artifact(tiny_llama(seed=4, d_ffn=128), out)
    assert model_rule(hf.config).on_act
    # ``gated frontier``: the artifact as it ships (its own thresholds), then the recalibrated targets
    fout = tmp_path / "frontier"
    gated.main(["frontier", "--base", str(base), "--device", "cpu", "--seq-len", "64", "--micro-batch-seqs", "2",
                "--eval-tokens", "512", "--eval-batch-tokens", "128", "--work", str(tmp_path / "w"), "--out", str(fout),
                "--artifact", str(out)])
    rows = json.loads((fout / "frontier.json").read_text())["rows"]
    shipped = [r for r in rows if r["target_sparsity"] == "shipped"]
    assert {(r["seq_len"], r["corpus"]) for r in shipped} == {(r["seq_len"], r["corpus"]) for r in rows
                                                              if r["target_sparsity"] == 0.8}
    ship_kjv = next(r for r in shipped if r["seq_len"] == 512 and r["corpus"] == "kjv")
    run_kjv = final["eval"]["student"]["512"]["kjv"]
    assert ship_kjv["zeros"] == pytest.approx(1 - run_kjv["active_fraction"], abs=1e-6)  # the run's own evaluation
    pout = tmp_path / "pred"
    predictors_job.main(["--work", str(tmp_path / "w"), "--out", str(pout), "--base", str(base), "--artifact", str(out),
                         "--device", "cpu", "--tokens", "2048", "--calib-tokens", "1024", "--eval-tokens", "512",
                         "--seq-len", "64", "--rank", "8", "--rank-last", "8", "--epochs", "1", "--batch", "256"])
    assert json.loads((pout / "predictors_train.json").read_text())["summary"]["kjv"]["recall"] > 0.5


def test_continuation_as_the_relu_arm_on_cpu(tmp_path, monkeypatch):
    """``gated run --keep 0 --arm relu``: a SiLU start continued as the ReLU arm (SiLU blends into the shifted ReLU,
    L1 pressure on the ramp); the exported artifact is a ReLU model that the Hugging Face model loads with its act_bias."""
    from sparsetrain import gated

    base = _continuation_setup(tmp_path, monkeypatch, seed=5)
    out = tmp_path / "out"
    gated.main(["run", "--base", str(base), "--device", "cpu", "--no-compile", "--total-steps", "4", "--tokens-per-step",
                "256", "--micro-batch-seqs", "2", "--seq-len", "64", "--eval-every", "0", "--eval-tokens", "512",
                "--frontier-tokens", "1024", "--reserve-s", "0", "--lora-rank", "4", "--sample-budget-s", "0",
                "--keep", "0", "--arm", "relu", "--anneal-frac", "0.5", "--l1-final", "0.1", "--sparsity-start", "0.5",
                "--target-sparsity", "0.8", "--ramp-end", "0.5", "--lr-ffn", "1e-3", "--work", str(tmp_path / "w"),
                "--out", str(out), "--artifact", "none"])
    cfg, tensors = read_artifact(out)
    assert cfg["activation"] == "relu" and cfg["training"]["recipe"]["arm"] == "relu"
    assert any(k.endswith("mlp.act_bias") for k in tensors)  # the learned shifts travel with the artifact
    with (tmp_path / "w" / "gated" / "curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 4 and float(curve[-1]["l1_weight"]) > 0
    final = json.loads((tmp_path / "w" / "gated" / "final.json").read_text())
    assert final["record"]["tokens_per_s_median"] > 0 and final["probe"]["summary"]
    # the frontier scores more tokens than the run's evaluation: the original is scored on the same ones
    assert {r["tokens"] for r in final["frontier"] if r["seq_len"] == 512} == {2 * 511}
    hf = apply_artifact(tiny_llama(seed=5, d_ffn=128), out)
    assert hf.config.hidden_act == "relu"
    assert any(float(m.mlp.act_bias.abs().max()) > 0 for m in hf.model.layers)


def test_lora_reencoding_keeps_the_applied_model(tmp_path):
    """``ship.truncate_lora``: int8 factors at the full rank reproduce each attention delta within 2%, a lower fp16 rank
    within its SVD error; the re-encoded artifact applies to the base model like the original (int8 factors decoded
    with their scales) and is smaller."""
    from llmflash.sparse_model import decode_deltas, encode_deltas, lora_factors, write_artifact
    from sparsetrain.ship import truncate_lora

    base = tiny_llama(seed=6, d_ffn=128)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(0)
    lora = {}
    for k, v in state.items():
        if ".self_attn." in k and k.endswith("_proj.weight"):
            lora[k] = (0.05 * torch.randn(12, v.shape[1]), 0.05 * torch.randn(v.shape[0], 12))
    tensors = encode_deltas(state, {k: v.clone() for k, v in state.items()}, lora, 3)
    cfg = {"activation": "silu", "thresholds": [0.0] * 3, "n_layers": 3, "target_sparsity": 0.0}
    sizes, applied = {}, {}
    for name, (rank, int8) in {"fp16": (0, False), "int8": (0, True), "r6": (6, False)}.items():
        art = write_artifact(tmp_path / name, tensors, cfg, 3, shards=1)
        if rank or int8:
            rep = truncate_lora(art, rank, int8)
            assert rep["rank"] == (rank or 12) and rep["int8"] == int8
        _, t = read_artifact(art)
        sizes[name] = sum(v.numel() * v.element_size() for v in t.values())
        applied[name] = decode_deltas(state, t)
        if int8:
            key = next(k for k in t if k.endswith(".lora_A"))
            assert t[key].dtype == torch.int8 and lora_factors(t, key[: -len(".lora_A")])[0].dtype == torch.float32
    for k, (a, b) in lora.items():
        delta = (b @ a).norm()
        assert (applied["int8"][k] - applied["fp16"][k]).norm() / delta < 0.02
        assert (applied["r6"][k] - applied["fp16"][k]).norm() / delta < 0.9
    assert sizes["int8"] < sizes["fp16"] and sizes["r6"] < sizes["fp16"]
    model = apply_artifact(tiny_llama(seed=6, d_ffn=128), tmp_path / "int8")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(model.state_dict()[key], applied["int8"][key], atol=1e-6)


def test_allocate_on_cpu_reaches_its_targets(tmp_path, monkeypatch):
    """The per-layer allocation job on a tiny model: the greedy path raises the mean sparsity by one step per row
    (one layer at a time), each target is evaluated with uniform and greedy thresholds on the held-out stream."""
    from sparsetrain import allocate, job

    base = save_tiny(tiny_llama(seed=5, d_ffn=128), tmp_path / "base")
    _tiny_streams(tmp_path, monkeypatch)
    monkeypatch.setattr(job, "CALIB_TOKENS", 1024)
    allocate.main(["--base", str(base), "--artifact", "none", "--device", "cpu", "--no-compile", "--seq-len", "64",
                   "--calib-tokens", "512", "--start", "0.5", "--step", "0.1", "--targets", "0.6,0.7",
                   "--eval-tokens", "512", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    rec = json.loads((tmp_path / "out" / "allocate.json").read_text())
    path = rec["path"]
    assert path[0]["mean"] == pytest.approx(0.5) and path[-1]["mean"] >= 0.7 - 1e-9
    for a, b in zip(path, path[1:]):
        assert b["mean"] == pytest.approx(a["mean"] + 0.1 / 3)
        assert sum(x != y for x, y in zip(a["sparsity"], b["sparsity"])) == 1
    assert {(p["target"], p["allocation"]) for p in rec["points"]} == {(t, h) for t in (0.6, 0.7) for h in ("uniform", "greedy")}
    assert {r["corpus"] for r in rec["rows"]} == {"kjv"} and {r["seq_len"] for r in rec["rows"]} == {512, 2048}
    assert all(r["ppl_ratio"] > 0 and 0 <= r["zeros"] <= 1 for r in rec["rows"])

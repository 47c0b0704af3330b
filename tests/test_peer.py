"""The peer baseline's pieces that run without llama.cpp (issue 13, item 5): the Llama-geometry scale model written as a
GGUF (read back by the ``gguf`` package) and as a flash directory (run by the engine with the trace source), the
experiment's skip path, and the page-cache drop's failure path."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmflash.engine import Engine, EngineConfig
from llmflash.flashdir import open_flash_dir
from research import llama_scale

EXP = Path(__file__).resolve().parent.parent / "experiments"


def test_gguf_writer_gives_a_file_gguf_reads_with_the_geometry(tmp_path):
    import gguf

    g = llama_scale.TINY
    path = llama_scale.write_gguf(tmp_path / "m.gguf", g)
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(g.matrices()) + len(g.norms())
    for name, _, (rows, cols) in g.matrices():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert [int(x) for x in t.shape] == [cols, rows]  # GGUF lists the row length first
        assert t.n_bytes == rows * cols // 32 * 18
    for name, _ in g.norms():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.all(np.asarray(tensors[name].data) == 1.0)
    field = r.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert int(r.fields["llama.feed_forward_length"].parts[-1][0]) == g.d_ffn
    assert int(r.fields["llama.block_count"].parts[-1][0]) == g.n_layers
    assert sum(t.n_bytes for t in r.tensors) == g.gguf_bytes()
    # the Q4_0 scales give weights of about the intended spread
    blocks = np.asarray(tensors["blk.0.ffn_up.weight"].data).reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    assert np.allclose(scale, llama_scale.WEIGHT_STD / 4.61, rtol=1e-2)
    assert llama_scale.write_gguf(path, g) == path  # reused, not rewritten


def test_flash_writer_gives_a_directory_the_engine_runs(tmp_path):
    g = llama_scale.TINY
    d = llama_scale.write_flash(tmp_path / "flash", g)
    fd = open_flash_dir(d)
    fd.verify_ffn(progress=False)
    lay = fd.layout
    assert (lay.n_layers, lay.d_model, lay.d_ffn, lay.dtype, lay.group_size) == (2, 64, 160, "int4", 32)
    assert fd.manifest.quantization.resident == "int8"
    assert fd.model_bytes == fd.manifest.bytes.model
    prov = llama_scale.trace_provider(lay.n_layers, lay.d_ffn, lay.d_model)
    eng = Engine(str(d), EngineConfig(mode="predictor", dram_budget=3.0, compute_threads=1), provider=prov)
    res = eng.generate(torch.tensor([1]), max_new_tokens=3)
    assert len(res.tokens) == 3 and all(0 <= t < g.vocab for t in res.tokens)
    assert res.summary()["bytes_read_per_token"] > 0


def test_the_full_geometry_counts(tmp_path):
    g = llama_scale.LLAMA2_7B
    assert 3.7e9 < g.gguf_bytes() < 3.9e9  # Llama-2-7B in Q4_0: about 3.8 GB
    assert g.with_layers(8).n_layers == 8 and g.with_layers(8).name != g.name
    assert g.layout().segments[0].stride_bytes == 7168  # 3 parts of 2048 code + 256 scale bytes, 512-aligned


def _peer(monkeypatch):
    monkeypatch.syspath_prepend(str(EXP))
    return importlib.import_module("peer_llamacpp")


def test_experiment_skips_in_one_line_without_llama_cpp(monkeypatch, capsys, tmp_path):
    peer = _peer(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert peer.main(["--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("peer_llamacpp: skipped: llama_cpp is not installed") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_experiment_skips_in_one_line_without_cgroups(monkeypatch, capsys, tmp_path):
    peer = _peer(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else real(name, *a))
    monkeypatch.setattr(peer.memlimit, "CG_ROOT", tmp_path / "no-cgroup")
    assert peer.main(["--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("peer_llamacpp: skipped:") and "does not exist" in err and "\n" not in err


def test_drop_page_cache_says_why_it_could_not(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXP))
    memlimit = importlib.import_module("memlimit")
    monkeypatch.setattr(memlimit, "DROP_CACHES", tmp_path / "missing" / "drop_caches")
    why = memlimit.drop_page_cache()
    assert why is not None and "cannot drop the page cache" in why


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_shared_mapped_lists_paths(monkeypatch):
    monkeypatch.syspath_prepend(str(EXP))
    memlimit = importlib.import_module("memlimit")
    found = memlimit.shared_mapped(("libtorch_cpu.so",))  # this test process has torch loaded
    assert any(Path(p).name == "libtorch_cpu.so" for p in found)

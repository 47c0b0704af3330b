"""The typed manifest and the one writer of the flash format."""

from __future__ import annotations

import json

import pytest

from llmflash.convert import convert
from llmflash.errors import FlashFileError
from llmflash.flashdir import open_flash_dir, write_flash_dir
from llmflash.layout import FlashLayout
from llmflash.manifest import MANIFEST, Manifest, ModelInfo

from tiny import save_tiny, tiny_opt


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    save_tiny(tiny_opt(d_model=64, d_ffn=256), root / "m")
    return convert(str(root / "m"), root / "flash", progress=False, calibration_tokens=0)


def test_manifest_round_trips_the_file_exactly(flash):
    raw = json.loads((flash / MANIFEST).read_text())
    m = Manifest.from_json(raw)
    assert json.loads(json.dumps(m.to_json())) == raw
    assert m.model.name == "m" and m.layout.n_layers == 3 and not m.gated and m.activation == "relu"
    assert m.bytes.model == m.bytes.resident_tensors + m.bytes.ffn_payload
    assert open_flash_dir(flash).manifest == m


@pytest.mark.parametrize("path", [("bytes", "model"), ("model", "name"), ("ffn", "layout"), ("checksums", "ffn.bin"),
                                  ("dtype",), ("config",)])
def test_a_missing_key_is_one_line_naming_it(flash, path):
    raw = json.loads((flash / MANIFEST).read_text())
    d = raw
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]
    with pytest.raises(FlashFileError) as err:
        Manifest.from_json(raw, "x/manifest.json")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("x/manifest.json") and "/".join(path) in msg


def test_open_flash_dir_reports_a_broken_manifest(flash, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((flash / MANIFEST).read_text())
    raw["bytes"]["model"] = "many"
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(FlashFileError, match="'bytes/model' is not an integer"):
        open_flash_dir(bad)


def test_writer_checks_order_and_completeness(tmp_path):
    lay = FlashLayout.build(2, 16, 8, False, "float32", True)
    seg = lay.segments[0]
    rows = bytes(seg.stride_bytes * lay.d_ffn)
    with pytest.raises(ValueError, match="out of order"):
        with write_flash_dir(tmp_path / "a", lay) as w:
            w.write_ffn(1, 0, rows)
    with pytest.raises(ValueError, match="incomplete"):
        with write_flash_dir(tmp_path / "b", lay) as w:
            w.write_ffn(0, 0, rows)
            w.finish(ModelInfo("x", "x", "opt"), {"model_type": "opt"}, "float32", False, "relu")
    with pytest.raises(ValueError, match="without finish"):
        with write_flash_dir(tmp_path / "c", lay) as w:
            pass
    assert not any(tmp_path.iterdir())  # nothing half-written is left behind


def test_thresholds_round_trip_and_old_directories_still_open(tmp_path):
    """convert stores the calibrated thresholds in the manifest; a directory without them opens (and a
    ``thresholds.json`` sidecar of an older directory is still read)."""
    import shutil

    from llmflash.manifest import CalibratedThresholds

    save_tiny(tiny_opt(d_model=64, d_ffn=256), tmp_path / "m")
    flash = convert(str(tmp_path / "m"), tmp_path / "flash", progress=False, calibration_tokens=64)
    raw = json.loads((flash / MANIFEST).read_text())
    m = Manifest.from_json(raw)
    assert isinstance(m.thresholds, CalibratedThresholds)
    assert m.thresholds.source == "wiki:train" and m.thresholds.tokens == 64
    assert set(m.thresholds.by_sparsity) == {"0.5", "0.6", "0.7", "0.8", "0.9", "0.95"}
    assert all(len(v) == 3 for v in m.thresholds.by_sparsity.values())
    assert json.loads(json.dumps(m.to_json())) == raw
    assert open_flash_dir(flash).thresholds() == m.thresholds.table()

    old = tmp_path / "old"
    shutil.copytree(flash, old)
    del raw["thresholds"]
    (old / MANIFEST).write_text(json.dumps(raw))
    assert open_flash_dir(old).manifest.thresholds is None and open_flash_dir(old).thresholds() is None
    (old / "thresholds.json").write_text(json.dumps(m.thresholds.table()))
    assert open_flash_dir(old).thresholds() == m.thresholds.table()

    raw["thresholds"] = {**m.thresholds.to_json(), "by_sparsity": {"0.8": [0.1]}}
    (old / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(FlashFileError, match="thresholds.by_sparsity"):
        open_flash_dir(old)

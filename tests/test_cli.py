"""The command line: contract JSON keys, defaults, and one clear line + non-zero exit for every kind of bad input."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from llmflash.cli import main

from tiny import save_tiny, tiny_llama, tiny_opt

BIG = "1"  # the whole model: the tiny model below fits every mode in it
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(tiny_llama(relu=True, d_model=256, d_ffn=384), root / "llama")
    save_tiny(tiny_opt(d_model=128, d_ffn=256), root / "opt")
    assert main(["convert", str(root / "llama"), "--out", str(root / "llama-flash"), "--calibration-tokens", "0"]) == 0
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog.\n\n" * 40)
    return root


def _one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("llmflash ")
    for n in needles:
        assert n in last, last
    return last


def test_generate_json_has_contract_keys(models, tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["generate", str(models / "llama-flash"), "--prompt", "Hello", "--max-new-tokens", "6", "--mode", "oracle",
               "--dram-budget", BIG, "--ignore-eos", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    for k in ("mode", "model", "tokens", "text", "dram_bytes", "model_bytes", "prefill_ms", "summary", "per_token"):
        assert k in d
    for k in ("ms_per_token", "io_ms", "mem_ms", "compute_ms", "bytes_read_per_token", "reads_per_token", "mean_read_bytes"):
        assert k in d["summary"]
    assert len(d["tokens"]) == 6 and len(d["per_token"]) == 5
    for k in ("io_ms", "mem_ms", "compute_ms", "total_ms", "bytes_read", "reads"):
        assert k in d["per_token"][0]


def test_generate_cache_policy_reports_the_cache_counters(models, tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["generate", str(models / "llama-flash"), "--prompt", "Hello", "--max-new-tokens", "6", "--mode", "oracle",
               "--dram-budget", BIG, "--ignore-eos", "--cache-policy", "lru", "--json", str(out)])
    assert rc == 0 and "hits" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["config"]["cache_policy"] == "lru"
    for k in ("cache_hits_per_token", "cache_misses_per_token", "cache_evictions_per_token", "cache_hit_rate"):
        assert k in d["summary"]
    assert all(t["cache_hits"] + t["cache_misses"] > 0 for t in d["per_token"])


def test_eval_ppl_json_on_dir_and_model(models, tmp_path, capsys):
    for target in (models / "llama-flash", models / "llama"):
        out = tmp_path / "p.json"
        assert main(["eval-ppl", str(target), "--text-file", str(models / "text.txt"), "--max-tokens", "300",
                     "--seq-len", "64", "--json", str(out)]) == 0
        d = json.loads(out.read_text())
        assert d["ppl"] > 1 and d["tokens"] > 200 and 0 < d["ffn_active_fraction"] < 1
        assert len(d["per_layer_active_fraction"]) == 3


def test_corrupted_flash_file_names_the_file(models, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(models / "llama-flash", bad)
    (bad / ".verified").unlink(missing_ok=True)
    with open(bad / "ffn.bin", "r+b") as f:
        f.seek(4096 * 5 + 100)
        f.write(b"\x13\x37" * 8)
    rc = main(["generate", str(bad), "--prompt", "Hi", "--max-new-tokens", "2", "--dram-budget", BIG])
    _one_line_error(capsys, rc, "checksum", "ffn.bin")


def test_corrupted_resident_file_is_caught(models, tmp_path, capsys):
    bad = tmp_path / "bad2"
    shutil.copytree(models / "llama-flash", bad)
    with open(bad / "resident.safetensors", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\x00\xff" * 16)
    rc = main(["generate", str(bad), "--prompt", "Hi", "--max-new-tokens", "2", "--dram-budget", BIG])
    _one_line_error(capsys, rc, "checksum", "resident.safetensors")


def test_flash_files_from_another_model(models, tmp_path, capsys):
    other = tmp_path / "opt-flash"
    assert main(["convert", str(models / "opt"), "--out", str(other), "--calibration-tokens", "0"]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(models / "llama-flash", mixed)
    shutil.copy(other / "ffn.bin", mixed / "ffn.bin")
    rc = main(["generate", str(mixed), "--prompt", "Hi", "--max-new-tokens", "2", "--dram-budget", BIG])
    _one_line_error(capsys, rc, "ffn.bin", "another model")
    # converting another model into an existing flash directory is refused without --force
    rc = main(["convert", str(models / "opt"), "--out", str(models / "llama-flash"), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "--force")
    assert json.loads((models / "llama-flash" / "manifest.json").read_text())["model"]["name"] == "llama"


def test_budget_below_minimum_states_the_minimum(models, capsys):
    rc = main(["generate", str(models / "llama-flash"), "--prompt", "Hi", "--mode", "oracle", "--dram-budget", "0.1"])
    _one_line_error(capsys, rc, "below the minimum")


def test_missing_or_garbage_model(tmp_path, capsys):
    rc = main(["convert", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o"), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "does not exist")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 100)
    rc = main(["convert", str(junk), "--out", str(tmp_path / "o"), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "cannot load model")
    rc = main(["convert", "no-such-alias", "--out", str(tmp_path / "o"), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "unknown model")
    rc = main(["generate", str(tmp_path / "missing-dir"), "--prompt", "Hi"])
    _one_line_error(capsys, rc, "does not exist")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        yield Path("/sys/llmflash-read-only")  # sysfs refuses new entries
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_output_location(models, read_only_dir, capsys):
    rc = main(["convert", str(models / "llama"), "--out", str(read_only_dir / "flash"), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "cannot write")
    rc = main(["generate", str(models / "llama-flash"), "--prompt", "Hi", "--max-new-tokens", "2", "--dram-budget", BIG,
               "--json", str(read_only_dir / "out.json")])
    _one_line_error(capsys, rc, "cannot write")


def test_interrupted_convert_leaves_nothing_that_looks_valid(models, tmp_path, monkeypatch, capsys):
    import llmflash.flashdir as fdmod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fdmod, "_file_crc", boom)  # dies after ffn.bin is written, before the manifest
    rc = main(["convert", str(models / "llama"), "--out", str(tmp_path / "half"), "--calibration-tokens", "0"])
    assert rc == 130
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _usage_error(capsys, argv: list[str]) -> str:
    """A bad value on the command line: argparse's error as one line (no usage block), exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_bad_numbers_are_one_line(models, capsys):
    gen = ["generate", str(models / "llama-flash"), "--prompt", "Hi"]
    assert _usage_error(capsys, gen + ["--dram-budget", "abc"]) == \
        "llmflash generate: error: argument --dram-budget: invalid float value: 'abc'"
    for bad in ("2", "0", "-0.5"):
        err = _usage_error(capsys, gen + ["--dram-budget", bad])
        assert err.startswith("llmflash generate: error: argument --dram-budget: ") and "(0, 1]" in err
    assert "argument --max-new-tokens" in _usage_error(capsys, gen + ["--max-new-tokens", "many"])
    assert "argument --dram-budget" in _usage_error(capsys, ["demo", "--dram-budget", "1.5"])
    assert "invalid choice" in _usage_error(capsys, gen + ["--mode", "fast"])
    assert "--prompt" in _usage_error(capsys, ["generate", str(models / "llama-flash")])
    assert _usage_error(capsys, ["no-such-command"]).startswith("llmflash: error: ")


@pytest.mark.parametrize("key", [("bytes",), ("model", "source"), ("ffn", "layout", "d_ffn"), ("checksums", "ffn.bin"),
                                 ("config", "hidden_size")])
def test_manifest_missing_a_key(models, tmp_path, capsys, key):
    bad = tmp_path / "bad"
    shutil.copytree(models / "llama-flash", bad)
    m = json.loads((bad / "manifest.json").read_text())
    d = m
    for k in key[:-1]:
        d = d[k]
    del d[key[-1]]
    (bad / "manifest.json").write_text(json.dumps(m))
    rc = main(["generate", str(bad), "--prompt", "Hi", "--max-new-tokens", "2"])
    _one_line_error(capsys, rc, "manifest")


def test_convert_out_naming_a_file(models, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("not a directory")
    rc = main(["convert", str(models / "llama"), "--out", str(f), "--calibration-tokens", "0"])
    _one_line_error(capsys, rc, "--out", "not a directory")
    assert f.read_text() == "not a directory"


def test_ctrl_c_while_importing(monkeypatch, capsys):
    import llmflash.cli as cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)  # build_parser imports the command modules
    assert main(["generate", "DIR", "--prompt", "Hi"]) == 130
    assert capsys.readouterr().err == "llmflash generate: interrupted\n"


@pytest.mark.parametrize("library", ["numpy", "libtorch"])
def test_ctrl_c_in_the_first_second_of_a_process(models, library):
    """A real SIGINT while the first imports run (as soon as the library is mapped: its import is under way)."""
    proc = subprocess.Popen([sys.executable, "-m", "llmflash.cli", "generate", str(models / "llama-flash"), "--prompt",
                             "Hi"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if library in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"the command finished before the interrupt: {err[-300:]!r}")
    assert proc.returncode == 130, err
    assert err == "llmflash generate: interrupted\n"


def test_interrupted_is_not_glued_to_a_progress_bar(models, tmp_path, monkeypatch, capsys):
    from tqdm import tqdm

    import llmflash.convert as conv

    def slow_load(*a, **k):
        bar = tqdm(total=10, desc="loading", disable=False, file=sys.stderr, mininterval=0)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "load_model", slow_load)
    assert main(["convert", str(models / "llama"), "--out", str(tmp_path / "o"), "--calibration-tokens", "0"]) == 130
    err = capsys.readouterr().err
    assert "loading" in err and err.endswith("\nllmflash convert: interrupted\n"), repr(err)


def test_missing_hub_text_fails_fast(models, capsys):
    t0 = time.monotonic()
    rc = main(["eval-ppl", str(models / "llama-flash"), "--text-file", "hf:llmflash-no-such-org/no-such-dataset"])
    _one_line_error(capsys, rc, "cannot load dataset")
    assert time.monotonic() - t0 < 30


def test_exact_token_count_and_no_dependency_warnings(models, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["generate", str(models / "llama-flash"), "--prompt", "Hello", "--max-new-tokens", "7", "--mode",
                   "oracle", "--dram-budget", BIG, "--ignore-eos"])
    assert rc == 0
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("[oracle] 7 tokens,"), summary


def test_generate_defaults_to_the_best_mode(models, tmp_path, monkeypatch, capsys):
    """A plain directory: dense. A converted alias (its name recorded in the manifest) with committed default
    predictors: predictor mode with them, no flag needed."""
    import llmflash.models as models_mod

    gen = ["--prompt", "Hello", "--max-new-tokens", "3", "--ignore-eos"]
    assert main(["generate", str(models / "llama-flash"), *gen]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[dense] 3 tokens")

    alias = tmp_path / "alias-flash"
    shutil.copytree(models / "llama-flash", alias)
    m = json.loads((alias / "manifest.json").read_text())
    m["model"]["name"] = m["model"]["source"] = "smollm2-relu"  # what `convert smollm2-relu` records
    (alias / "manifest.json").write_text(json.dumps(m))
    root = tmp_path / "install"
    preds = root / "predictors" / "artifacts" / "smollm2-relu"
    assert main(["collect", str(alias), "--text-file", str(models / "text.txt"), "--out", str(tmp_path / "act"),
                 "--max-tokens", "512", "--seq-len", "64"]) == 0
    assert main(["train-predictors", str(tmp_path / "act"), "--out", str(preds), "--rank", "8", "--rank-last", "8",
                 "--epochs", "1"]) == 0
    monkeypatch.setattr(models_mod, "package_dir", lambda: root / "llmflash")
    assert models_mod.default_predictors("smollm2-relu") == preds
    capsys.readouterr()
    out = tmp_path / "g.json"
    assert main(["generate", str(alias), *gen, "--dram-budget", BIG, "--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("[predictor] 3 tokens")
    assert json.loads(out.read_text())["mode"] == "predictor"
    assert main(["eval-ppl", str(alias), "--text-file", str(models / "text.txt"), "--max-tokens", "200", "--seq-len", "64",
                 "--mode", "predictor"]) == 0


def test_every_default_is_in_help():
    from llmflash.cli import build_parser

    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            d = action.default
            if not action.option_strings or d in (None, False, "") or d is argparse.SUPPRESS:
                continue
            assert f"default: {d}" in text or "default" in (action.help or "").lower(), (name, action.option_strings)


def _subparsers(parser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _doc_sections() -> dict[str, str]:
    """docs/cli.md: the text of each ``## COMMAND`` section."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    parts = re.split(r"^## (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_docs_cli_md_matches_help():
    """Every command of ``--help`` has its section in docs/cli.md, whose flag table lists exactly the flags of the
    command's ``--help`` (and a default written as one value is the real default); the synopsis names no other flag."""
    from llmflash.cli import build_parser

    sections = _doc_sections()
    commands = _subparsers(build_parser())
    assert set(sections) == set(commands)
    for name, sub in commands.items():
        help_text = sub.format_help()
        real = {o: a for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        rows = re.findall(r"^\| `(--[a-z0-9-]+)[^`]*` \|([^|]*)\|", sections[name], flags=re.M)
        documented = {flag for flag, _ in rows}
        assert documented == set(real), (name, "undocumented:", set(real) - documented, "not in --help:", documented - set(real))
        assert all(re.search(rf"{flag}\b", help_text) for flag in documented)
        for flag, default in rows:
            one = re.fullmatch(r"`([^`]+)`", default.strip())
            if one:
                assert one.group(1) == str(real[flag].default), (name, flag, default)
        synopsis = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", sections[name].strip().split("\n\n")[0])
        assert set(synopsis) - {"--help"} <= set(real), (name, set(synopsis) - set(real))

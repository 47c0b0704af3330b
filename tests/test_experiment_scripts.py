"""The experiment scripts' first smoke tier: every script imports, every name it (or the library) imports from this
repository exists, function-level imports included, and its command line parses (``--help``). Running each one end
to end in seconds is the second tier, below (issue 14): on tiny models (a tiny ReLU llama, as a flash directory and
as a Hugging Face directory, a tiny SiLU llama, predictors trained on the first), a GPU script on its CPU path, report
scripts on copies of the committed results they report on; the few that cannot run here say why."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"
LIBRARIES = ("common", "engine_runs", "sampled")  # the scripts' shared glue, not scripts
SCRIPTS = sorted(p.stem for p in EXP.glob("*.py") if p.stem not in LIBRARIES)
OURS = ("llmflash", "predictors", "sparsetrain", "research")


def _from_imports(path: Path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] in OURS:
            yield node.lineno, base, [a.name for a in node.names]


def test_every_imported_name_exists():
    missing = []
    files = [p for pkg in OURS + ("experiments",) for p in sorted((ROOT / pkg).rglob("*.py"))]
    for path in files:
        for line, base, names in _from_imports(path):
            mod = importlib.import_module(base)
            for name in names:
                got = getattr(mod, name, None) if name != "*" else mod
                if got is None:
                    try:
                        got = importlib.import_module(f"{base}.{name}")
                    except ImportError:
                        missing.append(f"{path.relative_to(ROOT)}:{line}: {base}.{name}")
                        continue
                where = getattr(got, "__file__", None) or getattr(mod, "__file__", None)
                if where and ROOT not in Path(where).resolve().parents:  # e.g. a stale module of another checkout
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {base}.{name} resolves outside the repository")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_parses_its_command_line(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXP))
    module = importlib.import_module(name)
    assert callable(module.main)
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    if isinstance(done.value.code, str):  # a script with its own argv handling exits with its usage text
        assert "experiments/" in done.value.code
    else:
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_scripts_use_no_private_attribute_of_the_library():
    """Experiments use the public API and the engine's hooks (``llmflash.hooks``), not its internals."""
    found = []
    for path in sorted(EXP.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not found, "\n".join(found)



def test_scripts_patch_no_library_object():
    """No experiment assigns to an attribute of what it imported from the project's packages (monkey-patching):
    they configure through arguments and observe through hooks."""
    project = ("llmflash", "research", "predictors", "sparsetrain")
    found = []
    for path in sorted(EXP.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in project:
                imported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in project}
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                base = t
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in imported:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(t)} = ...")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------ second tier: end to end, tiny model

# Every script runs end to end here (``LLMFLASH_SMOKE=1``: the smallest settings that pass through every stage) on
# tiny inputs: {flash} a tiny ReLU llama converted to a flash directory, {relu} the same model's Hugging Face directory,
# {silu} a tiny SiLU llama (an "original" beside it), {pred} predictors trained on {flash}; report scripts read copies
# of committed results that ``inputs`` lays out under {tmp}/in. Each must write its outputs into {out}.
STANDARD = ("--quick", "--models", "real", "--model", "{flash}", "--out", "{out}")  # common.parser's scripts
ORIGINAL_SPARSE = ("--original", "{silu}", "--sparse", "{relu}")
FIXTURES = {"flash": "tiny_flash", "relu": "tiny_relu", "silu": "tiny_silu", "pred": "tiny_predictors"}


@dataclass(frozen=True)
class Run:
    """One script's end-to-end run: its command line(s) and what it must write into {out} (or print)."""

    outputs: tuple[str, ...]
    argv: tuple[str, ...] = STANDARD
    then: tuple[tuple[str, ...], ...] = ()  # further command lines, run in order after ``argv``
    inputs: Optional[Callable[[Path], None]] = None  # lays out its inputs under tmp_path first
    needs: Optional[Callable[[], Optional[str]]] = None  # why it cannot run here, None when it can
    prints: str = ""  # what each command line must print
    same: tuple[tuple[str, str], ...] = ()  # (output, committed file under results/) that must be equal


def committed(*parts: str) -> Callable[[Path], None]:
    """Copies of committed results (paths under results/) in {tmp}/in: the scripts never see results/ itself."""

    def copy(tmp: Path) -> None:
        for part in parts:
            src, dst = ROOT / "results" / part, tmp / "in" / part
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)

    return copy


def campaign_tarballs(tmp: Path) -> None:
    """The extracted tarballs of results/relufy/campaign's two device calls, rebuilt from what its report kept."""
    done = ROOT / "results" / "relufy" / "campaign"
    arms = json.loads((done / "arms.json").read_text())
    final = json.loads((done / "final.json").read_text())
    ab, fin = tmp / "in" / "ab", tmp / "in" / "final"
    for arm, record in arms.items():
        (ab / arm).mkdir(parents=True)
        (ab / arm / "record.json").write_text(json.dumps({"calls": [record]}))
        shutil.copy(done / f"curve_{arm}.csv", ab / arm / "curve.csv")
    for name in ("teacher_eval.json", "generated.json"):
        shutil.copy(done / name, ab / name)
    winner = final["record"]["arm"]
    (fin / winner).mkdir(parents=True)
    (fin / "final.json").write_text(json.dumps(final))
    shutil.copy(done / f"curve_{winner}_continued.csv", fin / winner / "curve.csv")


def tiny_task(tmp: Path) -> None:
    """A BIG-bench-style task where research.zeroshot keeps extracted tasks (the test's cache: no download)."""
    task = {"name": "tiny_task", "examples": [
        {"input": f"What comes after {i}?", "target_scores": {str(i + 1): 1, str(i + 2): 0, "x": 0}} for i in range(6)]}
    path = tmp / "cache" / "bigbench" / "tasks" / "tiny_task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))


def peer_runs(tmp: Path) -> None:
    """The runs peer_llamacpp reports on, in {out}: the whole experiment on a tiny Llama geometry where llama.cpp (the
    optional extra ``peer``) and memory cgroups are there, else copies of the committed runs (results/peer)."""
    peer = importlib.import_module("peer_llamacpp")
    out = tmp / "out"
    if peer.skip_reason() is None:
        assert peer.main(["--models", "scale", "--tiny", "--fractions", "1.0", "--reps", "1", "--scale-tokens", "3",
                          "--scale-warmup", "0", "--no-private-torch", "--no-breakdown", "--timeout", "120",
                          "--out", str(out)]) == 0
    else:
        out.mkdir()
        for name in ("peer_setup.json", "peer_runs.jsonl"):
            shutil.copy(ROOT / "results" / "peer" / name, out / name)


def cgroups() -> Optional[str]:
    return importlib.import_module("memlimit").available()


END_TO_END = {
    "ablation": Run(("ablation.json", "table2.csv", "config.json")),
    "active_fraction": Run(("active_fraction.json", "active_fraction.csv", "active_fraction.png")),
    "cache_policies": Run(("cache_policies.json", "cache_policies.csv", "cache_policies.png"),
                          STANDARD + ("--repeats", "1", "--tokens", "2", "--hot-tokens", "8")),
    "cache_replay": Run(("cache_replay.json", "cache_replay.csv", "cache_replay.png", "read_bound.png"),
                        STANDARD + ("--tokens", "6", "--lines", "1,2")),
    "cgroup_budget": Run(("cgroup_budget.json", "config.json"), STANDARD + ("--tokens", "2"), needs=cgroups),
    "coactivation": Run(("coactivation.json", "config.json")),
    "dram_budget": Run(("dram_budget.json", "dram_budget.csv", "dram_budget.png")),
    "engine_checks": Run(("flash-oracle.json",),
                         ("--model", "{flash}", "--tokens", "3", "--profile-gb", "0.004", "--out", "{out}")),
    "engine_options": Run(("engine_options.json", "engine_options.csv", "engine_options.png", "profile_default.txt"),
                          ("--quick", "--model", "{flash}", "--predictors", "{pred}", "--repeats", "1", "--tokens", "2",
                           "--profile", "--out", "{out}")),
    "gated_report": Run(("gated.png",), ("--dir", "{tmp}/in/relufy", "--out", "{out}"),
                        inputs=committed("relufy/gated", "relufy/predictors_gpu")),
    "gpu_scale": Run(("gpu_scale.json", "gpu_scale.csv", "gpu_scale.png", "profile_ours.txt",
                      "profile_ours_lookahead_r1.txt"),
                     ("--quick", "--model", "{flash}", "--device", "cpu", "--profile-gb", "0.004", "--repeats", "1",
                      "--tokens", "6", "--naive-tokens", "2", "--lookahead-depth", "1,2", "--reader-threads", "--eager",
                      "--profile", "ours,ours_lookahead_r1", "--out", "{out}")),
    "latency": Run(("latency.json", "table3.csv", "latency.png")),
    "memlimit": Run((), ("mmap", "{flash}", "--prompt-tokens", "8", "--tokens", "2"),
                    then=(("skeleton", "{flash}", "--prompt-tokens", "8", "--tokens", "2"),
                          ("hf", "{relu}", "--prompt-tokens", "8", "--tokens", "2")), prints="RESULT {"),
    "memory_growth": Run(("memory_growth.json", "memory_growth.csv", "memory_growth.png"),
                         ("--quick", "--model", "{flash}", "--variants", "native", "--tokens", "2", "--out", "{out}")),
    "memory_limit": Run(("memory_limit.json", "memory_limit.csv", "memory_limit.png"), needs=cgroups),
    "native_step": Run(("native_step.json", "native_step.csv", "native_step.png")),
    "peer_llamacpp": Run(("peer.json", "peer.csv", "peer.png"), ("--from-runs", "--out", "{out}"), inputs=peer_runs),
    "predictor_kinds": Run(("kinds.json", "kinds.csv", "kinds.png", "config.json", "lowbit_set.json"),
                           ("--model", "{flash}", "--lowrank", "{pred}", "--calibration-tokens", "1024",
                            "--corpora", "wiki:eval", "--tokens", "256", "--out", "{out}")),
    "predictor_speed": Run(("speed.json", "speed.csv", "speed.png", "config.json"),
                           ("--dirs", "{flash}", "--lowrank", "{pred}", "--lowbit", "{pred}", "--tokens", "4",
                            "--warmup", "1", "--repeats", "1", "--out", "{out}")),
    "predictor_tradeoff": Run(("tradeoff.csv", "tradeoff.png", "config.json"),
                              ("--model", "{relu}", "--ranks", "4", "--recall-targets", "0.9", "--epochs", "1",
                               "--train-tokens", "1024", "--eval-tokens", "512", "--ppl-tokens", "256",
                               "--last-layers", "1", "--window", "2", "--out", "{out}")),
    "streamed_layers": Run(("streamed_layers.json", "streamed_layers.csv", "streamed_layers.png"),
                           STANDARD + ("--budgets", "0.9,0.02", "--tokens", "3", "--repeats", "1")),
    "profile_io": Run(("profile.json", "profile.csv", "profile.png"), ("--quick", "--size-gb", "0.002", "--out", "{out}")),
    "quantized": Run(("quantized.json", "groups.csv", "kernels.csv", "quality.csv", "recall.csv", "speed.csv",
                      "quantized.png"),
                     ("--model", "{relu}", "--predictors", "{pred}", "--sources", "wiki:eval", "--group-tokens", "256",
                      "--ppl-tokens", "256", "--tokens", "2", "--repeats", "1", "--recall-tokens", "256",
                      "--out", "{out}")),
    "relufy_cpu_eval": Run(("cpu_eval.json",), ORIGINAL_SPARSE + ("--max-tokens", "256", "--seq-len", "128",
                                                                   "--out", "{out}/cpu_eval.json")),
    "relufy_diagnostics": Run(("diagnostics.json", "diagnostics.csv", "diagnostics.png"),
                              ORIGINAL_SPARSE + ("--targets", "0.8,0.9", "--eval-tokens", "1024", "--calib-tokens",
                                                 "512", "--position-tokens", "1024", "--out", "{out}")),
    "relufy_report": Run(("curve.csv", "curve.png", "frontier.csv", "frontier.png", "config.json"),
                         ("--dir", "{tmp}/in/relufy/v1", "--threshold", "{tmp}/in/threshold_curve/threshold_curve.csv",
                          "--out", "{out}"), inputs=committed("relufy/v1", "threshold_curve"),
                         same=(("frontier.csv", "relufy/v1/frontier.csv"),)),
    "sparse_campaign_report": Run(("arms.json", "final.json", "frontier.csv", "campaign.png"),
                                  ("--ab", "{tmp}/in/ab", "--final", "{tmp}/in/final", "--out", "{out}"),
                                  inputs=campaign_tarballs, same=(("frontier.csv", "relufy/campaign/frontier.csv"),)),
    "sparse_continuations": Run(("continuations.json", "continuations.md"),
                                ORIGINAL_SPARSE + ("--prompts", "2", "--max-new-tokens", "4", "--out", "{out}")),
    "sparse_frontier_ratios": Run(("act_rule_frontier.csv", "relu_arm_frontier.csv"),
                                  ("--teacher", "{tmp}/in/relufy/campaign4/frontier_lora20.json",
                                   "{tmp}/in/relufy/campaign3/act_rule_final.json",
                                   "{tmp}/in/relufy/campaign4/relu_arm_final.json", "--out", "{out}"),
                                  inputs=committed("relufy/campaign3", "relufy/campaign4"),
                                  same=(("act_rule_frontier.csv", "relufy/campaign3/act_rule_frontier.csv"),
                                        ("relu_arm_frontier.csv", "relufy/campaign4/relu_arm_frontier.csv"))),
    "sparse_heldout_cpu": Run(("heldout_cpu.json",),
                              ORIGINAL_SPARSE + ("--max-tokens", "256", "--seq-lens", "128", "--corpora",
                                                 "wiki:eval,pydoc:", "--out", "{out}/heldout_cpu.json")),
    "stability": Run(("stability.json", "config.json")),
    "threshold_curve": Run(("threshold_curve.csv", "threshold_curve.png", "config.json"),
                           ("--model", "{silu}", "--targets", "0.5,0.9", "--max-tokens", "256", "--seq-len", "128",
                            "--out", "{out}")),
    "trace_validation": Run(("trace_validation.json", "trace_validation.csv", "trace_validation.png")),
    "window_usage": Run(("window_usage.json", "window_usage.csv", "window_usage.png")),
    "zeroshot": Run(("zeroshot.json", "zeroshot.csv", "zeroshot.png", "config.json"),
                    ORIGINAL_SPARSE + ("--predictors", "{pred}", "--tasks", "tiny_task", "--limit", "4", "--variants",
                                       "smollm2,smollm2-relu,predictor,threshold", "--out", "{out}"),
                    inputs=tiny_task),
}
# Scripts not run end to end here, and why (none: the first relufication's device staging, which needs the real
# GGUF and the network, is training tooling now: sparsetrain/relufy_v1_device.py).
NOT_END_TO_END: dict[str, str] = {}


def test_every_script_is_in_one_tier():
    assert set(END_TO_END) | set(NOT_END_TO_END) == set(SCRIPTS)
    assert not set(END_TO_END) & set(NOT_END_TO_END)


@pytest.fixture(scope="module")
def tiny_flash(tmp_path_factory):
    """A tiny ReLU llama converted to a flash directory, its FFN large enough that half the model covers the
    engine's fixed buffers (a 1 MiB staging buffer); its Hugging Face directory beside it (``tiny_relu``)."""
    from llmflash.convert import convert

    from tiny import save_tiny, tiny_llama

    root = tmp_path_factory.mktemp("tiny_flash")
    save_tiny(tiny_llama(relu=True, layers=3, d_model=64, d_ffn=4096), root / "m")
    return convert(str(root / "m"), root / "flash", progress=False)


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """One cache folder for the native step's library (``llmflash.native``): built once for every run here, the
    scripts' child processes included (each run has its own cache otherwise)."""
    return tmp_path_factory.mktemp("native")


@pytest.fixture(scope="module")
def tiny_relu(tiny_flash):
    return tiny_flash.parent / "m"


@pytest.fixture(scope="module")
def tiny_silu(tmp_path_factory):
    from tiny import save_tiny, tiny_llama

    return save_tiny(tiny_llama(seed=1, layers=2, d_model=64, d_ffn=256), tmp_path_factory.mktemp("tiny_silu") / "m")


@pytest.fixture(scope="module")
def tiny_predictors(tiny_flash, tmp_path_factory):
    """Predictors of ``tiny_flash`` (its relu rule), trained on 1024 tokens of wiki:train."""
    from llmflash.ffn import SparsityRule
    from llmflash.models import load_any
    from llmflash.text import load_texts
    from predictors.collect import Activations, CollectConfig, collect
    from predictors.train import TrainConfig, train_predictors

    root = tmp_path_factory.mktemp("tiny_predictors")
    collect(load_any(str(tiny_flash)), load_texts("wiki:train"), "wiki:train", root / "act", SparsityRule("relu"),
            CollectConfig(max_tokens=1024, seq_len=128), progress=False)
    pset = train_predictors(Activations.open(root / "act"), TrainConfig(rank=4, rank_last=4, last_layers=1, epochs=1),
                            progress=False)
    pset.save(root / "pred")
    return root / "pred"


def _fill(argv: tuple[str, ...], request, tmp_path: Path) -> list[str]:
    values = {"tmp": str(tmp_path), "out": str(tmp_path / "out")}
    for name in {n for a in argv for _, n, _, _ in string.Formatter().parse(a) if n} - set(values):
        values[name] = str(request.getfixturevalue(FIXTURES[name]))
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize("name", sorted(END_TO_END) + sorted(NOT_END_TO_END))
def test_every_script_runs_end_to_end_on_a_tiny_model(name, request, tmp_path, monkeypatch, capsys, native_cache):
    if name in NOT_END_TO_END:
        pytest.skip(NOT_END_TO_END[name])
    run = END_TO_END[name]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "native").symlink_to(native_cache, target_is_directory=True)
    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMFLASH_SMOKE", "1")
    monkeypatch.delenv("LLMFLASH_SESSION", raising=False)
    monkeypatch.syspath_prepend(str(EXP))
    why = run.needs() if run.needs else None
    if why:
        pytest.skip(f"{name}: {why}")
    if run.inputs:
        run.inputs(tmp_path)
    module = importlib.import_module(name)
    threads = torch.get_num_threads()
    try:
        for argv in (run.argv, *run.then):
            monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", *_fill(argv, request, tmp_path)])
            assert module.main() in (None, 0)
            assert run.prints in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)  # some scripts (and memlimit's children) set their own
    out = tmp_path / "out"
    missing = [f for f in run.outputs if not (out / f).is_file() or (out / f).stat().st_size == 0]
    assert not missing, f"{name} did not write {missing}: {sorted(p.name for p in out.iterdir()) if out.is_dir() else []}"
    for mine, theirs in run.same:
        assert (out / mine).read_text() == (ROOT / "results" / theirs).read_text(), f"{mine} differs from {theirs}"

"""The experiment scripts' first smoke tier: every script imports, every name it (or the library) imports from this
repository exists, function-level imports included, and its command line parses (``--help``). Running each one end
to end on a tiny model is the next tier (issue 14)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"
LIBRARIES = ("common", "engine_runs")  # the scripts' shared glue, not scripts
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
    if "parse_args(" not in (EXP / f"{name}.py").read_text(encoding="utf-8"):
        return  # no command line to parse (relufy_report: main() rewrites results/relufy)
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


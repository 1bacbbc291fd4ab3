"""No module beside the benchmarks or the tests may take the name of an installed one.

A script's own folder comes first on ``sys.path``, and pytest puts the tests' folder there too:
a ``benchmarks/kernels.py`` would be what ``import kernels`` finds, inside transformers as well
(which imports the ``kernels`` distribution when it loads a model), in place of the real one. Every top-level module and regular package in those folders is
checked against the standard library and against what the installed distributions provide.
"""

from __future__ import annotations

import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks", "tests")
# pytest's own hook file, never imported by name.
NOT_IMPORTED = {"conftest"}


def top_level_modules(folder: Path) -> dict[str, Path]:
    """{name: file or folder} of what ``import name`` would find first with ``folder`` on the path."""
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix == ".py":
            name = entry.stem
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            name = entry.name  # a folder without __init__.py is a namespace portion: it shadows nothing
        else:
            continue
        if name not in NOT_IMPORTED:
            found[name] = entry
    return found


def clashes(folder: Path, provided: dict[str, list[str]], stdlib: frozenset[str]) -> list[str]:
    problems = []
    for name, entry in top_level_modules(folder).items():
        where = entry.relative_to(ROOT) if entry.is_relative_to(ROOT) else entry
        if name in stdlib:
            problems.append(f"{where} shadows the standard library module {name!r}")
        if name in provided:
            owners = ", ".join(sorted(set(provided[name])))
            problems.append(f"{where} shadows {name!r}, installed by the distribution(s) {owners}")
    return problems


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_module_shadows_an_installed_one(folder):
    problems = clashes(ROOT / folder, packages_distributions(), frozenset(sys.stdlib_module_names))
    assert not problems, "rename these modules:\n" + "\n".join(problems)


def test_the_check_finds_a_clash(tmp_path):
    """The check itself: a module named as the standard library's or a distribution's is reported."""
    for name in ("json", "kernels", "helper", "conftest"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "data").mkdir()  # no __init__.py: not a regular package
    problems = clashes(tmp_path, {"kernels": ["kernels"], "pytest": ["pytest"], "data": ["x"]}, frozenset({"json"}))
    assert len(problems) == 3
    assert any("json.py" in p and "standard library" in p for p in problems)
    assert any("kernels.py" in p and "distribution(s) kernels" in p for p in problems)
    assert any(p.startswith(str(tmp_path / "pytest")) for p in problems)

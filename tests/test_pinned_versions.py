"""`make install` installs the tested set: every package glmrepl and its extras pull in is pinned
in constraints.txt, and the environment the tests run in has exactly those versions."""

from __future__ import annotations

import configparser
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
EXTRAS = ("dev", "serve", "adapters")  # what the Makefile installs


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version.strip()
    return found


def declared() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    options = config["options"]
    lines = options["install_requires"].split("\n")
    for extra in EXTRAS:
        lines += config["options.extras_require"][extra].split("\n")
    return [Requirement(line) for line in lines if line.strip()]


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements install, following installed metadata."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        extras = requirement.extras or {""}
        for line in metadata.requires(requirement.name) or []:
            child = Requirement(line)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(child)
    return seen


def test_every_installed_dependency_is_pinned_at_its_installed_version():
    pinned = pins()
    needed = closure(declared())
    assert "transformers" in needed and "fastapi" in needed  # the walk reached the extras
    unpinned = sorted(needed - pinned.keys())
    assert unpinned == [], f"not in constraints.txt: {unpinned} (run make lock)"
    drifted = {
        name: (metadata.version(name).split("+")[0], pinned[name])
        for name in needed
        if metadata.version(name).split("+")[0] != pinned[name]
    }
    assert drifted == {}, f"installed vs pinned: {drifted} (run make clean install)"


def test_what_the_makefile_installs_without_dependencies_is_pinned_and_installed():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    names = re.search(r"^WITHOUT_DEPS := (.+)$", makefile, re.M)
    assert names is not None and "xgrammar" in names[1].split()
    pinned = pins()
    for name in map(canonicalize_name, names[1].split()):
        assert name in pinned, f"{name} is not in constraints.txt"
        assert metadata.version(name).split("+")[0] == pinned[name]
    # Their own dependencies but triton (GPU-only, under a platform marker) come pinned with the rest.
    requirements = [Requirement(line) for line in metadata.requires("xgrammar") or []]
    unconditional = {canonicalize_name(requirement.name) for requirement in requirements if requirement.marker is None}
    assert sorted(unconditional - pinned.keys()) == []


def test_the_ranges_for_pip_users_admit_the_pinned_versions():
    pinned = pins()
    for requirement in declared():
        version = pinned[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), f"{requirement} excludes the pinned {version}"


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = re.findall(r"^\t\$\(PIP\) install .*$", makefile, re.M)
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs)
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)


def test_every_module_and_script_the_makefile_runs_exists():
    """`make demo`, `make bench` and the rest name modules and scripts that a move could leave behind."""
    import importlib.util

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    modules = re.findall(r"\$\(PY\) -m ([\w.]+)", makefile)
    scripts = re.findall(r"\$\(PY\) ((?:benchmarks|scripts)/[\w/]+\.py)", makefile)
    assert modules and scripts
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []
    assert [s for s in scripts if not (ROOT / s).is_file()] == []

"""The Python floor in setup.cfg is what the code needs: newer standard-library calls or syntax fail here."""

import ast
import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# Standard-library names glmrepl relies on, with the Python version that introduced them.
NEEDS = {"hashlib.file_digest": (3, 11), "tomllib": (3, 11), "is_relative_to": (3, 9), "removeprefix": (3, 9)}


def declared_floor() -> tuple[int, int]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", config["options"]["python_requires"].strip())
    assert match, "python_requires should be a plain floor like >=3.11"
    return int(match[1]), int(match[2])


def sources() -> list[Path]:
    return sorted((ROOT / "glmrepl").rglob("*.py"))


def test_the_floor_covers_every_newer_standard_library_name_the_code_uses():
    floor = declared_floor()
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources())
    used = {name: version for name, version in NEEDS.items() if name in text}
    assert "hashlib.file_digest" in used  # the name this floor was chosen for
    assert {name: version for name, version in used.items() if version > floor} == {}


def test_every_module_parses_as_the_floor_version():
    floor = declared_floor()
    for path in sources():
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=floor)


def test_this_interpreter_meets_the_floor_and_the_readme_states_it():
    floor = declared_floor()
    assert sys.version_info[:2] >= floor
    assert f"Python {floor[0]}.{floor[1]} or newer" in (ROOT / "README.md").read_text(encoding="utf-8")

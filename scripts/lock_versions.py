"""Record a scratch environment's versions as the tested set: `make lock` runs this.

Usage: python scripts/lock_versions.py VENV CONSTRAINTS. Every distribution in VENV
(pip and setuptools included, glmrepl itself left out) is written as NAME==VERSION;
torch's local label (+cpu) is dropped, so the constraint admits the build that
`make install` asks for. The file is replaced in one step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEADER = (
    "# The tested set: what `make install` installs (pip's -c). Refreshed on purpose with `make lock`,\n"
    "# which installs the newest releases within setup.cfg's ranges and records them here.\n"
)


def frozen(venv: Path) -> list[str]:
    python = venv / "bin" / "python"
    command = [str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    pins = []
    for line in lines:
        name, sep, version = line.partition("==")
        if not sep or name.lower() == "glmrepl":
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return sorted(pins, key=str.lower)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: lock_versions.py VENV CONSTRAINTS", file=sys.stderr)
        return 2
    venv, target = Path(sys.argv[1]), Path(sys.argv[2])
    pins = frozen(venv)
    scratch = target.with_name(target.name + ".tmp")
    scratch.write_text(HEADER + "".join(pin + "\n" for pin in pins), encoding="utf-8")
    os.replace(scratch, target)
    print(f"{target}: {len(pins)} pinned versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where glmrepl keeps things: its folders in the XDG base directories."""

from __future__ import annotations

import os
from pathlib import Path


def xdg_dir(variable: str, fallback: str) -> Path:
    """glmrepl's folder in an XDG base directory: ``$variable``, else ``~/fallback``."""
    value = os.environ.get(variable)
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(value) if value and os.path.isabs(value) else Path.home() / fallback
    return base / "glmrepl"


def data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share")


def config_dir() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config")

"""Where glmrepl keeps things (XDG), and the config file merged over the shipped defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def xdg_dir(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    base = Path(value) if value else Path.home() / fallback
    return base / "glmrepl"


def data_dir() -> Path:
    return xdg_dir("XDG_DATA_HOME", ".local/share")


def config_dir() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config")


def history_file() -> Path:
    return data_dir() / "history"


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # a broken user config is reported, never fatal

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.values.get(section, {}).get(key, default)


def load_config(path: Path | None = None) -> Config:
    defaults = tomllib.loads(resources.files("glmrepl").joinpath("defaults.toml").read_text(encoding="utf-8"))
    user_file = path or config_dir() / "config.toml"
    try:
        user = tomllib.loads(user_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Config(defaults)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        return Config(defaults, f"{user_file}: ignored ({error})")
    return Config(_merge(defaults, user))


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged

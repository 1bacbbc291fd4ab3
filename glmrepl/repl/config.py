"""Where glmrepl keeps things (XDG), and the config file merged over the shipped defaults."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..common.paths import config_dir, data_dir


def history_file() -> Path:
    return data_dir() / "history"


# The settings (glmrepl.engine.settings) a config file can hold, by [section] and key.
SETTING_KEYS = {("generation", "max_new_tokens"): "max_new_tokens", ("ui", "stats"): "stats"}


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)  # the shipped defaults with the user's file over them
    problems: list[str] = field(default_factory=list)  # a broken user config is reported, never fatal
    user_values: dict[str, Any] = field(default_factory=dict)  # the user's file alone, valid entries only

    @property
    def problem(self) -> str | None:
        return "; ".join(self.problems) or None

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.values.get(section, {}).get(key, default)

    def settings(self, source: str) -> dict[str, Any]:
        """The generation settings held by the "defaults" or the "user" file, by setting name."""
        values = self.user_values if source == "user" else _subtract(self.values, self.user_values)
        return {
            name: values[section][key]
            for (section, key), name in SETTING_KEYS.items()
            if key in values.get(section, {})
        }


def load_config(path: Path | None = None) -> Config:
    defaults = tomllib.loads(resources.files("glmrepl").joinpath("defaults.toml").read_text(encoding="utf-8"))
    user_file = path or config_dir() / "config.toml"
    try:
        user = tomllib.loads(user_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Config(defaults)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        return Config(defaults, [f"{user_file}: ignored ({error})"])
    problems = [f"{user_file}: {problem}" for problem in _drop_invalid(user, defaults)]
    return Config(_merge(defaults, user), problems, user)


def _misplaced(key: str, defaults: dict) -> str | None:
    """For a key written outside its section (``max_new_tokens = 64`` at the top): where it goes."""
    home = next((section for section, table in defaults.items() if isinstance(table, dict) and key in table), None)
    if home is None:
        return None
    return f"{key} ignored: it belongs under [{home}]"


def _drop_invalid(user: dict, defaults: dict) -> list[str]:
    """Remove the entries glmrepl cannot use from ``user``; one message per entry, naming the valid values."""
    problems = []
    for section, table in list(user.items()):
        if section not in defaults or not isinstance(table, dict):
            problems.append(
                _misplaced(section, defaults)
                or f"unknown section [{section}] ignored (sections: {', '.join(defaults)})"
            )
            del user[section]
            continue
        for key, value in list(table.items()):
            problem = _entry_problem(section, key, value, defaults[section])
            if problem:
                problems.append(
                    f"[{section}] {problem}; using {_toml(defaults[section].get(key))}"
                    if key in defaults[section]
                    else f"[{section}] {problem}"
                )
                del table[key]
    return problems


def _entry_problem(section: str, key: str, value: Any, known: dict) -> str | None:
    from ..engine import DTYPES, MODES, SETTINGS

    if key not in known:
        return f"unknown key {key} ignored (keys: {', '.join(known)})"
    name = SETTING_KEYS.get((section, key))
    if name is not None:
        return _setting_problem(SETTINGS[name], key, value)
    choices = {"device": MODES, "dtype": DTYPES}.get(key)
    if choices and value not in choices:
        return f"{key} must be one of {', '.join(choices)}, not {_toml(value)}"
    if not isinstance(value, type(known[key])):
        return f"{key} must be {_KINDS[type(known[key])]}, not {_toml(value)}"
    return None


_KINDS = {bool: "true or false", str: "a string", int: "an integer"}


# The Python types a config value may have, by setting kind.
_SETTING_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "seed": int}


def _setting_problem(setting, key: str, value: Any) -> str | None:
    expected = _SETTING_TYPES[setting.kind]
    range_text = "true or false" if setting.kind == "bool" else setting.describe_range()
    if isinstance(value, bool) != (setting.kind == "bool") or not isinstance(value, expected):
        return f"{key} must be {range_text}, not {_toml(value)}"
    try:
        setting.check(value)
    except ValueError:
        return f"{key} must be {range_text}, not {_toml(value)}"
    return None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _subtract(values: dict, user: dict) -> dict:
    """``values`` without the entries the user's file set."""
    return {
        section: {k: v for k, v in table.items() if k not in user.get(section, {})}
        for section, table in values.items()
        if isinstance(table, dict)
    }


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged

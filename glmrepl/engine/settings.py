"""Generation settings: one table of keys, types and valid ranges.

The same table validates `--temperature 0.7` on the command line, `/set
temperature 0.7` in the REPL, and the settings stored by `/save`. Values come
in layers: glmrepl's defaults, then the checkpoint's generation_config.json,
then the family's own defaults (e.g. ChatGLM's top_p 0.8), then the user's
config file, the command line and /set; a later layer wins, and /set with no
argument names the layer each value comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A temperature this close to 0 is greedy in all but name, and a tiny one makes the
# sampler's logits / temperature overflow float32 (inf - inf = NaN): decode greedily.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str  # "int", "float", "bool", "seed"
    default: Any
    low: float | None
    high: float | None
    help: str

    def parse(self, text: str) -> Any:
        """Turn user text into a value, or raise ValueError naming the valid range."""
        parser: Callable[[str], Any] = _PARSERS[self.kind]
        try:
            value = parser(text)
        except ValueError:
            raise ValueError(f"{self.key} must be {self.describe_range()}, not {text!r}") from None
        try:
            self.check(value)
        except ValueError:  # said as typed: "-1", not "-1.0"
            raise ValueError(f"{self.key} must be {self.describe_range()}, not {text.strip()}") from None
        return value

    def check(self, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{self.key} must be {self.describe_range()}, not {value}")

    def describe_range(self) -> str:
        if self.kind == "bool":
            return "on or off"
        if self.kind == "seed":
            assert self.low is not None and self.high is not None  # every seed setting is bounded
            return f"an integer from {int(self.low)} to {int(self.high)}, or 'none'"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} from {_fmt(self.low)} to {_fmt(self.high)}"


def _fmt(number: float | None) -> str:
    if number is None:
        return "-inf"
    return str(int(number)) if float(number).is_integer() else f"{number:g}"  # 1000000, not 1e+06


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError(text)


def _parse_seed(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "off", "random") else int(text)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "seed": _parse_seed,
}

SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("max_new_tokens", "int", 512, 1, 1_000_000, "most tokens in one reply"),
        Setting("temperature", "float", 0.7, 0.0, 10.0, "sampling temperature; 0 means greedy"),
        Setting("top_p", "float", 0.9, 0.0, 1.0, "nucleus sampling: keep this probability mass"),
        Setting("top_k", "int", 0, 0, 1_000_000, "keep the K most likely tokens; 0 means no limit"),
        Setting("repetition_penalty", "float", 1.0, 0.01, 10.0, "above 1 discourages repeats"),
        Setting("seed", "seed", None, 0, 2**32 - 1, "fixed random seed for every reply, or none"),
        Setting("do_sample", "bool", True, None, None, "sample (on) or always pick the top token (off)"),
        Setting("stats", "bool", True, None, None, "show the tokens and speed line after replies"),
    )
}

# Where a value can come from, lowest first: a later layer wins. /set shows the name.
LAYERS = ("default", "checkpoint", "family", "config file", "command line", "/set")
MODEL_LAYERS = ("checkpoint", "family")  # replaced on every load or swap


class Settings:
    """Layered settings: default < checkpoint < family < config file < command line < /set."""

    def __init__(
        self,
        user: dict[str, Any] | None = None,
        *,
        defaults: dict[str, Any] | None = None,
        config_file: dict[str, Any] | None = None,
        command_line: dict[str, Any] | None = None,
    ):
        self.layers: dict[str, dict[str, Any]] = {name: {} for name in LAYERS}
        for layer, values in (
            ("default", defaults),
            ("config file", config_file),
            ("command line", command_line),
            ("/set", user),
        ):
            for key, value in (values or {}).items():
                self.set(key, value, layer)

    @property
    def user(self) -> dict[str, Any]:
        """The values changed with /set (or restored by /load) in this session."""
        return self.layers["/set"]

    def chosen(self) -> dict[str, Any]:
        """Every value the user chose (config file, command line, /set), as /save keeps them."""
        return {**self.layers["config file"], **self.layers["command line"], **self.layers["/set"]}

    def set(self, key: str, value: Any, layer: str = "/set") -> Any:
        """Set a value given as text or as a typed value; raises KeyError/ValueError."""
        setting = SETTINGS[key]
        if isinstance(value, str):
            value = setting.parse(value)
        else:
            setting.check(value)
        self.layers[layer][key] = value
        return value

    def set_model_defaults(self, checkpoint_defaults: dict, family_defaults: dict) -> None:
        """Replace the layers a loaded model contributes (on every load or swap)."""
        self.layers["checkpoint"] = {k: v for k, v in checkpoint_defaults.items() if k in SETTINGS and v is not None}
        self.layers["family"] = {k: v for k, v in family_defaults.items() if k in SETTINGS}

    def get(self, key: str) -> Any:
        return self.layers[self.source(key)].get(key, SETTINGS[key].default)

    def source(self, key: str) -> str:
        """The layer the value comes from (one of LAYERS)."""
        return next((layer for layer in reversed(LAYERS) if key in self.layers[layer]), "default")

    def effective(self) -> dict[str, Any]:
        return {key: self.get(key) for key in SETTINGS}

"""Which ChatGLM generation a folder holds, from its files alone.

Nothing is imported or executed: config.json fields, tokenizer files read as
text or JSON, and names. This runs for every entry of the model listing, so it
stays cheap (no torch, no sentencepiece).

* ``position_encoding_2d`` in the config is the first generation (ChatGLM-6B).
* ``multi_query_attention`` / ``padded_vocab_size`` / ``ffn_hidden_size`` is
  the architecture of ChatGLM2, ChatGLM3 and GLM-4, which differ by their
  tokenizers only. The signals, strongest first: a tiktoken-style
  ``tokenizer.model`` (GLM-4); role tokens such as ``<|user|>`` in the
  tokenizer's own ``.py`` read as text, in the chat template or the added
  tokens of ``tokenizer_config.json`` (ChatGLM3); the checkpoint's recorded
  name or the folder name; an ``AutoModelForCausalLM`` entry in ``auto_map``,
  which ChatGLM3-era configs carry (some ChatGLM2 revisions got it later, so
  it only breaks a tie). When signals disagree the strongest wins and the
  reason says so; ``--family`` overrides.

The generation found here also decides how a long-context ``rope_ratio`` is
read (glm2_mapping.rope_parameters): chatglm2-6b-32k ships ChatGLM2's tokenizer
and interpolates positions; chatglm3-6b-32k/-128k and GLM-4 ship role tokens
or the tiktoken vocabulary and scale the rotary base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import CheckpointError
from .. import KNOWN_FAMILIES, FamilyMatch

_GEN2_FIELDS = ("multi_query_attention", "padded_vocab_size", "ffn_hidden_size")
_ROLE_TOKEN = "<|user|>"
# GLM-4 keeps ChatGLM3's role tokens and auto_map: a signal from those alone ("chatglm3+") agrees
# with glm4; only a name or ChatGLM3's own tokenizer says chatglm3 against glm4.
_AGREES = {("chatglm3+", "glm4")}
_NAME_PATTERNS = (  # checked in order: "chatglm3" before its substring matches
    ("glm4", re.compile(r"glm-?4", re.IGNORECASE)),
    ("chatglm3", re.compile(r"chatglm-?3", re.IGNORECASE)),
    ("chatglm2", re.compile(r"chatglm-?2", re.IGNORECASE)),
)


def detect_chatglm(path: Path, config: dict, override: str | None) -> FamilyMatch:
    architecture = _architecture(path, config)
    if override:
        return _checked_override(override, architecture, path)
    if architecture == "gen1":
        return FamilyMatch("chatglm1", "config has position_encoding_2d")
    signals = _gen2_signals(path, config)
    if not signals:
        return FamilyMatch("chatglm2", "no role tokens or name found; assuming ChatGLM2")
    family, reason = _named(signals[0][0]), signals[0][1]
    dissent = next((s for s in signals[1:] if _named(s[0]) != family and (s[0], family) not in _AGREES), None)
    if dissent:
        reason += f" (but {dissent[1]} suggests {_named(dissent[0])}; --family overrides)"
    return FamilyMatch(family, reason)


def _named(signal_family: str) -> str:
    """The family a signal names ("chatglm3+": ChatGLM3's role tokens, which GLM-4 keeps too)."""
    return signal_family.rstrip("+")


def _architecture(path: Path, config: dict) -> str:
    if config.get("position_encoding_2d"):
        return "gen1"
    if any(field in config for field in _GEN2_FIELDS):
        return "gen2"
    raise CheckpointError(
        f"{path.name}: model_type chatglm, but the config matches no known ChatGLM generation: "
        f"no position_encoding_2d (ChatGLM-6B) and none of {', '.join(_GEN2_FIELDS)} (ChatGLM2/3, GLM-4)"
    )


def _checked_override(family: str, architecture: str, path: Path) -> FamilyMatch:
    if family not in KNOWN_FAMILIES:
        raise CheckpointError(f"unknown --family {family!r}: choose one of {', '.join(KNOWN_FAMILIES)}")
    if (family == "chatglm1") != (architecture == "gen1"):
        kind = "ChatGLM-6B" if architecture == "gen1" else "ChatGLM2/3 or GLM-4"
        raise CheckpointError(f"--family {family} does not fit {path.name}: its config is the {kind} architecture")
    return FamilyMatch(family, "--family")


def _gen2_signals(path: Path, config: dict) -> list[tuple[str, str]]:
    """(family, reason) for every signal found, strongest first."""
    signals = []
    if _is_tiktoken_vocabulary(path / "tokenizer.model"):
        signals.append(("glm4", "tokenizer.model is a tiktoken vocabulary"))
    for source in sorted(path.glob("tokenization*.py")):
        has_roles = _ROLE_TOKEN in _read_text(source)
        signals.append(
            ("chatglm3" if has_roles else "chatglm2", f"{source.name} {'lists' if has_roles else 'has no'} role tokens")
        )
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    if _ROLE_TOKEN in str(tokenizer_config.get("chat_template", "")):
        signals.append(("chatglm3+", f"tokenizer_config chat template has {_ROLE_TOKEN}"))
    if _ROLE_TOKEN in json.dumps(tokenizer_config.get("added_tokens_decoder", {})):
        signals.append(("chatglm3+", f"tokenizer_config adds {_ROLE_TOKEN}"))
    for label, name in (
        ("_name_or_path", config.get("_name_or_path")),
        ("tokenizer name_or_path", tokenizer_config.get("name_or_path")),
        ("folder name", path.name),
    ):
        family = _family_from_name(str(name or ""))
        if family:
            signals.append((family, f"{label} {name}"))
    if "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        signals.append(("chatglm3+", "auto_map has AutoModelForCausalLM"))
    return signals


def _family_from_name(name: str) -> str | None:
    for family, pattern in _NAME_PATTERNS:
        if pattern.search(name):
            return family
    return None


def _is_tiktoken_vocabulary(file: Path) -> bool:
    """tiktoken files are text lines "<base64> <rank>"; sentencepiece models are protobuf."""
    try:
        with file.open("rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    first_line = head.split(b"\n", 1)[0]
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first_line))


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

"""Telling the ChatGLM generations apart from files alone (no torch, nothing executed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmrepl.engine.errors import CheckpointError
from glmrepl.engine.families import detect_family
from glmrepl.engine.families.chatglm.detect import detect_chatglm

DATA = Path(__file__).parent / "data" / "chatglm"


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def copy_config_only(source: str, destination: Path, **changes) -> Path:
    """A folder with the fixture's config.json (edited) and tokenizer_config.json."""
    destination.mkdir(parents=True)
    config = {**config_of(DATA / source), **changes}
    (destination / "config.json").write_text(json.dumps(config), encoding="utf-8")
    shutil.copy(DATA / source / "tokenizer_config.json", destination)
    return destination


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_fixtures_are_recognised(family):
    folder = DATA / f"{family}-tiny"
    match = detect_family(folder, config_of(folder))
    assert match.family == family
    assert match.reason and "--family" not in match.reason


def test_first_generation_reason_names_the_field():
    folder = DATA / "chatglm1-tiny"
    assert detect_chatglm(folder, config_of(folder), None).reason == "config has position_encoding_2d"


def test_non_chatglm_config_is_not_a_family():
    assert detect_family(DATA, {"model_type": "llama"}) is None


def test_chat_template_with_role_tokens_means_chatglm3(tmp_path):
    folder = copy_config_only("chatglm2-tiny", tmp_path / "plain", _name_or_path="local/model")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>{% endfor %}<|user|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    match = detect_chatglm(folder, config_of(folder), None)
    assert match == match.__class__("chatglm3", "tokenizer_config chat template has <|user|>")


def test_tokenizer_code_is_read_as_text(tmp_path):
    with_roles = copy_config_only("chatglm2-tiny", tmp_path / "a", _name_or_path="")
    (with_roles / "tokenization_chatglm.py").write_text('raise SystemExit("never run")\nROLES = ["<|user|>"]\n')
    without_roles = copy_config_only("chatglm3-tiny", tmp_path / "b", _name_or_path="", auto_map={})
    (without_roles / "tokenization_chatglm.py").write_text('raise SystemExit("never run")\n')
    assert detect_chatglm(with_roles, config_of(with_roles), None).family == "chatglm3"
    assert detect_chatglm(without_roles, config_of(without_roles), None).family == "chatglm2"


def test_disagreement_is_reported_and_override_wins(tmp_path):
    # Named ChatGLM2 everywhere, but its tokenizer code has ChatGLM3's role tokens.
    folder = copy_config_only("chatglm2-tiny", tmp_path / "chatglm2-6b")
    (folder / "tokenization_chatglm.py").write_text('SPECIAL = ["<|system|>", "<|user|>"]\n')
    detected = detect_chatglm(folder, config_of(folder), None)
    assert detected.family == "chatglm3"
    assert "suggests chatglm2" in detected.reason and "--family" in detected.reason
    overridden = detect_family(folder, config_of(folder), override="chatglm2")
    assert (overridden.family, overridden.reason) == ("chatglm2", "--family")


def test_no_signal_defaults_to_chatglm2(tmp_path):
    folder = copy_config_only("chatglm2-tiny", tmp_path / "my-model", _name_or_path="")
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    match = detect_chatglm(folder, config_of(folder), None)
    assert match.family == "chatglm2" and "assuming" in match.reason


def test_tiktoken_vocabulary_means_glm4(tmp_path):
    folder = copy_config_only("chatglm3-tiny", tmp_path / "model", _name_or_path="")
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n", encoding="ascii")
    assert detect_chatglm(folder, config_of(folder), None).family == "glm4"


def test_glm4_keeps_chatglm3_role_tokens_without_a_disagreement(tmp_path):
    """GLM-4 ships <|user|> and auto_map as ChatGLM3 does: a correct load says no "but ... suggests"."""
    folder = copy_config_only("chatglm3-tiny", tmp_path / "model", _name_or_path="")
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n", encoding="ascii")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["added_tokens_decoder"] = {"151336": {"content": "<|user|>", "special": True}}
    tokenizer_config["name_or_path"] = ""
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    match = detect_chatglm(folder, config_of(folder), None)
    assert match.family == "glm4" and "suggests" not in match.reason, match.reason
    named = copy_config_only("chatglm3-tiny", tmp_path / "chatglm3-6b", _name_or_path="")
    (named / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n", encoding="ascii")
    assert "suggests chatglm3" in detect_chatglm(named, config_of(named), None).reason  # a name still dissents


def test_unrecognised_chatglm_config_names_the_fields(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    with pytest.raises(CheckpointError) as error:
        detect_family(folder, {"model_type": "chatglm", "hidden_size": 64})
    message = str(error.value)
    for field in ("position_encoding_2d", "multi_query_attention", "padded_vocab_size", "ffn_hidden_size"):
        assert field in message


def test_override_must_fit_the_architecture():
    folder = DATA / "chatglm1-tiny"
    with pytest.raises(CheckpointError, match="does not fit"):
        detect_chatglm(folder, config_of(folder), "chatglm3")
    with pytest.raises(CheckpointError, match="unknown --family"):
        detect_chatglm(folder, config_of(folder), "chatglm9")


def test_detection_imports_no_torch():
    folder = DATA / "chatglm3-tiny"
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from glmrepl.engine.families import detect_family\n"
        f"folder = Path({str(folder)!r})\n"
        "match = detect_family(folder, json.loads((folder / 'config.json').read_text()))\n"
        "assert match.family == 'chatglm3'\n"
        "assert 'torch' not in sys.modules and 'sentencepiece' not in sys.modules, 'heavy import'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)

"""GLM-4: its tiktoken-style tokenizer and the shared ChatGLM2-style model.

Beside the glm4-tiny reference run (test_chatglm_long_context.py), the checkpoint here is
ChatGLM3-tiny's weights under a GLM-4 layout (tiktoken vocabulary of the same
size): the model must then reproduce ChatGLM3's reference logits exactly.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from glmrepl.engine.families import detect_family, load_family
from glmrepl.engine.families.chatglm.glm4_tokenizer import GLM4_SPECIAL_TOKENS, SPLIT_PATTERN, GLM4Tokenizer
from glmrepl.engine.models.checkpoint import scan_checkpoint

DATA = Path(__file__).parent / "data" / "chatglm"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Who was Jim Henson? 你好，欢迎问我任何问题。"
    "def f(x):\n    return x  # code\n晚上睡不着应该怎么办 hello hello world, the theory of everything"
)


def tiny_bpe_vocabulary(size: int) -> list[bytes]:
    """256 single bytes, then merges learnt greedily on CORPUS, then filler tokens up to ``size``."""
    import regex

    words = [[bytes([b]) for b in piece.encode("utf-8")] for piece in regex.findall(SPLIT_PATTERN, CORPUS)]
    vocabulary = [bytes([b]) for b in range(256)]
    while len(vocabulary) < size:
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        left, right = pairs.most_common(1)[0][0]
        vocabulary.append(left + right)
        words = [_merge_pair(w, left, right) for w in words]
    filler = 0
    while len(vocabulary) < size:
        vocabulary.append(b"\x00\x01" + filler.to_bytes(2, "big"))
        filler += 1
    return vocabulary


def _merge_pair(word: list[bytes], left: bytes, right: bytes) -> list[bytes]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(left + right)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def write_tiktoken_file(file: Path, vocabulary: list[bytes]) -> None:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(vocabulary)]
    file.write_text("\n".join(lines) + "\n", encoding="ascii")


@pytest.fixture(scope="module")
def glm4_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "glm4-tiny"
    folder.mkdir()
    config = json.loads((DATA / "chatglm3-tiny" / "config.json").read_text(encoding="utf-8"))
    config.update(_name_or_path="THUDM/glm-4-9b-chat", rope_ratio=1)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    shutil.copy(DATA / "chatglm3-tiny" / "model.safetensors", folder)
    write_tiktoken_file(folder / "tokenizer.model", tiny_bpe_vocabulary(config["padded_vocab_size"] - 14))
    return folder


@pytest.fixture(scope="module")
def tokenizer(glm4_folder) -> GLM4Tokenizer:
    return GLM4Tokenizer(glm4_folder / "tokenizer.model")


def test_merges_lowest_rank_first(tmp_path):
    write_tiktoken_file(tmp_path / "t.model", [b"a", b"b", b"c", b"ab", b"bc", b"abc d"])
    tokenizer = GLM4Tokenizer(tmp_path / "t.model")
    assert tokenizer._merge(b"abc") == (3, 2)  # "ab" (rank 3) beats "bc" (rank 4)
    assert tokenizer._merge(b"abc d") == (5,)  # a whole piece in the vocabulary is one token
    assert tokenizer.get_command("<|endoftext|>") == 6 and len(tokenizer) == 6 + len(GLM4_SPECIAL_TOKENS)


def test_round_trip_and_special_tokens(tokenizer):
    text = "Who was Jim Henson?\n\t  你好，世界 🙂 <|user|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.get_command("<|user|>") not in ids  # typed role tokens stay text
    assert tokenizer.encode(" hello")[0] >= 256  # a learnt merge is used
    user = tokenizer.get_command("<|user|>")
    # kept special tokens are set apart by a space, as the released tokenizer decodes them
    assert tokenizer.decode(ids + [user], skip_special_tokens=False).endswith("<|user|> <|user|>")
    assert tokenizer.decode(ids + [user]) == text


def test_detected_and_loaded_as_glm4(glm4_folder, tokenizer):
    import torch
    from safetensors.torch import load_file

    config = json.loads((glm4_folder / "config.json").read_text(encoding="utf-8"))
    match = detect_family(glm4_folder, config)
    assert match.family == "glm4" and "tiktoken" in match.reason
    parts = load_family(
        glm4_folder,
        match,
        weight_files=scan_checkpoint(glm4_folder).weight_files,
        dtype=torch.float32,
        device_map="cpu",
    )

    reference = load_file(str(DATA / "chatglm3-tiny.logits.safetensors"))
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)

    commands = {name: tokenizer.get_command(name) for name in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")}
    prompt = parts.prompt_format.build([{"role": "user", "content": "你好"}])
    assert prompt == [
        commands["[gMASK]"],
        commands["<sop>"],
        commands["<|user|>"],
        *tokenizer.encode("\n"),
        *tokenizer.encode("你好"),
        commands["<|assistant|>"],
    ]
    assert parts.prompt_format.stop_token_ids == [
        tokenizer.get_command(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    with torch.inference_mode():
        output = parts.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
    assert output.shape[1] > len(prompt)


def test_rope_ratio_scales_the_rotary_base(glm4_folder, tmp_path):
    import torch

    folder = Path(shutil.copytree(glm4_folder, tmp_path / "glm4-long"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "rope_ratio": 500}), encoding="utf-8")
    parts = load_family(
        folder,
        detect_family(folder, config),
        weight_files=scan_checkpoint(folder).weight_files,
        dtype=torch.float32,
        device_map="cpu",
    )
    assert parts.model.config.rope_parameters["rope_theta"] == 5_000_000


def test_a_token_holding_part_of_a_character_is_labelled_by_its_bytes(tokenizer):
    """GLM-4's pieces write such bytes as backslash escapes: /next shows <0xE5>, not the escape text."""
    from glmrepl.engine.conversation.tokens import token_label

    ids = tokenizer.encode("東京", add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert partial  # the tiny vocabulary splits these characters
    labels = [token_label(tokenizer, i, tokenizer.decode([i])) for i in partial]
    assert all(label.startswith("<0x") and "\\" not in label for label in labels), labels

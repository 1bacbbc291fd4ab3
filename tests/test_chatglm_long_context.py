"""The long-context releases and GLM-4 against their reference runs.

chatglm2-32k-tiny applies ``rope_ratio`` as position interpolation; chatglm3-32k-tiny
(chatglm3-6b-32k's layout and ratio, 50, on chatglm3-tiny's weights) and glm4-tiny
(the remote-code GLM-4 layout, tiktoken vocabulary) as rope base scaling. Each
ratio is large enough that ignoring or misapplying it changes the greedy ids.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chatglm_reference import (
    DATA,
    assert_logits_match,
    assert_matches_case,
    expected,
    load_reference,
    reference_cases,
    reference_logits,
)

from glmrepl.engine.families import detect_family, load_family
from glmrepl.engine.models.checkpoint import inspect_checkpoint, scan_checkpoint

FIXTURES = ("chatglm2-32k", "chatglm3-32k", "glm4")


@pytest.fixture(scope="module")
def loaded():
    return {name: load_reference(name) for name in FIXTURES}


@pytest.mark.parametrize("name,index", reference_cases(FIXTURES))
def test_prompt_greedy_and_decoded(loaded, name, index):
    assert_matches_case(loaded[name], expected(name)["cases"][index])


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_reference(loaded, name):
    assert_logits_match(loaded[name], name)


def test_rope_ratio_is_applied_per_generation(loaded):
    chatglm2 = loaded["chatglm2-32k"].model.config.rope_parameters
    assert (chatglm2["rope_type"], chatglm2["factor"], chatglm2["rope_theta"]) == ("linear", 4.0, 10000.0)
    chatglm3 = loaded["chatglm3-32k"].model.config.rope_parameters
    assert (chatglm3["rope_type"], chatglm3["rope_theta"]) == ("default", 500000.0)
    glm4 = loaded["glm4"].model.config.rope_parameters
    assert (glm4["rope_type"], glm4["rope_theta"]) == ("default", 80000.0)


def _logits_and_first_reply(folder, config, family=None):
    """A plain forward over the reference input ids, and the greedy reply to the first case."""
    match = detect_family(folder, config, family)
    parts = load_family(
        folder, match, weight_files=scan_checkpoint(folder).weight_files, dtype=torch.float32, device_map="cpu"
    )
    name = folder.name.removesuffix("-tiny")
    prompt = expected(name)["cases"][0]["prompt_ids"]
    with torch.inference_mode():
        logits = parts.model(input_ids=reference_logits(name)["input_ids"]).logits
        output = parts.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=parts.prompt_format.stop_token_ids
        )
    return parts.model.config.rope_parameters, logits, output[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "name,wrong_family,wrong_reading",
    [
        ("chatglm2-32k", "chatglm3", {"rope_type": "default", "rope_theta": 40000.0}),
        ("chatglm3-32k", "chatglm2", {"rope_type": "linear", "factor": 50.0, "rope_theta": 10000.0}),
    ],
)
def test_family_override_changes_the_rope_reading(name, wrong_family, wrong_reading):
    """--family with the other reading of rope_ratio misses the reference logits and greedy ids, which
    shows each fixture tells base scaling and position interpolation apart."""
    folder = DATA / f"{name}-tiny"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rope, logits, reply = _logits_and_first_reply(folder, config, wrong_family)
    assert {key: rope[key] for key in wrong_reading} == wrong_reading
    assert (logits - reference_logits(name)["logits"]).abs().max() > 1e-2
    assert reply != expected(name)["cases"][0]["greedy_ids"]


def test_chatglm3_32k_with_rope_ratio_ignored_misses_the_reference(tmp_path):
    folder = shutil.copytree(DATA / "chatglm3-32k-tiny", tmp_path / "chatglm3-32k-tiny")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    del config["rope_ratio"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    rope, logits, reply = _logits_and_first_reply(folder, config)
    assert rope["rope_theta"] == 10000.0
    assert (logits - reference_logits("chatglm3-32k")["logits"]).abs().max() > 1e-2
    assert reply != expected("chatglm3-32k")["cases"][0]["greedy_ids"]


@pytest.mark.parametrize("index", range(len(expected("chatglm3-32k")["cases"])))
def test_chatglm3_32k_reply_without_a_newline_is_kept(loaded, index):
    """The released chatglm3-6b-32k chat() raised on these replies (its process_response splits
    each on a newline that is not there; the recording has no response); glmrepl shows the text."""
    case = expected("chatglm3-32k")["cases"][index]
    assert case["response"] is None and "\n" not in case["decoded"]
    assert loaded["chatglm3-32k"].prompt_format.clean_reply(case["decoded"]) == case["decoded"].strip()


@pytest.mark.parametrize("index", range(len(expected("glm4")["cases"])))
def test_glm4_reply_text_is_the_reference_decode(loaded, index):
    case = expected("glm4")["cases"][index]
    assert loaded["glm4"].tokenizer.decode(case["greedy_ids"]) == case["response"]


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|user|>", "<|observation|>"])
def test_each_glm4_end_token_stops_a_reply(loaded, stop):
    """The model's own generation defaults end a reply on any of the three end tokens."""
    from transformers import LogitsProcessor

    parts = loaded["glm4"]
    stop_id = parts.tokenizer.get_command(stop)

    class ForceStopAtThirdToken(LogitsProcessor):
        def __init__(self, prompt_length):
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - self.prompt_length == 2:
                scores[:, stop_id] = scores.max() + 1
            return scores

    prompt = expected("glm4")["cases"][0]["prompt_ids"]
    with torch.inference_mode():
        output = parts.model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=10,
            logits_processor=[ForceStopAtThirdToken(len(prompt))],
        )
    reply = output[0, len(prompt) :].tolist()
    assert reply[:2] == expected("glm4")["cases"][0]["greedy_ids"][:2]
    assert reply[2:] == [stop_id]


@pytest.mark.parametrize("name,family", [("chatglm2-32k", "chatglm2"), ("chatglm3-32k", "chatglm3"), ("glm4", "glm4")])
@pytest.mark.parametrize("architecture", ["ChatGLMModel", "ChatGLMForConditionalGeneration"])
def test_detection_ignores_the_architecture_name(tmp_path, name, family, architecture):
    folder = shutil.copytree(DATA / f"{name}-tiny", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert detect_family(folder, config).family == family
    assert inspect_checkpoint(folder).family.family == family

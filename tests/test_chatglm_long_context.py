"""The long-context releases and GLM-4 against their reference runs.

chatglm2-32k-tiny applies ``rope_ratio`` as position interpolation, glm4-tiny
(the remote-code GLM-4 layout, tiktoken vocabulary) as rope base scaling; both
use a ratio large enough that ignoring or misapplying it changes the greedy ids.
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

from glmrepl.engine.checkpoint import inspect_checkpoint, scan_checkpoint
from glmrepl.engine.families import detect_family, load_family

FIXTURES = ("chatglm2-32k", "glm4")


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
    glm4 = loaded["glm4"].model.config.rope_parameters
    assert (glm4["rope_type"], glm4["rope_theta"]) == ("default", 80000.0)


def test_family_override_changes_the_rope_reading():
    """--family chatglm3 on the chatglm2-6b-32k layout reads rope_ratio as base scaling: the
    reference logits are then missed, which shows the fixture tells the two readings apart."""
    folder = DATA / "chatglm2-32k-tiny"
    match = detect_family(folder, json.loads((folder / "config.json").read_text(encoding="utf-8")), "chatglm3")
    parts = load_family(
        folder, match, weight_files=scan_checkpoint(folder).weight_files, dtype=torch.float32, device_map="cpu"
    )
    assert parts.model.config.rope_parameters["rope_theta"] == 40000.0
    reference = reference_logits("chatglm2-32k")
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert (logits - reference["logits"]).abs().max() > 1e-2


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


@pytest.mark.parametrize("name,family", [("chatglm2-32k", "chatglm2"), ("glm4", "glm4")])
@pytest.mark.parametrize("architecture", ["ChatGLMModel", "ChatGLMForConditionalGeneration"])
def test_detection_ignores_the_architecture_name(tmp_path, name, family, architecture):
    folder = shutil.copytree(DATA / f"{name}-tiny", tmp_path / "model")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert detect_family(folder, config).family == family
    assert inspect_checkpoint(folder).family.family == family

"""The ChatGLM reference fixtures: what the released code answered, and the checks against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "chatglm"


def load_reference(name, quantize=None, device_map="cpu", dtype=None):
    """LoadedParts of ``<name>-tiny`` (or of a folder) through glmrepl's native loader."""
    import torch

    from glmrepl.engine.families import detect_family, load_family
    from glmrepl.engine.models.checkpoint import scan_checkpoint

    folder = name if isinstance(name, Path) else DATA / f"{name}-tiny"
    match = detect_family(folder, json.loads((folder / "config.json").read_text(encoding="utf-8")))
    return load_family(
        folder,
        match,
        weight_files=scan_checkpoint(folder).weight_files,
        dtype=dtype or torch.float32,
        device_map=device_map,
        quantize=quantize,
    )


def expected(name: str) -> dict:
    return json.loads((DATA / f"{name}-tiny.expected.json").read_text(encoding="utf-8"))


def reference_logits(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(DATA / f"{name}-tiny.logits.safetensors"))


def reference_cases(names) -> list:
    return [
        pytest.param(name, index, id=f"{name}-case{index}")
        for name in names
        for index in range(len(expected(name)["cases"]))
    ]


def as_messages(case: dict) -> list[dict]:
    """The reference history as glmrepl messages (ChatGLM3's already are)."""
    messages = []
    for item in case["history"]:
        if isinstance(item, dict):
            messages.append(item)
        else:
            question, answer = item
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": case["query"]}]


def assert_matches_case(parts, case: dict) -> None:
    """Prompt ids, greedy ids and decoded text exactly as the released code produced them."""
    prompt_ids = parts.prompt_format.build(as_messages(case))
    assert prompt_ids == case["prompt_ids"]
    greedy_ids = greedy_reply(parts, prompt_ids)
    assert greedy_ids == case["greedy_ids"]
    assert parts.tokenizer.decode(greedy_ids, skip_special_tokens=False) == case["decoded"]


def assert_logits_match(parts, name: str, atol: float = 1e-4) -> None:
    import torch

    reference = reference_logits(name)
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert logits.shape == reference["logits"].shape
    assert torch.allclose(logits, reference["logits"], atol=atol, rtol=0)


def chat_history_reply(family: str, parts, ids: list[int]) -> dict:
    """The entry the release adds to its history for a reply of ``ids`` (stop id included if reached).

    Each generation's chat() decodes the ids and post-processes them, and nothing more: a reply
    cut inside a multi-byte character keeps the fragment as U+FFFD.
    """
    tokenizer = parts.tokenizer
    if family == "glm4":  # the reference run: decode(ids, skip_special_tokens=True) as the content
        return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    if family.startswith("chatglm3"):
        # chat() decodes all but the last id (taken for the stop token); process_response then keeps
        # the first line apart as metadata, and strips the content only after an empty one.
        metadata, content = tokenizer.decode(ids[:-1], skip_special_tokens=False).split("\n", 1)
        return {"role": "assistant", "metadata": metadata, "content": content if metadata.strip() else content.strip()}
    # ChatGLM-6B and ChatGLM2: process_response, which clean_reply reproduces (test_chatglm_parity).
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return {"role": "assistant", "content": parts.prompt_format.clean_reply(text)}


def greedy_reply(parts, prompt_ids: list[int], max_new_tokens: int = 24) -> list[int]:
    """The ids a plain greedy generate() gives after ``prompt_ids``, with the family's stop ids."""
    import torch

    with torch.inference_mode():
        output = parts.model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=parts.prompt_format.stop_token_ids,
        )
    return output[0, len(prompt_ids) :].tolist()

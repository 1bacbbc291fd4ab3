"""The ChatGLM reference fixtures: what the released code answered, and the checks against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "chatglm"


def load_reference(name, quantize=None, device_map="cpu", dtype=None):
    """LoadedParts of ``<name>-tiny`` (or of a folder) through glmrepl's native loader."""
    import torch

    from glmrepl.engine.checkpoint import scan_checkpoint
    from glmrepl.engine.families import detect_family, load_family

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
    import torch

    prompt_ids = parts.prompt_format.build(as_messages(case))
    assert prompt_ids == case["prompt_ids"]
    with torch.inference_mode():
        output = parts.model.generate(
            torch.tensor([prompt_ids]),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=parts.prompt_format.stop_token_ids,
        )
    greedy_ids = output[0, len(prompt_ids) :].tolist()
    assert greedy_ids == case["greedy_ids"]
    assert parts.tokenizer.decode(greedy_ids, skip_special_tokens=False) == case["decoded"]


def assert_logits_match(parts, name: str, atol: float = 1e-4) -> None:
    import torch

    reference = reference_logits(name)
    with torch.inference_mode():
        logits = parts.model(input_ids=reference["input_ids"]).logits
    assert logits.shape == reference["logits"].shape
    assert torch.allclose(logits, reference["logits"], atol=atol, rtol=0)

"""The tiny random checkpoints load through transformers like downloaded ones."""

from __future__ import annotations

import json

import pytest

from glmrepl.tiny import build_demo, build_gpt2, build_qwen2_chat


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return tokenizer, model


def generate(tokenizer, model, input_ids, new_tokens=4):
    import torch

    with torch.no_grad():
        output = model.generate(
            torch.tensor([input_ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return output[0, len(input_ids) :].tolist()


def test_gpt2_is_a_base_lm_that_generates(gpt2_checkpoint):
    import torch

    tokenizer, model = load(gpt2_checkpoint)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.dtype == torch.float32
    assert not tokenizer.chat_template
    ids = tokenizer.encode("Hello café 日本")
    assert tokenizer.decode(ids) == "Hello café 日本"
    assert len(generate(tokenizer, model, ids)) == 4
    assert (gpt2_checkpoint / "vocab.json").exists() and (gpt2_checkpoint / "merges.txt").exists()
    assert (gpt2_checkpoint / "pytorch_model.bin").exists()
    assert not list(gpt2_checkpoint.glob("*.safetensors"))


def test_qwen_is_a_sharded_chat_model_that_generates(qwen_checkpoint):
    import torch

    tokenizer, model = load(qwen_checkpoint)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert len(generate(tokenizer, model, ids)) == 4
    index = json.loads((qwen_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


def test_multibyte_text_splits_into_byte_pieces(qwen_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_checkpoint, local_files_only=True)
    ids = tokenizer.encode("日本語")
    # A piece that is not valid UTF-8 on its own is what streaming must hold back.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("builder", [build_gpt2, build_qwen2_chat])
def test_builds_are_deterministic(tmp_path, builder):
    first, second = builder(tmp_path / "a"), builder(tmp_path / "b")
    for file in sorted(first.iterdir()):
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name


def test_demo_says_it_is_random(tmp_path):
    demo = build_demo(tmp_path / "demo")
    readme = (demo / "README.md").read_text()
    assert "random" in readme.lower() and "gibberish" in readme
    assert (demo / "model.safetensors.index.json").exists()


def test_the_first_demo_run_builds_quietly_and_keeps_its_turns(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_DATA_HOME": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "glmrepl.cli.demo"],
        input="hello there\nand then?\n/exit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / "glmrepl" / "demo-checkpoint" / "model.safetensors.index.json").is_file()
    assert "building a tiny random checkpoint" in result.stdout
    assert "Writing model shards" not in result.stderr and "it/s" not in result.stderr
    assert "left out" not in result.stdout + result.stderr  # the demo leaves its replies room for turns

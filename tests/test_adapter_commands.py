"""Adapters from the user's side: --adapter / --merge-adapter, /adapter, /device, /save, glmrepl list."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chatglm_reference import DATA, expected, load_reference, reference_logits
from support import loaded_app
from test_cli import run

from glmrepl.repl.results import Error, Text

BASE = DATA / "chatglm2-tiny"
LORA = DATA / "chatglm2-lora-tiny"
PTUNING = DATA / "chatglm2-ptuning-tiny"
GREEDY = ("--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "24")


def expected_reply(name: str) -> str:
    """What glmrepl prints for the first case: the reference's greedy ids, decoded and cleaned."""
    parts = load_reference("chatglm2")
    ids = expected(name)["cases"][0]["greedy_ids"]
    return parts.prompt_format.clean_reply(parts.tokenizer.decode(ids))


@pytest.mark.parametrize("adapter,flags", [(LORA, ()), (LORA, ("--merge-adapter",)), (PTUNING, ())])
def test_cli_adapter_gives_the_reference_reply(adapter, flags):
    name = adapter.name.removesuffix("-tiny")
    result = run(str(BASE), "--adapter", str(adapter), *flags, "-p", "你好", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_reply(name)
    assert expected_reply(name) != expected_reply("chatglm2")


def test_cli_bad_adapter_is_one_line_and_exit_1(tmp_path):
    broken = shutil.copytree(LORA, tmp_path / "broken-lora")
    (broken / "adapter_model.bin").unlink()
    result = run(str(BASE), "--adapter", str(broken), "-p", "你好", *GREEDY)
    assert result.returncode == 1
    assert "broken-lora: adapter weights missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def logits_of(app) -> torch.Tensor:
    with torch.inference_mode():
        return app.manager.current.model(input_ids=reference_logits("chatglm2")["input_ids"]).logits


def test_adapter_command_on_off_and_back(tmp_path):
    from glmrepl.repl.commands import TABLE

    app = loaded_app(BASE)
    base = logits_of(app)
    assert TABLE.dispatch(app, "/adapter").text.startswith("no adapter")
    switched = TABLE.dispatch(app, f"/adapter {PTUNING}")
    assert isinstance(switched, Text) and "chatglm2-ptuning-tiny (P-tuning v2, 4 prefix tokens)" in switched.text
    assert torch.allclose(logits_of(app), reference_logits("chatglm2-ptuning")["logits"], atol=1e-4, rtol=0)

    switched = TABLE.dispatch(app, f"/adapter {LORA}")  # replaces the prefix
    assert "chatglm2-lora-tiny (LoRA r=4" in switched.text
    assert torch.allclose(logits_of(app), reference_logits("chatglm2-lora")["logits"], atol=1e-4, rtol=0)
    assert "adapter: chatglm2-lora-tiny" in TABLE.dispatch(app, "/device").text

    TABLE.dispatch(app, f"/save {tmp_path / 'chat.json'}")
    assert json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))["adapter"] == str(LORA)

    off = TABLE.dispatch(app, "/adapter off")
    assert isinstance(off, Text) and "the base model again" in off.text
    assert torch.allclose(logits_of(app), base, atol=1e-5, rtol=0)  # the sums may run in another order
    assert isinstance(TABLE.dispatch(app, "/adapter off"), Error)


def test_load_puts_the_saved_adapter_back(tmp_path):
    from glmrepl.repl.commands import TABLE

    app = loaded_app(BASE)
    TABLE.dispatch(app, f"/adapter {PTUNING}")
    TABLE.dispatch(app, f"/save {tmp_path / 'chat.json'}")
    fresh = loaded_app(BASE)
    results = TABLE.dispatch(fresh, f"/load {tmp_path / 'chat.json'}")
    assert "as when it was saved" in results[-1].text
    assert fresh.manager.current.adapter.info.path == PTUNING
    assert torch.allclose(logits_of(fresh), reference_logits("chatglm2-ptuning")["logits"], atol=1e-4, rtol=0)


def test_quantize_waits_for_the_lora_to_come_off():
    from glmrepl.repl.commands import TABLE

    app = loaded_app(BASE)
    TABLE.dispatch(app, f"/adapter {LORA}")
    result = TABLE.dispatch(app, "/quantize 8")
    assert isinstance(result, Error) and "take it off, quantize, then put it on again" in result.message
    TABLE.dispatch(app, "/adapter off")
    assert isinstance(TABLE.dispatch(app, "/quantize 8"), Text)
    switched = TABLE.dispatch(app, f"/adapter {LORA}")  # LoRA beside the new int8 layers
    assert isinstance(switched, Text), switched
    # int8 rounding moves the logits a little; without the LoRA they would be 2.2 away (base vs adapter)
    assert (logits_of(app) - reference_logits("chatglm2-lora")["logits"]).abs().max() < 0.5


def test_failed_switch_keeps_the_adapter_in_use(tmp_path, qwen_checkpoint):
    from glmrepl.repl.commands import TABLE

    app = loaded_app(BASE)
    TABLE.dispatch(app, f"/adapter {LORA}")
    with_lora = logits_of(app)
    other = shutil.copytree(PTUNING, tmp_path / "ptuning-28-layers")
    config = json.loads((other / "config.json").read_text(encoding="utf-8"))
    (other / "config.json").write_text(json.dumps({**config, "num_layers": 28}), encoding="utf-8")
    result = TABLE.dispatch(app, f"/adapter {other}")
    assert isinstance(result, Error) and "another model size: layers 28" in result.message
    assert app.manager.current.adapter.info.path == LORA
    assert torch.equal(logits_of(app), with_lora)
    assert isinstance(TABLE.dispatch(app, "/adapter off"), Text)


def test_loading_an_adapter_folder_as_a_model_says_how_to_use_it():
    from glmrepl.repl.commands import TABLE

    app = loaded_app(BASE)
    result = TABLE.dispatch(app, f"/model {LORA}")
    if not isinstance(result, Error):  # the load runs in the background: wait for its verdict
        result.job.wait()
        message = str(result.job.error)
    else:
        message = result.message
    assert "chatglm2-lora-tiny is an adapter" in message and "--adapter" in message
    assert app.manager.current.info.path == BASE


def test_list_shows_adapters_with_their_base(tmp_path):
    for folder in (BASE, LORA, PTUNING):
        shutil.copytree(folder, tmp_path / folder.name)
    result = run("list", "--models-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "LoRA adapter" in rows["chatglm2-lora-tiny"]
    assert "adapter for THUDM/chatglm2-6b" in rows["chatglm2-lora-tiny"]
    assert "P-tuning v2 adapter" in rows["chatglm2-ptuning-tiny"]
    assert "adapter for THUDM/chatglm2-6b" in rows["chatglm2-ptuning-tiny"]
    assert "ready" in rows["chatglm2-tiny"]

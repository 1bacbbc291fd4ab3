import socket

import pytest
import torch
from support import loaded_app, make_app

from glmrepl.engine.conversation.formats import ChatTemplateFormat, CompletionFormat
from glmrepl.engine.errors import CheckpointError, DeviceError, LoadCancelled
from glmrepl.engine.models.manager import LoadJob, LoadRequest, load_model


def test_loads_a_chat_model_and_a_base_model_with_the_right_format(qwen_checkpoint, gpt2_checkpoint):
    app = loaded_app(qwen_checkpoint)
    loaded = app.manager.current
    assert isinstance(loaded.prompt_format, ChatTemplateFormat)
    assert loaded.info.context_length == 512 and loaded.info.placement.describe() == "cpu float32"
    app.manager.load(app.load_request(str(gpt2_checkpoint)))
    assert isinstance(app.manager.current.prompt_format, CompletionFormat)
    assert app.manager.current.model.dtype == torch.float32


def test_a_failed_load_keeps_the_current_model_working(qwen_checkpoint, gpt2_checkpoint, copy_checkpoint):
    app = loaded_app(gpt2_checkpoint)
    broken = copy_checkpoint(qwen_checkpoint)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        app.manager.load(app.load_request(str(broken)))
    assert app.manager.current.info.path == gpt2_checkpoint
    app.session.add_user("Once upon a time")
    run = app.plan_reply()  # a Reply: iterating it gives its place back
    assert "".join(run) and run.stats.new_tokens == 8  # the old model still replies


class CancelWhenWeightsStart(LoadJob):
    """Presses Ctrl-C the moment weights start loading, i.e. inside transformers' own loop."""

    @property
    def stage(self):
        return self._stage

    @stage.setter
    def stage(self, value):
        self._stage = value
        if value == "loading weights":
            self.cancel()


def test_cancel_inside_the_weight_loading_loop(qwen_checkpoint):
    request = LoadRequest(path=qwen_checkpoint, name="q", mode="cpu")
    job = CancelWhenWeightsStart(request)
    with pytest.raises(LoadCancelled, match="cancelled"):
        load_model(request, job)


def test_cancelled_background_load_keeps_the_previous_model(qwen_checkpoint, gpt2_checkpoint, monkeypatch):
    app = loaded_app(gpt2_checkpoint)
    monkeypatch.setattr("glmrepl.engine.models.manager.LoadJob", CancelWhenWeightsStart)
    job = app.start_load(str(qwen_checkpoint))
    job.wait(60)
    assert isinstance(job.error, LoadCancelled)
    assert app.manager.current.info.path == gpt2_checkpoint


def test_move_between_float32_and_bfloat16_on_cpu(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    manager = app.manager
    assert manager.move("cpu", "bfloat16").dtype == "bfloat16"
    assert {p.dtype for p in manager.current.model.parameters()} == {torch.bfloat16}
    app.session.add_user("hi")
    run = app.plan_reply()  # a Reply: iterating it gives its place back
    "".join(run)
    assert run.stats.new_tokens > 0
    manager.move("cpu", "float32")
    assert {p.dtype for p in manager.current.model.parameters()} == {torch.float32}
    assert manager.current.info.placement.describe() == "cpu float32"


def test_gpu_modes_without_cuda_give_a_clear_error(qwen_checkpoint, cpu_only_machine):
    app = loaded_app(qwen_checkpoint)
    for mode in ("gpu", "sharded"):
        with pytest.raises(DeviceError, match="needs a CUDA GPU"):
            app.manager.move(mode)
    with pytest.raises(DeviceError, match="float16 is not supported on CPU"):
        app.manager.move("cpu", "float16")
    assert app.manager.current.info.placement.mode == "cpu"


def test_switching_prompt_mode(qwen_checkpoint, gpt2_checkpoint):
    app = loaded_app(qwen_checkpoint)
    assert app.manager.set_prompt_mode("complete") == "completion"
    assert app.manager.set_prompt_mode("chat") == "chat template"
    app.manager.load(app.load_request(str(gpt2_checkpoint)))
    with pytest.raises(Exception, match="no chat template"):
        app.manager.set_prompt_mode("chat")


def test_loading_and_chatting_open_no_network_connection(qwen_checkpoint, monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    app = make_app()
    app.manager.load(app.load_request(str(qwen_checkpoint)))
    app.session.add_user("hello")
    "".join(app.plan_reply())
    assert attempts == []


def test_generation_config_end_of_turn_ids_also_stop_replies(qwen_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(qwen_checkpoint)
    import json

    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [0, 1]  # as Llama 3 lists <|eot_id|> beside the tokenizer's eos
    (folder / "generation_config.json").write_text(json.dumps(config))
    app = loaded_app(folder)
    eos = app.manager.current.tokenizer.eos_token_id
    assert app.manager.current.prompt_format.stop_token_ids == [eos, 0, 1]
    app.manager.set_prompt_mode("complete")
    assert app.manager.current.prompt_format.stop_token_ids == [eos, 0, 1]


def test_a_failed_move_with_an_empty_error_message_still_rolls_back(qwen_checkpoint, monkeypatch):
    from glmrepl.engine.devices import modes as devices

    app = loaded_app(qwen_checkpoint)
    real_place = devices.place_model
    calls = []

    def fail_once(model, placement):
        calls.append(placement.dtype)
        if len(calls) == 1:
            raise RuntimeError()  # no message at all
        real_place(model, placement)

    monkeypatch.setattr(devices, "place_model", fail_once)
    with pytest.raises(
        DeviceError,
        match=r"could not move the model to cpu bfloat16 \(RuntimeError\); "
        r"it stays on cpu float32",
    ):
        app.manager.move("cpu", "bfloat16")
    assert calls == ["bfloat16", "float32"]
    assert app.manager.current.info.placement.describe() == "cpu float32"

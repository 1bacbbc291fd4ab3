"""GPU and sharded modes on a real CUDA device (skipped without one)."""

from pathlib import Path

import pytest
from support import make_app

pytestmark = pytest.mark.gpu
DATA = Path(__file__).parent / "data" / "chatglm"


def reply(app, text="hello"):
    app.session.add_user(text)
    from glmrepl.engine.contract import record_reply

    reply = app.plan_reply()
    "".join(reply)
    record_reply(app.session, reply)
    return reply.stats


def test_gpu_half_then_back_to_cpu_frees_the_gpu(qwen_checkpoint):
    import torch

    app = make_app()
    app.options.mode = "gpu"
    app.manager.load(app.load_request(str(qwen_checkpoint)))
    model = app.manager.current.model
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.float16
    assert reply(app).new_tokens > 0
    app.manager.move("cpu")
    assert torch.cuda.memory_allocated() < 1 * 2**20
    assert reply(app).new_tokens > 0
    app.manager.move("gpu")
    assert torch.cuda.memory_allocated() > 0 and reply(app).new_tokens > 0


def test_sharded_with_a_small_budget_spills_to_cpu_only_with_offload(qwen_checkpoint):
    from glmrepl.engine.errors import DeviceError

    app = make_app()
    app.options.mode, app.options.max_gpu_memory = "sharded", "600KiB"
    with pytest.raises(DeviceError, match="does not fit"):
        app.manager.load(app.load_request(str(qwen_checkpoint)))
    app.options.offload = True
    app.manager.load(app.load_request(str(qwen_checkpoint)))
    summary = app.manager.current.info.placement.summary
    assert summary.startswith("cuda:0 layers") and "+ embeddings + head" in summary and "cpu layers" in summary
    assert reply(app).new_tokens > 0


def test_cpu_to_sharded_and_back_without_reading_the_disk(qwen_checkpoint, monkeypatch):
    app = make_app()
    app.manager.load(app.load_request(str(qwen_checkpoint)))
    monkeypatch.setattr("glmrepl.engine.models.manager.load_model", lambda *a, **k: pytest.fail("read the disk"))
    placement = app.manager.move("sharded")
    assert placement.summary.startswith("cuda:0 layers")
    assert reply(app).new_tokens > 0
    app.manager.move("cpu")
    assert reply(app).new_tokens > 0


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_chatglm_fixtures_in_gpu_mode(family):
    app = make_app()
    app.options.mode = "gpu"
    app.manager.load(app.load_request(str(DATA / f"{family}-tiny")))
    assert reply(app, "你好").new_tokens > 0


def test_a_reply_held_to_a_schema_and_its_logprobs_on_the_gpu(qwen_checkpoint):
    """The mask is filled on the CPU and applied to the GPU's logits; logprobs read them there."""
    import json

    from glmrepl.engine import GenerateRequest, OutputFormat, SamplingParams

    app = make_app()
    app.options.mode = "gpu"
    app.manager.load(app.load_request(str(qwen_checkpoint)))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    app.session.add_user("a number")
    sampling = SamplingParams(max_new_tokens=40, do_sample=False)
    request = GenerateRequest(app.session, sampling, output_format=OutputFormat(json.dumps(schema)), logprobs=3)
    with app.backend.generate(request) as held:
        "".join(held)
    assert held.finish_reason == "stop" and 0 <= json.loads(held.text)["n"] <= 9
    assert held.logprobs and all(entry.logprob <= 0 for entry in held.logprobs)

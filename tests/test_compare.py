"""Comparing the loaded model with another one (engine/generation/compare.py, comparing.py).

The figures are checked against a direct computation from two plain forwards, against the
model itself (everything agrees, KL 0), and on the trained tiny Llama of trained.py against its
int8 and int4 quantizations, whose figures must stay close to the float model's and must not
when the scales are damaged. Both ways of sharing the memory (beside, one after the other) give
the same figures and leave the loaded model and the conversation as they were.
"""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
from support import loaded_app
from trained import grammar_text

from glmrepl.engine import ChatSession, GlmreplError, LoadOptions, RemoteBackend, Variant
from glmrepl.engine.generation import comparing
from glmrepl.engine.generation.compare import CompareCancelled, Divergence, greedy_agreement
from glmrepl.engine.models import loading
from glmrepl.engine.quant.layers import QuantizedLinear

DATA = Path(__file__).parent / "data" / "chatglm"
HELD_OUT = grammar_text(20, seed=99)
PROMPT = "The small cat sees"


@pytest.fixture(scope="module")
def app(trained_checkpoint):
    return loaded_app(trained_checkpoint)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "held-out.txt"
    path.write_text(HELD_OUT)
    return path


def conversation(*messages: str) -> ChatSession:
    session = ChatSession()
    for index, text in enumerate(messages):
        (session.add_user if index % 2 == 0 else session.add_assistant)(text)
    return session


def finished(job):
    assert job.wait(300)
    if job.error is not None:
        raise job.error
    return job.result


def itself(app) -> Variant:
    loaded = app.manager.current
    return Variant(options=LoadOptions(mode="cpu").for_model(loaded.info.path, loaded.info.name))


@pytest.fixture
def one_after_the_other(monkeypatch):
    """The two models do not fit in memory together (whatever this machine has)."""
    monkeypatch.setattr(comparing, "fits_beside", lambda current, request: False)


@pytest.fixture
def damaged_scales(monkeypatch):
    """The other model's quantized layers load with scales half again too large."""
    load = loading.load_model

    def damaged(request, job=None):
        loaded = load(request, job)
        with torch.no_grad():
            for layer in loaded.model.modules():
                if isinstance(layer, QuantizedLinear) and layer is not loaded.model.get_output_embeddings():
                    layer.weight_scale.mul_(1.5)
        return loaded

    monkeypatch.setattr(loading, "load_model", damaged)


# -- the arithmetic ---------------------------------------------------------------------


def test_greedy_agreement_counts_the_common_beginning_only():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (4, 4)
    assert greedy_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == (2, 4)  # the 4s after the split do not count
    assert greedy_agreement([1, 2], [1, 2, 3]) == (2, 3)
    assert greedy_agreement([], []) == (0, 0)


def test_divergence_is_the_textbook_kl_and_top1():
    reference = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    other = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), -1)
    divergence = Divergence()
    divergence.add(reference, other, [0, 2])
    p = reference.exp()
    expected = [float((p[i] * (reference[i] - other[i])).sum()) for i in range(2)]
    figures = divergence.figures()
    assert divergence.kl == pytest.approx(expected) and expected[1] == pytest.approx(0, abs=1e-7)
    assert figures.mean_kl == pytest.approx(sum(expected) / 2) and figures.max_kl == pytest.approx(expected[0])
    assert figures.same_top == 0.5  # argmax 0 against 1, then 2 against 2
    assert figures.reference_nll == pytest.approx(-float(reference[0, 0] + reference[1, 2]) / 2)
    wider = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0, 5.0]]), -1)  # a padded vocabulary
    narrow = Divergence()
    narrow.add(reference[:1], wider, [0])
    assert narrow.kl == pytest.approx([expected[0]], rel=1e-5)  # cut to 3 columns and normalized again


def test_text_figures_equal_two_plain_forwards(app, trained_checkpoint, text_file):
    """One window holds the whole text: the figures are those of two full forwards with transformers."""
    short = text_file.with_name("short.txt")
    short.write_text(grammar_text(2, seed=7))  # 2 sentences: within one window of 64 (BOS included)
    result = finished(app.backend.start_compare_text(Variant(quantize=8), short, 64, 32))
    reference = app.manager.current
    other = loading.load_model(LoadOptions(mode="cpu", quantize=8).for_model(trained_checkpoint, "trained"))
    ids = reference.tokenizer(short.read_text())["input_ids"]  # the BOS, then the text
    assert len(ids) <= 64 and result.windows == 1
    with torch.inference_mode():
        p = torch.log_softmax(reference.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        q = torch.log_softmax(other.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
    figures = result.figures
    assert figures.tokens == len(ids) - 1
    assert figures.mean_kl == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-9)
    assert figures.max_kl == pytest.approx(float(kl.max()), rel=1e-3, abs=1e-9)
    assert figures.same_top == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    targets = torch.tensor(ids[1:]).unsqueeze(-1)
    assert figures.reference_nll == pytest.approx(-float(p.gather(-1, targets).mean()), rel=1e-5)
    assert figures.other_nll == pytest.approx(-float(q.gather(-1, targets).mean()), rel=1e-5)


# -- a model with itself ------------------------------------------------------------------


@pytest.mark.parametrize("order", ["beside", "after"])
def test_a_model_with_itself_agrees_everywhere(app, order, request):
    if order == "after":
        request.getfixturevalue("one_after_the_other")
    session = conversation("Every dog likes", "a cat.", PROMPT)
    before, saved = app.manager.current, session.to_dict()
    result = finished(app.backend.start_compare(itself(app), session, 24))
    assert result.order == order
    assert result.reply == result.other_reply and result.reply
    assert result.agreement == 1.0 and result.agreeing == result.longest > 0
    figures = result.figures
    assert figures.tokens == result.longest
    assert figures.mean_kl == pytest.approx(0, abs=1e-6) and figures.max_kl == pytest.approx(0, abs=1e-6)
    assert figures.same_top == 1.0 and figures.reference_nll == pytest.approx(figures.other_nll, abs=1e-6)
    assert session.to_dict() == saved  # only read
    assert (app.manager.current is before) == (order == "beside")
    assert app.manager.current.info.path == before.info.path
    assert app.backend.scheduler.admitted == 0
    assert "greedy tokens that agree: 100.0%" in result.describe()


def test_the_reply_compared_is_the_greedy_one_to_the_last_message(app):
    """What followed the last user message is left out; both replies are greedy continuations."""
    from glmrepl.engine import GenerateRequest, SamplingParams, record_reply

    session = conversation(PROMPT)
    reply = app.backend.generate(GenerateRequest(session, SamplingParams(max_new_tokens=12, temperature=0)))
    list(reply)
    record_reply(session, reply)
    result = finished(app.backend.start_compare(Variant(quantize=8), session, 12))
    assert result.reply == reply.text.strip()
    assert session.last_reply is not None and session.turns == 1


# -- the trained model and its quantizations -------------------------------------------------

# Measured on the trained fixture (24-token greedy reply to PROMPT; HELD_OUT in windows of 64,
# stride 32): int8: replies agree 100%, KL mean 7e-6 / max 3e-5 on the reply, 6e-6 / 2.4e-4 on
# the text, same top-1 100%; int4: replies agree 100%, KL mean 7e-4 / max 5e-3 on the reply,
# 6e-4 / 1.2e-2 on the text, same top-1 100% and 99.8%. Scales half again too large: replies
# agree 8-13%, KL mean above 0.5, same top-1 67-75%. The bounds sit between the two.
BOUNDS = {8: {"mean": 0.002, "max": 0.05, "top": 0.98}, 4: {"mean": 0.01, "max": 0.2, "top": 0.97}}


def near_float(figures, bits: int) -> bool:
    bound = BOUNDS[bits]
    return figures.mean_kl < bound["mean"] and figures.max_kl < bound["max"] and figures.same_top >= bound["top"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_figures_stay_near_the_float_model(app, text_file, bits):
    reply = finished(app.backend.start_compare(Variant(quantize=bits), conversation(PROMPT), 24))
    assert reply.other == f"{app.manager.current.info.name} int{bits}"
    assert reply.agreement >= 0.9 and near_float(reply.figures, bits)
    assert reply.figures.mean_kl > 0  # the weights did change
    text = finished(app.backend.start_compare_text(Variant(quantize=bits), text_file, 64, 32))
    assert text.figures.tokens == len(app.manager.current.tokenizer.encode(HELD_OUT, add_special_tokens=False))
    assert near_float(text.figures, bits) and text.figures.mean_kl > 0
    assert math.exp(text.figures.other_nll) == pytest.approx(math.exp(text.figures.reference_nll), rel=0.05)


@pytest.mark.usefixtures("damaged_scales")
@pytest.mark.parametrize("bits", [8, 4])
def test_damaged_scales_fail_the_same_bounds(app, text_file, bits):
    reply = finished(app.backend.start_compare(Variant(quantize=bits), conversation(PROMPT), 24))
    assert reply.agreement < 0.9 and not near_float(reply.figures, bits)
    text = finished(app.backend.start_compare_text(Variant(quantize=bits), text_file, 64, 32))
    assert not near_float(text.figures, bits)
    assert text.figures.same_top < 0.9 and text.figures.mean_kl > 0.1


def test_one_after_the_other_gives_the_same_figures_and_the_model_back_as_it_was(
    trained_checkpoint, text_file, monkeypatch
):
    app = loaded_app(trained_checkpoint)
    app.backend.quantize(8)  # in place: the model comes back quantized
    beside = finished(app.backend.start_compare_text(Variant(dtype="bfloat16"), text_file, 64, 32))
    monkeypatch.setattr(comparing, "fits_beside", lambda current, request: False)
    load_job, model, freed_first = app.manager.job, weakref.ref(app.manager.current.model), []
    load = loading.load_model

    def load_noting(request, job=None):
        if request.dtype == "bfloat16":  # the other model: the loaded one's memory is given back by now
            gc.collect()
            freed_first.append(model() is None)
        return load(request, job)

    monkeypatch.setattr(loading, "load_model", load_noting)
    after = finished(app.backend.start_compare_text(Variant(dtype="bfloat16"), text_file, 64, 32))
    assert (beside.order, after.order) == ("beside", "after") and freed_first == [True]
    assert after.figures == beside.figures
    assert "do not fit in memory together" in after.describe()
    status = app.backend.status()
    assert status.placement.describe() == "cpu float32 int8"
    assert app.manager.job is load_job  # the reload is no load for the REPL to report


# -- Ctrl-C and failures leave everything as it was -------------------------------------------


@pytest.mark.parametrize("order", ["beside", "after"])
@pytest.mark.parametrize("when", ["this model's reply", "loading", "the other's reply"])
def test_cancelled_anywhere_keeps_the_model_and_the_conversation(app, order, when, request, monkeypatch):
    if order == "after":
        request.getfixturevalue("one_after_the_other")
    session = conversation(PROMPT)
    saved, path = session.to_dict(), app.manager.current.info.path
    step = comparing.CompareJob.step
    name = app.manager.current.info.name
    other = f"{name} int4"
    stopping_stage = {"this model's reply": f"{name}'s reply", "the other's reply": f"{other}'s reply"}.get(when)

    def stage(job, stage_name):
        progress = step(job, stage_name)
        if stage_name == stopping_stage:
            job.cancel()
        return progress

    monkeypatch.setattr(comparing.CompareJob, "step", stage)
    if when == "loading":
        load = loading.load_model

        def cancelled_load(request, job=None):
            if job is not None and job.cancel_event is not None and request.quantize == 4:
                job.cancel_event.set()
            return load(request, job)

        monkeypatch.setattr(loading, "load_model", cancelled_load)
    job = app.backend.start_compare(Variant(quantize=4), session, 24)
    assert job.wait(300)
    assert isinstance(job.error, CompareCancelled) and job.result is None
    assert str(job.error) == f"compare with {other} cancelled"
    assert session.to_dict() == saved
    assert app.manager.current is not None and app.manager.current.info.path == path
    assert app.backend.status().placement.quant_bits == 0
    assert app.backend.scheduler.admitted == 0


@pytest.mark.parametrize("order", ["beside", "after"])
def test_another_model_that_cannot_load_is_one_line_and_changes_nothing(app, order, copy_checkpoint, request):
    if order == "after":
        request.getfixturevalue("one_after_the_other")
    broken = copy_checkpoint(app.manager.current.info.path, "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    session = conversation(PROMPT)
    job = app.backend.start_compare(Variant(options=LoadOptions(mode="cpu").for_model(broken, "broken")), session, 8)
    assert job.wait(300) and job.result is None
    assert isinstance(job.error, GlmreplError) and "\n" not in str(job.error) and "broken" in str(job.error)
    assert app.manager.current is not None and app.backend.status().name == "tiny-llama-trained"


def test_what_cannot_be_compared_is_said_before_anything_runs(app, text_file, qwen_checkpoint):
    with pytest.raises(GlmreplError, match="no message to reply to"):
        app.backend.start_compare(Variant(quantize=8), ChatSession(), 8)
    with pytest.raises(GlmreplError, match="no message to reply to"):
        app.backend.start_compare(Variant(quantize=8), ChatSession("a system prompt, and no message"), 8)
    with pytest.raises(GlmreplError, match="no such file"):
        app.backend.start_compare_text(Variant(quantize=8), text_file.with_name("absent.txt"))
    with pytest.raises(GlmreplError, match="longer than the model's context"):
        app.backend.start_compare_text(Variant(quantize=8), text_file, 65)
    qwen = Variant(options=LoadOptions(mode="cpu").for_model(qwen_checkpoint, "qwen"))
    job = app.backend.start_compare_text(qwen, text_file, 64, 32)
    assert job.wait(300) and str(job.error) == "qwen has another tokenizer: comparing on a text needs the same one"
    mixed = finished(app.backend.start_compare(qwen, conversation(PROMPT), 6))
    assert mixed.figures is None and mixed.other_reply is not None
    assert mixed.describe().startswith("the tokenizers differ: the replies are compared as text only")


def test_a_remote_backend_refuses_in_one_line():
    backend = RemoteBackend("http://127.0.0.1:9/v1")
    assert not backend.can("compare")
    with pytest.raises(GlmreplError) as refused:
        backend.start_compare(Variant(quantize=4), conversation(PROMPT), 8)
    assert str(refused.value) == (
        "comparing with another model is not available on a remote server (the model runs in the server's process)"
    )


# -- every ChatGLM generation ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatglm1-tiny", "chatglm2-tiny", "chatglm3-tiny", "glm4-tiny"])
def test_every_chatglm_generation_agrees_with_itself(name):
    app = loaded_app(DATA / name)
    session = conversation("你好", "hi", "hello there")
    result = finished(app.backend.start_compare(itself(app), session, 10))
    assert result.figures is not None and result.agreement == 1.0 and result.reply == result.other_reply
    assert result.figures.max_kl == pytest.approx(0, abs=1e-6) and result.figures.same_top == 1.0


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("chatglm2-tiny", {"other": "chatglm2-int4-tiny"}),
        ("chatglm3-tiny", {"quantize": 8}),
        ("chatglm2-tiny", {"adapter": DATA / "chatglm2-lora-tiny"}),
    ],
    ids=["stored-int4", "int8", "lora"],
)
def test_chatglm_variants_give_figures(name, variant):
    app = loaded_app(DATA / name)
    other = variant.pop("other", None)
    options = LoadOptions(mode="cpu").for_model(DATA / other, other) if other else None
    result = finished(app.backend.start_compare(Variant(options=options, **variant), conversation("你好"), 10))
    figures = result.figures
    assert figures is not None and figures.tokens > 0
    assert figures.mean_kl > 0 and figures.max_kl >= figures.p99_kl >= 0  # another model: not the same
    assert app.manager.current.adapter is None and app.backend.status().placement.quant_bits == 0

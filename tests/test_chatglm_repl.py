"""The ChatGLM fixtures in the REPL: they chat like any other model, and the toolbar names the generation."""

from pathlib import Path

import pytest
import torch
from support import drive_repl, loaded_app

from glmrepl.repl.toolbar import Toolbar

DATA = Path(__file__).parent / "data" / "chatglm"
ENTER = "\r"
FAMILIES = ["chatglm1", "chatglm2", "chatglm3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_retry_clear_and_toolbar(family):
    app = loaded_app(DATA / f"{family}-tiny", max_new_tokens=6)
    assert family in Toolbar(app)()
    drive_repl(app, "你好" + ENTER + "再来一次" + ENTER)
    assert app.session.turns == 2 and all(m.content for m in app.session.messages)
    second_reply = app.session.messages[-1].content
    drive_repl(app, "/retry" + ENTER)
    assert app.session.turns == 2 and app.session.messages[-1].content == second_reply  # greedy
    drive_repl(app, "/clear" + ENTER + "hello" + ENTER)
    assert app.session.turns == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cpu_mode_replies(family):
    app = loaded_app(DATA / f"{family}-tiny", max_new_tokens=4)
    for dtype in ("bfloat16", "float32"):
        app.manager.move("cpu", dtype)
        assert {p.dtype for p in app.manager.current.model.parameters()} == {getattr(torch, dtype)}
        drive_repl(app, "hi" + ENTER)
        assert app.session.last_reply is not None
    assert app.session.turns == 2


def test_no_python_file_is_needed_or_run():
    assert not list(DATA.glob("*/*.py"))
    app = loaded_app(DATA / "chatglm2-tiny")
    assert app.manager.current.info.family == "chatglm2"


def test_the_load_line_says_which_generation_and_why():
    from support import make_app

    app = make_app()
    out = drive_repl(app, f"/model {DATA / 'chatglm3-tiny'}" + ENTER)
    lines = out.splitlines()
    loaded = next(i for i, line in enumerate(lines) if line.startswith("loaded chatglm3-tiny"))
    assert "chatglm3" in lines[loaded] and lines[loaded + 1].startswith("  chatglm3: ")
    assert app.manager.current.info.family_reason in lines[loaded + 1]

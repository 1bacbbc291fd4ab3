"""/ppl FILE in the REPL and piped input, and `glmrepl check DIR --ppl FILE`, on the trained tiny Llama."""

from __future__ import annotations

import io
import re

import pytest
from support import ctrl_c_once_a_bar_shows, drive_repl, loaded_app, make_app
from trained import grammar_text

from glmrepl.cli.main import main
from glmrepl.engine.generation.perplexity import perplexity_of_text
from glmrepl.engine.remote.backend import RemoteBackend
from glmrepl.repl.app import App
from glmrepl.repl.commands import TABLE
from glmrepl.repl.loop import run_piped

ENTER = "\r"
RESULT = re.compile(
    r"^perplexity ([0-9.,]+) over ([0-9,]+) tokens \((\d+) windows? of (\d+), stride (\d+)\) in [0-9.]+ s$", re.M
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    files = {
        "held-out.txt": grammar_text(12, seed=99).encode(),
        "long.txt": grammar_text(2000, seed=5).encode(),  # over a thousand windows: Ctrl-C comes first
        "latin1.txt": "café au lait".encode("latin-1"),
        "empty.txt": b"",
        "one-token.txt": b"a",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "a folder").mkdir()
    return folder


@pytest.fixture(scope="module")
def app(trained_checkpoint):
    return loaded_app(trained_checkpoint)


def piped(app: App, *lines: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run_piped(app, [line + "\n" for line in lines], out, err)
    return status, out.getvalue(), err.getvalue()


def test_ppl_prints_one_result_line_equal_to_the_engine(app, texts):
    status, out, err = piped(app, f"/ppl {texts / 'held-out.txt'}")
    assert (status, err) == (0, "")
    match = RESULT.fullmatch(out.strip())
    assert match, out
    loaded = app.manager.current
    expected = perplexity_of_text(loaded.model, loaded.tokenizer, (texts / "held-out.txt").read_text(), 64, 32)
    assert match.group(1) == f"{expected.perplexity:,.2f}"
    assert match.groups()[1:] == (f"{expected.tokens:,}", str(expected.windows), "64", "32")
    assert app.backend.scheduler.admitted == 0  # the run gave the model back


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("", "usage: /ppl FILE"),
        ("absent.txt", "absent.txt: no such file"),
        ("a folder", "a folder is a folder: give a text file"),
        ("latin1.txt", "latin1.txt is not UTF-8 text (byte 3 is not valid UTF-8): give a text file"),
        ("empty.txt", "empty.txt is empty: there is no text to score"),
        ("one-token.txt", "the text is 1 token: it needs at least 2"),
    ],
)
def test_bad_input_is_one_line(app, texts, argument, message):
    status, out, err = piped(app, f"/ppl {texts / argument}" if argument else "/ppl", "/mode")
    assert status == 1
    assert len(err.splitlines()) == 1 and message in err
    assert "mode" in out  # the next line still ran


def test_no_model_and_a_remote_model(texts):
    _, _, err = piped(make_app(), f"/ppl {texts / 'held-out.txt'}")
    assert err.strip() == "error: no model is loaded: choose one with a MODEL argument"
    remote = App(RemoteBackend("http://127.0.0.1:9/v1"))
    status, _, err = piped(remote, f"/ppl {texts / 'held-out.txt'}")
    assert status == 1 and len(err.splitlines()) == 1
    assert "perplexity needs a local model" in err


def test_progress_bar_and_ctrl_c_keep_the_repl(app, texts, monkeypatch):
    """Ctrl-C (a real SIGINT) during a long run cancels it between windows; the next command runs."""
    started = []
    start = app.backend.start_perplexity

    def recording(*args, **kwargs):
        job = start(*args, **kwargs)
        started.append(job)
        return job

    monkeypatch.setattr(app.backend, "start_perplexity", recording)
    ctrl_c_once_a_bar_shows(monkeypatch, lambda job: job.scored)
    out = drive_repl(app, f"/ppl {texts / 'long.txt'}" + ENTER + f"/ppl {texts / 'held-out.txt'}" + ENTER, color=True)
    job = started[0]
    assert job.cancel_event.is_set() and job.done.is_set() and job.result is None
    assert re.search(r"\[#*\.*\] +\d+% perplexity of long\.txt: [0-9,]+/[0-9,]+ tokens \(Ctrl-C stops\)", out)
    assert re.search(r"perplexity cancelled after [0-9,]+ of [0-9,]+ tokens", out)
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).replace("\r", "\n")
    assert RESULT.search(plain)  # the second run, after the cancelled one
    assert app.backend.scheduler.admitted == 0


def test_help_and_path_completion(app, texts):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from glmrepl.repl.completer import CommandCompleter

    assert "/ppl FILE" in piped(app, "/help ppl")[1]
    completer = CommandCompleter(TABLE, app)
    typed = f"/ppl {texts}/he"
    found = [c.text for c in completer.get_completions(Document(typed), CompleteEvent())]
    assert found == [f"{texts}/held-out.txt"]
    typed = f"/ppl {texts}/a"
    assert [c.text for c in completer.get_completions(Document(typed), CompleteEvent())] == [f"{texts}/a folder/"]


# -- glmrepl check DIR --ppl FILE ------------------------------------------------------


def test_check_with_ppl_loads_and_scores(trained_checkpoint, texts, capsys, app):
    status = main(["check", str(trained_checkpoint), "--ppl", str(texts / "held-out.txt"), "--window", "40"])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    ready, result = out.strip().splitlines()
    assert ready == "ready"
    match = RESULT.fullmatch(result)
    assert match and match.group(4) == "40" and match.group(5) == "20"
    loaded = app.manager.current
    expected = perplexity_of_text(loaded.model, loaded.tokenizer, (texts / "held-out.txt").read_text(), 40, 20)
    assert match.group(1) == f"{expected.perplexity:,.2f}"


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--ppl", "absent.txt"], 1, "absent.txt: no such file"),
        (["--ppl", "held-out.txt", "--window", "65"], 1, "longer than the model's context (64)"),
        (["--ppl", "held-out.txt", "--adapter", "."], 1, "is not an adapter folder"),
        (["--window", "8"], 2, "--window goes with --ppl FILE"),
    ],
)
def test_check_ppl_errors_are_one_line(trained_checkpoint, texts, capsys, monkeypatch, extra, status, message):
    monkeypatch.chdir(texts)
    assert main(["check", str(trained_checkpoint), *extra]) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err

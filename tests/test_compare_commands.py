"""/compare in the REPL and piped input, and `glmrepl check A --compare B --ppl FILE`, on the
trained tiny Llama (trained.py) and a ChatGLM fixture."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from support import ctrl_c_once_a_bar_shows, drive_repl, loaded_app, make_app
from trained import grammar_text

from glmrepl.cli.main import main
from glmrepl.engine.generation import comparing
from glmrepl.engine.remote.backend import RemoteBackend
from glmrepl.repl.app import App
from glmrepl.repl.commands import TABLE
from glmrepl.repl.loop import run_piped

ENTER = "\r"
DATA = Path(__file__).parent / "data" / "chatglm"
AGREE = re.compile(
    r"^greedy tokens that agree: ([0-9.]+)% \(the replies begin with the same (\d+) of (\d+) tokens?\)$", re.M
)
KL = re.compile(
    r"KL divergence per token: mean ([0-9.]+), 99% ([0-9.]+), max ([0-9.]+); same top-1 ([0-9.]+)% "
    r"\(over (\d+) tokens?\)$",
    re.M,
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "held-out.txt").write_text(grammar_text(12, seed=99))
    (folder / "long.txt").write_text(grammar_text(400, seed=5))
    (folder / "not-a-checkpoint").mkdir()
    return folder


@pytest.fixture
def app(trained_checkpoint):
    return loaded_app(trained_checkpoint, max_new_tokens=16, stats=False)


def piped(app: App, *lines: str) -> tuple[int, str, str]:
    """Exit status, stdout, and the error lines on stderr (a reply's notes are left out)."""
    out, err = io.StringIO(), io.StringIO()
    status = run_piped(app, [line + "\n" for line in lines], out, err)
    errors = [line + "\n" for line in err.getvalue().splitlines() if not line.startswith("[reply reached")]
    return status, out.getvalue(), "".join(errors)


def test_compare_with_itself_shows_both_replies_and_full_agreement(app, trained_checkpoint):
    status, out, err = piped(app, "The small cat sees", "/history", f"/compare {trained_checkpoint}", "/history")
    assert (status, err.count("error")) == (0, 0), err
    history_before, rest = out.split("model ", 1)
    assert rest.count("user: The small cat sees") == 1  # the conversation after /compare: as before
    assert history_before.split("user:", 1)[1] == rest.split("user:", 1)[1]
    lines = rest.splitlines()
    assert lines[0].split() == ["greedy", "reply", "to", "the", "last", "message"]  # "model " was split off
    rows = lines[1:3]
    assert [row.split("  ")[0] for row in rows] == ["tiny-llama-trained"] * 2
    assert len(rows) == 2 and rows[0].split(None, 1)[1] == rows[1].split(None, 1)[1]
    agree, kl = AGREE.search(out), KL.search(out)
    assert agree and agree.group(1) == "100.0" and agree.group(2) == agree.group(3)
    assert kl and kl.groups()[:4] == ("0.000000", "0.000000", "0.000000", "100.0")
    assert "ran beside this model" in out
    assert app.backend.scheduler.admitted == 0


def test_compare_with_int4_through_the_real_repl(app):
    out = drive_repl(app, "The small cat sees" + ENTER + "/compare --quantize 4" + ENTER)
    assert "tiny-llama-trained int4" in out
    agree, kl = AGREE.search(out), KL.search(out)
    assert agree and float(agree.group(1)) >= 90
    assert kl and 0 < float(kl.group(1)) < 0.01 and float(kl.group(4)) >= 97
    assert app.session.turns == 1 and app.backend.status().placement.quant_bits == 0


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("", "usage: /compare MODEL|DIR"),
        ("--quantize 3", "--quantize takes 4 or 8 (bits per weight), not '3'"),
        ("--quantize", "--quantize needs a value"),
        ("--dtype float64", "--dtype takes auto, float32, bfloat16, float16, not 'float64'"),
        ("--bits 4", "unknown /compare argument '--bits': the options are --quantize, --dtype, --adapter"),
        ("one two", "/compare takes one model, not 'one' and 'two'"),
        ("'unclosed", "/compare: No closing quotation"),
        ("no-such-model", "no checkpoint named 'no-such-model'"),
        ("--adapter {texts}/not-a-checkpoint", "not-a-checkpoint is not an adapter folder"),
        ("{texts}/not-a-checkpoint", "not-a-checkpoint"),
    ],
)
def test_bad_arguments_are_one_line_and_the_next_line_runs(app, texts, argument, message):
    status, out, err = piped(app, "Every dog", f"/compare {argument.format(texts=texts)}".rstrip(), "/mode")
    assert status == 1
    assert len(err.splitlines()) == 1 and message in err, err
    assert "mode" in out.splitlines()[-1]  # the next line still ran
    assert app.session.turns == 1 and app.manager.current is not None


def test_no_message_no_model_and_a_remote_model(app):
    _, _, err = piped(app, "/compare --quantize 8")
    assert err.strip() == "error: the conversation has no message to reply to: say something first"
    _, _, err = piped(make_app(), "/compare --quantize 8")
    assert err.strip() == "error: no model is loaded: choose one with a MODEL argument"
    remote = App(RemoteBackend("http://127.0.0.1:9/v1"))
    status, _, err = piped(remote, "/compare --quantize 8")
    assert status == 1 and err.strip() == (
        "error: /compare is not available on a remote server (the model runs in the server's process)"
    )


def test_a_chatglm_fixture_against_its_stored_int4_copy():
    app = loaded_app(DATA / "chatglm2-tiny", max_new_tokens=8, stats=False)
    status, out, err = piped(app, "你好", f"/compare {DATA / 'chatglm2-int4-tiny'}")
    assert (status, err) == (0, ""), err
    assert re.search(r"^chatglm2-int4-tiny +\S", out, re.M)
    kl = KL.search(out)
    assert kl and float(kl.group(1)) > 0 and int(kl.group(5)) > 0
    assert app.session.turns == 1 and app.backend.status().name == "chatglm2-tiny"


@pytest.fixture
def slow_steps(monkeypatch):
    """Each token or window the comparison makes takes 50 ms longer, so Ctrl-C lands mid-run."""
    step = comparing.CompareJob.step

    def slow(job, stage):
        progress = step(job, stage)

        def slowly(done, total):
            time.sleep(0.05)
            progress(done, total)

        return slowly

    monkeypatch.setattr(comparing.CompareJob, "step", slow)


@pytest.mark.usefixtures("slow_steps")
def test_progress_bar_and_ctrl_c_keep_the_repl(app, monkeypatch):
    """Ctrl-C (a real SIGINT) during /compare cancels it; the conversation and the model stay."""
    ctrl_c_once_a_bar_shows(monkeypatch, lambda job: job.done_count)
    app.settings.set("max_new_tokens", 40)
    out = drive_repl(app, "The small cat" + ENTER + "/compare --quantize 8" + ENTER + "/history" + ENTER, color=True)
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out).replace("\r", "\n")
    assert re.search(r"\[#*\.*\] +\d+% compare with tiny-llama-trained int8: \S.* \(Ctrl-C stops\)", plain)
    assert "compare with tiny-llama-trained int8 cancelled" in plain
    assert "user: The small cat" in plain  # /history ran after it
    assert app.session.turns == 1 and app.backend.status().placement.quant_bits == 0
    assert app.backend.scheduler.admitted == 0


def test_help_lists_it_and_tab_completes_models(app):
    assert "/compare MODEL|VARIANT" in piped(app, "/help compare")[1]
    assert TABLE.find("compare").complete_args is not None


# -- glmrepl check A --compare B --ppl FILE ---------------------------------------------------

REPORT = re.compile(
    r"^compared (?P<other>.+) with (?P<name>\S+) over (?P<tokens>[0-9,]+) tokens \((?P<windows>\d+) windows? of "
    r"(?P<window>\d+), stride (?P<stride>\d+)\) in [0-9.]+ s \(.* ran beside .*\)\n"
    r"perplexity: \S+ (?P<ppl>[0-9.,]+), .* (?P<other_ppl>[0-9.,]+)\n"
    r"KL divergence per token: mean (?P<mean>[0-9.]+), 99% (?P<p99>[0-9.]+), max (?P<max>[0-9.]+)\n"
    r"same top-1: (?P<top>[0-9.]+)%$"
)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_check_compare_prints_the_figures(trained_checkpoint, texts, capsys, bits):
    quantize = ["--compare-quantize", str(bits)] if bits else []
    argv = ["check", str(trained_checkpoint), "--compare", str(trained_checkpoint), *quantize]
    status = main([*argv, "--ppl", str(texts / "held-out.txt"), "--window", "64"])
    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), err
    ready, report = out.split("\n", 1)
    assert ready == "ready"
    match = REPORT.fullmatch(report.strip())
    assert match, report
    assert match["other"] == "tiny-llama-trained" + (f" int{bits}" if bits else "")
    assert (match["window"], match["stride"]) == ("64", "32") and int(match["windows"]) > 1
    if bits is None:
        assert (match["mean"], match["max"], match["top"]) == ("0.000000", "0.000000", "100.00")
        assert match["ppl"] == match["other_ppl"]
    else:
        assert 0 < float(match["mean"]) < 0.01 and float(match["max"]) < 0.2 and float(match["top"]) >= 97


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--ppl", "absent.txt", "--compare", "SELF"], 1, "absent.txt: no such file"),
        (["--ppl", "held-out.txt", "--compare", "not-a-checkpoint"], 1, "--compare not-a-checkpoint: "),
        (["--ppl", "held-out.txt", "--compare", "absent"], 1, "absent does not exist"),
        (["--ppl", "held-out.txt", "--compare", "QWEN"], 1, "has another tokenizer"),
        (["--compare", "SELF"], 2, "--compare goes with --ppl FILE"),
        (["--ppl", "held-out.txt", "--compare-quantize", "4"], 2, "--compare-quantize goes with --compare DIR"),
    ],
)
def test_check_compare_errors_are_one_line(
    trained_checkpoint, qwen_checkpoint, texts, capsys, monkeypatch, extra, status, message
):
    monkeypatch.chdir(texts)
    swap = {"SELF": str(trained_checkpoint), "QWEN": str(qwen_checkpoint)}
    assert main(["check", str(trained_checkpoint), *[swap.get(word, word) for word in extra]]) == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.usefixtures("slow_steps")
def test_check_compare_ctrl_c_exits_130_with_one_line(trained_checkpoint, texts, capsys, monkeypatch):
    started = threading.Event()
    step = comparing.CompareJob.step

    def stage(job, name):
        progress = step(job, name)

        def counting(done, total):
            progress(done, total)
            if done:
                started.set()

        return counting

    monkeypatch.setattr(comparing.CompareJob, "step", stage)

    def press_ctrl_c():
        assert started.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    argv = ["check", str(trained_checkpoint), "--compare", str(trained_checkpoint), "--compare-quantize", "4"]
    assert main([*argv, "--ppl", str(texts / "long.txt"), "--window", "64", "--stride", "8"]) == 130
    out, err = capsys.readouterr()
    assert out == "ready\n"
    assert err.splitlines() == ["error: compare with tiny-llama-trained int4 cancelled"]

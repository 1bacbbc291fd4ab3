"""The REPL through a real PromptSession fed by pipe input."""

import json
from pathlib import Path

import pytest
from support import drive_repl, loaded_app, make_app

from glmrepl.repl.commands import TABLE
from glmrepl.repl.completer import CommandCompleter

ENTER = "\r"


def test_multi_turn_chat_streams_replies_and_keeps_history(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + "and again" + ENTER + "/history" + ENTER)
    assert app.session.turns == 2
    first, second = app.session.messages[1].content, app.session.messages[3].content
    assert first and second and first in out and second in out
    assert "user: hello" in out and "user: and again" in out
    assert out.count("tokens · first token") == 2  # one stats line per reply


def test_undo_retry_save_load_round_trip(qwen_checkpoint, tmp_path):
    app = loaded_app(qwen_checkpoint, temperature=0.9, seed=7)
    saved = tmp_path / "chat.json"
    drive_repl(app, "first" + ENTER + "second" + ENTER + "/undo" + ENTER + "/retry" + ENTER + f"/save {saved}" + ENTER)
    assert [m.content for m in app.session.messages if m.role == "user"] == ["first"]
    assert json.loads(saved.read_text())["messages"][0]["content"] == "first"
    reply_after_retry = app.session.messages[1].content

    other = make_app()
    out = drive_repl(other, f"/load {saved}" + ENTER + "/history" + ENTER)
    assert other.manager.current.info.path == qwen_checkpoint  # the model came with the conversation
    assert other.settings.get("seed") == 7
    assert f"assistant: {reply_after_retry}" in out


def test_retry_regenerates_with_a_different_seed(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint, temperature=1.0, max_new_tokens=12)
    drive_repl(app, "/set seed 1" + ENTER + "hi" + ENTER + "/set seed 2" + ENTER + "/retry" + ENTER)
    with_seed_2 = app.session.messages[-1].content
    drive_repl(app, "/set seed 1" + ENTER + "/retry" + ENTER)
    with_seed_1 = app.session.messages[-1].content
    assert app.session.turns == 1 and with_seed_1 != with_seed_2


def test_model_swap_keeps_the_conversation(qwen_checkpoint, gpt2_checkpoint):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + f"/model {gpt2_checkpoint}" + ENTER + "continue" + ENTER)
    assert app.manager.current.info.path == gpt2_checkpoint
    assert app.session.turns == 2
    assert "loaded tiny-gpt2 (GPT2LMHeadModel, cpu float32, completion)" in out


def test_broken_model_swap_reports_and_keeps_everything(qwen_checkpoint, copy_checkpoint):
    app = loaded_app(qwen_checkpoint)
    broken = copy_checkpoint(qwen_checkpoint)
    (broken / "config.json").write_text("{oops")
    out = drive_repl(app, "hello" + ENTER + f"/model {broken}" + ENTER + "still here?" + ENTER)
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "config.json" in error_lines[0] and "still using" in error_lines[0]
    assert app.manager.current.info.path == qwen_checkpoint and app.session.turns == 2


def test_unknown_command_suggests_the_closest(qwen_checkpoint):
    out = drive_repl(
        make_app(), "/modle" + ENTER + "/set temperature hot" + ENTER + "/set tempreature 1" + ENTER + "/foo" + ENTER
    )
    assert "unknown command /modle — did you mean /model?" in out
    assert "unknown command /foo (/help lists them" in out  # nothing close: no far-fetched /tools
    assert "temperature must be a number from 0 to 10, not 'hot'" in out
    assert "did you mean temperature?" in out


def test_double_slash_sends_a_message_starting_with_slash(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "//etc/passwd is a file" + ENTER)
    assert app.session.messages[0].content == "/etc/passwd is a file"


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_exits(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "this is discarded\x03" + "kept" + ENTER + "\x04" + "never read" + ENTER)
    assert [m.content for m in app.session.messages if m.role == "user"] == ["kept"]


def test_alt_enter_inserts_a_newline_instead_of_sending(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "line one\x1b\rline two" + ENTER)
    assert app.session.messages[0].content == "line one\nline two"


def test_bracketed_paste_never_submits_line_by_line(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "\x1b[200~first line\nsecond line\n\x1b[201~" + ENTER)
    assert app.session.turns == 1
    assert app.session.messages[0].content == "first line\nsecond line"


def test_a_message_typed_while_loading_waits_for_the_load(qwen_checkpoint):
    app = make_app()
    app.start_load(str(qwen_checkpoint))
    drive_repl(app, "are you there?" + ENTER)
    assert app.session.turns == 1 and app.session.messages[1].role == "assistant"


def test_without_a_model_messages_get_a_clear_error_and_commands_work():
    app = make_app()
    out = drive_repl(app, "hello" + ENTER + "/help" + ENTER)
    assert "error: no model is loaded: choose one with /model" in out
    assert "/retry" in out and app.session.turns == 0


def test_help_and_completion_read_the_same_table(qwen_checkpoint):
    from prompt_toolkit.document import Document

    app = make_app()
    out = drive_repl(app, "/help" + ENTER + "/help set" + ENTER)
    for command in TABLE.commands:
        assert command.usage in out
    completer = CommandCompleter(TABLE, app)

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert complete("/de") == ["device"]
    assert set(complete("/device ")) == {"cpu", "gpu", "sharded", "auto"}
    assert complete("/set temp") == ["temperature"]
    assert complete("hello /de") == []


def test_model_names_complete_from_the_models_dir(qwen_checkpoint, tmp_path):
    import shutil

    from prompt_toolkit.document import Document

    shutil.copytree(qwen_checkpoint, tmp_path / "my-qwen")
    app = make_app(models_dir=tmp_path)
    completer = CommandCompleter(TABLE, app)
    assert [c.text for c in completer.get_completions(Document("/model my"), None)] == ["my-qwen"]
    out = drive_repl(app, "/model" + ENTER + "/model my-qwen" + ENTER)
    assert "my-qwen" in out and app.manager.current.info.name == "my-qwen"


def test_context_budget_drops_old_turns_and_says_so(qwen_checkpoint, copy_checkpoint):
    short = copy_checkpoint(qwen_checkpoint)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(config))
    app = loaded_app(short, max_new_tokens=8)
    out = drive_repl(app, "one two three four" + ENTER + "five six seven eight" + ENTER + "nine ten eleven" + ENTER)
    assert "turn(s) no longer fit the context" in out
    assert app.session.turns == 3  # history itself is kept


def test_copy_needs_a_terminal_and_sends_osc52_on_one(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    assert "/copy needs a terminal" in drive_repl(app, "hi" + ENTER + "/copy" + ENTER)
    out = drive_repl(app, "/copy" + ENTER, color=True)
    import base64

    payload = base64.b64encode(app.session.messages[-1].content.encode()).decode()
    assert f"\x1b]52;c;{payload}\x07" in out


def test_next_lists_likely_tokens_without_changing_the_conversation(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + "/next 4" + ENTER + "/next 0" + ENTER)
    assert "4 most likely next tokens" in out and "probability" in out
    assert "from 1 to 100, not 0" in out
    assert app.session.turns == 1


@pytest.mark.parametrize(
    "line, expected",
    [
        ("/device gpu", "needs a CUDA GPU"),
        ("/device warp", "unknown device argument 'warp'"),
        ("/mode banana", "usage: /mode chat|complete"),
        ("/save", "usage: /save FILE"),
        ("/load /nonexistent/chat.json", "no such file"),
    ],
)
def test_bad_commands_give_one_line_errors_and_the_repl_goes_on(qwen_checkpoint, line, expected, cpu_only_machine):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + line + ENTER + "still fine" + ENTER)
    assert expected in out
    assert app.session.turns == 2


def test_an_unexpected_failure_is_reported_and_the_session_goes_on(qwen_checkpoint, monkeypatch):
    app = loaded_app(qwen_checkpoint)
    real_plan = app.plan_reply
    calls = []

    def flaky_plan():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("template exploded")
        return real_plan()

    monkeypatch.setattr(app, "plan_reply", flaky_plan)
    out = drive_repl(app, "one" + ENTER + "two" + ENTER + "three" + ENTER)
    assert "error: unexpected RuntimeError: template exploded (the conversation is kept)" in out
    assert [m.content for m in app.session.messages if m.role == "user"] == ["one", "two", "three"]
    assert app.session.messages[-1].role == "assistant"


def test_ctrl_c_on_an_empty_line_cancels_a_load_in_progress(qwen_checkpoint, gpt2_checkpoint):
    import threading

    from glmrepl.engine.models.manager import LoadJob

    app = loaded_app(gpt2_checkpoint)
    job = LoadJob(app.load_request(str(qwen_checkpoint)))  # a load that is "running" until we finish it
    app.manager.job = job
    cancelled = threading.Event()
    threading.Thread(target=lambda: (job.cancel_event.wait(30), cancelled.set())).start()
    drive_repl(app, "typed\x03" + "\x03")  # the first Ctrl-C only clears the line
    assert cancelled.wait(5) and job.cancel_event.is_set()
    assert app.manager.current.info.path == gpt2_checkpoint


def test_model_listing_reads_the_same_cells_as_glmrepl_list(qwen_checkpoint, tmp_path):
    import io
    import shutil
    from contextlib import redirect_stdout

    from glmrepl.cli import tools

    shutil.copytree(qwen_checkpoint, tmp_path / "my-qwen")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    app = loaded_app(tmp_path / "my-qwen")
    app.models_dir = tmp_path
    listing = drive_repl(app, "/model" + ENTER)
    cli = io.StringIO()
    with redirect_stdout(cli):
        tools.main(["list", "--models-dir", str(tmp_path)])
    repl_rows = {
        line.split()[0].lstrip("*"): line.split(None, 5)[1:]
        for line in listing.splitlines()
        if line.startswith(("*my-qwen", "broken"))
    }
    cli_rows = {line.split()[0]: line for line in cli.getvalue().splitlines()[1:]}
    assert listing.count("*my-qwen") == 1  # the loaded one is marked
    for name, cells in repl_rows.items():
        for cell in cells[:4]:  # architecture, params, dtype, size
            assert cell in cli_rows[name]
    assert "not ready:" in listing


def test_model_listing_includes_the_folders_beside_the_loaded_model(
    qwen_checkpoint, gpt2_checkpoint, tmp_path, monkeypatch
):
    import shutil

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(qwen_checkpoint, elsewhere / "chat-model")
    shutil.copytree(gpt2_checkpoint, elsewhere / "base-model")
    (elsewhere / "notes").mkdir()  # not a checkpoint: not listed
    monkeypatch.chdir(tmp_path)
    app = make_app(models_dir=tmp_path / "empty-models-dir")
    app.manager.load(app.load_request(str(elsewhere / "chat-model")))
    names = [row[0] for row in TABLE.dispatch(app, "/model").rows]
    assert names == ["./elsewhere/base-model", "*./elsewhere/chat-model"]  # * marks the loaded one
    drive_repl(app, "/model ./elsewhere/base-model" + ENTER)  # a listed name loads as it is shown
    assert app.manager.current.info.path.resolve() == (elsewhere / "base-model").resolve()


def test_auto_on_a_cpu_only_torch_does_not_talk_about_cuda(qwen_checkpoint):
    import torch

    app = make_app()
    app.options.mode = "auto"
    out = drive_repl(app, f"/model {qwen_checkpoint}" + ENTER)
    assert "loaded tiny-qwen2-chat" in out
    if torch.version.cuda is None:  # with a CUDA build the reason names the GPU it chose, or the missing device
        assert "CUDA" not in out


def test_a_load_that_failed_on_a_missing_gpu_is_recovered_by_device_cpu(qwen_checkpoint, cpu_only_machine):
    app = make_app()
    app.options.mode = "gpu"  # as with --device gpu
    app.start_load(str(qwen_checkpoint)).wait()
    out = drive_repl(app, "/device cpu" + ENTER + "hello" + ENTER + "/device cpu float32" + ENTER)
    assert "gpu mode needs a CUDA GPU and torch sees none on this machine: use /device cpu" in out
    assert "loaded tiny-qwen2-chat (Qwen2ForCausalLM, cpu float32" in out
    assert app.session.turns == 1 and app.options.mode == "cpu"
    assert "already on cpu float32" in out


def test_device_without_a_model_is_kept_for_the_next_load(qwen_checkpoint):
    app = make_app()
    app.options.mode = "auto"
    out = drive_repl(app, "/device cpu bfloat16" + ENTER + f"/model {qwen_checkpoint}" + ENTER)
    assert "cpu bfloat16 will apply when a model is loaded" in out
    assert app.status().placement.describe() == "cpu bfloat16"


def test_mode_and_set_without_a_value_show_the_current_one(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(
        app, "/mode" + ENTER + "/set top_k" + ENTER + "/set temperature 5" + ENTER + "/set temperature 0.8" + ENTER
    )
    assert "chat mode (chat template); /mode chat|complete switches" in out
    assert f"top_k = {app.settings.get('top_k')} (from " in out and "needs a value" not in out
    assert "temperature 5.0 is unusually high" in out and app.settings.get("temperature") == 0.8
    assert out.count("unusually high") == 1  # 0.8 is not


def test_ctrl_c_on_an_empty_prompt_hints_how_to_leave_once(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "typed\x03" + "hello" + ENTER + "\x03" + "\x03")
    assert out.count("Ctrl-D or /exit leaves glmrepl") == 1
    assert out.index("Ctrl-D or /exit") > out.index("tokens · first token")  # not for the line with text
    assert app.session.turns == 1


def test_copy_says_what_it_sent_and_how_tmux_lets_it_through(qwen_checkpoint, tmp_path, monkeypatch):
    import os

    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "hello" + ENTER)
    size = len(app.session.last_reply.content)
    monkeypatch.delenv("TMUX", raising=False)
    sent = f"sent the last reply ({size} characters) to the terminal's clipboard (OSC 52)"
    assert TABLE.dispatch(app, "/copy").done_message == sent

    fake_tmux = tmp_path / "bin" / "tmux"  # answers `tmux show-options -gv set-clipboard`
    fake_tmux.parent.mkdir()
    monkeypatch.setenv("PATH", f"{fake_tmux.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    for setting, expected in (
        (
            "external",
            sent + "; inside tmux it reaches your terminal only with "
            "`set -g set-clipboard on` in ~/.tmux.conf (it is external now)",
        ),
        ("on", sent),
    ):
        fake_tmux.write_text(f"#!/bin/sh\necho {setting}\n")
        fake_tmux.chmod(0o755)
        assert TABLE.dispatch(app, "/copy").done_message == expected
    out = drive_repl(app, "/copy" + ENTER, color=True)
    assert "\x1b]52;c;" in out and "copied" not in out


def test_save_writes_only_new_files_in_existing_folders(qwen_checkpoint, tmp_path):
    app = loaded_app(qwen_checkpoint)
    drive_repl(app, "hello" + ENTER)
    missing = tmp_path / "no-such-folder" / "chat.json"
    out = drive_repl(app, f"/save {missing}" + ENTER)
    assert f"error: {missing.parent} is not a folder: create it first" in out and not missing.parent.exists()
    existing = tmp_path / "chat.json"
    existing.write_text("keep me")
    out = drive_repl(app, f"/save {existing}" + ENTER)
    assert f"error: {existing} exists: /save! {existing} replaces it" in out
    assert existing.read_text() == "keep me"
    drive_repl(app, f"/save! {existing}" + ENTER)
    assert json.loads(existing.read_text())["messages"][0]["content"] == "hello"
    out = drive_repl(app, f"/save {tmp_path}" + ENTER)
    assert "is a folder: give a file name" in out


def test_a_path_typed_at_the_prompt_gets_the_double_slash_hint():
    app = make_app()
    out = drive_repl(app, "/usr/bin/ls -la" + ENTER + "/frobnicate" + ENTER)
    assert (
        "error: /usr/bin/ls is not a command: type //usr/bin/ls -la to send text that starts with / "
        "(/help lists the commands)"
    ) in out
    assert "error: unknown command /frobnicate (/help lists them; //text sends text that starts with /)" in out


def test_toolbar_counts_the_tokens_that_will_be_sent_not_the_whole_history(qwen_checkpoint, copy_checkpoint):
    import re

    from glmrepl.repl.toolbar import Toolbar

    short = copy_checkpoint(qwen_checkpoint)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(config))
    app = loaded_app(short, max_new_tokens=8)
    drive_repl(app, "one two three four" + ENTER + "five six seven eight" + ENTER + "nine ten eleven" + ENTER)
    used, limit = map(int, re.search(r"(\d+)/(\d+) tokens", Toolbar(app)()).groups())
    whole_history = len(app.manager.current.prompt_format.build(app.session.as_dicts()))
    assert limit == 48 and 0 < used <= limit < whole_history
    from glmrepl.engine.conversation.chat import ChatSession

    plain = ChatSession()
    for index, text in enumerate(("one two", "three", "four five", "six", "seven eight", "nine")):
        (plain.add_user if index % 2 == 0 else plain.add_assistant)(text)
    fitted = plain.fit(app.manager.current.prompt_format, 48, 8)
    assert fitted.dropped_turns > 0  # the case where old turns are left out
    assert app.backend.context_usage(plain, 8) == (len(fitted.ids), 48)


def test_history_shows_control_characters_instead_of_sending_them(qwen_checkpoint):
    app = make_app()
    app.session.add_user("carriage\rreturn")
    app.session.add_assistant("vertical\x0btab and \x1b[2J")
    out = drive_repl(app, "/history" + ENTER, color=True)
    assert "user: carriage\u240dreturn" in out and "vertical\u240btab and \u241b[2J" in out
    assert "\r" not in out and "\x0b" not in out and "\x1b[2J" not in out


def test_a_history_file_on_a_full_disk_turns_history_off_with_one_warning(qwen_checkpoint, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    full = tmp_path / "history"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, "hello" + ENTER + "again" + ENTER, history_path=full)
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "history is off" in warnings[0]
    assert app.session.turns == 2


def test_load_keeps_an_unsaved_conversation_until_told_and_says_what_it_skipped(qwen_checkpoint, tmp_path):
    app = loaded_app(qwen_checkpoint, max_new_tokens=4)
    saved, foreign = tmp_path / "chat.json", tmp_path / "foreign.json"
    drive_repl(app, "first" + ENTER + f"/save {saved}" + ENTER)
    data = json.loads(saved.read_text())
    foreign.write_text(json.dumps({**data, "settings": {"temperature": "hot", "warp": 9, "top_k": 5}}))
    out = drive_repl(app, f"/load {foreign}" + ENTER)  # as saved: nothing to lose
    assert "loaded 1 turn from" in out and "setting temperature skipped" in out and "keeping" in out
    assert "setting warp skipped: not a setting" in out and app.settings.get("top_k") == 5
    out = drive_repl(app, "second" + ENTER + f"/load {saved}" + ENTER)
    assert "the conversation has 2 unsaved turns: /save FILE keeps it, /load! " in out
    assert [m.content for m in app.session.messages if m.role == "user"] == ["first", "second"]
    drive_repl(app, f"/load! {saved}" + ENTER)
    assert [m.content for m in app.session.messages if m.role == "user"] == ["first"]


def test_load_of_a_message_without_text_is_one_line_and_changes_nothing(qwen_checkpoint, tmp_path):
    app = loaded_app(qwen_checkpoint, max_new_tokens=4)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"messages": [{"role": "user"}]}))
    out = drive_repl(app, f"/load {broken}" + ENTER)
    assert f"{broken}: message 1 has no text ('content')" in out and "KeyError" not in out
    assert app.session.turns == 0


def test_an_unexpected_failure_in_piped_input_is_one_line_and_the_lines_after_it_run(qwen_checkpoint, monkeypatch):
    import io

    from glmrepl.repl.loop import run_piped

    app = loaded_app(qwen_checkpoint, max_new_tokens=4)
    import dataclasses

    broken = [
        dataclasses.replace(c, handler=lambda app, args: 1 / 0) if c.name == "history" else c for c in TABLE.commands
    ]
    monkeypatch.setattr(TABLE, "commands", broken)
    out, err = io.StringIO(), io.StringIO()
    status = run_piped(app, ["hello", "/history", "again"], out, err)
    assert status == 1 and "Traceback" not in err.getvalue()
    assert "error: unexpected ZeroDivisionError: division by zero (the conversation is kept)" in err.getvalue()
    assert app.session.turns == 2

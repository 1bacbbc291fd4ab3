"""The installed console script, non-interactively: -p, piped stdin, exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GLMREPL = str(Path(sys.executable).with_name("glmrepl"))


# A CPU-only machine for the glmrepl process, whatever this one has.
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def run(*args, stdin: str = "", env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([GLMREPL, *args], input=stdin, capture_output=True, text=True, timeout=240, env=env)


def test_version_and_module_entry_point_agree():
    from glmrepl import __version__

    assert run("--version").stdout.strip() == f"glmrepl {__version__}"
    module = subprocess.run([sys.executable, "-m", "glmrepl", "--version"], capture_output=True, text=True)
    assert module.stdout.strip() == f"glmrepl {__version__}"


def test_one_shot_prints_one_plain_reply(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "-p", "hello", "--temperature", "0", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "\x1b" not in result.stdout
    again = run(str(qwen_checkpoint), "-p", "hello", "--temperature", "0", "--max-new-tokens", "6")
    assert again.stdout == result.stdout  # greedy: the same reply


def test_piped_lines_are_one_conversation_and_commands_work(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "--temperature", "0", "--max-new-tokens", "4", stdin="first\nsecond\n/history\n")
    assert result.returncode == 0, result.stderr
    assert "user: first" in result.stdout and "user: second" in result.stdout
    assert result.stdout.count("assistant: ") == 2
    assert "\x1b" not in result.stdout


def test_model_that_cannot_load_exits_1_with_the_reason_on_stderr(qwen_checkpoint, copy_checkpoint):
    broken = copy_checkpoint(qwen_checkpoint)
    (broken / "config.json").unlink()
    result = run(str(broken), "-p", "hello")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--temperature", "99"], "temperature must be a number from 0 to 10"),
        (["--device", "warp"], "invalid choice: 'warp'"),
        (["--max-new-tokens", "many"], "invalid int value"),
    ],
)
def test_bad_usage_exits_2(args, expected):
    result = run(*args, "-p", "x")
    assert result.returncode == 2 and expected in result.stderr


def test_unknown_model_name_suggests_where_it_looked(tmp_path):
    result = run("no-such-model", "-p", "hi", "--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no-such-model" in result.stderr and str(tmp_path) in result.stderr


def test_one_shot_text_starting_with_a_slash_is_a_message_not_a_command(qwen_checkpoint):
    greedy = ("--temperature", "0", "--max-new-tokens", "6")
    as_prompt = run(str(qwen_checkpoint), "-p", "/history", *greedy)
    as_piped_message = run(str(qwen_checkpoint), *greedy, stdin="//history\n")
    assert as_prompt.returncode == 0 and as_prompt.stdout.strip()
    assert "conversation is empty" not in as_prompt.stdout
    assert as_prompt.stdout == as_piped_message.stdout  # the same message "/history", the same greedy reply


def test_one_shot_words_hints_as_command_line_options(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "-p", "hello", "--temperature", "0", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "[reply reached max_new_tokens=2: --max-new-tokens allows more]" in result.stderr
    assert "/set" not in result.stderr


def test_a_gpu_that_is_missing_is_worded_as_a_flag(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "-p", "hello", "--device", "gpu", env_extra=NO_GPU)
    assert result.returncode == 1
    assert "gpu mode needs a CUDA GPU" in result.stderr and "use --device cpu" in result.stderr
    assert "/device" not in result.stderr


def test_ctrl_c_during_a_one_shot_reply_exits_130(qwen_checkpoint, tmp_path):
    import json
    import shutil
    import signal

    folder = Path(shutil.copytree(qwen_checkpoint, tmp_path / "long-qwen"))
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    child = subprocess.Popen(
        [GLMREPL, str(folder), "-p", "tell me a story", "--max-new-tokens", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child.stdout.read(1)  # the reply is streaming (20000 tokens would take minutes)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130
    assert "[reply cut]" in err and "/retry" not in err


def test_ctrl_c_while_serve_starts_is_one_line_and_exit_130(qwen_checkpoint):
    import signal

    child = subprocess.Popen([GLMREPL, "serve", str(qwen_checkpoint), "--port", "0"], stderr=subprocess.PIPE, text=True)
    assert child.stderr.readline().startswith("loading ")  # the model loads now
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted"]


@pytest.mark.parametrize("args", [["-p", "hi"], ["MODEL", "-p", ""], ["MODEL", "-p", "  "]])
def test_one_shot_without_a_model_or_a_message_is_bad_usage(args, qwen_checkpoint):
    result = run(*[str(qwen_checkpoint) if arg == "MODEL" else arg for arg in args])
    assert result.returncode == 2, result.stderr
    assert "usage: glmrepl" in result.stderr and result.stdout == ""


def test_piped_input_runs_every_line_and_exits_1_if_one_failed(qwen_checkpoint):
    result = run(
        str(qwen_checkpoint),
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        stdin="/set temperature hot\nhello\n/history\n",
    )
    assert result.returncode == 1
    assert "temperature must be a number" in result.stderr
    assert "user: hello" in result.stdout  # the lines after the failed one ran


def test_auto_device_with_float16_runs_on_a_cpu_only_machine(qwen_checkpoint):
    # Greedy, so that a sampled end-of-turn id can never make the reply empty.
    args = ("-p", "hi", "--device", "auto", "--dtype", "float16", "--max-new-tokens", "3", "--temperature", "0")
    result = run(str(qwen_checkpoint), *args, env_extra=NO_GPU)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_help_names_the_other_commands(capsys):
    from glmrepl.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("glmrepl list", "glmrepl check DIR", "glmrepl download REPO_ID", "glmrepl serve"):
        assert command in out


def test_download_help_says_what_each_weights_choice_takes(capsys):
    from glmrepl.cli.main import main

    with pytest.raises(SystemExit):
        main(["download", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "'safetensors' (default) takes the .safetensors files, or the .bin files when the repository has none" in out
    assert "'bin' prefers the .bin files" in out and "'all' takes every weights file in every format" in out


def test_the_docs_document_every_option_and_command():
    """The README and the pages under docs/ together name every option and slash command."""
    from glmrepl.cli.main import build_parser
    from glmrepl.cli.tools import build_parser as build_tools_parser
    from glmrepl.repl.commands import TABLE

    root = Path(__file__).parent.parent
    readme = "\n".join(path.read_text(encoding="utf-8") for path in [root / "README.md", *root.glob("docs/*.md")])
    tools = build_tools_parser()
    subparsers = next(action for action in tools._actions if action.choices and isinstance(action.choices, dict))
    parsers = [build_parser(), *subparsers.choices.values()]
    options = {
        option
        for parser in parsers
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert sorted(option for option in options if option not in readme) == []
    assert sorted(f"/{c.name}" for c in TABLE.commands if f"`/{c.name}" not in readme) == []


def test_family_on_a_checkpoint_that_is_not_chatglm_is_said_to_be_ignored(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "--family", "chatglm3", "-p", "hi", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert (
        "warning: --family chatglm3 is ignored: it chooses the ChatGLM generation, and this checkpoint is not "
        "a ChatGLM one (model_type 'qwen2')"
    ) in result.stderr.splitlines()
    chatglm = Path(__file__).parent / "data" / "chatglm" / "chatglm2-tiny"
    result = run(str(chatglm), "--family", "chatglm2", "-p", "hi", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "ignored" not in result.stderr


def test_demo_with_a_read_only_cache_builds_in_a_temporary_folder(unwritable_dir):
    result = subprocess.run(
        [sys.executable, "-m", "glmrepl.cli.demo", "-p", "hi", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, XDG_CACHE_HOME=str(unwritable_dir)),
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "building the demo in" in warnings[0]
    assert "Traceback" not in result.stderr and result.stdout.strip()
    temporary = Path(warnings[0].split("building the demo in ")[1].split(" for this run")[0])
    assert not temporary.exists()  # removed at exit


def test_the_entry_points_set_offline_and_importing_the_engine_does_not(tmp_path):
    from glmrepl.engine import OFFLINE_ENVIRONMENT

    code = (
        "import os, sys, glmrepl.engine.models.loading, glmrepl.cli.main, glmrepl.cli.demo\n"
        f"names = {sorted(OFFLINE_ENVIRONMENT)!r}\n"
        "print(sorted(n for n in names if n in os.environ))\n"
        f"glmrepl.cli.main.main(['list', '--models-dir', {str(tmp_path)!r}])\n"
        "print({n: os.environ.get(n) for n in names})\n"
    )
    env = {name: value for name, value in os.environ.items() if name not in OFFLINE_ENVIRONMENT}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[]"  # importing sets nothing: a library user's environment is theirs
    assert lines[-1] == str({name: "1" for name in sorted(OFFLINE_ENVIRONMENT)})


def test_next_before_any_message_is_one_line_and_the_lines_after_it_run(qwen_checkpoint):
    result = run(str(qwen_checkpoint), "--temperature", "0", "--max-new-tokens", "4", stdin="/next\nhello\n/next 3\n")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: the conversation is empty: there is nothing to continue"]
    assert result.stdout.count("%") == 3, result.stdout  # the table of /next after the message


def test_a_terminal_typing_into_a_pipe_gets_plain_text_out(qwen_checkpoint):
    """`glmrepl MODEL | tee log`: lines typed on the terminal, replies written as plain text, no
    prompt, toolbar or cursor codes in the pipe."""
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [GLMREPL, str(qwen_checkpoint), "--temperature", "0", "--max-new-tokens", "4"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    os.write(controller, b"hello\n/history\n\x04")
    out, _ = process.communicate(timeout=240)
    os.close(controller)
    assert process.returncode == 0
    assert b"user: hello" in out and b"\x1b" not in out

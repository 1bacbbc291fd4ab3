import io

from glmrepl.repl.render import Renderer, ReplyStream
from glmrepl.repl.results import Table


def stream_text(deltas, color=True):
    out = io.StringIO()
    stream = ReplyStream(out, color)
    for delta in deltas:
        stream.write(delta)
    stream.finish()
    return out.getvalue()


def test_plain_output_has_no_escape_codes_even_with_code():
    text = "Here:\n```python\nprint('hi')\n```\ndone"
    assert stream_text([text[i : i + 3] for i in range(0, len(text), 3)], color=False) == text + "\n"


def test_code_block_is_highlighted_and_prose_is_not():
    text = "Say:\n```python\ndef f(x):\n    return x\n```\nbye\n"
    rendered = stream_text(list(text))  # one character at a time, as tokens arrive
    prose, _, rest = rendered.partition("```")
    assert prose.startswith("Say:\n") and "\x1b" not in prose[: len("Say:\n")]
    assert "\x1b[" in rest  # pygments colours inside the block
    plain = __import__("re").sub(r"\x1b\[[0-9;]*m", "", rendered)
    assert plain == text


def test_backticks_that_are_not_a_fence_are_written_through():
    assert stream_text(["`x` and ``y``\n"], color=True) == "`x` and ``y``\n"


def test_unfinished_code_line_is_flushed_at_the_end():
    rendered = stream_text(["```\nlast line without newline"])
    assert "last line without newline" in __import__("re").sub(r"\x1b\[[0-9;]*m", "", rendered)


def test_table_and_errors_go_where_they_belong():
    out, err = io.StringIO(), io.StringIO()
    renderer = Renderer(out, color=False, err=err)
    renderer.table(Table(["a", "b"], [["1", "two"]], title="T"))
    renderer.error("bad")
    renderer.text("note", "dim")
    assert out.getvalue().splitlines() == ["T", "a  b", "1  two"]
    assert err.getvalue().splitlines() == ["error: bad", "note"]


def test_control_characters_from_the_model_cannot_drive_the_terminal():
    rendered = stream_text(["evil\x1b]0;title\x07 and\r back\x08\tok\n"])
    assert "\x1b]" not in rendered and "\r" not in rendered and "\x08" not in rendered
    assert "evil\u241b]0;title\u2407 and\u240d back\u2408\tok\n" == rendered


def rendered_table(table, monkeypatch, columns: int) -> list[str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    Renderer(out, color=False).table(table)
    return out.getvalue().splitlines()


def test_help_wraps_to_the_terminal_instead_of_cutting(monkeypatch):
    from glmrepl.repl.commands import TABLE, cmd_help
    from glmrepl.repl.render import display_width

    long_help = max((c.help for c in TABLE.commands), key=len)
    assert len(long_help) > 60
    wide = rendered_table(cmd_help(None, ""), monkeypatch, 220)
    assert any(line.endswith(long_help) for line in wide) and not any("…" in line for line in wide)
    narrow = rendered_table(cmd_help(None, ""), monkeypatch, 60)
    assert all(display_width(line) <= 60 for line in narrow) and not any("…" in line for line in narrow)
    assert " ".join(" ".join(narrow).split()).count(long_help) == 1  # every word is there, in order


def test_columns_align_by_display_width_with_wide_characters(monkeypatch):
    from glmrepl.repl.render import display_width

    lines = rendered_table(
        Table(["token", "id"], [["'日本語'", "1"], ["'ab'", "22"], ["'<0xE4>'", "3"]]), monkeypatch, 80
    )
    id_columns = {display_width(line[: line.rindex(" ") + 1]) for line in lines}
    assert id_columns == {display_width("'<0xE4>'  ")}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_output_to_a_terminal_shows_control_characters_a_file_keeps_them():
    for out, expected in ((FakeTerminal(), "a\u240db\u240bc\n"), (io.StringIO(), "a\rb\x0bc\n")):
        renderer = Renderer(out, color=False)  # as -p writes
        stream = renderer.reply_stream()
        stream.write("a\rb\x0bc")
        stream.finish()
        assert out.getvalue() == expected

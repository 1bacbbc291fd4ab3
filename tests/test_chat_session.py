import json

import pytest

from glmrepl.engine.conversation.chat import ChatSession, read_conversation, save_conversation
from glmrepl.engine.errors import GlmreplError


class WordFormat:
    """A prompt format counting one token per word: budgets become easy to reason about."""

    name = "words"

    def build(self, messages):
        return [w for m in messages for w in m["content"].split()]


def conversation(*pairs, system=None):
    session = ChatSession(system)
    for user, reply in pairs:
        session.add_user(user)
        if reply is not None:
            session.add_assistant(reply)
    return session


def test_undo_removes_reply_and_its_message():
    session = conversation(("a", "b"), ("c", "d"))
    assert session.undo() == 2
    assert [m.content for m in session.messages] == ["a", "b"]
    assert conversation().undo() == 0


def test_prepare_retry_drops_the_reply_and_keeps_the_question():
    session = conversation(("first", "one"), ("second", "two"))
    assert session.prepare_retry() == "second"
    assert [m.content for m in session.messages] == ["first", "one", "second"]
    with pytest.raises(GlmreplError, match="nothing to retry"):
        ChatSession().prepare_retry()


def test_fit_drops_oldest_turns_but_keeps_system_and_reports_how_many():
    session = conversation(("one two three", "four five"), ("six seven", "eight"), ("nine ten", None), system="sys")
    fitted = session.fit(WordFormat(), context_length=10, max_new_tokens=4)
    assert fitted.dropped_turns == 1
    assert fitted.ids == ["sys", "six", "seven", "eight", "nine", "ten"]
    assert len(session.messages) == 5  # the conversation itself is untouched


def test_fit_refuses_a_single_message_too_long():
    session = conversation(("a b c d e f", None))
    with pytest.raises(GlmreplError, match="needs 6 tokens but the context holds 5"):
        session.fit(WordFormat(), context_length=5, max_new_tokens=2)


def test_fit_shortens_the_reply_budget_when_one_message_leaves_less_room():
    session = conversation(("a b c d e f", None))
    fitted = session.fit(WordFormat(), context_length=8, max_new_tokens=512)
    assert fitted.max_new_tokens == 2 and fitted.dropped_turns == 0
    assert session.fit(WordFormat(), context_length=None, max_new_tokens=512).max_new_tokens == 512


def test_save_and_read_round_trip(tmp_path):
    session = conversation(("hi", "hello"), system="be brief")
    session.add_user("more")
    session.add_assistant("partial", cut=True)
    path = save_conversation(tmp_path / "sub" / "chat.json", session, {"temperature": 0.2}, "some/model")
    data = read_conversation(path)
    restored = ChatSession()
    restored.restore(data)
    assert restored.system == "be brief"
    assert [(m.role, m.content, m.cut) for m in restored.messages] == [
        ("user", "hi", False),
        ("assistant", "hello", False),
        ("user", "more", False),
        ("assistant", "partial", True),
    ]
    assert data["settings"] == {"temperature": 0.2} and data["model"] == "some/model"
    assert [p.name for p in path.parent.iterdir()] == ["chat.json"]  # no temporary file left behind


class OtherWordFormat(WordFormat):
    name = "other words"


def test_a_kept_reply_goes_to_the_prompt_of_the_format_that_kept_it_only():
    session = conversation(("question", None))
    session.add_assistant("shown", kept=("words", {"content": "as kept"}))
    assert session.fit(WordFormat(), None, 4).ids == ["question", "as", "kept"]
    assert session.fit(OtherWordFormat(), None, 4).ids == ["question", "shown"]  # another model's
    assert session.as_dicts()[-1] == {"role": "assistant", "content": "shown"}  # a remote server's


def test_saved_kept_fields_round_trip_and_hand_edited_ones_are_dropped(tmp_path):
    session = conversation(("hi", None))
    session.add_assistant("shown", cut=True, kept=("words", {"content": "shown\ufffd"}))
    session.add_user("plain")
    path = save_conversation(tmp_path / "chat.json", session, {}, None)
    data = read_conversation(path)
    assert [sorted(m) for m in data["messages"]] == [
        ["content", "cut", "role"],
        ["content", "cut", "kept", "kept_for", "role"],
        ["content", "cut", "role"],
    ]
    restored = ChatSession()
    restored.restore(data)
    assert restored.as_dicts(for_format="words") == session.as_dicts(for_format="words")
    data["messages"][1]["kept"] = {"content": 3}
    restored.restore(data)
    assert restored.messages[1].kept is None and restored.fit(WordFormat(), None, 4).ids == ["hi", "shown", "plain"]


def test_save_failure_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "chat.json"
    save_conversation(path, conversation(("old", "reply")), {}, None)
    before = path.read_text()

    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", explode)
    with pytest.raises(OSError):
        save_conversation(path, conversation(("new", "reply")), {}, None)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"hello": 1}), "no 'messages' list"),
    ],
)
def test_read_rejects_foreign_files(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(GlmreplError, match=message):
        read_conversation(path)
    with pytest.raises(GlmreplError, match="no such file"):
        read_conversation(tmp_path / "missing.json")

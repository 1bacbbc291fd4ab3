"""The next prompt holds a reply as the ids the model wrote, so the cache covers the reply too.

A reply's text re-tokenized is seldom the ids that were generated (a random model's never is):
without this, the reused prefix would end where the last reply starts and every turn would read
every reply again. Checked: the spliced prompt decodes to the fresh prompt's text, each turn
reads only its new message and the template around it, replies equal a fresh prefill of the same
ids (test_prefix_reuse plays the scripts), and anything that cannot be spliced exactly falls
back to the fresh prompt.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_prefix_reuse import load, turn

from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.conversation.reply_tokens import (
    DEFAULT_MAX_REPLIES,
    MARKER,
    ReplyTokens,
    reply_ids,
    splice_replies,
)

MESSAGES = ["hello there", "tell me more about it, please", "and then what happened", "ok, one more"]


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def play_turns(backend, max_new_tokens: int = 16) -> list[tuple[int, int, int, int]]:
    """(prompt tokens, reused, previous prompt tokens, ids kept of the previous reply) per turn."""
    session, figures, previous = ChatSession(), [], (0, 0)
    for text in MESSAGES:
        session.add_user(text)
        _, reused, prompt = turn(backend, session, max_new_tokens, fresh=False)
        figures.append((prompt, reused, *previous))
        reply = session.last_reply
        assert reply is not None
        kept = backend.replies.lookup(reply.content)
        previous = (prompt, len(kept) if kept else 0)
    return figures


@pytest.mark.parametrize("checkpoint", ["qwen_checkpoint", "gpt2_checkpoint"])
def test_each_turn_reuses_the_last_prompt_and_reply(checkpoint, request):
    backend = load(request.getfixturevalue(checkpoint), checkpoint)
    figures = play_turns(backend)
    assert figures[0][1] == 0
    for message, (prompt, reused, previous_prompt, reply_ids_kept) in zip(MESSAGES[1:], figures[1:]):
        assert reply_ids_kept > 0, figures  # the reply's ids stand for it in the next prompt
        # The reply's last id was generated, never read: the cache ends one short of it.
        assert reused >= previous_prompt + reply_ids_kept - 1, figures
        # Only the new message (a token per few characters) and its template are read.
        assert prompt - reused <= len(message) + 12, figures


def test_the_spliced_prompt_is_the_same_text_with_the_generated_ids(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    loaded = backend.manager.current
    session = ChatSession("Be brief.")
    session.add_user("hello there")
    turn(backend, session, 16, fresh=False)
    reply = session.last_reply
    assert reply is not None
    remembered = backend.replies.lookup(reply.content)
    assert remembered and decoded(loaded.tokenizer, remembered) == reply.content
    session.add_user("and more")
    messages = session.as_dicts()
    fresh = loaded.prompt_format.build(messages)
    spliced = splice_replies(loaded.prompt_format, messages, fresh, backend.replies)
    assert spliced != fresh  # a random model's reply never tokenizes back to its own ids
    assert decoded(loaded.tokenizer, spliced) == decoded(loaded.tokenizer, fresh)
    start = len(loaded.prompt_format.build(session.as_dicts(session.messages[:1])))
    assert spliced[start : start + len(remembered)] == list(remembered)


def test_a_reply_the_template_rewrites_falls_back_to_the_fresh_prompt(qwen_checkpoint, tmp_path):
    folder = shutil.copytree(qwen_checkpoint, tmp_path / "upper")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = config["chat_template"].replace("message['content']", "message['content'] | upper")
    assert "| upper" in config["chat_template"]
    config_file.write_text(json.dumps(config))
    backend = load(folder, "upper")
    session = ChatSession()
    session.add_user("hello there")
    turn(backend, session, 16, fresh=False)
    session.add_user("and more")
    prompt_format = backend.manager.current.prompt_format
    messages = session.as_dicts()
    fresh = prompt_format.build(messages)
    assert splice_replies(prompt_format, messages, fresh, backend.replies) is fresh
    ids, _, prompt = turn(backend, session, 8, fresh=True)
    assert prompt == len(fresh)


def test_a_reply_holding_the_marker_itself_is_never_spliced(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    prompt_format = backend.manager.current.prompt_format
    tokenizer = backend.manager.current.tokenizer
    memory = ReplyTokens()
    text = f"a{MARKER}b"
    memory.remember(text, tokenizer.encode(text, add_special_tokens=False)[::-1])
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": f"and {MARKER}"},
    ]
    fresh = prompt_format.build(messages)
    assert splice_replies(prompt_format, messages, fresh, memory) is fresh


def test_reply_ids_leave_out_the_end_of_turn_and_a_tail_the_text_lost(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    tokenizer = backend.manager.current.tokenizer
    stop = backend.manager.current.prompt_format.stop_token_ids
    ids = tokenizer.encode("hello there", add_special_tokens=False)
    spaces = tokenizer.encode("   ", add_special_tokens=False)
    assert reply_ids(tokenizer, ids + stop[:1], stop, "hello there") == ids
    assert reply_ids(tokenizer, ids + spaces, stop, "hello there") == ids  # rstripped text
    assert reply_ids(tokenizer, ids, stop, "ello there") is None  # a stripped start: nothing to splice
    assert reply_ids(tokenizer, ids, stop, "something else") is None


def test_a_reply_holding_a_special_token_its_text_leaves_out_keeps_its_ids(qwen_checkpoint):
    """A random model may write <|im_start|> mid-reply: the text shows none of it, the ids keep it
    (its keys and values are in the cache), and the spliced prompt differs from the fresh one
    only by it."""
    backend = load(qwen_checkpoint, "qwen")
    loaded = backend.manager.current
    tokenizer = loaded.tokenizer
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert start not in tokenizer.all_special_ids  # an added special token only: the case that was missed
    ids = [
        *tokenizer.encode("hello ", add_special_tokens=False),
        start,
        *tokenizer.encode("there", add_special_tokens=False),
    ]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == "hello there" and reply_ids(tokenizer, ids, [], text) == ids
    memory = ReplyTokens()
    memory.remember(text, ids)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "more"},
    ]
    fresh = loaded.prompt_format.build(messages)
    spliced = splice_replies(loaded.prompt_format, messages, fresh, memory)
    assert spliced != fresh and spliced.count(start) == fresh.count(start) + 1
    assert decoded(tokenizer, [i for i in spliced if i != start]) == decoded(
        tokenizer, [i for i in fresh if i != start]
    )


def test_the_fit_counts_replies_as_sent_so_turns_that_fit_are_kept(qwen_checkpoint):
    """A reply of 40 lone bytes shows as 40 U+FFFD, which tokenize to 120 ids; the prompt sends
    its 40 ids, and the fit counts those: the first turn stays where the sent prompt fits."""
    from support import request

    from glmrepl.engine.settings import Settings

    backend = load(qwen_checkpoint, "qwen")
    loaded = backend.manager.current
    tokenizer = loaded.tokenizer
    ids = [tokenizer.convert_tokens_to_ids("¸")] * 40  # the byte-level piece of 0xB8, alone
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(tokenizer.encode(text, add_special_tokens=False)) > 2 * len(ids)
    backend.replies.remember(text, ids)
    session = ChatSession()
    session.add_user("hi")
    session.add_assistant(text)
    session.add_user("and now?")
    messages = session.as_dicts()
    fresh = loaded.prompt_format.build(messages)
    spliced = splice_replies(loaded.prompt_format, messages, fresh, backend.replies)
    assert len(spliced) < len(fresh)
    room = loaded.info.context_length - len(spliced)  # fits as sent, not as re-tokenized
    assert session.fit(loaded.prompt_format, loaded.info.context_length, room).dropped_turns == 1
    reply = backend.generate(request(session, Settings({"max_new_tokens": room, "do_sample": False})))
    with reply:
        "".join(reply)
    assert reply.dropped_turns == 0 and reply.stats.prompt_tokens == len(spliced)
    assert backend.context_usage(session, room) == (len(spliced), loaded.info.context_length)


def test_the_memory_keeps_recent_replies_within_its_budget():
    memory = ReplyTokens(max_ids=10)
    memory.remember("a", [1, 2, 3, 4])
    memory.remember("b", [5, 6, 7, 8])
    assert memory.lookup("a") == (1, 2, 3, 4)  # now the most recent
    memory.remember("c", [9, 10, 11])
    assert memory.lookup("b") is None and memory.lookup("a") and memory.lookup("c")
    memory.remember("huge", list(range(11)))
    assert memory.lookup("huge") is None and len(memory) == 2


def test_short_replies_in_many_namespaces_are_bounded_by_their_count_too():
    # A one-token reply costs a few hundred bytes (its text, key and entry) for one id: counted by
    # ids alone, a million of them, one a cache_salt, would fit the default budget.
    memory = ReplyTokens()
    for i in range(DEFAULT_MAX_REPLIES + 100):
        memory.remember(f"reply {i}", [i], namespace=f"salt {i}")
    assert len(memory) == DEFAULT_MAX_REPLIES
    assert memory.lookup("reply 99", "salt 99") is None  # the oldest went first
    last = DEFAULT_MAX_REPLIES + 99
    assert memory.lookup(f"reply {last}", f"salt {last}") == (last,)


def test_a_model_change_forgets_the_replies(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    session = ChatSession()
    session.add_user("hello there")
    turn(backend, session, 8, fresh=False)
    assert len(backend.replies) == 1
    backend.set_prompt_mode("complete")  # another prompt format: its ids would be other ids
    assert len(backend.replies) == 0


def test_a_reply_cut_inside_a_character_keeps_its_ids_up_to_the_cut():
    """The length limit cut a character whose first byte shares an id with the text's last
    character: the ids before that one, and that character tokenized again."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(["ab!é" * 50, "ab" * 50], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    bang_and_lead_byte = raw.token_to_id("!Ã")  # "!" and the first byte of "é"
    assert bang_and_lead_byte is not None
    generated = tokenizer.encode("abab", add_special_tokens=False) + [bang_and_lead_byte]
    text = tokenizer.decode(generated, skip_special_tokens=True).rstrip("\ufffd")  # as GenerationRun.text
    assert text == "abab!"
    kept = reply_ids(tokenizer, generated, [], text)
    assert kept is not None and decoded(tokenizer, kept) == text
    assert kept[:-1] == generated[:-1]  # only the cut id is rebuilt


def test_a_reply_is_spliced_only_into_prompts_of_its_own_cache_namespace(qwen_checkpoint):
    """The ids a reply was written as shorten a prompt that sends it back: across clients that
    would tell one that another received the very text it guessed."""
    backend = load(qwen_checkpoint, "qwen")
    prompt_format = backend.manager.current.prompt_format
    tokenizer = backend.manager.current.tokenizer
    text = "hello there"
    written = [i for c in text for i in tokenizer.encode(c, add_special_tokens=False)]  # as a model may write it
    assert written != tokenizer.encode(text, add_special_tokens=False)
    memory = ReplyTokens()
    memory.remember(text, written, "key 0")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]
    fresh = prompt_format.build(messages)
    assert memory.lookup(text, "key 1") is None and memory.lookup(text) is None
    assert splice_replies(prompt_format, messages, fresh, memory, "key 1") is fresh
    assert splice_replies(prompt_format, messages, fresh, memory) is fresh
    spliced = splice_replies(prompt_format, messages, fresh, memory, "key 0")
    assert spliced != fresh and tokenizer.decode(spliced) == tokenizer.decode(fresh)

"""Each ChatGLM generation's own conversation format (see glmrepl.engine.conversation.formats).

``build(messages)`` reproduces the ids the released ``chat()`` fed its model
for the same conversation:

* ChatGLM-6B: the first question bare, later turns as
  ``[Round i]\\n问：…\\n答：…\\n`` numbered from 0, then ``[gMASK]`` ``<sop>``.
* ChatGLM2: ``[gMASK]`` ``sop``, then ``[Round i]\\n\\n问：…\\n\\n答：…\\n\\n``
  numbered from 1.
* ChatGLM3: ``[gMASK]`` ``sop``, then per message its role token, a metadata
  line and the content; the prompt ends with ``<|assistant|>``. GLM-4 is the
  same with ``<sop>``.

ChatGLM-6B and ChatGLM2 have no system role: a system message is put on its
own line(s) at the start of the prompt text.

``history_reply(ids)`` gives a reply as the released ``chat()`` keeps it in the
history it builds the next prompt from: all of its ids decoded, so a reply cut
inside a multi-byte character keeps the fragment as U+FFFD (the text shown
leaves it out), then that generation's own post-processing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...conversation.tool_calls import glm_messages

# The system text ChatGLM3's OpenAI demo puts before its tool list (utils.process_chatglm_messages).
CHATGLM3_TOOLS_HEADER = "Answer the following questions as best as you can. You have access to the following tools:"
# GLM-4's, from its chat template (glm-4-9b-chat's latest revision; earlier ones name it ChatGLM:
# GLM4Format reads the checkpoint's own template for it).
GLM4_TOOLS_HEADER = (
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
GLM4_TOOL_FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

# The chat() defaults of the released code.
GLM1_SAMPLING = {"do_sample": True, "top_p": 0.7, "temperature": 0.95}
GLM2_SAMPLING = {"do_sample": True, "top_p": 0.8, "temperature": 0.8}


def split_rounds(messages: list[dict]) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, [(question, answer), ...], the question to answer now).

    A question without an answer (two user turns in a row) gets an empty
    answer, so the round numbering stays that of a normal conversation.
    """
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    rounds: list[tuple[str, str]] = []
    question: str | None = None
    for message in messages:
        if message["role"] == "user":
            if question is not None:
                rounds.append((question, ""))
            question = message["content"]
        elif message["role"] == "assistant":
            rounds.append((question or "", message["content"]))
            question = None
    return system, rounds, question or ""


class ChatGLM1Format:
    name = "ChatGLM-6B rounds"
    is_chat = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id]  # <eop>
        self.sampling_defaults = dict(GLM1_SAMPLING)

    def build(self, messages: list[dict]) -> list[int]:
        system, rounds, question = split_rounds(messages)
        if rounds:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(rounds))
            prompt += f"[Round {len(rounds)}]\n问：{question}\n答："
        else:
            prompt = question
        if system:
            prompt = f"{system}\n{prompt}"
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def history_reply(self, ids: list[int]) -> dict[str, str]:
        return {"content": self.clean_reply(self.tokenizer.decode(ids, skip_special_tokens=False))}

    def clean_reply(self, text: str) -> str:
        """The released chat() post-processing: strip, and full-width punctuation next to Chinese."""
        text = text.strip().replace("[[训练时间]]", "2023年")
        for half, full in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
            text = re.sub(rf"([\u4e00-\u9fff]){half}", rf"\1{full}", text)
            text = re.sub(rf"{half}([\u4e00-\u9fff])", rf"{full}\1", text)
        return text


class ChatGLM2Format:
    name = "ChatGLM2 rounds"
    is_chat = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id]
        self.sampling_defaults = dict(GLM2_SAMPLING)

    def build(self, messages: list[dict]) -> list[int]:
        system, rounds, question = split_rounds(messages)
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(rounds, start=1))
        prompt += f"[Round {len(rounds) + 1}]\n\n问：{question}\n\n答："
        if system:
            prompt = f"{system}\n\n{prompt}"
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def history_reply(self, ids: list[int]) -> dict[str, str]:
        return {"content": self.clean_reply(self.tokenizer.decode(ids, skip_special_tokens=False))}

    def clean_reply(self, text: str) -> str:
        return text.strip().replace("[[训练时间]]", "2023年")


class ChatGLM3Format:
    """Role tokens. An assistant message may carry a ``metadata`` key (the
    first line ChatGLM3 writes before a tool call); it is empty otherwise."""

    name = "ChatGLM3 roles"
    is_chat = True
    tool_syntax = "chatglm3"
    # A reply begins with its metadata line, empty but for a tool call: a reply held to a
    # format (generation/grammar.py) is begun with it in the prompt.
    reply_start = "\n"
    prefix_tokens = ("[gMASK]", "sop")
    stop_roles = ("<|user|>", "<|observation|>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id] + [tokenizer.get_command(r) for r in self.stop_roles]
        self.sampling_defaults = dict(GLM2_SAMPLING)

    def build(self, messages: list[dict]) -> list[int]:
        ids = [self.tokenizer.get_command(token) for token in self.prefix_tokens]
        for message in glm_messages(messages, self.tool_syntax, self.tools_text):
            ids += self._message_ids(message["role"], message.get("metadata", ""), message["content"])
        ids.append(self.tokenizer.get_command("<|assistant|>"))
        return ids

    def tools_text(self, functions: list[dict]) -> str:
        """The system message of the tool list, as ChatGLM3's build_chat_input writes it."""
        return CHATGLM3_TOOLS_HEADER + "\n" + json.dumps(functions, indent=4, ensure_ascii=False)

    def _message_ids(self, role: str, metadata: str, content: str) -> list[int]:
        role_id = self.tokenizer.get_command(f"<|{role}|>")
        # Encoded in two pieces, as the released build_chat_input does.
        return [role_id] + self.tokenizer.encode(f"{metadata}\n") + self.tokenizer.encode(content)

    def history_reply(self, ids: list[int]) -> dict[str, str]:
        """As chat() keeps it: without the last id, which chat() takes for the stop token (a reply
        cut by max_new_tokens loses its last real one), and with the first line as the metadata
        (a tool call's name; empty before an ordinary reply, whose content is then stripped)."""
        text = self.tokenizer.decode(ids[:-1], skip_special_tokens=False)
        metadata, newline, content = text.partition("\n")
        if not newline:  # chat() itself fails on a reply without a line break: kept as an ordinary one
            metadata, content = "", text
        if not metadata.strip():
            content = content.strip()
        return {"metadata": metadata, "content": content} if metadata else {"content": content}

    def clean_reply(self, text: str) -> str:
        """Drop a stop role token's text left at the end (seen when decoding
        with special tokens kept) and surrounding whitespace, including the
        empty metadata line ChatGLM3 starts an ordinary reply with."""
        text = text.rstrip()
        for role in self.stop_roles:
            if text.endswith(role):
                text = text[: -len(role)]
        return text.strip()


class GLM4Format(ChatGLM3Format):
    """GLM-4 chat: ChatGLM3's roles, with its own prefix token names."""

    name = "GLM-4 roles"
    tool_syntax = "glm4"
    prefix_tokens = ("[gMASK]", "<sop>")

    def tools_text(self, functions: list[dict]) -> str:
        """The tools block of GLM-4's chat template (its ``function`` entries; the template's
        built-in python, browser and cogview tools are not offered). Rendered as transformers
        renders that template: its trim_blocks eats the first newline after the block tag, so
        one newline, not two, comes before each ``## name``."""
        header = getattr(self, "_tools_header", None)
        if header is None:
            header = self._tools_header = _template_tools_header(self.tokenizer) or GLM4_TOOLS_HEADER
        blocks = "".join(
            f"\n## {f['name']}\n\n{json.dumps(f, ensure_ascii=False, indent=4)}\n{GLM4_TOOL_FOOTER}" for f in functions
        )
        return f"{header}\n\n# 可用工具{blocks}"

    def history_reply(self, ids: list[int]) -> dict[str, str]:
        """As the reference run of GLM-4's code keeps it: all of it decoded, special tokens skipped."""
        return {"content": self.clean_reply(self.tokenizer.decode(ids, skip_special_tokens=True))}


def _template_tools_header(tokenizer) -> str | None:
    """The assistant's self-description that the checkpoint's chat template puts before its tools."""
    try:
        config = json.loads((Path(tokenizer.name_or_path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    match = re.search(r"<\|system\|>\n(.*?)\n\n# 可用工具", template if isinstance(template, str) else "", re.S)
    return match.group(1) if match else None

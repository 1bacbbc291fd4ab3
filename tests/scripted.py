"""A tiny Qwen2 chat checkpoint whose weights make it give one known answer.

Page tests need a reply with exact content (markup that must show as text),
which random weights never produce. This checkpoint is an ordinary Qwen2
folder loaded by the real transformers code; only its weights are chosen:
every attention and MLP block writes nothing (output projections are zero),
so the last hidden state is the current token's embedding, and the output
head maps each token of a chain to the next one. After the generation prompt
ends ("assistant\\n") the model answers ``pieces`` in order, then <|im_end|>.
Each piece is added to the tokenizer as one token, so the chain never
repeats a token.

``build_scripted_chatglm3`` does the same to a copy of the ChatGLM3 reference fixture
(tests/data/chatglm/chatglm3-tiny), whose sentencepiece vocabulary is mostly bytes: its
pieces are appended to ``tokenizer.model`` as user-defined pieces, the special tokens move up
by as many ids (they are numbered after the pieces), and the weights move with them.

``TOOLS_TEMPLATE`` is a chat template in Qwen2.5's tool format (the tools as
JSON lines in a ``<tools>`` block of the system message, calls as
``<tool_call>`` JSON, results as ``<tool_response>`` in a user turn), written
from that format's description, for a scripted checkpoint that calls tools.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from glmrepl.tiny import IM_END, build_qwen2_chat

TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LOGIT_SCALE = 200.0  # large enough that sampling at any sane temperature picks the scripted token


def build_scripted_qwen2(dest: Path, pieces: list[str], chat_template: str | None = None) -> Path:
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoModelForCausalLM

    dest = build_qwen2_chat(dest)
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in pieces])
    tokenizer.save(str(dest / "tokenizer.json"))
    if chat_template is not None:
        config_file = dest / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config_file.write_text(json.dumps({**config, "chat_template": chat_template}), encoding="utf-8")
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    assert len(newline) == 1, newline
    chain = [newline[0], *(tokenizer.token_to_id(piece) for piece in pieces), tokenizer.token_to_id(IM_END)]
    assert len(set(chain)) == len(chain), "a scripted reply may not repeat a token"

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    model.resize_token_embeddings(tokenizer.get_vocab_size(), mean_resizing=False)
    hidden = model.config.hidden_size
    assert len(chain) <= hidden
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        head.zero_()
        for step, (token, following) in enumerate(zip(chain, chain[1:])):
            direction = torch.zeros(hidden)
            direction[step] = 1.0
            embeddings[token] = direction
            head[following] = LOGIT_SCALE * direction
    for stale in [*dest.glob("*.safetensors"), *dest.glob("*.safetensors.index.json")]:
        stale.unlink()  # the resized weights are written afresh
    model.save_pretrained(dest, max_shard_size="200KB")
    return dest


def build_scripted_chatglm3(dest: Path, pieces: list[str]) -> Path:
    """chatglm3-tiny answering ``pieces`` after ``<|assistant|>``, then ``<|observation|>``
    (the role ChatGLM3 ends a tool call with), as its own sentencepiece pieces."""
    import torch
    from chatglm_reference import DATA
    from safetensors.torch import load_file, save_file

    from glmrepl.engine.families.chatglm.tokenizers import ChatGLM2Tokenizer

    source = DATA / "chatglm3-tiny"
    dest = Path(dest)
    shutil.copytree(source, dest)
    model_file = dest / "tokenizer.model"
    model_file.write_bytes(model_file.read_bytes() + b"".join(_user_defined_piece(p) for p in pieces))
    config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    base = config["padded_vocab_size"] - CHATGLM3_SPECIAL_TOKENS  # the sentencepiece pieces before ours
    vocabulary = config["padded_vocab_size"] + len(pieces)
    (dest / "config.json").write_text(
        json.dumps({**config, "padded_vocab_size": vocabulary, "vocab_size": vocabulary}, indent=2), encoding="utf-8"
    )
    ours = list(range(base, base + len(pieces)))
    tokenizer = ChatGLM2Tokenizer(model_file, role_tokens=True)
    assert [tokenizer.sp.piece_to_id(p) for p in pieces] == ours, "a scripted piece is already in the vocabulary"
    assistant, observation = tokenizer.get_command("<|assistant|>"), tokenizer.get_command("<|observation|>")
    weights = load_file(str(source / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith(("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            tensor.zero_()  # every block writes nothing: the last hidden state is the token's embedding
        elif name.endswith("final_layernorm.weight"):
            tensor.fill_(1.0)
    embeddings, head = (_with_rows(weights[name], base, len(pieces)) for name in (_EMBEDDINGS, _HEAD))
    head.zero_()
    chain = [assistant, *ours, observation]
    hidden = embeddings.shape[1]
    for step, (token, following) in enumerate(zip(chain, chain[1:])):
        direction = torch.zeros(hidden)
        direction[step] = 1.0
        embeddings[token] = direction
        head[following] = LOGIT_SCALE * direction
    save_file({**weights, _EMBEDDINGS: embeddings, _HEAD: head}, str(dest / "model.safetensors"))
    return dest


CHATGLM3_SPECIAL_TOKENS = 9  # [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>
_EMBEDDINGS = "transformer.embedding.word_embeddings.weight"
_HEAD = "transformer.output_layer.weight"


def _with_rows(matrix, at: int, count: int):
    """``matrix`` with ``count`` zero rows inserted before row ``at`` (the special tokens' rows move up)."""
    import torch

    return torch.cat([matrix[:at], torch.zeros(count, matrix.shape[1]), matrix[at:]]).contiguous()


def _user_defined_piece(text: str) -> bytes:
    """One entry of ModelProto's repeated ``pieces`` (field 1): piece (1), score (2), type (3) =
    USER_DEFINED (4). Protobuf appends a repeated field's entries found later in the message, so
    this written after the model's bytes adds a piece, which encoding and decoding keep whole."""
    encoded = text.encode("utf-8")
    piece = b"\x0a" + _varint(len(encoded)) + encoded + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(4)
    return b"\x0a" + _varint(len(piece)) + piece


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

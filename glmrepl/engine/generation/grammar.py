"""Replies held to JSON: at each step, the tokens that would break it are masked (xgrammar).

A schema is compiled once per tokenizer and text (xgrammar's compiler caches by text); each
reply gets its own matcher, which follows the tokens the reply made (also across the
stretches a reply is decoded in) and masks the logits before the sampling filters, so
temperature and top-p choose among valid tokens only. The end of the reply (its stop ids)
is allowed exactly where the JSON is complete.

xgrammar enforces most of JSON Schema; the keywords it would silently ignore are refused
here with a 400-style error naming the field (``UNENFORCED``).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import GenerationError, InvalidOutputFormat
from ..request import OutputFormat

# Keywords a schema may hold that the mask would not enforce: refused rather than ignored.
UNENFORCED = ("allOf", "not", "if", "then", "else", "dependentSchemas", "$dynamicRef", "$recursiveRef")
# Keywords whose values are schemas, or maps or lists of schemas, walked for the above.
_SUBSCHEMA = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
MAX_SCHEMA_DEPTH = 64
# Lengths and counts past any reply's length: the grammar engine builds a repetition that long.
MAX_COUNT = 1_000_000
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
MAX_SCHEMA_CHARACTERS = 100_000

_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()
# xgrammar writes the characters of a string with a length limit as any but a quote, a backslash
# and a line break, which lets control characters in (invalid JSON) and escapes out; its other
# strings exclude U+0000 to U+001F, as JSON does. The grammar's text is mended before compiling.
_LENGTH_LIMITED_CHARACTER = r"[^\"\\\r\n]"
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\r\n]"
# xgrammar's errors begin with a time and a source position: "[19:15:53] /path/x.cc:5082: ".
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def check_schema(schema: Any, where: str, strict: bool = False, convert: bool = True) -> str:
    """The schema's JSON text, after refusing what the mask cannot hold to, or (``convert``) what
    the grammar engine cannot read (InvalidOutputFormat naming the field). The server leaves the
    conversion, which can take a while, to the reply's compile in its pool."""
    if not isinstance(schema, dict):
        raise InvalidOutputFormat(f"'{where}' must be a JSON object (a JSON Schema)", where)
    _refuse_unenforced(schema, where, 0)
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARACTERS:
        raise InvalidOutputFormat(f"'{where}' must be at most {MAX_SCHEMA_CHARACTERS} characters of JSON", where)
    if convert:
        _converted(lambda: _json_grammar(text, strict), where)
    return text


def _converted(convert: Callable[[], Any], where: str) -> Any:
    """What ``convert`` returns; an error of the grammar engine as InvalidOutputFormat naming ``where``."""
    try:
        return convert()
    except ImportError:
        raise InvalidOutputFormat(
            "response formats need the xgrammar package: pip install 'glmrepl[structured]'", where
        ) from None
    except RuntimeError as error:
        message = _XGRAMMAR_PREFIX.sub("", str(error).strip().splitlines()[0]).strip()
        raise InvalidOutputFormat(f"'{where}' cannot be used: {message}", where) from None


def _refuse_unenforced(schema: Any, where: str, depth: int) -> None:
    if not isinstance(schema, dict):
        return  # true/false, or a value the compiler words its own error for
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidOutputFormat(f"'{where}' is nested more than {MAX_SCHEMA_DEPTH} schemas deep", where)
    for keyword in _COUNTS:
        value = schema.get(keyword)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_COUNT:
            raise InvalidOutputFormat(f"'{where}.{keyword}' must be at most {MAX_COUNT}", f"{where}.{keyword}")
    for keyword in UNENFORCED:
        if keyword in schema:
            raise InvalidOutputFormat(
                f"'{where}.{keyword}' is not supported: JSON Schema's '{keyword}' cannot be held to while the "
                "reply is written",
                f"{where}.{keyword}",
            )
    for keyword in _SUBSCHEMA:
        _refuse_unenforced(schema.get(keyword), f"{where}.{keyword}", depth + 1)
    for keyword in _SUBSCHEMA_MAPS:
        members = schema.get(keyword)
        for name, member in members.items() if isinstance(members, dict) else ():
            _refuse_unenforced(member, f"{where}.{keyword}.{name}", depth + 1)
    for keyword in _SUBSCHEMA_LISTS:
        members = schema.get(keyword)
        for index, member in enumerate(members) if isinstance(members, list) else ():
            _refuse_unenforced(member, f"{where}.{keyword}[{index}]", depth + 1)


def compile_format(tokenizer: Any, vocab_size: int, output_format: OutputFormat) -> Any:
    """The compiled grammar of ``output_format`` for this tokenizer (cached by the schema's text)."""
    schema = output_format.schema if output_format.schema is not None else '{"type": "object"}'
    strict = output_format.strict and output_format.schema is not None
    compiler = _converted(lambda: _compiler_for(tokenizer, vocab_size), output_format.where)
    return _converted(lambda: compiler.compile_grammar(_json_grammar(schema, strict)), output_format.where)


def compile_call(tokenizer: Any, vocab_size: int, arguments: dict, end: str) -> Any | None:
    """The compiled grammar of a forced tool call's rest: its arguments as JSON valid under their
    schema, then ``end`` (what closes the call). None where the schema cannot be held to: the call
    is then written unheld, as a call without a schema is (and where xgrammar is not installed)."""
    try:
        import xgrammar

        text = check_schema(arguments, "parameters", convert=False)  # converted once, below
        compiler = _compiler_for(tokenizer, vocab_size)
        grammar = xgrammar.Grammar.from_ebnf(_json_grammar(text, False))
        if end:
            grammar = xgrammar.Grammar.concat(grammar, xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(end)}"))
        return compiler.compile_grammar(grammar)
    except (ImportError, InvalidOutputFormat, RuntimeError):
        return None


def _json_grammar(schema: str, strict: bool) -> str:
    """The EBNF text of the schema's grammar, its length-limited strings mended (see above)."""
    import xgrammar

    # Compact JSON (", " and ": "): free whitespace lets a model pad a reply to its length.
    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(_LENGTH_LIMITED_CHARACTER, _JSON_STRING_CHARACTER)


def _compiler_for(tokenizer: Any, vocab_size: int) -> Any:
    import xgrammar

    with _COMPILERS_LOCK:
        known = _COMPILERS.get(tokenizer)
        if known is None or known[0] != vocab_size:
            info = _tokenizer_info(tokenizer, vocab_size)
            known = _COMPILERS[tokenizer] = (vocab_size, xgrammar.GrammarCompiler(info, max_threads=1))
        return known[1]


def _tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    """xgrammar's view of the vocabulary: transformers' tokenizers as it reads them; glmrepl's own
    (ChatGLM's, GLM-4's) by each token's bytes, special tokens as none."""
    import xgrammar

    own = getattr(tokenizer, "id_to_bytes", None)
    if own is None:
        return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    size = min(len(tokenizer), vocab_size)
    return xgrammar.TokenizerInfo([own(index) or b"" for index in range(size)], vocab_size=vocab_size)


class GrammarMask:
    """A logits processor: the scores of tokens that would break the format become -inf.

    ``made`` is the run's list of tokens made so far (the scheduler's side): the matcher
    follows it before each step, so a reply continued in a later stretch stays in step.
    """

    def __init__(self, compiled: Any, stop_ids: list[int], vocab_size: int, made: list[int]):
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.made = made
        self.accepted = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import xgrammar

        for token in self.made[self.accepted :]:
            if not self.matcher.accept_token(int(token)):
                raise GenerationError(f"the reply left its format at token {int(token)}")
            self.accepted += 1
        self.matcher.fill_next_token_bitmask(self.bitmask)
        bitmask = self.bitmask.to(scores.device)
        xgrammar.apply_token_bitmask_inplace(scores, bitmask, vocab_size=min(self.vocab_size, scores.shape[-1]))
        return scores

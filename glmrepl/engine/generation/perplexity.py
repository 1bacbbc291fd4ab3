"""Perplexity of the loaded model on a text, in sliding windows.

The text is tokenized as it is, without a chat template. It is read in
windows of ``window`` positions, each ``stride`` tokens after the previous one;
a window scores only the tokens the previous windows did not, so every token
is scored once, with up to ``window - stride`` tokens of context before it
(the "Perplexity of fixed-length models" method of the transformers docs).
The result is ``exp(mean negative log-likelihood)`` over the scored tokens.

Every window starts with the tokens the tokenizer puts before a text (its
*prefix*): Llama's BOS, ChatGLM2/3 and GLM-4's ``[gMASK] sop``, none for GPT-2
or Qwen2. The prefix is fed, never scored, so with a prefix every text token
is scored; without one a window's first token has nothing to be predicted from
and is only scored when an earlier window holds it (the text's very first
token never is).

ChatGLM-6B is a prefix LM: tokens before ``<sop>`` see each other both ways,
so text there would be read with its future in view. Its tokenizer appends
``[gMASK] <sop>`` after a prompt; here each window starts with them and the
whole text follows in the causal part, where the model generates replies. Each
token is then predicted from the text before it only, as with the other models.

``window`` counts the prefix, so a window never exceeds the model's context.
Windows run one by one under ``torch.inference_mode``; between two, a
``threading.Event`` can stop the run and a callback hears how many tokens are
scored. ``PerplexityJob`` runs it all in a thread for front ends, which show
its progress and cancel it (LocalBackend.start_perplexity starts one).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.units import counted
from ..errors import GlmreplError

DEFAULT_MAX_WINDOW = 1024  # the default window when the context is longer: CPU-sized forwards
_PREFIX_PROBE = "Hello world"  # any text: the tokens before its encoding are the prefix

Progress = Callable[[int, int], None]  # (tokens scored so far, tokens to score)


class PerplexityError(GlmreplError):
    """The text or the window settings cannot be used; one line says why."""


class PerplexityCancelled(GlmreplError):
    """The user stopped a perplexity run."""


@dataclass(frozen=True)
class Window:
    begin: int  # the first text token fed
    end: int  # one past the last text token fed
    first_target: int  # the first text token scored in this window

    @property
    def targets(self) -> int:
        return self.end - self.first_target


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    tokens: int  # tokens scored
    windows: int
    window: int  # positions per forward, prefix included
    stride: int
    seconds: float

    def describe(self) -> str:
        windows = f"{counted(self.windows, 'window')} of {self.window}"
        return (
            f"perplexity {self.perplexity:,.2f} over {counted(self.tokens, 'token')} "
            f"({windows}, stride {self.stride}) in {self.seconds:.1f} s"
        )


# -- the text --------------------------------------------------------------------


def read_text(path: Path | str) -> str:
    """The file's text; PerplexityError when it is missing, a folder, unreadable, not UTF-8 or empty."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PerplexityError(f"{path} is a folder: give a text file")
    if not path.exists():
        raise PerplexityError(f"{path}: no such file")
    if not path.is_file():  # a pipe or a device could be read for ever
        raise PerplexityError(f"{path} is not a regular file: give a text file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PerplexityError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PerplexityError(
            f"{path} is not UTF-8 text (byte {error.start} is not valid UTF-8): give a text file"
        ) from None
    if "\x00" in text:  # valid UTF-8, but a binary file (or UTF-16 text)
        raise PerplexityError(f"{path} is not UTF-8 text (it holds NUL bytes): give a text file")
    text = text.removeprefix("\ufeff")  # an editor's byte-order mark is not part of the text
    if not text.strip():
        raise PerplexityError(f"{path} is empty: there is no text to score")
    return text


def text_prefix(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids each window starts with (see the module docstring); fed, never scored."""
    if model is not None:
        from ..families.traits import model_traits

        own = model_traits(model).window_prefix
        if own is not None:
            return own(tokenizer)
    plain = list(tokenizer.encode(_PREFIX_PROBE, add_special_tokens=False))
    marked = list(tokenizer.encode(_PREFIX_PROBE, add_special_tokens=True))
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start]
    return []


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# -- the windows ---------------------------------------------------------------------


def choose_window(context_length: int | None, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride): the context length (at most DEFAULT_MAX_WINDOW) and half of it, unless chosen."""
    if window is None:
        window = min(context_length or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW)
    elif window < 2:
        raise PerplexityError(f"the window must be at least 2 tokens, not {window}")
    elif context_length and window > context_length:
        raise PerplexityError(f"a window of {window} tokens is longer than the model's context ({context_length})")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise PerplexityError(f"the stride must be from 1 to the window ({window}), not {stride}")
    return window, stride


def plan_windows(length: int, prefix: int, window: int, stride: int) -> list[Window]:
    """The windows over ``length`` text tokens, each fed after ``prefix`` tokens."""
    span = window - prefix  # text tokens per window
    if span < 1 or (span < 2 and not prefix):
        raise PerplexityError(f"a window of {window} tokens leaves no room for text after the {prefix}-token prefix")
    stride = min(stride, span)  # a longer step would leave tokens unscored
    windows, scored, begin = [], 0 if prefix else 1, 0
    while True:
        end = min(begin + span, length)
        # Without a prefix the window's first token is context only.
        first = max(scored, begin if prefix else begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
            scored = end
        if end >= length:
            return windows
        begin += stride


def scored_tokens(length: int, prefix: int) -> int:
    """How many of ``length`` text tokens any plan scores at most (all but the first without a prefix)."""
    return length if prefix else max(0, length - 1)


# -- the computation -------------------------------------------------------------------


def window_nll(model: Any, prefix: list[int], ids: list[int], window: Window) -> float:
    """The summed negative log-likelihood of the window's targets (nats)."""
    import torch
    import torch.nn.functional as F

    fed = prefix + ids[window.begin : window.end]
    device = input_device(model)
    input_ids = torch.tensor([fed], dtype=torch.long, device=device)
    kept = window.targets + 1  # logits of the positions that predict the targets (and the last, unused)
    logits = last_logits(model, input_ids, kept)[0, -kept:-1]
    targets = torch.tensor(ids[window.first_target : window.end], dtype=torch.long, device=logits.device)
    return float(F.cross_entropy(logits.float(), targets, reduction="sum"))


def last_logits(model: Any, input_ids: Any, kept: int) -> Any:
    """Logits of at least the last ``kept`` positions: only those when the model can skip the others
    (a vocabulary-wide row per position is most of a forward's memory); a checkpoint's own code
    that lacks ``logits_to_keep`` gives them all."""
    try:
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=kept).logits
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        return model(input_ids=input_ids, use_cache=False).logits


def perplexity_of_ids(
    model: Any,
    ids: list[int],
    prefix: list[int],
    window: int,
    stride: int,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of the text ``ids`` (see the module docstring); PerplexityCancelled between windows."""
    import torch

    stride = min(stride, window - len(prefix))  # a stride past the window's text would skip tokens
    if len(ids) < 2:  # one token says nothing about a model, with a prefix or without
        raise PerplexityError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''}: it needs at least 2")
    plan = plan_windows(len(ids), len(prefix), window, stride)
    total = sum(w.targets for w in plan)
    started, nll, scored = time.monotonic(), 0.0, 0
    if progress is not None:
        progress(0, total)
    with torch.inference_mode():
        for piece in plan:
            if cancel is not None and cancel.is_set():
                raise PerplexityCancelled(f"perplexity cancelled after {scored:,} of {total:,} tokens")
            nll += window_nll(model, prefix, ids, piece)
            scored += piece.targets
            if progress is not None:
                progress(scored, total)
    mean = nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, len(plan), window, stride, time.monotonic() - started)


def perplexity_of_text(
    model: Any,
    tokenizer: Any,
    text: str,
    window: int,
    stride: int,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    return perplexity_of_ids(
        model, text_ids(tokenizer, text), text_prefix(tokenizer, model), window, stride, cancel, progress
    )


def input_device(model: Any):
    """Inputs go where the embeddings are (the first device of a sharded model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else model.device


# -- a run in the background ---------------------------------------------------------------


class PerplexityJob:
    """A perplexity run in a background thread: front ends show ``status`` and may ``cancel``."""

    def __init__(self, name: str):
        self.name = name
        self.scored = 0
        self.total: int | None = None
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: PerplexityResult | None = None

    @property
    def fraction(self) -> float | None:
        return self.scored / self.total if self.total else None

    @property
    def status(self) -> str:
        if self.total is None:
            return f"perplexity of {self.name}: reading the text"
        return f"perplexity of {self.name}: {self.scored:,}/{self.total:,} tokens"

    def progress(self, scored: int, total: int) -> None:
        self.scored, self.total = scored, total

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def start(self, work: Callable[[PerplexityJob], PerplexityResult]) -> PerplexityJob:
        threading.Thread(target=self._run, args=(work,), name="glmrepl-perplexity", daemon=True).start()
        return self

    def _run(self, work: Callable[[PerplexityJob], PerplexityResult]) -> None:
        try:
            self.result = work(self)
        except GlmreplError as error:
            self.error = error
        except Exception as error:  # out of memory, a model that cannot run: one line, never a traceback
            from ..errors import first_line

            self.error = GlmreplError(f"perplexity failed: {first_line(error)}")
        finally:
            self.done.set()

"""The multi-turn benchmark's figures (benchmarks/multiturn.py): per-turn summaries and tables.

Only the standard library: multiturn.py imports this at its top, where it also runs in the
llama environment.
"""

from __future__ import annotations

import statistics

GROWTH_TARGET = 1.3  # last turn's first token over the first turn's, with reuse: at most
SPEEDUP_TARGET = 5.0  # without reuse over with reuse at the last turn: at least


def reply_reuse(rows: list[dict]) -> list[int | None]:
    """Per turn, how many of the reused tokens lie past the previous prompt: the previous reply's
    tokens whose cache was kept (its text, sent back, must tokenize to the ids generated)."""
    reused = [None]
    for previous, row in zip(rows, rows[1:]):
        tokens = row["with"]["reused_tokens"]
        reused.append(None if tokens is None else max(0, tokens - previous["with"]["prompt_tokens"]))
    return reused


def summary(rows: list[dict], new_tokens: int) -> dict:
    first, last = rows[0], rows[-1]
    with_decode = [r["with"]["decode_tokens_per_s"] for r in rows if r["with"]["decode_tokens_per_s"]]
    without_decode = [r["without"]["decode_tokens_per_s"] for r in rows if r["without"]["decode_tokens_per_s"]]
    short = [
        f"turn {r['turn']} {side}: {r[side]['new_tokens']} tokens ({r[side]['finish_reason']})"
        for r in rows
        for side in ("with", "without")
        if r[side]["new_tokens"] != new_tokens
    ]
    return {
        "growth": last["with"]["first_token_s"] / first["with"]["first_token_s"],
        "speedup": last["without"]["first_token_s"] / last["with"]["first_token_s"],
        "decode_with_tokens_per_s": statistics.median(with_decode) if with_decode else None,
        "decode_without_tokens_per_s": statistics.median(without_decode) if without_decode else None,
        "same_replies": all(r["with"]["reply"] == r["without"]["reply"] for r in rows),
        "differing_turns": [r["turn"] for r in rows if r["with"]["reply"] != r["without"]["reply"]],
        "short_replies": short,
        "reply_tokens_reused": reply_reuse(rows),
        "without_reused_tokens": [r["without"]["reused_tokens"] for r in rows],
    }


def table(title: str, rows: list[dict], figures: dict) -> str:
    header = ("turn", "prompt", "reused", "of reply", "read", "first tok with", "without", "decode with", "without")
    lines = [_cells((*header, "same reply"))]
    for row, of_reply in zip(rows, figures["reply_tokens_reused"]):
        used, fresh = row["with"], row["without"]
        lines.append(
            _cells(
                (
                    str(row["turn"]),
                    str(used["prompt_tokens"]),
                    str(used["reused_tokens"]),
                    "-" if of_reply is None else str(of_reply),
                    str(used["prompt_tokens"] - (used["reused_tokens"] or 0)),
                    f"{used['first_token_s']:.3f} s",
                    f"{fresh['first_token_s']:.3f} s",
                    _rate(used["decode_tokens_per_s"]),
                    _rate(fresh["decode_tokens_per_s"]),
                    "yes" if used["reply"] == fresh["reply"] else "NO",
                )
            )
        )
    lines.insert(1, "-" * len(lines[0]))
    last = rows[-1]["turn"]
    lines += [
        f"turn {last} vs turn 1, with reuse: {figures['growth']:.2f}x "
        f"(target <= {GROWTH_TARGET}: {_verdict(figures['growth'] <= GROWTH_TARGET)})",
        f"without / with reuse at turn {last}: {figures['speedup']:.2f}x "
        f"(target >= {SPEEDUP_TARGET}: {_verdict(figures['speedup'] >= SPEEDUP_TARGET)})",
        f"decode tok/s, median: {_rate(figures['decode_with_tokens_per_s'])} with reuse, "
        f"{_rate(figures['decode_without_tokens_per_s'])} without",
        "greedy replies identical with and without reuse: "
        + ("yes" if figures["same_replies"] else f"NO (turns {figures['differing_turns']})"),
    ]
    if any(figures["without_reused_tokens"]):
        lines.append(f"the side without reuse reused tokens: {figures['without_reused_tokens']}")
    if figures["short_replies"]:
        lines.append("replies that ended early: " + "; ".join(figures["short_replies"]))
    return f"{title}\n" + "\n".join(lines)


def _cells(cells) -> str:
    widths = (4, 6, 6, 8, 5, 14, 9, 11, 7, 10)
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))


def _rate(value: float | None) -> str:
    return f"{value:.2f}" if value else "-"


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def without_ids(rows: list[dict]) -> list[dict]:
    """The rows for the JSON file: replies and prompts as lengths, the ids being thousands of numbers."""
    kept = []
    for row in rows:
        kept.append({"turn": row["turn"]})
        for side in ("with", "without"):
            kept[-1][side] = {k: v for k, v in row[side].items() if k not in ("reply", "text", "prompt_ids")}
    return kept


def against_repl(served: list[dict], repl: list[dict]) -> dict:
    """Turns where the streamed reply is not the REPL's. The server builds its prompts from the
    texts it sent: with the same texts, the same prompts. Streamed deltas are the reply before
    the chat format's clean_reply (trailing spaces go), the REPL's history after it: both are compared."""
    pairs = [(s["with"]["reply"], r["with"]["text"]) for s, r in zip(served, repl)]
    return {
        "differing_turns": [turn for turn, (a, b) in enumerate(pairs, 1) if a != b],
        "differing_turns_after_strip": [turn for turn, (a, b) in enumerate(pairs, 1) if a.rstrip() != b],
        "differing_prompt_tokens": [
            s["turn"] for s, r in zip(served, repl) if s["with"]["prompt_tokens"] != r["with"]["prompt_tokens"]
        ],
    }


def against_repl_line(figures: dict) -> str:
    exact, stripped = figures["differing_turns"], figures["differing_turns_after_strip"]
    if not exact:
        return "streamed replies identical to the REPL's: yes"
    line = f"streamed replies identical to the REPL's: NO at turns {exact}"
    if stripped:
        return f"{line}, even without trailing spaces at turns {stripped}"
    return (
        f"{line}; without trailing spaces yes (the REPL keeps a reply so, the stream sends it as generated;"
        f" prompt tokens differ from turn {min(figures['differing_prompt_tokens'], default='-')})"
    )


def report(results: dict) -> str:
    placement = f"{results['placement']}, {results['threads']} threads"
    parts = [
        table(f"REPL path ({placement}):", results["repl"]["turns"], results["repl"]["summary"]),
        table(
            f"glmrepl serve, openai client, whole history each turn ({placement}):",
            results["served"]["turns"],
            results["served"]["summary"],
        )
        + "\n"
        + against_repl_line(results["served"]["against_repl"]),
    ]
    llama = results["llama_cpp"]
    if "skipped" in llama:
        parts.append(f"llama.cpp multi-turn comparison skipped: {llama['skipped']}")
    else:
        title = f"llama.cpp {llama['llama_cpp']} float32 GGUF ({llama['threads']} threads), the REPL path's prompt ids:"
        parts.append(table(title, llama["turns"], llama["summary"]))
    return "\n\n".join(parts)

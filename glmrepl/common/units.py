"""Human-readable sizes and counts, one spelling for every listing."""

from __future__ import annotations


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def counted(count: int, word: str, plural: str | None = None) -> str:
    """'1 turn', '3 turns' ('plural' for words that do not just take an s: reply, replies)."""
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def human_count(count: int | None) -> str:
    """Parameter counts: 494.0M, 6.2B; '-' when unknown (e.g. pickled weights)."""
    if not count:
        return "-"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(count)

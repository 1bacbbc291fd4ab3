"""Stop strings over streamed text, in time linear in the text.

Each stop string keeps a Knuth-Morris-Pratt state: the length of its longest
prefix that the text seen so far ends with. A new character moves every state
in amortised constant time, so a token costs its own characters, never the
length of the stop strings (a client may send long ones). The text that may
still begin a stop string is held back until it is known not to.
"""

from __future__ import annotations


class _Matcher:
    """One stop string and how much of it the text ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fallback = _prefix_function(stop)
        self.matched = 0

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the whole stop string was just completed."""
        stop, matched = self.stop, self.matched
        while matched and stop[matched] != char:
            matched = self.fallback[matched - 1]
        if stop[matched] == char:
            matched += 1
        if matched == len(stop):
            self.matched = self.fallback[matched - 1]
            return True
        self.matched = matched
        return False


def _prefix_function(text: str) -> list[int]:
    """For each prefix, the length of its longest proper border (KMP's failure table)."""
    table = [0] * len(text)
    border = 0
    for i in range(1, len(text)):
        while border and text[i] != text[border]:
            border = table[border - 1]
        if text[i] == text[border]:
            border += 1
        table[i] = border
    return table


class StopStrings:
    """Cut streamed text at the first stop string; hold back text that may begin one."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.matchers = [_Matcher(s) for s in stops if s]
        self.pending = ""
        self.hit = False

    @property
    def stops(self) -> list[str]:
        return [m.stop for m in self.matchers]

    def push(self, delta: str) -> str:
        """The part of ``delta`` (and of what was held back) that is certainly reply text."""
        if not self.matchers or self.hit:
            return "" if self.hit else delta
        text = self.pending + delta
        for index in range(len(self.pending), len(text)):
            char = text[index]
            for matcher in self.matchers:
                if matcher.feed(char):
                    # The first stop string to be completed ends the reply, as it
                    # would have had the text arrived one character at a time.
                    self.hit, self.pending = True, ""
                    return text[: index + 1 - len(matcher.stop)]
        keep = max(m.matched for m in self.matchers)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        tail, self.pending = self.pending, ""
        return tail

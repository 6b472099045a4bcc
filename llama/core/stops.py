"""Stop strings: where generated text must end, and how much of it can be shown before that is known.

    matcher = StopMatcher(["\\n\\n", "User:"])
    for piece in pieces:                      # text as it is decoded, token by token
        text, stopped = matcher.push(piece)   # show `text`; hold back what may start a stop string
        if stopped:                           # the text ends before the earliest stop string
            break
    else:
        text, _ = matcher.push("", final=True)  # the end: nothing can complete a stop any more

Time is linear in the generated text, whatever the stop strings' lengths: each stop string keeps a
Knuth-Morris-Pratt state (how many of its characters the text currently ends with), advanced one
character at a time. Its failure table (the prefix function) is built lazily, only as far as the
state has reached, so a 250,000-character stop string costs nothing until the text actually
follows it. Checking `s in text` on every token instead, and testing every prefix of every stop
for the held-back tail, costs O(len(stop)^2) per token: seconds for one long stop string.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence


class _Pattern:
    """One stop string and how much of it the text seen so far ends with."""

    def __init__(self, s: str):
        self.s = s
        self.border = [0]  # border[i]: length of the longest proper prefix of s[: i + 1] that is also its suffix
        self.matched = 0  # the text ends with s[:matched]

    def _border(self, i: int) -> int:
        """border[i], extending the table one entry at a time (amortised O(1) per entry)."""
        s, border = self.s, self.border
        while len(border) <= i:
            j = len(border)
            k = border[j - 1]
            while k and s[j] != s[k]:
                k = border[k - 1]
            border.append(k + 1 if s[j] == s[k] else 0)
        return border[i]

    def step(self, c: str) -> bool:
        """Advance by one character; True once the text ends with the whole stop string."""
        s, q = self.s, self.matched
        while q and s[q] != c:
            q = self._border(q - 1)
        if s[q] == c:
            q += 1
        self.matched = q
        return q == len(s)


class StopMatcher:
    """Cuts a stream of text at the first stop string (see the module docstring).

    push(piece) returns the text that is safe to show (it cannot be part of a stop string) and
    whether a stop string is complete; then the returned text ends right before the earliest stop
    string in the text, and the matcher is done. The rest is held back while it may be the start of
    a stop string; push(..., final=True) releases it. The held-back text is kept as the pieces it
    came in, so that releasing it copies each character once.
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop strings must be a sequence of non-empty strings, got {stops!r:.200}")
        self._patterns = [_Pattern(s) for s in dict.fromkeys(stops)]
        self._held: deque[str] = deque()  # text not shown yet: it may be the start of a stop string
        self._held_chars = 0
        self.stopped = False

    def push(self, piece: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("push() after a stop string was found")
        cut = None  # where the earliest complete stop string starts, counted from the first held character
        for p in self._patterns:
            for i, c in enumerate(piece):
                if p.step(c):
                    begin = self._held_chars + i + 1 - len(p.s)
                    cut = begin if cut is None else min(cut, begin)
                    break
        self._held.append(piece)
        self._held_chars += len(piece)
        if cut is not None:
            self.stopped = True
            return self._release(cut), True
        hold = 0 if final else max((p.matched for p in self._patterns), default=0)
        return self._release(self._held_chars - hold), False

    def _release(self, n: int) -> str:
        """The first n held characters, no longer held."""
        out = []
        self._held_chars -= n
        while n:
            first = self._held[0]
            if len(first) <= n:
                out.append(self._held.popleft())
                n -= len(first)
            else:
                out.append(first[:n])
                self._held[0] = first[n:]
                n = 0
        return "".join(out)

"""Stop strings: where generated text must end, and how much of it can be shown before that is known."""

from __future__ import annotations

from typing import Sequence


def split_at_stop(text: str, stop: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to show, text to hold back, whether a stop string was reached)."""
    if not stop:
        return text, "", False
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        return text[: min(hits)], "", True
    if final:
        return text, "", False
    # Hold back the longest tail that is a prefix of some stop string.
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], text[len(text) - hold :], False

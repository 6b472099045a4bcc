"""argparse value types the scripts share (argparse only, so --help stays free of torch).

The scripts import this file as a sibling, as they do loop_flags.py: `from .arg_types import ...`
where they are installed as the package llama_cli, `from arg_types import ...` where they run as
`python scripts/NAME.py`.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1, or argparse's usage error naming the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value

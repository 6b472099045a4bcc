"""Build the shipped evaluation set (llama/training/tasks/kjv/*.jsonl) from the held-out chapters of
the King James Bible. See llama/training/kjv_tasks.py for what each task holds.

    python scripts/prepare_kjv.py --out data/kjv
    python scripts/make_kjv_tasks.py --valid data/kjv/valid.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--valid", required=True, help="valid.txt written by scripts/prepare_kjv.py (the held-out chapters)")
    p.add_argument("--out", help="directory for the JSONL files (default: the shipped tasks' folder, llama/training/tasks/kjv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item draw (default 0)")
    args = p.parse_args(argv)
    from llama.training import kjv_tasks  # after parsing: --help answers without waiting for torch

    try:
        text = Path(args.valid).read_text(encoding="utf-8")
        tasks = kjv_tasks.build(text, args.seed)
        out = Path(args.out or kjv_tasks.TASKS_DIR)
        if not out.is_dir():
            raise FileNotFoundError(f"{out}: no such directory")
        written = kjv_tasks.write(tasks, out)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, (name, items) in zip(written, tasks.items()):
        print(f"{path}: {len(items)} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())

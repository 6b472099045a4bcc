"""Build a small instruction set from the King James Bible corpus (scripts/prepare_kjv.py's output).

    python scripts/make_kjv_instructions.py --kjv data/kjv --out data/kjv-instruct

Alpaca records whose answer follows from the input alone, so a held-out item can be scored by exact
match: the input is a verse and the instruction asks for one of its words.

    {"instruction": "What is the last word of this verse?",
     "input": "And God said, Let there be light: and there was light.",
     "output": "light"}

Two instructions, so the model must read the instruction, not only the verse: the LAST word of the
verse, and the word that FOLLOWS a given word (the first word of the verse that appears only once in
it, quoted in the instruction). Words are runs of letters (and apostrophes); punctuation is not part
of an answer. Verses of 6 to 30 words only.

train.jsonl comes from train.txt (the chapters the bundled model was trained on); valid.jsonl
(validation loss during fine-tuning) and test.jsonl (exact match) from disjoint verses of valid.txt,
the held-out chapters. The same input and --seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

WORD = re.compile(r"[A-Za-z']+")
HEADING = re.compile(r"(?:[123] )?[A-Z][A-Za-z ]*? \d+")  # a chapter heading line: "Genesis 1"
LAST = "What is the last word of this verse?"
AFTER = "Which word comes right after \"{word}\" in this verse?"


def verses(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not HEADING.fullmatch(line.strip())]  # fmt: skip


def records_for(verse: str, rng: random.Random) -> list[dict]:
    """The two records of one verse (or fewer: no word occurs once with a successor)."""
    words = WORD.findall(verse)
    if not 6 <= len(words) <= 30:
        return []
    out = [{"instruction": LAST, "input": verse, "output": words[-1]}]
    once = [i for i, w in enumerate(words[:-1]) if words.count(w) == 1]
    if once:
        i = rng.choice(once)
        out.append({"instruction": AFTER.format(word=words[i]), "input": verse, "output": words[i + 1]})
    return out


def build(verse_list: list[str], n: int, rng: random.Random) -> list[dict]:
    """n records, half of each instruction where possible, from verses in random order."""
    order = list(verse_list)
    rng.shuffle(order)
    last, after = [], []
    for verse in order:
        for record in records_for(verse, rng):
            (last if record["instruction"] == LAST else after).append(record)
        if len(last) >= n // 2 and len(after) >= n - n // 2:
            break
    records = last[: n // 2] + after[: n - n // 2]
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kjv", required=True, help="directory with train.txt and valid.txt from scripts/prepare_kjv.py")
    p.add_argument("--out", required=True, help="directory to write train.jsonl, valid.jsonl and test.jsonl into")
    p.add_argument("--train", type=int, default=4000, help="training records (default 4000)")
    p.add_argument("--valid", type=int, default=200, help="validation records (default 200)")
    p.add_argument("--test", type=int, default=200, help="held-out records scored by exact match (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    args = p.parse_args(argv)
    try:
        kjv = Path(args.kjv)
        train_verses, held_verses = verses(kjv / "train.txt"), verses(kjv / "valid.txt")
        rng = random.Random(args.seed)
        rng.shuffle(held_verses)
        half = len(held_verses) // 2  # validation and test come from disjoint verses
        sets = {
            "train": build(train_verses, args.train, rng),
            "valid": build(held_verses[:half], args.valid, rng),
            "test": build(held_verses[half:], args.test, rng),
        }
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in sets.items():
        if len(records) < getattr(args, name):
            print(f"error: only {len(records)} {name} records could be made", file=sys.stderr)
            return 2
        write_jsonl(out / f"{name}.jsonl", records)
        print(f"{out / (name + '.jsonl')}: {len(records)} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

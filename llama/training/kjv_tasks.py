"""The evaluation set shipped with the project: lm-eval tasks made from the corpus the bundled model
was trained on (the King James Bible), from the chapters held out of its training (valid.txt).

    python scripts/prepare_kjv.py --out data/kjv                 # train.txt, valid.txt
    python scripts/make_kjv_tasks.py --valid data/kjv/valid.txt  # rewrites the JSONL files of TASKS_DIR

Four tasks, one lm-eval request type each (the YAMLs in TASKS_DIR, group `kjv`):

- kjv_cloze (multiple choice): the first half of a verse, and four second halves: its own and
  three of other verses of about the same length (so length alone does not give it away);
  metrics acc and acc_norm (log-likelihood per byte).
- kjv_lastword (loglikelihood, as LAMBADA): a verse without its last word, and that word; metrics
  acc (the word is the model's greedy continuation) and perplexity.
- kjv_lastword_gen (generate_until): the same contexts, generating a few tokens; exact match of
  the first word generated with the verse's last word.
- kjv_perplexity (loglikelihood_rolling): whole verses; word and byte perplexity, bits per byte.

Every item comes from a held-out chapter, so the tasks measure what the model learned of the
language, not what it memorised. Items are drawn with a fixed seed: the same valid.txt always gives
the same files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks" / "kjv"
SIZES = {"kjv_cloze": 200, "kjv_lastword": 300, "kjv_lastword_gen": 100, "kjv_perplexity": 100}
HEADING = re.compile(r"(?:[123] )?[A-Z][A-Za-z ]*? \d+")  # "Genesis 20", "1 Samuel 3": lines of their own
MIN_WORDS = 8
LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)[^A-Za-z]*$")  # the context, and the last word without its punctuation


def verses(valid_text: str) -> list[str]:
    """The verses of valid.txt (one per line), without the chapter headings."""
    return [line.strip() for line in valid_text.splitlines() if line.strip() and not HEADING.fullmatch(line.strip())]


def cloze_items(all_verses: list[str], n: int, rng: random.Random, choices: int = 4) -> list[dict]:
    """{"context", "choices", "label"}: a verse's first half (cut at the word nearest the middle), and
    second halves of which choices[label] is its own. Distractors are second halves of other
    verses whose length is within 30% of the true one's."""
    halves = []
    for verse in all_verses:
        words = verse.split()
        if len(words) >= MIN_WORDS:
            cut = len(words) // 2
            halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    items = []
    for i in rng.sample(range(len(halves)), len(halves)):
        context, ending = halves[i]
        similar = [e for j, (_, e) in enumerate(halves) if j != i and e != ending and 0.7 <= len(e) / len(ending) <= 1.3]
        if len(similar) < choices - 1:
            continue
        options = rng.sample(similar, choices - 1) + [ending]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "label": options.index(ending)})
        if len(items) == n:
            break
    return items


def last_word_items(all_verses: list[str], n: int, rng: random.Random) -> list[dict]:
    """{"context", "target"}: a verse up to its last word, and that word (without punctuation)."""
    found = []
    for verse in all_verses:
        match = LAST_WORD.match(verse)
        if match and len(verse.split()) >= MIN_WORDS:
            found.append({"context": match.group(1), "target": match.group(2)})
    return rng.sample(found, min(n, len(found)))


def perplexity_items(all_verses: list[str], n: int, rng: random.Random) -> list[dict]:
    return [{"text": v} for v in rng.sample(all_verses, min(n, len(all_verses)))]


def build(valid_text: str, seed: int = 0) -> dict[str, list[dict]]:
    """The items of every task, by task name (the JSONL file is <name>.jsonl). The generation task
    takes the first items of the last-word task's contexts."""
    all_verses = verses(valid_text)
    if len(all_verses) < 100:
        raise ValueError(f"expected the KJV's held-out verses (valid.txt of scripts/prepare_kjv.py), found {len(all_verses)} lines")
    rng = random.Random(seed)
    last_word = last_word_items(all_verses, SIZES["kjv_lastword"], rng)
    return {
        "kjv_cloze": cloze_items(all_verses, SIZES["kjv_cloze"], rng),
        "kjv_lastword": last_word,
        "kjv_lastword_gen": last_word[: SIZES["kjv_lastword_gen"]],
        "kjv_perplexity": perplexity_items(all_verses, SIZES["kjv_perplexity"], rng),
    }


def write(tasks: dict[str, list[dict]], directory: Path = TASKS_DIR) -> list[Path]:
    written = []
    for name, items in tasks.items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
        written.append(path)
    return written

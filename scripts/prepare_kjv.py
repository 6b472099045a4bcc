"""Prepare the King James Bible as a small training corpus: train.txt and valid.txt.

    python scripts/prepare_kjv.py --out data/kjv                    # downloads with apt-get
    python scripts/prepare_kjv.py --out data/kjv --extracted DIR    # DIR: both .debs unpacked (dpkg -x)
    python scripts/prepare_kjv.py --out data/kjv-runs --layout runs # verse runs as paragraphs

Source: the Debian packages bible-kjv (the `bible` program; GPL-2+) and bible-kjv-text (its data;
the King James Version of 1611, whose copyright has expired). The script runs
`apt-get download bible-kjv bible-kjv-text`, unpacks both with `dpkg -x`, and prints the whole
text with `usr/bin/bible -p usr/lib "Gen1:1-Rev22:21"`. That output looks like

    Genesis 1

      1 In the beginning God created the heaven and the earth.
      2 And the earth was without form, and void; and darkness was upon the face of
    the deep. And the Spirit of God moved upon the face of the waters.

and is cleaned into one line per verse (verse numbers removed, wrapped lines joined with a space).
Chapter headings ("Genesis 1") are kept as lines of their own (--no-headings drops them): they
tell the model which book it is in.

--layout runs writes paragraphs instead: each chapter is cut into runs of consecutive verses,
joined with spaces into one line, the runs separated by blank lines (train.py --documents
paragraph makes each run one document). A run closes after a verse that ends a sentence once it
holds --run-words words, after any verse once it would pass --max-run-words, and at the end of
the chapter; a chapter's heading is the first line of its first run. A model trained on these
writes a paragraph of a few verses and stops, where one trained on single verses stops after one. The split is by chapter: every --valid-every-th chapter
(chapters 20, 40, ... counted through the whole Bible; about 5%) goes to valid.txt, the rest to
train.txt, so the same input always gives the same files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

EXPECTED_VERSES = 31102  # in the KJV (Protestant canon, 66 books, 1189 chapters)
EXPECTED_CHAPTERS = 1189
HEADING = re.compile(r"((?:[123] )?[A-Z][A-Za-z ]*?) (\d+)")  # "Genesis 1", "1 Samuel 3", "Song of Solomon 2"
VERSE = re.compile(r"  (\d+) (.*)")


@dataclass
class Chapter:
    heading: str
    verses: list[str] = field(default_factory=list)


def parse_bible_output(text: str) -> list[Chapter]:
    """Chapters with their verses, from the output of `bible -p`.

    A heading is a line matching HEADING right after a blank line; a verse starts with two spaces
    and its number; any other non-blank line continues the current verse.
    """
    chapters: list[Chapter] = []
    previous_blank = True
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            previous_blank = True
            continue
        verse = VERSE.fullmatch(line)
        if previous_blank and not verse and HEADING.fullmatch(line):
            chapters.append(Chapter(line))
        elif verse:
            if not chapters:
                raise ValueError(f"line {line_no}: a verse before any chapter heading: {line!r}")
            number = int(verse.group(1))
            if number != len(chapters[-1].verses) + 1:
                raise ValueError(f"line {line_no}: {chapters[-1].heading} verse {number} follows verse "
                                 f"{len(chapters[-1].verses)}: {line!r}")  # fmt: skip
            chapters[-1].verses.append(verse.group(2).strip())
        else:
            if not chapters or not chapters[-1].verses:
                raise ValueError(f"line {line_no}: text outside any verse: {line!r}")
            chapters[-1].verses[-1] += " " + line.strip()
        previous_blank = False
    return chapters


def split_chapters(chapters: list[Chapter], valid_every: int, headings: bool = True) -> tuple[str, str]:
    """(train text, valid text): every valid_every-th chapter to validation, one verse per line."""
    train, valid = [], []
    for i, chapter in enumerate(chapters, 1):
        lines = ([chapter.heading] if headings else []) + chapter.verses
        (valid if i % valid_every == 0 else train).extend(lines)
    return "\n".join(train) + "\n", "\n".join(valid) + "\n"


SENTENCE_END = re.compile(r"[.?!][)'\"]*$")


def verse_runs(verses: list[str], min_words: int, max_words: int) -> list[str]:
    """Consecutive verses joined into paragraphs: a run closes after a verse that ends a sentence
    once it holds min_words words, before a verse that would take it past max_words (a run holds
    at least one verse), and at the last verse."""
    runs: list[list[str]] = [[]]
    words = 0
    for verse in verses:
        n = len(verse.split())
        if runs[-1] and words + n > max_words:
            runs.append([])
            words = 0
        runs[-1].append(verse)
        words += n
        if words >= min_words and SENTENCE_END.search(verse):
            runs.append([])
            words = 0
    return [" ".join(run) for run in runs if run]


def split_chapters_in_runs(chapters: list[Chapter], valid_every: int, min_words: int, max_words: int,
                           headings: bool = True) -> tuple[str, str]:
    """(train text, valid text) as blank-line-separated verse runs (see verse_runs); the same
    chapters go to validation as in split_chapters."""
    train, valid = [], []
    for i, chapter in enumerate(chapters, 1):
        runs = verse_runs(chapter.verses, min_words, max_words)
        if headings:
            runs[0] = f"{chapter.heading}\n{runs[0]}"
        (valid if i % valid_every == 0 else train).extend(runs)
    return "\n\n".join(train) + "\n", "\n\n".join(valid) + "\n"


def fetch_bible_text(extracted: Path | None) -> tuple[str, str]:
    """(the output of `bible -p`, the package version), downloading and unpacking the packages when
    `extracted` is None."""
    with tempfile.TemporaryDirectory(prefix="kjv-") as tmp:
        if extracted is None:
            for tool in ("apt-get", "dpkg"):
                if shutil.which(tool) is None:
                    raise RuntimeError(f"{tool} not found: unpack bible-kjv and bible-kjv-text elsewhere and pass --extracted")
            print("downloading bible-kjv and bible-kjv-text with apt-get ...", file=sys.stderr)
            _run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=tmp)
            extracted = Path(tmp) / "root"
            for deb in sorted(Path(tmp).glob("*.deb")):
                _run(["dpkg", "-x", str(deb), str(extracted)])
        program, library = extracted / "usr" / "bin" / "bible", extracted / "usr" / "lib"
        if not program.is_file() or not (library / "bible.data").is_file():
            raise RuntimeError(f"{extracted}: expected usr/bin/bible and usr/lib/bible.data (dpkg -x of both packages)")
        text = _run([str(program), "-p", str(library), "Gen1:1-Rev22:21"]).stdout
        return text, package_version(extracted)


def package_version(extracted: Path) -> str:
    """bible-kjv-text's version, from the first line of its Debian changelog ("bible-kjv (4.38) unstable; ...")."""
    changelog = extracted / "usr" / "share" / "doc" / "bible-kjv-text" / "changelog.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            match = re.search(r"\(([^)]+)\)", f.readline())
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


def _run(cmd: list[str], cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {done.returncode}: {done.stderr.strip()[-500:]}")
    return done


README = """\
# The King James Bible, {layout_title}

- train.txt: {train_lines:,} lines, {train_bytes:,} bytes, sha256 {train_sha}
- valid.txt: {valid_lines:,} lines, {valid_bytes:,} bytes, sha256 {valid_sha}

Made by scripts/prepare_kjv.py from the Debian packages bible-kjv and bible-kjv-text (version
{version}): the output of `bible -p usr/lib "Gen1:1-Rev22:21"`, cleaned to {layout_text}
(verse numbers removed, wrapped lines joined). {headings}

{n_chapters} chapters, {n_verses:,} verses. Chapters {valid_every}, {valid_every2}, ... (every
{valid_every}th chapter, counted through the whole Bible) are in valid.txt, the others in train.txt.

Licence: the text of the King James Version (1611) is in the public domain; its copyright has
expired (see the packages' copyright file). The `bible` program that printed it is GPL-2+ (Chip
Chapin's Bible Retrieval System, Debian maintenance by Matthew Vernon and others); no part of the
program is included here.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for train.txt, valid.txt and README.md")
    p.add_argument("--extracted", help="directory holding both packages unpacked with dpkg -x (skips apt-get)")
    p.add_argument("--valid-every", type=int, default=20, help="every N-th chapter goes to valid.txt (default 20: about 5%%)")
    p.add_argument("--no-headings", action="store_true", help="drop the chapter heading lines ('Genesis 1')")
    p.add_argument("--layout", choices=["verses", "runs"], default="verses",
                   help="verses: one verse per line; runs: runs of verses as blank-line-separated paragraphs (default verses)")
    p.add_argument("--run-words", type=int, default=40, help="--layout runs: close a run at a sentence end once it has this many words (default 40)")
    p.add_argument("--max-run-words", type=int, default=110, help="--layout runs: close a run before it passes this many words (default 110)")
    args = p.parse_args(argv)
    try:
        if args.valid_every < 2:
            raise ValueError(f"--valid-every must be at least 2, got {args.valid_every}")
        if not 1 <= args.run_words <= args.max_run_words:
            raise ValueError(f"need 1 <= --run-words <= --max-run-words, got {args.run_words} and {args.max_run_words}")
        extracted = Path(args.extracted) if args.extracted else None
        if extracted is not None and not extracted.is_dir():
            raise FileNotFoundError(f"{extracted}: no such directory")
        text, version = fetch_bible_text(extracted)
        chapters = parse_bible_output(text)
        n_verses = sum(len(c.verses) for c in chapters)
        if (len(chapters), n_verses) != (EXPECTED_CHAPTERS, EXPECTED_VERSES):
            raise ValueError(f"expected {EXPECTED_CHAPTERS} chapters and {EXPECTED_VERSES} verses, "
                             f"parsed {len(chapters)} and {n_verses}")  # fmt: skip
    except (OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.layout == "runs":
        train, valid = split_chapters_in_runs(chapters, args.valid_every, args.run_words, args.max_run_words,
                                              headings=not args.no_headings)  # fmt: skip
        layout_title, layout_text = "in runs of verses", (
            f"runs of consecutive verses, one paragraph each (a run closes at a sentence end once it has "
            f"{args.run_words} words, before it passes {args.max_run_words}, and at the end of a chapter), "
            "the paragraphs separated by blank lines")  # fmt: skip
    else:
        train, valid = split_chapters(chapters, args.valid_every, headings=not args.no_headings)
        layout_title, layout_text = "one verse per line", "one verse per line"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "valid.txt").write_text(valid, encoding="utf-8")
    (out / "README.md").write_text(README.format(
        train_lines=train.count("\n"), train_bytes=len(train.encode()), train_sha=hashlib.sha256(train.encode()).hexdigest(),
        valid_lines=valid.count("\n"), valid_bytes=len(valid.encode()), valid_sha=hashlib.sha256(valid.encode()).hexdigest(),
        version=version, layout_title=layout_title, layout_text=layout_text, valid_every=args.valid_every, valid_every2=2 * args.valid_every,
        headings="Chapter headings are dropped." if args.no_headings else "Chapter headings (\"Genesis 1\") are lines of their own.",
        n_chapters=len(chapters), n_verses=n_verses,
    ))  # fmt: skip
    for name, text in (("train.txt", train), ("valid.txt", valid)):
        print(f"{out / name}: {text.count(chr(10)):,} lines, {len(text.encode()):,} bytes")
    print(f"{out / 'README.md'}: source and licence")
    return 0


if __name__ == "__main__":
    sys.exit(main())

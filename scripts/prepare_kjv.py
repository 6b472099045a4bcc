"""Prepare the King James Bible as a small training corpus: train.txt and valid.txt.

    python scripts/prepare_kjv.py --out data/kjv                    # downloads with apt-get
    python scripts/prepare_kjv.py --out data/kjv --extracted DIR    # DIR: both .debs unpacked (dpkg -x)

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
tell the model which book it is in. The split is by chapter: every --valid-every-th chapter
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
# The King James Bible, one verse per line

- train.txt: {train_lines:,} lines, {train_bytes:,} bytes, sha256 {train_sha}
- valid.txt: {valid_lines:,} lines, {valid_bytes:,} bytes, sha256 {valid_sha}

Made by scripts/prepare_kjv.py from the Debian packages bible-kjv and bible-kjv-text (version
{version}): the output of `bible -p usr/lib "Gen1:1-Rev22:21"`, cleaned to one verse per line
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
    args = p.parse_args(argv)
    try:
        if args.valid_every < 2:
            raise ValueError(f"--valid-every must be at least 2, got {args.valid_every}")
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
    train, valid = split_chapters(chapters, args.valid_every, headings=not args.no_headings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "valid.txt").write_text(valid, encoding="utf-8")
    (out / "README.md").write_text(README.format(
        train_lines=train.count("\n"), train_bytes=len(train.encode()), train_sha=hashlib.sha256(train.encode()).hexdigest(),
        valid_lines=valid.count("\n"), valid_bytes=len(valid.encode()), valid_sha=hashlib.sha256(valid.encode()).hexdigest(),
        version=version, valid_every=args.valid_every, valid_every2=2 * args.valid_every,
        headings="Chapter headings are dropped." if args.no_headings else "Chapter headings (\"Genesis 1\") are lines of their own.",
        n_chapters=len(chapters), n_verses=n_verses,
    ))  # fmt: skip
    for name, text in (("train.txt", train), ("valid.txt", valid)):
        print(f"{out / name}: {text.count(chr(10)):,} lines, {len(text.encode()):,} bytes")
    print(f"{out / 'README.md'}: source and licence")
    return 0


if __name__ == "__main__":
    sys.exit(main())

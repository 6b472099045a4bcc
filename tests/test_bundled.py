"""The small model that ships in weights/kjv: it loads, has the documented shape, and writes text."""

import re
import subprocess
import sys
from pathlib import Path

import torch

import llama
import weights

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_has_the_documented_shape():
    model = llama.load(weights.BUNDLED_MODEL)
    c = model.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (384, 6, 6, 2, 64, 960)
    assert (c.vocab_size, c.max_seq_len, c.tie_word_embeddings) == (4096, 256, False)
    assert sum(p.numel() for p in model.parameters()) == c.n_params == 12_145_536
    assert model.output.weight.dtype == torch.bfloat16
    files = sum(f.stat().st_size for f in weights.BUNDLED_MODEL.iterdir())
    assert files < 25 * 2**20


def test_bundled_model_writes_bible_like_text():
    llm = llama.Llama.load(weights.BUNDLED_MODEL, dtype="float32")
    text = llm.generate("And God said", max_new_tokens=40, temperature=0)
    words = text.split()
    assert len(words) >= 10
    # A trained model, not noise: most of its words are words of the corpus' vocabulary.
    common = {"the", "and", "of", "unto", "that", "he", "shall", "lord", "god", "they", "i", "his", "in", "to", "them", "him", "be", "is", "for", "a", "not", "with", "all", "thou", "thy", "which", "said", "ye", "was", "me", "my"}
    assert sum(w.strip(",.;:").lower() in common for w in words) >= len(words) // 4
    sampled = llm.generate("And it came to pass", max_new_tokens=40, temperature=0.8, seed=1)
    assert sampled.strip()


def test_bundled_model_writes_a_paragraph_and_stops():
    # Trained on runs of verses (paragraphs of 80-160 words), not single verses: greedy decoding goes on
    # past the first sentence and ends the paragraph itself (EOS) well before the context is used up.
    llm = llama.Llama.load(weights.BUNDLED_MODEL, dtype="float32")
    text = llm.generate("And it came to pass", temperature=0)
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s]
    assert len(sentences) >= 3, text
    assert text.rstrip().endswith((".", "?", "!")), text
    assert len(llm.tokenizer.encode(text, bos=False, eos=False)) < 200


def test_generate_script_without_arguments_uses_the_bundled_model():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("In the beginning") and len(result.stdout.split()) > 4
    assert "weights/kjv" in result.stderr and "decode" in result.stderr


def test_prepare_kjv_cuts_chapters_into_runs_of_verses_that_end_sentences():
    """The corpus of the bundled model: each chapter as paragraphs of consecutive verses (one
    document each), closed at a sentence end once long enough, before growing too long, and at the
    chapter's end; the chapter heading opens its first paragraph."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_script_prepare_kjv", ROOT / "scripts" / "prepare_kjv.py")
    kjv = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kjv  # dataclasses look their module up while the file runs
    spec.loader.exec_module(kjv)
    verses = ["One two three,", "four five six.", "Seven eight nine ten eleven:", "twelve?", "Thirteen.", "Last words"]
    assert kjv.verse_runs(verses, min_words=5, max_words=100) == [
        "One two three, four five six.", "Seven eight nine ten eleven: twelve?", "Thirteen. Last words"]
    # max_words closes a run before the verse that would pass it, sentence end or not
    assert kjv.verse_runs(verses, min_words=50, max_words=8) == [
        "One two three, four five six.", "Seven eight nine ten eleven: twelve? Thirteen.", "Last words"]
    assert kjv.verse_runs(['And he said, Go.\'', "Then."], min_words=1, max_words=10) == ['And he said, Go.\'', "Then."]
    chapters = [kjv.Chapter("Genesis 1", verses), kjv.Chapter("Genesis 2", ["Only one."])]
    train, valid = kjv.split_chapters_in_runs(chapters, valid_every=2, min_words=5, max_words=100)
    assert train == ("Genesis 1\nOne two three, four five six.\n\nSeven eight nine ten eleven: twelve?\n\n"
                     "Thirteen. Last words\n")
    assert valid == "Genesis 2\nOnly one.\n"

"""The small model that ships in weights/kjv: it loads, has the documented shape, and writes text."""

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
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (288, 8, 6, 2, 48, 768)
    assert (c.vocab_size, c.max_seq_len, c.tie_word_embeddings) == (4096, 256, False)
    assert sum(p.numel() for p in model.parameters()) == c.n_params == 9_442_080
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


def test_generate_script_without_arguments_uses_the_bundled_model():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("In the beginning") and len(result.stdout.split()) > 4
    assert "weights/kjv" in result.stderr and "decode" in result.stderr

"""YaRN RoPE scaling: parity with transformers' LlamaForCausalLM, cached decoding, and the file formats.

Each parameter set is written by transformers (save_pretrained) as a random tiny checkpoint and read
by llama.load; logits are compared in float32 on 48 tokens (the original context is 16, so every
case runs far beyond it). Error measure as in test_parity_hf.py: max |ours - ref| / max |ref|; run
with -s to see the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import llama
from llama import ConfigError, ModelConfig, RopeScaling
from llama.core.model import rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from test_parity_hf import (MATTERS, SEQ_LEN, VOCAB, assert_close, hf_logits, hf_model, our_logits,  # noqa: E402
                            random_tokens, rel_err, saved, to_old_style, without_scaling)  # fmt: skip

TOL = 1e-5  # float32 (the issue asks for 1e-4; what is measured is ~1e-7)

# Every knob transformers reads; each set changes the result at these lengths (checked in the test).
YARN = {
    "defaults (beta 32/1, factor 4)": {"factor": 4.0},
    "betas 8/2, no truncation": {"factor": 4.0, "beta_fast": 8.0, "beta_slow": 2.0, "truncate": False},
    "factor 16, head_dim 32, theta 10000": {"factor": 16.0, "beta_fast": 16.0},
    "mscale / mscale_all_dim": {"factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    "attention_factor given": {"factor": 4.0, "attention_factor": 1.3},
}
SHAPES = {"factor 16, head_dim 32, theta 10000": dict(head_dim=32, theta=10000.0)}


def yarn_config(case: str, *, original: int = 16, max_pos: int = 64) -> LlamaConfig:
    shape = SHAPES.get(case, {})
    rope = {"rope_theta": shape.get("theta", 500.0), "rope_type": "yarn", "original_max_position_embeddings": original,
            **YARN[case]}  # fmt: skip
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=shape.get("head_dim", 16), max_position_embeddings=max_pos, rms_norm_eps=1e-5,
        rope_parameters=rope, initializer_range=0.15, attn_implementation="eager",
    )  # fmt: skip


@pytest.mark.parametrize("case", YARN)
def test_yarn_matches_transformers(tmp_path, case):
    ref = hf_model(yarn_config(case))
    ours = llama.load(saved(ref, tmp_path))
    scaling = ours.config.rope_scaling
    assert scaling.kind == "yarn" and scaling.original_max_seq_len == 16
    tokens = random_tokens()
    ref_logits = hf_logits(ref, tokens)
    assert_close(our_logits(ours, tokens), ref_logits, TOL, f"yarn {case}")
    # The same frequencies and attention factor transformers computes, element by element.
    inv_freq = ref.model.rotary_emb.inv_freq
    ours_freq = rope_frequencies(ours.config.head_dim, ours.config.rope_theta, scaling)
    assert torch.allclose(ours_freq, inv_freq, rtol=1e-6, atol=0), (ours_freq, inv_freq)
    assert scaling.attention_scale == pytest.approx(ref.model.rotary_emb.attention_scaling, rel=1e-12)
    # Without the scaling, or with its frequencies but no temperature, the logits move far beyond
    # the tolerance: each case tests both the frequencies and the attention factor.
    off = rel_err(our_logits(without_scaling(ours), tokens), ref_logits)
    cold = llama.Transformer(ours.config.replace(rope_scaling=dataclasses.replace(scaling, attention_factor=1.0)))
    cold.load_state_dict(ours.state_dict())
    no_temperature = rel_err(our_logits(cold.eval(), tokens), ref_logits)
    print(f"yarn {case}: scaling off moves the logits by {off:.2e}, the temperature alone by {no_temperature:.2e}")
    assert off > MATTERS and no_temperature > MATTERS


def test_old_config_style_and_default_original(tmp_path):
    """The older rope_scaling {"type": "yarn"} beside rope_theta reads the same; a missing
    original_max_position_embeddings means max_position_embeddings, as transformers fills it in."""
    ref = hf_model(yarn_config("betas 8/2, no truncation"))
    path = saved(ref, tmp_path)
    expected = llama.load(path).config
    to_old_style(path, "type")
    assert llama.load(path).config == expected
    config = json.loads((path / "config.json").read_text())
    del config["rope_scaling"]["original_max_position_embeddings"]
    config["max_position_embeddings"] = 16
    assert ModelConfig.from_hf(config).rope_scaling.original_max_seq_len == 16


def test_cached_decoding_equals_full_forward(tmp_path, prefill=5):
    """Prefill, then one token at a time through the KV cache: every step's logits equal the full
    forward's, and transformers'."""
    ref = hf_model(yarn_config("mscale / mscale_all_dim"))
    ours = llama.load(saved(ref, tmp_path))
    tokens = random_tokens()
    full = our_logits(ours, tokens)
    ours.setup_cache(tokens.shape[0], SEQ_LEN)
    with torch.no_grad():
        steps = [ours(tokens[:, :prefill], 0)] + [ours(tokens[:, p : p + 1], p) for p in range(prefill, SEQ_LEN)]
    decoded = torch.cat(steps, dim=1)
    assert_close(decoded, full, 1e-5, f"yarn cached decode, prefill {prefill}")
    assert_close(decoded, hf_logits(ref, tokens), TOL, f"yarn cached decode vs transformers, prefill {prefill}")


@pytest.mark.parametrize("case", ["mscale / mscale_all_dim", "attention_factor given"])
def test_our_writer_loads_in_transformers(tmp_path, case):
    ref = hf_model(yarn_config(case))
    ours = llama.load(saved(ref, tmp_path / "hf"))
    llama.save(ours, tmp_path / "ours", format="hf")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())["rope_scaling"]
    assert written["rope_type"] == "yarn" and written["original_max_position_embeddings"] == 16
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    tokens = random_tokens()
    assert_close(hf_logits(back, tokens), hf_logits(ref, tokens), TOL, f"yarn: our writer -> transformers ({case})")
    assert llama.load(tmp_path / "ours").config == ours.config


def test_meta_conversion_refuses_yarn_by_name(tmp_path):
    ref = hf_model(yarn_config("defaults (beta 32/1, factor 4)"))
    src = saved(ref, tmp_path / "hf")
    with pytest.raises(ConfigError, match="Meta's format cannot express yarn RoPE scaling"):
        llama.core.checkpoint.convert(src, tmp_path / "meta", format="meta")
    assert not (tmp_path / "meta").exists()
    out = subprocess.run([sys.executable, "scripts/convert.py", str(src), str(tmp_path / "meta"), "--to", "meta"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "cannot express yarn" in out.stderr, out.stderr


def test_round_trip_through_this_projects_fields():
    scaling = RopeScaling("yarn", 4.0, original_max_seq_len=256, beta_fast=16.0, mscale=0.5, mscale_all_dim=1.0,
                          truncate=False)  # fmt: skip
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=128, rope_scaling=scaling)
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_attention_scale_formula():
    """The paper's sqrt(1/t) = 0.1 ln(s) + 1, its mscale generalisation, and the explicit value."""
    assert RopeScaling("yarn", 4.0).attention_scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert RopeScaling("yarn", 1.0).attention_scale == 1.0
    assert RopeScaling("yarn", 4.0, mscale=1.0, mscale_all_dim=1.0).attention_scale == pytest.approx(1.0)
    assert RopeScaling("yarn", 4.0, attention_factor=0.9).attention_scale == 0.9
    assert RopeScaling("linear", 4.0).attention_scale == 1.0

"""Whole-model parity with transformers' LlamaForCausalLM on tiny random checkpoints.

Every case builds a random HF model, writes it with `save_pretrained`, loads it with `llama.load`
and compares logits on random tokens (batch 2). What is covered: attention layouts (MHA, GQA, MQA,
an explicit head_dim), each RoPE scaling at lengths where it changes the result, tied and untied
embeddings, float32 and bf16 files, sharded files, transformers 5's `rope_parameters` and the older
`rope_theta` + `rope_scaling` config styles, our own HF writer read back by transformers, and KV-cache
decoding against transformers' full forward.

Error measure: max |ours - ref| / max |ref| over all logits. Run with `-s` to see the table of the
worst error measured per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llama
from llama import ModelConfig, RopeScaling, Transformer

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FP32_TOL = 1e-5
# bf16 weights run in bf16 on both sides differ by rounding order (we rotate q/k in float32 and cast
# once, transformers casts cos/sin to bf16 first; transformers' logits are bf16, ours float32). With
# these random weights each side lands 2-3.5% from the float32 result, and 2-3.5% from the other.
BF16_TOL = 5e-2
# A variant "matters" when switching it off moves the logits by far more than FP32_TOL.
MATTERS = 1e-3

VOCAB = 256
BATCH = 2

WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors():
    yield
    if WORST:
        width = max(map(len, WORST))
        print("\n\nworst relative logit error per variant (max|ours - ref| / max|ref|):")
        for variant, err in WORST.items():
            print(f"  {variant:<{width}}  {err:.2e}")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, variant: str) -> float:
    assert ours.shape == ref.shape, f"{variant}: shapes {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    WORST[variant] = max(err, WORST.get(variant, 0.0))
    print(f"{variant}: max|ours - ref| / max|ref| = {err:.3e} (tolerance {tol:.0e})")
    assert err <= tol, f"{variant}: relative logit error {err:.3e} exceeds {tol:.0e}"
    return err


# ---- building reference models ---------------------------------------------------------------------

SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # Dynamic NTK only acts once the sequence is longer than max_position_embeddings (32 here).
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    # original_max_position_embeddings 16 puts the llama3 band edges at wavelengths 4 and 16, so
    # almost every frequency of a 16-wide head is blended or stretched at these lengths.
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}
MAX_POS = {"none": 64, "linear": 64, "dynamic": 32, "llama3": 64}
SEQ_LEN = 48  # > 16 (llama3's original context) and > 32 (dynamic's max_position_embeddings)


def hf_config(*, heads=4, kv_heads=2, hidden=64, head_dim=None, scaling="none", theta=500.0, tied=False, layers=2):
    rope = {"rope_theta": theta, "rope_type": "default"}
    if SCALINGS[scaling] is not None:
        rope = {"rope_theta": theta, **SCALINGS[scaling]}
    kwargs = {} if head_dim is None else {"head_dim": head_dim}
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POS[scaling],
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=tied,
        # Large enough that attention is far from uniform, so positions (and RoPE) matter.
        initializer_range=0.15,
        attn_implementation="eager",
        **kwargs,
    )


def hf_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at exactly 1, which would hide a mixed-up norm weight
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def random_tokens(seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


@torch.no_grad()
def our_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    assert logits.dtype == torch.float32
    return logits


def saved(model: LlamaForCausalLM, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def file_tensors(path: Path) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every .safetensors file in a directory."""
    found = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found.update({name: f.get_slice(name).get_dtype() for name in f.keys()})
    return found


def without_scaling(model: Transformer) -> Transformer:
    """The same weights with RoPE scaling switched off (to show that a scaling case tests something)."""
    plain = Transformer(model.config.replace(rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    return plain.eval()


# ---- attention layouts -------------------------------------------------------------------------------

ATTENTION = {
    "MHA": dict(heads=4, kv_heads=4),
    "GQA": dict(heads=4, kv_heads=2),
    "MQA": dict(heads=4, kv_heads=1),
    "GQA head_dim 24 != 64/4": dict(heads=4, kv_heads=2, head_dim=24),
    "MHA head_dim 8 != 64/4": dict(heads=4, kv_heads=4, head_dim=8),
}


@pytest.mark.parametrize("variant", ATTENTION)
def test_attention_layouts(tmp_path, variant):
    ref = hf_model(hf_config(**ATTENTION[variant]))
    ours = llama.load(saved(ref, tmp_path))
    cfg = ours.config
    heads = ATTENTION[variant]
    assert (cfg.n_heads, cfg.n_kv_heads) == (heads["heads"], heads["kv_heads"])
    assert cfg.head_dim == heads.get("head_dim", 64 // heads["heads"])
    tokens = random_tokens()
    assert_close(our_logits(ours, tokens), hf_logits(ref, tokens), FP32_TOL, f"attention {variant}")


# ---- RoPE scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scaling(tmp_path, scaling):
    ref = hf_model(hf_config(scaling=scaling))
    ours = llama.load(saved(ref, tmp_path))
    expected_kind = None if scaling == "none" else scaling
    assert (ours.config.rope_scaling and ours.config.rope_scaling.kind) == expected_kind
    tokens = random_tokens()
    ref_logits = hf_logits(ref, tokens)
    assert_close(our_logits(ours, tokens), ref_logits, FP32_TOL, f"rope {scaling}")
    if scaling != "none":
        # The scaling must actually change the logits at this length, or the case proves nothing.
        effect = rel_err(our_logits(without_scaling(ours), tokens), ref_logits)
        print(f"rope {scaling}: switching the scaling off moves the logits by {effect:.3e}")
        assert effect > MATTERS


def test_dynamic_scaling_is_inactive_within_max_position(tmp_path):
    """Dynamic NTK leaves sequences up to max_position_embeddings untouched, in both models."""
    ref = hf_model(hf_config(scaling="dynamic"))
    ours = llama.load(saved(ref, tmp_path))
    tokens = random_tokens(MAX_POS["dynamic"])
    ref_logits = hf_logits(ref, tokens)
    assert_close(our_logits(ours, tokens), ref_logits, FP32_TOL, "rope dynamic, T = max_position")
    assert rel_err(our_logits(without_scaling(ours), tokens), ref_logits) <= FP32_TOL


# ---- embeddings, dtypes, shards ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tied_and_untied_embeddings(tmp_path, tied):
    ref = hf_model(hf_config(tied=tied, scaling="llama3"))
    path = saved(ref, tmp_path)
    assert ("lm_head.weight" in file_tensors(path)) == (not tied)
    ours = llama.load(path)
    assert ours.config.tie_word_embeddings == tied
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    tokens = random_tokens()
    assert_close(our_logits(ours, tokens), hf_logits(ref, tokens), FP32_TOL, f"embeddings {'tied' if tied else 'untied'}")


def hf_from_pretrained(path: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """transformers' model read from a file, as a user gets it. (Not `model.to(torch.bfloat16)`: that
    also rounds transformers' inv_freq buffer to bf16, which moves the reference by percents.)"""
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bf16_file(tmp_path, tied):
    path = saved(hf_model(hf_config(tied=tied, scaling="llama3")).to(torch.bfloat16), tmp_path)
    assert set(file_tensors(path).values()) == {"BF16"}
    ref, ref32 = hf_from_pretrained(path, torch.bfloat16), hf_from_pretrained(path, torch.float32)
    name = "tied" if tied else "untied"
    tokens = random_tokens()
    truth = hf_logits(ref32, tokens)  # the bf16 weights, computed in float32

    # The bf16 weights, upcast: strict parity.
    ours32 = llama.load(path, dtype="float32")
    assert ours32.tok_embeddings.weight.dtype == torch.float32
    assert_close(our_logits(ours32, tokens), truth, FP32_TOL, f"bf16 file in float32 ({name})")

    # Both run in bf16: they agree to bf16 noise, and ours is no further from the float32 result
    # than transformers' own bf16 run (up to a factor 2 of slack).
    ours = llama.load(path)  # dtype follows the file
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ref_logits = hf_logits(ref, tokens).float()
    assert_close(our_logits(ours, tokens), ref_logits, BF16_TOL, f"bf16 file in bf16 ({name})")
    ours_noise, ref_noise = rel_err(our_logits(ours, tokens), truth), rel_err(ref_logits, truth)
    print(f"bf16 vs float32 result: ours {ours_noise:.3e}, transformers {ref_noise:.3e}")
    assert ours_noise <= 2 * ref_noise


def test_model_cast_to_bf16_equals_bf16_load(tmp_path):
    """Converting a loaded model with .to(torch.bfloat16) gives the model loaded in bf16: the cast
    must not round the rotary frequencies (a plain buffer cast would, as it does in transformers)."""
    path = saved(hf_model(hf_config(scaling="llama3")), tmp_path)
    tokens = random_tokens(SEQ_LEN)
    cast = llama.load(path).to(torch.bfloat16)
    loaded = llama.load(path, dtype="bfloat16")
    assert_close(our_logits(cast, tokens), our_logits(loaded, tokens), 0.0, "float32 load .to(bf16) vs bf16 load")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_safetensors(tmp_path, tied):
    ref = hf_model(hf_config(tied=tied, scaling="llama3"))
    path = saved(ref, tmp_path, max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3, f"expected several shards, got {[s.name for s in shards]}"
    assert (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists()
    ours = llama.load(path)
    tokens = random_tokens()
    assert_close(our_logits(ours, tokens), hf_logits(ref, tokens), FP32_TOL, f"sharded ({'tied' if tied else 'untied'})")


# ---- config.json styles ------------------------------------------------------------------------------


def to_old_style(path: Path, type_key: str) -> dict:
    """Rewrite a transformers 5 config.json in the older style: `rope_theta` beside `rope_scaling`
    (null without scaling), whose type sits under `type_key` ("type" or "rope_type")."""
    config = json.loads((path / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {type_key: kind, **rope}
    config["torch_dtype"] = config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return config


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_old_config_style(tmp_path, scaling, type_key):
    ref = hf_model(hf_config(scaling=scaling, theta=321.0))
    path = saved(ref, tmp_path)
    new_style = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in new_style and "rope_scaling" not in new_style
    expected = ModelConfig.from_hf(new_style)
    assert expected.rope_theta == 321.0

    old_style = to_old_style(path, type_key)
    assert "rope_parameters" not in old_style
    assert ModelConfig.from_hf(old_style) == expected

    ours = llama.load(path)
    assert ours.config == expected
    tokens = random_tokens()
    ref_logits = hf_logits(ref, tokens)
    assert_close(our_logits(ours, tokens), ref_logits, FP32_TOL, f"old config, {type_key!r} key, rope {scaling}")
    # transformers itself reads the rewritten file as the same model (the rewrite is faithful).
    reread = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert rel_err(hf_logits(reread, tokens), ref_logits) <= FP32_TOL


def test_config_fields_match_transformers():
    config = hf_config(heads=4, kv_heads=2, head_dim=24, scaling="llama3", tied=True)
    ours = ModelConfig.from_hf(config.to_dict())
    assert ours == ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=144, head_dim=24,
        norm_eps=1e-5, rope_theta=500.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
        tie_word_embeddings=True, max_seq_len=64,
    )  # fmt: skip


# ---- our writer, read by transformers ------------------------------------------------------------------

WRITER = {
    "untied": dict(tied=False, max_shard_bytes=None),
    "tied": dict(tied=True, max_shard_bytes=None),
    "untied sharded": dict(tied=False, max_shard_bytes=40_000),
    "tied sharded": dict(tied=True, max_shard_bytes=40_000),
}


@pytest.mark.parametrize("variant", WRITER)
def test_our_writer_loads_in_transformers(tmp_path, variant):
    tied, max_shard_bytes = WRITER[variant]["tied"], WRITER[variant]["max_shard_bytes"]
    ref = hf_model(hf_config(tied=tied, scaling="llama3", head_dim=24))
    ours = llama.load(saved(ref, tmp_path / "hf"))
    out = tmp_path / "ours"
    llama.save(ours, out, format="hf", max_shard_bytes=max_shard_bytes)

    shards = sorted(out.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes is not None), [s.name for s in shards]
    assert ("lm_head.weight" in file_tensors(out)) == (not tied)

    back = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    assert back.config.tie_word_embeddings == tied
    # The writer must reproduce HF's tensors exactly (the q/k permutation is a pure reordering).
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for name, tensor in ref_state.items():
        assert torch.equal(back_state[name], tensor), name
    tokens = random_tokens()
    assert_close(hf_logits(back, tokens), our_logits(ours, tokens), FP32_TOL, f"our writer -> transformers ({variant})")


# ---- KV-cache decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 20])
def test_kv_cache_decode_matches_full_forward(tmp_path, prefill):
    """Prefill `prefill` tokens, then decode one token at a time: the logits of every step equal
    transformers' logits from one forward over the whole sequence."""
    ref = hf_model(hf_config(heads=4, kv_heads=2, scaling="llama3"))
    ours = llama.load(saved(ref, tmp_path))
    tokens = random_tokens()
    ours.setup_cache(BATCH, SEQ_LEN)
    with torch.no_grad():
        steps = [ours(tokens[:, :prefill], start_pos=0)]
        for pos in range(prefill, SEQ_LEN):
            steps.append(ours(tokens[:, pos : pos + 1], start_pos=pos))
    decoded = torch.cat(steps, dim=1)
    assert_close(decoded, hf_logits(ref, tokens), FP32_TOL, f"KV-cache decode, GQA llama3, prefill {prefill}")


# ---- close cousins: Qwen3 (per-head q/k norms) and Mistral (sliding window) ----------------------------

COUSINS = {
    # Qwen3's q_norm / k_norm weights are per-head vectors in HF's rotary row order: loading must
    # permute them like wq / wk (weights/hf.py ROTARY_ROWS), or logits drift by O(1).
    "qwen3": dict(cls="Qwen3", extra={}),
    "qwen3 sliding window on layers 1-2": dict(cls="Qwen3", extra=dict(use_sliding_window=True, sliding_window=6,
                                                                        max_window_layers=1)),
    "qwen3 tied": dict(cls="Qwen3", extra=dict(tie_word_embeddings=True)),
    # A window of 6 over 48 tokens: most queries lose most of their keys.
    "mistral window 6": dict(cls="Mistral", extra=dict(sliding_window=6)),
    "mistral no window": dict(cls="Mistral", extra=dict(sliding_window=None)),
}


def cousin_model(variant: str, seed: int = 0):
    spec = COUSINS[variant]
    config_cls = getattr(transformers, f"{spec['cls']}Config")
    model_cls = getattr(transformers, f"{spec['cls']}ForCausalLM")
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=144, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                        rms_norm_eps=1e-5, rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
                        initializer_range=0.15, attn_implementation="eager",
                        **{"tie_word_embeddings": False, **spec["extra"]})  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", list(COUSINS))
def test_close_cousins_load_and_match(tmp_path, variant):
    """A transformers Qwen3 / Mistral checkpoint loads as the variant it is, with logits within 1e-5
    of transformers' (the issue asked for 1e-4), and cached decoding gives the same logits."""
    ref = cousin_model(variant)
    ours = llama.load(saved(ref, tmp_path / "hf"))
    config = ours.config
    assert config.qk_norm == variant.startswith("qwen3")
    assert config.sliding_window == ref.config.sliding_window
    tokens = random_tokens()
    expected = hf_logits(ref, tokens)
    assert_close(our_logits(ours, tokens), expected, FP32_TOL, variant)
    # The variant matters: the same weights without it compute something else.
    plain = Transformer(config.replace(qk_norm=False, sliding_window=None, window_layers=None))
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "_norm.weight" not in k or "layers" not in k
                           or k.endswith(("attention_norm.weight", "ffn_norm.weight"))})  # fmt: skip
    if config.variants():
        assert rel_err(our_logits(plain.eval(), tokens), expected) > MATTERS
    ours.setup_cache(BATCH, SEQ_LEN)
    with torch.no_grad():
        steps = [ours(tokens[:, :10], 0)] + [ours(tokens[:, p : p + 1], p) for p in range(10, SEQ_LEN)]
    assert_close(torch.cat(steps, dim=1), expected, FP32_TOL, f"{variant}, KV-cache decode")


@pytest.mark.parametrize("variant", ["qwen3 sliding window on layers 1-2", "mistral window 6"])
def test_close_cousins_round_trip_to_transformers(tmp_path, variant):
    """Saved back in HF layout, the file is a Qwen3 / Mistral checkpoint transformers loads."""
    ref = cousin_model(variant)
    ours = llama.load(saved(ref, tmp_path / "hf"))
    llama.save(ours, tmp_path / "ours", format="hf")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == ref.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                              attn_implementation="eager").eval()  # fmt: skip
    assert type(back) is type(ref)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_unsupported_model_types_are_refused(tmp_path):
    """A cousin this project does not compute (here Qwen2, with q/k/v biases) is refused by name, not
    loaded as a Llama."""
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=144, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    saved(transformers.Qwen2ForCausalLM(config), tmp_path / "qwen2")
    with pytest.raises(llama.ConfigError, match="unsupported model_type 'qwen2'"):
        llama.load(tmp_path / "qwen2")

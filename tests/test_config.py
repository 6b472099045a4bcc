"""ModelConfig: the registry, Meta's params.json and HF's config.json, and their round trips.

The expected numbers come from the released checkpoints, not from this code: their params.json and
config.json as Meta and Hugging Face ship them (quoted verbatim below), the FFN widths and published
parameter counts of their model cards (1.24B, 8.03B, 6.74B, ...).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from llama import REGISTRY, ConfigError, ModelConfig, RopeScaling, Transformer
from llama.core.config import meta_ffn_dim

# ---- params.json and config.json as shipped ----------------------------------------------------------

# Meta's params.json of the released models, verbatim (Llama 1/2 say vocab_size -1).
META_PARAMS = {
    "llama-2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                    "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
                   "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
    "llama-3-70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 4096,
                    "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
    "llama-3.1-8b": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                     "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "llama-3.1-70b": {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
                      "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "llama-3.1-405b": {"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "n_heads": 128, "n_kv_heads": 8,
                       "n_layers": 126, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "llama-3.2-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True},
    "llama-3.2-3b": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.0, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                     "use_scaled_rope": True},
}  # fmt: skip
LLAMA2_VOCAB = 32000  # what the embedding of a Llama 2 .pth says

# Hugging Face config.json files as shipped (trimmed of keys irrelevant to the architecture).
HF_LLAMA_2_7B = {  # transformers 4.31: no rope_theta (default 10000), rope_scaling null
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}  # fmt: skip
HF_LLAMA_31_8B_INSTRUCT = {  # transformers 4.43: rope_scaling with "rope_type", eos a list
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip
HF_LLAMA_32_1B = {  # explicit head_dim, tied embeddings
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip

TINY_HF = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 100,
}  # fmt: skip
TINY_META = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100, "multiple_of": 32}


def meta_params_of(name: str) -> ModelConfig:
    return ModelConfig.from_meta(META_PARAMS[name], vocab_size=LLAMA2_VOCAB)


def exact(message: str) -> str:
    """A pytest.raises pattern matching `message` literally from its start."""
    return "^" + re.escape(message)


# ---- the registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_model_builds_on_the_meta_device(name):
    config = ModelConfig.from_name(name)
    assert config is REGISTRY[name]
    with torch.device("meta"):
        model = Transformer(config)
    assert model.tok_embeddings.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == config.n_params  # tied weights count once
    assert model.layers[0].attention.wk.weight.shape == (config.n_kv_heads * config.head_dim, config.dim)
    assert model.rope_freqs.shape == (config.head_dim // 2,) and not model.rope_freqs.is_meta


@pytest.mark.parametrize(
    "name, dims, ffn_dim, n_params",
    [
        # (dim, n_layers, n_heads, n_kv_heads, head_dim, vocab); n_params as published (1.24B, 8.03B, 6.74B)
        ("llama-3.2-1b", (2048, 16, 32, 8, 64, 128256), 8192, 1_235_814_400),
        ("llama-3.2-3b", (3072, 28, 24, 8, 128, 128256), 8192, 3_212_749_824),
        ("llama-3.1-8b", (4096, 32, 32, 8, 128, 128256), 14336, 8_030_261_248),
        ("llama-3.1-70b", (8192, 80, 64, 8, 128, 128256), 28672, 70_553_706_496),
        ("llama-3.1-405b", (16384, 126, 128, 8, 128, 128256), 53248, 405_853_388_800),
        ("llama-2-7b", (4096, 32, 32, 32, 128, 32000), 11008, 6_738_415_616),
        ("llama-2-13b", (5120, 40, 40, 40, 128, 32000), 13824, 13_015_864_320),
        ("llama-2-70b", (8192, 80, 64, 8, 128, 32000), 28672, 68_976_648_192),
    ],
)
def test_registry_shapes_and_parameter_counts(name, dims, ffn_dim, n_params):
    c = ModelConfig.from_name(name)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == dims
    assert c.ffn_dim == ffn_dim
    assert c.n_params == n_params


def test_registry_rope_settings():
    for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
        assert REGISTRY[name].rope_theta == 10000.0 and REGISTRY[name].rope_scaling is None
    for name in ("llama-3-8b", "llama-3-70b"):
        assert REGISTRY[name].rope_theta == 500000.0 and REGISTRY[name].rope_scaling is None
    for name, factor in [("llama-3.1-8b", 8.0), ("llama-3.1-405b", 8.0), ("llama-3.2-1b", 32.0), ("llama-3.2-3b", 32.0)]:
        assert REGISTRY[name].rope_scaling == RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    assert [n for n, c in REGISTRY.items() if c.tie_word_embeddings] == ["llama-3.2-1b", "llama-3.2-3b"]


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown model 'llama-3.2-8b'") as info:
        ModelConfig.from_name("llama-3.2-8b")
    for name in REGISTRY:
        assert name in str(info.value)


def test_from_name_overrides_are_validated():
    assert ModelConfig.from_name("llama-3.2-1b", n_layers=2).n_layers == 2
    assert REGISTRY["llama-3.2-1b"].n_layers == 16  # the registry entry is untouched
    with pytest.raises(ConfigError, match="n_heads 32 is not a multiple of n_kv_heads 5"):
        ModelConfig.from_name("llama-3.2-1b", n_kv_heads=5)


def test_random_model_of_a_registry_shape_runs():
    """A registry shape with fewer layers and a small vocabulary runs on real memory."""
    config = ModelConfig.from_name("llama-3.2-1b", n_layers=1, vocab_size=64, dim=256, ffn_dim=512)
    model = Transformer(config)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


# ---- Meta params.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, ffn",
    [
        (4096, 256, None, 11008),  # Llama 2 7B (and Llama 1 7B)
        (5120, 256, None, 13824),  # Llama 2 13B
        (8192, 4096, 1.3, 28672),  # Llama 2 70B, Llama 3.x 70B
        (4096, 1024, 1.3, 14336),  # Llama 3, 3.1 8B
        (16384, 4096, 1.2, 53248),  # Llama 3.1 405B
        (2048, 256, 1.5, 8192),  # Llama 3.2 1B
        (3072, 256, 1.0, 8192),  # Llama 3.2 3B
    ],
)
def test_meta_ffn_width(dim, multiple_of, multiplier, ffn):
    assert meta_ffn_dim(dim, multiple_of, multiplier) == ffn
    params = {"dim": dim, "n_layers": 1, "n_heads": dim // 128, "vocab_size": 10, "multiple_of": multiple_of}
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    assert ModelConfig.from_meta(params).ffn_dim == ffn
    assert ModelConfig.from_meta({**params, "ffn_dim_multiplier": multiplier}).ffn_dim == ffn  # null as well


@pytest.mark.parametrize("name", list(META_PARAMS))
def test_from_meta_matches_the_registry(name):
    config = meta_params_of(name)
    # Meta's files carry output.weight even when tied, and say nothing of the context length.
    assert config == REGISTRY[name].replace(tie_word_embeddings=False, max_seq_len=config.max_seq_len)


def test_from_meta_defaults_of_old_files():
    config = meta_params_of("llama-2-7b")
    assert config.rope_theta == 10000.0  # absent in Llama 1/2
    assert config.n_kv_heads == config.n_heads == 32  # absent: MHA
    assert config.vocab_size == LLAMA2_VOCAB  # -1, filled from the embedding
    assert config.rope_scaling is None


def test_from_meta_vocab_in_the_file_wins_over_the_embedding():
    assert ModelConfig.from_meta(META_PARAMS["llama-3-8b"], vocab_size=5).vocab_size == 128256


def test_from_meta_vocab_minus_one_needs_the_embedding():
    with pytest.raises(ConfigError, match="params.json has vocab_size -1 and no embedding"):
        ModelConfig.from_meta(META_PARAMS["llama-2-7b"])


@pytest.mark.parametrize(
    "name, factor", [("llama-3.1-8b", 8.0), ("llama-3.1-70b", 8.0), ("llama-3.1-405b", 8.0), ("llama-3.2-1b", 32.0), ("llama-3.2-3b", 32.0)]
)
def test_from_meta_scaled_rope(name, factor):
    # use_scaled_rope means Meta's hard-coded llama3 scaling (factor 8, low 1, high 4, original 8192),
    # except that Llama 3.2 1B/3B were trained with factor 32, which their params.json does not say.
    assert meta_params_of(name).rope_scaling == RopeScaling("llama3", factor, 1.0, 4.0, 8192)


def test_from_meta_explicit_scaling_factor_wins():
    params = {**META_PARAMS["llama-3.2-1b"], "rope_scaling_factor": 16.0}
    assert ModelConfig.from_meta(params).rope_scaling.factor == 16.0
    assert ModelConfig.from_meta({**META_PARAMS["llama-3.1-8b"], "use_scaled_rope": False}).rope_scaling is None


# ---- HF config.json -------------------------------------------------------------------------------------


def test_from_hf_released_configs():
    assert ModelConfig.from_hf(HF_LLAMA_2_7B) == REGISTRY["llama-2-7b"]
    assert ModelConfig.from_hf(HF_LLAMA_31_8B_INSTRUCT) == REGISTRY["llama-3.1-8b"]
    assert ModelConfig.from_hf(HF_LLAMA_32_1B) == REGISTRY["llama-3.2-1b"]


def test_from_hf_transformers5_rope_parameters():
    """transformers 5 puts rope_theta inside rope_parameters, with rope_type "default" when unscaled."""
    v5 = {k: v for k, v in HF_LLAMA_32_1B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["dtype"] = "bfloat16"
    v5["rope_parameters"] = {**HF_LLAMA_32_1B["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(v5) == REGISTRY["llama-3.2-1b"]
    unscaled = {**TINY_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    config = ModelConfig.from_hf(unscaled)
    assert config.rope_theta == 123.0 and config.rope_scaling is None


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
def test_from_hf_rope_scaling_type_keys(type_key):
    linear = ModelConfig.from_hf({**TINY_HF, "rope_scaling": {type_key: "linear", "factor": 4.0}})
    assert linear.rope_scaling == RopeScaling("linear", 4.0)
    dynamic = ModelConfig.from_hf(
        {**TINY_HF, "max_position_embeddings": 512, "rope_scaling": {type_key: "dynamic", "factor": 2.0}}
    )
    # HF's dynamic NTK compares the sequence length with max_position_embeddings.
    assert dynamic.rope_scaling == RopeScaling("dynamic", 2.0, original_max_seq_len=512)
    llama3 = {type_key: "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}  # fmt: skip
    assert ModelConfig.from_hf({**TINY_HF, "rope_scaling": llama3}).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_from_hf_head_dim_tie_and_defaults():
    config = ModelConfig.from_hf({**TINY_HF, "head_dim": 32})
    assert config.head_dim == 32 and config.n_params != ModelConfig.from_hf(TINY_HF).n_params
    assert ModelConfig.from_hf({**TINY_HF, "head_dim": None}).head_dim == 16  # null: hidden / heads
    assert ModelConfig.from_hf({**TINY_HF, "tie_word_embeddings": True}).tie_word_embeddings
    default = ModelConfig.from_hf(TINY_HF)
    assert default.tie_word_embeddings is False
    assert default.rope_theta == 10000.0 and default.rope_scaling is None
    assert default.norm_eps == 1e-6  # LlamaConfig's default rms_norm_eps
    assert default.max_seq_len == 2048
    no_kv = {k: v for k, v in TINY_HF.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf(no_kv).n_kv_heads == 4  # absent: MHA


@pytest.mark.parametrize("eos", [2, [128001, 128008, 128009], None])
def test_from_hf_ignores_token_ids(eos):
    """bos/eos/pad ids belong to the tokenizer and generation, not the architecture."""
    config = ModelConfig.from_hf({**TINY_HF, "bos_token_id": 1, "eos_token_id": eos, "pad_token_id": None})
    assert config == ModelConfig.from_hf(TINY_HF)


# ---- round trips -----------------------------------------------------------------------------------


@st.composite
def configs(draw):
    n_kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    n_heads = n_kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 64, 128]))
    dim = draw(st.sampled_from([n_heads * head_dim, n_heads * head_dim * 2]))
    max_seq_len = draw(st.sampled_from([128, 2048, 131072]))
    kind = draw(st.sampled_from([None, "linear", "dynamic", "llama3"]))
    factor = draw(st.sampled_from([2.0, 8.0, 32.0]))
    scaling = {
        None: None,
        "linear": RopeScaling("linear", factor),
        "dynamic": RopeScaling("dynamic", factor, original_max_seq_len=max_seq_len),
        "llama3": RopeScaling(
            "llama3", factor, draw(st.sampled_from([1.0, 2.0])), draw(st.sampled_from([4.0, 8.0])),
            draw(st.sampled_from([8192, 4096])),
        ),
    }[kind]  # fmt: skip
    return ModelConfig(
        dim=dim,
        n_layers=draw(st.integers(1, 80)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=draw(st.integers(1, 200000)),
        ffn_dim=draw(st.integers(1, 4 * dim)),
        head_dim=head_dim,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0, 1e6])),
        rope_scaling=scaling,
        tie_word_embeddings=draw(st.booleans()),
        max_seq_len=max_seq_len,
    )


@settings(max_examples=100, deadline=None)
@given(configs())
def test_hf_round_trip(config):
    assert ModelConfig.from_hf(config.to_hf()) == config


@settings(max_examples=100, deadline=None)
@given(configs())
def test_meta_round_trip_where_expressible(config):
    expressible = config.head_dim * config.n_heads == config.dim and (
        config.rope_scaling is None or config.rope_scaling == RopeScaling("llama3", config.rope_scaling.factor)
    )
    if not expressible:
        with pytest.raises(ConfigError, match="Meta's format can(not)? (only )?express"):
            config.to_meta()
        return
    params = config.to_meta()
    back = ModelConfig.from_meta(params)
    # Meta's format has no tying (the output matrix is stored) and no context length.
    assert back == config.replace(tie_word_embeddings=False, max_seq_len=back.max_seq_len)
    assert meta_ffn_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == config.ffn_dim


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_round_trips_through_both_formats(name):
    config = REGISTRY[name]
    assert ModelConfig.from_hf(config.to_hf()) == config
    back = ModelConfig.from_meta(config.to_meta())
    assert back == config.replace(tie_word_embeddings=False, max_seq_len=back.max_seq_len)


@settings(max_examples=25, deadline=None)
@given(configs())
def test_to_hf_loads_in_transformers(config):
    """transformers reads our config.json: same shapes, same parameter count, same config back."""
    hf_config = transformers.LlamaConfig(**config.to_hf())
    assert ModelConfig.from_hf(hf_config.to_dict()) == config
    small = config.replace(n_layers=1, vocab_size=min(config.vocab_size, 1000))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small.to_hf()))
    assert sum(p.numel() for p in model.parameters()) == small.n_params


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b", "llama-3.2-1b"])
def test_registry_to_hf_parameter_count_in_transformers(name):
    config = REGISTRY[name]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    assert sum(p.numel() for p in model.parameters()) == config.n_params


# ---- bad values ------------------------------------------------------------------------------------


def tiny(**changes) -> ModelConfig:
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=10, ffn_dim=32)
    return ModelConfig(**{**args, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dim=0), "dim must be a positive integer, got 0"),
        (dict(n_layers=-1), "n_layers must be a positive integer, got -1"),
        (dict(n_layers=True), "n_layers must be a positive integer, got True"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer, got 2.5"),
        (dict(ffn_dim=0), "ffn_dim must be a positive integer, got 0"),
        (dict(max_seq_len=0), "max_seq_len must be a positive integer, got 0"),
        (dict(n_heads=3, n_kv_heads=1), "dim 64 is not divisible by n_heads 3; give head_dim"),
        (dict(n_kv_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
        (dict(head_dim=7), "head_dim must be even for rotary embeddings, got 7"),
        (dict(norm_eps=0.0), "norm_eps and rope_theta must be positive and finite, got 0.0 and 10000.0"),
        (dict(rope_theta=-1.0), "norm_eps and rope_theta must be positive and finite, got 1e-05 and -1.0"),
        (dict(norm_eps=float("inf")), "norm_eps and rope_theta must be positive and finite, got inf and 10000.0"),
        (dict(rope_theta=float("nan")), "norm_eps and rope_theta must be positive and finite, got 1e-05 and nan"),
        # Sizes no machine could hold: refused at once (2**64 layers were built one by one, forever).
        (dict(n_layers=2**64), f"n_layers {2**64} is beyond any model this project can build (at most 4096)"),
        (dict(vocab_size=2**31), f"vocab_size {2**31} is beyond any model this project can build"),
        (dict(dim=2**30, head_dim=64), f"dim {2**30} is beyond any model this project can build"),
    ],
)
def test_bad_values_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=exact(message)):
        tiny(**changes)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "args, message",
    [
        (("ntk", 2.0), "unknown RoPE scaling type 'ntk'; expected linear, dynamic or llama3"),
        (("linear", 0.0), "RoPE scaling factor must be positive and finite, got 0.0"),
        (("llama3", 8.0, 4.0, 1.0), "llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got 1.0 and 4.0"),
    ],
)
def test_bad_rope_scaling(args, message):
    with pytest.raises(ConfigError, match=exact(message)):
        RopeScaling(*args)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": None}, "config.json: 'hidden_size' must be an integer, got None"),
        ({"num_attention_heads": "4"}, "config.json: 'num_attention_heads' must be an integer, got '4'"),
        ({"tie_word_embeddings": 1}, "config.json: 'tie_word_embeddings' must be true or false, got 1"),
        ({"rms_norm_eps": "1e-5"}, "config.json: 'rms_norm_eps' must be a number, got '1e-5'"),
        ({"hidden_act": "gelu"}, "config.json has hidden_act 'gelu'; Llama uses silu"),
        ({"attention_bias": True}, "config.json sets attention_bias or mlp_bias; Llama models have no biases"),
        ({"mlp_bias": True}, "config.json sets attention_bias or mlp_bias; Llama models have no biases"),
        ({"rope_parameters": [1]}, "config.json: 'rope_parameters' must be an object, got [1]"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "config.json: unsupported RoPE scaling type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "config.json rope_scaling: missing key 'low_freq_factor'"),
        ({"rope_scaling": {"type": "linear"}}, "config.json rope_scaling: missing key 'factor'"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer, got -1"),
    ],
)
def test_bad_hf_config(changes, message):
    with pytest.raises(ConfigError, match=exact(message)):
        ModelConfig.from_hf({**TINY_HF, **changes})


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"])
def test_hf_config_missing_key(key):
    with pytest.raises(ConfigError, match=exact(f"config.json: missing key {key!r}")):
        ModelConfig.from_hf({k: v for k, v in TINY_HF.items() if k != key})


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_meta_params_missing_key(key):
    with pytest.raises(ConfigError, match=exact(f"params.json: missing key {key!r}")):
        ModelConfig.from_meta({k: v for k, v in TINY_META.items() if k != key})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dim": "64"}, "params.json: 'dim' must be an integer, got '64'"),
        ({"use_scaled_rope": "yes"}, "params.json: 'use_scaled_rope' must be true or false, got 'yes'"),
        ({"ffn_dim_multiplier": "1.3"}, "params.json: 'ffn_dim_multiplier' must be a number, got '1.3'"),
        ({"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ],
)
def test_bad_meta_params(changes, message):
    with pytest.raises(ConfigError, match=exact(message)):
        ModelConfig.from_meta({**TINY_META, **changes})


def test_not_a_json_object():
    with pytest.raises(ConfigError, match=exact("config.json: expected a JSON object, got list")):
        ModelConfig.from_hf([1, 2])
    with pytest.raises(ConfigError, match=exact("params.json: expected a JSON object, got str")):
        ModelConfig.from_meta("dim")


def test_to_meta_refuses_what_meta_cannot_express():
    with pytest.raises(ConfigError, match=exact("Meta's format cannot express head_dim 32 != dim / n_heads")):
        tiny(head_dim=32).to_meta()
    with pytest.raises(ConfigError, match=exact("Meta's format can only express llama3 RoPE scaling (1, 4, 8192), not")):
        tiny(rope_scaling=RopeScaling("linear", 2.0)).to_meta()


def test_float_integers_are_accepted():
    """JSON writers sometimes emit 4096.0; an integral float is an integer."""
    assert ModelConfig.from_hf({**TINY_HF, "hidden_size": 64.0}).dim == 64
    with pytest.raises(ConfigError, match=exact("config.json: 'hidden_size' must be an integer, got 64.5")):
        ModelConfig.from_hf({**TINY_HF, "hidden_size": 64.5})


def test_n_params_formula():
    c = tiny()
    per_layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 32 + 2 * 64
    assert c.n_params == 10 * 64 + 2 * per_layer + 64 + 10 * 64
    assert tiny(tie_word_embeddings=True).n_params == c.n_params - 10 * 64
    assert sum(p.numel() for p in Transformer(c).parameters()) == c.n_params
    assert math.isclose(REGISTRY["llama-3.1-8b"].n_params / 1e9, 8.03, abs_tol=0.005)

"""The model's architecture as one frozen dataclass, read from Meta's params.json or HF's config.json.

Both formats describe the same handful of numbers under different names, and each leaves some
of them implicit (Meta derives the FFN width from `multiple_of`; old Meta files omit rope_theta;
HF may or may not spell out head_dim). `ModelConfig.from_meta` and `ModelConfig.from_hf` turn
either into the same explicit description; `to_meta` and `to_hf` write it back.

`REGISTRY` holds the shapes of the released models, so that a randomly initialised model of
any of them can be built by name: `ModelConfig.from_name("llama-3.2-1b")`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


class ConfigError(ValueError):
    """A config is malformed: a key is missing, has the wrong type, or describes an impossible shape."""


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts longer than the model was trained on.

    kind:
      "linear"  - position interpolation: every frequency divided by `factor`.
      "dynamic" - HF's dynamic NTK: rope_theta grows with the sequence length once it exceeds
                  `original_max_seq_len`; shorter sequences are left untouched.
      "llama3"  - Llama 3.1+: long wavelengths divided by `factor`, short ones kept, and a smooth
                  blend between `low_freq_factor` and `high_freq_factor` (see model.rope_frequencies).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "dynamic", "llama3"):
            raise ConfigError(f"unknown RoPE scaling type {self.kind!r}; expected linear, dynamic or llama3")
        if not 0 < self.factor < math.inf:
            raise ConfigError(f"RoPE scaling factor must be positive and finite, got {self.factor}")
        if not all(math.isfinite(v) for v in (self.low_freq_factor, self.high_freq_factor)):
            raise ConfigError(f"RoPE scaling frequency factors must be finite, got {self.low_freq_factor}, {self.high_freq_factor}")
        if isinstance(self.original_max_seq_len, bool) or not isinstance(self.original_max_seq_len, int) or not (
            0 < self.original_max_seq_len <= SIZE_LIMITS["max_seq_len"]
        ):
            raise ConfigError(f"RoPE scaling original_max_seq_len must be a positive integer, got {self.original_max_seq_len!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, "
                f"got {self.high_freq_factor} and {self.low_freq_factor}"
            )


    @classmethod
    def from_dict(cls, data: Any, where: str = "rope_scaling") -> "RopeScaling":
        """A RopeScaling from its dataclass fields (as ModelConfig.to_dict writes them)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}; known fields: {', '.join(sorted(names))}")
        for name, value in data.items():
            _check_json_type(cls, name, value, where)
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads: n_heads for MHA, 1 for MQA, in between for GQA
    vocab_size: int
    ffn_dim: int  # hidden width of the SwiGLU feed-forward
    head_dim: int = -1  # -1: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_seq_len: int = 2048  # the longest context the cache is built for by default

    # ---- architecture variants (all off for Llama itself) -------------------------------------
    # A researcher's new idea is one field here and one module (or one step) in model.py. Every
    # part of the project that cannot handle a field's non-default value refuses it by name.
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # attend only to the last W positions, itself included (Mistral)
    window_layers: tuple[int, ...] | None = None  # layers that use sliding_window (None: every layer)
    nope_layers: tuple[int, ...] = ()  # layers without rotary position embeddings (NoPE)
    mlp: str = "swiglu"  # "swiglu": w2(silu(w1 x) * w3 x); "gelu": w2(gelu(w1 x)), no w3

    def __post_init__(self):
        for name in ("window_layers", "nope_layers"):  # JSON and the CLI give lists
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.head_dim == -1:
            if self.n_heads > 0 and self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > limit:  # a file saying 2**64 layers would otherwise build layers forever
                raise ConfigError(f"{name} {value} is beyond any model this project can build (at most {limit})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 0 < self.norm_eps < math.inf or not 0 < self.rope_theta < math.inf:
            raise ConfigError(f"norm_eps and rope_theta must be positive and finite, got {self.norm_eps} and {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.window_layers is not None and self.sliding_window is None:
            raise ConfigError("window_layers is set but sliding_window is not")
        for name in ("window_layers", "nope_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ConfigError(f"{name} must be a list of layer indices, got {layers!r}")
            bad = [i for i in layers if not 0 <= i < self.n_layers]
            if bad or len(set(layers)) != len(layers):
                raise ConfigError(f"{name} must hold distinct layer indices in 0..{self.n_layers - 1}, got {list(layers)}")
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"unknown mlp {self.mlp!r}; expected one of {', '.join(MLP_KINDS)}")

    # ---- per-layer choices -----------------------------------------------------------------------

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full causal attention."""
        if self.sliding_window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.sliding_window

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def variants(self) -> dict[str, Any]:
        """The fields beyond Llama's own that differ from their defaults: {name: value}."""
        return unsupported_fields(self, ())

    # ---- the whole config as plain data ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON-ready data (rope_scaling a dict or None, tuples as lists)."""
        data = dataclasses.asdict(self)
        for name, value in data.items():
            if isinstance(value, tuple):
                data[name] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> "ModelConfig":
        """The inverse of to_dict. Unknown keys are refused by name; missing ones take defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object of ModelConfig fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown ModelConfig fields {unknown}; known fields: {', '.join(sorted(names))}")
        values = dict(data)
        scaling = values.get("rope_scaling")
        if scaling is not None:
            values["rope_scaling"] = RopeScaling.from_dict(scaling, f"{where}: rope_scaling")
        for name, value in values.items():
            _check_json_type(cls, name, value, where)
        try:
            return cls(**values)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{where}: {e}") from None

    def override(self, assignments: Sequence[str]) -> "ModelConfig":
        """A copy with `field=value` assignments applied (the CLI's --set), each value parsed by the
        field's type: numbers, true/false, none, comma-separated layer lists, JSON for rope_scaling."""
        changes: dict[str, Any] = {}
        for item in assignments:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep:
                raise ConfigError(f"--set {item!r}: expected field=value")
            changes[name] = parse_field(name, text.strip())
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", -1)  # derive it again unless given
        return ModelConfig.from_dict({**self.to_dict(), **{k: _jsonable(v) for k, v in changes.items()}}, "--set")

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_params(self) -> int:
        """Every parameter, a tied output layer counted once: the sum of param_counts()."""
        return sum(self.param_counts().values())

    # ---- model arithmetic (docs/MATH.md works these through; scripts/model_stats.py prints them) ----

    def param_counts(self) -> dict[str, int]:
        """Parameters by part, keyed as the model's own names group them:

            embedding     V x D (tok_embeddings)
            attention     per layer wq and wo, H*hd x D each, and wk and wv, Hkv*hd x D each: GQA's
                          fewer key/value heads shrink only the last two
            feed_forward  per layer three D x F matrices for SwiGLU (w1, w3, w2), two for gelu
            norms         per layer two RMSNorm weights of D (attention_norm, ffn_norm), plus two of hd
                          with qk_norm (q_norm, k_norm), and the final norm's D
            output        V x D, or 0 when tied to the embedding (one tensor, counted once)
        """
        hd, L = self.head_dim, self.n_layers
        matrices = {"swiglu": 3, "gelu": 2}[self.mlp]
        return {
            "embedding": self.vocab_size * self.dim,
            "attention": L * self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads),
            "feed_forward": L * matrices * self.dim * self.ffn_dim,
            "norms": L * (2 * self.dim + (2 * hd if self.qk_norm else 0)) + self.dim,
            "output": 0 if self.tie_word_embeddings else self.vocab_size * self.dim,
        }

    def kv_cache_bytes_per_token(self, dtype: Any = "bfloat16") -> int:
        """Bytes the KV cache stores for one token of one sequence: a key and a value vector of
        Hkv * hd per layer. dtype: a torch dtype or its name ("bfloat16", "float32", ...).
        (With a sliding window this project's cache still keeps every position: the mask hides the
        old ones.)"""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes(dtype)

    def flops_per_token(self, context: int) -> int:
        """Forward-pass FLOPs (a multiply-add is 2) of one token that attends to `context` positions,
        itself included.

        Matrices: 2 per weight that multiplies -- attention, feed-forward and the output layer (also
        when tied); the embedding is a lookup, no arithmetic. Attention itself: q.k for every position
        and the probability-weighted sum of v, 2 * 2 * H * hd per position per layer (a sliding-window
        layer sees at most its window). Norms, rotary, softmax and the activation are O(D) per token
        and left out. Training costs about 3x this (backward is two matmuls per forward one).
        """
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ValueError(f"context must be a positive number of positions, got {context!r}")
        counts = self.param_counts()
        weights = counts["attention"] + counts["feed_forward"] + self.vocab_size * self.dim
        attended = sum(min(context, self.window(i) or context) for i in range(self.n_layers))
        return 2 * weights + 4 * self.n_heads * self.head_dim * attended

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Meta params.json ----------------------------------------------------------------------

    @classmethod
    def from_meta(cls, params: Mapping[str, Any], *, vocab_size: int | None = None) -> "ModelConfig":
        """Build from a Meta params.json dict.

        `vocab_size` fills in Llama 1/2's `"vocab_size": -1` (the caller reads it off the embedding).
        """
        get = _Getter(params, "params.json")
        unknown = sorted(set(params) - set(META_KEYS))
        if unknown:
            raise ConfigError(f"params.json: unknown keys {unknown} (a vision, MoE or quantized model?); a key this "
                              "project does not read could change the model (refused rather than ignored)")  # fmt: skip
        dim, n_heads = get.int("dim"), get.int("n_heads")
        n_kv_heads = get.int("n_kv_heads", n_heads)
        vocab = get.int("vocab_size", -1)
        if vocab <= 0:
            if vocab_size is None:
                raise ConfigError("params.json has vocab_size -1 and no embedding was given to read it from")
            vocab = vocab_size
        multiple_of, multiplier = get.int("multiple_of", 256), get.float("ffn_dim_multiplier", None)
        if not 0 < multiple_of <= SIZE_LIMITS["ffn_dim"] or (multiplier is not None and not 0 < multiplier <= 64):
            raise ConfigError(f"params.json: multiple_of {multiple_of} and ffn_dim_multiplier {multiplier} must be "
                              "positive (and of a plausible size)")  # fmt: skip
        if not 0 < dim <= SIZE_LIMITS["dim"]:
            raise ConfigError(f"params.json: dim {dim} must be a positive integer of at most {SIZE_LIMITS['dim']}")
        ffn_dim = meta_ffn_dim(dim, multiple_of, multiplier)
        n_layers = get.int("n_layers")

        scaling = None
        if get.bool("use_scaled_rope", False):
            # Meta's code hard-codes factor 8, which is right for Llama 3.1 but not for the
            # Llama 3.2 1B/3B checkpoints (trained with factor 32). Their params.json does not
            # say so; their shapes identify them. An explicit key (newer llama-models) wins.
            factor = 8.0
            if (dim, n_layers) in ((2048, 16), (3072, 28)):
                factor = 32.0
            factor = get.float("rope_scaling_factor", factor)
            scaling = RopeScaling("llama3", factor, 1.0, 4.0, 8192)
        is_llama3 = vocab >= 128000
        return cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab,
            ffn_dim=ffn_dim,
            norm_eps=get.float("norm_eps", 1e-5),
            rope_theta=get.float("rope_theta", 10000.0),
            rope_scaling=scaling,
            # Meta files always carry output.weight; tied models (3.2 1B/3B) store a copy.
            tie_word_embeddings=False,
            max_seq_len=get.int("max_seq_len", 131072 if scaling else 8192 if is_llama3 else 4096),
        )

    def to_meta(self) -> dict[str, Any]:
        """A params.json dict. Meta's format has no FFN width, so it is written through
        `multiple_of` / `ffn_dim_multiplier` values that reproduce `ffn_dim` exactly."""
        variants = self.variants()
        if variants:
            raise ConfigError(f"Meta's params.json cannot express {', '.join(f'{k}={v!r}' for k, v in variants.items())}; "
                              "save in the Hugging Face layout, whose config.json carries every field")  # fmt: skip
        multiple_of, multiplier = _meta_ffn_params(self.dim, self.ffn_dim)
        if self.head_dim != self.dim // self.n_heads:
            raise ConfigError(f"Meta's format cannot express head_dim {self.head_dim} != dim / n_heads")
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
        }
        if self.rope_scaling is not None:
            s = self.rope_scaling
            if s.kind != "llama3" or (s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len) != (1.0, 4.0, 8192):
                raise ConfigError(f"Meta's format can only express llama3 RoPE scaling (1, 4, 8192), not {s}")
            params["use_scaled_rope"] = True
            params["rope_scaling_factor"] = s.factor
        # No max_seq_len: Meta's loader calls ModelArgs(max_seq_len=..., **params), and a second
        # max_seq_len in params.json makes that a TypeError. from_meta falls back to its defaults.
        return params

    # ---- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Build from a config.json dict: transformers' Llama, Mistral or Qwen3 config (4.x or 5.x
        style), or one this project wrote, whose full ModelConfig sits under HF_OWN_KEY.

        Strict: an unknown model_type or key is refused by name (HF_IGNORED_KEYS lists the keys
        knowingly ignored: they do not change what the model computes), and so is a file whose HF
        fields disagree with its own ModelConfig (edited by hand after saving)."""
        get = _Getter(config, "config.json")
        model_type = config.get("model_type", "llama")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"config.json: unsupported model_type {model_type!r}; this project reads "
                              f"{', '.join(HF_MODEL_TYPES)} (a close cousin would load and compute the wrong model)")  # fmt: skip
        if "quantization_config" in config:
            raise ConfigError("config.json has a quantization_config: the weights were quantized for transformers "
                              "(GPTQ, AWQ, bitsandbytes ...); this project reads float checkpoints")  # fmt: skip
        unknown = sorted(set(config) - set(HF_READ_KEYS) - set(HF_IGNORED_KEYS))
        if unknown:
            raise ConfigError(f"config.json: unknown keys {unknown}; a key this project does not read could change "
                              "the model (refused rather than ignored)")  # fmt: skip
        if config.get("pruned_heads"):
            raise ConfigError(f"config.json: pruned_heads {config['pruned_heads']!r} is not supported")
        if get.bool("attention_bias", False) or get.bool("mlp_bias", False):
            raise ConfigError("config.json sets attention_bias or mlp_bias; Llama models have no biases")
        if get.float("attention_dropout", 0.0) != 0.0:
            raise ConfigError(f"config.json: attention_dropout {config['attention_dropout']!r} is not supported (only 0)")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json has hidden_act {act!r}; Llama uses silu (SwiGLU)")
        dim, n_heads, n_layers = get.int("hidden_size"), get.int("num_attention_heads"), get.int("num_hidden_layers")
        head_dim = config.get("head_dim")
        max_pos = get.int("max_position_embeddings", 2048)
        rope_theta, scaling = _rope_from_hf(config, max_pos)

        variants: dict[str, Any] = {}
        if model_type == "qwen3":
            variants["qk_norm"] = True
        window = None if config.get("sliding_window") is None else get.int("sliding_window")
        if model_type == "qwen3" and not get.bool("use_sliding_window", False):
            window = None  # Qwen3 keeps a sliding_window value that is off unless use_sliding_window
        if window is not None:
            variants["sliding_window"] = window
            if model_type == "qwen3":
                variants["window_layers"] = _qwen3_window_layers(config, get, n_layers)
        parsed = cls(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=get.int("num_key_value_heads", n_heads),
            vocab_size=get.int("vocab_size"),
            ffn_dim=get.int("intermediate_size"),
            head_dim=-1 if head_dim is None else get.int("head_dim"),
            norm_eps=get.float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=get.bool("tie_word_embeddings", False),
            max_seq_len=max_pos,
            **variants,
        )
        if HF_OWN_KEY not in config:
            if model_type == HF_OWN_TYPE:
                raise ConfigError(f"config.json: model_type {HF_OWN_TYPE!r} needs its {HF_OWN_KEY!r} entry")
            return parsed
        own = cls.from_dict(config[HF_OWN_KEY], f"config.json: {HF_OWN_KEY}")
        written = own.to_hf()
        for key in sorted(set(written) & set(config) - {HF_OWN_KEY, "torch_dtype", "architectures"}):
            if config[key] != written[key]:
                raise ConfigError(f"config.json: {key!r} is {config[key]!r} but its {HF_OWN_KEY} entry says "
                                  f"{written[key]!r}; edit the {HF_OWN_KEY} entry, which is the full config")  # fmt: skip
        return own

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A config.json dict: the fields transformers reads, and the whole ModelConfig under
        HF_OWN_KEY so that every field survives a save and load. The model type is the transformers
        family that computes this model -- llama, mistral (a sliding window on every layer) or qwen3
        (qk_norm) -- or this project's own, which transformers refuses to load rather than load a
        model without the variant (NoPE layers, the GELU MLP, windows on some layers only ...)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope_scaling = {"rope_type": s.kind, "factor": s.factor}
            if s.kind == "llama3":
                rope_scaling.update(
                    low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_seq_len,
                )
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": dtype,
        }
        variants = self.variants()
        windowed = self.sliding_window is not None
        if set(variants) <= {"qk_norm", "sliding_window", "window_layers"} and self.qk_norm:
            config.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=windowed,
                          sliding_window=self.sliding_window)  # fmt: skip
            if windowed:
                window_layers = range(self.n_layers) if self.window_layers is None else self.window_layers
                config["layer_types"] = ["sliding_attention" if i in window_layers else "full_attention"
                                         for i in range(self.n_layers)]  # fmt: skip
            del config["mlp_bias"]
        elif set(variants) == {"sliding_window"}:
            config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=self.sliding_window)
            del config["mlp_bias"], config["attention_bias"]
        elif variants:
            config.update(architectures=["LlamaFromScratchForCausalLM"], model_type=HF_OWN_TYPE)
        config[HF_OWN_KEY] = self.to_dict()
        return config

    # ---- the registry ----------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """The exact shape of a released model, e.g. "llama-3.1-8b". Unknown names list the valid ones."""
        if name not in REGISTRY:
            raise KeyError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
        return REGISTRY[name].replace(**overrides) if overrides else REGISTRY[name]


# Sizes beyond these describe no model that fits any machine; a config file saying more is malformed.
SIZE_LIMITS = {"dim": 1 << 20, "n_layers": 1 << 12, "n_heads": 1 << 14, "n_kv_heads": 1 << 14, "vocab_size": 1 << 24,
               "ffn_dim": 1 << 22, "head_dim": 1 << 14, "max_seq_len": 1 << 24}  # fmt: skip
MLP_KINDS = ("swiglu", "gelu")
# Llama's own fields, which every part of the project handles. Any other field is a variant: each
# fast path and file format lists the variants it handles and refuses the rest (unsupported_fields).
LLAMA_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_word_embeddings", "max_seq_len")  # fmt: skip


def unsupported_fields(config: ModelConfig, handled: Sequence[str]) -> dict[str, Any]:
    """{name: value} of the fields of `config` that are not Llama's own, not in `handled`, and not at
    their default: what a part of the project written for `handled` must refuse."""
    found = {}
    for f in dataclasses.fields(config):
        if f.name in LLAMA_FIELDS or f.name in handled:
            continue
        value = getattr(config, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            found[f.name] = value
    return found



# ---- config.json: what is read, what is knowingly ignored ----------------------------------------

# params.json keys of Meta's text models (max_batch_size only sizes Meta's own cache: ignored).
META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
             "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len", "max_batch_size")  # fmt: skip

HF_OWN_KEY = "llama_from_scratch"  # this project's full ModelConfig inside config.json
HF_OWN_TYPE = "llama_from_scratch"  # the model_type of variants no transformers family computes
HF_MODEL_TYPES = ("llama", "mistral", "qwen3", HF_OWN_TYPE)
HF_READ_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", HF_OWN_KEY,
)  # fmt: skip
# Keys that do not change what the model computes: which class to instantiate, token ids (the
# tokenizer's business; eos ids are read by the checkpoint loader), dtype, training-time settings
# (initializer_range; pretraining_tp only slices the same matmuls), bookkeeping, and
# "quantization", read by llama.quantization for this project's quantized checkpoints.
HF_IGNORED_KEYS = (
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "initializer_range", "pretraining_tp", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "quantization",
    # transformers' generic PretrainedConfig fields, which a full to_dict() (and older transformers'
    # save_pretrained) writes for every model: task heads, generation defaults, export switches.
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "problem_type", "add_cross_attention",
    "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "length_penalty", "max_length",
    "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "prefix", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16", "pruned_heads",
)  # fmt: skip


def _rope_from_hf(config: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from config.json. transformers 5 moved rope_theta and the scaling into
    one `rope_parameters` dict (rope_type "default" when there is no scaling); older files write
    `rope_theta` beside `rope_scaling`, whose type key is "rope_type" or, older still, "type"."""
    rope = config.get("rope_parameters")
    key = "rope_parameters"
    if rope is None:
        key = "rope_scaling"
        rope = config.get("rope_scaling")
        if rope is not None and not isinstance(rope, Mapping):
            raise ConfigError(f"config.json: 'rope_scaling' must be an object or null, got {rope!r}")
        rope = dict(rope or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    elif not isinstance(rope, Mapping):
        raise ConfigError(f"config.json: 'rope_parameters' must be an object, got {rope!r}")
    get = _Getter(rope, f"config.json {key}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = get.float("rope_theta", 10000.0)
    if kind in ("default", None):
        return theta, None
    original = get.int("original_max_position_embeddings", None) if rope.get("original_max_position_embeddings") else max_pos
    if kind == "llama3":
        return theta, RopeScaling("llama3", get.float("factor"), get.float("low_freq_factor"),
                                  get.float("high_freq_factor"), original)  # fmt: skip
    if kind == "linear":
        return theta, RopeScaling("linear", get.float("factor"))
    if kind == "dynamic":
        # HF's dynamic NTK compares the sequence length with max_position_embeddings.
        return theta, RopeScaling("dynamic", get.float("factor"), original_max_seq_len=max_pos)
    raise ConfigError(f"config.json: unsupported RoPE scaling type {kind!r}")


def _qwen3_window_layers(config: Mapping[str, Any], get: "_Getter", n_layers: int) -> tuple[int, ...] | None:
    """The layers of a Qwen3 config that use the sliding window (None: all of them)."""
    types = config.get("layer_types")
    if types is None:
        first = get.int("max_window_layers", 28)
        layers = tuple(i for i in range(n_layers) if i >= first)
    else:
        if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"config.json: 'layer_types' must list full_attention / sliding_attention for each of "
                              f"{n_layers} layers, got {types!r}")  # fmt: skip
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return None if len(layers) == n_layers else layers

def _field_type(cls, name: str):
    import typing

    return typing.get_type_hints(cls)[name]


def _check_json_type(cls, name: str, value: Any, where: str) -> None:
    """ConfigError unless `value` fits field `name` of dataclass `cls` as JSON gives it."""
    import types
    import typing

    kind = _field_type(cls, name)
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if option is str and isinstance(value, str):
            return
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return
        if option is RopeScaling and isinstance(value, RopeScaling):
            return
    raise ConfigError(f"{where}: {name!r} must be {_describe(kind)}, got {value!r}")


def _describe(kind) -> str:
    import types
    import typing

    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             RopeScaling: "a rope_scaling object"}  # fmt: skip
    return " or ".join(words.get(o, "a list of integers") for o in options)


def parse_field(name: str, text: str) -> Any:
    """The value of ModelConfig field `name` written as `text` on a command line."""
    import json
    import types
    import typing

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if name not in names:
        raise ConfigError(f"--set: unknown ModelConfig field {name!r}; known fields: {', '.join(sorted(names))}")
    kind = _field_type(ModelConfig, name)
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for option in options:
        try:
            if option is bool:
                if text.lower() in ("true", "false", "1", "0", "yes", "no"):
                    return text.lower() in ("true", "1", "yes")
            elif option is int:
                return int(text)
            elif option is float:
                return float(text)
            elif option is str:
                return text
            elif typing.get_origin(option) is tuple:
                return tuple(int(v) for v in text.split(",") if v.strip())
            elif option is RopeScaling:
                return RopeScaling.from_dict(json.loads(text), f"--set {name}")
        except ValueError:
            continue
    raise ConfigError(f"--set {name}={text}: expected {_describe(kind)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, RopeScaling):
        return dataclasses.asdict(value)
    return list(value) if isinstance(value, tuple) else value


# Bytes per element of the dtypes a model or its cache may use (torch dtypes also carry .itemsize).
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or a dtype name; ValueError for anything else."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_BYTES:
        return DTYPE_BYTES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype or one of {', '.join(DTYPE_BYTES)}")


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN width: 2/3 of 4*dim (SwiGLU has three matrices instead of two), optionally
    scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _meta_ffn_params(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which meta_ffn_dim gives back ffn_dim."""
    for multiple_of in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(dim, multiple_of, None) == ffn_dim:
            return multiple_of, None
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_dim % multiple_of:
            continue
        # Try the smallest multipliers that land in the right bucket; the last aims mid-bucket
        # (int() truncates), so rounding to 6 digits cannot drop it below (e.g. multiple_of 1).
        for guess in (ffn_dim / base, (ffn_dim - multiple_of + 1) / base, (ffn_dim - multiple_of + 1.5) / base):
            multiplier = round(guess, 6)
            if meta_ffn_dim(dim, multiple_of, multiplier) == ffn_dim:
                return multiple_of, multiplier
    raise ConfigError(f"no multiple_of / ffn_dim_multiplier gives ffn_dim {ffn_dim} for dim {dim}")


class _Getter:
    """Typed reads from a JSON dict, with errors that name the file and key."""

    def __init__(self, data: Mapping[str, Any], where: str):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data, self.where = data, where

    _MISSING = object()

    def _get(self, key, default):
        value = self.data.get(key, default if default is not self._MISSING else self._MISSING)
        if value is self._MISSING:
            raise ConfigError(f"{self.where}: missing key {key!r}")
        return value

    def int(self, key, default=_MISSING) -> int:
        value = self._get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: {key!r} must be an integer, got {value!r}")
        return value

    def float(self, key, default=_MISSING) -> float | None:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: {key!r} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{self.where}: {key!r} must be a finite number, got {value!r}")
        return value

    def bool(self, key, default=_MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key!r} must be true or false, got {value!r}")
        return value


def _llama3(dim, n_layers, n_heads, multiple_of, ffn_dim_multiplier, *, tied=False, scaled=None, max_seq_len=131072):
    scaling = RopeScaling("llama3", scaled, 1.0, 4.0, 8192) if scaled else None
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
        ffn_dim=meta_ffn_dim(dim, multiple_of, ffn_dim_multiplier),
        rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=tied,
        max_seq_len=max_seq_len if scaled else 8192,
    )  # fmt: skip


def _llama2(dim, n_layers, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier=None):
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=32000,
        ffn_dim=meta_ffn_dim(dim, multiple_of, ffn_dim_multiplier), max_seq_len=4096,
    )  # fmt: skip


# The FFN width is written as Meta's params.json gives it, (multiple_of, ffn_dim_multiplier), and
# derived by meta_ffn_dim: 2/3 of 4 * dim (SwiGLU's third matrix paid for by a narrower layer),
# times the multiplier, rounded up to the multiple. docs/MATH.md works it through.
REGISTRY: dict[str, ModelConfig] = {
    #                 dim    layers heads kv  multiple_of  ffn_dim_multiplier
    "llama-2-7b": _llama2(4096, 32, 32, 32, 256),  # ffn_dim 11008
    "llama-2-13b": _llama2(5120, 40, 40, 40, 256),  # 13824
    "llama-2-70b": _llama2(8192, 80, 64, 8, 4096, 1.3),  # 28672
    "llama-3-8b": _llama3(4096, 32, 32, 1024, 1.3),  # 14336
    "llama-3-70b": _llama3(8192, 80, 64, 4096, 1.3),  # 28672
    "llama-3.1-8b": _llama3(4096, 32, 32, 1024, 1.3, scaled=8.0),  # 14336
    "llama-3.1-70b": _llama3(8192, 80, 64, 4096, 1.3, scaled=8.0),  # 28672
    "llama-3.1-405b": _llama3(16384, 126, 128, 4096, 1.2, scaled=8.0),  # 53248
    "llama-3.2-1b": _llama3(2048, 16, 32, 256, 1.5, tied=True, scaled=32.0),  # 8192
    "llama-3.2-3b": _llama3(3072, 28, 24, 256, 1.0, tied=True, scaled=32.0),  # 8192
}

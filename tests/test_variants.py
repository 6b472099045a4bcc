"""The variant zoo: every architecture variant of ModelConfig through every part of the project.

For each variant (per-head q/k norms, sliding windows on all or some layers, NoPE layers, the GELU
MLP, and all of them at once), each fast path and format either computes what the plain model
computes or refuses with an error naming what it does not know:
kernels.optimize (with and without the native kernels), int8 / int4 quantization, the compiled
decode step, save and load (Hugging Face layout; Meta's layout refuses), quantized checkpoints, and a
training step. Then a researcher's *new* field and a *new* module, which every transform refuses.

Parity with transformers' Qwen3 (qk_norm) and Mistral (sliding window) is in tests/test_parity_hf.py.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import llama
from kernels import native
from llama import ConfigError, ModelConfig, Transformer
from llama.core.generation import compiled_decode_step, generate
from llama.core.support import UnsupportedModelError
from llama.quantization import Int4Linear, Int8Linear, quantize_model, save_quantized

torch.set_num_threads(1)

BASE = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=96, max_seq_len=64)
VARIANTS = {
    "qk_norm": dict(qk_norm=True),
    "sliding_window": dict(sliding_window=4),
    "window_some_layers": dict(sliding_window=3, window_layers=(0, 2)),
    "nope_layers": dict(nope_layers=(1,)),
    "gelu_mlp": dict(mlp="gelu"),
    "all": dict(qk_norm=True, sliding_window=5, window_layers=(1,), nope_layers=(0, 2), mlp="gelu"),
}
# What each variant changes: the same weights with the field off must give other logits (so the
# comparisons below could fail), and the parameter count (q/k norms: two vectors of hd per layer;
# GELU: two matrices instead of three).
TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26], [2, 71, 82, 81, 82, 84, 59, 4, 52, 35, 36, 0]])
REL = 1e-5  # float32: the same math in another order


def random_model(config: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
            else:  # norms random too, so a skipped norm shows
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def config(variant):
    return BASE.replace(**VARIANTS[variant])


@pytest.fixture(scope="module")
def plain(config):
    return random_model(config)


@pytest.fixture(scope="module")
def expected(plain):
    with torch.no_grad():
        return plain(TOKENS)


def test_the_variant_changes_the_model(config, plain, expected):
    """Otherwise the comparisons below would pass on a fast path that ignores the variant."""
    without = Transformer(BASE.replace(mlp=config.mlp)).eval()
    state = {k: v for k, v in plain.state_dict().items() if "q_norm" not in k and "k_norm" not in k}
    without.load_state_dict(state)
    with torch.no_grad():
        assert rel_error(without(TOKENS), expected) > 0.05 or config.variants() == {"mlp": "gelu"}


def test_n_params_counts_the_model(config, plain):
    assert sum(p.numel() for p in plain.parameters()) == config.n_params


def test_cached_decoding_equals_the_full_forward(plain, expected):
    plain.setup_cache(2, 32)
    try:
        with torch.no_grad():
            pieces = [plain(TOKENS[:, :5], 0)] + [plain(TOKENS[:, i : i + 1], i) for i in range(5, TOKENS.shape[1])]
    finally:
        plain.clear_cache()
    assert rel_error(torch.cat(pieces, dim=1), expected) < REL


# ---- kernels ----------------------------------------------------------------------------------------


def test_kernels_optimize_computes_the_plain_model(plain, expected):
    fast = kernels.optimize(copy.deepcopy(plain), native=False)
    assert type(fast.layers[0].attention) is kernels.FastAttention
    with torch.no_grad():
        assert rel_error(fast(TOKENS), expected) < REL
    for switches in ({"sdpa": False}, {"inplace_rope": False}, {"fuse_qkv": False}):
        fast = kernels.optimize(copy.deepcopy(plain), native=False, **switches)
        with torch.no_grad():
            assert rel_error(fast(TOKENS), expected) < REL, switches


@pytest.mark.skipif(not native.available(), reason=f"C++ kernels not built: {str(native.build_error())[:200]}")
def test_native_kernels_compute_the_plain_model(plain):
    """bf16 (the kernels' dtype) against the plain bf16 model, decoding token by token."""
    bf16 = copy.deepcopy(plain).bfloat16()
    fast = kernels.optimize(copy.deepcopy(bf16))
    assert any(type(m) in native.NATIVE_MODULES for m in fast.modules())
    tokens = TOKENS[:, :8]
    logits = []
    for model in (bf16, fast):
        model.setup_cache(2, 16)
        with torch.no_grad():
            logits.append(torch.cat([model(tokens[:, i : i + 1], i) for i in range(tokens.shape[1])], dim=1))
        model.clear_cache()
    assert rel_error(logits[1], logits[0]) < 0.03  # bf16 rounding in another order (tests/test_native.py)


# ---- quantization --------------------------------------------------------------------------------------


def dequantized(model: Transformer) -> Transformer:
    """The float model whose weights are what the quantized linears stand for."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear)):
            if isinstance(module, Int8Linear):
                weight = module.weight.float() * module.scales.float()[:, None]
            else:
                weight = module.dequantize(torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight = nn.Parameter(weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_finds_every_projection_and_keeps_the_variant(plain, mode):
    quantized = quantize_model(copy.deepcopy(plain), mode, group_size=32)
    linears = [n for n, m in quantized.named_modules() if type(m) is nn.Linear]
    assert linears == []  # every projection of the blocks, found by type, and the output
    reference = dequantized(quantized)
    with torch.no_grad():
        assert rel_error(quantized(TOKENS), reference(TOKENS)) < REL


def test_quantized_checkpoint_keeps_the_variant(plain, tmp_path):
    quantized = quantize_model(copy.deepcopy(plain), "int8")
    save_quantized(quantized, tmp_path / "q")
    loaded = llama.load(tmp_path / "q")
    assert loaded.config == plain.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), quantized(TOKENS), rtol=0, atol=0)


# ---- compile, save/load, training -----------------------------------------------------------------------


def test_compiled_decode_step_computes_the_plain_model(plain):
    torch._dynamo.reset()
    try:
        expected = generate(plain, [[1, 5, 9, 2, 33, 4, 8, 8], [7, 8]], 10, temperature=0, stop_tokens=[])
        compiled_decode_step(plain, backend="aot_eager")
        got = generate(plain, [[1, 5, 9, 2, 33, 4, 8, 8], [7, 8]], 10, temperature=0, stop_tokens=[], compile=True)
    finally:
        plain.clear_cache()
        del plain._compiled_decode_step
        torch._dynamo.reset()
    assert got == expected


def test_hf_save_and_load_keeps_every_field(plain, expected, tmp_path):
    llama.save(plain, tmp_path / "hf", format="hf")
    loaded = llama.load(tmp_path / "hf")
    assert loaded.config == plain.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), expected, rtol=0, atol=0)


def test_meta_layout_refuses_the_variant(plain, tmp_path):
    with pytest.raises(ConfigError, match="Meta's params.json cannot express"):
        llama.save(plain, tmp_path / "meta", format="meta")
    assert not (tmp_path / "meta").exists()


def test_a_training_step_reaches_the_variant(plain):
    model = copy.deepcopy(plain).train()
    logits = model(TOKENS[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---- what nobody was written for: a researcher's new field and new module ---------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigWithNewField(ModelConfig):
    """A researcher's next experiment: a field no fast path or format knows yet."""

    attention_sink: bool = False


def with_new_field() -> Transformer:
    model = random_model(BASE)
    model.config = ConfigWithNewField(**dataclasses.asdict(BASE) | {"rope_scaling": None}, attention_sink=True)
    return model


@pytest.mark.parametrize("transform", ["optimize", "native", "int8"])
def test_an_unknown_config_field_is_refused_by_name(transform):
    model = with_new_field()
    apply = {"optimize": lambda m: kernels.optimize(m, native=False), "native": native.swap_native_linears,
             "int8": lambda m: quantize_model(m, "int8")}[transform]  # fmt: skip
    before = {n: m for n, m in model.named_modules()}
    with pytest.raises(UnsupportedModelError, match="not written for config attention_sink=True"):
        apply(model)
    assert {n: m for n, m in model.named_modules()} == before


def test_an_unknown_config_field_is_refused_by_the_formats(tmp_path):
    model = with_new_field()
    with pytest.raises(ConfigError, match="Meta's params.json cannot express attention_sink=True"):
        llama.save(model, tmp_path / "meta", format="meta")
    with pytest.raises(ConfigError, match=r"unknown ModelConfig fields \['attention_sink'\]"):
        ModelConfig.from_dict(model.config.to_dict())


class SinkAttention(llama.core.model.Attention):
    """A researcher's subclass: a fast path built from it could drop what it changes."""


@pytest.mark.parametrize("transform", ["optimize", "native", "int4"])
def test_an_unknown_module_is_refused_by_name(transform):
    model = random_model(BASE)
    old = model.layers[2].attention
    new = SinkAttention(BASE, 2)
    new.load_state_dict(old.state_dict())
    model.layers[2].attention = new
    apply = {"optimize": lambda m: kernels.optimize(m, native=False), "native": native.swap_native_linears,
             "int4": lambda m: quantize_model(m, "int4", group_size=32)}[transform]  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="'layers.2.attention' of type SinkAttention"):
        apply(model)
    assert type(model.layers[0].attention) is llama.core.model.Attention  # nothing swapped before the check


def test_quantization_refuses_a_linear_with_a_bias():
    model = random_model(BASE)
    model.layers[1].feed_forward.w2 = nn.Linear(BASE.ffn_dim, BASE.dim, bias=True)
    with pytest.raises(UnsupportedModelError, match="linears with a bias: layers.1.feed_forward.w2"):
        quantize_model(model, "int8")


# ---- the scripts -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--quantize", "int8"], ["--dtype", "bfloat16"]], ids=["float32", "int8", "bf16"])
def test_generate_script_runs_the_variant(tmp_path, flags):
    """generate.py (which applies kernels.optimize) prints what the library generates for a
    checkpoint with every variant set."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import weights

    config = BASE.replace(vocab_size=4096, **VARIANTS["all"])  # the bundled tokenizer's vocabulary
    model = random_model(config)
    llama.save(model, tmp_path / "ckpt")
    shutil.copy(weights.BUNDLED_MODEL / "tokenizer.model", tmp_path / "ckpt" / "tokenizer.model")
    script = Path(__file__).parents[1] / "scripts" / "generate.py"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "In the beginning", "--temperature", "0",
            "--max-new-tokens", "8", "--device", "cpu", *(flags or ["--dtype", "float32"])]  # fmt: skip
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = llama.Llama.load(tmp_path / "ckpt", dtype="float32" if not flags else None)
    if flags == ["--quantize", "int8"]:
        ref.model = quantize_model(ref.model, "int8")
    if flags == ["--dtype", "bfloat16"]:
        ref = llama.Llama.load(tmp_path / "ckpt", dtype="bfloat16")
    expected = ref.generate("In the beginning", 8, temperature=0, stop_tokens=[])
    # bf16 through the kernels may round differently from the plain bf16 model: the first tokens agree.
    assert done.stdout.startswith("In the beginning" + (expected[:4] if flags == ["--dtype", "bfloat16"] else expected))

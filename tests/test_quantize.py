"""Weight-only quantization (llama/quantization/): quantized linears against the float layer and against
their own pure-PyTorch fallback, whole-model swaps, quantized checkpoints, errors and the script flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llama
import weights
from llama import ModelConfig, Transformer
from llama.quantization import Int4Linear, Int8Linear, quantize_model, save_quantized, swap_linears
from llama.quantization.linear import pack_nibbles, unpack_nibbles

SCRIPT = Path(__file__).parents[1] / "scripts" / "generate.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Relative error of the layer's output (Frobenius norm) against the float layer, random normal weights.
# int8: the rounding error is uniform in +-step/2 with step = max|w|/127 ~ 3.3 sigma/127 for K ~ 300,
# an rms error of step / sqrt(12) ~ 0.75% of sigma per weight; errors of K weights add up like the
# weights themselves, so the output is off by ~0.75% too. The bound leaves room for the spread of a
# norm over 1024 outputs (one row of 16 outputs reached 1.002% at K = 320).
INT8_BOUND = 0.015
# int4: 16 levels over each group's range, a step of ~(range / 15) and an rms rounding error of
# step / sqrt(12): ~7% of sigma for G = 32, ~11% for G = 256. The bound leaves room for the spread of
# a norm over 1024 outputs (one row of 16 outputs reached 25%).
INT4_BOUND = 0.18
# bf16 activations: the float reference itself is computed in bf16, whose rounding is 2^-8 relative.
BF16_EXTRA = 0.01


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_linear(n: int, k: int, dtype: torch.dtype, seed: int) -> nn.Linear:
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    return linear.to(dtype)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9))  # leading dims of x: (B, T)


@settings(max_examples=25, deadline=None)
@given(lead=shapes, n=st.sampled_from([16, 48, 96, 100]), k=st.sampled_from([64, 256, 320]),
       dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 100))  # fmt: skip
def test_int8_linear_matches_float_and_fallback(lead, n, k, dtype, seed):
    dtype = DTYPES[dtype]
    linear = make_linear(n, k, dtype, seed)
    q = Int8Linear.from_float(linear)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        exact = linear.float()(x.float())
        q.use_kernel = True
        fast = q(x)
        q.use_kernel = False
        slow = q(x)
    assert fast.shape == slow.shape == (*lead, n) and fast.dtype == slow.dtype == dtype
    assert q.weight.dtype == torch.int8 and q.weight.shape == (n, k)
    # Accuracy over 64 rows of inputs, so that the norm averages over at least 1024 outputs.
    bound = INT8_BOUND + (BF16_EXTRA if dtype == torch.bfloat16 else 0)
    x64 = torch.randn(64, k, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    with torch.no_grad():
        assert rel_err(q(x64), linear.float()(x64.float())) < bound
    # The kernel and the fallback compute the same sum, differing only in rounding order.
    assert rel_err(fast, slow) < (1e-5 if dtype == torch.float32 else 1e-2)


@settings(max_examples=25, deadline=None)
@given(lead=shapes, n=st.sampled_from([16, 48, 96, 100]), k_groups=st.integers(1, 4),
       group_size=st.sampled_from([32, 64, 128, 256]), dtype=st.sampled_from(list(DTYPES)),
       seed=st.integers(0, 100))  # fmt: skip
def test_int4_linear_matches_float_and_fallback(lead, n, k_groups, group_size, dtype, seed):
    dtype, k = DTYPES[dtype], k_groups * group_size
    linear = make_linear(n, k, dtype, seed)
    q = Int4Linear.from_float(linear, group_size)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        exact = linear.float()(x.float())
        q.use_kernel = True
        fast = q(x)  # N = 100 is not a multiple of 16: the kernel is skipped, the fallback runs
        q.use_kernel = False
        slow = q(x)
    assert fast.shape == slow.shape == (*lead, n) and fast.dtype == slow.dtype == dtype
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (n, k // 2)
    # Accuracy over 64 rows of inputs, so that the norm averages over at least 1024 outputs.
    bound = INT4_BOUND + (BF16_EXTRA if dtype == torch.bfloat16 else 0)
    x64 = torch.randn(64, k, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    with torch.no_grad():
        assert rel_err(q(x64), linear.float()(x64.float())) < bound
    assert rel_err(fast, slow) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_kernel_choice(monkeypatch):
    """use_kernel=None takes the packed kernel for short bfloat16 inputs only; True forces it."""
    calls = []
    real = torch.ops.aten._weight_int8pack_mm

    class Spy:
        def __getattr__(self, name):
            if name == "_weight_int8pack_mm":
                return lambda *a: calls.append(a[0].shape) or real(*a)
            return getattr(torch.ops.aten, name)

    import llama.quantization.linear as quantize

    monkeypatch.setattr(quantize.torch.ops, "aten", Spy())
    q = Int8Linear.from_float(make_linear(16, 64, torch.bfloat16, 0))
    q(torch.randn(1, 64, dtype=torch.bfloat16))
    q(torch.randn(64, 64, dtype=torch.bfloat16))
    q(torch.randn(1, 64).float())
    assert calls == [(1, 64)]
    q.use_kernel = True
    q(torch.randn(64, 64).float())
    assert calls == [(1, 64), (64, 64)]


def test_int4_dequantize_is_within_half_a_step():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    q = Int4Linear.from_float(nn.Linear(128, 32, bias=False).requires_grad_(False).to(torch.float32), 64)
    q.load_weight(w)
    step = q.scales_and_zeros[..., 0].T.repeat_interleave(64, dim=1)  # (N, K): each weight's group scale
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_int4_kernel_packing_follows_weight_changes():
    q = Int4Linear.from_float(make_linear(32, 128, torch.bfloat16, 0), 64)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    q.use_kernel = True
    before = q(x)
    q.load_weight(torch.randn(32, 128, generator=torch.Generator().manual_seed(5)))  # a new tensor
    after = q(x)
    q.weight.bitwise_xor_(0x11)  # changed in place
    changed = q(x)
    q.use_kernel = False
    assert not torch.equal(before, after) and rel_err(changed, q(x)) < 1e-2


def test_nibble_packing_round_trips():
    values = torch.randint(0, 16, (8, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(values)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), values)


def test_int8_zero_row_stays_zero():
    linear = nn.Linear(64, 16, bias=False).requires_grad_(False)
    linear.weight[3] = 0
    q = Int8Linear.from_float(linear)
    assert torch.isfinite(q.scales).all() and (q.weight[3] == 0).all()


# ---- whole models --------------------------------------------------------------------------------

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=160, max_seq_len=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    path = tmp_path_factory.mktemp("float")
    llama.save(model, path)
    return path


def tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.2)])
def test_load_quantize_matches_quantize_model_and_float(checkpoint, mode, bound):
    plain = llama.load(checkpoint, dtype="float32")
    with torch.no_grad():
        ref = plain(tokens())
        loaded = llama.load(checkpoint, dtype="float32", quantize=mode, group_size=32)
        swapped = quantize_model(plain, mode, group_size=32)
        out = loaded(tokens())
        assert torch.equal(out, swapped(tokens()))  # quantizing while loading = quantizing afterwards
    assert rel_err(out, ref) < bound
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert all(isinstance(layer.feed_forward.w2, kind) and isinstance(layer.attention.wq, kind) for layer in loaded.layers)
    assert isinstance(loaded.output, kind) and isinstance(loaded.tok_embeddings, nn.Embedding)
    assert loaded.quantization["include_output"]


def test_int4_leaves_layers_that_do_not_fit_the_group_size(checkpoint):
    model = llama.load(checkpoint, dtype="float32", quantize="int4", group_size=128)
    # dim 64 is not a multiple of 128: wq..w1, w3 stay float; w2 (in = ffn_dim 160) too.
    assert all(isinstance(m, nn.Linear) for m in model.layers[0].attention.children())
    model = quantize_model(llama.load(checkpoint, dtype="float32"), "int4", group_size=32)
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear)


def test_include_output_and_tied_output():
    torch.manual_seed(0)
    model = quantize_model(Transformer(CONFIG), "int8")
    assert isinstance(model.output, Int8Linear)
    assert isinstance(quantize_model(Transformer(CONFIG), "int8", include_output=False).output, nn.Linear)
    tied = Transformer(CONFIG.replace(tie_word_embeddings=True))
    embedding = tied.tok_embeddings.weight.detach().clone()
    quantize_model(tied, "int8")
    # A quantized copy of the shared table; the embedding keeps the float one for its lookups.
    assert isinstance(tied.output, Int8Linear) and torch.equal(tied.tok_embeddings.weight, embedding)
    assert rel_err(tied.output.weight.float() * tied.output.scales[:, None], embedding) < 0.01
    kept = quantize_model(Transformer(CONFIG.replace(tie_word_embeddings=True)), "int8", include_output=False)
    assert kept.output.weight is kept.tok_embeddings.weight


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_gives_identical_logits(checkpoint, tmp_path, mode, dtype):
    model = llama.load(checkpoint, dtype=dtype, quantize=mode, group_size=32)
    files = save_quantized(model, tmp_path)
    assert {f.name for f in files} == {"config.json", "model.safetensors"}
    again = llama.load(tmp_path)
    assert again.quantization == model.quantization
    assert again.tok_embeddings.weight.dtype == DTYPES[dtype]
    with torch.no_grad():
        assert torch.equal(again(tokens()), model(tokens()))
    if mode == "int4" and dtype == "bfloat16":  # the kernel's packing is made while loading
        assert all(m._packed is not None for m in again.modules() if isinstance(m, Int4Linear))
    int_bytes = sum(t.nbytes for t in again.buffers() if not t.is_floating_point())
    n_weights = sum(p.numel() for n, p in Transformer(CONFIG).named_parameters() if "attention.w" in n or "forward.w" in n or n == "output.weight")
    assert int_bytes == n_weights // (1 if mode == "int8" else 2)  # one byte, or half a byte, per weight


@pytest.mark.parametrize("include_output", [True, False])
def test_tied_checkpoint_round_trip(tmp_path, include_output):
    torch.manual_seed(0)
    model = quantize_model(Transformer(CONFIG.replace(tie_word_embeddings=True)), "int8", include_output=include_output)
    save_quantized(model.eval(), tmp_path)
    again = llama.load(tmp_path)
    assert (again.output.weight is again.tok_embeddings.weight) == (not include_output)
    with torch.no_grad():
        assert torch.equal(again(tokens()), model(tokens()))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tied_checkpoint_quantized_while_loading(tmp_path, mode):
    torch.manual_seed(0)
    model = Transformer(CONFIG.replace(tie_word_embeddings=True))
    llama.save(model, tmp_path)
    loaded = llama.load(tmp_path, dtype="float32", quantize=mode, group_size=32)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), quantize_model(model, mode, group_size=32)(tokens()))
    assert loaded.quantization["include_output"] and not isinstance(loaded.output, nn.Linear)
    plain = llama.load(tmp_path, dtype="float32", quantize=mode, group_size=32, quantize_output=False)
    assert plain.output.weight is plain.tok_embeddings.weight


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_generates_like_full_forward(checkpoint, mode):
    model = llama.load(checkpoint, dtype="float32", quantize=mode, group_size=32)
    prompt = [1, 2, 3, 4]
    out = llama.generate(model, [prompt], 8, temperature=0)[0]
    assert len(out) == 8
    # The greedy tokens are the argmax of one full forward over the prompt and what came before.
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out]))[0]
    assert logits[len(prompt) - 1 :].argmax(-1)[: len(out)].tolist() == out


def test_errors(checkpoint, tmp_path):
    model = Transformer(CONFIG)
    with pytest.raises(ValueError, match=r"unknown quantization mode 'int3'; expected one of int8, int4"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match=r"group_size must be one of 32, 64, 128, 256, got 48"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ValueError, match=r"unknown quantization mode 'fp8'"):
        llama.load(checkpoint, quantize="fp8")
    with pytest.raises(ValueError, match=r"in_features 64 is not a multiple of group_size 128"):
        Int4Linear(64, 16, 128)
    with pytest.raises(ValueError, match=r"not quantized"):
        save_quantized(model, tmp_path / "x")
    save_quantized(llama.load(checkpoint, quantize="int8"), tmp_path / "q8")
    with pytest.raises(llama.CheckpointError, match=r"already quantized as 'int8'; cannot load it as 'int4'"):
        llama.load(tmp_path / "q8", quantize="int4")


def test_swap_linears_skips_modules_already_quantized():
    model = quantize_model(Transformer(CONFIG), "int8")
    assert swap_linears(model, "int8") == []


@pytest.mark.slow
def test_generate_script_quantize_flags():
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), "--max-new-tokens", "10", "--temperature", "0",
                               "--dtype", "float32", "--device", "cpu", *args], capture_output=True, text=True)  # fmt: skip

    plain, q8, bad = run(), run("--quantize", "int8"), run("--quantize", "int4", "--group-size", "100")
    assert plain.returncode == 0 and q8.returncode == 0, q8.stderr
    assert "int8 weights]" in q8.stderr and q8.stdout.startswith("In the beginning")
    assert len(q8.stdout) > len("In the beginning") + 10
    assert bad.returncode == 2 and "error: int4 group_size must be one of 32, 64, 128, 256, got 100" in bad.stderr


def test_bundled_model_int8_keeps_every_clear_greedy_choice():
    # Along the float model's own greedy continuation (so one early near-tie cannot fork the rest),
    # int8 weights pick the float model's token wherever its top two logits are clearly apart.
    plain = llama.load(weights.BUNDLED_MODEL, dtype="float32")
    q8 = llama.load(weights.BUNDLED_MODEL, dtype="float32", quantize="int8")
    prompt = llama.load_tokenizer(weights.BUNDLED_MODEL).encode("In the beginning", bos=True, eos=False)
    new = llama.generate(plain, [prompt], 64, temperature=0, stop_tokens=[])[0]
    tokens = torch.tensor([prompt + new])
    with torch.no_grad():
        ref, ours = plain(tokens)[0, len(prompt) - 1 : -1], q8(tokens)[0, len(prompt) - 1 : -1]
    assert torch.equal(ref.argmax(-1), torch.tensor(new))  # the continuation is the float model's greedy one
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.25
    same = ref.argmax(-1) == ours.argmax(-1)
    assert clear.sum() >= len(new) // 2, "too few clear choices for the test to mean anything"
    assert same[clear].all(), [i for i in range(len(new)) if clear[i] and not same[i]]
    assert same.float().mean() >= 0.9, same.float().mean()

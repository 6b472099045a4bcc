"""kernels/native.py: the C++ matrix-vector kernels against float32 F.linear, the swapped modules
against the ones they replace, whole bf16 / int8 / int4 models, torch.compile, and the fallbacks.

Tolerances. The kernels sum in float32 and round once to bfloat16, so for each output
    |y - ref| <= 2^-8 |ref| + 2 K 2^-24 S
where ref is F.linear in float32 on the same (bf16 or dequantized) weights: the first term is the
bf16 rounding of y (half a unit in the last place is 2^-9 relative; 2^-8 leaves room for the
second term), the second bounds float32 summation in two different orders, the kernel's and the
reference's (K terms each, each addition rounding by 2^-24 of the running sum), with S the same
product on absolute values. int4 sums x * (128 + q)
and subtracts 136 s X afterwards (see kernels/csrc/gemv_int4.cpp), so its S uses 150 s + |z|.

Whole models: the swapped and the plain bf16 model differ only in how each linear's output is
rounded (torch's bf16 paths also sum in float32 and round once, in another order; the plain int8 /
int4 fallback even rounds the dequantized weights to bf16 first). A one-unit difference in a few bf16
outputs grows through the layers of these random models (weights normal(0, 0.3), so logits reach ~8),
which are themselves 2-4% of the largest |logit| away from their float32 computation. So the
logits are compared (relative to the largest |logit|) with two bounds: the swapped model is within
2e-2 of the plain one (seen: bf16 0, i.e. equal; int8 5e-3, int4 1.1e-2), and no further from the
float32 computation than 1.25 x the plain bf16 model is (seen: at most 1.04 x).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kernels
import llama
from kernels import native
from kernels.native import NativeInt4Linear, NativeInt8Linear, NativeLinear
from llama import ModelConfig, Transformer
from llama.quantization import Int4Linear, Int8Linear, quantize_model

from random_models import random_model as shared_random_model

torch.set_num_threads(2)  # the kernels split N across threads: exercise that

needs_kernels = pytest.mark.skipif(not native.available(),
                                   reason=f"C++ kernels not built: {str(native.build_error())[:300]}")

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=160, max_seq_len=64)
MODEL_REL = 2e-2


def random_model(config: ModelConfig = CONFIG, seed: int = 0, std: float = 0.3) -> Transformer:
    """A bf16 model, matrices normal(0, std) (peaked logits), norms around 1."""
    return shared_random_model(config, seed, std, random_norms=True, dtype=torch.bfloat16)


def assert_within(y: torch.Tensor, ref: torch.Tensor, abs_ref: torch.Tensor, K: int) -> None:
    """The module docstring's bound, elementwise; ref and abs_ref (the product on |values|) in float32."""
    bound = 2**-8 * ref.abs() + 2 * K * 2**-24 * abs_ref
    err = (y.float() - ref).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} at {worst}"


def assert_close(actual, expected, rel):
    scale = expected.abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x max |expected| {scale:.3g}"


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decode_logits(model: Transformer, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens (B*prefill rows), then one token per step (B rows); logits (B, T, V)."""
    B, T = tokens.shape
    model.setup_cache(B, 32)
    try:
        out = [model(tokens[:, :prefill], 0)]
        out += [model(tokens[:, i : i + 1], i) for i in range(prefill, T)]
        return torch.cat(out, dim=1)
    finally:
        model.clear_cache()


TOKENS = torch.randint(0, CONFIG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))


# ---- each kernel against float32 F.linear --------------------------------------------------------------

# Up to 40 rows: the AMX kernels (2 rows and more) take x 16 rows at a time. K: any (the vdpbf16ps
# kernels), and multiples of 32 (bf16 takes AMX only then).
rows = st.integers(1, 40)
in_features = st.one_of(st.integers(1, 300), st.integers(1, 10).map(lambda n: 32 * n))
seeds = st.integers(0, 2**16)
FAST = settings(max_examples=80, deadline=None)


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 100), K=in_features, seed=seeds)
def test_bf16_kernel(M, N, K, seed):
    x, w = randn(M, K, seed=seed).bfloat16(), randn(N, K, seed=seed + 1).bfloat16()
    ref = F.linear(x.float(), w.float())
    assert_within(native.gemv_bf16(x, w), ref, F.linear(x.float().abs(), w.float().abs()), K)


@needs_kernels
@pytest.mark.skipif(native.available() and native.isa() != "avx512_bf16",
                    reason="the AMX and generic builds sum in another order for several rows")  # fmt: skip
@pytest.mark.parametrize("K", [31, 64, 100])
def test_bf16_kernel_rows_of_a_batch_equal_single_rows(K):
    """Each output is one row of x against one row of w, summed chunk by chunk in the same order
    whatever tile (rows of x x rows of w) computes it: a batch's rows equal the same rows decoded
    alone, bit for bit. Every row count from 1 to 17 (the tiles of 1..8 rows, two passes above 8),
    N = 11 (tiles of 4 and 3 weight rows and their remainders)."""
    x, w = randn(17, K, seed=K).bfloat16(), randn(11, K, seed=K + 1).bfloat16()
    alone = torch.cat([native.gemv_bf16(x[m : m + 1], w) for m in range(17)])  # (17, N)
    for M in range(1, 18):
        assert torch.equal(native.gemv_bf16(x[:M], w), alone[:M]), f"{M} rows"


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 100), K=in_features, scales_bf16=st.booleans(), seed=seeds)
def test_int8_kernel(M, N, K, scales_bf16, seed):
    x = randn(M, K, seed=seed).bfloat16()
    q = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    scales = randn(N, seed=seed + 1).abs() / 100
    scales = scales.bfloat16() if scales_bf16 else scales
    w = q.float() * scales.float()[:, None]  # what the int8 values stand for
    ref = F.linear(x.float(), w)
    assert_within(native.gemv_int8(x, q, scales), ref, F.linear(x.float().abs(), w.abs()), K)


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 70), groups=st.integers(1, 4), G=st.sampled_from([32, 64, 128, 256]), seed=seeds)
def test_int4_kernel(M, N, groups, G, seed):
    K = groups * G
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(randn(N, K, seed=seed))
    module = Int4Linear.from_float(linear.bfloat16(), G)
    x = randn(M, K, seed=seed + 1).bfloat16()
    w = module.dequantize(torch.float32)
    s, z = module.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
    magnitude = (150 * s + z.abs()).repeat_interleave(G, dim=1)  # (N, K): what the kernel sums, see the top
    packed = native.pack_int4(module.weight, module.scales_and_zeros, G)
    y = native.gemv_int4(x, packed, N, K, G)
    assert_within(y, F.linear(x.float(), w), F.linear(x.float().abs(), magnitude), K)


@needs_kernels
def test_large_rows_and_strided_weight():
    """Rows past the register tiles (M = 37), and a weight whose rows are a slice of a wider matrix."""
    x = randn(37, 100, seed=0).bfloat16()
    wide = randn(50, 160, seed=1).bfloat16()
    w = wide[:, 30:130]  # (50, 100), row stride 160
    ref, abs_ref = F.linear(x.float(), w.float()), F.linear(x.float().abs(), w.float().abs())
    assert_within(native.gemv_bf16(x, w), ref, abs_ref, 100)


@needs_kernels
def test_kernels_take_any_leading_dimensions():
    """x (..., K) -> (..., N): the leading dimensions are flattened in C++ (the swapped modules pass x as
    it is), and each row gives what the same row gives as a 2-D x. 1-D x, 3-D x, and a non-contiguous x."""
    N, K, G = 24, 64, 32
    w = randn(N, K, seed=1).bfloat16()
    q, scales = w.float().clamp(-1, 1).mul(127).to(torch.int8), (torch.rand(N) / 50).bfloat16()
    d = (torch.rand(N, K // 32) / 50).half()
    linear = nn.Linear(K, N, bias=False)
    linear.weight.data = w.float()
    int4 = Int4Linear.from_float(linear.to(torch.bfloat16), group_size=G)
    packed = native.pack_int4(int4.weight, int4.scales_and_zeros, G)
    ops = {
        "bf16": lambda x: native.gemv_bf16(x, w),
        "int8": lambda x: native.gemv_int8(x, q, scales),
        "int8_q8a": lambda x: native.gemv_int8_q8a(x, q, scales),
        "q8_0": lambda x: native.gemv_q8_0(x, q, d),
        "q8_0_q8a": lambda x: native.gemv_q8_0_q8a(x, q, d),
        "int4": lambda x: native.gemv_int4(x, packed, N, K, G),
        "int4_q8a": lambda x: native.gemv_int4_q8a(x, packed, N, K, G),
    }
    x3 = randn(2, 3, K, seed=0).bfloat16()
    strided = randn(3, 2, K, seed=2).bfloat16().transpose(0, 1)  # (2, 3, K), not contiguous
    for name, op in ops.items():
        rows = op(x3.reshape(6, K))
        assert op(x3).shape == (2, 3, N) and torch.equal(op(x3), rows.view(2, 3, N)), name
        assert op(x3[0, 1]).shape == (N,) and torch.equal(op(x3[0, 1]), rows[1]), name
        assert torch.equal(op(strided), op(strided.contiguous())), name
        assert op(x3[:, :0]).shape == (2, 0, N), name  # no rows: an empty result, not an error


@needs_kernels
def test_kernels_reject_what_they_cannot_take():
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x has 63 columns, the weight expects 64"):
        native.gemv_bf16(x[:, :63], w)
    with pytest.raises(ValueError, match="x must be a bfloat16 CPU tensor of at least 1 dimension, got Float"):
        native.gemv_bf16(x.float(), w)
    with pytest.raises(ValueError, match=r"scales must be a \(8,\) float32 or bfloat16"):
        native.gemv_int8(x, w.to(torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match="in_features 96 must be a positive multiple of group_size 64"):
        native.pack_int4(torch.zeros(8, 48, dtype=torch.uint8), torch.zeros(1, 8, 2), 64)
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128 or 256, got 48"):
        native.gemv_int4(x, torch.zeros(8, dtype=torch.uint8), 8, 96, 48)
    with pytest.raises(ValueError, match="max_rows must be >= 0, got -1"):
        native.swap_native_linears(random_model(), max_rows=-1)


@needs_kernels
@pytest.mark.slow
def test_generic_build_matches_the_avx512_one():
    """The plain-loop build (for CPUs without AVX-512 bf16) computes the same function. Compiled once
    more (about a minute, then cached) under its own operator namespace."""
    native._compile(generic=True)
    generic = torch.ops.llama_kernels_generic
    assert generic.isa() == "generic"
    N, G = 40, 64
    for M, K in [(1, 100), (5, 192), (20, 37)]:  # K: whole and partial chunks of the 16 partial sums
        x, w = randn(M, K, seed=0).bfloat16(), randn(N, K, seed=1).bfloat16()
        ref = F.linear(x.float(), w.float())
        assert_within(generic.gemv_bf16(x, w), ref, F.linear(x.float().abs(), w.float().abs()), K)
        q, scales = w.float().clamp(-1, 1).mul(127).to(torch.int8), torch.rand(N) / 50
        wq = q.float() * scales[:, None]
        assert_within(generic.gemv_int8(x, q, scales), F.linear(x.float(), wq), F.linear(x.float().abs(), wq.abs()), K)
    linear = nn.Linear(192, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(randn(N, 192, seed=2))
    module = Int4Linear.from_float(linear.bfloat16(), G)
    packed = generic.pack_int4(module.weight, module.scales_and_zeros, G)
    assert torch.equal(packed, native.pack_int4(module.weight, module.scales_and_zeros, G))
    w4 = module.dequantize(torch.float32)
    for M in (1, 5, 20):
        x = randn(M, 192, seed=M).bfloat16()
        y = generic.gemv_int4(x, packed, N, 192, G)  # sums x * (q - 8) directly: the plain bound applies
        assert_within(y, F.linear(x.float(), w4), F.linear(x.float().abs(), w4.abs()), 192)


# ---- the swapped modules ---------------------------------------------------------------------------------


@needs_kernels
def test_swapped_linears_share_the_weights_and_keep_the_names():
    model = random_model(CONFIG.replace(tie_word_embeddings=True))
    state = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    swapped = native.swap_native_linears(model)
    assert len(swapped) == 7 * CONFIG.n_layers + 1 and "output" in swapped
    assert isinstance(model.layers[0].attention.wq, NativeLinear) and isinstance(model.output, NativeLinear)
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters: no copy
    assert model.state_dict().keys() == state.keys()
    assert native.swap_native_linears(model) == []  # swapping twice is harmless


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_swapped_quantized_linears_share_the_buffers(mode):
    model = quantize_model(random_model(), mode, group_size=32, include_output=True)
    state = model.state_dict()
    swapped = native.swap_native_linears(model)
    assert len(swapped) == 7 * CONFIG.n_layers + 1
    cls = NativeInt8Linear if mode == "int8" else NativeInt4Linear
    assert all(isinstance(m, cls) for n, m in model.named_modules() if n in swapped)
    after = model.state_dict()
    assert after.keys() == state.keys()  # int4's own packing is not saved
    if mode == "int8":
        assert all(after[n].data_ptr() == t.data_ptr() for n, t in state.items())
    else:  # the packing is the only copy; the state dict reads the int4 buffers back from it, exactly
        assert all(torch.equal(after[n], t) for n, t in state.items())
        for name in swapped:
            assert [n for n, _ in model.get_submodule(name).named_buffers()] == ["packed"], name


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_a_swapped_module_falls_back_above_max_rows_and_when_turned_off(kind):
    K, N = 128, 48
    linear = nn.Linear(K, N, bias=False).bfloat16()
    plain = {"bf16": linear, "int8": Int8Linear.from_float(linear), "int4": Int4Linear.from_float(linear, 64)}[kind]
    fast = native._native_version(plain, max_rows=4)
    if kind == "int4":
        plain.use_kernel = False  # NativeInt4Linear's fallback dequantizes: torch's packing would be a second copy
    x = randn(2, 3, K, seed=0).bfloat16()  # 6 rows > max_rows: the module's own computation
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)
        fast.max_rows = 0
        torch.testing.assert_close(fast(x[:1, :1]), plain(x[:1, :1]), rtol=0, atol=0)
        fast.max_rows = 16
        assert_close(fast(x), plain(x), 1e-2)  # the kernel (plain: bf16-rounded weights or torch's kernels)
        if kind != "bf16":  # float32 activations are not a kernel dtype
            torch.testing.assert_close(fast(x.float()), plain(x.float()), rtol=0, atol=0)


@needs_kernels
def test_autograd_takes_the_pytorch_path():
    linear = nn.Linear(64, 32, bias=False).bfloat16()
    fast = NativeLinear(linear)
    x = randn(1, 64, seed=0).bfloat16()
    fast(x).float().sum().backward()  # grad enabled and the weight requires grad: F.linear
    assert linear.weight.grad is not None and linear.weight.grad.shape == (32, 64)
    with torch.no_grad():
        assert fast(x).grad_fn is None


@needs_kernels
def test_int8_with_minus_128_stays_on_pytorch():
    """The kernel widens -127..127; quantize_int8 never makes -128, but a file could hold one."""
    module = Int8Linear.from_float(nn.Linear(64, 16, bias=False).bfloat16())
    with torch.no_grad():
        module.weight[3, 5] = -128
    assert native._native_version(module, 16) is None


@needs_kernels
def test_int4_packing_follows_loaded_weights():
    """load_state_dict and load_weight replace the int4 values: the kernel's packing is remade."""
    a, b = (quantize_model(random_model(seed=s), "int4", group_size=32) for s in (0, 1))
    native.swap_native_linears(a, int8_activations=False)
    a.load_state_dict(b.state_dict())
    with torch.no_grad():
        assert_close(decode_logits(a, TOKENS, 5), decode_logits(b, TOKENS, 5), MODEL_REL)
        module = a.layers[0].feed_forward.w2
        w = randn(module.out_features, module.in_features, seed=3).bfloat16()
        module.load_weight(w)
        x = randn(1, module.in_features, seed=4).bfloat16()
        assert_close(module(x), F.linear(x.float(), module.dequantize(torch.float32)), 1e-2)


# ---- whole models ------------------------------------------------------------------------------------------

QUANTIZED = {"bf16": None, "int8": ("int8", 32), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64)}


def model_pair(kind: str, tied: bool = False) -> tuple[Transformer, Transformer]:
    """(plain, swapped): kernels.optimize without and with native, bf16 or quantized."""
    plain = random_model(CONFIG.replace(tie_word_embeddings=tied))
    fuse = QUANTIZED[kind] is None  # fusing takes plain nn.Linear only
    if not fuse:
        mode, group_size = QUANTIZED[kind]
        quantize_model(plain, mode, group_size, include_output=not tied)
    plain = kernels.optimize(plain, fuse_qkv=fuse, fuse_gate_up=fuse, native=False)
    # The exact-activation kernels (tests/test_native_q8a.py tests the int8-activation ones).
    fast = kernels.optimize(copy.deepcopy(plain), fuse_qkv=fuse, fuse_gate_up=fuse, int8_activations=False)
    return plain, fast


@needs_kernels
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_swapped_model_matches_the_plain_one(kind, tied):
    plain, fast = model_pair(kind, tied)
    exact = copy.deepcopy(plain).float()  # the same (quantized) weights, computed in float32
    assert any(isinstance(m, (NativeLinear, NativeInt8Linear, NativeInt4Linear)) for m in fast.modules())
    with torch.no_grad():
        # A prefill of 15 rows and decoding steps of 3 rows ...
        logits, expected, reference = (decode_logits(m, TOKENS, 5).float() for m in (fast, plain, exact))
        # The decoding steps also attend through decode_attention, which keeps the probabilities in
        # float32 where the plain model's bf16 SDPA does not: the two may differ by the plain model's own
        # distance from float32 on top of the linears' rounding (seen: 0.22 with 0.26 of it, logits ~8).
        plain_error = (expected - reference).abs().max().item()
        assert (logits - expected).abs().max() <= MODEL_REL * expected.abs().max() + plain_error
        assert (logits - reference).abs().max() <= 1.25 * plain_error, "less accurate than torch"
        # ... and a forward of 36 rows: bf16 on torch's path; int8 and int4 on the kernels, while the
        # plain model dequantizes to bf16 weights (rounding them) above 32 rows, so only the accuracy is compared.
        logits, expected, reference = (m(TOKENS).float() for m in (fast, plain, exact))
        assert (logits - reference).abs().max() <= 1.25 * (expected - reference).abs().max(), "less accurate than torch"
        if kind == "bf16":
            torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@needs_kernels
@pytest.mark.skipif(native.available() and native.isa() != "avx512_bf16",
                    reason="the AMX and generic builds sum in another order for several rows")  # fmt: skip
@pytest.mark.parametrize("head_dim", [16, 32], ids=["plain-attention", "vector-attention"])
def test_batched_decode_rows_equal_single_row_decode(head_dim):
    """A server's decoding step: 5 rows at different positions in cache rows 3, 4, 1, 0, 2 of a pool of
    6, with the bf16 kernels (linears and attention), give each row the logits it gets decoded alone,
    bit for bit: every kernel computes a row the same way whatever else is in the batch."""
    model = kernels.optimize(random_model(CONFIG.replace(dim=4 * head_dim, n_heads=4, n_kv_heads=2, head_dim=head_dim)))
    assert type(model.layers[0].attention) is native.NativeAttention and model.layers[0].attention.head_dim == head_dim
    rows, lengths = torch.tensor([3, 4, 1, 0, 2]), [5, 9, 1, 12, 7]
    tokens = torch.randint(0, CONFIG.vocab_size, (5, 16), generator=torch.Generator().manual_seed(2))
    model.setup_cache(6, 32)
    with torch.no_grad():
        for b in range(5):  # each prompt prefilled alone
            model(tokens[b : b + 1, : lengths[b]], 0, cache_rows=rows[b : b + 1])
        for step in range(3):  # the same tokens fed to the batch and to each row alone
            positions = torch.tensor(lengths) + step
            fed = tokens.gather(1, positions[:, None] % 16)  # (5, 1)
            batched = model(fed, positions, cache_rows=rows)
            alone = [model(fed[b : b + 1], positions[b : b + 1], cache_rows=rows[b : b + 1]) for b in range(5)]
            assert torch.equal(batched, torch.cat(alone)), f"step {step}"
    model.clear_cache()


@needs_kernels
@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_greedy_generation_is_unchanged(kind):
    """The native linears keep greedy tokens. (Only the linears: NativeAttention keeps float32
    probabilities where bf16 SDPA rounds, which can flip a near-tie of these random models' logits;
    test_swapped_model_matches_the_plain_one bounds its logits.)"""
    plain, _ = model_pair(kind)
    fast = copy.deepcopy(plain)
    assert native.swap_native_linears(fast, int8_activations=False)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [30, 31, 32, 33]]
    expected = llama.generate(plain, prompts, 12, temperature=0, stop_tokens=[])
    assert llama.generate(fast, prompts, 12, temperature=0, stop_tokens=[]) == expected
    assert all(len(row) == 12 for row in expected)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4-g32"])
def test_a_swapped_block_compiles_as_one_graph(kind):
    """Decoding through an optimized block with its cache traces into one graph (fullgraph=True)
    that calls the kernels, and gives the eager output."""
    _, fast = model_pair(kind)
    fast.setup_cache(2, 16)
    block = fast.layers[0]
    tokens, starts = torch.tensor([[4], [2]]), torch.tensor([4, 2])  # one decoding step per row
    x = randn(2, 1, CONFIG.dim, seed=0).bfloat16()
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, recording the graph
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        expected = block(x, fast.context(tokens, starts, None, None))
        fast.clear_cache()
        fast.setup_cache(2, 16)
        compiled = torch.compile(block, backend=backend, fullgraph=True)(x, fast.context(tokens, starts, None, None))
    assert len(graphs) == 1 and "llama_kernels" in graphs[0].code
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4-g32"])
def test_the_compiled_decode_step_calls_the_kernels(kind):
    """llama.core.generation's compiled decoding (torch.compile fullgraph of the whole step) over a swapped
    model: one graph, no break, the kernels inside it, and the eager tokens."""
    from torch._dynamo.utils import counters

    from llama.core.generation import compiled_decode_step

    _, fast = model_pair(kind)
    prompts = [[1, 5, 9, 2, 33, 4], [7, 8]]
    expected = llama.generate(fast, prompts, 12, temperature=0, stop_tokens=[])
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, recording the graph
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled_decode_step(fast, backend=backend)
    assert llama.generate(fast, prompts, 12, temperature=0, stop_tokens=[], compile=True) == expected
    assert len(graphs) == 1 and sum(counters["graph_break"].values()) == 0
    assert "llama_kernels" in graphs[0].code


# ---- when the kernels are not there ------------------------------------------------------------------------


def test_without_the_kernels_nothing_is_swapped(monkeypatch):
    """A failed build leaves every model as it was and says why (available, build_error)."""
    monkeypatch.setattr(native, "_build", {"ok": False, "error": "RuntimeError: no compiler"})
    assert not native.available() and native.build_error() == "RuntimeError: no compiler"
    model = random_model()
    before = dict(model.named_modules())
    assert native.swap_native_linears(model) == []
    assert kernels.optimize(model, fuse_qkv=False, fuse_gate_up=False, sdpa=False,
                            inplace_rope=False) is model  # fmt: skip
    assert all(module is before[name] for name, module in model.named_modules())
    with pytest.raises(RuntimeError, match="not available: RuntimeError: no compiler"):
        native.gemv_bf16(torch.zeros(1, 4, dtype=torch.bfloat16), torch.zeros(4, 4, dtype=torch.bfloat16))


def test_a_failed_build_warns_once(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise OSError("ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_build", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build there
    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.warns(RuntimeWarning, match=r"could not be built, PyTorch.s are used .*: OSError: ninja is required"):
        assert native.swap_native_linears(random_model()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()  # decided once per process: no second warning


def test_the_build_says_so_and_is_made_once_per_machine(monkeypatch, tmp_path, capsys):
    """A build prints one line first; any later process (here: a second _compile), from any copy of
    the sources, loads the cached library without building or printing again."""
    from torch.utils import cpp_extension

    builds, loaded = [], []

    def build(**kwargs):  # stands in for the compiler: writes the library where it was asked to
        builds.append(kwargs)
        (Path(kwargs["build_directory"]) / f"{kwargs['name']}.so").write_bytes(b"library")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", build)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    native._compile(generic=True)
    err = capsys.readouterr().err
    assert len(builds) == 1 and err.count("\n") == 1 and "compiling the native CPU kernels" in err and str(tmp_path) in err
    native._compile(generic=True)
    assert len(builds) == 1 and capsys.readouterr().err == ""
    assert loaded == [str(Path(builds[0]["build_directory"]) / f"{builds[0]['name']}.so")]
    # An interrupted build (no "built" marker) is made again rather than loaded half-written.
    (Path(builds[0]["build_directory"]) / "built").unlink()
    native._compile(generic=True)
    assert len(builds) == 2


def test_a_changed_header_gets_a_new_build(monkeypatch, tmp_path):
    """The build's folder is keyed by the headers the sources include, not only the sources: a change to
    common.h alone must not load a library built from the old one."""
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC, csrc)
    monkeypatch.setattr(native, "CSRC", csrc)
    before = native._build_directory("llama_kernels_test", ["-O3"])
    with (csrc / "common.h").open("a") as f:
        f.write("\n// changed\n")
    assert native._build_directory("llama_kernels_test", ["-O3"]) != before


def test_a_float32_model_is_left_alone_without_building(monkeypatch):
    monkeypatch.setattr(native, "_build", {})
    model = random_model().float()
    assert native.swap_native_linears(model) == []
    assert native._build == {}  # nothing to swap: the build was not even tried


@needs_kernels
@pytest.mark.slow
def test_inductor_calls_the_kernels():
    """Inductor lowers the operators to calls of the C++ kernels (no graph break, same output)."""
    linear = nn.Linear(64, 64, bias=False).bfloat16()
    stack = nn.Sequential(NativeLinear(linear), NativeInt8Linear(Int8Linear.from_float(linear)),
                          NativeInt4Linear(Int4Linear.from_float(linear, 32)))  # fmt: skip
    x = randn(2, 3, 64, seed=0).bfloat16()
    torch._dynamo.reset()
    with torch.no_grad():
        expected = stack(x)
        compiled = torch.compile(stack, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0)


# ---- decode attention ----------------------------------------------------------------------------------
#
# decode_attention against F.scaled_dot_product_attention in float32 on the same bf16 inputs. The
# kernel's products of bf16 values are exact in float32, its sums and softmax are float32 (exp by a
# polynomial within 1e-7 relative), and it rounds the output once to bf16: so each output is within
# 2^-8 of its own size plus 1e-4 of the largest |v| (float32 summation over S keys in another order,
# with room) of the float32 reference.


def attention_inputs(B, Hkv, n_rep, hd, S, spare, window, seed):
    """q (B, H, 1, hd) a transposed view, k and v views of the first S positions of a longer cache,
    mask (B, 1, 1, S): causal at a random position per row, with an optional sliding window."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B, Hkv, S + spare, hd, generator=g).to(torch.bfloat16)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    q = (torch.randn(B, 1, Hkv * n_rep, hd, generator=g) * 2).to(torch.bfloat16).transpose(1, 2)
    positions = torch.randint(0, S, (B,), generator=g)
    keys = torch.arange(S)
    mask = keys[None, :] <= positions[:, None]
    if window:
        mask &= keys[None, :] > positions[:, None] - window
    return q, k, v, mask[:, None, None, :]


@needs_kernels
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), n_rep=st.sampled_from([1, 2, 3, 4, 6, 8]),
       hd=st.sampled_from([16, 24, 32, 64, 96, 128]), S=st.integers(1, 300), spare=st.integers(0, 5),
       window=st.sampled_from([0, 1, 7]), seed=seeds)  # fmt: skip
@FAST
def test_decode_attention_matches_sdpa(B, Hkv, n_rep, hd, S, spare, window, seed):
    q, k, v, mask = attention_inputs(B, Hkv, n_rep, hd, S, spare, window, seed)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=n_rep > 1)
    out = native.decode_attention(q, k, v, mask, hd**-0.5)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    bound = 2**-8 * ref.abs() + 1e-4 * v.float().abs().max()
    assert ((out.float() - ref).abs() <= bound).all(), (out.float() - ref).abs().max()


@needs_kernels
@pytest.mark.parametrize("hd", [24, 64, 96])
def test_decode_attention_rows_of_a_batch_equal_single_rows(hd):
    """Rows at different positions (a server's batch): each row computes over its own positions
    only, so it equals that row attended alone over its own S, bit for bit."""
    q, k, v, mask = attention_inputs(5, 2, 4, hd, 150, 3, 0, hd)
    mask[3] = False
    mask[3, ..., 40:90] = True  # a row whose unmasked positions start past 0
    out = native.decode_attention(q, k, v, mask, hd**-0.5)
    for b in range(5):
        S = int(mask[b].nonzero()[:, -1].max()) + 1
        one = slice(b, b + 1)
        alone = native.decode_attention(q[one], k[one, :, :S], v[one, :, :S], mask[one, ..., :S], hd**-0.5)
        assert torch.equal(out[b : b + 1], alone), f"row {b}"


@needs_kernels
def test_generic_decode_attention_matches_the_avx512_one():
    native._compile(generic=True)
    generic = torch.ops.llama_kernels_generic
    for hd in (32, 64, 24):
        q, k, v, mask = attention_inputs(2, 2, 4, hd, 200, 3, 0, hd)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        out = generic.decode_attention(q, k, v, mask, hd**-0.5)
        bound = 2**-8 * ref.abs() + 1e-4 * v.float().abs().max()
        assert ((out.float() - ref).abs() <= bound).all()


@needs_kernels
def test_decode_attention_refuses_what_it_was_not_written_for():
    q, k, v, mask = attention_inputs(1, 2, 2, 32, 10, 0, 0, 0)
    with pytest.raises(ValueError, match="one query per sequence"):
        native.decode_attention(torch.cat([q, q], dim=2), k, v, mask, 1.0)
    with pytest.raises(ValueError, match="bfloat16"):
        native.decode_attention(q.float(), k, v, mask, 1.0)
    with pytest.raises(ValueError, match="Hkv dividing"):
        native.decode_attention(q[:, :3], k, v, mask, 1.0)
    with pytest.raises(ValueError, match="mask must be"):
        native.decode_attention(q, k, v, mask[..., :5], 1.0)


@needs_kernels
def test_native_attention_swap_and_its_fallbacks():
    """kernels.optimize swaps NativeAttention in for bf16 CPU models (sdpa on); decoding steps take the
    kernel, prefill and recording FastAttention's own paths; sdpa=False and float32 are left alone."""
    model = kernels.optimize(random_model(CONFIG.replace(dim=128, n_heads=4, n_kv_heads=2, head_dim=32)))  # head_dim 32
    assert all(type(layer.attention) is native.NativeAttention for layer in model.layers)
    kernels.optimize(model)  # twice: harmless
    plain = kernels.optimize(random_model(CONFIG.replace(dim=128, n_heads=4, n_kv_heads=2, head_dim=32)), native=False)
    with torch.no_grad():
        assert_close(decode_logits(model, TOKENS, 5).float(), decode_logits(plain, TOKENS, 5).float(), MODEL_REL)
    off = kernels.optimize(random_model(), sdpa=False)
    assert not any(isinstance(m, native.NativeAttention) for m in off.modules())
    wide = kernels.optimize(random_model().float())
    assert not any(isinstance(m, native.NativeAttention) for m in wide.modules())
    with pytest.raises(ValueError, match="sdpa=False"):
        native.NativeAttention(off.layers[0].attention)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bf16_kernel_hands_chunks_to_every_thread(threads):
    """A weight of many 512 KiB chunks (parallel_chunks in common.h), 1-3 threads, 1 and 5 rows of x: every
    output row computed once, whoever takes its chunk (N not a multiple of the tile height)."""
    N, K = 4099, 2048
    w = randn(N, K, seed=3).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for M in (1, 5):
            x = randn(M, K, seed=4).bfloat16()
            y = native.gemv_bf16(x, w)
            assert_within(y, F.linear(x.float(), w.float()), F.linear(x.float().abs(), w.float().abs()), K)
    finally:
        torch.set_num_threads(before)

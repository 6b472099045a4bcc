"""kernels/native.py's q8a kernels (int8 / Q8_0 / int4 weights times activations quantized to int8 per
block of 32, kernels/csrc/gemv_q8a.cpp) against PyTorch computing the same function, and the swapped
modules and models that use them.

Reference. quantize_activations_reference(x) gives (xq, d) with x ~ xq * d; the kernel's sums of
integer products are exact, so it computes F.linear(xq * d, W) (int4: with the group sums of x itself
for the zero points) up to float32 summation order and the final rounding to bf16. The bound is
test_native.py's, on those activations:
    |y - ref| <= 2^-8 |ref| + 2 K 2^-24 S,    S = F.linear(|xq d|, |W|)   (int4: + |z| |X|)
A kernel that rounded one activation differently would be off by d |w| for that product, far above
2 K 2^-24 S for these sizes, so the bound also pins the quantization itself.
"""

from __future__ import annotations

import copy
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
from kernels.native import NativeInt4Linear, NativeInt8BlockLinear, NativeInt8Linear, NativeLinear
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear, quantize_model

from test_native import TOKENS, assert_within, decode_logits, needs_kernels, randn, random_model

torch.set_num_threads(2)

rows = st.integers(1, 40)
seeds = st.integers(0, 2**16)
FAST = settings(max_examples=60, deadline=None)


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the q8a kernels see it: xq * d, float32."""
    xq, d = native.quantize_activations_reference(x)
    return (xq * d).flatten(1)[:, : x.shape[1]]


def test_the_reference_quantization():
    """Blocks of 32, scale = largest magnitude / 127, round half to even, zero blocks stay zero."""
    x = torch.zeros(1, 70)
    x[0, :32] = torch.linspace(-1, 1, 32)
    x[0, 32] = 2.5 * 2 / 127  # block 2 of the row: largest value 2 -> d = 2/127, this one is 2.5 steps
    x[0, 33] = 2.0
    xq, d = native.quantize_activations_reference(x)
    assert xq.shape == (1, 3, 32) and d.shape == (1, 3, 1)
    assert d[0, 0, 0] == torch.tensor(1.0) / 127 and xq[0, 0, 0] == -127 and xq[0, 0, 31] == 127
    assert xq[0, 1, 0] == 2 and xq[0, 1, 1] == 127  # 2.5 rounds to even
    assert d[0, 2, 0] == 0 and not xq[0, 2].any()  # values 64..69 are zero, 70..95 padding


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 100), K=st.integers(1, 300), scales_bf16=st.booleans(), seed=seeds)
def test_int8_q8a_kernel(M, N, K, scales_bf16, seed):
    x = randn(M, K, seed=seed).bfloat16()
    q = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)  # -128 too
    scales = randn(N, seed=seed + 1).abs() / 100
    scales = scales.bfloat16() if scales_bf16 else scales
    w = q.float() * scales.float()[:, None]
    xd = quantized_x(x)
    assert_within(native.gemv_int8_q8a(x, q, scales), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 100), blocks=st.integers(1, 12), seed=seeds)
def test_q8_0_q8a_kernel(M, N, blocks, seed):
    K = 32 * blocks  # odd block counts end in half a chunk of 64
    x = randn(M, K, seed=seed).bfloat16()
    q = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    e = (randn(N, blocks, seed=seed + 1).abs() / 100).half()
    w = q.float() * e.float().repeat_interleave(32, dim=1)
    xd = quantized_x(x)
    assert_within(native.gemv_q8_0_q8a(x, q, e), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)


def int4_module(N: int, K: int, G: int, seed: int) -> Int4Linear:
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(randn(N, K, seed=seed))
    return Int4Linear.from_float(linear.bfloat16(), G)


@needs_kernels
@FAST
@given(M=rows, N=st.integers(1, 70), groups=st.integers(1, 4), G=st.sampled_from([32, 64, 128, 256]), seed=seeds)
def test_int4_q8a_kernel(M, N, groups, G, seed):
    K = groups * G
    module = int4_module(N, K, G, seed)
    x = randn(M, K, seed=seed + 1).bfloat16()
    s, z = module.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
    q = (module.dequantize(torch.float32) - z.repeat_interleave(G, 1)) / s.repeat_interleave(G, 1)  # q - 8
    xd = quantized_x(x)
    X = x.float().view(M, K // G, G).sum(-1)  # the zero points multiply the sums of x itself
    wq = q * s.repeat_interleave(G, 1)
    ref = F.linear(xd, wq) + X @ z.T
    magnitude = F.linear(xd.abs(), wq.abs()) + X.abs() @ z.abs().T + x.float().abs().view(M, K // G, G).sum(-1) @ z.abs().T
    packed = native.pack_int4(module.weight, module.scales_and_zeros, G)
    assert_within(native.gemv_int4_q8a(x, packed, N, K, G), ref, magnitude, K)


# Prefill-sized int8 / Q8_0 calls take the panel kernels (16 rows of x per register, gemv_q8a.cpp) from
# 6 rows on. These row counts cover both sides of the switch, a last panel of 1, 15 and 16 rows, and
# several panels per tile (up to 300 rows: 19 panels); N = 45 leaves a short last tile of weight
# rows (8 per tile). int4 keeps its kernel at every size (x quantized with AVX-512 there too).
PANEL_ROWS = [5, 6, 7, 16, 17, 31, 32, 33, 47, 64, 129, 300]


@needs_kernels
@pytest.mark.parametrize("M", PANEL_ROWS)
def test_q8a_kernels_on_prefill_rows(M):
    N, K = 45, 256
    x = randn(M, K, seed=M).bfloat16()
    xd = quantized_x(x)
    q = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(M), dtype=torch.int8)
    for scales in (randn(N, seed=1).abs() / 100, (randn(N, seed=2).abs() / 100).bfloat16()):
        w = q.float() * scales.float()[:, None]
        assert_within(native.gemv_int8_q8a(x, q, scales), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)
    q = q.clamp(min=-127)
    e = (randn(N, K // 32, seed=3).abs() / 100).half()
    w = q.float() * e.float().repeat_interleave(32, dim=1)
    assert_within(native.gemv_q8_0_q8a(x, q, e), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)
    for G in (32, 128):
        module = int4_module(N, K, G, seed=M)
        s, z = module.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
        wq = (module.dequantize(torch.float32) - z.repeat_interleave(G, 1))  # (q - 8) * s
        X = x.float().view(M, K // G, G).sum(-1)
        magnitude = (F.linear(xd.abs(), wq.abs()) + X.abs() @ z.abs().T
                     + x.float().abs().view(M, K // G, G).sum(-1) @ z.abs().T)  # fmt: skip
        packed = native.pack_int4(module.weight, module.scales_and_zeros, G)
        assert_within(native.gemv_int4_q8a(x, packed, N, K, G), F.linear(xd, wq) + X @ z.T, magnitude, K)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decoding_calls_hand_chunks_to_every_thread(threads):
    """Weights of many 512 KiB chunks (parallel_chunks in common.h), 1-3 threads, 1 and 3 rows of x: every
    output row computed once, whoever takes its chunk (N not a multiple of the tile heights)."""
    N, K, G = 2051, 1024, 32
    x = randn(3, K, seed=5).bfloat16()
    q = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
    scales = randn(N, seed=7).abs() / 100
    module = int4_module(N, K, G, seed=8)
    packed = native.pack_int4(module.weight, module.scales_and_zeros, G)
    s, z = module.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/G) each
    wq = module.dequantize(torch.float32) - z.repeat_interleave(G, 1)  # (q - 8) * s
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for M in (1, 3):
            xd, X = quantized_x(x[:M]), x[:M].float().view(M, K // G, G).sum(-1)
            w = q.float() * scales[:, None]
            assert_within(native.gemv_int8_q8a(x[:M], q, scales), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)
            magnitude = (F.linear(xd.abs(), wq.abs()) + X.abs() @ z.abs().T
                         + x[:M].float().abs().view(M, K // G, G).sum(-1) @ z.abs().T)  # fmt: skip
            assert_within(native.gemv_int4_q8a(x[:M], packed, N, K, G), F.linear(xd, wq) + X @ z.T, magnitude, K)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("M", [40, 300])
def test_q8a_prefill_rows_equal_single_rows(M):
    """Each output row depends on its own row of x only: the panel kernels' rows (lanes) and the
    decoding kernels' single rows give the same bits, up to the order of the float32 sums."""
    N, K = 24, 96
    x = randn(M, K, seed=M).bfloat16()
    q = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    scales = randn(N, seed=1).abs() / 100
    many = native.gemv_int8_q8a(x, q, scales).float()
    single = torch.cat([native.gemv_int8_q8a(x[m : m + 1], q, scales) for m in range(M)]).float()
    assert (many - single).abs().max() <= 2**-7 * single.abs().max()


@needs_kernels
def test_non_finite_activations_give_non_finite_outputs():
    """A NaN or inf in x is not quantized to something finite: the outputs it touches are NaN."""
    q, scales = torch.ones(3, 64, dtype=torch.int8), torch.ones(3)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 64, dtype=torch.bfloat16)
        x[1, 40] = bad
        y = native.gemv_int8_q8a(x, q, scales)
        assert torch.isfinite(y[0]).all() and y[1].isnan().all()
        y = native.gemv_q8_0_q8a(x, q, torch.ones(3, 2, dtype=torch.half))
        assert torch.isfinite(y[0]).all() and y[1].isnan().all()
    module = int4_module(16, 64, 32, seed=0)
    packed = native.pack_int4(module.weight, module.scales_and_zeros, 32)
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    x[1, 3] = float("nan")
    y = native.gemv_int4_q8a(x, packed, 16, 64, 32)
    assert torch.isfinite(y[0]).all() and y[1].isnan().all()
    # prefill-sized calls (the panel kernels): only the row holding the NaN or inf
    x = torch.ones(40, 64, dtype=torch.bfloat16)
    x[17, 40], x[33, 2] = float("nan"), float("inf")
    bad = torch.zeros(40, dtype=torch.bool)
    bad[[17, 33]] = True
    for y in (native.gemv_int8_q8a(x, q, scales), native.gemv_q8_0_q8a(x, q, torch.ones(3, 2, dtype=torch.half)),
              native.gemv_int4_q8a(x, packed, 16, 64, 32)):  # fmt: skip
        assert torch.isfinite(y[~bad]).all() and y[bad].isnan().all()


@needs_kernels
def test_the_q8a_kernels_reject_what_they_cannot_take():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"scales must be a \(8,\) float32 or bfloat16"):
        native.gemv_int8_q8a(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match=r"scales must be a \(8, 2\) float16"):
        native.gemv_q8_0_q8a(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2))
    with pytest.raises(ValueError, match="x has 63 columns, the weight expects 64"):
        native.gemv_int8_q8a(x[:, :63], torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128 or 256, got 48"):
        native.gemv_int4_q8a(x, torch.zeros(8, dtype=torch.uint8), 8, 96, 48)


@needs_kernels
@pytest.mark.slow
def test_generic_q8a_matches_the_reference():
    """The plain-loop build computes the same function (compiled once more, then cached)."""
    native._compile(generic=True)
    generic = torch.ops.llama_kernels_generic
    assert not generic.has_vnni()
    N = 40
    for M, K in [(1, 100), (5, 192), (20, 37)]:
        x = randn(M, K, seed=K).bfloat16()
        q = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(M), dtype=torch.int8)
        scales = torch.rand(N) / 50
        w, xd = q.float() * scales[:, None], quantized_x(x)
        assert_within(generic.gemv_int8_q8a(x, q, scales), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)
        if K % 32 == 0:
            e = (torch.rand(N, K // 32) / 50).half()
            w = q.float() * e.float().repeat_interleave(32, dim=1)
            assert_within(generic.gemv_q8_0_q8a(x, q, e), F.linear(xd, w), F.linear(xd.abs(), w.abs()), K)
    module = int4_module(N, 192, 64, seed=2)
    packed = native.pack_int4(module.weight, module.scales_and_zeros, 64)
    for M in (1, 5, 20):
        x = randn(M, 192, seed=M).bfloat16()
        y, fast = generic.gemv_int4_q8a(x, packed, N, 192, 64), native.gemv_int4_q8a(x, packed, N, 192, 64)
        assert (y.float() - fast.float()).abs().max() <= 2**-7 * fast.float().abs().max()


# ---- the swapped modules and models ------------------------------------------------------------------------


@needs_kernels
def test_the_swap_chooses_the_activations():
    """None: int8 activations where the CPU has VNNI; False and True as asked; bf16 weights never."""
    for asked, expected in ((None, native.has_vnni()), (False, False), (True, True)):
        model = quantize_model(random_model(), "int8", 32)
        native.swap_native_linears(model, int8_activations=asked)
        modules = [m for m in model.modules() if isinstance(m, NativeInt8Linear)]
        assert modules and all(m.int8_activations is expected for m in modules)
        assert f"activations {'int8' if expected else 'bf16'}" in repr(modules[0])
    model = kernels.optimize(quantize_model(random_model(), "int4", 32), fuse_qkv=False, fuse_gate_up=False,
                             int8_activations=True)  # fmt: skip
    assert all(m.int8_activations for m in model.modules() if isinstance(m, NativeInt4Linear))


@needs_kernels
def test_a_second_swap_does_not_ignore_other_activations():
    """Swapped modules stay as they are on a second swap, so asking for the other arithmetic is refused
    by name; asking for the same, or leaving it to the CPU (None), is harmless."""
    model = quantize_model(random_model(), "int8", 32)
    native.swap_native_linears(model, int8_activations=True)
    assert native.swap_native_linears(model, int8_activations=True) == []
    assert native.swap_native_linears(model) == []
    with pytest.raises(ValueError, match=r"layers\.0\..* was already swapped with int8_activations=True"):
        native.swap_native_linears(model, int8_activations=False)
    with pytest.raises(ValueError, match="already swapped with int8_activations=True"):
        kernels.optimize(model, fuse_qkv=False, fuse_gate_up=False, int8_activations=False)
    assert all(m.int8_activations for m in model.modules() if isinstance(m, NativeInt8Linear))


@needs_kernels
def test_a_second_swap_does_not_ignore_other_max_rows():
    """The same for max_rows: the swapped modules keep the first swap's, so another is refused by name."""
    model = random_model()
    native.swap_native_linears(model, max_rows=4)
    assert native.swap_native_linears(model, max_rows=4) == [] and native.swap_native_linears(model) == []
    with pytest.raises(ValueError, match=r"layers\.0\..* was already swapped with max_rows=4"):
        native.swap_native_linears(model, max_rows=8)
    assert all(m.max_rows == 4 for m in model.modules() if isinstance(m, NativeLinear))


@needs_kernels
def test_int8_with_minus_128_takes_the_q8a_kernel():
    """Flipping the top bit makes every int8 value unsigned, -128 included."""
    module = Int8Linear.from_float(nn.Linear(64, 16, bias=False).bfloat16())
    with torch.no_grad():
        module.weight[3, 5] = -128
    fast = native._native_version(module, 16, int8_activations=True)
    x = randn(2, 64, seed=0).bfloat16()
    w = module.weight.float() * module.scales.float()[:, None]
    xd = quantized_x(x)
    assert_within(fast(x), F.linear(xd, w), F.linear(xd.abs(), w.abs()), 64)


@needs_kernels
@pytest.mark.parametrize("kind", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_a_q8a_model_stays_close_to_float32(kind):
    """The swapped model with int8 activations against the same quantized weights computed in float32:
    within 3x the distance of the plain bf16 model (these random models, weights normal(0, 0.3), amplify
    every rounding: seen 2.0-2.2x, since rounding to 1/254 of a block's largest value costs small
    values more than bf16's 2^-9 of their own size)."""
    mode, group_size = kind
    plain = kernels.optimize(quantize_model(random_model(), mode, group_size), fuse_qkv=False, fuse_gate_up=False,
                             native=False)  # fmt: skip
    fast = copy.deepcopy(plain)
    assert native.swap_native_linears(fast, int8_activations=True)
    exact = copy.deepcopy(plain).float()
    with torch.no_grad():
        logits, expected, reference = (decode_logits(m, TOKENS, 5).float() for m in (fast, plain, exact))
    plain_error = (expected - reference).abs().max()
    assert (logits - reference).abs().max() <= 3 * plain_error
    assert (logits - expected).abs().max() > 0  # the activations were quantized: not the exact kernels' output


@needs_kernels
def test_q8a_decoding_rows_equal_single_rows():
    """A batch of 3 decoding rows gives each row what it gets decoded alone (the quantization is per
    row, and each output sums one row)."""
    model = kernels.optimize(quantize_model(random_model(), "int8", 32), int8_activations=True)
    prompts = [[1, 5, 9, 2, 33, 4], [7, 8], [30, 31, 32]]
    together = llama.generate(model, prompts, 8, temperature=0, stop_tokens=[])
    alone = [llama.generate(model, [p], 8, temperature=0, stop_tokens=[])[0] for p in prompts]
    assert together == alone


@needs_kernels
def test_gguf_q8_0_modules_take_the_q8a_kernel():
    module = Int8BlockLinear(64, 8)
    with torch.no_grad():
        module.weight.copy_(torch.randint(-127, 128, (8, 64), dtype=torch.int8))
        module.scales.copy_((torch.rand(8, 2) / 50).half())
    fast = native._native_version(module, 16, int8_activations=True)
    assert isinstance(fast, NativeInt8BlockLinear) and fast.int8_activations
    x = randn(3, 64, seed=1).bfloat16()
    w = module.weight.float() * module.scales.float().repeat_interleave(32, dim=1)
    xd = quantized_x(x)
    assert_within(fast(x), F.linear(xd, w), F.linear(xd.abs(), w.abs()), 64)


@needs_kernels
def test_a_q8a_block_compiles_as_one_graph():
    """The q8a operators have fake implementations: a compiled decoding step calls them and gives the
    eager tokens."""
    model = kernels.optimize(quantize_model(random_model(), "int4", 32), fuse_qkv=False, fuse_gate_up=False,
                             int8_activations=True)  # fmt: skip
    prompts = [[1, 5, 9, 2, 33, 4], [7, 8]]
    expected = llama.generate(model, prompts, 8, temperature=0, stop_tokens=[])
    torch._dynamo.reset()
    assert llama.generate(model, prompts, 8, temperature=0, stop_tokens=[], compile=True) == expected


def test_activation_quality_script_errors(tmp_path):
    """scripts/activation_quality.py: a missing checkpoint or text file is `error: ...` and exit 2."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "scripts" / "activation_quality.py"
    kjv = Path(__file__).parents[1] / "weights" / "kjv"
    for argv, message in ((["--checkpoint", str(tmp_path / "none"), "--text-file", str(tmp_path / "t")], "none"),
                          (["--checkpoint", str(kjv), "--text-file", str(tmp_path / "missing.txt")], "missing.txt")):
        result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr

"""Hand-written C++ matrix-vector kernels for CPU decoding, swapped in for the model's linears.

    import kernels
    model = kernels.optimize(model)                  # native=True by default: swaps where it can
    kernels.native.swap_native_linears(model)        # or only this swap
    kernels.native.available(), kernels.native.build_error(), kernels.native.isa()
    python -c "from kernels import native; native.bench()"     # GB/s, torch's path against these

Why: decoding one token (or a few: a batch, or the candidates of speculative decoding) multiplies
x: (M, K) with M small by every weight matrix W: (N, K) once. Each weight is used M times after it
is read, so the speed is the speed at which the CPU streams the weights from memory (or, with
int8 / int4 weights, at which it widens them). The kernels in kernels/csrc/ read W once, front to
back, split across torch's intra-op threads, and use every loaded piece of W for all M rows.

Shapes: M = rows of x (tokens in the step; x.numel() / K), K = in_features, N = out_features,
G = int4 group size. All three compute y = x @ W.T in float32 and round y once to bfloat16:

    gemv_bf16(x, weight)               weight (N, K) bfloat16: nn.Linear's own
    gemv_int8(x, weight, scales)       weight (N, K) int8, scales (N,): Int8Linear's own buffers
    gemv_int4(x, packed, N, K, G)      packed = pack_int4(weight, scales_and_zeros, G), made once
                                       from Int4Linear's buffers (the layout: kernels/csrc/gemv_int4.cpp)
    gemv_q8_0(x, weight, scales)       weight (N, K) int8, scales (N, K/32) float16: GGUF's Q8_0 as
                                       Int8BlockLinear holds it (no AMX version: vdpbf16ps for any M)

x is bfloat16 (M, K) on the CPU, any M (or (..., K): the leading dimensions are flattened in C++, and
y comes back as (..., N)); K need not be a multiple of anything (int4: of G, as
Int4Linear requires). These three never quantize the activations: int8 and int4 values are widened
to the bfloat16 numbers they are (exactly) and multiplied with x as it is. The C++ files say which
PyTorch expression each kernel mirrors and how the registers are used. Three builds, chosen by
the CPU: AVX-512 with bfloat16 dot products (vdpbf16ps) for one row of x, AMX tiles for two rows
and more (where the CPU and Linux allow them), and plain loops for any other CPU.

Quantized activations (gemv_int8_q8a, gemv_q8_0_q8a, gemv_int4_q8a; same arguments as the three
above). The fastest CPU engines multiply int8 or int4 weights by int8 activations with integer dot
products (AVX512-VNNI vpdpbusd: 64 byte products per instruction, where vdpbf16ps does 32 and the
weights must first be widened). These kernels quantize each row of x per block of 32 values, as
llama.cpp does (scale = the block's largest magnitude / 127, values rounded half to even:
quantize_activations_reference is the same in PyTorch, which the tests compare against), then sum integer products
exactly and apply the scales in float32 (kernels/csrc/gemv_q8a.cpp). The cost is a rounding of x:
at most half a step (1/254 of the block's largest value) per value. Where the CPU has VNNI
(has_vnni()), swap_native_linears uses them by default for int8, Q8_0 and int4 weights
(int8_activations=None); int8_activations=False keeps the exact-activation kernels, True asks for
them on any CPU (elsewhere they are plain loops: correct, slow). README "Quantization" gives the
perplexity and greedy agreement of both on the bundled model.

Build: the first call of anything here compiles kernels/csrc/ with torch.utils.cpp_extension.load
(needs a C++ compiler and ninja: `pip install ninja`, or the `fast` extra) for the machine it runs
on (-march=native), saying so in one line on stderr first. That takes about a minute once; the
result is cached under torch's extension directory (TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions) in a folder named after what the build depends on (the kind of CPU,
the sources' contents, the flags, torch and Python): every checkout and installed copy of the
project on the machine loads that one build, and a new one is made only when one of those changes.
If the build fails, available() is False, build_error() says why, a warning is given once, and
swap_native_linears changes nothing: the model keeps running on PyTorch.

The swapped modules (NativeLinear, NativeInt8Linear, NativeInt4Linear, NativeInt8BlockLinear)
subclass the modules they replace, share their weights (no copy; a tied `output` stays tied to the
embedding) and keep their state-dict names. Their forward calls the kernel when x is a bfloat16 CPU
tensor of at most max_rows rows (MAX_ROWS: where the kernel stops being faster than the module it
replaced) and autograd is not recording; otherwise the replaced module's own computation runs: long
prefills (matrix-matrix work that oneDNN does better), float32 models, other devices, training.
max_rows = 0 turns a module's kernel off.

Memory: none extra for bf16 and int8. int4 keeps its own packed copy (the size of the int4
weights plus their scales) instead of the one torch's int4 kernel makes on first use; with the
default max_rows the swapped module never asks for torch's copy (above 256 rows Int4Linear
dequantizes instead), so the two do not coexist.

torch.compile: the operators have fake (shape-only) implementations, so a model that calls them
traces into one graph (fullgraph=True) and calls the C++ kernels from it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama.core.checkpoint import release_freed_memory
from llama.core.device import model_device, model_dtype
from llama.core.model import RMSNorm
from llama.quantization import Int4Linear, Int8BlockLinear, Int8Linear
from llama.quantization.linear import dequantize_int4, pack_nibbles, quantize_int4

from .fused import FastAttention, FusedFeedForward, rope_
from .support import check_supported

__all__ = [
    "MAX_ROWS",
    "NativeAttention",
    "NativeInt4Linear",
    "NativeInt8BlockLinear",
    "NativeInt8Linear",
    "NativeFeedForward",
    "NativeLinear",
    "NativeRMSNorm",
    "available",
    "bench",
    "build_error",
    "decode_attention",
    "gemv_bf16",
    "gemv_int4",
    "gemv_int8",
    "gemv_q8_0",
    "has_vnni",
    "isa",
    "pack_int4",
    "rms_norm",
    "rope",
    "silu_mul",
    "swap_native_attention",
    "swap_native_linears",
    "swap_native_elementwise",
]

# Rows of x up to which a swapped module calls its kernel; above, the module it replaced does the
# work. Measured against that module (2048 x 2048 weights, one thread of a 2-core Sapphire Rapids
# VM): bf16 about even with F.linear (oneDNN) at 32 rows; int8 2x faster than Int8Linear at 64
# rows (torch's int8 kernel to 32 rows, dequantize + matmul above), even between 128 and 256; int4
# 2.7x faster than Int4Linear at 256 rows (its dequantization alone takes ~10 ms), 1.3x at 512.
# q8_0: 4x faster than Int8BlockLinear's dequantize + matmul at 128 rows (8192 x 2048, 2 threads).
# int8 again on a 2-core AMD Zen 5 VM (AVX512-VNNI, no AMX; 8192 x 2048, one thread, after the
# kernels learnt to prefetch): Int8Linear 38 / 41 / 51 ms at 64 / 128 / 256 rows, the exact kernel
# 7.7 / 15 / 31, the q8a kernel 9.8 / 19 / 43: hence 256.
MAX_ROWS = {"bf16": 16, "int8": 256, "int4": 256, "q8_0": 256}
SOURCES = ("ops.cpp", "gemv_bf16.cpp", "gemv_int8.cpp", "gemv_int4.cpp", "gemv_q8a.cpp", "decode_attention.cpp",
           "elementwise.cpp")
HEADERS = ("common.h",)  # included by the sources: part of what a build depends on
CSRC = Path(__file__).parent / "csrc"

_build: dict = {}  # "ok": bool, "error": str | None, once the build has been tried in this process


def _cpu_tag() -> str:
    """A short hash of this CPU's model and features: the build is for one kind of CPU (-march=native),
    so a home directory shared between machines gets one build per kind."""
    text = platform.machine() + platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _build_directory(name: str, cflags: list[str]) -> Path:
    """Where the build of `name` with `cflags` lives: a folder keyed by everything the library depends
    on, so any copy of these sources on this machine (another checkout, a pip-installed package)
    finds it, and a change to any of them gets a fresh folder rather than a rebuild over another
    copy's build."""
    key = hashlib.sha1()
    for part in (name, *cflags, torch.__version__, sys.version, platform.platform()):
        key.update(part.encode() + b"\0")
    for source in (*SOURCES, *HEADERS):
        key.update((CSRC / source).read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"{name}-{key.hexdigest()[:12]}"


def _compile(generic: bool = False) -> None:
    """Build (or find the cached build of) kernels/csrc/ and load it, which registers its operators:
    torch.ops.llama_kernels.*, or with generic=True the plain-loop build as torch.ops.llama_kernels_generic.*
    (for the tests). Raises whatever the build raises."""
    name = f"llama_kernels{'_generic' if generic else ''}_{_cpu_tag()}"
    variant = ["-DLLAMA_KERNELS_GENERIC", "-DLLAMA_KERNELS_NS=llama_kernels_generic"] if generic else []
    # -fopenmp: at::parallel_for is inline OpenMP. -ffp-contract=off: a * b + c stays two roundings
    # unless a kernel asks for a multiply-add, so elementwise.cpp gives PyTorch's bits.
    cflags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", *variant]
    directory = _build_directory(name, cflags)
    library, built = directory / f"{name}.so", directory / "built"
    if built.is_file() and library.is_file():  # "built" is written after the library is complete
        torch.ops.load_library(str(library))
        return
    print(f"[kernels: compiling the native CPU kernels for this machine, once (about a minute); "
          f"cached in {directory}]", file=sys.stderr, flush=True)  # fmt: skip
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=cflags,
                       extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                       verbose=False)  # fmt: skip
    built.write_text(f"built in {time.perf_counter() - started:.0f} s\n")


def _load() -> bool:
    """Build and load the kernels once per process; True when the operators exist."""
    if "ok" in _build:
        return _build["ok"]
    try:
        _compile()
        _register_fakes()
        _build.update(ok=True, error=None)
    except Exception as e:  # noqa: BLE001 -- any failure (no compiler, no ninja, a compile error) means fall back
        _build.update(ok=False, error=f"{type(e).__name__}: {e}")
        lines = _build["error"].splitlines()  # the whole build log: the warning shows its telling lines
        telling = [line for line in lines[1:] if "error:" in line or "not found" in line][:3]
        short = "\n".join(line[:200] for line in lines[:1] + telling)
        warnings.warn(f"kernels.native: the C++ kernels could not be built, PyTorch's are used "
                      f"(kernels.native.build_error() has the whole message): {short}",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
    return _build["ok"]


def available() -> bool:
    """Whether the C++ kernels are built and loaded (builds them on the first call)."""
    return _load()


def build_error() -> str | None:
    """Why the build failed, or None (builds on the first call)."""
    _load()
    return _build["error"]


def isa() -> str:
    """Which build is loaded: "avx512_bf16+amx", "avx512_bf16" (no AMX, or Linux refused it) or "generic"."""
    if not _load():
        raise RuntimeError(f"the C++ kernels are not available: {_build['error']}")
    return torch.ops.llama_kernels.isa()


def has_vnni() -> bool:
    """Whether the loaded build multiplies int8 activations with AVX512-VNNI (the q8a kernels' fast path)."""
    _require()
    return bool(torch.ops.llama_kernels.has_vnni())


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the q8a kernels do to x (M, K) before multiplying, in PyTorch: (xq (M, B, 32) int8 values
    as float32, d (M, B, 1) float32) with B = ceil(K / 32) blocks (zeros past K), x ~ (xq * d)[:, :K]."""
    M, K = x.shape
    blocks = F.pad(x.float(), (0, (-K) % 32)).view(M, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inverse).clamp(-127, 127), d


def _register_fakes() -> None:
    """Shape-only versions of the operators, for torch.compile's tracing (FakeTensors, no data)."""

    @torch.library.register_fake("llama_kernels::gemv_bf16")
    def _(x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def int8(x, weight, scales):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    for name in ("gemv_int8", "gemv_q8_0", "gemv_int8_q8a", "gemv_q8_0_q8a"):
        torch.library.register_fake(f"llama_kernels::{name}")(int8)

    @torch.library.register_fake("llama_kernels::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    def int4(x, packed, out_features, in_features, group_size):
        return x.new_empty(*x.shape[:-1], out_features)

    for name in ("gemv_int4", "gemv_int4_q8a"):
        torch.library.register_fake(f"llama_kernels::{name}")(int4)

    @torch.library.register_fake("llama_kernels::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("llama_kernels::silu_mul")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llama_kernels::rope_")
    def _(x, cos, sin):
        return None

    @torch.library.register_fake("llama_kernels::pack_int4")
    def _(weight, scales_and_zeros, group_size):
        raise NotImplementedError("pack_int4 runs once, eagerly, when a layer is swapped")


# ---- the operators -----------------------------------------------------------------------------------


def _require() -> None:
    if not _load():
        raise RuntimeError(f"the C++ kernels are not available: {_build['error']}")


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16, weight (N, K) bf16 -> x @ weight.T (M, N) bf16, summed in float32."""
    _require()
    return torch.ops.llama_kernels.gemv_bf16(x, weight)


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16, weight (N, K) int8, scales (N,) float32/bf16 -> x @ (weight * scales[:, None]).T, bf16."""
    _require()
    return torch.ops.llama_kernels.gemv_int8(x, weight, scales)


def gemv_int8_q8a(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gemv_int8 with x quantized per block of 32 first (see "Quantized activations" above)."""
    _require()
    return torch.ops.llama_kernels.gemv_int8_q8a(x, weight, scales)


def gemv_q8_0_q8a(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gemv_q8_0 with x quantized per block of 32 first."""
    _require()
    return torch.ops.llama_kernels.gemv_q8_0_q8a(x, weight, scales)


def gemv_int4_q8a(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
                  group_size: int) -> torch.Tensor:  # fmt: skip
    """gemv_int4 with x quantized per block of 32 first (the group sums of x stay exact)."""
    _require()
    return torch.ops.llama_kernels.gemv_int4_q8a(x, packed, out_features, in_features, group_size)


def gemv_q8_0(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16, weight (N, K) int8, scales (N, K/32) float16 -> x @ W.T with W = weight * scales
    per block of 32 (GGUF's Q8_0), summed in float32, (M, N) bf16."""
    _require()
    return torch.ops.llama_kernels.gemv_q8_0(x, weight, scales)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per sequence: q (B, H, 1, hd), k, v (B, Hkv, S, hd) bf16 (views of the
    cache are read in place), mask (B, 1, 1, S) bool -> (B, H, 1, hd) bf16, as
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True) computes it."""
    _require()
    return torch.ops.llama_kernels.decode_attention(q, k, v, mask, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) bf16, weight (D,) bf16 -> RMSNorm (llama/core/model.py) of x, (..., D) bf16, in one pass
    (kernels/csrc/elementwise.cpp)."""
    _require()
    return torch.ops.llama_kernels.rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kernels/fused.py's rope_ in one pass: x (B, T, n, hd) bf16 (hd contiguous) rotated in place by
    cos, sin (B, T, hd/2) float32; returns x."""
    _require()
    torch.ops.llama_kernels.rope_(x, cos, sin)
    return x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for bf16 gate, up (..., F) of one shape (views, such as the halves of the fused
    gate/up output, are read in place), in one pass; (..., F) bf16."""
    _require()
    return torch.ops.llama_kernels.silu_mul(gate, up)


def pack_int4(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4Linear's weight (N, K/2) uint8 and scales_and_zeros (K/G, N, 2) -> gemv_int4's packing (1-D uint8)."""
    _require()
    return torch.ops.llama_kernels.pack_int4(weight, scales_and_zeros.to(torch.bfloat16), group_size)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, out_features: int, in_features: int,
              group_size: int) -> torch.Tensor:  # fmt: skip
    """x (M, K) bf16 @ the dequantized int4 weight .T -> (M, N) bf16; packed from pack_int4."""
    _require()
    return torch.ops.llama_kernels.gemv_int4(x, packed, out_features, in_features, group_size)


# ---- the swapped modules -----------------------------------------------------------------------------


def _bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.is_cpu and t.dtype == torch.bfloat16 for t in tensors)


def _no_autograd(*tensors: torch.Tensor) -> bool:
    """Whether autograd records none of `tensors` (the kernels have no backward)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _takes_kernel(x: torch.Tensor, K: int, max_rows: int, weight: torch.Tensor) -> bool:
    """The kernel's conditions (see the module docstring); weight: the tensor whose grad matters."""
    return _bf16_cpu(x) and 0 < x.numel() <= max_rows * K and _no_autograd(x, weight)


class NativeLinear(nn.Linear):
    """A bias-free bf16 nn.Linear whose decode-sized calls go to gemv_bf16; shares the original's weight."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_ROWS["bf16"]):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter (a tied output stays tied)
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _bf16_cpu(w) and _takes_kernel(x, w.shape[1], self.max_rows, w):
            return torch.ops.llama_kernels.gemv_bf16(x, w)  # (..., K) -> (..., N)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, native max_rows={self.max_rows}"


def _activations(int8_activations: bool) -> str:
    return f", activations {'int8' if int8_activations else 'bf16'}"


class NativeInt8Linear(Int8Linear):
    """Int8Linear whose decode-sized calls go to gemv_int8 (gemv_int8_q8a with int8_activations);
    shares the original's weight and scales."""

    def __init__(self, module: Int8Linear, max_rows: int = MAX_ROWS["int8"], int8_activations: bool = False):
        super().__init__(module.in_features, module.out_features, module.scales.dtype, device="meta")
        self.weight, self.scales = module.weight, module.scales  # the same tensors
        self.use_kernel = module.use_kernel  # for the fallback: Int8Linear.forward
        self.max_rows, self.int8_activations = max_rows, int8_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cpu" and _takes_kernel(x, self.in_features, self.max_rows, self.scales):
            op = torch.ops.llama_kernels.gemv_int8_q8a if self.int8_activations else torch.ops.llama_kernels.gemv_int8
            return op(x, self.weight, self.scales)  # (..., K) -> (..., N)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, native max_rows={self.max_rows}{_activations(self.int8_activations)}"


class NativeInt8BlockLinear(Int8BlockLinear):
    """Int8BlockLinear (GGUF's Q8_0) whose decode-sized calls go to gemv_q8_0 (gemv_q8_0_q8a with
    int8_activations); shares the original's weight and scales."""

    def __init__(self, module: Int8BlockLinear, max_rows: int = MAX_ROWS["q8_0"], int8_activations: bool = False):
        super().__init__(module.in_features, module.out_features, device="meta")
        self.weight, self.scales = module.weight, module.scales  # the same tensors
        self.max_rows, self.int8_activations = max_rows, int8_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type == "cpu" and _takes_kernel(x, self.in_features, self.max_rows, self.weight):
            op = torch.ops.llama_kernels.gemv_q8_0_q8a if self.int8_activations else torch.ops.llama_kernels.gemv_q8_0
            return op(x, self.weight, self.scales)  # (..., K) -> (..., N)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, native max_rows={self.max_rows}{_activations(self.int8_activations)}"


class NativeInt4Linear(Int4Linear):
    """Int4Linear whose decode-sized calls go to gemv_int4, holding its weights once: in the kernel's
    packing (the buffer `packed`), made from the original's weight and scales_and_zeros, which are
    not kept. `weight` and `scales_and_zeros` read the Int4Linear buffers back from the packing
    (exactly: it holds every value and every bfloat16 scale and zero), for whatever asks for them;
    the state dict holds them under those names, as an Int4Linear's, and loading one (or
    load_weight) packs anew. The fallback (long prefills, other dtypes, other devices, gradients)
    dequantizes from the packing too, never through torch's own int4 kernel, whose packing would
    be a second copy."""

    def __init__(self, module: Int4Linear, max_rows: int = MAX_ROWS["int4"], int8_activations: bool = False):
        nn.Module.__init__(self)  # not Int4Linear's: its buffers would be the second copy
        self.in_features, self.out_features, self.group_size = module.in_features, module.out_features, module.group_size
        self.use_kernel = False  # the fallback dequantizes (Int4Linear.forward); see the class docstring
        self._packed = None
        self.max_rows, self.int8_activations = max_rows, int8_activations
        self.register_buffer("packed", pack_int4(module.weight, module.scales_and_zeros, self.group_size),
                             persistent=False)  # fmt: skip

    # ---- the Int4Linear buffers, read back from the packing (gemv_int4.cpp describes the layout) ----

    def _unpack(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows `rows` (n,), or all N -> (q (n, K) uint8 in 0..15, sz (n, K/G, 2) bfloat16)."""
        N, K, G = self.out_features, self.in_features, self.group_size
        records = self.packed.view(-1, K // G, 64 + 8 * G)  # (blocks of 16 rows, K/G, record)
        if rows is not None:
            records = records[rows // 16]  # (n, K/G, record): each row's block
        sz = records[..., :64].contiguous().view(torch.bfloat16).view(-1, K // G, 16, 2)  # row i's (s, z) at [:, :, i]
        quads = records[..., 64:].reshape(-1, K // G, G // 4, 16, 2)  # row i's bytes at [:, :, :, i]
        if rows is None:  # every row: rows to the front, (blocks, 16) -> N
            sz = sz.transpose(1, 2).reshape(-1, K // G, 2)[:N]
            quads = quads.permute(0, 3, 1, 2, 4).reshape(-1, K // G, G // 4, 2)[:N]
        else:
            n, i = torch.arange(rows.numel(), device=rows.device), rows % 16
            sz, quads = sz[n, :, i], quads[n, :, :, i]  # (n, K/G, 2), (n, K/G, G/4, 2)
        # byte t of a row in quad j holds k = 4j + t (low nibble) and 4j + 2 + t (high nibble)
        q = torch.cat([quads & 15, quads >> 4], dim=-1)  # (n, K/G, G/4, 4): k = 4j + 0, 1, 2, 3
        return q.view(-1, K), sz

    @property
    def weight(self) -> torch.Tensor:
        return pack_nibbles(self._unpack()[0])  # (N, K/2)

    @property
    def scales_and_zeros(self) -> torch.Tensor:
        return self._unpack()[1].transpose(0, 1).contiguous()  # (K/G, N, 2)

    def dequantize(self, dtype=None) -> torch.Tensor:
        q, sz = self._unpack()
        return dequantize_int4(q, sz, self.group_size, dtype or torch.bfloat16)

    def dequantize_rows(self, index: torch.Tensor, dtype=None) -> torch.Tensor:
        q, sz = self._unpack(index.reshape(-1))
        return dequantize_int4(q, sz, self.group_size, dtype or torch.bfloat16).view(*index.shape, self.in_features)

    def load_weight(self, w: torch.Tensor) -> None:
        q, sz = quantize_int4(w, self.group_size)
        self.packed = pack_int4(pack_nibbles(q), sz, self.group_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        destination[prefix + "scales_and_zeros"] = self.scales_and_zeros

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        names = (prefix + "weight", prefix + "scales_and_zeros")
        missing = [name for name in names if name not in state_dict]
        missing_keys.extend(missing)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in names
                                   and "." not in k[len(prefix):])  # fmt: skip
        if missing:
            return
        weight, sz = (state_dict[name] for name in names)
        N, K, G = self.out_features, self.in_features, self.group_size
        if tuple(weight.shape) != (N, K // 2) or tuple(sz.shape) != (K // G, N, 2):
            error_msgs.append(f"{prefix}: weight {list(weight.shape)} / scales_and_zeros {list(sz.shape)} do not fit "
                              f"an int4 layer of {N} x {K}, group size {G}")  # fmt: skip
            return
        self.packed = pack_int4(weight.to(self.packed.device), sz.to(self.packed.device), G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        if self.packed.device.type == "cpu" and _takes_kernel(x, K, self.max_rows, self.packed):
            op = torch.ops.llama_kernels.gemv_int4_q8a if self.int8_activations else torch.ops.llama_kernels.gemv_int4
            return op(x, self.packed, N, K, self.group_size)  # (..., K) -> (..., N)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, native max_rows={self.max_rows}{_activations(self.int8_activations)}"


class NativeAttention(FastAttention):
    """FastAttention (with sdpa) whose decoding steps attend through decode_attention: one query per
    sequence, bf16 on the CPU, nothing recorded, autograd off. Every other call (prefill, float32,
    other devices, training, recording) runs FastAttention.attend. Takes over the FastAttention's
    modules and settings (its weights are shared, not copied)."""

    def __init__(self, attention: FastAttention):
        if not attention.sdpa:
            raise ValueError("NativeAttention computes what SDPA does; this FastAttention has sdpa=False")
        nn.Module.__init__(self)
        for name, value in vars(attention).items():  # settings: layer, heads, window, rope, fused_qkv, ...
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, module in attention._modules.items():
            setattr(self, name, module)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        """q: (B, H, T, hd), k, v: (B, Hkv, S, hd) -> (B, H, T, hd)."""
        if q.shape[2] == 1 and _bf16_cpu(q, k, v) and ctx.recorder is None and _no_autograd(q):
            return torch.ops.llama_kernels.decode_attention(q, k, v, ctx.mask(self.window), self.head_dim**-0.5)
        return super().attend(q, k, v, ctx)

    def rotate(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """In-place RoPE (FastAttention's rope_) in one C++ pass for a bf16 CPU x, no autograd."""
        if (self.rope is rope_ and _bf16_cpu(x) and x.stride(-1) == 1 and ctx.cos.dtype == torch.float32
                and _no_autograd(x)):  # fmt: skip
            torch.ops.llama_kernels.rope_(x, ctx.cos, ctx.sin)
            return x
        return super().rotate(x, ctx)


class NativeRMSNorm(RMSNorm):
    """RMSNorm in one C++ pass (rms_norm) for bf16 x and weight on the CPU, autograd off; otherwise
    RMSNorm's own forward. Shares the original's weight."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if _bf16_cpu(x, w) and _no_autograd(x, w):
            return torch.ops.llama_kernels.rms_norm(x, w, self.eps)
        return super().forward(x)


class NativeFeedForward(FusedFeedForward):
    """FusedFeedForward whose gating (FeedForward.activate: silu(gate) * up) runs in one C++ pass
    (silu_mul) for bf16 CPU inputs, autograd off; otherwise the inherited step. Takes over the
    FusedFeedForward's modules (its weights are shared, not copied)."""

    def __init__(self, ffn: FusedFeedForward):
        nn.Module.__init__(self)
        self.hidden_dim = ffn.hidden_dim
        self.w13, self.w2 = ffn.w13, ffn.w2

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if _bf16_cpu(gate, up) and _no_autograd(gate, up):
            return torch.ops.llama_kernels.silu_mul(gate, up)
        return super().activate(gate, up)


NATIVE_MODULES = (NativeLinear, NativeInt8Linear, NativeInt4Linear, NativeInt8BlockLinear, NativeAttention,
                  NativeRMSNorm, NativeFeedForward)


def _swap_modules(model: nn.Module, swaps: dict[type, type], accept=lambda module: True) -> list[str]:
    """Replace, in place, every child module of a type in `swaps` (that `accept` takes) by swaps[type](child),
    when the model's weights are bfloat16 on the CPU and the kernels build; returns the names replaced."""
    check_supported(model, "kernels.native", (FastAttention, FusedFeedForward, *NATIVE_MODULES))
    found = [(p, n, c) for p in model.modules() for n, c in p.named_children() if type(c) in swaps and accept(c)]
    if not found or model_device(model).type != "cpu" or model_dtype(model) != torch.bfloat16 or not _load():
        return []
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, child in found:
        setattr(parent, name, swaps[type(child)](child))
    return [names[id(c)] for _, _, c in found]


def swap_native_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every FastAttention with SDPA on (kernels.optimize's, sdpa=True) by a
    NativeAttention, when the model's weights are bfloat16 on the CPU and the kernels build; returns
    the names replaced. Other attention modules stay as they are."""
    return _swap_modules(model, {FastAttention: NativeAttention}, lambda attention: attention.sdpa)


def swap_native_elementwise(model: nn.Module) -> list[str]:
    """Replace, in place, every RMSNorm by a NativeRMSNorm and every FusedFeedForward (kernels.optimize's,
    fuse_gate_up=True) by a NativeFeedForward, when the model's weights are bfloat16 on the CPU and the
    kernels build; returns the names replaced."""
    return _swap_modules(model, {RMSNorm: NativeRMSNorm, FusedFeedForward: NativeFeedForward})


def _native_version(module: nn.Module, max_rows: int | None = None, int8_activations: bool = False) -> nn.Module | None:
    """The swapped module for `module` (max_rows None: MAX_ROWS of its kind), or None when the
    kernels cannot serve it."""
    if type(module) is nn.Linear:
        w = module.weight
        if module.bias is None and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.stride(-1) == 1:
            return NativeLinear(module, MAX_ROWS["bf16"] if max_rows is None else max_rows)
    elif type(module) is Int8Linear:
        if module.weight.device.type == "cpu" and module.scales.dtype == torch.bfloat16:
            if not int8_activations and module.weight.numel() and module.weight.min() == -128:
                return None  # the widening kernel covers -127..127 (all that quantize_int8 makes)
            return NativeInt8Linear(module, MAX_ROWS["int8"] if max_rows is None else max_rows, int8_activations)
    elif type(module) is Int4Linear:
        if module.weight.device.type == "cpu" and module.scales_and_zeros.dtype == torch.bfloat16:
            return NativeInt4Linear(module, MAX_ROWS["int4"] if max_rows is None else max_rows, int8_activations)
    elif type(module) is Int8BlockLinear:
        if module.weight.device.type == "cpu":
            return NativeInt8BlockLinear(module, MAX_ROWS["q8_0"] if max_rows is None else max_rows, int8_activations)
    return None


def _candidates(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every bf16 CPU linear the kernels could serve."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.bfloat16:
                found.append((parent, name, child))
            elif type(child) in (Int8Linear, Int4Linear):
                scales = child.scales if type(child) is Int8Linear else child.scales_and_zeros
                if scales.dtype == torch.bfloat16:
                    found.append((parent, name, child))
            elif type(child) is Int8BlockLinear:  # fp16 scales whatever the model's dtype: x decides at run time
                found.append((parent, name, child))
    return [(p, n, c) for p, n, c in found if c.weight.device.type == "cpu"]


def swap_native_linears(model: nn.Module, max_rows: int | None = None,
                        int8_activations: bool | None = None) -> list[str]:  # fmt: skip
    """Replace, in place, every linear of `model` the kernels can serve; returns the names replaced.

    max_rows: the most rows of x a swapped module sends to its kernel (None: MAX_ROWS of its kind).
    int8_activations: int8, Q8_0 and int4 weights multiply x quantized to int8 per block of 32 (the
    q8a kernels, see the module docstring); None: where the CPU has AVX512-VNNI. bf16 weights never
    quantize x.

    Served: bias-free bfloat16 nn.Linear (wq.., the fused wqkv / w13 of kernels.optimize, output),
    Int8Linear and Int4Linear with bfloat16 scales (a bfloat16 model quantized by llama/quantization/),
    and Int8BlockLinear (GGUF's Q8_0; the kernel takes bfloat16 inputs), on the CPU. Other modules,
    and everything when the kernels cannot be built (a warning says why), stay as they are. Apply
    after kernels.optimize's fusions (fuse_linears takes only plain nn.Linear), which
    kernels.optimize(native=True) does. Swapping twice is harmless; asking the second time for other
    int8_activations or max_rows than the first swap chose raises ValueError.
    """
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    check_supported(model, "kernels.native", (FastAttention, FusedFeedForward, *NATIVE_MODULES))
    # A second swap leaves the first's modules as they are: a setting they do not have is refused, not ignored.
    for name, module in model.named_modules():
        if int8_activations is not None and isinstance(module, (NativeInt8Linear, NativeInt4Linear,
                                                                NativeInt8BlockLinear)) and \
                module.int8_activations != int8_activations:  # fmt: skip
            raise ValueError(f"{name} was already swapped with int8_activations={module.int8_activations}; "
                             f"swap a model that was not (e.g. a fresh load) to get {int8_activations}")
        if max_rows is not None and isinstance(module, (NativeLinear, NativeInt8Linear, NativeInt4Linear,
                                                        NativeInt8BlockLinear)) and module.max_rows != max_rows:  # fmt: skip
            raise ValueError(f"{name} was already swapped with max_rows={module.max_rows}; set its .max_rows, or "
                             f"swap a model that was not (e.g. a fresh load) to get {max_rows}")
    candidates = _candidates(model)
    if not candidates or not _load():  # build only when there is something to swap
        return []
    if int8_activations is None:
        int8_activations = has_vnni()
    names = {id(m): n for n, m in model.named_modules()}
    places: dict[int, list] = {}  # one swap per module, under every name it has (a tied table and output)
    for parent, name, child in candidates:
        places.setdefault(id(child), [child]).append((parent, name))
    del candidates
    swapped = []
    while places:  # popped one by one, so that a replaced module (NativeInt4Linear's int4 buffers) goes at once
        child, *where = places.popitem()[1]
        new = _native_version(child, max_rows, int8_activations)
        if new is not None:
            for parent, name in where:
                setattr(parent, name, new)
            swapped.append(names.get(id(child), where[0][1]))
        repacked = isinstance(new, NativeInt4Linear)
        del child, new, where
        if repacked:  # hand the pages of the int4 buffers back before the next packing asks for more
            release_freed_memory()
    return swapped


# ---- benchmark -----------------------------------------------------------------------------------------

BENCH_SHAPES = ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048))  # (N, K): Llama 3.2 1B


def _time(fn, inputs: list, min_seconds: float) -> float:
    """Best seconds per call over 3 rounds; each round cycles through `inputs` (copies of the weights
    larger than the caches together, so every call reads its weights from memory, as in decoding)."""
    for item in inputs:  # warm up (torch's int4 kernel packs its weights on the first call)
        fn(item)
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            for item in inputs:
                fn(item)
            calls += len(inputs)
        best = min(best, elapsed / calls)
    return best


def bench(shapes=BENCH_SHAPES, rows=(1, 8), formats=("bf16", "int8", "int4-g32", "int4-g128"),
          min_seconds: float = 0.3, cache_bytes: int = 512 << 20) -> list[dict]:  # fmt: skip
    """Print and return GB/s of weight bytes (the layer's weight tensors incl. scales, / seconds per
    call) of torch's path (F.linear, Int8Linear / Int4Linear with torch's packed kernels) and of the
    kernels here, for x: (M, K) bfloat16. Uses torch's current thread count."""
    _require()
    print(f"kernels.native ({isa()}), {torch.get_num_threads()} threads; GB/s of weight bytes read per call")
    print(f"{'format':>9} {'N':>7} {'K':>5} {'M':>3} {'MB':>7} {'torch':>7} {'native':>7} {'speed-up':>8}")
    results = []
    generator = torch.Generator().manual_seed(0)
    for fmt in formats:
        for N, K in shapes:
            w = (torch.randn(N, K, generator=generator) * 0.02).to(torch.bfloat16)
            linear = nn.Linear(K, N, bias=False, device="meta")
            linear.weight = nn.Parameter(w, requires_grad=False)
            if fmt == "bf16":
                plain = linear
            elif fmt == "int8":
                plain = Int8Linear.from_float(linear)
            else:
                plain = Int4Linear.from_float(linear, group_size=int(fmt.removeprefix("int4-g")))
            del linear, w
            nbytes = sum(t.nbytes for t in plain.state_dict().values())
            copies = max(1, -(-cache_bytes // nbytes))
            plains = [plain] + [_copy_module(plain) for _ in range(copies - 1)]
            natives = [_native_version(p, max_rows=1 << 30) for p in plains]
            for M in rows:
                x = torch.randn(M, K, generator=generator).to(torch.bfloat16)
                with torch.inference_mode():
                    t_torch = _time(lambda m: m(x), plains, min_seconds)
                    t_native = _time(lambda m: m(x), natives, min_seconds)
                row = dict(format=fmt, N=N, K=K, M=M, bytes=nbytes, torch=nbytes / t_torch / 1e9,
                           native=nbytes / t_native / 1e9)  # fmt: skip
                results.append(row)
                print(f"{fmt:>9} {N:>7} {K:>5} {M:>3} {nbytes / 1e6:>7.1f} {row['torch']:>7.1f} {row['native']:>7.1f} "
                      f"{row['native'] / row['torch']:>7.1f}x", flush=True)  # fmt: skip
            del plains, natives, plain
    return results


def _copy_module(module: nn.Module) -> nn.Module:
    """A copy with its own weight storage (a distinct memory region for the benchmark)."""
    new = copy.deepcopy(module)
    if isinstance(new, Int4Linear):
        new._packed = None  # torch's int4 packing is made again for the copy on first use
    return new


if __name__ == "__main__":
    bench()

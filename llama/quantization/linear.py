"""Weight-only quantization: int8 per output channel, int4 in groups.

    model = llama.load(path, dtype="bfloat16", quantize="int8")      # quantize while loading
    quantize_model(model, "int4", group_size=128)                    # or an already loaded model
    save_quantized(model, "out/", tokenizer_from=path)               # quantize once ...
    model = llama.load("out/")                                       # ... load the small file later

Like gpt-fast, the model file never learns about this: quantize_model swaps the nn.Linear modules
of the transformer blocks for Int8Linear / Int4Linear modules with the same forward signature.
Activations stay in the model's dtype; only the weights are stored in fewer bits and widened (or
consumed directly by a packed-weight kernel) at matmul time.

Shapes: N = out_features, K = in_features, G = group_size, x: (..., K) -> (..., N).

int8 (symmetric, per output channel):
    scale[n] = max_k |W[n, k]| / 127,  q[n, k] = round(W[n, k] / scale[n]) in [-127, 127]
    W ~ q * scale[:, None]
int4 (asymmetric, per group of G consecutive inputs of one output row; the layout torch's
_weight_int4pack_mm kernels expect, as in gpt-fast and torchao):
    scale = (max - min) / 15,  zero = min + 8 * scale,  q = round((W - min) / scale) in [0, 15]
    W ~ (q - 8) * scale + zero

Fast paths (CPU): torch.ops.aten._weight_int8pack_mm and _weight_int4pack_mm_for_cpu. Measured on
an x86 CPU (torch 2.13) they win only for bfloat16 activations with few rows (decoding): at 4 rows x
2048 x 2048 about 4x (int8) and 16x (int4) faster than dequantize + matmul, but slower from ~64 rows
(prefill) and 3-30x slower in float32 and float16. So `use_kernel = None` (the default) takes them
for bfloat16 inputs of at most KERNEL_MAX_ROWS rows, True takes them whenever they exist (CPU,
float32/bfloat16/float16), False never. Otherwise a pure-PyTorch fallback dequantizes the weight and
calls F.linear. The two are tested against each other. CUDA runs the fallback (torch's CUDA int4
kernel wants another packing; not wired up).

Which layers: every nn.Linear inside the blocks, found by type (wq wk wv wo w1 w2 w3 in Llama), and the `output` projection unless
include_output=False (gpt-fast and llama.cpp quantize it too). It is the largest single matrix of a
small model (Llama 3.2 1B: 128256 x 2048, a fifth of all weights) and is read in full for every
token. When it is tied to the embedding (Llama 3.2), quantizing it makes a quantized copy: the
embedding keeps the float table for its lookups (one row per token), so memory grows by the copy
(int8: +0.26 GB for the 1B model) while each decoded token reads 2x (int8) or ~4x (int4) fewer bytes
of it. The embedding and the norms always stay in float. For int4, a layer whose K is not a
multiple of G stays unquantized.

A quantized checkpoint is config.json (the HF config plus a "quantization" entry: mode, group_size,
include_output) and model.safetensors holding the modules' state dicts in Meta's names and row order
(e.g. layers.0.attention.wq.weight int8 + layers.0.attention.wq.scales). It is this project's own
format: transformers cannot read it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.cache import QuantizedLayerCache
from ..core.model import (Attention, FeedForward, GeluFeedForward, KVCache, LayerCache, RMSNorm, Transformer,
                          TransformerBlock)  # fmt: skip
from ..core.support import UnsupportedModelError, check_supported

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CPU kernels accept
KERNEL_MAX_ROWS = 32  # above this, dequantize + float matmul is faster (see the module docstring)


def _take_kernel(use_kernel: bool | None, x2: torch.Tensor) -> bool:
    """Whether to call the packed CPU kernel for x2: (M, K); see the module docstring."""
    if x2.device.type != "cpu" or x2.dtype not in KERNEL_DTYPES:
        return False
    if use_kernel is None:
        return x2.dtype == torch.bfloat16 and x2.shape[0] <= KERNEL_MAX_ROWS
    return use_kernel


def check_mode(mode: str, group_size: int = 128) -> None:
    """ValueError naming the valid choices when mode or group_size is not one of them."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")


# ---- gradients through a quantized layer (QLoRA) ---------------------------------------------------


class QuantizedMatmul(torch.autograd.Function):
    """y = module(x) for an Int8Linear / Int4Linear, differentiable in x only.

    QLoRA (Dettmers et al., 2023) trains adapters on top of a frozen quantized base, so gradients must
    flow *through* the base layers to the input (dL/dx = dL/dy @ W) while the weight gets none. Left
    to autograd, y = F.linear(x, dequantized W) would keep the float W of every layer alive from the
    forward to the backward pass: the whole base in float again. Here the forward keeps only the
    module, and the backward dequantizes its weight once more, so the float copy of a layer exists
    only while that layer computes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        return module(x)  # autograd is off inside forward: the plain (kernel or dequantize) path

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w = ctx.module.dequantize(grad_y.dtype)  # (N, K)
        return (grad_y @ w).to(ctx.x_dtype), None  # (..., N) @ (N, K) -> (..., K)


# ---- int8 ----------------------------------------------------------------------------------------


CHUNK = 1 << 22  # weights quantized at a time: float32 temporaries stay ~16 MB each, not 4 bytes x N x K


def _row_chunks(w: torch.Tensor):
    """Slices of whole rows of w: (N, K) holding about CHUNK elements each."""
    rows = max(1, CHUNK // max(1, w.shape[1]))
    return [slice(i, i + rows) for i in range(0, w.shape[0], rows)]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> (q: (N, K) int8, scales: (N,) float32), w ~ q * scales[:, None]."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows in _row_chunks(w):
        chunk = w[rows].float()
        scales[rows] = (chunk.abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row gets q = 0
        q[rows] = torch.round(chunk / scales[rows, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T with weight: (N, K) int8 and scales: (N,)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_kernel: bool | None = None  # None: where faster; True: where available; False: never
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype=None) -> "Int8Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, dtype or w.dtype, w.device)
        module.load_weight(w)
        return module

    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize w: (N, K) float into this module's buffers, on w's device."""
        q, scales = quantize_int8(w)
        self.weight, self.scales = q, scales.to(self.scales.dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The (N, K) weight the int8 values stand for."""
        dtype = dtype or self.scales.dtype
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantize_rows(self, index: torch.Tensor, dtype=None) -> torch.Tensor:
        """Rows `index` (any shape) of dequantize(dtype): (*index.shape, K); an embedding's lookup."""
        dtype = dtype or self.scales.dtype
        return self.weight[index].to(dtype) * self.scales[index].to(dtype)[..., None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)  # QLoRA: a gradient for x, none for the frozen weight
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K): the kernel takes 2-D activations
        if _take_kernel(self.use_kernel, x2):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return y.view(*shape[:-1], self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


# ---- int4 ----------------------------------------------------------------------------------------


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) float -> (q: (N, K) uint8 in [0, 15], scales_and_zeros: (K/G, N, 2) float32)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    sz = torch.empty(N, K // group_size, 2, dtype=torch.float32, device=w.device)
    for rows in _row_chunks(w):
        groups = w[rows].float().view(-1, K // group_size, group_size)  # (n, K/G, G)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # (n, K/G, 1)
        scales = ((hi - lo) / 15).clamp(min=1e-6)
        q[rows] = torch.round((groups - lo) / scales).clamp(0, 15).to(torch.uint8).view(-1, K)
        sz[rows] = torch.cat([scales, lo + 8 * scales], dim=-1)  # zero = lo + 8 * scale
    return q, sz.transpose(0, 1).contiguous()  # (K/G, N, 2)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, column 2j in the low nibble, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int32, the inverse of pack_nibbles."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1).to(torch.int32)  # (N, K/2, 2) -> (N, K)


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int, dtype) -> torch.Tensor:
    """q (n, K) integers in [0, 15] and sz (n, K/G, 2) scales and zeros -> (n, K) in dtype:
    (q - 8) * scale + zero, computed in dtype."""
    n, K = q.shape
    q = q.view(n, K // group_size, group_size).to(dtype)  # (n, K/G, G)
    sz = sz.to(dtype)
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, K)


class Int4Linear(nn.Module):
    """Grouped asymmetric int4 weights. Buffers (the saved state): weight (N, K/2) uint8, two
    values per byte (pack_nibbles; portable), scales_and_zeros (K/G, N, 2).

    The CPU kernel wants its own, opaque packing; it is made from `weight` by prepare_kernels (at load
    time) or on the first forward, and kept (not saved), so the fast path holds the 4-bit weights
    twice (~1 byte per weight in all). It is rebuilt if `weight` is replaced or changed in place.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, dtype=torch.float32, device=None):
        super().__init__()
        check_mode("int4", group_size)
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.use_kernel: bool | None = None  # None: where faster; True: where available; False: never
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=dtype, device=device))  # fmt: skip
        self._packed: tuple | None = None  # (key, tensor) of the kernel's packing

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, dtype=None) -> "Int4Linear":
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, group_size, dtype or w.dtype, w.device)
        module.load_weight(w)
        return module

    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize w: (N, K) float into this module's buffers, on w's device."""
        q, sz = quantize_int4(w, self.group_size)
        self.weight, self.scales_and_zeros = pack_nibbles(q), sz.to(self.scales_and_zeros.dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The (N, K) weight the int4 values stand for."""
        dtype = dtype or self.scales_and_zeros.dtype
        return dequantize_int4(unpack_nibbles(self.weight), self.scales_and_zeros.transpose(0, 1), self.group_size, dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype=None) -> torch.Tensor:
        """Rows `index` (any shape) of dequantize(dtype): (*index.shape, K); an embedding's lookup."""
        dtype = dtype or self.scales_and_zeros.dtype
        rows = index.reshape(-1)
        sz = self.scales_and_zeros[:, rows].transpose(0, 1)  # (n, K/G, 2)
        w = dequantize_int4(unpack_nibbles(self.weight[rows]), sz, self.group_size, dtype)
        return w.view(*index.shape, self.in_features)

    def _kernel_weight(self) -> torch.Tensor:
        if self._packed is not None and torch.compiler.is_compiling():
            return self._packed[1]  # the key below reads tensor metadata a graph cannot guard on
        key = (id(self.weight), self.weight._version, self.weight.device)
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight), 1)
            self._packed = (key, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return QuantizedMatmul.apply(x, self)  # QLoRA: a gradient for x, none for the frozen weight
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        # The CPU kernel's packing needs N to be a multiple of 16.
        if self.out_features % 16 == 0 and _take_kernel(self.use_kernel, x2):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self._kernel_weight(), self.group_size,
                                                           self.scales_and_zeros.to(x.dtype))  # fmt: skip
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.view(*shape[:-1], self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


def prepare_kernels(model: nn.Module) -> None:
    """Make the CPU kernel's int4 packing now (at load time) rather than on the first forward, for the
    layers that will use it by default: bfloat16 scales, CPU, N a multiple of 16."""
    for module in model.modules():
        if (isinstance(module, Int4Linear) and module.use_kernel is not False and module.out_features % 16 == 0
                and module.weight.device.type == "cpu" and module.scales_and_zeros.dtype == torch.bfloat16):  # fmt: skip
            module._kernel_weight()


# ---- swapping modules ----------------------------------------------------------------------------


# What quantization was written for (see llama/core/support.py): the plain model's modules, already
# quantized linears (quantizing twice is harmless), and every variant of ModelConfig so far -- none
# of them adds a projection that is not an nn.Linear.
QUANTIZABLE_MODULES = (Transformer, TransformerBlock, Attention, FeedForward, GeluFeedForward, RMSNorm, KVCache,
                       LayerCache, QuantizedLayerCache, nn.ModuleList, nn.Linear, nn.Embedding)  # fmt: skip
HANDLED_FIELDS = ("qk_norm", "sliding_window", "window_layers", "nope_layers", "mlp")


def target_names(model: nn.Module, include_output: bool = True) -> list[str]:
    """Names of the modules quantize_model replaces: every nn.Linear inside the transformer blocks,
    found by type (whatever a variant names them), and the output projection with include_output.
    Refuses (UnsupportedModelError) a model with modules or config variants quantization does not
    know, and linears with a bias (the quantized linears have none)."""
    check_supported(model, "quantization", (*QUANTIZABLE_MODULES, Int8Linear, Int4Linear), HANDLED_FIELDS)
    names = [f"layers.{i}.{name}" for i, block in enumerate(model.layers) for name, module in block.named_modules()
             if type(module) is nn.Linear]  # fmt: skip
    if include_output:
        names.append("output")
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is nn.Linear and linear.bias is not None:
            raise UnsupportedModelError(f"quantization was not written for linears with a bias: {name}")
    return names


def _empty_quantized(linear: nn.Linear, mode: str, group_size: int, dtype) -> nn.Module | None:
    device = linear.weight.device
    if mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features, dtype, device)
    if linear.in_features % group_size:
        return None  # stays in float
    return Int4Linear(linear.in_features, linear.out_features, group_size, dtype, device)


def swap_linears(model: nn.Module, mode: str, group_size: int = 128, include_output: bool = True,
                 dtype=None, fill: bool = True) -> list[str]:
    """Replace the target nn.Linear modules in place; returns the names replaced.

    fill=True quantizes each module's current weight; fill=False leaves the new buffers empty (used
    on the meta device, before a checkpoint fills them).
    """
    check_mode(mode, group_size)
    swapped = []
    for name in target_names(model, include_output):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            continue  # already quantized
        new = _empty_quantized(linear, mode, group_size, dtype or linear.weight.dtype)
        if new is None:
            continue
        if fill:
            new.load_weight(linear.weight.detach())
        setattr(parent, child, new)
        swapped.append(name)
    return swapped


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 128, *, include_output: bool = True) -> nn.Module:
    """Quantize the block linears and, with include_output, the output projection in place (a tied
    one gets its own quantized copy; see the module docstring).

    mode: "int8" (per output channel) or "int4" (groups of group_size in 32, 64, 128, 256).
    Scales keep the model's dtype. Returns the model.
    """
    layers = swap_linears(model, mode, group_size, include_output)
    model.quantization = {"mode": mode, "group_size": group_size, "include_output": "output" in layers}
    prepare_kernels(model)
    return model

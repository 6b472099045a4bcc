"""The KV cache: every layer's keys and values of the positions seen so far, preallocated.

    model.setup_cache(batch_size, max_seq_len)                         # in the model's dtype
    model.setup_cache(batch_size, max_seq_len, kv_cache_dtype="int8")  # a quarter of float32's bytes

Shapes (as in model.py): B rows, Hkv key/value heads, S positions, hd head dimension. A LayerCache
holds (B_max, Hkv, S_max, hd) keys and values; Attention.forward hands it the new k and v of a call
and gets back those of positions 0..S-1 to attend to.

A quantized cache (QuantizedLayerCache, kv_cache_dtype "int8" or "fp8") stores each key and value
vector -- one head at one position -- as 8-bit numbers and one float32 scale, absmax / 127 for int8
(symmetric rounding) or absmax / 448 for float8 e4m3 (its largest value). A vector's scale is its own,
so one outlier head or position does not coarsen the others. Reads dequantize the positions a layer
attends to, (q * scale) in float32, cast to the model's dtype: the attention step that follows is the
model's own, unchanged, and only one layer's dequantized keys and values exist at a time. Memory per
element: 1 byte + 4 / hd for the scale (int8 at hd 64: 1.06 bytes, against bfloat16's 2).
"""

from __future__ import annotations

import torch
from torch import nn

# "Context" in the annotations below is llama.core.model.Context (the positions and masks of one
# forward); it is not imported, since model.py imports this module.

# kv_cache_dtype names: float caches store keys and values as they are (rounded to that dtype),
# quantized ones as 8-bit numbers with a scale per vector.
FLOAT_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_CACHE_DTYPES = {"int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):  # torch >= 2.1
    QUANTIZED_CACHE_DTYPES["fp8"] = torch.float8_e4m3fn
KV_CACHE_DTYPES = (*FLOAT_CACHE_DTYPES, *QUANTIZED_CACHE_DTYPES)


def check_kv_cache_dtype(name: str | None) -> str | None:
    """`name` if it is a kv_cache_dtype this torch supports (None: the model's dtype), else ValueError."""
    if name is not None and name not in KV_CACHE_DTYPES:
        extra = "" if "fp8" in KV_CACHE_DTYPES else " (fp8 needs torch >= 2.1)"
        raise ValueError(f"unknown kv_cache_dtype {name!r}; expected one of {', '.join(KV_CACHE_DTYPES)}{extra}")
    return name


def consecutive_rows(rows: torch.Tensor | None) -> torch.Tensor | slice | None:
    """A forward's cache rows as Context.rows holds them: consecutive ascending rows r0, r0+1, ..
    (a server whose running requests hold neighbouring slots) as slice(r0, r0 + B), so that their
    keys and values are read in place, a view, instead of gathered into a copy of every position
    each layer attends to (8 rows at 512 positions of Llama 3.2 1B: 24 ms of a 175 ms step, one
    thread); other rows as they are. Under torch.compile the rows stay a tensor (the test reads
    their values, which a compiled graph must not depend on)."""
    if rows is None or rows.ndim != 1 or rows.numel() == 0 or torch.compiler.is_compiling():
        return rows
    first = int(rows[0])
    if torch.equal(rows, torch.arange(first, first + rows.numel(), device=rows.device, dtype=rows.dtype)):
        return slice(first, first + rows.numel())
    return rows


def write_index(buffer: torch.Tensor, ctx: "Context") -> torch.Tensor:
    """Where a call's keys or values go in buffer: (B_max, Hkv, S_max, X), as rows of buffer.view(-1, X):
    (B * Hkv * T,) int64, ordered as x: (B, Hkv, T, X) is, for cache rows ctx.rows (default 0..B-1)
    and positions ctx.positions (B, T). Every layer of the same heads and length shares it, so it is
    computed once per forward (kept in ctx.memo)."""
    _, Hkv, S_max, _ = buffer.shape
    key = ("write_index", Hkv, S_max, buffer.device)
    if key not in ctx.memo:
        positions, rows = ctx.positions, ctx.rows
        B = positions.shape[0]
        if rows is None or isinstance(rows, slice):  # consecutive rows r0 .. r0 + B - 1
            start = 0 if rows is None else rows.start
            rows = torch.arange(start, start + B, device=positions.device)
        heads = torch.arange(Hkv, device=positions.device)
        ctx.memo[key] = ((rows[:, None, None] * Hkv + heads[None, :, None]) * S_max + positions[:, None, :]).reshape(-1)
    return ctx.memo[key]


def _write(buffer: torch.Tensor, x: torch.Tensor, ctx: "Context") -> None:
    """Store x: (B, Hkv, T, X) at ctx.positions of cache rows ctx.rows (default: rows 0..B-1; a slice
    or a (B,) tensor) of buffer: (B_max, Hkv, S_max, X), in place."""
    if buffer.dtype.is_floating_point and buffer.dtype.itemsize == 1:
        buffer, x = buffer.view(torch.uint8), x.view(torch.uint8)  # float8: written as its bytes
    # One index_copy_ along the flattened (row, head, position) dimension. (scatter_ along the
    # positions took 50x longer on the CPU: 0.4 ms against 0.008 for 8 rows of Llama 3.2 1B's heads;
    # indexing assignment, buffer[rows[:, None], :, positions] = ..., 6.9 us against 2.7 for one row,
    # one thread, 32 calls per decoding step.)
    X = buffer.shape[-1]
    buffer.view(-1, X).index_copy_(0, write_index(buffer, ctx), x.reshape(-1, X))


def _read(buffer: torch.Tensor, ctx: "Context") -> torch.Tensor:
    """Positions 0..S-1 of the call's rows: (B, Hkv, S, X). Consecutive rows (rows 0..B-1 by default)
    are a view (no copy); other rows are gathered, a copy of just the positions attended to."""
    S = ctx.kv_len
    if ctx.rows is None:
        return buffer[: ctx.positions.shape[0], :, :S]
    return buffer[ctx.rows, :, :S]  # a slice: a view; a tensor: a gather


class LayerCache(nn.Module):
    """Preallocated keys and values of one attention layer: (B_max, Hkv, S_max, hd) each.

    Row b holds its own sequence; a forward call writes the new keys/values of row b at positions
    pos[b] .. pos[b] + T - 1. Stale entries beyond a row's current position are harmless: the mask
    hides them and the next write overwrites them.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, ctx: "Context") -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: (B, Hkv, T, hd) at ctx.positions of cache rows ctx.rows (default: rows 0..B-1);
        return keys and values of positions 0..S-1 of those rows: (B, Hkv, S, hd), in k's dtype (a
        cache in another dtype than the model's rounds them to its own on the way in)."""
        _write(self.k, k.to(self.k.dtype), ctx)
        _write(self.v, v.to(self.v.dtype), ctx)
        return _read(self.k, ctx).to(k.dtype), _read(self.v, ctx).to(v.dtype)


class QuantizedLayerCache(LayerCache):
    """A LayerCache storing 8-bit keys and values with one float32 scale per head and position (see
    the module docstring); update() returns them dequantized to the dtype of the k and v it was given."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, storage: torch.dtype,
                 device=None):  # fmt: skip
        nn.Module.__init__(self)
        self.storage = storage
        # int8 rounds to -127..127 (symmetric: -128 unused); float8 e4m3 reaches +-448.
        self.qmax = 127.0 if storage == torch.int8 else torch.finfo(storage).max
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=storage, device=device), persistent=False)
            self.register_buffer(f"{name}_scale", torch.zeros(shape[:-1] + (1,), device=device), persistent=False)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, Hkv, T, hd) -> 8-bit values (B, Hkv, T, hd) and float32 scales (B, Hkv, T, 1)."""
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / self.qmax  # (B, Hkv, T, 1)
        scaled = x / torch.where(scale == 0, 1.0, scale)  # an all-zero vector stays zero
        if self.storage == torch.int8:
            return scaled.round().clamp(-127, 127).to(torch.int8), scale
        return scaled.to(self.storage), scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (q.float() * scale).to(dtype)  # (B, Hkv, S, hd)

    def update(self, k: torch.Tensor, v: torch.Tensor, ctx: "Context") -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, x in (("k", k), ("v", v)):
            q, scale = self.quantize(x)
            _write(getattr(self, name), q, ctx)
            _write(getattr(self, f"{name}_scale"), scale, ctx)
            out.append(self.dequantize(_read(getattr(self, name), ctx), _read(getattr(self, f"{name}_scale"), ctx), x.dtype))
        return out[0], out[1]


class KVCache(nn.Module):
    """The KV cache of the whole model: one LayerCache per layer, sized by that layer's attention.

    It also decides which positions a forward call covers (locate): where the new tokens go, which
    cache rows they use, and how many positions the queries attend to. Those are bookkeeping, not
    math, so they live here rather than in Transformer.forward.

    kv_cache_dtype: a name from KV_CACHE_DTYPES, or None for a float cache in `dtype` (the model's).
    Whatever it stores, update() returns keys and values in the dtype of those it was given.
    """

    def __init__(self, layers: list[tuple[int, int]], batch_size: int, max_seq_len: int, dtype, device=None,
                 kv_cache_dtype: str | None = None):  # fmt: skip
        """layers: (n_kv_heads, head_dim) of each layer's attention."""
        super().__init__()
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype) or str(dtype).removeprefix("torch.")
        if kv_cache_dtype in QUANTIZED_CACHE_DTYPES:
            storage = QUANTIZED_CACHE_DTYPES[kv_cache_dtype]
            self.layers = nn.ModuleList(QuantizedLayerCache(batch_size, max_seq_len, n, hd, storage, device)
                                        for n, hd in layers)  # fmt: skip
        else:
            dtype = FLOAT_CACHE_DTYPES.get(kv_cache_dtype, dtype)
            self.layers = nn.ModuleList(LayerCache(batch_size, max_seq_len, n, hd, dtype, device) for n, hd in layers)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (keys, values and any scales of every layer)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def locate(self, positions: torch.Tensor, rows: torch.Tensor | None, kv_len: int | None) -> int:
        """Check that tokens at positions (B, T) in cache rows `rows` fit; return S, the number of cache
        positions the queries attend to: kv_len if given (a fixed length, so that no shape depends on
        the positions' values and torch.compile can capture a decode step as one graph), else
        max(position) + 1. With kv_len nothing reads the positions: the caller keeps them below it."""
        if kv_len is not None:
            if not 0 < kv_len <= self.max_seq_len:
                raise ValueError(f"kv_len {kv_len} is outside the KV cache's 1..{self.max_seq_len} positions")
            return kv_len
        S = int(positions.max()) + 1
        n_rows = positions.shape[0] if rows is None else int(rows.max()) + 1
        if n_rows > self.batch_size or S > self.max_seq_len:
            raise ValueError(
                f"{positions.shape[0]} rows (cache rows up to {n_rows - 1}) at positions up to {S - 1} do not fit "
                f"the KV cache of {self.batch_size} rows x {self.max_seq_len} positions"
            )
        return S

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx: "Context") -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].update(k, v, ctx)

    def copy_prefix(self, source: int, rows: torch.Tensor, length: int) -> None:
        """Give cache rows `rows` ((N,) int64) the first `length` positions of row `source`: several
        continuations of one prompt then decode from its keys and values, prefilled once. Every
        buffer of a layer is indexed (row, head, position, ...), quantized values and scales alike."""
        for layer in self.layers:
            for buffer in layer.buffers():
                buffer[rows, :, :length] = buffer[source, :, :length]

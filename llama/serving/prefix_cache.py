"""Prefix caching: requests that begin with the same tokens (a system prompt, few-shot examples, the
earlier turns of a chat) reuse the keys and values of that beginning instead of computing them again.

    prefixes = PrefixCache(model.cache, tokens=2048, block=16)
    blocks = prefixes.lookup(prompt, adapter, limit=len(prompt) - 1)  # the stored blocks it starts with
    prefixes.load(blocks, pool_row)                # their keys and values into the engine's pool row
    ... prefill prompt[len(blocks) * 16:] at positions len(blocks) * 16 ...
    prefixes.store(prompt, adapter, pool_row)      # keep the prompt's whole blocks for later requests
    ... decode; once finished, with KV for `fed` positions (all tokens but the last sampled):
    prefixes.store(prompt + generated, adapter, pool_row, length=fed)   # the answer too, for the next turn

Blocks. A prompt (or a finished sequence: prompt and answer) is cut into blocks of `block` tokens; only whole blocks are kept. A block's keys and
values depend on its tokens and on every token before it, so a block is found by its tokens and its
parent (the block before it): the blocks form a trie, one root per LoRA adapter (None: the base
model). A block computed under one adapter is never found by a request for another, since the
adapter changes every layer's keys and values after the first. A lookup walks the trie from the
root block by block and stops at the first block not stored, so a prompt that shares only its first
blocks with a stored one (a partial prefix) reuses those. Keys are the token tuples themselves, not
hashes of them: two different prefixes never match.

Storage. The blocks live in a KVCache of their own (llama/core/cache.py), made like the engine's
pool (the same dtype, or the same 8-bit values and scales for a quantized pool) with one row of
`block` positions per block, preallocated: `tokens` positions in all (its memory is logged at
startup). Copying a block in or out is a copy of every buffer of every layer at those positions; a
hit copies the bytes that were stored, so the reused keys and values are exactly the ones the first
request computed.

Eviction. When every row is used, storing a new block evicts the least recently used block that no
stored block continues (a leaf of the trie): a parent outlives its children, so every stored block
stays reachable. A lookup or store marks the blocks it walks as used.

The last prompt token is never taken from the cache (lookup's `limit`): its logits give the first new
token, so at least one token is always computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.cache import KVCache


@dataclass(eq=False)
class Block:
    """One stored block: its row in the store and its place in the trie."""

    row: int
    key: tuple  # (the parent Block, or ("root", adapter); the block's tokens)
    parent: "Block | None"
    children: int = 0
    used: int = 0  # the lookup/store tick that last touched it


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # lookups that found at least one block
    hit_tokens: int = 0  # prompt tokens taken from the cache
    stored_blocks: int = 0  # blocks copied in
    evicted_blocks: int = 0


class PrefixCache:
    """Whole blocks of earlier prompts' keys and values, keyed by their tokens, their prefix and
    their adapter (see the module docstring). `pool`: the engine's KVCache, whose rows the blocks
    are copied into and out of; `tokens`: the positions the store holds (a multiple of `block`)."""

    def __init__(self, pool: KVCache, *, tokens: int, block: int = 16):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"the prefix cache's block must be a positive integer, got {block!r}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < block:
            raise ValueError(f"the prefix cache needs room for at least one block of {block} tokens, got {tokens!r}")
        self.pool, self.block = pool, block
        self.n_blocks = tokens // block
        first = pool.layers[0]
        shapes = [(layer.k.shape[1], layer.k.shape[3]) for layer in pool.layers]  # (Hkv, hd) of each layer
        self.store_cache = KVCache(shapes, self.n_blocks, block, first.k.dtype, first.k.device,
                                   kv_cache_dtype=pool.kv_cache_dtype)  # fmt: skip
        self.index: dict[tuple, Block] = {}
        self.free = list(range(self.n_blocks - 1, -1, -1))
        self.tick = 0
        self.stats = PrefixCacheStats()

    @property
    def nbytes(self) -> int:
        return self.store_cache.nbytes

    @property
    def tokens(self) -> int:
        """Positions held now."""
        return len(self.index) * self.block

    def _key(self, parent: Block | None, adapter: str | None, prompt: Sequence[int], i: int) -> tuple:
        """The index key of block i of `prompt` (a Block hashes by identity: no nested tuple to hash)."""
        return (("root", adapter) if parent is None else parent, tuple(prompt[i * self.block : (i + 1) * self.block]))

    def _walk(self, prompt: Sequence[int], adapter: str | None, limit: int) -> list[Block]:
        """The stored blocks `prompt` begins with, under `adapter`, covering at most `limit` tokens."""
        found: list[Block] = []
        for i in range(min(limit, len(prompt)) // self.block):
            block = self.index.get(self._key(found[-1] if found else None, adapter, prompt, i))
            if block is None:
                break
            found.append(block)
        return found

    def peek(self, prompt: Sequence[int], adapter: str | None, limit: int) -> int:
        """How many tokens lookup() would find now; touches nothing (no use mark, no stats)."""
        return len(self._walk(prompt, adapter, limit)) * self.block

    def lookup(self, prompt: Sequence[int], adapter: str | None, limit: int) -> list[Block]:
        """The stored blocks `prompt` begins with, under `adapter`, covering at most `limit` tokens;
        marked as used."""
        self.tick += 1
        self.stats.lookups += 1
        found = self._walk(prompt, adapter, limit)
        for block in found:
            block.used = self.tick
        if found:
            self.stats.hits += 1
            self.stats.hit_tokens += len(found) * self.block
        return found

    def load(self, blocks: list[Block], row: int) -> None:
        """Copy `blocks` into positions 0 .. len(blocks) * block - 1 of the pool's row `row`."""
        if not blocks:
            return
        rows = torch.tensor([b.row for b in blocks], device=self.store_cache.layers[0].k.device)
        n = len(blocks) * self.block
        for source, target in zip(self.store_cache.layers, self.pool.layers):
            for stored, buffer in zip(source.buffers(), target.buffers()):  # k, v (and their scales), alike
                # stored[rows]: (N, Hkv, block, X) -> (Hkv, N * block, X), the positions in order
                buffer[row, :, :n] = stored[rows].transpose(0, 1).reshape(buffer.shape[1], n, buffer.shape[3])

    def store(self, prompt: Sequence[int], adapter: str | None, row: int, length: int | None = None) -> int:
        """Keep the whole blocks of prompt[:length] (default: all of it; a finished sequence passes its
        prompt and generated tokens), whose keys and values are in positions 0.. of the pool's row `row`, evicting least recently used leaves as needed; returns
        the number of blocks copied in (those already stored are only marked as used)."""
        self.tick += 1
        length = len(prompt) if length is None else length
        parent, new = None, []  # new: (block index in the prompt, store row) of the blocks to copy in
        chain: set[Block] = set()  # the blocks of this prompt: never evicted while storing it
        for i in range(length // self.block):
            key = self._key(parent, adapter, prompt, i)
            block = self.index.get(key)
            if block is None:
                slot = self._free_row(chain)
                if slot is None:  # everything left is this prompt's own chain
                    break
                block = Block(slot, key, parent)
                self.index[key] = block
                if parent is not None:
                    parent.children += 1
                new.append((i, slot))
            block.used = self.tick
            chain.add(block)
            parent = block
        if new:  # one copy per buffer for all the new blocks
            device = self.store_cache.layers[0].k.device
            slots = torch.tensor([slot for _, slot in new], device=device)  # (N,)
            positions = torch.tensor([i * self.block + j for i, _ in new for j in range(self.block)], device=device)
            for source, target in zip(self.pool.layers, self.store_cache.layers):
                for buffer, stored in zip(source.buffers(), target.buffers()):
                    # buffer[row, :, positions]: (Hkv, N * block, X) -> (N, Hkv, block, X), a block per store row
                    picked = buffer[row][:, positions]
                    stored[slots] = picked.view(picked.shape[0], len(new), self.block, -1).transpose(0, 1)
        self.stats.stored_blocks += len(new)
        return len(new)

    def _free_row(self, protected: set[Block]) -> int | None:
        if self.free:
            return self.free.pop()
        leaves = [b for b in self.index.values() if b.children == 0 and b not in protected]
        if not leaves:
            return None
        victim = min(leaves, key=lambda b: b.used)
        del self.index[victim.key]
        if victim.parent is not None:
            victim.parent.children -= 1
        self.stats.evicted_blocks += 1
        return victim.row

    def clear(self) -> None:
        self.index.clear()
        self.free = list(range(self.n_blocks - 1, -1, -1))

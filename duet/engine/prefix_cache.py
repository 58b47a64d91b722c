"""A prefix cache over the engine's latent KV cache: prompts that start like earlier sequences skip that part
of their prefill.

What is kept: for every layer, per position, the MLA latent [R] and the rotary key [P] (all that absorbed
attention reads; no per-head keys or values), in blocks of `block_size` positions held in one pool tensor.

Structure: a tree of blocks. A block is keyed by its `block_size` tokens under its parent block, so the
path from the root spells a token prefix and a block's latents are those of the only sequence with that
prefix (a block's entries depend on its own tokens and those before, nothing else). The root's children
start at position 0. A lookup walks full blocks while they match, then takes the child that shares the
most leading tokens with the rest of the prompt (a prefix that ends inside a block still reuses that part).

The MTP layers are one position off: the MTP module's entry at position p is computed from the main
model's hidden state at p and the token at p + 1. A block therefore stores, for the MTP layers, positions
[start - 1, start + block_size - 1): entries fixed by the block's own tokens and those before it (the slot
for position -1 in the first block is unused). A row whose first L tokens match reuses min(L - 1, n - 1)
positions with MTP (the entry at L - 1 would need token L), min(L, n - 1) without: at least the last
prompt token is always computed, for the logits of the first new token.

What goes in: only positions the main model verified. A row's cache holds valid main entries below its
`length` (rejected MTP drafts sit past it and are rewritten on the next step) and valid MTP entries below
its `mtp_len`; `store` takes only the whole blocks inside both. A request's prompt is stored right after its
prefill (requests admitted after it share it while it decodes), the rest of its sequence when it retires.

Eviction: least recently used, one leaf block at a time, when the pool (grown on demand up to the budget)
is full. A lookup or store touches a path leaf first, root last, so a parent is always more recent than its
children; leaves go first. Blocks on the path of a row still decoding hold a reference and are never
evicted (nor are their ancestors, which have children). When nothing can be evicted, storing stops: the
cache is an optimisation, never a condition for a request to run.

The index (the tree, its order of use, which pool slot holds which block) and the pool's contents are apart:
`lookup` and `insert` decide, `read` and `write` copy between the pool and a cache row (`load` and `store` do
both). Under torch.distributed only rank 0 keeps the index, and every rank runs the copies it decides on
(`duet.engine.runner`), so the index hands out pool slots in a fixed order (never used ones 0, 1, 2, ..., then
evicted ones) and the pool grows with the highest slot written.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor


class _Block:
    __slots__ = ("tokens", "parent", "children", "slot", "refs")

    def __init__(self, tokens: tuple[int, ...], parent: _Block | None, slot: int):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], _Block] = {}
        self.slot = slot  # index in the pool
        self.refs = 0  # rows decoding with this block on their path


@dataclass
class PrefixCacheStats:
    requests: int = 0  # prompts looked up
    hits: int = 0  # ... that reused at least one position
    prompt_tokens: int = 0  # tokens of those prompts
    reused_tokens: int = 0  # ... whose prefill was skipped
    stored_blocks: int = 0  # blocks written into the pool
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of latent cache entries indexed by token prefix (see the module docstring).

    `n_main` main layers followed by `n_mtp` MTP layers (stored only when `mtp`), latents of `rank` and
    rotary keys of `rope_dim` numbers, blocks of `block_size` positions, at most `budget_bytes` of them."""

    def __init__(self, n_main: int, n_mtp: int, rank: int, rope_dim: int, *, block_size: int, budget_bytes: int,
                 mtp: bool, device: torch.device, dtype: torch.dtype):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.n_main, self.n_mtp, self.rank, self.rope_dim = n_main, n_mtp, rank, rope_dim
        self.block_size, self.budget_bytes = block_size, budget_bytes
        self.device, self.dtype = device, dtype
        self.stats = PrefixCacheStats()
        self.reset(mtp)

    def reset(self, mtp: bool) -> None:
        """Drop every block (the statistics stay); `mtp`: whether MTP layers are stored and relied on."""
        self.mtp = mtp and self.n_mtp > 0
        self.n_layers = self.n_main + (self.n_mtp if self.mtp else 0)
        self.capacity = self.budget_bytes // self.block_bytes  # blocks
        self.root = _Block((), None, -1)
        self._lru: OrderedDict[_Block, None] = OrderedDict()  # every block, least recently used first
        self._used = 0  # pool slots handed out so far (the never used ones come next, in order)
        self.kv: Tensor | None = None  # [layers, slots, block_size, R]
        self.pe: Tensor | None = None  # [layers, slots, block_size, P]

    # ------------------------------------------------------------------ sizes

    @property
    def block_bytes(self) -> int:
        return self.n_layers * self.block_size * (self.rank + self.rope_dim) * self.dtype.itemsize

    @property
    def blocks(self) -> int:
        return len(self._lru)

    def held_bytes(self) -> int:
        return self.blocks * self.block_bytes

    def allocated_bytes(self) -> int:
        return 0 if self.kv is None else self.kv.shape[1] * self.block_bytes

    def summary(self) -> dict:
        s = self.stats
        return {"requests": s.requests, "hits": s.hits, "prompt_tokens": s.prompt_tokens,
                "reused_tokens": s.reused_tokens,
                "hit_rate": s.reused_tokens / s.prompt_tokens if s.prompt_tokens else 0.0,
                "request_hit_rate": s.hits / s.requests if s.requests else 0.0,
                "blocks": self.blocks, "block_size": self.block_size, "held_bytes": self.held_bytes(),
                "allocated_bytes": self.allocated_bytes(), "capacity_bytes": self.capacity * self.block_bytes,
                "stored_blocks": s.stored_blocks, "evicted_blocks": s.evicted_blocks}

    # ------------------------------------------------------------------ lookup

    def match(self, tokens: list[int]) -> tuple[list[_Block], int]:
        """The blocks spelling the longest cached prefix of `tokens` (the last one possibly matched only in
        part) and how many tokens they match. Touches them (most recently used)."""
        b, node, path, n = self.block_size, self.root, [], len(tokens)
        matched = 0
        while matched + b <= n:
            child = node.children.get(tuple(tokens[matched:matched + b]))
            if child is None:
                break
            path.append(child)
            node, matched = child, matched + b
        rest = tokens[matched:matched + b]
        best, best_len = None, 0
        if rest:
            for child in node.children.values():  # a prefix ending inside a block: its leading tokens
                k = _common(child.tokens, rest)
                if k > best_len:
                    best, best_len = child, k
        if best is not None:
            path.append(best)
            matched += best_len
        self._touch(path)
        return path, matched

    def reusable(self, matched: int, n: int) -> int:
        """Positions a prompt of n tokens whose first `matched` tokens are cached can take from the cache."""
        return max(0, min(matched - (1 if self.mtp else 0), n - 1))

    def lookup(self, tokens: list[int]) -> tuple[int, list[int]]:
        """(how many positions of `tokens` the cache can supply, the pool slots of the blocks holding them): the
        index's half of `load`."""
        path, matched = self.match(tokens)
        r = self.reusable(matched, len(tokens))
        self.stats.requests += 1
        self.stats.prompt_tokens += len(tokens)
        if r == 0:
            return 0, []
        self.stats.hits += 1
        self.stats.reused_tokens += r
        return r, [blk.slot for blk in path]

    def read(self, slots: list[int], r: int, kv: Tensor, pe: Tensor) -> None:
        """Copy the first `r` positions held by the blocks in pool `slots` (a path from the root) into one cache
        row's latents kv [L, T, R], pe [L, T, P] (all main and MTP layers)."""
        index = torch.tensor(slots, device=self.device)
        m, span = self.n_main, len(slots) * self.block_size
        kv[:m, :r] = self.kv[:m, index].reshape(m, span, self.rank)[:, :r]
        pe[:m, :r] = self.pe[:m, index].reshape(m, span, self.rope_dim)[:, :r]
        if self.mtp:  # slot j of a block holds position start + j - 1: positions 0..r-1 are flat 1..r
            k = self.n_layers - m
            kv[m:self.n_layers, :r] = self.kv[m:, index].reshape(k, span, self.rank)[:, 1:r + 1]
            pe[m:self.n_layers, :r] = self.pe[m:, index].reshape(k, span, self.rope_dim)[:, 1:r + 1]

    def load(self, tokens: list[int], kv: Tensor, pe: Tensor) -> int:
        """Copy the cached entries of the longest usable prefix of `tokens` into one cache row's latents
        kv [L, T, R], pe [L, T, P]; returns how many positions were copied (`lookup`, then `read`)."""
        r, slots = self.lookup(tokens)
        if r:
            self.read(slots, r, kv, pe)
        return r

    # ------------------------------------------------------------------ insertion and eviction

    def insert(self, tokens: list[int], main_len: int, mtp_len: int) -> tuple[list[_Block], list[tuple[int, int]]]:
        """Index the whole blocks of `tokens` whose entries are valid in one cache row: main layers below
        `main_len`, MTP layers below `mtp_len`. Blocks already cached are kept (their entries are the same).
        Returns the path of blocks, each holding one more reference (pass it to `release` when the row is done),
        and the new blocks, (pool slot, first position) each, whose entries `write` must copy from the row."""
        b = self.block_size
        whole = main_len // b
        if self.mtp:
            whole = min(whole, (mtp_len + 1) // b)
        whole = min(whole, len(tokens) // b)
        node, path, new = self.root, [], []
        for i in range(whole):
            key = tuple(tokens[i * b:(i + 1) * b])
            child = node.children.get(key)
            if child is None:
                slot = self._slot()
                if slot is None:
                    break
                child = _Block(key, node, slot)
                node.children[key] = child
                self._lru[child] = None
                new.append((slot, i * b))
            child.refs += 1
            path.append(child)
            node = child
        self.stats.stored_blocks += len(new)
        self._touch(path)
        return path, new

    def write(self, blocks: list[tuple[int, int]], kv: Tensor, pe: Tensor) -> None:
        """Copy the entries of `blocks`, (pool slot, first position) each, from one cache row's latents
        kv [L, T, R], pe [L, T, P] into the pool, grown (doubling, up to the capacity) to hold the highest slot."""
        b, m, nb = self.block_size, self.n_main, len(blocks)
        self._grow(max(slot for slot, _ in blocks) + 1)
        slots = torch.tensor([slot for slot, _ in blocks], device=self.device)
        starts = torch.tensor([start for _, start in blocks], device=self.device)
        pos = (starts[:, None] + torch.arange(b, device=self.device)).flatten()
        self.kv[:m, slots] = kv[:m, pos].view(m, nb, b, self.rank)
        self.pe[:m, slots] = pe[:m, pos].view(m, nb, b, self.rope_dim)
        if self.mtp:  # one position back (the first block's slot 0 stands for position -1: never read)
            k, pos = self.n_layers - m, (pos - 1).clamp(min=0)
            self.kv[m:, slots] = kv[m:self.n_layers, pos].view(k, nb, b, self.rank)
            self.pe[m:, slots] = pe[m:self.n_layers, pos].view(k, nb, b, self.rope_dim)

    def store(self, tokens: list[int], main_len: int, mtp_len: int, kv: Tensor, pe: Tensor) -> list[_Block]:
        """Cache the whole blocks of `tokens` whose entries are valid in one cache row's latents kv [L, T, R],
        pe [L, T, P] (`insert`, then `write`); returns the path of blocks for `release`."""
        path, new = self.insert(tokens, main_len, mtp_len)
        if new:
            self.write(new, kv, pe)
        return path

    def release(self, path: list[_Block]) -> None:
        for blk in path:
            blk.refs -= 1

    def _slot(self) -> int | None:
        """A pool slot for a new block: the next never used one, or the least recently used evictable block's.
        None when every block is in use."""
        if self._used < self.capacity:
            self._used += 1
            return self._used - 1
        victim = next((blk for blk in self._lru if blk.refs == 0 and not blk.children), None)
        if victim is None:
            return None
        del self._lru[victim]
        del victim.parent.children[victim.tokens]
        victim.parent = None
        self.stats.evicted_blocks += 1
        return victim.slot

    def _grow(self, slots: int) -> None:
        """Make the pool hold at least `slots` slots: doubling (from 64), up to the capacity."""
        old = 0 if self.kv is None else self.kv.shape[1]
        if slots <= old:
            return
        shape = (self.n_layers, min(self.capacity, max(64, 2 * old, slots)), self.block_size)
        kv = torch.zeros(*shape, self.rank, device=self.device, dtype=self.dtype)
        pe = torch.zeros(*shape, self.rope_dim, device=self.device, dtype=self.dtype)
        if old:
            kv[:, :old], pe[:, :old] = self.kv, self.pe
        self.kv, self.pe = kv, pe

    def _touch(self, path: list[_Block]) -> None:
        for blk in reversed(path):  # leaf first: a parent always ends up more recent than its children
            self._lru.move_to_end(blk)


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """The length of the common prefix of a and b."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

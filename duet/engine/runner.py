"""The engine's tensor work: the model's forward passes, the latent KV cache, and the prefix cache's pool.

The engine (`duet.engine.engine`) decides: which requests run in which cache rows, which tokens to feed, what to
sample, which prefix-cache blocks to reuse. The `Runner` does what those decisions ask of tensors, one call per
`@op` method: a prefill, a decode step, an MTP pass, a copy between cache rows or between a row and the prefix
cache's pool. An op takes plain ints and lists of ints, and reads the tensors it needs from the runner itself:
the cache, the pool, and the hidden states of the last forward pass, which the next MTP pass continues from.

That is what lets the engine run under torch.distributed (`duet.engine.distributed`): every rank holds a runner
over its part of the model and the same caches, rank 0's engine broadcasts each op (its name and arguments)
before running it, and the other ranks run the same op on the same inputs. On one process an op is a method call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from duet.engine.prefix_cache import PrefixCache
from duet.model import CacheView, KVCache, Transformer

_LENGTH_STEP = 64  # the compiled step attends over the cache cut to a multiple of this many positions


def op(method: Callable) -> Callable:
    """A `Runner` method that every rank runs: on rank 0 under torch.distributed, `broadcast` announces the call
    to the other ranks and makes it (`duet.engine.distributed.Leader.run`)."""

    @functools.wraps(method)
    def call(self: Runner, *args):
        if self.broadcast is None:
            return method(self, *args)
        return self.broadcast(method.__name__, args, lambda: method(self, *args))

    return call


class Runner:
    """The model, its latent KV cache (`max_batch` rows, grown as sequences grow), the prefix cache (None: off;
    under a budget of `prefix_cache_mb` MiB, see `_make_prefix_cache`), and compiled decode steps (`compile`)."""

    def __init__(self, model: Transformer, *, max_batch: int, max_seq_len: int, compile: bool = False,
                 threads: int | None = None, prefix_cache_mb: float | None = None, prefix_block: int = 16):
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.compile, self.threads = compile, threads
        self.cache: KVCache | None = None
        self.prefix = self._make_prefix_cache(prefix_cache_mb, prefix_block)
        self.broadcast: Callable | None = None  # (op name, args, call) -> result: set on rank 0 under torchrun
        self._compiled: tuple[Callable, Callable] | None = None  # compiled main and MTP steps, built on first use
        self._hidden: tuple[Tensor, bool] | None = None  # the last main pass's hidden states, and if compiled
        self._draft_hidden: Tensor | None = None  # the MTP module's at each row's newest draft [A, D]

    def _make_prefix_cache(self, mb: float | None, block: int) -> PrefixCache | None:
        """The prefix cache under a budget of `mb` MiB (None: as many positions as the engine's cache holds
        at full length, max_batch x max_seq_len, at most 1 GiB; 0: no prefix cache). Its pool grows as it
        fills, so an unused budget costs nothing."""
        if mb is not None and mb < 0:
            raise ValueError(f"prefix_cache_mb={mb} must be >= 0")
        args = self.model.args
        n_main, n_mtp = len(self.model.layers), len(self.model.mtp)
        per_position = (n_main + n_mtp) * (args.kv_lora_rank + args.qk_rope_head_dim) * self.dtype.itemsize
        budget = (min(self.max_batch * self.max_seq_len * per_position, 1 << 30) if mb is None
                  else int(mb * 2**20))
        if budget < block * per_position:  # not one block
            return None
        return PrefixCache(n_main, n_mtp, args.kv_lora_rank, args.qk_rope_head_dim, block_size=block,
                           budget_bytes=budget, mtp=True, device=self.device, dtype=self.dtype)

    def setup_thread(self) -> None:
        """Settings of the thread that runs the ops (the engine's loop; a follower rank's main thread)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device.type == "cpu":
            # Tiny activations (softmax tails, SiLU of large negatives) fall into fp32's denormal range, which
            # x86 computes slowly; flushing them to zero changes nothing a model can see. The compiled steps'
            # C++ kernels do not flush them themselves: compiled decoding was 1.07-1.43x faster in 4 paired
            # runs; eager decoding was unchanged. It applies to this thread only.
            torch.set_flush_denormal(True)

    # ------------------------------------------------------------------ the latent cache

    def reserve(self, need_len: int) -> None:
        """Make sure the cache has `max_batch` rows of at least `need_len` positions, keeping its contents."""
        c = self.cache
        if c is not None and c.max_seq_len >= need_len:
            return
        length = min(max(need_len, 2 * c.max_seq_len if c else 256), self.max_seq_len + 1)
        rows = self.max_batch
        if self.compile:
            # Full length at once (a grown cache would change the strides of the compiled step's inputs), and
            # a spare row and tail: the step's views of the cache are then never whole, so their strides keep
            # one relation to their sizes (torch guards on that relation and would compile again).
            length, rows = self.max_seq_len + 1 + _LENGTH_STEP, self.max_batch + 1
        self.allocate(rows, length)

    @op
    def allocate(self, rows: int, length: int) -> None:
        """A cache of `rows` rows of `length` positions, holding what the current one holds."""
        c = self.cache
        grown = KVCache(self.model.args, self.model.n_cache_layers, rows, length, self.device, self.dtype)
        if c is not None:
            grown.kv[:, : c.batch_size, : c.max_seq_len] = c.kv
            grown.pe[:, : c.batch_size, : c.max_seq_len] = c.pe
        self.cache = grown

    @op
    def move_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first `n` positions of cache row `src` into row `dst`."""
        self.cache.kv[:, dst, :n] = self.cache.kv[:, src, :n]
        self.cache.pe[:, dst, :n] = self.cache.pe[:, src, :n]

    # ------------------------------------------------------------------ the prefix cache's pool

    @op
    def load_prefix(self, row: int, slots: list[int], n: int) -> None:
        """Copy `n` positions from the prefix cache's blocks in pool `slots` into cache row `row`."""
        self.prefix.read(slots, n, self.cache.kv[:, row], self.cache.pe[:, row])

    @op
    def store_prefix(self, row: int, blocks: list[tuple[int, int]]) -> None:
        """Copy blocks of cache row `row`, (pool slot, first position) each, into the prefix cache's pool."""
        self.prefix.write(blocks, self.cache.kv[:, row], self.cache.pe[:, row])

    @op
    def reset_prefix(self, mtp: bool) -> None:
        """Empty the prefix cache, which from now on stores MTP entries or not (`mtp`)."""
        self.prefix.reset(mtp)

    # ------------------------------------------------------------------ forward passes

    @op
    def prefill(self, tokens: list[list[int]], first_row: int, start: list[int], last: list[int]) -> Tensor:
        """Prompts tokens [G, W] (padded to one width) into cache rows first_row.., from positions `start` ->
        the logits [G, V] at each row's position `last` (its last prompt token). Eager."""
        ids = torch.tensor(tokens, device=self.device)
        h = self.model.hidden(ids, self._view(slice(first_row, first_row + len(tokens)), start))  # [G, W, D]
        self._hidden = (h, False)
        at = torch.arange(len(tokens), device=self.device)
        return self.model.logits(h[at, torch.tensor(last, device=self.device)])

    @op
    def decode(self, tokens: list[list[int]], start: list[int]) -> Tensor:
        """S new tokens for each of the A active rows (cache rows 0..A-1): tokens [A, S] at positions start..
        -> logits [A, S, V]. Compiled with `compile`."""
        ids = torch.tensor(tokens, device=self.device)
        rows = slice(0, len(tokens))
        if self.compile:
            h, logits = self._compiled_call(0, (ids,), start, ids.shape[1], rows)
        else:
            h = self.model.hidden(ids, self._view(rows, start))
            logits = self.model.logits(h)
        self._hidden = (h, self.compile)
        return logits

    @op
    def mtp(self, next_ids: list[list[int]], first_row: int, start: list[int], pick: list[int]) -> Tensor:
        """The MTP module over the last main pass's hidden states [A, S, D], each position paired with the token
        after it, next_ids [A, S], in cache rows first_row.. from positions `start` -> its logits [A, V] at each
        row's position `pick` (the newest verified token), whose hidden state `draft` continues from. Compiled
        after a compiled decode step (not after a prefill)."""
        h, compiled = self._hidden
        logits, hidden = self._mtp_call(h, torch.tensor(next_ids, device=self.device), first_row, start, compiled)
        at, pick = torch.arange(len(next_ids), device=self.device), torch.tensor(pick, device=self.device)
        self._draft_hidden = hidden[at, pick]
        return logits[at, pick]

    @op
    def draft(self, tokens: list[int], first_row: int, positions: list[int]) -> Tensor:
        """The MTP module again, on its own last hidden states and each row's newest draft `tokens` at
        `positions` -> logits [A, V] of the next draft. Compiled with `compile`."""
        ids = torch.tensor(tokens, device=self.device)[:, None]
        logits, hidden = self._mtp_call(self._draft_hidden[:, None], ids, first_row, positions, self.compile)
        self._draft_hidden = hidden[:, 0]
        return logits[:, 0]

    def _view(self, rows: slice, start: list[int]) -> CacheView:
        return CacheView(self.cache, rows, torch.tensor(start, device=self.device), fresh=not any(start))

    def _mtp_call(self, h: Tensor, next_ids: Tensor, first_row: int, start: list[int],
                  compiled: bool) -> tuple[Tensor, Tensor]:
        """The MTP module on h [A, S, D] and tokens next_ids [A, S] of cache rows first_row.. at positions start..
        -> (logits [A, S, V], its hidden [A, S, D])."""
        rows = slice(first_row, first_row + len(start))
        if compiled:
            return self._compiled_call(1, (h, next_ids), start, next_ids.shape[1], rows)
        return self.model.mtp_logits(0, h, next_ids, self._view(rows, start))

    def _compiled_call(self, which: int, inputs: tuple[Tensor, ...], start: list[int], s: int,
                       rows: slice) -> tuple[Tensor, Tensor]:
        """Call compiled step `which` (0: main, 1: MTP) over a static `CacheView`: the active rows' cache cut
        to a multiple of 64 positions past the longest row. The row count and that length are marked
        dynamic, so each S needs a graph for one row (torch specialises 1), and one or two for more (the
        MoE's choice between gathering experts and running all of them splits the row counts): a few
        compiles when a batch size is first seen, none as rows grow."""
        if self._compiled is None:
            self._compiled = _compile_steps(self.model, self.device)
        t = min(-(-(max(start) + s) // _LENGTH_STEP) * _LENGTH_STEP, self.max_seq_len + 1)
        kv, pe = self.cache.kv[:, rows, :t], self.cache.pe[:, rows, :t]
        positions = torch.tensor(start, device=self.device)
        for x in inputs:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(positions, 0)
        for x in (kv, pe):
            torch._dynamo.maybe_mark_dynamic(x, 1)
            torch._dynamo.maybe_mark_dynamic(x, 2)
        return self._compiled[which](*inputs, positions, kv, pe)


def _compile_steps(model: Transformer, device: torch.device) -> tuple[Callable, Callable]:
    """`torch.compile` of the two decode steps, over cache latents kv [L, A, T, R], pe [L, A, T, P] (views of
    the engine's cache, written in place) at positions [A]:
    main (tokens [A, S], positions, kv, pe) -> (hidden [A, S, D], logits [A, S, V]);
    MTP (h [A, S, D], next_ids [A, S], positions, kv, pe) -> (logits [A, S, V], hidden [A, S, D]).
    The MoE takes its static path under compile and attention masks by position (`CacheView.static`), so
    the graphs have no host sync and no shape that depends on the data."""

    def view(positions: Tensor, kv: Tensor, pe: Tensor) -> CacheView:
        return CacheView(KVCache.over(kv, pe), slice(None), positions, static=True)

    def main(tokens: Tensor, positions: Tensor, kv: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        h = model.hidden(tokens, view(positions, kv, pe))
        return h, model.logits(h)

    def mtp(h: Tensor, next_ids: Tensor, positions: Tensor, kv: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        return model.mtp_logits(0, h, next_ids, view(positions, kv, pe))

    # Each engine's model adds graphs for the same code (one row and several, per S and step).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Guards on tensors only (shapes, dtypes, strides; the weights are inputs of the graph): checking every
    # module attribute before each call cost ~0.3 ms, a tenth of a compiled step of a small model. Safe here
    # because the engine never changes its model; another model of other shapes fails the tensor guards.
    options: dict = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    if device.type == "cpu":  # the C++ wrapper calls the kernels without a Python frame per op
        options["cpp_wrapper"] = True
    return tuple(torch.compile(f, dynamic=False, fullgraph=True, options=options) for f in (main, mtp))

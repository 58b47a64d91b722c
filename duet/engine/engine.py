"""The generation engine: continuous batching over a latent KV cache, with MTP speculative decoding.

A plain loop in the spirit of gpt-fast. Requests wait in a queue; up to `max_batch` of them are
active, each in one row of a preallocated `KVCache`. A new request is prefilled alone into a free
row, then decodes together with the others, one token per step (or, with MTP, up to depth + 1):

    plain step:  feed each row's last token            -> sample the next token
    MTP step:    feed [last token, d1 .. dk]           -> verify the k drafts with the main model,
                 keep the accepted prefix plus one     -> run the MTP module to draft d1, then chain
                 token sampled by the main model          it on its own output for d2 .. dk

V3 checkpoints carry one MTP module, trained to draft one token; depth k > 1 reuses it on its own
hidden state (`mtp_depth`; `duet bench --mtp-depth` measures whether that pays).

When a row finishes (EOS, a stop string, max_new_tokens, or the cache is full), the last active
row moves into its place, so active rows stay contiguous and the next request takes the freed row.

A prefix cache (`duet.engine.prefix_cache`, on by default, `prefix_cache_mb` sets its budget) keeps the
latents of prompts and finished sequences by token prefix: a new request copies the longest cached prefix
into its row and prefills only the rest (continuations, critic turns and revisions mostly reuse the
conversation so far; every request shares its system prompt).

`compile=True` runs decode steps (plain, MTP verification and drafting) through `torch.compile` (see
`duet.engine.runner`): a small model's step is bound by per-op overhead, which the compiled graph removes.
Prefill stays eager.

The engine decides (scheduling, sampling, MTP acceptance, the prefix cache's index); its `Runner` does the tensor
work those decisions ask for (forward passes, cache copies), one op at a time with plain ints for arguments. Under
torchrun the model is split over the ranks and rank 0's runner broadcasts each op, which the other ranks replay on
their parts of the model (`duet.engine.distributed`).

The loop runs in one background thread. `generate` and `submit` may be called from many threads
at once (the dialogues of `duet eval`): their requests join the same batch.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from duet.engine import distributed
from duet.engine.detokenize import TextStream
from duet.engine.sampling import SamplingParams, accept_draft, draft_token, sample, top_logprobs
from duet.errors import CheckpointError, DuetError
from duet.model import Transformer

TextCallback = Callable[[int, str], None]  # (request index, new text)


@dataclass
class GenerationResult:
    """One finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "cancelled" | "error"
    stop_string: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0  # main-model forward passes that produced this completion
    drafted: int = 0  # MTP draft tokens proposed
    accepted: int = 0  # ... and accepted by the main model
    seconds: float = 0.0
    first_token_seconds: float = 0.0  # time to first token: queueing plus prefill
    error: str | None = None  # what went wrong when finish_reason is "error"
    cached_tokens: int = 0  # prompt tokens whose prefill the prefix cache saved
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token of token_ids with params.logprobs > 0:
    # (token id, log-probability) of the target model's top k there (temperature 1), likeliest first, then the
    # emitted token when it is not among them
    token_logprobs: list[float] = field(default_factory=list)  # per token of token_ids: its log-probability under
    # the target model (temperature 1): how sure the model was of what it wrote (the verifier's confidence)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator | None
    max_new: int
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    out: list[int] = field(default_factory=list)
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    finish_reason: str | None = None
    error: str | None = None
    cached: int = 0  # prompt positions taken from the prefix cache
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token of `out`, when asked
    token_logprobs: list[float] = field(default_factory=list)  # per token of `out`


@dataclass
class _Row:
    """An active request in cache row `position in Engine._active`."""

    req: _Request
    length: int  # tokens whose latents are in the main cache; also the position of `last`
    last: int  # the newest token, sampled but not yet fed to the model
    drafts: list[int] = field(default_factory=list)  # MTP's guesses for the tokens after `last`
    draft_logits: list[Tensor] = field(default_factory=list)  # the distribution each was drawn from
    tokens: list[int] = field(default_factory=list)  # the token at every position 0..length (the last is `last`)
    mtp_len: int = 0  # positions whose MTP-layer entries are valid (paired with the verified next token)
    pinned: list = field(default_factory=list)  # prefix-cache blocks on this row's path, kept while it decodes


class Engine:
    """Generates text from a `Transformer` and its tokenizer."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 8, max_seq_len: int | None = None,
                 use_mtp: bool = True, mtp_depth: int = 1, threads: int | None = None, compile: bool = False,
                 prefix_cache_mb: float | None = None, prefix_block: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.args.max_position_embeddings, model.args.max_position_embeddings)
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.eos_ids = _eos_ids(model, tokenizer)
        # torch threads of the decoding loop. A small model on a CPU runs one thread: its ops are so short
        # that waking a second OpenMP thread for each costs more than it saves (2.5x slower decoding with
        # 2 threads than with 1 for the embedded model: `duet bench --threads 1` vs `--threads 2`).
        small_on_cpu = self.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 100_000_000
        self.threads = threads or (1 if small_on_cpu else None)
        self.compile = compile
        if compile and any(p.dtype == torch.float8_e4m3fn for p in model.parameters()):
            raise DuetError("--compile does not run on weights kept FP8 yet (the FP8 experts are dispatched from "
                            "the host, which one compiled graph cannot hold); use --fp8-weights dequantise, or drop "
                            "--compile")
        self.runner = distributed.runner(model, max_batch=max_batch, max_seq_len=self.max_seq_len, compile=compile,
                                         threads=self.threads, prefix_cache_mb=prefix_cache_mb,
                                         prefix_block=prefix_block)
        self._active: list[_Row] = []  # rows 0..len-1 of the cache, in order
        self.prefix_cache = self.runner.prefix  # its index; None: off
        self._prefix_cache = self.prefix_cache  # kept while `set_prefix_cache(False)` turns it off
        self.set_mtp_depth(mtp_depth if use_mtp else 0)
        self._queue: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None

    @property
    def use_mtp(self) -> bool:
        return self.mtp_depth > 0

    def set_mtp_depth(self, depth: int) -> None:
        """Draft `depth` tokens per step with the MTP module (0: plain decoding; no effect without a module).
        Changed between generations only (benchmarks compare depths on one loaded model)."""
        if depth < 0:
            raise ValueError(f"mtp_depth={depth} must be >= 0")
        if self._active:
            raise RuntimeError("the MTP depth cannot change while requests are decoding")
        self.mtp_depth = depth if len(self.model.mtp) > 0 else 0
        if self._prefix_cache is not None and self._prefix_cache.mtp != self.use_mtp:
            # blocks stored without MTP entries cannot serve MTP decoding (nor the reverse: fewer positions)
            self.runner.reset_prefix(self.use_mtp)
        # cache positions a row may write past its last token: the drafts verified with it, then the
        # MTP module's chain, which runs past the accepted tokens (overwritten by the next step)
        self._lookahead = max(1, 2 * self.mtp_depth - 1)

    def set_prefix_cache(self, enabled: bool, clear: bool = False) -> None:
        """Turn the prefix cache off (prefill everything, store nothing) or back on, and/or empty it (`clear`):
        between generations only (benchmarks time prefill with and without it on one loaded model)."""
        if self._active:
            raise RuntimeError("the prefix cache cannot change while requests are decoding")
        self.prefix_cache = self._prefix_cache if enabled else None
        if clear and self._prefix_cache is not None:
            self.runner.reset_prefix(self._prefix_cache.mtp)

    def prefix_cache_stats(self) -> dict | None:
        """Hit rate (prompt tokens reused / looked up), tokens reused, blocks and bytes held, evictions; None
        without a prefix cache."""
        return None if self._prefix_cache is None else self._prefix_cache.summary()

    def occupancy(self) -> tuple[int, int]:
        """(requests waiting for a row, requests decoding in the batch) at this moment: a server's metrics."""
        with self._lock:
            return len(self._queue), len(self._active)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             use_mtp: bool = True, fp8_weights: str = "auto", **kwargs) -> Engine:
        """Model and tokenizer from one checkpoint directory (under torchrun, rank 0's part of the model, the
        other ranks loading theirs: see `duet.engine.distributed`); `fp8_weights`: see `duet.model.load_model`."""
        model = distributed.load_model(path, device, dtype, use_mtp, fp8_weights)
        return cls(model, load_tokenizer(path), use_mtp=use_mtp, **kwargs)

    # ------------------------------------------------------------------ prompts

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Chat messages -> prompt ids through the checkpoint's chat template.

        A final assistant message is a partial reply to continue (the solver's turn after a code
        block ran), otherwise the template opens a new assistant turn.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise CheckpointError("the checkpoint's tokenizer has no chat template (tokenizer_config.json)")
        continuing = bool(messages) and messages[-1]["role"] == "assistant"
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=not continuing, continue_final_message=continuing
        )
        return self.encode(text)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: TextCallback | None = None, cancel: threading.Event | None = None) -> list[GenerationResult]:
        """Complete every prompt; rows refill from the queue as others finish. Results keep prompt order."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        requests = [self._request(p, sp, None if on_text is None else functools.partial(on_text, i), cancel)
                    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))]
        self.start()._enqueue(requests)
        for r in requests:
            r.done.wait()
        return [r.result for r in requests]

    def submit(self, prompt: str | list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> GenerationResult:
        """Generate one completion; safe from many threads at once, whose requests are decoded together
        (continuous batching across callers, e.g. many dialogues in `duet eval`)."""
        return self.generate([prompt], [params], None if on_text is None else (lambda _, t: on_text(t)), cancel)[0]

    def start(self) -> Engine:
        """Start the background thread that runs the decoding loop (done on first use)."""
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="duet-engine", daemon=True)
                self._worker.start()
        return self

    # ------------------------------------------------------------------ the loop

    def _enqueue(self, requests: list[_Request]) -> None:
        with self._lock:
            self._queue.extend(requests)
            self._wakeup.notify_all()

    @torch.inference_mode()
    def _run(self) -> None:
        """The decoding loop: admit waiting requests into free rows, step, retire; sleep when idle."""
        self.runner.setup_thread()
        while True:
            with self._lock:
                while not self._queue and not self._active:
                    self._wakeup.wait()
                admitted = []
                while self._queue and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
            try:
                if admitted:
                    self._admit(admitted)
                for row in self._active:
                    if row.req.cancel is not None and row.req.cancel.is_set():
                        row.req.finish_reason = "cancelled"
                self._step()
            except Exception as e:  # fail the requests in flight, never the loop or the waiting callers
                failed = [row.req for row in self._active] + [r for r in admitted if not r.done.is_set()]
                if self.prefix_cache is not None:  # the rows' entries may be half written: store nothing
                    for row in self._active:
                        self.prefix_cache.release(row.pinned)
                for req in failed:
                    if req.finish_reason is None:
                        req.finish_reason, req.error = "error", f"{type(e).__name__}: {e}"
                self._active = []
                for req in failed:
                    if not req.done.is_set():
                        self._finish(req)
                continue
            self._retire()

    def _request(self, prompt: str | list[int], params: SamplingParams, on_text: Callable[[str], None] | None,
                 cancel: threading.Event | None) -> _Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.max_seq_len - len(ids) - self._lookahead
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_seq_len}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return _Request(ids, params, TextStream(self.tokenizer, list(params.stop)), generator,
                        max_new=min(params.max_new_tokens, room), on_text=on_text, cancel=cancel)

    def _admit(self, reqs: list[_Request]) -> None:
        """Prefill newly admitted requests into the next free rows and sample their first tokens.

        Requests are prefilled together, in groups of similar length (`_prefill_groups`). One that shares
        more of its prompt with an earlier request of the same arrival than with the prefix cache waits for
        that one's prompt to be stored: 16 dialogues that start at once compute their system prompt once."""
        pending = reqs
        while pending:
            wave, pending = self._next_wave(pending)
            for group in self._prefill_groups(wave):
                self._prefill(group)

    def _next_wave(self, reqs: list[_Request]) -> tuple[list[tuple[_Request, int]], list[_Request]]:
        """(the requests to prefill now, each with the prompt tokens the prefix cache holds for it; those that would
        reuse at least two more blocks once the earlier ones' prompts are cached)."""
        prefix = self.prefix_cache
        now: list[tuple[_Request, int]] = []
        later: list[_Request] = []
        for req in reqs:
            if prefix is None:
                now.append((req, 0))
                continue
            cached = prefix.reusable(prefix.match(req.prompt)[1], len(req.prompt))
            b = prefix.block_size
            shared = max((_shared_blocks(req.prompt, other.prompt, b) for other, _ in now), default=0)
            if shared - cached >= 2 * b:
                later.append(req)
            else:
                now.append((req, cached))
        return now, later

    def _prefill_groups(self, reqs: list[tuple[_Request, int]]) -> list[list[_Request]]:
        """The requests (with their cached prompt tokens) in groups to prefill in one forward pass each: sorted by
        the tokens left to compute, a group grows while padding to its longest stays under half its work."""
        todo = sorted(((len(req.prompt) - cached, req) for req, cached in reqs), key=lambda t: t[0])
        groups: list[list[_Request]] = []
        group: list[_Request] = []
        work = 0
        for rest, req in todo:
            if group and (len(group) + 1) * rest > 2 * (work + rest):
                groups.append(group)
                group, work = [], 0
            group.append(req)
            work += rest
        return [*groups, group] if group else groups

    def _prefill(self, reqs: list[_Request]) -> None:
        """Prefill `reqs` into the next free rows in one forward pass (`_prefill_rows`), after copying each
        one's longest cached prefix into its row."""
        first_row = len(self._active)
        self.runner.reserve(max(len(r.prompt) + r.max_new for r in reqs) + self._lookahead + 1)
        prefix = self.prefix_cache
        start = []
        for k, req in enumerate(reqs):
            req.cached, slots = prefix.lookup(req.prompt) if prefix else (0, [])
            if req.cached:
                self.runner.load_prefix(first_row + k, slots, req.cached)
            start.append(req.cached)
        width = max(len(r.prompt) - c for r, c in zip(reqs, start, strict=True))
        if max(start) + width <= self.runner.cache.max_seq_len:
            self._prefill_rows(reqs, start)
        else:  # padding would run off the cache (a long cached prefix beside a long uncached prompt): one by one
            for req, c in zip(reqs, start, strict=True):
                self._prefill_rows([req], [c])

    def _prefill_rows(self, reqs: list[_Request], start: list[int]) -> None:
        """Compute the prompts of `reqs` from positions `start` on, in the next free rows, in one forward pass
        (padded to the longest; the padding's cache entries lie past each row's length and are overwritten
        before they are read); sample each first token and draft with the MTP module."""
        first_row = len(self._active)
        width = max(len(r.prompt) - c for r, c in zip(reqs, start, strict=True))
        last = [len(r.prompt) - c - 1 for r, c in zip(reqs, start, strict=True)]
        ids = [_padded(r.prompt[c:], width) for r, c in zip(reqs, start, strict=True)]
        logits = self.runner.prefill(ids, first_row, start, last)  # [G, V]
        drafting = []
        for k, req in enumerate(reqs):
            req.forward_passes += 1
            n = len(req.prompt)
            first = sample(logits[k], req.params, req.generator) if req.max_new > 0 else None
            req.first_token_at = time.perf_counter()
            row = _Row(req, length=n, last=first if first is not None else 0, mtp_len=start[k],
                       tokens=req.prompt + ([first] if first is not None else []))
            self._active.append(row)
            if first is None:
                req.finish_reason = "length"
            elif not self._emit(row, [first], logits[k:k + 1]):
                drafting.append(k)
        if self.use_mtp and drafting:
            # the MTP module pairs h_p with token p + 1: each row's prompt shifted by one, then its first token
            next_ids = [_padded(r.prompt[c + 1:] + [row.last], width) for r, c, row in
                        zip(reqs, start, self._active[first_row:], strict=True)]
            mtp_logits = self.runner.mtp(next_ids, first_row, start, last)
            # every row is drafted for (rows that already finished are retired before the next step)
            group = self._active[first_row:]
            for row in group:
                if len(row.tokens) > row.length:  # it has a first token: the MTP entries reach the prompt's end
                    row.mtp_len = row.length
            self._draft(group, first_row, mtp_logits, [len(r.prompt) - 1 for r in reqs])
        if self.prefix_cache is not None:  # the prompts, for requests that come while these decode
            for k, row in enumerate(self._active[first_row:]):
                row.pinned = self._store_prefix(first_row + k, row)

    def _step(self) -> None:
        live = [row for row in self._active if row.req.finish_reason is None]
        if len(live) != len(self._active) or not live:
            return  # rows that finished (at admission, or cancelled) are retired first
        if self.use_mtp:
            self._speculative_step()
            return
        active = self._active
        logits = self.runner.decode([[row.last] for row in active], [row.length for row in active])
        for i, (row, token) in enumerate(zip(active, self._sample_rows(active, logits[:, 0]), strict=True)):
            row.req.forward_passes += 1
            row.length += 1
            row.last = token
            row.tokens.append(token)
            self._emit(row, [token], logits[i])

    def _sample_rows(self, rows: list[_Row], logits: Tensor) -> list[int]:
        """The next token of each row from logits [A, V]: one argmax (one device sync) for the greedy rows."""
        greedy = logits.argmax(dim=-1).tolist() if any(r.req.params.greedy for r in rows) else None
        return [greedy[i] if row.req.params.greedy else sample(logits[i], row.req.params, row.req.generator)
                for i, row in enumerate(rows)]

    def _speculative_step(self) -> None:
        """Verify every row's drafts in one forward pass, then draft again with the MTP module."""
        active, k = self._active, self.mtp_depth
        start = [r.length for r in active]
        logits = self.runner.decode([[r.last, *r.drafts] for r in active], start)  # [A, k+1, V]
        next_ids, accepted = [], []
        for i, row in enumerate(active):
            req = row.req
            req.forward_passes += 1
            req.drafted += k
            emitted = []
            for j, (draft, q) in enumerate(zip(row.drafts, row.draft_logits, strict=True)):
                ok, token = accept_draft(logits[i, j], q, draft, req.params, req.generator)
                emitted.append(token)
                if not ok:
                    break
                req.accepted += 1
            else:  # every draft accepted: the main model's next token comes free
                emitted.append(sample(logits[i, k], req.params, req.generator))
            row.length += len(emitted)
            row.last = emitted[-1]
            row.tokens += emitted
            row.mtp_len = row.length  # the MTP pass below writes up to the newest verified token
            # MTP input at position p pairs h_p with token p+1; past the accepted ones the slots are
            # padding whose cache entries are overwritten next step before anyone reads them.
            next_ids.append(emitted + [emitted[-1]] * (k + 1 - len(emitted)))
            accepted.append(len(emitted) - 1)
            self._emit(row, emitted, logits[i])
        logits = self.runner.mtp(next_ids, 0, start, accepted)
        self._draft(active, 0, logits, [s + a for s, a in zip(start, accepted, strict=True)])

    def _draft(self, rows: list[_Row], first_row: int, logits: Tensor, positions: list[int]) -> None:
        """Draft `mtp_depth` tokens per row (cache rows first_row..) from the MTP module's logits [A, V] at
        `positions` (each row's newest token): the first from them, each next one by running the module
        again on its own hidden state and the token just drafted, one position further on."""
        drafts: list[list[int]] = [[] for _ in rows]
        dists: list[list[Tensor]] = [[] for _ in rows]
        for depth in range(self.mtp_depth):
            for i, row in enumerate(rows):
                dists[i].append(logits[i])
                drafts[i].append(draft_token(logits[i], row.req.params, row.req.generator))
            if depth + 1 == self.mtp_depth:
                break
            positions = [p + 1 for p in positions]
            logits = self.runner.draft([d[-1] for d in drafts], first_row, positions)
        for i, row in enumerate(rows):
            row.drafts, row.draft_logits = drafts[i], dists[i]

    def _emit(self, row: _Row, tokens: list[int], logits: Tensor) -> bool:
        """Hand new tokens to the request; returns True when it finished. `logits` [>= len(tokens), V]: the main
        model's logits that each token was chosen from (read for the request's top log-probabilities)."""
        req = row.req
        for j, t in enumerate(tokens):
            if req.params.stop_at_eos and t in self.eos_ids:
                req.finish_reason = "eos"
                break
            req.out.append(t)
            logp = logits[j].float().log_softmax(dim=-1)  # once: the token's own and, if asked, the top k
            req.token_logprobs.append(float(logp[t]))
            if req.params.logprobs:
                req.top_logprobs.append(top_logprobs(logp, req.params.logprobs, t))
            delta, stopped = req.stream.add([t])
            if delta and req.on_text:
                req.on_text(delta)
            if stopped:
                req.finish_reason = "stop"
                break
            if len(req.out) >= req.max_new:
                req.finish_reason = "length"
                break
        return req.finish_reason is not None

    def _retire(self) -> None:
        """Remove finished rows, moving the last active row into each freed cache row."""
        for i in reversed(range(len(self._active))):
            row = self._active[i]
            if row.req.finish_reason is None:
                continue
            if self.prefix_cache is not None:  # its whole verified sequence, before the row is reused
                self.prefix_cache.release(self._store_prefix(i, row))
                self.prefix_cache.release(row.pinned)
            self._finish(row.req)
            last = len(self._active) - 1
            if i != last:
                moved = self._active[last]
                self.runner.move_row(last, i, moved.length + 2)
                self._active[i] = moved
            self._active.pop()

    def _store_prefix(self, i: int, row: _Row) -> list:
        """Store the verified whole blocks of cache row `i` (holding `row`) in the prefix cache; returns their path
        (one reference each, for `release`)."""
        path, new = self.prefix_cache.insert(row.tokens, row.length, row.mtp_len)
        if new:
            self.runner.store_prefix(i, new)
        return path

    def _finish(self, req: _Request) -> None:
        """Flush the stream, record the result and wake the caller."""
        if req.finish_reason != "stop":
            rest = req.stream.finish()
            if rest and req.on_text:
                req.on_text(rest)
        req.result = GenerationResult(
            text=req.stream.text, token_ids=req.out, finish_reason=req.finish_reason or "length",
            stop_string=req.stream.stop_string, prompt_tokens=len(req.prompt), completion_tokens=len(req.out),
            forward_passes=req.forward_passes, drafted=req.drafted, accepted=req.accepted,
            seconds=time.perf_counter() - req.started, error=req.error, cached_tokens=req.cached,
            first_token_seconds=(req.first_token_at or time.perf_counter()) - req.started,
            top_logprobs=req.top_logprobs if req.params.logprobs else None, token_logprobs=req.token_logprobs,
        )
        req.done.set()


def _padded(ids: list[int], width: int) -> list[int]:
    """`ids` padded to `width` with its last token (any token would do: padding's outputs are never read)."""
    return ids + [ids[-1]] * (width - len(ids))


def _shared_blocks(a: list[int], b: list[int], block: int) -> int:
    """Tokens in the whole blocks that `a` and `b` start with alike."""
    n = 0
    while n + block <= min(len(a), len(b)) and a[n:n + block] == b[n:n + block]:
        n += block
    return n


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (and chat template) through transformers."""
    from transformers import AutoTokenizer

    directory = Path(path)
    # the vocabulary itself: a fast tokenizer's tokenizer.json, a SentencePiece model, or BPE vocab.json
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{directory}: no tokenizer.json (nor tokenizer.model); copy the checkpoint's "
                              "tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _eos_ids(model: Transformer, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), model.args.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids

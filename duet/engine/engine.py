"""The generation engine: continuous batching over a latent KV cache, with MTP speculative decoding.

A plain loop in the spirit of gpt-fast. Requests wait in a queue; up to `max_batch` of them are
active, each in one row of a preallocated `KVCache`. A new request is prefilled alone into a free
row, then decodes together with the others, one token per step (or, with MTP, up to two):

    plain step:  feed each row's last token            -> sample the next token
    MTP step:    feed [last token, drafted token]      -> verify the draft with the main model,
                 sample the bonus token if accepted    -> run the MTP module to draft the next one

When a row finishes (EOS, a stop string, max_new_tokens, or the cache is full), the last active
row moves into its place, so active rows stay contiguous and the next request takes the freed row.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from duet.engine.detokenize import TextStream
from duet.engine.sampling import SamplingParams, accept_draft, draft_token, sample
from duet.errors import CheckpointError
from duet.model import CacheView, KVCache, Transformer, load_model

TextCallback = Callable[[int, str], None]  # (request index, new text)


@dataclass
class GenerationResult:
    """One finished completion."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" | "cancelled"
    stop_string: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0  # main-model forward passes that produced this completion
    drafted: int = 0  # MTP draft tokens proposed
    accepted: int = 0  # ... and accepted by the main model
    seconds: float = 0.0


@dataclass
class _Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator | None
    max_new: int
    started: float = field(default_factory=time.perf_counter)
    out: list[int] = field(default_factory=list)
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    finish_reason: str | None = None


@dataclass
class _Row:
    """An active request in cache row `position in Engine._active`."""

    req: _Request
    length: int  # tokens whose latents are in the main cache; also the position of `last`
    last: int  # the newest token, sampled but not yet fed to the model
    draft: int | None = None  # MTP's guess for the token after `last`
    draft_logits: Tensor | None = None


class Engine:
    """Generates text from a `Transformer` and its tokenizer."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch: int = 8, max_seq_len: int | None = None,
                 use_mtp: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.args.max_position_embeddings, model.args.max_position_embeddings)
        self.use_mtp = use_mtp and len(model.mtp) > 0
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.eos_ids = _eos_ids(model, tokenizer)
        self.cache: KVCache | None = None
        self._active: list[_Row] = []

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             use_mtp: bool = True, **kwargs) -> Engine:
        """Model and tokenizer from one checkpoint directory."""
        model = load_model(path, device=device, dtype=dtype, mtp=use_mtp)
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

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: TextCallback | None = None, cancel: threading.Event | None = None) -> list[GenerationResult]:
        """Complete every prompt; rows refill from the queue as others finish. Results keep prompt order."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        requests = [self._request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))]
        self._reserve(requests)
        queue, done = deque(requests), []
        self._active = []
        while queue or self._active:
            if cancel is not None and cancel.is_set():
                for r in [row.req for row in self._active] + list(queue):
                    r.finish_reason = "cancelled"
                done += [row.req for row in self._active] + list(queue)
                queue.clear()
                self._active = []
                break
            while queue and len(self._active) < self.max_batch:
                self._admit(queue.popleft(), on_text)
            self._step(on_text)
            done += self._retire()
        return [self._result(r) for r in sorted(done, key=lambda r: r.index)]

    def _request(self, index: int, prompt: str | list[int], params: SamplingParams) -> _Request:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        room = self.max_seq_len - len(ids) - 1  # one slot for the draft token verified with the last one
        if room < 1:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the context holds {self.max_seq_len}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return _Request(index, ids, params, TextStream(self.tokenizer, list(params.stop)), generator,
                        max_new=min(params.max_new_tokens, room))

    def _reserve(self, requests: list[_Request]) -> None:
        """Allocate (or grow) the cache for the longest request and the batch size."""
        need_len = max((len(r.prompt) + r.max_new + 2 for r in requests), default=1)
        need_len = min(need_len, self.max_seq_len + 1)
        rows = min(self.max_batch, max(len(requests), 1))
        c = self.cache
        if c is None or c.batch_size < rows or c.max_seq_len < need_len:
            rows = max(rows, c.batch_size if c else 0)
            need_len = max(need_len, c.max_seq_len if c else 0)
            self.cache = None  # free the old one first
            self.cache = KVCache(self.model.args, self.model.n_cache_layers, rows, need_len, self.device, self.dtype)

    def _view(self, rows: slice, start: list[int]) -> CacheView:
        return CacheView(self.cache, rows, torch.tensor(start, device=self.device))

    def _admit(self, req: _Request, on_text: TextCallback | None) -> None:
        """Prefill a request alone into the next free row and sample its first token."""
        i = len(self._active)
        n = len(req.prompt)
        ids = torch.tensor([req.prompt], device=self.device)
        h = self.model.hidden(ids, self._view(slice(i, i + 1), [0]))
        req.forward_passes += 1
        first = sample(self.model.logits(h[0, -1]), req.params, req.generator) if req.max_new > 0 else None
        row = _Row(req, length=n, last=first if first is not None else 0)
        self._active.append(row)
        if first is None:
            req.finish_reason = "length"
            return
        if self._emit(row, [first], on_text) or not self.use_mtp:
            return
        next_ids = torch.tensor([req.prompt[1:] + [first]], device=self.device)
        mtp_logits, _ = self.model.mtp_logits(0, h, next_ids, self._view(slice(i, i + 1), [0]))
        self._set_draft(row, mtp_logits[0, -1])

    def _set_draft(self, row: _Row, logits: Tensor) -> None:
        row.draft_logits = logits
        row.draft = draft_token(logits, row.req.params, row.req.generator)

    def _step(self, on_text: TextCallback | None) -> None:
        live = [row for row in self._active if row.req.finish_reason is None]
        if len(live) != len(self._active) or not live:
            return  # rows that finished at admission are retired first
        if self.use_mtp:
            self._speculative_step(on_text)
            return
        rows = slice(0, len(self._active))
        tokens = torch.tensor([[row.last] for row in self._active], device=self.device)
        logits = self.model.logits(self.model.hidden(tokens, self._view(rows, [r.length for r in self._active])))
        for i, row in enumerate(self._active):
            row.req.forward_passes += 1
            row.length += 1
            row.last = sample(logits[i, 0], row.req.params, row.req.generator)
            self._emit(row, [row.last], on_text)

    def _speculative_step(self, on_text: TextCallback | None) -> None:
        """Verify every row's draft in one forward pass, then draft again with the MTP module."""
        active = self._active
        rows = slice(0, len(active))
        start = [r.length for r in active]
        tokens = torch.tensor([[r.last, r.draft] for r in active], device=self.device)
        h = self.model.hidden(tokens, self._view(rows, start))  # [A, 2, D]
        logits = self.model.logits(h)
        next_ids, pick = [], []
        for i, row in enumerate(active):
            req = row.req
            req.forward_passes += 1
            req.drafted += 1
            accepted, token = accept_draft(logits[i, 0], row.draft_logits, row.draft, req.params, req.generator)
            if accepted:
                req.accepted += 1
                bonus = sample(logits[i, 1], req.params, req.generator)
                emitted = [row.draft, bonus]
            else:
                emitted = [token]
            row.length += len(emitted)
            row.last = emitted[-1]
            # MTP input at position p pairs h_p with token p+1; a rejected row's second slot is padding
            # whose cache entry is overwritten next step before anyone reads it.
            next_ids.append(emitted if accepted else [token, token])
            pick.append(1 if accepted else 0)
            self._emit(row, emitted, on_text)
        mtp_logits, _ = self.model.mtp_logits(0, h, torch.tensor(next_ids, device=self.device),
                                              self._view(rows, start))
        for i, row in enumerate(active):
            if row.req.finish_reason is None:
                self._set_draft(row, mtp_logits[i, pick[i]])

    def _emit(self, row: _Row, tokens: list[int], on_text: TextCallback | None) -> bool:
        """Hand new tokens to the request; returns True when it finished."""
        req = row.req
        for t in tokens:
            if req.params.stop_at_eos and t in self.eos_ids:
                req.finish_reason = "eos"
                break
            req.out.append(t)
            delta, stopped = req.stream.add([t])
            if delta and on_text:
                on_text(req.index, delta)
            if stopped:
                req.finish_reason = "stop"
                break
            if len(req.out) >= req.max_new:
                req.finish_reason = "length"
                break
        if req.finish_reason and req.finish_reason != "stop":
            rest = req.stream.finish()
            if rest and on_text:
                on_text(req.index, rest)
        return req.finish_reason is not None

    def _retire(self) -> list[_Request]:
        """Remove finished rows, moving the last active row into each freed cache row."""
        finished = []
        for i in reversed(range(len(self._active))):
            row = self._active[i]
            if row.req.finish_reason is None:
                continue
            finished.append(row.req)
            last = len(self._active) - 1
            if i != last:
                moved = self._active[last]
                n = moved.length + 2
                self.cache.kv[:, i, :n] = self.cache.kv[:, last, :n]
                self.cache.pe[:, i, :n] = self.cache.pe[:, last, :n]
                self._active[i] = moved
            self._active.pop()
        return finished

    def _result(self, req: _Request) -> GenerationResult:
        return GenerationResult(
            text=req.stream.text, token_ids=req.out, finish_reason=req.finish_reason or "length",
            stop_string=req.stream.stop_string, prompt_tokens=len(req.prompt), completion_tokens=len(req.out),
            forward_passes=req.forward_passes, drafted=req.drafted, accepted=req.accepted,
            seconds=time.perf_counter() - req.started,
        )


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (and chat template) through transformers."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
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

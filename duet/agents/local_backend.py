"""The local backend: duet's own engine on a checkpoint, through the checkpoint's chat template.

`make_backend("local:<checkpoint dir>")` builds one; an empty directory means the embedded default
model. Many dialogues may call one backend from many threads: the engine decodes their requests
together in one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

from duet.agents.backends import (
    BackendError,
    Completion,
    ContextFullError,
    Message,
    Request,
    TextCallback,
    is_context_full,
    option,
)
from duet.agents.verifier import ConfidenceHead


@dataclass(frozen=True)
class LocalOptions:
    """The local backend's options: the engine's runtime. duet's commands pass the settings named here."""

    device: str = option("text", "cpu", setting="device")
    dtype: str = option("text", "float32", setting="dtype")  # float32, bfloat16, float16 (fp32, bf16, fp16)
    # auto, keep, dequantise (duet.model.checkpoint.keeps_fp8). Left out of eval fingerprints: it changes memory and
    # speed, answers only by FP8 rounding and only for FP8 checkpoints, and "auto" resolves per machine anyway
    fp8_weights: str = option("text", "auto", setting="fp8_weights", answers=False)
    mtp: bool = option("bool", True, setting="mtp", unset="auto")  # "auto": resolved by duet.app.backends
    compile: bool = option("bool", False, setting="compile", answers=False)
    max_batch: int = option("count", 8, answers=False)
    max_seq_len: int | None = option("count", None)  # None: the model's own
    prefix_cache_mb: float | None = option("MiB or 0", None, answers=False)  # its budget (0: none; None: default)


_ENGINES: dict[tuple, Any] = {}
_ENGINES_LOCK = threading.Lock()


class LocalBackend:
    """A `Backend` over a `duet.engine.Engine`."""

    concurrent = True  # requests from many threads are decoded together (continuous batching)
    model_backed = True  # a model answers (not a script): the critic's verifier is on by default

    def __init__(self, engine: Any, name: str):
        self.engine = engine
        self.name = name
        self.verifier_head: ConfidenceHead | None = None  # the model's, beside its weights (verifier.py)

    @classmethod
    def load(cls, path: str | Path | None = None, options: LocalOptions = LocalOptions()) -> LocalBackend:
        """Load (or reuse, when solver and critic share a checkpoint) the engine for `path`."""
        import torch

        from duet.engine import Engine
        from duet.errors import DuetError
        from duet.model.embedded import EMBEDDED_DIR, default_model_path
        from duet.model.parallel import World
        from duet.model.plan import check_fits

        o = options
        torch_dtype = getattr(torch, _DTYPE_ALIASES.get(o.dtype, o.dtype), None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise BackendError(f"dtype {o.dtype!r} is not supported; use float32, bfloat16 or float16")
        try:
            directory = Path(path).expanduser() if path else default_model_path()
            key = (str(directory.resolve()), *astuple(replace(o, dtype=str(torch_dtype))))  # bf16 = bfloat16
            with _ENGINES_LOCK:
                if key not in _ENGINES:
                    # before a weight is read; under torchrun each rank holds its part (duet.engine.distributed)
                    check_fits(directory, o.device, torch_dtype, o.mtp, nproc=World.current().size,
                               fp8_weights=o.fp8_weights)
                    _ENGINES[key] = Engine.load(directory, device=o.device, dtype=torch_dtype, use_mtp=o.mtp,
                                                fp8_weights=o.fp8_weights,
                                                max_batch=o.max_batch, max_seq_len=o.max_seq_len, compile=o.compile,
                                                prefix_cache_mb=o.prefix_cache_mb)
        except DuetError as e:
            raise BackendError(str(e)) from None
        embedded = directory.resolve() == EMBEDDED_DIR.resolve()  # its folder is just "model"
        backend = cls(_ENGINES[key], name="local:embedded" if embedded else f"local:{directory.name}")
        backend.verifier_head = ConfidenceHead.load(directory)
        return backend

    def complete(self, messages: Sequence[Message], request: Request = Request(), *,
                 on_text: TextCallback | None = None, cancel: threading.Event | None = None) -> Completion:
        from duet.engine import SamplingParams

        try:
            prompt = self.engine.encode_chat(messages)
            params = SamplingParams(max_new_tokens=request.max_tokens, temperature=request.temperature,
                                    seed=request.seed, stop=list(request.stop), logprobs=request.logprobs)
            r = self.engine.submit(prompt, params, on_text=on_text, cancel=cancel)
        except ValueError as e:  # the prompt does not fit the context, bad sampling values
            error = ContextFullError if is_context_full(str(e)) else BackendError
            raise error(f"{self.name}: {e}") from None
        if r.finish_reason == "error":
            raise BackendError(f"{self.name}: generation failed ({r.error})")
        return Completion(text=r.text, finish_reason=r.finish_reason, stop_string=r.stop_string,
                          prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, seconds=r.seconds,
                          top_logprobs=None if r.top_logprobs is None else [self._by_text(t) for t in r.top_logprobs],
                          token_logprobs=r.token_logprobs)

    def _by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """The engine's (token id, log-probability) pairs as Completion's token text -> log-probability; tokens
        that decode alike keep the likeliest."""
        by_text: dict[str, float] = {}
        for token, logprob in top:
            by_text.setdefault(self.engine.tokenizer.decode([token]), logprob)
        return by_text


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def from_spec(argument: str, **options: Any) -> LocalBackend:
    """`local:<dir>` (empty: the embedded default model); options: :class:`LocalOptions`."""
    return LocalBackend.load(argument or None, LocalOptions(**options))

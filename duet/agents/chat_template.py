"""The served model's chat template, rendered by duet: for servers that cannot continue an assistant message.

Such a server (``transformers serve`` answers HTTP 422 to ``continue_final_message``; llama-cpp-python's
server ignores it) still takes a raw prompt at ``/v1/completions``. duet renders the conversation with the
model's own template (transformers' ``apply_chat_template(..., continue_final_message=True)``: the partial
reply stays open) and sends that text.

Where the tokenizer comes from, first found wins: the ``tokenizer`` option, ``$DUET_TOKENIZER`` (both named by
the user: a directory or a Hugging Face id, downloaded if need be), then what the server says of its model: the
model's name and vLLM's/SGLang's ``root`` in ``/v1/models`` (``transformers serve`` names a model by its path or
Hub id). Those are only taken from this machine: a directory, or a Hub id already in the local cache (the server
downloaded it there), never fetched on a guess.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duet.agents.backends import BackendError, Message


@dataclass(frozen=True)
class Source:
    """Where a tokenizer may be: a directory or a Hub id; ``named``: the user named it (an error to load it is
    theirs to see), else a guess from the server's metadata (skipped unless it is on this machine)."""

    where: str
    named: bool


def template_sources(option: str | None, served: Sequence[str]) -> list[Source]:
    """The places to look, in order: the ``tokenizer`` option, else ``$DUET_TOKENIZER``, else ``served`` (the
    model's name and paths the server gives for it)."""
    named = option or os.environ.get("DUET_TOKENIZER")
    if named:
        return [Source(_expanded(named), True)]
    return [Source(_expanded(s), False) for s in dict.fromkeys(s for s in served if s)]


def _expanded(where: str) -> str:
    path = Path(where).expanduser()
    return str(path) if path.is_dir() else where


def _on_this_machine(where: str) -> bool:
    """A directory, or a Hub id whose tokenizer is in the local cache."""
    if Path(where).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(where, "tokenizer_config.json"), str)
    except Exception:  # not a valid Hub id (a server's alias, a path elsewhere)
        return False


def load_tokenizer(sources: Sequence[Source]) -> Any | None:
    """The first of ``sources`` that loads and has a chat template; None when none does."""
    sources = [s for s in sources if s.named or _on_this_machine(s.where)]
    if not sources:
        return None  # without importing transformers (seconds)
    from transformers import AutoTokenizer

    for source in sources:
        try:
            # a guess is loaded only from this machine; a name the user gave may be downloaded
            tokenizer = AutoTokenizer.from_pretrained(source.where, local_files_only=not source.named)
        except Exception as error:  # transformers raises OSError, ValueError, and others for a bad directory
            if source.named:
                raise BackendError(f"cannot load the tokenizer {source.where!r} to render the chat template: "
                                   f"{type(error).__name__}: {error}") from error
            continue
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
        if source.named:
            raise BackendError(f"the tokenizer {source.where!r} has no chat template")
    return None


class ChatTemplate:
    """A tokenizer's chat template (``tokenizer``: a loaded transformers tokenizer); thread-safe."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self._lock = threading.Lock()  # fast tokenizers are not safe to call from many threads at once

    def continuation(self, messages: Sequence[Message]) -> str:
        """The prompt text that ends inside the last (assistant) message, ready to be continued."""
        tok = self.tokenizer
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        with self._lock:
            try:
                text = tok.apply_chat_template(plain, tokenize=False, continue_final_message=True)
            except Exception as error:  # jinja's errors have many types
                raise BackendError(f"the chat template of {self.source!r} failed: {type(error).__name__}: "
                                   f"{error}") from error
            bos = tok.bos_token
            # the server tokenizes the prompt with its special tokens: a BOS written by the template would double
            if bos and text.startswith(bos) and tok("x").input_ids[:1] == [tok.bos_token_id]:
                text = text[len(bos) :]
        return str(text)

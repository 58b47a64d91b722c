"""The served model's chat template, rendered by duet: for servers that cannot continue an assistant message.

Such a server (``transformers serve`` answers HTTP 422 to ``continue_final_message``; llama-cpp-python's
server ignores it) still takes a raw prompt at ``/v1/completions``. duet renders the conversation with the
model's own template (transformers' ``apply_chat_template(..., continue_final_message=True)``: the partial
reply stays open) and sends that text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from duet.agents.backends import BackendError, Message


def template_source(option: str | None, model: str | None) -> str | None:
    """Where the served model's tokenizer is: the ``tokenizer`` option, else ``$DUET_TOKENIZER``, else the model
    name when it is a local directory (``transformers serve`` names a model by its path); None: nowhere known."""
    for candidate in (option, os.environ.get("DUET_TOKENIZER")):
        if candidate:
            return candidate
    if model and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    return None


class ChatTemplate:
    """A tokenizer's chat template, loaded on first use (once, whichever thread asks first)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(self.source)
                except (OSError, ValueError) as error:
                    raise BackendError(f"cannot load the tokenizer {self.source!r} to render the chat template: "
                                       f"{error}") from error
                if not getattr(self._tokenizer, "chat_template", None):
                    raise BackendError(f"the tokenizer {self.source!r} has no chat template")
        return self._tokenizer

    def continuation(self, messages: Sequence[Message]) -> str:
        """The prompt text that ends inside the last (assistant) message, ready to be continued."""
        tok = self.tokenizer()
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text = tok.apply_chat_template(plain, tokenize=False, continue_final_message=True)
        except Exception as error:  # jinja's errors have many types
            raise BackendError(f"the chat template of {self.source!r} failed: {type(error).__name__}: {error}") \
                from error
        bos = tok.bos_token
        # the server tokenizes the prompt with its special tokens: a BOS written by the template would double
        if bos and text.startswith(bos) and tok("x").input_ids[:1] == [tok.bos_token_id]:
            text = text[len(bos) :]
        return str(text)

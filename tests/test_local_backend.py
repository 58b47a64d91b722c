"""The local backend: duet's engine behind the agents' Backend interface."""

from __future__ import annotations

import pytest

from duet.agents.backends import BackendError, ContextFullError, Request, make_backend
from duet.agents.dialogue import DialogueConfig, run_dialogue
from duet.engine import SamplingParams
from tests.tiny_models import make_engine_checkpoint


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return make_backend(f"local:{make_engine_checkpoint(tmp_path_factory.mktemp('local'), seed=2)}", mtp=True)


def test_complete_matches_the_engine_on_the_chat_prompt(backend):
    messages = [{"role": "user", "content": "Tom has 12 apples. How many?"}]
    pieces: list[str] = []
    c = backend.complete(messages, Request(max_tokens=20), on_text=pieces.append)
    ids = backend.engine.encode_chat(messages)
    [r] = backend.engine.generate([ids], SamplingParams(max_new_tokens=20))
    assert c.text == r.text == "".join(pieces)
    assert c.completion_tokens == r.completion_tokens and c.prompt_tokens == len(ids)
    assert c.finish_reason in ("eos", "length")
    assert c.top_logprobs is None  # not asked for


def test_top_logprobs_pass_through_from_the_engine(backend):
    messages = [{"role": "user", "content": "Tom has 12 apples. How many?"}]
    c = backend.complete(messages, Request(max_tokens=8, logprobs=3))
    [r] = backend.engine.generate([backend.engine.encode_chat(messages)], SamplingParams(max_new_tokens=8, logprobs=3))
    decode = backend.engine.tokenizer.decode
    assert len(c.top_logprobs) == c.completion_tokens == len(r.top_logprobs)
    for by_text, pairs in zip(c.top_logprobs, r.top_logprobs, strict=True):  # by text; alike tokens keep the likeliest
        texts = {decode([i]) for i, _ in pairs}
        assert by_text == {text: max(v for i, v in pairs if decode([i]) == text) for text in texts}
        assert 1 <= len(by_text) <= 3


def test_continuation_extends_the_partial_assistant_message(backend):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "```python\nprint(2+2)\n"}]
    prompt = backend.engine.tokenizer.decode(backend.engine.encode_chat(messages))
    assert prompt.endswith("<|assistant|>```python\nprint(2+2)\n")
    assert backend.complete(messages, Request(max_tokens=5)).completion_tokens <= 5


def test_stop_string_is_reported(backend):
    messages = [{"role": "user", "content": "Go"}]
    free = backend.complete(messages, Request(max_tokens=40))
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = backend.complete(messages, Request(max_tokens=40, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_string == stop and cut.text == free.text[: free.text.find(stop)]


def test_prompt_longer_than_context_is_context_full(backend):
    with pytest.raises(ContextFullError, match="context holds"):
        backend.complete([{"role": "user", "content": "many words " * 400}], Request(max_tokens=4))


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(BackendError) as info:
        make_backend(f"local:{tmp_path / 'nope'}")
    assert "no such checkpoint directory" in str(info.value) and "\n" not in str(info.value)


def test_dialogue_on_a_random_local_model_terminates_cleanly(backend):
    """A random model writes no protocol: the dialogue must still end with a clear result."""
    result = run_dialogue("Tom has 12 apples and buys 35 more. How many?", backend,
                          config=DialogueConfig(max_rounds=2, max_tokens=40, max_steps=2))
    assert result.stop_reason in ("no_answer", "max_rounds", "repeated_reply", "agreed", "token_budget")
    assert result.turns and result.turns[0].model.startswith("local:")


def test_compile_option_reaches_the_engine(tmp_path):
    ckpt = make_engine_checkpoint(tmp_path / "m", seed=3)
    assert make_backend(f"local:{ckpt}", compile=True).engine.compile
    assert not make_backend(f"local:{ckpt}").engine.compile

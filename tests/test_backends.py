"""The backend interface, the scripted backend and make_backend."""

from __future__ import annotations

import json
import threading
import time

import pytest

from duet.agents import backends
from duet.agents.backends import (
    Backend,
    BackendError,
    Request,
    ScriptedBackend,
    StreamCutter,
    count_tokens,
    make_backend,
    register_backend,
)
from duet.agents.protocol import STOP

SOLUTION = "Add.\n```python\nprint(2 + 2)\n```\n```output\nPLACEHOLDER\n```\nSo \\boxed{4}."
USER = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2+2?"}]


def test_scripted_backend_is_a_backend():
    assert isinstance(ScriptedBackend(["x"]), Backend)


def test_scripted_stops_at_stop_string_and_continues_after_the_placeholder_output():
    backend = ScriptedBackend([SOLUTION])
    pieces: list[str] = []
    first = backend.complete(USER, Request(stop=[STOP]), on_text=pieces.append)
    assert first.text == "Add.\n```python\nprint(2 + 2)\n```\n"
    assert (first.finish_reason, first.stop_string) == ("stop", STOP)
    assert "".join(pieces) == first.text and len(pieces) > 1
    partial = first.text + "```output\n4\n```\n"
    second = backend.complete([*USER, {"role": "assistant", "content": partial}], Request(stop=[STOP]))
    assert second.text == "So \\boxed{4}."
    assert (second.finish_reason, second.stop_string) == ("eos", None)
    assert second.completion_tokens == 2 and second.prompt_tokens == count_tokens("s What is 2+2? " + partial)


def test_scripted_max_tokens_cuts_with_length():
    done = ScriptedBackend(["one two three four"]).complete(USER, Request(max_tokens=2))
    assert (done.text, done.finish_reason, done.completion_tokens) == ("one two", "length", 2)


def test_scripted_match_by_substring_or_regex_then_in_order():
    backend = ScriptedBackend(["first", "second"], match={"2+2": "four", r"capital of \w+": "Paris"})
    assert backend.complete(USER).text == "four"
    assert backend.complete([{"role": "user", "content": "the capital of France?"}]).text == "Paris"
    assert backend.complete([{"role": "user", "content": "other"}]).text == "first"
    assert backend.complete([{"role": "user", "content": "other"}]).text == "second"
    with pytest.raises(BackendError, match="no scripted reply left"):
        backend.complete([{"role": "user", "content": "other"}])


def test_scripted_callable_and_exception_replies_and_recorded_calls():
    backend = ScriptedBackend(lambda messages: f"echo {messages[-1]['content']}")
    done = backend.complete(USER, Request(stop=["x"], max_tokens=7, temperature=0.5, seed=3))
    assert done.text == "echo What is 2+2?"
    call = backend.calls[0]
    assert call.request == Request(stop=("x",), max_tokens=7, temperature=0.5, seed=3)
    assert done.top_logprobs is None  # a script has no log-probabilities
    with pytest.raises(BackendError, match="down"):
        ScriptedBackend([BackendError("server down")]).complete(USER)


def test_scripted_timeout_and_cancel():
    started = time.perf_counter()
    with pytest.raises(BackendError, match="no reply within 0.05 s"):
        ScriptedBackend(["late"], delay=10, timeout=0.05).complete(USER)
    assert time.perf_counter() - started < 2
    cancel = threading.Event()
    cancel.set()
    done = ScriptedBackend(["late"], delay=10).complete(USER, cancel=cancel)
    assert (done.text, done.finish_reason) == ("", "cancelled")


def test_stream_cutter_holds_back_partial_stop_strings():
    seen: list[str] = []
    cutter = StreamCutter(["```output"], seen.append)
    for piece in ["a\n``", "`\n``", "`out", "put\nignored"]:
        if cutter.feed(piece):
            break
    assert cutter.text == "a\n```\n" and cutter.stop_string == "```output"
    assert "".join(seen) == "a\n```\n"
    plain = StreamCutter(["STOP"], seen.append)
    plain.feed("abc ST")
    assert plain.finish() == "abc ST" and plain.stop_string is None


def test_make_backend_scripted_from_json(tmp_path):
    path = tmp_path / "replies.json"
    path.write_text(json.dumps({"replies": ["hello"], "match": {"capital": "Paris"}}))
    backend = make_backend(f"scripted:{path}")
    assert backend.name == "scripted:replies.json"
    assert backend.complete(USER).text == "hello"
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    assert make_backend(f"scripted:{tmp_path / 'list.json'}").complete(USER).text == "a"


def test_make_backend_errors_are_one_line(tmp_path):
    with pytest.raises(BackendError, match="unknown backend 'nope:x'; use one of: local:..., openai:..."):
        make_backend("nope:x")
    with pytest.raises(BackendError, match="cannot read scripted replies"):
        make_backend(f"scripted:{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BackendError, match="not valid JSON"):
        make_backend(f"scripted:{tmp_path / 'bad.json'}")


def test_register_backend_plugs_in_factories_and_lazy_imports(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))  # keep the registry clean
    register_backend("echo-test", lambda argument, **kw: ScriptedBackend([argument], name="echo"))
    assert make_backend("echo-test:hi").complete(USER).text == "hi"
    register_backend("lazy-test", "duet.agents.backends:scripted_from_spec")
    with pytest.raises(BackendError, match="cannot read"):
        make_backend("lazy-test:/nonexistent.json")
    register_backend("broken-test", "duet.no_such_module:factory")
    with pytest.raises(BackendError, match="backend 'broken-test' is not available"):
        make_backend("broken-test:x")

"""The OpenAI-compatible client against a real HTTP server on loopback, started by the test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from duet.agents.backends import BackendError, ContextFullError, Request, ScriptedBackend, make_backend
from duet.agents.openai_backend import OpenAIBackend, ThinkSplitter, forget_servers, normalize_base_url
from duet.agents.protocol import STOP
from tests.processes import free_port

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]

Responder = Callable[[BaseHTTPRequestHandler, dict[str, Any]], None]


class FakeServer:
    """A tiny OpenAI-compatible server: records requests, answers with ``respond``.

    ``continues`` is how it treats a final assistant message: "honours" ``continue_final_message`` (vLLM),
    "prefills" it with or without the field (llama.cpp), "ignores" the field and closes the turn (llama-cpp-python)
    or "rejects" the field (``transformers serve``: HTTP 422). It answers duet's probes (one token asked for)
    itself, counting prompt tokens as a chat template would: a header and an end per message, a character a token.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.respond: Responder = lambda h, body: sse(h, [content_chunk("hi"), finish_chunk("stop")])
        self.continues = "honours"
        self.url = ""
        self.models: list[dict[str, Any]] = [{"id": "served-model"}]

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if "continue_final_message" in body and self.continues == "rejects":
            fields = "{'add_generation_prompt', 'continue_final_message'}"
            return send(handler, 422, json.dumps({"detail": f"Unexpected fields in the request: {fields}"}))
        if body.get("max_tokens") == 1 and handler.path.endswith("/chat/completions"):
            usage = {"prompt_tokens": self.prompt_tokens(body), "completion_tokens": 1}
            echo = body["messages"][-1]["content"] if self.echoes(body) else ""
            reply = {"choices": [{"index": 0, "message": {"content": echo + "!"}, "finish_reason": "length"}],
                     "usage": usage}
            return send(handler, 200, json.dumps(reply))
        self.respond(handler, body)

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        messages = body["messages"]
        kept_open = messages[-1]["role"] == "assistant" and (
            self.continues == "prefills" or (self.continues == "honours" and "continue_final_message" in body))
        closed = sum(2 + len(m["content"]) for m in messages)
        return closed - 1 if kept_open else closed + 1  # no end of the open message, or a new header

    def echoes(self, body: dict[str, Any]) -> bool:
        """llama.cpp repeats the partial reply it continues at the start of its own."""
        return self.continues == "prefills" and body["messages"][-1]["role"] == "assistant"

    def served(self) -> list[dict[str, Any]]:
        """The requests other than duet's continuation probes."""
        return [r for r in self.requests if r["body"].get("max_tokens") != 1]


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:  # client hung up: expected
        pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            payload = json.dumps({"object": "list", "data": state.models}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            state.answer(self, body)

    httpd = _Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    forget_servers()  # a port of an earlier test's server may come back
    yield state
    httpd.shutdown()
    httpd.server_close()


def sse(handler: BaseHTTPRequestHandler, chunks: list[Any], *, done: bool = True, delay: float = 0.0) -> None:
    """Write ``chunks`` as Server-Sent Events (dicts as JSON, strings as raw lines)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    for chunk in chunks:
        line = chunk if isinstance(chunk, str) else "data: " + json.dumps(chunk)
        handler.wfile.write((line + "\n\n").encode())
        handler.wfile.flush()
        time.sleep(delay)
    if done:
        handler.wfile.write(b"data: [DONE]\n\n")


def send(handler: BaseHTTPRequestHandler, status: int, text: str, content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> None:
    """A whole (non-streamed) reply."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(text.encode())


def content_chunk(text: str = "", reasoning: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": text}
    if reasoning is not None:
        delta = {"reasoning_content": reasoning, "content": None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def finish_chunk(reason: str, stop_reason: Any = None, *, says_which: bool = True) -> dict[str, Any]:
    """The last chunk; ``says_which=False``: without vLLM's ``stop_reason`` field (llama.cpp, transformers)."""
    choice = {"index": 0, "delta": {}, "finish_reason": reason, "stop_reason": stop_reason}
    if not says_which:
        del choice["stop_reason"]
    return {"choices": [choice]}


def scripted_responder(backend: ScriptedBackend) -> Responder:
    """Serve a ScriptedBackend like vLLM does: word chunks, stop strings applied, stop_reason, usage."""

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        pieces: list[str] = []
        request = Request(stop=body.get("stop", []), max_tokens=body["max_tokens"])
        done = backend.complete(body["messages"], request, on_text=pieces.append)
        reason = "length" if done.finish_reason == "length" else "stop"
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}
        chunks = [content_chunk(p) for p in pieces]
        chunks += [finish_chunk(reason, done.stop_string), {"choices": [], "usage": usage}]
        sse(handler, chunks)

    return respond


def test_streams_text_and_sends_the_request_fields(server, monkeypatch):
    monkeypatch.setenv("DUET_API_KEY", "sekret")
    server.respond = lambda h, body: sse(
        h,
        [
            content_chunk("The answer"),
            content_chunk(" is 4."),
            finish_chunk("stop"),
            {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}},
        ],
    )
    streamed: list[str] = []
    backend = OpenAIBackend(server.url, "m1")
    done = backend.complete(USER, Request(stop=[STOP], max_tokens=64, temperature=0.3, seed=7),
                            on_text=streamed.append)
    assert (done.text, done.finish_reason, done.stop_string) == ("The answer is 4.", "eos", None)
    assert (done.prompt_tokens, done.completion_tokens) == (11, 5)
    assert "".join(streamed) == done.text and len(streamed) >= 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sekret"
    body = request["body"]
    assert body["model"] == "m1" and body["messages"] == USER and body["stream"] is True
    assert (body["stop"], body["max_tokens"], body["temperature"], body["seed"]) == ([STOP], 64, 0.3, 7)
    assert "continue_final_message" not in body and "logprobs" not in body and "top_logprobs" not in body
    assert done.top_logprobs is None
    assert backend.name == "m1"


@pytest.mark.parametrize("behaviour", ["honours", "prefills"])  # vLLM, SGLang; llama.cpp's llama-server
def test_continuing_a_partial_assistant_message(server, behaviour):
    server.continues = behaviour
    solution = "Step.\n```python\nprint(4)\n```\n```output\n4\n```\n"
    partial = [*USER, {"role": "assistant", "content": solution}]

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        text = (solution if server.echoes(body) else "") + "So \\boxed{4}."
        sse(handler, [*map(content_chunk, (text[:9], text[9:30], text[30:])), finish_chunk("stop")])

    server.respond = respond
    streamed: list[str] = []
    done = OpenAIBackend(server.url, "m1").complete(partial, Request(stop=[STOP]), on_text=streamed.append)
    assert (done.text, done.finish_reason, "".join(streamed)) == ("So \\boxed{4}.", "eos", "So \\boxed{4}.")
    OpenAIBackend(server.url, "m1").complete(partial)  # the probe's finding is kept for the process
    probes = [r["body"] for r in server.requests if r["body"]["max_tokens"] == 1]
    assert len(probes) == 2 and [("continue_final_message" in b) for b in probes] == [True, False]
    assert [r["path"] for r in server.served()] == ["/v1/chat/completions"] * 2
    body = server.served()[0]["body"]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == partial[-1]


def test_a_reply_that_does_not_repeat_the_partial_one_passes_unchanged():
    from duet.agents.openai_backend import EchoStripper

    stripper = EchoStripper("Step.\n```python\n")
    assert [stripper.feed(p) for p in ("Step.\n``", "`pyth", "on\nx")] == ["", "", "x"]
    stripper = EchoStripper("Step.\n```python\n")
    assert [stripper.feed(p) for p in ("Ste", "ady", " on")] == ["", "Steady", " on"]
    stripper = EchoStripper("Step.\n")
    assert (stripper.feed("Step"), stripper.flush()) == ("", "Step")  # ended inside it: not a repeat


def test_reasoning_is_kept_apart_from_the_answer(server):
    server.respond = lambda h, body: sse(
        h,
        [
            content_chunk(reasoning="Let me think. "),
            content_chunk(reasoning="2+2=4."),
            content_chunk("<thi"),
            content_chunk("nk>more thought</th"),
            content_chunk("ink>\\boxed{4}"),
            finish_chunk("stop"),
        ],
    )
    streamed: list[str] = []
    done = OpenAIBackend(server.url, "r1").complete(USER, on_text=streamed.append)
    assert done.text == "\\boxed{4}"
    assert done.reasoning == "Let me think. 2+2=4.more thought"
    assert "".join(streamed) == "\\boxed{4}"


def test_r1_template_without_opening_think_tag(server):
    chunks = [content_chunk("hmm, 4.\n</think>\n\nIt is \\boxed{4}."), finish_chunk("stop")]
    server.respond = lambda h, body: sse(h, chunks)
    done = OpenAIBackend(server.url, "r1").complete(USER)
    assert done.text == "\n\nIt is \\boxed{4}." and done.reasoning == "hmm, 4.\n"


def test_think_splitter_holds_partial_tags():
    splitter = ThinkSplitter()
    parts = splitter.feed("a <") + splitter.feed("think>b</think") + splitter.feed(">c <x <")
    parts += splitter.flush()
    assert parts == [("text", "a "), ("reasoning", "b"), ("text", "c <x "), ("text", "<")]


def test_stop_string_reported_by_server(server):
    chunks = [content_chunk("```python\nx=1\n```\n"), finish_chunk("stop", STOP)]
    server.respond = lambda h, body: sse(h, chunks)
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]))
    assert (done.text, done.finish_reason, done.stop_string) == ("```python\nx=1\n```\n", "stop", STOP)


def test_stop_string_enforced_client_side_when_the_server_ignores_it(server):
    pieces = ["code\n```", "out", "put\n42 (invented)"]
    server.respond = lambda h, body: sse(h, [*map(content_chunk, pieces), finish_chunk("stop")])
    streamed: list[str] = []
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]), on_text=streamed.append)
    assert (done.text, done.finish_reason, done.stop_string) == ("code\n", "stop", STOP)
    assert "".join(streamed) == "code\n"


def test_length_finish(server):
    server.respond = lambda h, body: sse(h, [content_chunk("one two"), finish_chunk("length")])
    assert OpenAIBackend(server.url, "m").complete(USER, Request(max_tokens=2)).finish_reason == "length"


def test_model_resolved_from_the_server(server):
    backend = make_backend(f"openai:{server.url}")
    assert backend.name == server.url
    backend.complete(USER)
    assert server.requests[0]["body"]["model"] == "served-model" and backend.name == "served-model"
    assert make_backend("openai:127.0.0.1:9#m").base_url == "http://127.0.0.1:9/v1"


def test_base_url_normalisation():
    assert normalize_base_url("http://h:8000/") == "http://h:8000/v1"
    assert normalize_base_url("https://h/v1/") == "https://h/v1"
    # a path is the server's own: used as given, never suffixed (QA: /v2 became /v2/v1)
    assert normalize_base_url("http://h:8000/v2") == "http://h:8000/v2"
    assert normalize_base_url("https://h/v1beta/openai/") == "https://h/v1beta/openai"
    with pytest.raises(BackendError, match="not an http"):
        OpenAIBackend("ftp://h/v1", "m")


def test_http_error_is_one_line(server):
    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        payload = json.dumps({"error": {"message": "The model `m` does not exist.\nSee docs."}}).encode()
        handler.send_response(404)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(payload)

    server.respond = respond
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m").complete(USER)
    assert str(error.value) == f"{server.url}/chat/completions: HTTP 404: The model `m` does not exist. See docs."


def test_a_prompt_longer_than_the_servers_context_is_context_full(server):
    # vLLM's wording for a prompt that does not fit (HTTP 400)
    message = ("This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
               "(2090 in the messages, 10 in the completion).")

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        payload = json.dumps({"object": "error", "message": message, "type": "BadRequestError"}).encode()
        handler.send_response(400)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(payload)

    server.respond = respond
    with pytest.raises(ContextFullError, match="maximum context length is 2048"):
        OpenAIBackend(server.url, "m").complete(USER)


def test_connection_refused_is_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BackendError) as error:
        OpenAIBackend(url, "m", timeout=2).complete(USER)
    assert str(error.value) == f"cannot reach {url}: connection refused"


def test_timeout_is_one_line(server):
    server.respond = lambda h, body: time.sleep(1.5)
    started = time.perf_counter()
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m", timeout=0.2).complete(USER)
    assert str(error.value) == f"{server.url}/chat/completions: no response within 0.2 s"
    assert time.perf_counter() - started < 1.2


def test_stream_cut_short_and_error_chunks(server):
    server.respond = lambda h, body: sse(h, [content_chunk("half")], done=False)
    with pytest.raises(BackendError, match="ended the stream before finishing: the reply is truncated"):
        OpenAIBackend(server.url, "m").complete(USER)
    server.respond = lambda h, body: sse(h, [{"error": {"message": "out of memory"}}])
    with pytest.raises(BackendError, match="out of memory"):
        OpenAIBackend(server.url, "m").complete(USER)
    server.respond = lambda h, body: sse(h, ["data: {broken"])
    with pytest.raises(BackendError, match="unreadable reply"):
        OpenAIBackend(server.url, "m").complete(USER)


def test_cancel_stops_reading(server):
    server.respond = lambda h, body: sse(h, [content_chunk(f"w{i} ") for i in range(50)], delay=0.02)
    cancel = threading.Event()

    def on_text(piece: str) -> None:
        if piece.startswith("w2"):
            cancel.set()

    done = OpenAIBackend(server.url, "m").complete(USER, on_text=on_text, cancel=cancel)
    assert done.finish_reason == "cancelled" and done.text.startswith("w0 w1 w2") and "w40" not in done.text


def test_non_streaming_json_reply_is_accepted(server):
    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        message = {"content": "4", "reasoning_content": "add"}
        payload = {"choices": [{"message": message, "finish_reason": "stop"}]}
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(json.dumps(payload).encode())

    server.respond = respond
    done = OpenAIBackend(server.url, "m").complete(USER)
    assert (done.text, done.reasoning, done.finish_reason) == ("4", "add", "eos")


def logprob_entry(token: str, *alternatives: tuple[str, float]) -> dict[str, Any]:
    """One token's entry of ``choices[0].logprobs.content`` as vLLM sends it."""
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": token, "logprob": dict(alternatives)[token], "bytes": list(token.encode()), "top_logprobs": top}


def test_top_logprobs_are_asked_for_and_read_from_the_stream(server):
    first = logprob_entry("AG", ("AG", -0.1), ("DIS", -2.5))
    second = logprob_entry("REE", ("REE", -0.01), ("RE", -5.0))

    def chunk(text: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": {"content": text}, "logprobs": {"content": [entry]},
                             "finish_reason": None}]}

    server.respond = lambda h, body: sse(h, [chunk("AG", first), chunk("REE", second), finish_chunk("stop")])
    done = OpenAIBackend(server.url, "m").complete(USER, Request(max_tokens=4, logprobs=2))
    body = server.requests[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and body["stream"] is True
    assert done.text == "AGREE"
    assert done.top_logprobs == [{"AG": -0.1, "DIS": -2.5}, {"REE": -0.01, "RE": -5.0}]
    assert done.token_logprobs == [-0.1, -0.01]  # each written token's own, for the verifier's confidence


def test_top_logprobs_from_a_non_streaming_reply_and_a_server_without_them(server):
    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        choice: dict[str, Any] = {"message": {"content": "4"}, "finish_reason": "stop"}
        if with_logprobs:
            # the sampled token left out of top_logprobs (top_logprobs=1, a lower-ranked sample): added
            choice["logprobs"] = {"content": [{"token": "4", "logprob": -1.2,
                                               "top_logprobs": [{"token": "5", "logprob": -0.4}]}]}
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()
        handler.wfile.write(json.dumps({"choices": [choice]}).encode())

    with_logprobs = True
    server.respond = respond
    backend = OpenAIBackend(server.url, "m")
    assert backend.complete(USER, Request(logprobs=1)).top_logprobs == [{"5": -0.4, "4": -1.2}]
    with_logprobs = False
    assert backend.complete(USER, Request(logprobs=1)).top_logprobs is None  # the server gave none
    server.respond = lambda h, body: sse(h, [content_chunk("4"), finish_chunk("stop")])
    assert backend.complete(USER, Request(logprobs=5)).top_logprobs is None


def test_scripted_responder_serves_a_tool_loop_like_vllm(server):
    server.respond = scripted_responder(
        ScriptedBackend(["Add.\n```python\nprint(2+2)\n```\n```output\n4\n```\n\\boxed{4}"])
    )
    backend = OpenAIBackend(server.url, "m")
    first = backend.complete(USER, Request(stop=[STOP]))
    assert (first.text, first.finish_reason) == ("Add.\n```python\nprint(2+2)\n```\n", "stop")
    second = backend.complete([*USER, {"role": "assistant", "content": first.text + "```output\n4\n```\n"}])
    assert (second.text, second.finish_reason) == ("\\boxed{4}", "eos")


def test_a_full_dialogue_on_the_server(server):
    from duet.agents.dialogue import DialogueConfig, run_dialogue

    solver_script = "Multiply.\n```python\nx = 6 * 7\nx\n```\n```output\n?\n```\nSo \\boxed{42}."
    critic_script = "Check.\n```python\nprint(42 / 7)\n```\n```output\n?\n```\nVERDICT: AGREE\n\\boxed{42}"
    server.respond = scripted_responder(ScriptedBackend([solver_script], match={"Solution:": critic_script}))
    backend = OpenAIBackend(server.url, "served-model")
    # the critic checking with its own code (the verifier, on by default for a server, asks only for a verdict)
    result = run_dialogue("What is 6 times 7?", backend, config=DialogueConfig(max_tokens=200, verify=False))
    assert (result.stop_reason, result.answer, result.agreed) == ("agreed", "42", True)
    assert [s.output for t in result.turns for s in t.steps] == ["42", "6.0"]
    bodies = [r["body"] for r in server.served()]
    assert len(bodies) == 4 and all(b["stop"] == [STOP] for b in bodies)
    assert [b.get("continue_final_message", False) for b in bodies] == [False, True, False, True]
    assert bodies[1]["messages"][-1]["content"].endswith("x\n```\n```output\n42\n```\n")
    assert result.prompt_tokens > 0 and result.completion_tokens > 0


# ------------------------------------------------------------------------------ servers that misbehave


PARTIAL = [*USER, {"role": "assistant", "content": "Add.\n```python\nprint(2+2)\n```\n```output\n4\n```\n"}]


def completions_text(text: str) -> Responder:
    """A ``/v1/completions`` stream (``choices[].text``) for continuations, chat chunks otherwise."""

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if handler.path.endswith("/completions") and "prompt" in body:
            chunks = [{"choices": [{"index": 0, "text": text, "finish_reason": None}]},
                      {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": None}]}]
            return sse(handler, chunks)
        sse(handler, [content_chunk("new turn"), finish_chunk("stop")])

    return respond


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """duet's tokenizer with its chat template (no model): what ``-O tokenizer=DIR`` names."""
    from tests.tiny_models import make_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("behaviour", ["rejects", "ignores"])
def test_a_server_that_cannot_continue_gets_the_template_rendered_by_duet(server, tokenizer_dir, behaviour):
    # transformers serve rejects continue_final_message (HTTP 422); llama-cpp-python ignores it
    server.continues = behaviour
    server.respond = completions_text("\\boxed{4}")
    backend = OpenAIBackend(server.url, "m", tokenizer=tokenizer_dir)
    done = backend.complete(PARTIAL, Request(stop=[STOP], max_tokens=20))
    assert (done.text, done.finish_reason) == ("\\boxed{4}", "eos")
    backend.complete(PARTIAL)
    backend.complete(USER)
    probes = [r for r in server.requests if r["body"].get("max_tokens") == 1]
    assert len(probes) == (1 if behaviour == "rejects" else 2)  # once per server
    served = server.served()
    assert [r["path"] for r in served] == ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
    prompt = served[0]["body"]["prompt"]
    opening = "<|bos|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    assert prompt == opening + PARTIAL[-1]["content"]
    assert served[0]["body"]["stop"] == [STOP] and served[0]["body"]["max_tokens"] == 20
    assert "continue_final_message" not in served[2]["body"]  # a new turn never carries the fields


def test_the_template_is_found_from_the_servers_model_list(server, tokenizer_dir, monkeypatch):
    # vLLM and SGLang list where a model was loaded from (root) beside the name it is served under
    monkeypatch.delenv("DUET_TOKENIZER", raising=False)
    server.continues = "rejects"
    server.models = [{"id": "other", "root": "/nowhere"}, {"id": "alias", "root": tokenizer_dir}]
    server.respond = completions_text("\\boxed{4}")
    assert OpenAIBackend(server.url, "alias").complete(PARTIAL).text == "\\boxed{4}"
    assert server.served()[0]["body"]["prompt"].endswith("<|assistant|>" + PARTIAL[-1]["content"])


def test_a_server_that_cannot_continue_and_no_template_is_one_line(server, monkeypatch):
    monkeypatch.delenv("DUET_TOKENIZER", raising=False)
    server.continues = "ignores"
    server.models = [{"id": "org/not-downloaded", "root": "org/not-downloaded"}]  # never fetched on a guess
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "org/not-downloaded").complete(PARTIAL)
    assert str(error.value) == (
        f"{server.url} cannot continue an assistant message (it ignores continue_final_message and starts a new "
        "reply); name the served model's tokenizer (-O tokenizer=DIR or Hub id, or DUET_TOKENIZER) so duet renders its "
        "chat template for /completions (none found for 'org/not-downloaded')")
    assert not server.served()  # nothing was sent that could have come back as a new reply


def test_done_without_a_finish_reason_is_a_truncated_reply(server):
    # llama-cpp-python ends an earlier stream this way when a new request arrives
    server.respond = lambda h, body: sse(h, [content_chunk("half an ans")])
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m").complete(USER)
    assert str(error.value) == (f"{server.url}/chat/completions: the server ended the stream with [DONE] and no "
                                "finish_reason: the reply is truncated")


def test_a_stop_finish_that_does_not_say_which_stop(server):
    server.respond = lambda h, body: sse(h, [content_chunk("x\n```python\nx=1\n```\n"), finish_chunk("stop")])
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]))
    assert (done.finish_reason, done.stop_string, done.stop_unknown) == ("eos", None, False)  # vLLM: end of turn
    server.respond = lambda h, body: sse(h, [content_chunk("x\n```python\nx=1\n```\n"),
                                             finish_chunk("stop", says_which=False)])
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]))
    # llama.cpp: unknown, so duet asked for what comes next (no stop string there: the end of the turn)
    assert (done.finish_reason, done.stop_string, done.stop_unknown) == ("eos", None, False)
    assert "stop" not in server.requests[-1]["body"] and server.requests[-1]["body"]["max_tokens"] == 16
    # llama-server -v: its own fields with the first chunk of the final reply, the stopping word among them
    verbose = {**content_chunk("x\n```python\nx=1\n```\n"), "__verbose": {"stop_type": "word", "stopping_word": STOP}}
    server.respond = lambda h, body: sse(h, [verbose, finish_chunk("stop", says_which=False)])
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]))
    assert (done.finish_reason, done.stop_string, done.stop_unknown) == ("stop", STOP, False)
    verbose["__verbose"] = {"stop_type": "eos", "stopping_word": ""}
    done = OpenAIBackend(server.url, "m").complete(USER, Request(stop=[STOP]))
    assert (done.finish_reason, done.stop_string, done.stop_unknown) == ("eos", None, False)


def llama_cpp_responder(reply: str) -> Responder:
    """Serve like llama.cpp a model that always writes ``reply``: a partial reply is continued from where it stands
    in it (and repeated first), the stop string is stripped and a ``stop`` finish does not say which stop matched
    (at a stop string as at the end); a character counts as a token."""

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        last = body["messages"][-1]
        partial = last["content"] if last["role"] == "assistant" else ""
        assert reply.startswith(partial), "the partial reply is not the model's own"
        rest = reply[len(partial) :]
        at = min([rest.find(stop) for stop in body.get("stop", []) if stop in rest] or [len(rest)])
        text = rest[: min(at, body["max_tokens"])]
        finish = "length" if body["max_tokens"] < at else "stop"
        sse(handler, [content_chunk(partial), content_chunk(text), finish_chunk(finish, says_which=False)])

    return respond


@pytest.mark.parametrize("reply, first, second", [
    # the output fence right after the code: the stop string, though the server names none
    ("Add.\n```python\nprint(2 + 2)\n```\n```output\n4\n```\nSo \\boxed{4}.", "stop", "eos"),
    # the model's own end of turn after the output
    ("Add.\n```python\nprint(2 + 2)\n```\n```output\n4\n```\n", "stop", "eos"),
    # the output fence at once after an output (the model asks to run nothing): the stop string, as duet's runtime
    ("Add.\n```python\nprint(2 + 2)\n```\n```output\n4\n```\n```output\n?", "stop", "stop"),
])
def test_an_unnamed_stop_is_resolved_by_asking_for_what_comes_next(server, reply, first, second):
    server.continues = "prefills"  # llama.cpp
    server.respond = llama_cpp_responder(reply)
    backend, request = OpenAIBackend(server.url, "m"), Request(stop=[STOP], max_tokens=100)
    done = backend.complete(USER, request)
    assert (done.text, done.finish_reason, done.stop_unknown) == (reply[: reply.index(STOP)], first, False)
    partial = [*USER, {"role": "assistant", "content": reply[: reply.index("```\n", reply.index(STOP)) + 4]}]
    done = backend.complete(partial, request)
    assert (done.finish_reason, done.stop_string, done.stop_unknown) == (second, STOP if second == "stop" else None,
                                                                          False)
    peeks = [r["body"] for r in server.served() if "stop" not in r["body"]]
    assert len(peeks) == 2 and all(b["max_tokens"] == 16 for b in peeks)  # one follow-up for each unnamed stop


def test_a_stripped_stop_string_still_runs_the_code(server):
    from duet.agents.dialogue import DialogueConfig, run_dialogue

    # a \boxed guess before the code, and the output fence right after it: with the stop string stripped, the
    # reply looks like the end of the turn; it is the model asking for the output
    solver = "Maybe \\boxed{5}. Check:\n```python\nprint(2 + 2)\n```\n```output\n4\n```\nSo \\boxed{4}."
    server.continues = "prefills"
    server.respond = llama_cpp_responder(solver)
    backend = OpenAIBackend(server.url, "m")
    result = run_dialogue("What is 2+2?", backend, config=DialogueConfig(max_tokens=200, critic=False, verify=False))
    assert [s.output for t in result.turns for s in t.steps] == ["4"]
    assert result.answer == "4"


def refuse(status: int, times: int, headers: dict[str, str], text: str, content_type: str) -> Responder:
    """Answer ``status`` the first ``times`` requests, then a normal reply."""
    count = [0]

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        count[0] += 1
        if count[0] <= times:
            return send(handler, status, text, content_type, headers)
        sse(handler, [content_chunk("ok"), finish_chunk("stop")])

    return respond


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(server, status):
    server.respond = refuse(status, 2, {"Retry-After": "0.3"}, '{"error": {"message": "busy"}}', "application/json")
    started = time.perf_counter()
    done = OpenAIBackend(server.url, "m").complete(USER)
    assert done.text == "ok" and len(server.requests) == 3
    assert 0.6 <= time.perf_counter() - started < 3


def test_retries_are_bounded_in_count_and_time(server):
    page = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502</h1></center></body></html>"
    server.respond = refuse(502, 99, {}, page, "text/html")
    started = time.perf_counter()
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m", retries=2).complete(USER)
    assert time.perf_counter() - started < 3 and len(server.requests) == 3
    assert str(error.value).startswith(f"{server.url}/chat/completions: HTTP 502: an HTML page titled "
                                       "'502 Bad Gateway' (gave up after 3 tries, ")
    server.requests.clear()
    server.respond = refuse(429, 99, {"Retry-After": "120"}, "slow down", "text/plain")
    with pytest.raises(BackendError, match=r"HTTP 429: slow down$"):  # a wait past retry_seconds: no retry
        OpenAIBackend(server.url, "m", retry_seconds=10).complete(USER)
    assert len(server.requests) == 1


def test_a_reset_connection_is_retried(server):
    count = [0]

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        count[0] += 1
        if count[0] == 1:
            handler.close_connection = True  # hang up without a reply
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        sse(handler, [content_chunk("ok"), finish_chunk("stop")])

    server.respond = respond
    assert OpenAIBackend(server.url, "m").complete(USER).text == "ok" and count[0] == 2


def test_keep_alive_comments_do_not_extend_the_wait(server):
    server.respond = lambda h, body: sse(h, [content_chunk("a")] + [": ping"] * 100, delay=0.05)
    started = time.perf_counter()
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m", timeout=0.5).complete(USER)
    assert str(error.value) == f"{server.url}/chat/completions: no data within 0.5 s (only keep-alive comments)"
    assert time.perf_counter() - started < 2


def test_the_deadline_bounds_a_whole_request(server):
    server.respond = lambda h, body: sse(h, [content_chunk("")] * 200, delay=0.05)  # data, but no text
    started = time.perf_counter()
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m", timeout=5, deadline=1).complete(USER)
    assert str(error.value) == f"{server.url}/chat/completions: no complete reply within the 1 s deadline"
    assert time.perf_counter() - started < 2.5


def test_a_server_that_ignores_max_tokens_is_cut(server):
    server.respond = lambda h, body: sse(h, [content_chunk(f"w{i} ") for i in range(5000)], delay=0.001)
    started = time.perf_counter()
    done = OpenAIBackend(server.url, "m").complete(USER, Request(max_tokens=5))
    assert (done.text, done.finish_reason, done.completion_tokens) == ("w0 w1 w2 w3 w4 ", "length", 5)
    assert time.perf_counter() - started < 3


def test_an_html_page_with_status_200_is_not_an_openai_server(server):
    page = "<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body>...</body></html>"
    server.respond = lambda h, body: send(h, 200, page, "text/html; charset=utf-8")
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m").complete(USER)
    assert str(error.value) == (f"{server.url}/chat/completions: not an OpenAI-compatible server (HTTP 200 with "
                                "an HTML page titled 'Welcome to nginx!')")


@pytest.mark.parametrize("status, body", [
    (400, {"error": {"code": 400, "type": "exceed_context_size_error", "message":
                     "request (2484 tokens) exceeds the available context size (2048 tokens), try increasing it"}}),
    (400, {"object": "error", "message": "The decoder prompt (length 2100) is longer than the maximum model length "
                                         "of 2048. Make sure that `max_model_len` is no smaller than the number of "
                                         "text tokens."}),  # vLLM
    (400, {"object": "error", "message": "The input (2100 tokens) is longer than the model's context length "
                                         "(2048 tokens)."}),  # SGLang
])
def test_context_overflow_phrasings(server, status, body):
    server.respond = lambda h, _: send(h, status, json.dumps(body))
    with pytest.raises(ContextFullError):
        OpenAIBackend(server.url, "m").complete(USER)


def test_server_text_never_reaches_the_terminal_raw(server):
    server.respond = lambda h, body: send(h, 500, '{"error": {"message": "bad \\u001b]0;PWNED\\u0007 thing"}}')
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m").complete(USER)
    assert "\x1b" not in str(error.value) and "\x07" not in str(error.value) and "PWNED" in str(error.value)


def test_a_server_that_sends_stop_strings_ends_its_turn_on_an_unnamed_stop(server):
    # transformers serve: the stop string stays in the text (cut client-side), the finish names no stop
    server.respond = lambda h, body: sse(h, [content_chunk("```python\nx=1\n```\n```output"),
                                             finish_chunk("stop", says_which=False)])
    backend = OpenAIBackend(server.url, "m")
    assert backend.complete(USER, Request(stop=[STOP])).finish_reason == "stop"
    server.respond = lambda h, body: sse(h, [content_chunk("```python\nx=1\n"), finish_chunk("stop", says_which=False)])
    done = backend.complete(USER, Request(stop=[STOP]))
    assert (done.finish_reason, done.stop_unknown) == ("eos", False)  # it would have sent the stop string


# ------------------------------------------------------------------------------ what duet eval records of them


def test_duet_eval_records_each_misbehaviour_in_one_line(server, tmp_path):
    from tests.test_eval_cli import duet_eval, jsonl, records

    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    overflow = {"error": {"code": 400, "type": "exceed_context_size_error",
                          "message": "request (2484 tokens) exceeds the available context size (2048 tokens)"}}
    refused: set[str] = set()

    def respond(handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        kind = next(k for k in EXPECTED if k in json.dumps(body["messages"]))
        if kind == "busy" and kind not in refused:  # refused once, then answered
            refused.add(kind)
            return send(handler, 429, '{"error": {"message": "busy"}}', headers={"Retry-After": "0.2"})
        if kind == "busy":
            return sse(handler, [content_chunk("So \\boxed{4}."), finish_chunk("stop")])
        if kind == "code":  # its continuation needs a chat template duet cannot find
            return sse(handler, [content_chunk("```python\nprint(2 + 2)\n```\n"), finish_chunk("stop", STOP)])
        if kind == "truncated":
            return sse(handler, [content_chunk("So the ans")])  # [DONE], no finish_reason
        if kind == "keepalive":
            return sse(handler, [content_chunk("Thinking")] + [": ping"] * 400, delay=0.05, done=False)
        if kind == "dawdling":
            return sse(handler, [content_chunk("")] * 400, delay=0.05, done=False)  # data, never text
        if kind == "endless":  # max_tokens ignored
            return sse(handler, [content_chunk("and more ")] * 100_000, delay=0.0005)
        if kind == "webpage":
            return send(handler, 200, page.replace("502 Bad Gateway", "Welcome"), "text/html")
        if kind == "gateway":
            return send(handler, 502, page, "text/html")
        if kind == "hangup":
            handler.close_connection = True
            return handler.connection.shutdown(socket.SHUT_RDWR)
        send(handler, 400, json.dumps(overflow))

    server.respond = respond
    server.continues = "ignores"  # llama-cpp-python
    data = jsonl(tmp_path / "d.jsonl", [{"question": f"What is {k} two plus two?", "answer": "#### 4"}
                                        for k in EXPECTED])
    started = time.monotonic()
    r = duet_eval(data, "--base-url", server.url, "--model-name", "m", "--modes", "solver-only", "-j", "1",
                  "--max-tokens", "40", "-O", "timeout=1", "-O", "deadline=2", "-O", "retries=1",
                  "-O", "retry_seconds=2", "-o", tmp_path / "run", "--no-progress", timeout=90)
    assert time.monotonic() - started < 60
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    found = {next(k for k in EXPECTED if k in x["question"]): x for x in records(tmp_path / "run")}
    for kind, (stop_reason, words) in EXPECTED.items():
        record = found[kind]
        assert record["stop_reason"] == stop_reason, (kind, record)
        if words is None:
            assert record["error"] is None, (kind, record)
            continue
        error = record["error"]
        assert words in error and server.url in error and "\n" not in error and "<" not in error, (kind, error)
    assert found["busy"]["prediction"] == "4" and found["endless"]["tokens"]["completion"] == 40


EXPECTED = {
    # the question's word: (the stop reason duet eval records, words of its one-line error)
    "busy": ("no_critic", None),  # 429 with Retry-After, then an answer
    "truncated": ("backend_error", "ended the stream with [DONE] and no finish_reason: the reply is truncated"),
    "keepalive": ("backend_error", "no data within 1 s (only keep-alive comments)"),
    "dawdling": ("backend_error", "no complete reply within the 2 s deadline"),
    "endless": ("no_answer", None),  # cut at --max-tokens by duet
    "webpage": ("backend_error", "not an OpenAI-compatible server (HTTP 200 with an HTML page titled 'Welcome')"),
    "gateway": ("backend_error", "HTTP 502: an HTML page titled '502 Bad Gateway' (gave up after 2 tries"),
    "hangup": ("backend_error", "the server closed the connection"),
    "overflow": ("context_full", "exceeds the available context size"),
    "code": ("backend_error", "cannot continue an assistant message (it ignores continue_final_message"),
}


def test_the_cli_starts_without_the_http_client():
    # httpx costs about 0.2 s to import: paid by a run that talks to a server, not by `duet --help`
    code = ("import sys\nfrom duet.cli import main\nsys.argv = ['duet', 'eval', 'run', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'httpx' not in sys.modules, 'httpx was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--backend-option" in r.stdout, r.stderr


def test_a_guessed_hub_id_is_taken_from_the_local_cache_only(tokenizer_dir, tmp_path):
    # transformers serve names a model by its Hub id and downloads it into the cache duet reads too
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tokenizer_dir, snapshot)
    shutil.copy(Path(__file__).parent.parent / "duet" / "assets" / "model" / "config.json", snapshot)  # as on the Hub
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    code = ("from duet.agents.chat_template import load_tokenizer, template_sources as s\n"
            "assert load_tokenizer(s(None, ['org/tiny'])).chat_template\n"
            "assert load_tokenizer(s(None, ['org/not-here', 'alias'])) is None")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    env.pop("DUET_TOKENIZER", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


def test_a_tokenizer_that_cannot_be_loaded_is_one_line_naming_the_server(server, tmp_path):
    server.continues = "rejects"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(BackendError) as error:
        OpenAIBackend(server.url, "m", tokenizer=str(tmp_path)).complete(PARTIAL)
    message = str(error.value)
    assert message.startswith(f"{server.url}: cannot load the tokenizer '{tmp_path}' to render the chat template")
    assert "\n" not in message

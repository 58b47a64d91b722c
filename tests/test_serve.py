"""`duet serve` over real loopback HTTP: the official openai SDK on every endpoint, duet's own OpenAI backend
against the local runtime, disconnects, auth, the full queue, limits, a replayed `llm` request, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import uvicorn

try:  # the HTTP client the openai SDK uses: httpx2 in newer releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

from duet.agents.dialogue import DialogueConfig, run_dialogue
from duet.agents.local_backend import LocalBackend
from duet.agents.openai_backend import OpenAIBackend
from duet.engine import Engine, SamplingParams
from duet.serve.app import create_app
from duet.serve.service import Limits, Service
from tests.tiny_models import make_engine_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_engine_checkpoint(tmp_path_factory.mktemp("serve"), seed=5)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine.load(ckpt, max_batch=4).start()


@pytest.fixture(scope="module")
def served(engine):
    service = Service(engine, "tiny", limits=Limits(max_queue=8, max_tokens=512, default_max_tokens=32,
                                                   max_request_bytes=20_000))
    with ServerThread(create_app(service)) as server:
        server.service = service
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=30)


MESSAGES = [{"role": "user", "content": "Tom has 12 apples and buys 35 more. How many apples does he have now?"}]


def greedy(engine, messages, n=24, **kw):
    return engine.submit(engine.encode_chat(messages), SamplingParams(max_new_tokens=n, **kw))


# ------------------------------------------------------------------------------------------- the SDK


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == ["tiny", "duet", "duet:solver-only"]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_chat_greedy_matches_the_engine(client, engine):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    expected = greedy(engine, MESSAGES)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == expected.prompt_tokens and r.usage.completion_tokens == expected.completion_tokens


def test_chat_stream_is_the_same_text_with_usage(client, engine):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(engine, MESSAGES).text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_string_is_named_in_stop_reason(client, engine):
    free = greedy(engine, MESSAGES, 40, stop_at_eos=False).text
    stop = free[4:7]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.message.content == free[: free.find(stop)]


def test_sampling_options_seed_n_top_p(client):
    ask = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=2)
    a, b = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens >= 2


def test_logprobs_match_the_model(client, engine):
    import torch

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    first = content[0]
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob, abs=1e-5)  # greedy: the likeliest
    with torch.no_grad():
        logits = engine.model(torch.tensor([engine.encode_chat(MESSAGES)]))[0, -1].log_softmax(-1)
    assert first.logprob == pytest.approx(float(logits.max()), abs=1e-4)


def test_continue_final_message(client, engine):
    messages = [*MESSAGES, {"role": "assistant", "content": "```python\nprint(12"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.choices[0].message.content == greedy(engine, messages, 10).text  # encode_chat continues it too
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                       extra_body={"continue_final_message": True})


def test_text_completions_streamed_and_not(client, engine):
    expected = engine.submit("Tom has 12 apples", SamplingParams(max_new_tokens=16))
    r = client.completions.create(model="tiny", prompt="Tom has 12 apples", max_tokens=16, temperature=0,
                                  logprobs=2)
    assert r.choices[0].text == expected.text and r.object == "text_completion"
    assert len(r.choices[0].logprobs.tokens) == expected.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt="Tom has 12 apples", max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text


def test_errors_are_openai_shaped_one_line(client, served):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    for bad in ({"max_tokens": 100_000}, {"temperature": -1}, {"extra_body": {"frequency_penalty": 0.5}},
                {"top_logprobs": 2}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=MESSAGES, **bad)
    raw = httpx.post(served.url + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and "\n" not in raw.text.strip()
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(served.url + "/v1/chat/completions",
                     json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_metrics_are_prometheus_text(served, client):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    text = httpx.get(served.url + "/metrics").text
    names = set(re.findall(r"^(duet_\w+)", text, re.M))
    for name in ("duet_requests_total", "duet_completion_tokens_total", "duet_queue_length", "duet_batch_size",
                 "duet_mtp_acceptance_ratio", "duet_prefix_cache_hits_total", "duet_requests_rejected_total"):
        assert name in names
    assert re.search(r'duet_requests_total\{endpoint="/v1/chat/completions",model="tiny",status="200"\} [1-9]', text)


# ------------------------------------------------------------------------------------------- clients and failures


def test_llm_cli_and_open_webui_request_shapes(served):
    """`llm -m tiny 'hi'` with an extra-openai-models entry (api_base) sends this, through the openai SDK;
    Open WebUI sends content parts and nulls for the options it leaves unset."""
    headers = {"Authorization": "Bearer sk-none", "Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "OpenAI/Python 1.54.4", "X-Stainless-Lang": "python"}
    llm = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
           "stream_options": {"include_usage": True}}
    webui = {"model": "tiny", "stream": True, "max_tokens": None, "temperature": 0.8, "top_p": None, "stop": None,
             "seed": None, "metadata": {"chat_id": "x"},
             "messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    for body in (llm, webui):
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


@pytest.fixture
def slow_steps(engine, monkeypatch):
    """Each decoding step of the engine takes 10 ms longer, so a 500-token generation outlasts the time the server
    needs to see a client go away (the tiny model alone can finish it first, and then there is nothing to cancel)."""
    step = engine._step

    def slowed() -> None:
        step()
        time.sleep(0.01)

    monkeypatch.setattr(engine, "_step", slowed)


def test_client_disconnect_cancels_generation(served, slow_steps):
    service = served.service
    before = service.metrics.cancelled
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
        next(lines)
    deadline = time.monotonic() + 20
    while service.metrics.cancelled == before or service.in_flight:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    assert service.metrics.completion_tokens < 10_000  # nowhere near 500 tokens per request so far


def test_non_streaming_disconnect_cancels_too(served, slow_steps):
    service = served.service
    before = service.metrics.cancelled
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while service.metrics.cancelled == before or service.in_flight:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)


def test_full_queue_answers_429_with_retry_after(engine):
    service = Service(engine, "tiny", limits=Limits(max_queue=0))
    service.capacity = 1  # one generation in flight at most
    with ServerThread(create_app(service)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 300, "stream": True, "ignore_eos": True}
        refused = None
        for _ in range(10):  # the tiny model may finish its 300 tokens before the second request arrives: retry
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
                next(r.iter_lines())
                try:
                    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
                except openai.RateLimitError as error:
                    refused = error
            if refused is not None:
                break
        assert refused is not None, "a second generation was never refused while the first one ran"
        assert refused.response.headers["retry-after"] == "1"
        assert refused.body["code"] == "queue_full"
        deadline = time.monotonic() + 20
        while service.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4).choices
        assert "duet_requests_rejected_total 1" in httpx.get(server.url + "/metrics").text  # refused once


def test_api_key_is_required_when_set(engine):
    with ServerThread(create_app(Service(engine, "tiny"), api_key=KEY)) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert httpx.get(server.url + "/metrics").status_code == 401
        right = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert right.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_refuses_a_public_bind_without_a_key(capsys, monkeypatch):
    from duet.cli import main

    monkeypatch.delenv("DUET_SERVE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--host", "0.0.0.0"])
    assert info.value.code == 2 and "refusing to serve without --api-key" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess: importing torch and transformers again
def test_sigterm_drains_the_request_in_flight_and_exits(ckpt):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DUET_CONFIG": "/nonexistent/duet.toml"}
    proc = subprocess.Popen([sys.executable, "-m", "duet", "serve", "--model", str(ckpt), "--port", "0",
                             "--no-mtp"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"(http://\S+)/v1", line)
        assert url, line + proc.stderr.read()
        body = {"model": ckpt.name, "messages": MESSAGES, "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url.group(1) + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
        assert finish[-1] == "length"  # all 40 tokens, after SIGTERM
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it drained for
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def embedded():
    from duet.model.embedded import default_model_path

    engine = Engine.load(default_model_path(), max_batch=8).start()
    config = DialogueConfig(max_rounds=2, max_tokens=256, samples=2)
    service = Service(engine, "embedded", dialogue_config=config)
    with ServerThread(create_app(service)) as server:
        server.engine, server.config = engine, config
        yield server


@pytest.mark.slow  # 2 x 20 solver turns with code cells on the embedded model
def test_duet_backend_against_serve_gives_the_local_runtime_greedy_predictions(embedded):
    """Solver-only dialogues on dev problems, through `duet serve` with duet's OpenAI backend and through the
    local runtime directly: the same text in every turn, so the same answers."""
    rows = [json.loads(line) for line in (ROOT / "data/dev/mawps_asdiv_a_dev.jsonl").read_text().splitlines()[:20]]
    remote = OpenAIBackend(embedded.url + "/v1", "embedded", timeout=60)
    local = LocalBackend(embedded.engine, "local:embedded")
    config = DialogueConfig(critic=False, max_tokens=200, max_steps=3)

    def solve(backend, question):
        result = run_dialogue(question, backend, config=config)
        return result.answer, [t.text for t in result.turns]

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda row: solve(remote, row["question"]), rows))
        direct = list(pool.map(lambda row: solve(local, row["question"]), rows))
    assert served == direct
    assert sum(answer is not None for answer, _ in served) >= 15  # the embedded model answers most of them


def test_duet_model_answers_with_a_checked_explanation_and_transcript(embedded):
    client = openai.OpenAI(base_url=embedded.url + "/v1", api_key="x", max_retries=0, timeout=120)
    question = "Sean has 9 apples. Susan gives Sean 8 more. How many apples does Sean have?"
    r = client.chat.completions.create(model="duet", messages=[{"role": "user", "content": question}])
    content = r.choices[0].message.content
    assert content.startswith("The answer is 17.") and "critic" in content
    transcript = r.model_extra["duet_transcript"]
    assert transcript["question"] == question and transcript["answer"] == "17"
    assert {t["agent"] for t in transcript["turns"]} == {"solver", "critic"}
    assert r.model_extra["duet"]["answer"] == "17" and r.usage.completion_tokens > 0


def test_duet_solver_only_streams_the_steps_as_they_happen(embedded):
    client = openai.OpenAI(base_url=embedded.url + "/v1", api_key="x", max_retries=0, timeout=120)
    question = "Jessica grew 35 watermelons, but the rabbits ate 27 watermelons. How many watermelons are left?"
    chunks = list(client.chat.completions.create(model="duet:solver-only", stream=True,
                                                 messages=[{"role": "user", "content": question}]))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    events = [c.model_extra["duet_event"]["kind"] for c in chunks if (c.model_extra or {}).get("duet_event")]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "```python" in reasoning and "```output" in reasoning
    assert events[0] == "turn_start" and "code" in events and events[-1] == "done"
    assert content.startswith("The answer is 8.") and "solver only" in content
    assert chunks[-1].model_extra["duet_transcript"]["stop_reason"] == "no_critic"


def test_a_generation_cancelled_before_a_worker_takes_it_gives_its_slot_back(engine):
    """The client left at once: the request's task is cancelled while its job still waits for a worker. The job
    never runs, so nothing else gives its slot back (it used to stay in flight for good)."""
    service = Service(engine, "tiny", limits=Limits(max_queue=0))
    release = threading.Event()
    blockers = [service._pool.submit(release.wait) for _ in range(service.capacity)]  # every worker busy

    async def leave_at_once() -> None:
        ticket = service.reserve(1)
        task = asyncio.ensure_future(service.generate(ticket, engine.encode("Tom has 12 apples."),
                                                      [SamplingParams(max_new_tokens=4)], threading.Event()))
        await asyncio.sleep(0.05)  # handed to the pool, no worker free
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ticket.close()

    asyncio.run(leave_at_once())
    release.set()
    for b in blockers:
        b.result(timeout=10)
    assert service.in_flight == 0

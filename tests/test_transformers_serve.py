"""The OpenAI backend against a real server nobody on the project wrote: ``transformers serve`` (the dev
install's ``transformers[serving]``) on loopback, started by the tests, loading the checkpoints the tests
name: a tiny random one the tests make, and a copy of duet's embedded model.

It answers HTTP 422 to ``continue_final_message``, so every continuation goes through duet's own rendering of
the chat template and ``/v1/completions``. Greedy decoding must give what duet's own runtime gives: the same
tokens, and through ``duet eval`` the same transcripts and predictions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from duet.agents.backends import Request, make_backend
from duet.agents.openai_backend import forget_servers
from tests.processes import free_port
from tests.tiny_models import make_engine_checkpoint

REPO = Path(__file__).resolve().parent.parent
START_SECONDS = 90

pytestmark = pytest.mark.slow


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """``(API root, tiny checkpoint directory)`` of a running ``transformers serve``, which loads whichever
    checkpoint a request names; skipped when it cannot start."""
    pytest.importorskip("fastapi")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve is not installed (pip install 'transformers[serving]')")
    checkpoint = make_engine_checkpoint(tmp_path_factory.mktemp("served") / "tiny", seed=2)
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while not _up(root):
            if process.poll() is not None or time.monotonic() - started > START_SECONDS:
                tail = " ".join(log.read_text(errors="replace").split()[-40:])
                pytest.skip(f"transformers serve did not start within {START_SECONDS} s: {tail}")
            time.sleep(0.5)
        forget_servers()
        yield root + "/v1", checkpoint
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


MESSAGES = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Tom has 12 apples."}]
PARTIAL = [*MESSAGES, {"role": "assistant", "content": "```python\nprint(12 + 35)\n```\n```output\n47\n```\n"}]


def test_greedy_replies_and_continuations_match_the_local_runtime(served):
    url, checkpoint = served
    server = make_backend(f"openai:{url}#{checkpoint}")
    local = make_backend(f"local:{checkpoint}", device="cpu", dtype="float32", mtp=False)
    request = Request(max_tokens=12, temperature=0.0)
    for messages in (MESSAGES, PARTIAL):  # a new turn (chat/completions), a continuation (/completions)
        there, here = server.complete(messages, request), local.complete(messages, request)
        # a random model writes stray bytes: at max_tokens transformers' streamer drops a character cut in
        # the middle where duet writes U+FFFD
        assert there.text == here.text.removesuffix("\ufffd"), messages[-1]["role"]
        assert there.finish_reason == here.finish_reason == "length"
        assert there.completion_tokens == here.completion_tokens == 12
        assert there.prompt_tokens == here.prompt_tokens


def _duet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(cwd), XDG_CONFIG_HOME=str(cwd / "config"),
               XDG_DATA_HOME=str(cwd / "data"))
    return subprocess.run([sys.executable, "-m", "duet", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


def test_solve_and_eval_through_transformers_serve(served, tmp_path):
    url, checkpoint = served
    server = ("--base-url", url, "--model-name", str(checkpoint), "--max-tokens", "12", "--max-steps", "2")
    r = _duet("solve", "--json", "--no-log", *server, "--max-rounds", "1", "--critic-solves", "0",
              "Tom has 12 apples and buys 35 more. How many apples does he have now?", cwd=tmp_path)
    assert r.returncode in (0, 3), r.stderr  # a random model writes garbage: the dialogue still ends cleanly
    data = json.loads(r.stdout)
    assert data["error"] is None and data["completion_tokens"] > 0
    assert all(t["finish"] not in ("backend_error", "context_full") for t in data["turns"]), data["turns"]

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = _duet("eval", "d.jsonl", *server, "--modes", "solver-only", "-j", "3", "-o", "run", "--no-progress",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 and not [x for x in records if x["stop_reason"] == "backend_error"], records


def _benchmark():
    """benchmarks/openai_servers.py, whose comparison of two runs the test applies."""
    spec = importlib.util.spec_from_file_location("openai_servers", REPO / "benchmarks" / "openai_servers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_duet_eval_through_transformers_serve_predicts_what_the_local_runtime_does(served, tmp_path):
    url, _ = served
    model = tmp_path / "embedded"  # duet's own model: it writes code, so continuations are exercised
    shutil.copytree(REPO / "duet" / "assets" / "model", model)
    rows = (REPO / "data" / "dev" / "mawps_asdiv_a_dev.jsonl").read_text().splitlines()[:4]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    common = ("d.jsonl", "--modes", "solver-only", "-j", "4", "--no-progress", "--max-tokens", "160")
    there = _duet("eval", *common, "--base-url", url, "--model-name", str(model), "-o", "served", cwd=tmp_path)
    here = _duet("eval", *common, "--model", str(model), "--device", "cpu", "--no-mtp", "-o", "local", cwd=tmp_path)
    assert there.returncode == 0 and here.returncode == 0, there.stderr + here.stderr
    benchmark = _benchmark()
    report = benchmark.compare(tmp_path / "local", tmp_path / "served", expected=4)
    assert (report["same_predictions"], report["same_transcripts"], report["differing"]) == (4, 4, []), report
    assert (report["errors"], report["unrecorded_failures"]) == (0, 0)
    served_run = benchmark.results(tmp_path / "served").values()
    assert any("```output" in text for r in served_run for text in r["texts"])  # code ran: continuations
    assert any(r["correct"] for r in served_run)

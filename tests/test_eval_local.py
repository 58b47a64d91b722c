"""duet eval on the local runtime with a tiny random model: through the console script, and batched."""

from __future__ import annotations

import json
import threading

import pytest

from duet.agents.backends import make_backend
from duet.agents.dialogue import STOP_REASONS as DIALOGUE_STOPS
from duet.agents.dialogue import DialogueConfig
from duet.evaluation.run_types import EvalOptions
from duet.evaluation.runner import run_eval
from tests.test_eval_cli import duet_eval, jsonl, records
from tests.tiny_models import make_engine_checkpoint

QUESTIONS = ["Tom has 12 apples and buys 35 more. How many?", "What is 6 times 7?", "What is 10 minus 4?",
             "Half of 30?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_engine_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture()
def data(tmp_path):
    return jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": "#### 1"} for q in QUESTIONS])


def test_local_runtime_end_to_end(checkpoint, data, tmp_path):
    prompts = tmp_path / "prompts"  # short system prompts: a random model on 2 busy cores prefills slowly
    prompts.mkdir()
    (prompts / "solver_system.md").write_text("Solve it. Write the answer as \\boxed{answer}.")
    (prompts / "critic_system.md").write_text("Check it. End with VERDICT: AGREE or VERDICT: DISAGREE: reason.")
    run = tmp_path / "run"
    args = (data, "--model", checkpoint, "--modes", "solver-only,solver+critic", "-o", run, "-j", "4",
            "--max-tokens", "8", "--max-rounds", "1", "--limit", "2", "--prompt-dir", prompts)
    r = duet_eval(*args)
    assert r.returncode == 0, r.stderr
    recs = records(run)
    assert sorted((x["id"], x["mode"]) for x in recs) == [(i, m) for i in "12" for m in ("solver+critic",
                                                                                           "solver-only")]
    assert all(x["stop_reason"] in DIALOGUE_STOPS and x["tokens"]["completion"] > 0 for x in recs)
    assert all(x["tokens"]["completion"] <= 8 for x in recs if x["mode"] == "solver-only")
    model = json.loads((run / "model.json").read_text())["solver"]
    assert model["checkpoint"] == str(checkpoint.resolve()) and model["fingerprint"].startswith("sha256:")
    size = (checkpoint / "model.safetensors").stat().st_size
    assert model["weights"] == [{"file": "model.safetensors", "bytes": size}]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["modes"]["solver-only"]["n"] == 2 and summary["modes"]["solver-only"]["tokens_per_second"] > 0
    again = duet_eval(*args)  # a finished run resumes without loading the model
    assert again.returncode == 0 and "4 of 4 already done" in again.stderr and len(records(run)) == 4


def test_problems_are_decoded_in_one_batch(checkpoint, data, tmp_path):
    """N dialogues in N threads against one local backend share the engine's decoding batch."""
    backend = make_backend(f"local:{checkpoint}", max_batch=4)  # the engine run_eval will reuse
    engine = backend.engine
    widest = []
    lock = threading.Lock()
    step = engine._step

    def counting_step():
        with lock:
            widest.append(len(engine._active))
        return step()

    engine._step = counting_step
    try:
        outcome = run_eval(EvalOptions(data=data, out=tmp_path / "run", backend=f"local:{checkpoint}",
                                       modes="solver-only", concurrency=4,
                                       dialogue=DialogueConfig(max_tokens=12, max_steps=1)), say=lambda _: None)
    finally:
        del engine._step
    assert outcome.completed == 4 and not outcome.interrupted
    assert max(widest) > 1, "the problems were decoded one at a time"

"""Learning from answer rewards (duet.train.rl) and the verifier's confidence head (duet.train.verifier_head)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from duet.agents.dialogue import DialogueConfig, run_dialogue
from duet.agents.local_backend import LocalBackend
from duet.agents.verifier import ConfidenceHead, auroc
from duet.model.embedded import EMBEDDED_DIR
from duet.prompts import load_prompts
from duet.train.conversations import solve_conversation
from duet.train.rl import RLConfig, draw_problems, group_advantages, policy_gradient_step, train_rl
from duet.train.solutions import run_cells
from duet.train.sources import normalised
from duet.train.trainer import TrainError, encode_example, token_logprobs, train
from duet.train.verifier_head import fit_head, solution_confidence
from tests.test_train import _config, _tiny_model, data_dir, sources, tokenizer  # noqa: F401  (fixtures)

RIGHT = "Add them.\n```python\nanswer = 3 + 4\nprint(answer)\n```\n```output\n7\n```\nThe answer is \\boxed{7}."
WRONG = "Multiply them.\n```python\nanswer = 3 * 4\nprint(answer)\n```\n```output\n12\n```\nThe answer is \\boxed{12}."
QUESTION = "Ann has 3 pens and buys 4 more. How many pens does she have?"


def test_advantages_are_rewards_minus_the_groups_mean_and_unanimous_groups_drop_out():
    attempts = ([{"id": "a", "correct": c} for c in (True, False, False, False)]
                + [{"id": "b", "correct": True}] * 3 + [{"id": "c", "correct": False}] * 2)
    weighted = group_advantages(attempts)
    assert [adv for _, adv in weighted] == [0.75, -0.25, -0.25, -0.25]
    assert {a["id"] for a, _ in weighted} == {"a"}


def test_drawn_problems_are_training_rows_with_golds_their_code_gives(sources):  # noqa: F811
    records = draw_problems(sources, random.Random(0), 12, "t")
    assert len(records) == 12 and {"mawps", "stories"} <= {r["kind"] for r in records}
    dev = {normalised(r.question) for r in sources.mawps_dev}
    for r in records:
        _, answer = run_cells([tuple(c) for c in r["cells"]])
        assert answer is not None and r["answer"] == f"#### {answer}"  # the code's own answer
        assert normalised(r["question"]) not in dev


def test_one_step_moves_probability_toward_the_rewarded_solution(tokenizer):  # noqa: F811
    prompts = load_prompts()
    model = _tiny_model(tokenizer)

    def logp(solution: str) -> float:
        ids, mask = encode_example(tokenizer, solve_conversation(prompts, QUESTION, solution))
        with torch.no_grad():
            lp = token_logprobs(model, torch.tensor([ids]))[0]
        return float((lp * torch.tensor(mask[1:])).sum())

    before = logp(RIGHT), logp(WRONG)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weighted = [({"question": QUESTION, "solution": RIGHT}, 0.5), ({"question": QUESTION, "solution": WRONG}, -0.5)]
    loss, tokens = policy_gradient_step(model, tokenizer, prompts, weighted, micro_batch=1,
                                        device=torch.device("cpu"), bf16=False)
    opt.step()
    assert tokens > 20 and math.isfinite(loss)
    assert logp(RIGHT) > before[0] and logp(WRONG) < before[1]


def test_the_gradient_is_of_the_question_the_sampling_dialogue_read(tokenizer):  # noqa: F811
    """The dialogue reads numbers in words as digits when it samples; the policy gradient must condition on
    that same prompt, or a question in words trains tokens the model never saw."""
    prompts = load_prompts()
    model = _tiny_model(tokenizer)

    def loss(question: str) -> float:
        model.zero_grad()
        return policy_gradient_step(model, tokenizer, prompts, [({"question": question, "solution": RIGHT}, 1.0)],
                                    micro_batch=1, device=torch.device("cpu"), bf16=False)[0]

    in_words = "Ann has three pens and buys four more. How many pens does she have?"
    assert loss(in_words) == loss(QUESTION) != loss(QUESTION.replace("Ann", "Bo"))


def test_a_run_samples_scores_steps_saves_and_resumes_only_itself(tmp_path, data_dir):  # noqa: F811
    """One real iteration on a tiny model: `duet eval` samples in a child process, the log and an atomic
    checkpoint are written; a second run into the same folder with other settings is refused."""
    base = train(_config(tmp_path / "base", data_dir, steps=1), progress=False, log=lambda *_: None)
    cfg = RLConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "rl"), init_from=str(base), iterations=1,
                   problems=3, group=2, concurrency=6, threads=1, sft_batch=1, mix={"mawps": 1.0})
    ckpt = train_rl(cfg, log=lambda *_: None)
    [record] = [json.loads(line) for line in (tmp_path / "rl" / "rl_log.jsonl").read_text().splitlines()]
    assert record["iteration"] == 1 and record["samples"] == 6 and record["sft_loss"] > 0
    assert record["cpu_seconds"] > 0 and (ckpt / "model.safetensors").is_file()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == 1
    with pytest.raises(TrainError, match="other settings"):
        train_rl(RLConfig(**{**cfg.__dict__, "iterations": 2, "group": 4}), log=lambda *_: None)


def test_fitted_head_ranks_right_solutions_first(tmp_path):
    rng = random.Random(0)
    features, labels = [], []
    for _ in range(400):
        right = rng.random() < 0.4
        mean = rng.gauss(-0.05 if right else -0.25, 0.08)
        unused = float(rng.random() < (0.2 if right else 0.7))  # the number check's findings: mostly on wrong ones
        features.append({"mean": mean, "min": mean * 10 + rng.gauss(0, 1), "tokens": 40,
                         "ungrounded": float(not right and rng.random() < 0.3), "unused": unused, "reused": 0.0})
        labels.append(right)
    head = fit_head(features, labels)
    assert head.weights["mean"] > 0 and head.weights["unused"] < 0 and head.weights["ungrounded"] < 0
    assert auroc([head.p(f) for f in features], labels) > 0.85
    (tmp_path / ConfidenceHead.FILE).write_text(json.dumps(head.to_dict()))
    assert ConfidenceHead.load(tmp_path) == head


def test_teacher_forced_confidence_is_what_generation_records():
    """The head is fitted on solutions read again (teacher forcing) and applied to what the engine recorded while
    writing them: the two must be the same numbers."""
    backend = LocalBackend.load(EMBEDDED_DIR)
    result = run_dialogue("A shelf has 12 books. 7 more are added. How many books are on the shelf?", backend,
                          config=DialogueConfig(sandbox_timeout=10))
    turn = result.turns[0]
    assert turn.confidence and turn.confidence["tokens"] == turn.completion_tokens
    engine = backend.engine
    again = solution_confidence(engine.model, engine.tokenizer, load_prompts(), result.question, turn.text)
    assert again["tokens"] == turn.confidence["tokens"]
    assert abs(again["mean"] - turn.confidence["mean"]) < 1e-3 and abs(again["min"] - turn.confidence["min"]) < 1e-2


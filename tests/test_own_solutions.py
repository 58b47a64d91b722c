"""The critic's own solutions (`critic_solves`): sampled solver turns it compares the solver's answer with.

Driven by scripted backends and the real sandbox; the concurrent case by a backend that only answers
when every solution is in flight at once.
"""

from __future__ import annotations

import random
import threading

import pytest

from duet.agents.backends import Completion, Request, ScriptedBackend
from duet.agents.critic import Critic, own_solution_reason
from duet.agents.dialogue import Dialogue, DialogueConfig
from duet.agents.protocol import AGREE, DISAGREE
from duet.prompts import load_prompts

QUESTION = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"


def solution(expression: str, note: str = "Add them.") -> str:
    code = f"```python\nprint({expression})\n```\n```output\n(placeholder)\n```\n"
    return f"{note}\n{code}So \\boxed{{{eval(expression)}}}."


RIGHT, WRONG, OTHER = solution("23 + 4 * 12"), solution("23 + 4 + 12"), solution("23 * 4 + 12")
MODEL_AGREE = "Recompute.\n```python\nprint(23 + 48)\n```\n```output\n71\n```\nVERDICT: AGREE\n\\boxed{71}"


def run(replies: list[str], solves: int = 3, **config) -> tuple:
    """The dialogue's result and the requests that opened a turn (not the continuations after code output)."""
    backend = ScriptedBackend(replies)
    result = Dialogue(backend, config=DialogueConfig(critic_solves=solves, seed=7, **config)).run(QUESTION)
    return result, [c for c in backend.calls if c.messages[-1]["role"] != "assistant"]


def test_a_majority_for_another_answer_disagrees_and_shows_one_of_its_solutions():
    # solver 39; own solutions 71, 71, 104 -> the critic disagrees without its model; the revision gives 71,
    # which two own solutions support -> agreed, still without the critic's model
    result, calls = run([WRONG, RIGHT, RIGHT, OTHER, RIGHT])
    assert result.answer == "71" and result.agreed and result.stop_reason == "agreed" and result.rounds == 2
    assert [(t.agent, t.task) for t in result.turns] == [
        ("solver", "solve"), ("critic", "own_solution"), ("critic", "own_solution"), ("critic", "own_solution"),
        ("critic", "own_solutions"), ("solver", "revise"), ("critic", "own_solutions")]
    check = result.turns[4]
    assert check.verdict == DISAGREE and check.answer == "71" and check.model == "duet:own-solutions"
    own_text = result.turns[1].text  # the sandbox's real output replaced the placeholder
    assert "```output\n71\n```" in own_text
    revise_request = calls[4].messages[-1]["content"]
    expected = own_solution_reason("71", 2, 3, "39", own_text)
    assert f"A checker disagrees: {expected} (the checker's answer: 71)" in revise_request
    assert result.turns[6].verdict == AGREE and result.turns[6].reason == "2 of my 3 own solutions also give 71."
    # the own solutions are sampled (temperature 0.7) with seeds seed + 1 + i; the solver stays greedy
    assert [(c.request.temperature, c.request.seed) for c in calls[:4]] == [(0.0, 7), (0.7, 8), (0.7, 9), (0.7, 10)]
    assert calls[1].messages == calls[0].messages  # the solver's own prompt, fresh


def test_support_agrees_and_a_split_asks_the_model():
    agreed, calls = run([RIGHT, RIGHT, OTHER, RIGHT])
    assert agreed.stop_reason == "agreed" and agreed.turns[-1].task == "own_solutions"
    assert len(calls) == 4  # no model critique
    split, calls = run([RIGHT, WRONG, OTHER, solution("4 * 12")] + [MODEL_AGREE])
    assert split.turns[-1].task == "critique" and split.agreed and split.answer == "71"


def test_a_tie_or_a_lone_vote_is_not_enough_to_overrule_the_solver():
    # 104 has one vote: below MIN_VOTES, so the model decides
    lone, _ = run([RIGHT, OTHER, WRONG, solution("4 * 12")] + [MODEL_AGREE])
    assert lone.turns[-1].task == "critique"
    # 104 and 71 have two votes each: not more than the solver's support
    tie, _ = run([RIGHT, OTHER, RIGHT, OTHER, RIGHT], solves=4)
    assert tie.turns[-1].task == "own_solutions" and tie.turns[-1].verdict == AGREE
    # 104 has two votes, 71 one plus the solver's own: a tie with the solver, so the model decides
    solver_vote, _ = run([RIGHT, OTHER, OTHER, RIGHT] + [MODEL_AGREE])
    assert solver_vote.turns[-1].task == "critique" and solver_vote.answer == "71"


def test_own_solutions_for_another_answer_come_before_the_number_check_which_comes_before_their_agreement():
    miscopied = solution("28 + 4 * 12")  # 76, with a number the problem never gives
    result, calls = run([miscopied, RIGHT, RIGHT, OTHER, RIGHT])
    assert [t.task for t in result.turns] == ["solve", "own_solution", "own_solution", "own_solution",
                                              "own_solutions", "revise", "own_solutions"]
    assert result.answer == "71" and result.agreed and len(calls) == 5  # solved once, used in round 2
    lucky = solution("28 + 4 * 12 - 5")  # 71 for a wrong reason: the own solutions agree, the number check objects
    result, calls = run([lucky, RIGHT, RIGHT, OTHER, RIGHT])
    assert [t.task for t in result.turns][4:] == ["number_check", "revise", "own_solutions"]
    assert "the code uses 28" in result.turns[4].reason and result.agreed


def test_no_own_solutions_when_off_or_solver_only():
    off, calls = run([RIGHT, MODEL_AGREE], solves=0)
    assert [t.task for t in off.turns] == ["solve", "critique"]
    alone, calls = run([RIGHT], critic=False)
    assert [t.task for t in alone.turns] == ["solve"] and len(calls) == 1


class ConcurrentBackend:
    """Answers only when the solver's turn and every own solution are in flight together."""

    name = "concurrent-test"
    concurrent = True

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=20)
        self.lock = threading.Lock()
        self.pending: dict[int, str] = {}  # thread -> rest of its reply after the code block

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
        if messages[-1]["role"] == "assistant":  # the continuation after the output block
            return Completion("So \\boxed{71}.", finish_reason="eos")
        self.barrier.wait()  # raises BrokenBarrierError unless all requests arrive at once
        text = "Add them.\n```python\nprint(23 + 4 * 12)\n```\n"
        return Completion(text, finish_reason="stop", stop_string="```output")


def test_on_a_concurrent_backend_they_run_beside_the_solvers_turn():
    backend = ConcurrentBackend(parties=1 + 4)
    result = Dialogue(backend, config=DialogueConfig(critic_solves=4)).run(QUESTION)
    assert result.stop_reason == "agreed" and result.answer == "71", result.error
    assert sum(t.task == "own_solution" for t in result.turns) == 4
    assert all(t.answer == "71" for t in result.turns if t.task == "own_solution")


def test_off_by_default():
    assert Critic(ConcurrentBackend(1)).solves == 0 and DialogueConfig().critic_solves == 0


def test_training_revisions_word_the_critique_as_the_live_critic_does():
    """duet.train.conversations' revision after own solutions has the live dialogue's words (votes aside)."""
    from duet.train.conversations import _own_solution_revision

    result, calls = run([WRONG, RIGHT, RIGHT, OTHER, solution("4 * 12"), RIGHT], solves=4)
    live = calls[5].messages[-1]["content"]
    assert "got 71 in 2 of 4 tries, not 39" in live
    rng = random.Random(0)
    while (conv := _own_solution_revision(load_prompts(), QUESTION, WRONG, "39", result.turns[1].text, "71", rng)
           ) and "in 2 of" not in conv.messages[3]["content"]:
        pass  # the votes are drawn from 2..4; find the draw the live run had
    assert conv.messages[3]["content"] == live
    assert conv.messages[4]["content"] == result.turns[1].text and conv.kind == "revise_own_solution"


@pytest.mark.parametrize("flag, expected", [((), 0), (("--critic-solves", "2"), 2)])
def test_critic_solves_is_a_setting(flag, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no user config file
    from duet.app.backends import dialogue_config
    from duet.app.settings import load_settings

    settings = load_settings({"critic_solves": int(flag[1])} if flag else {}, env={})
    assert dialogue_config(settings).critic_solves == expected

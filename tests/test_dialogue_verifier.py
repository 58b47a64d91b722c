"""The verifier in the dialogue and in `duet eval`'s verifier@k: scores, sampled alternatives, the weighted vote.

A fake model answers solver requests by seed (greedy: a wrong solution; samples: right or wrong as scripted)
and verdict requests with log-probabilities that favour right answers; code runs in the real sandbox.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest

from duet.agents.backends import BackendError, Completion, Request
from duet.agents.dialogue import DialogueConfig, run_dialogue
from duet.agents.transcript import DialogueResult
from duet.agents.verifier import VERDICT_PREFIX, ConfidenceHead, weighted_vote
from duet.evaluation.datasets import Problem
from duet.evaluation.modes import Context, parse_mode, run_problem
from duet.prompts import load_prompts
from duet.ui.render import summary_line

QUESTION = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"
RIGHT = "Multiply, then add.\n```python\nprint(23 + 4 * 12)\n```\n```output\n71\n```\nSo \\boxed{71}."
WRONG = "Add them.\n```python\nprint(23 + 12)\n```\n```output\n35\n```\nSo \\boxed{35}."


class FakeModel:
    """A model: greedy solves wrongly unless told; sample i (seed base + 1 + i) follows ``samples``; the verifier
    gives P(AGREE) 0.9 to a solution ending in 71 and 0.2 to any other; revisions copy the critique's solution."""

    name = "fake-model"
    model_backed = True
    concurrent = False

    def __init__(self, greedy: str = WRONG, samples: tuple[str, ...] = (RIGHT, RIGHT, WRONG), seed: int = 5,
                 logprobs: bool = True) -> None:
        self.greedy, self.samples, self.seed, self.logprobs = greedy, samples, seed, logprobs
        self.lock = threading.Lock()
        self.verdicts = 0

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
        last = messages[-1]
        if last["role"] == "assistant" and last["content"] == VERDICT_PREFIX:
            with self.lock:
                self.verdicts += 1
            p = 0.9 if "\\boxed{71}" in messages[1]["content"] else 0.2
            first = {" AG": math.log(p), " DIS": math.log(1 - p)} if self.logprobs else None
            return Completion(" AGREE" if p > 0.5 else " DISAGREE", top_logprobs=[first] if first else None)
        if last["role"] == "assistant":  # a continuation after the output block: the rest of the reply
            reply = next(r for r in (RIGHT, WRONG) if last["content"].startswith(r.split("\n")[0]))
            return Completion(reply.split("```\n", 2)[-1], finish_reason="eos")
        if last["role"] == "user" and "My solution:" in last["content"]:
            reply = RIGHT  # the revision writes out the shown solution
        elif request.temperature == 0:
            reply = self.greedy
        else:
            reply = self.samples[(request.seed or 0) - self.seed - 1]
        head, sep, _ = reply.partition("```output")
        return Completion(head, finish_reason="stop" if sep else "eos", stop_string="```output" if sep else None)


def config(**kw) -> DialogueConfig:
    return DialogueConfig(verify=True, samples=3, seed=5, sandbox_timeout=10, number_check=False, **kw)


def test_a_right_answer_scoring_high_is_agreed_at_once_without_samples():
    model = FakeModel(greedy=RIGHT)
    result = run_dialogue(QUESTION, model, config=config())
    assert result.agreed and result.answer == "71" and result.rounds == 1 and result.answered_by == "agreed"
    (check,) = result.critic_turns
    assert check.task == "verify" and check.score == {"p": 0.9, "method": "logprobs"} and check.votes is None
    assert model.verdicts == 1 and not [t for t in result.turns if t.task == "sample"]


def test_a_low_score_samples_alternatives_whose_weighted_vote_corrects_the_solver():
    events = []
    model = FakeModel()
    result = run_dialogue(QUESTION, model, config=config(), on_event=events.append)
    first, second = result.critic_turns
    assert first.task == "verify" and first.verdict == "disagree" and first.score["p"] == 0.2
    # the solver's 35 (0.2) and one sampled 35 (0.2) against two sampled 71s (0.9 each)
    assert [(v["answer"], v["count"]) for v in first.votes] == [("71", 2), ("35", 2)]
    assert first.votes[0]["weight"] == 1.8 and first.answer == "71"
    assert "got 71 in 2 of 3 tries, not 35. My solution:" in first.reason and "23 + 4 * 12" in first.reason
    assert second.verdict == "agree" and result.agreed and result.answer == "71" and result.rounds == 2
    samples = [t for t in result.turns if t.task == "sample"]
    assert [t.answer for t in samples] == ["71", "71", "35"] and all(t.score for t in samples)
    verdicts = [e for e in events if e.kind == "verdict"]
    # the revision, written after being shown a solution, is judged by the vote, not scored again
    assert [e.data["score"] for e in verdicts] == [0.2, None] and second.score is None
    assert second.votes[0]["answer"] == "71" and "the weighted vote chooses 71" in second.text
    assert model.verdicts == 4  # the solver's first solution and the three samples


def test_a_near_tie_does_not_overturn_the_solvers_answer():
    """Another answer must outweigh the solver's by more than VOTE_MARGIN: 35 (0.2 + 0.2) against 71 (0.45)."""
    unsure = "I cannot tell."  # a sample without an answer does not vote
    class Unsure(FakeModel):
        def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
            done = super().complete(messages, request, on_text=on_text, cancel=cancel)
            if done.top_logprobs and "\\boxed{71}" in messages[1]["content"]:
                done.top_logprobs = [{" AG": math.log(0.45), " DIS": math.log(0.55)}]
            return done

    result = run_dialogue(QUESTION, Unsure(samples=(RIGHT, WRONG, unsure)), config=config(max_rounds=1))
    (check,) = result.critic_turns
    assert [(v["answer"], v["weight"]) for v in check.votes] == [("71", 0.45), ("35", 0.4)]
    assert check.verdict == "agree" and result.answer == "35"
    close = run_dialogue(QUESTION, Unsure(samples=(RIGHT, WRONG, RIGHT)), config=config(max_rounds=1))
    assert close.critic_turns[0].votes[0]["answer"] == "71"  # 0.9 against 0.4: overturned
    assert close.critic_turns[0].verdict == "disagree"


def test_without_agreement_the_weighted_vote_answers():
    model = FakeModel()
    result = run_dialogue(QUESTION, model, config=config(max_rounds=1))
    assert not result.agreed and result.stop_reason == "max_rounds" and result.answer == "71"


def test_the_weights_decide_not_the_counts():
    result = run_dialogue(QUESTION, FakeModel(samples=(WRONG, WRONG, RIGHT)), config=config())
    assert result.critic_turns[0].votes[0]["answer"] == "71" and result.answer == "71"  # 0.9 beats 3 x 0.2
    same = run_dialogue(QUESTION, FakeModel(samples=(WRONG, WRONG, WRONG)), config=config())
    (check,) = same.critic_turns  # every sample agrees with the solver: the vote keeps its answer
    assert check.verdict == "agree" and same.answer == "35" and same.agreed


def test_without_logprobs_the_verdict_text_is_the_score_and_the_transcript_says_so():
    result = run_dialogue(QUESTION, FakeModel(greedy=RIGHT, logprobs=False), config=config())
    assert result.critic_turns[0].score == {"p": 1.0, "method": "text"}


def test_weighted_vote_groups_equivalent_answers():
    winner, groups = weighted_vote(["1/2", "0.5", "3", None], [0.3, 0.3, 0.5, 0.9])
    assert winner == "1/2" and groups[0]["weight"] == 0.6 and groups[0]["count"] == 2


def test_eval_verifier_at_k_records_greedy_majority_weighted_and_pass_at_k():
    model = FakeModel()
    ctx = Context(solver=lambda: model, critic=lambda: None, config=config(), prompts=load_prompts(), seed=0)
    mode = parse_mode("verifier@3")
    # the eval derives each sample's seed from the problem; make the fake's samples follow any seed
    model.samples = (RIGHT,) * 1
    model.complete_samples = True
    original = model.complete

    def complete(messages, request=Request(), **kw):
        if request.temperature > 0 and messages[-1]["role"] == "user":
            request = Request(stop=request.stop, max_tokens=request.max_tokens, temperature=request.temperature,
                              seed=model.seed + 1)
        return original(messages, request, **kw)

    model.complete = complete
    record, transcript = run_problem(Problem("p1", QUESTION, "71", 1), mode, ctx)
    assert record["first_prediction"] == "35" and record["first_correct"] is False and record["first_score"] == 0.2
    assert record["pass_at_k"] is True and record["prediction"] == "71" and record["correct"] is True
    assert record["majority_correct"] is True  # three 71s against one 35
    assert [s["p"] for s in record["samples"]] == [0.2, 0.9, 0.9, 0.9]
    assert transcript["scores"][0]["method"] == "logprobs"


class ConfidentModel(FakeModel):
    """FakeModel whose completions carry token log-probabilities: sure of right solutions, unsure of wrong ones."""

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
        done = super().complete(messages, request, on_text=on_text, cancel=cancel)
        sure = "71" in done.text or "23 + 4 * 12" in done.text
        done.token_logprobs = [-0.01 if sure else -0.6] * 5
        return done


def test_with_a_confidence_head_the_score_is_the_solvers_confidence_and_no_verdict_is_asked():
    model = ConfidentModel()
    model.verifier_head = ConfidenceHead({"mean": 20.0}, bias=2.0)  # mean -0.01 -> 0.86; -0.6 -> 0.0000…
    result = run_dialogue(QUESTION, model, config=config())
    solver = result.turns[0]
    assert solver.confidence == {"mean": -0.6, "min": -0.6, "tokens": 10}  # both pieces of the reply
    check = next(t for t in result.turns if t.task == "verify")
    assert check.score["method"] == "confidence" and check.score["p"] < 0.01
    samples = [t for t in result.turns if t.task == "sample"]
    assert [t.score["method"] for t in samples] == ["confidence"] * 3
    assert result.answer == "71" and model.verdicts == 0  # the head replaced every verdict request


def test_a_solution_without_log_probabilities_falls_back_to_the_verdict():
    model = FakeModel()  # no token_logprobs: Turn.confidence is None
    model.verifier_head = ConfidenceHead({"mean": 20.0}, bias=2.0)
    result = run_dialogue(QUESTION, model, config=config())
    assert result.turns[0].confidence is None
    check = next(t for t in result.turns if t.task == "verify")
    assert check.score["method"] == "logprobs" and model.verdicts > 0


def test_confidence_head_files(tmp_path):
    assert ConfidenceHead.load(tmp_path) is None
    (tmp_path / ConfidenceHead.FILE).write_text('{"weights": {"mean": 2.0, "min": 0.5}, "bias": 1.0}')
    head = ConfidenceHead.load(tmp_path)
    assert abs(head.p({"mean": -0.5, "min": -2.0, "tokens": 3}) - 1 / (1 + math.exp(1.0))) < 1e-9
    (tmp_path / ConfidenceHead.FILE).write_text('{"weights": {"mean": 2.0, "unused": -1.5}, "bias": 1.0}')
    assert ConfidenceHead.load(tmp_path).weights == {"mean": 2.0, "unused": -1.5}
    for bad in ("{", '{"weights": {"entropy": 1}, "bias": 0}', '{"weights": [], "bias": 0}'):
        (tmp_path / ConfidenceHead.FILE).write_text(bad)
        with pytest.raises(BackendError) as e:
            ConfidenceHead.load(tmp_path)
        assert "\n" not in str(e.value) and "not a verifier head" in str(e.value) and "fit it again" in str(e.value)


def test_a_head_with_number_features_scores_a_solution_by_what_the_number_check_finds():
    """Two solutions the model was equally sure of: the one whose code uses a number the problem never gives, or
    leaves a given one unused, scores lower; a head of confidence alone cannot tell them apart."""
    from duet.agents.verifier import Verifier

    sure = {"mean": -0.01, "min": -0.05, "tokens": 5}
    model = ConfidentModel()
    miscopied = RIGHT.replace("23 + 4", "28 + 4")
    for head, differs in ((ConfidenceHead({"mean": 20.0, "ungrounded": -3.0, "unused": -1.5}, 2.0), True),
                          (ConfidenceHead({"mean": 20.0}, 2.0), False)):
        model.verifier_head = head
        verifier = Verifier(model, load_prompts())
        right, wrong = (verifier.score(QUESTION, s, confidence=sure).p for s in (RIGHT, miscopied))
        assert (right > wrong) if differs else (right == wrong)
    features = ConfidenceHead({"unused": -1.0}, 0.0).features(QUESTION, miscopied, sure)
    assert features == {**sure, "ungrounded": 1.0, "unused": 1.0, "reused": 0.0}


def test_a_first_solution_rejected_before_the_verifier_still_votes():
    """The number check rejected the solver's first (right) solution; its revision is wrong. The verifier scores
    the first solution too, so the revision cannot outvote it unseen: the critic disagrees and shows 71."""
    from duet.agents.critic import Critic, Judgement
    from duet.agents.dialogue import sandbox_factory_for
    from duet.agents.transcript import Turn
    from duet.agents.turn import TurnOptions

    model = ConfidentModel()
    model.verifier_head = ConfidenceHead({"mean": 20.0}, bias=2.0)
    critic = Critic(model, number_check=False, verify=True)
    options = TurnOptions(sandbox_factory_for(config()), seed=5)
    judgement = Judgement(critic.verifier, model, load_prompts(), QUESTION, options, threshold=0.5, samples=3,
                          temperature=0.7)
    judgement.first = Turn("solver", 1, "solve", model.name, [], text=RIGHT, answer="71",
                           confidence={"mean": -0.01, "min": -0.01, "tokens": 5})
    check = critic.check(QUESTION, WRONG, options, round=2, judgement=judgement,
                         confidence={"mean": -0.6, "min": -0.6, "tokens": 5})
    assert [a for a, _, _ in judgement.scored] == ["71", "35"]
    assert check.verdict == "disagree" and check.answer == "71"


def test_a_solution_kept_after_the_number_check_goes_to_the_verifiers_vote():
    """The number check questions the solver's number; the solver keeps its solution word for word. Stopping
    there (a repeated reply) would leave the questioned answer unjudged, and so would agreeing because it scores
    high (0.9 here): the samples vote whatever its score, and the vote's 71 answers."""
    miscopied = WRONG.replace("23 + 12", "28 + 12").replace("35", "40")

    class Stubborn(FakeModel):
        def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
            last = messages[-1]
            if last["role"] == "user" and "the code uses 28" in last["content"]:  # the number check's question
                head, _, _ = miscopied.partition("```output")
                return Completion(head, finish_reason="stop", stop_string="```output")
            if last["role"] == "assistant" and "28 + 12" in last["content"]:  # the rest after the output block
                return Completion(miscopied.split("```\n", 2)[-1], finish_reason="eos")
            if last["content"] == VERDICT_PREFIX and "\\boxed{40}" in messages[1]["content"]:  # sure of its slip
                return Completion(" AGREE", top_logprobs=[{" AG": math.log(0.9), " DIS": math.log(0.1)}])
            return super().complete(messages, request, on_text=on_text, cancel=cancel)

    result = run_dialogue(QUESTION, Stubborn(greedy=miscopied), config=replace(config(), number_check=True))
    tasks = [t.task for t in result.turns if t.task != "sample"]
    assert tasks[:4] == ["solve", "number_check", "revise", "verify"]
    assert result.answer == "71"
    assert len([t for t in result.turns if t.task == "sample"]) == 3


def test_the_samples_start_when_the_number_check_questions_and_decode_beside_the_revision():
    """On a backend that serves requests together, the samples start as soon as the number check questions the
    first solution: the revision waits here until a sample request has arrived. The revision is right and the
    verifier agrees with it (0.9), so the samples, recorded, do not vote."""
    miscopied = WRONG.replace("23 + 12", "28 + 12").replace("35", "40")
    sampling = threading.Event()

    class Together(FakeModel):
        concurrent = True

        def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
            last = messages[-1]
            if request.temperature > 0:
                sampling.set()
            if last["role"] == "user" and "the code uses 28" in last["content"]:  # the revision
                assert sampling.wait(10), "the samples had not started when the solver revised"
                head, _, _ = RIGHT.partition("```output")
                return Completion(head, finish_reason="stop", stop_string="```output")
            return super().complete(messages, request, on_text=on_text, cancel=cancel)

    result = run_dialogue(QUESTION, Together(greedy=miscopied, samples=(WRONG,) * 3),
                          config=replace(config(), number_check=True))
    assert [t.task for t in result.turns if t.task != "sample"] == ["solve", "number_check", "revise", "verify"]
    check = result.critic_turns[-1]
    assert check.verdict == "agree" and check.votes is None and result.agreed and result.answer == "71"
    assert [t.answer for t in result.turns if t.task == "sample"] == ["35"] * 3


class SureOfTheSlip(FakeModel):
    """FakeModel whose verifier is surer of the wrong 35 (0.6) than of the right 71 (0.3)."""

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
        done = super().complete(messages, request, on_text=on_text, cancel=cancel)
        if messages[-1]["content"] == VERDICT_PREFIX:
            p = 0.3 if "\\boxed{71}" in messages[1]["content"] else 0.6
            done.top_logprobs = [{" AG": math.log(p), " DIS": math.log(1 - p)}]
        return done


def test_the_solutions_the_number_check_finds_least_wrong_with_vote_first():
    """The verifier is surer of the wrong 23 + 12 (0.6, it leaves 4 unused) than of the right 23 + 4 * 12 (0.3):
    weighted, two wrong samples and the solver's kept answer outvote the one right sample; with the number
    check on, only the solutions it finds nothing in vote, and 71 answers."""
    samples = (WRONG, RIGHT, WRONG)
    checked = run_dialogue(QUESTION, SureOfTheSlip(samples=samples), config=replace(config(), number_check=True))
    vote = next(t for t in checked.critic_turns if t.votes)
    assert [(v["answer"], v["count"]) for v in vote.votes] == [("71", 1)] and checked.answer == "71"
    unsure = config(max_rounds=1, verify_threshold=0.7)  # 0.6 would be agreed before any sample
    unchecked = run_dialogue(QUESTION, SureOfTheSlip(samples=samples), config=unsure)
    assert unchecked.critic_turns[0].votes[0]["answer"] == "35" and unchecked.answer == "35"


def test_a_dialogue_the_number_check_questions_to_the_end_is_answered_by_the_samples_vote():
    """Each solution of the solver uses a number the problem does not give, so the number check questions every
    one and the dialogue ends at max_rounds without the verifier asking for a vote. The samples, started at the
    first question, answer it (with the solver's first solution among the ballots), not its last slip."""
    slips = iter(["28 + 12", "29 + 12", "30 + 12"])

    class Slipping(FakeModel):
        def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
            last = messages[-1]
            if last["role"] == "user" and request.temperature == 0:  # the first solution and each revision
                code = next(slips)
                reply = WRONG.replace("23 + 12", code).replace("35", str(eval(code)))
                head, _, _ = reply.partition("```output")
                return Completion(head, finish_reason="stop", stop_string="```output")
            if last["role"] == "assistant" and last["content"].startswith("Add them."):
                answer = last["content"].split("```output\n")[1].split("\n")[0]
                return Completion(f"\nSo \\boxed{{{answer}}}.", finish_reason="eos")
            return super().complete(messages, request, on_text=on_text, cancel=cancel)

    result = run_dialogue(QUESTION, Slipping(samples=(RIGHT, RIGHT, WRONG)),
                          config=replace(config(), number_check=True, max_rounds=2))
    assert [t.task for t in result.turns if t.task != "sample"] == ["solve", "number_check", "revise", "number_check"]
    revision = next(t for t in result.turns if t.task == "revise")
    assert result.stop_reason == "max_rounds" and revision.answer == "41"
    assert result.answer == "71" and [t.answer for t in result.turns if t.task == "sample"] == ["71", "71", "35"]
    assert result.answered_by == "vote" and "agreed: no · answer: the samples' vote · 2 rounds" in summary_line(result)
    assert DialogueResult.from_json(result.to_json()).answered_by == "vote"


def test_eval_verifier_at_k_takes_the_dialogues_vote_with_the_number_checks_doubts():
    """verifier@1 on a model surer of the slip (35: 0.6, it leaves 4 unused) than of the right sample (71: 0.3):
    with the number check on, as the dialogue votes, the sample the check finds nothing in answers."""
    class OneSample(SureOfTheSlip):
        def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
            if request.temperature > 0 and messages[-1]["role"] == "user":  # the eval derives its own seeds
                request = Request(stop=request.stop, max_tokens=request.max_tokens, temperature=request.temperature,
                                  seed=self.seed + 1)
            return super().complete(messages, request, on_text=on_text, cancel=cancel)

    def run(number_check: bool) -> tuple[dict, dict]:
        model = OneSample(samples=(RIGHT,))
        ctx = Context(solver=lambda: model, critic=lambda: None, config=replace(config(), number_check=number_check),
                      prompts=load_prompts(), seed=0)
        return run_problem(Problem("p1", QUESTION, "71", 1), parse_mode("verifier@1"), ctx)

    record, transcript = run(True)
    assert record["prediction"] == "71" and record["correct"] and record["first_prediction"] == "35"
    assert [s["doubts"] for s in transcript["scores"]] == [1.0, 0.0]
    plain, _ = run(False)
    assert plain["prediction"] == "35"  # weighted alone: 0.6 against 0.3

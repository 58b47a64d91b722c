"""Training conversations: the turns of a live dialogue that one problem (or one of the model's own attempts) yields.

Each is rendered through the same prompts (`duet.prompts`) and protocol (`duet.agents.protocol`) as a live
dialogue, with code outputs obtained by running the code: a solver turn; a critic turn on a correct or a
deliberately wrong solution ending in `VERDICT: AGREE` / `VERDICT: DISAGREE: reason`; the verifier's
one-line judgement; a revision turn where the solver fixes a rejected solution; a revision after the
critic's number check (`duet.agents.number_check`) rejected a solution with a miscopied number or one that
left a number out; and a
revision after the critic's own solutions. Only the final assistant message is trained on, and within it
only what the model writes (not the output blocks duet writes).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from duet.agents.critic import NO_ANSWER_REASON, own_solution_reason
from duet.agents.number_check import check_numbers, number_check_reason
from duet.answers.numbers import numbers_as_digits
from duet.prompts import Prompts
from duet.train.solutions import Problem, critic_text, dropped_cells, miscopied_cells, solution_text
from duet.train.sources import Attempt


@dataclass
class Conversation:
    """Messages of one training example; the last assistant message is the target."""

    messages: list[dict]
    # solve | judge_right | judge_wrong | critique_correct | critique_wrong | revise | revise_numbers
    # | revise_own_solution
    kind: str


def solve_conversation(prompts: Prompts, question: str, solution: str) -> Conversation:
    """The solver's first turn on `question` (read with numbers as digits, as the dialogue does)."""
    return Conversation([{"role": "system", "content": prompts.solver_system},
                         {"role": "user", "content": prompts.solver_question(numbers_as_digits(question))},
                         {"role": "assistant", "content": solution}], "solve")


def _revise(prompts: Prompts, question: str, rejected: str, critique: str, solution: str) -> Conversation:
    """The solver's revision: its rejected turn, the critique as the dialogue words it, then `solution`."""
    return Conversation(solve_conversation(prompts, question, rejected).messages
                        + [{"role": "user", "content": prompts.revise_request(critique)},
                           {"role": "assistant", "content": solution}], "revise")


def _critique(prompts: Prompts, question: str, solution: str, check: str, kind: str) -> Conversation:
    """The critic's check of `solution`."""
    return Conversation([{"role": "system", "content": prompts.critic_system},
                         {"role": "user", "content": prompts.critic_request(question, solution)},
                         {"role": "assistant", "content": check}], kind)


def _judge(prompts: Prompts, question: str, solution: str, right: bool) -> Conversation:
    """The critic's one-line judgement of `solution` (the verifier's turn, see prompts/verifier_user.md)."""
    return Conversation([{"role": "system", "content": prompts.critic_system},
                         {"role": "user", "content": prompts.verifier_request(question, solution)},
                         {"role": "assistant", "content": f"VERDICT: {'AGREE' if right else 'DISAGREE'}"}],
                        "judge_right" if right else "judge_wrong")


def _number_check_revision(prompts: Prompts, question: str, rejected: str, solution: str) -> Conversation | None:
    """The revision the dialogue asks for when the number check rejects `rejected`; None when it passes."""
    findings = check_numbers(question, rejected)
    if not findings:
        return None
    revision = _revise(prompts, question, rejected, number_check_reason(findings), solution)
    revision.kind = "revise_numbers"
    return revision


MISCOPY_RATE = 0.5  # of problems that also yield a number-check revision of a miscopied number
DROP_RATE = 0.5  # ... of a number left out (the check's unused finding)
OWN_SOLUTION_RATE = 0.5  # of wrong solutions that also yield a revision after the critic's own solutions


def _own_solution_revision(prompts: Prompts, question: str, rejected: str, claimed: str, reference: str,
                           correct: str, rng: random.Random) -> Conversation:
    """The revision after the critic's own solutions mostly reached `correct` (`Critic(solves=4)`): the critique
    shows one of them (the reference), with the checker's answer, and the solver writes it out."""
    reason = own_solution_reason(correct, rng.randint(2, 4), 4, claimed, reference)
    revision = _revise(prompts, question, rejected, f"{reason} (the checker's answer: {correct})", reference)
    revision.kind = "revise_own_solution"
    return revision


JUDGE_RATE = 0.5  # of problems that also yield a judgement of a right or a wrong solution
JUDGE_RIGHT_RATE = 0.35  # of the model's own right solutions judged (all wrong ones are: they are rarer)
SOLVE_ONLY_RATE = 0.4  # of problems that yield only the solver's turn (solving is the skill everything rests on)


def conversations(problem: Problem, prompts: Prompts, rng: random.Random) -> Iterator[Conversation]:
    """The solver, critic and revision examples that one problem yields (its question read with numbers as
    digits, as the dialogue reads it)."""
    problem = replace(problem, question=numbers_as_digits(problem.question))
    solution, answer = solution_text(problem.cells)
    if answer is None:
        return
    yield solve_conversation(prompts, problem.question, solution)
    if rng.random() < JUDGE_RATE:  # balanced: a right solution or a wrong one
        if problem.wrong and rng.random() < 0.5:
            wrong_solution, wrong_answer = solution_text(rng.choice(problem.wrong))
            if wrong_answer is not None:
                yield _judge(prompts, problem.question, wrong_solution, False)
        else:
            yield _judge(prompts, problem.question, solution, True)
    if rng.random() < SOLVE_ONLY_RATE:
        return
    for rate, slip in ((MISCOPY_RATE, miscopied_cells), (DROP_RATE, dropped_cells)):  # what the number check catches
        if rng.random() < rate and not check_numbers(problem.question, solution) and (cells := slip(problem, rng)):
            rejected, rejected_answer = solution_text(cells)
            if rejected_answer is not None and rejected_answer != answer:
                revision = _number_check_revision(prompts, problem.question, rejected, solution)
                if revision is not None:
                    yield revision
    if rng.random() < 0.5 or not problem.wrong:
        text, _ = critic_text(problem, answer)
        yield _critique(prompts, problem.question, solution, text, "critique_correct")
    if problem.wrong:
        wrong_cells = rng.choice(problem.wrong)
        wrong_solution, wrong_answer = solution_text(wrong_cells)
        text, critique = critic_text(problem, wrong_answer)
        if not critique:
            return
        yield _critique(prompts, problem.question, wrong_solution, text, "critique_wrong")
        yield _revise(prompts, problem.question, wrong_solution, f"{critique} (the checker's answer: {answer})",
                      solution)
        if wrong_answer is not None and rng.random() < OWN_SOLUTION_RATE:
            yield _own_solution_revision(prompts, problem.question, wrong_solution, wrong_answer, solution, answer,
                                         rng)


# ----------------------------------------------------------------------------- on-policy attempts


def attempt_conversations(attempt: Attempt, prompts: Prompts,
                          rng: random.Random | None = None) -> Iterator[Conversation]:
    """A critic turn on the model's own solution; for a wrong one, also the revisions (after the critic model's
    reason and, with `rng`, sometimes after the critic's own solutions) and the reference solve."""
    problem = replace(attempt.problem, question=numbers_as_digits(attempt.problem.question))
    reference, correct = solution_text(problem.cells)
    if correct is None:
        return
    if attempt.answer is not None and (not attempt.correct or rng is None or rng.random() < JUDGE_RIGHT_RATE):
        yield _judge(prompts, problem.question, attempt.solution, attempt.correct)
    if attempt.answer is None:
        critique = NO_ANSWER_REASON  # the dialogue asks for a revision without asking the critic
    elif (revision := _number_check_revision(prompts, problem.question, attempt.solution, reference)):
        yield revision  # the number check rejects it before the critic model sees it
        if not attempt.correct:
            yield solve_conversation(prompts, problem.question, reference)
        return
    else:
        text, critique = critic_text(problem, attempt.answer)
        kind = "critique_wrong" if critique else "critique_correct"
        yield _critique(prompts, problem.question, attempt.solution, text, kind)
        if not critique:
            return
        critique = f"{critique} (the checker's answer: {correct})"
        if rng is not None and rng.random() < OWN_SOLUTION_RATE:
            yield _own_solution_revision(prompts, problem.question, attempt.solution, attempt.answer, reference,
                                         correct, rng)
    yield _revise(prompts, problem.question, attempt.solution, critique, reference)
    yield solve_conversation(prompts, problem.question, reference)

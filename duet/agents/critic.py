r"""The critic: checks the solver's last solution independently and gives a verdict.

Each check is a fresh conversation ``[system, user(problem + solution)]`` (the critic needs no
history, which keeps it inside a small model's context), run with the same step / code / output
protocol in its own sandbox session. The verdict is read by :func:`duet.agents.protocol.parse_verdict`;
the critic's own ``\boxed{}`` answer (if any) lets the dialogue detect agreement by equivalence.

Before the model is asked, the *number check* (:mod:`duet.agents.number_check`, on unless
``number_check=False``) looks for numbers in the solution's code that the problem does not give, or
that it gives once and the code uses on both sides of ``-`` or ``/``. When it finds some, the check
is a model-free turn (``task="number_check"``, model ``duet:number-check``) that disagrees and says
what it found (with the problem's closest number for one it does not give). A checker built from
the same model as the solver tends to miscopy the same way, so these are slips it cannot catch itself.
A number is questioned once per dialogue (``questioned``): a revision that keeps it (the solver may
have a reason, e.g. an intermediate result written out) goes to the model's check.

With ``solves=k`` the critic also solves the problem itself ``k`` times (:class:`OwnSolutions`: solver
turns sampled at ``solve_temperature``, each with its own sandbox), started with the dialogue so that
they decode beside the solver's first turn. A check then compares the solution's answer with them (a
model-free turn, ``task="own_solutions"``). When another answer has at least two votes and more than
the solver's answer (the solver's own solution counting as one vote), the critic disagrees and shows
one of those solutions: a small solver copies a worked solution far more often than it finds the
answer from a number alone. This comes before the number check. When two or more own solutions agree
with the solver, it agrees, unless the number check objects. Otherwise the model's check decides.

With the verifier on (``verify=True``, a :class:`Judgement` per dialogue), the verifier's score takes the
place of the model's check: at or above the threshold the critic agrees; below, the answers of the
solver's sampled alternatives vote, weighted by their scores, and when another answer wins the critic
disagrees, showing its best-scored solution (worded as the own solutions are, which the embedded model is
trained to follow). The number check still comes first.
"""

from __future__ import annotations

from duet.agents.backends import Backend, BackendError
from duet.agents.events import Emitter
from duet.agents.number_check import check_numbers, number_check_reason
from duet.agents.protocol import AGREE, DISAGREE, Verdict, extract_final_answer, parse_verdict
from duet.agents.transcript import Turn
from duet.agents.turn import TurnOptions, end_turn, run_turn
from duet.agents.verifier import VERDICT_PREFIX, Ballot, Samples, Score, Verifier, doubts, verifier_vote
from duet.answers import equivalent, majority
from duet.prompts import Prompts, load_prompts

GENERIC_DISAGREE = "the answer looks wrong; check every step again."
NO_VERDICT_REASON = "the checker could not confirm the answer; check every step again."
NO_ANSWER_REASON = r"the solution has no final answer in \boxed{}."
NUMBER_CHECK_MODEL = "duet:number-check"
OWN_SOLUTIONS_MODEL = "duet:own-solutions"
MIN_VOTES = 2  # own solutions that must share an answer before the critic acts on it without the model


class OwnSolutions:
    """The critic's ``k`` own solutions of one problem, started at once (they run while the solver solves).

    They are :class:`~duet.agents.verifier.Samples` without scores: concurrent on a backend that serves
    requests together, in order otherwise; solution ``i`` is sampled with seed ``seed + 1 + i`` (seed 0
    when the dialogue has none), so a dialogue is reproducible; their turns are silent.
    """

    def __init__(self, backend: Backend, prompts: Prompts, question: str, options: TurnOptions, k: int,
                 temperature: float) -> None:
        self.samples = Samples(backend, None, prompts, question, options, k, temperature, agent="critic",
                               task="own_solution")

    @property
    def started(self) -> bool:
        """Whether the solutions are running or done (a non-concurrent backend starts them on ``turns()``)."""
        return self.samples.started

    def turns(self) -> list[Turn]:
        """The finished solutions (waits for them)."""
        return [turn for turn, _ in self.samples.results()]

    def compare(self, claimed: str) -> tuple[Verdict, str | None] | None:
        """The verdict on the solver's answer ``claimed`` from the own solutions' answers, and the answer they
        reach instead (DISAGREE) or None (AGREE); None when they are too split to decide."""
        turns = self.turns()
        best, groups = majority([t.answer for t in turns])
        support = next((g["count"] for g in groups if equivalent(g["answer"], claimed)), 0)
        votes, k = (groups[0]["count"] if groups else 0), self.samples.k
        # the solver's answer is one more vote for `claimed`: another answer must beat that total, since a
        # greedy solution is right more often than a sampled one
        if best is not None and not equivalent(best, claimed) and votes >= MIN_VOTES and votes > support + 1:
            shown = next(t for t in turns if t.answer == best)
            return Verdict(DISAGREE, own_solution_reason(best, votes, k, claimed, shown.text)), best
        if support >= MIN_VOTES:
            return Verdict(AGREE, f"{support} of my {k} own solutions also give {claimed}."), None
        return None


class Judgement:
    """The verifier's side of one dialogue: every solution it scored, and the solver's sampled alternatives
    (started when a model-free check questions the solver or an answer scores below the threshold, whichever comes
    first, then reused by every later check and by the vote that answers a dialogue ending without agreement)."""

    def __init__(self, verifier: Verifier, solver: Backend, prompts: Prompts, question: str, options: TurnOptions,
                 *, threshold: float, samples: int, temperature: float, by_numbers: bool = False) -> None:
        self.verifier, self.solver, self.prompts, self.question = verifier, solver, prompts, question
        self.options, self.threshold, self.k, self.temperature = options, threshold, samples, temperature
        self.by_numbers = by_numbers  # the vote goes first to the solutions the number check finds least wrong with
        self.scored: list[tuple[str, float, str]] = []  # (answer, P(correct), solution) of the solver's checked ones
        self.samples: Samples | None = None  # started by start() or by the first vote
        self.voted = False  # whether the samples vote: the verifier asked for them
        self.first: Turn | None = None  # the solver's first solution (the dialogue sets it)
        # the solver kept a solution a model-free check questioned (the dialogue sets it): its score alone does not
        # settle it; the samples vote whatever it scores
        self.doubted = False

    def start(self) -> None:
        """Start the samples without waiting for them. On a backend that serves requests together they decode
        beside the solver's revision instead of after it (a dialogue's turns are sequential, the batch is not).
        They vote when a check asks for them (:meth:`sampled`) or when the dialogue ends without agreement
        (:meth:`final_vote`); a revision the verifier agrees with first leaves them unused."""
        if self.samples is None and self.k > 0:
            self.samples = Samples(self.solver, self.verifier, self.prompts, self.question, self.options, self.k,
                                   self.temperature)

    def sampled(self) -> list[tuple[Turn, Score | None]]:
        """The samples with their scores (started now if they were not); from now on they vote."""
        self.start()
        assert self.samples is not None, "sampled() needs samples > 0"
        self.voted = True
        return self.samples.results()

    def score_first(self) -> None:
        """Score the solver's first solution if no check has scored a solution yet: rejected by a model-free check
        before the verifier saw it, it still votes (with the score of the context it was written in), so a wrong
        revision cannot outvote it unseen."""
        first = self.first
        if self.scored or first is None or first.answer is None:
            return
        try:
            p = self.verifier.score(self.question, first.text, self.options.cancel, confidence=first.confidence).p
        except BackendError:
            return
        self.scored.append((first.answer, p, first.text))

    def final_vote(self) -> str | None:
        """The answer of a dialogue that ended without agreement once samples were drawn (they were started when a
        model-free check questioned the solver, whether or not a check asked for them since): the vote over them
        and the solver's scored solutions, its first one included."""
        self.score_first()
        self.sampled()
        return self.vote()[0]

    def vote(self) -> tuple[str | None, list[dict]]:
        """The verifier's vote (:func:`~duet.agents.verifier.verifier_vote`) over the solver's scored answers and,
        once they vote, the sampled ones; with ``by_numbers`` the number check's doubts rank them first."""

        def ballot(answer: str | None, p: float, solution: str) -> Ballot:
            return Ballot(answer, p, doubts(self.question, solution) if self.by_numbers else 0.0)

        ballots = [ballot(a, p, text) for a, p, text in self.scored]
        if self.voted and self.samples is not None:
            ballots += [ballot(t.answer, s.p, t.text) for t, s in self.samples.results() if t.answer is not None and s]
        return verifier_vote(ballots)


class Critic:
    """Checks solutions with one backend."""

    def __init__(self, backend: Backend, prompts: Prompts | None = None, *, number_check: bool = True,
                 solves: int = 0, solve_temperature: float = 0.7, verify: bool = False) -> None:
        self.backend = backend
        self.prompts = prompts or load_prompts()
        self.number_check = number_check
        self.solves, self.solve_temperature = solves, solve_temperature
        self.verifier = Verifier(backend, self.prompts) if verify else None

    def own_solutions(self, question: str, options: TurnOptions) -> OwnSolutions | None:
        """Start the critic's own solutions of ``question`` (None with ``solves=0``)."""
        if self.solves <= 0:
            return None
        return OwnSolutions(self.backend, self.prompts, question, options, self.solves, self.solve_temperature)

    def check(
        self, question: str, solution: str, options: TurnOptions, *, round: int, budget: int | None = None,
        questioned: set[str] | None = None, own: OwnSolutions | None = None, judgement: Judgement | None = None,
        confidence: dict[str, float] | None = None,
    ) -> Turn:
        """Critique ``solution`` to ``question``; the turn carries ``verdict``, ``reason`` and ``answer``.

        ``questioned``: numbers the number check already questioned in this dialogue (not questioned
        again); the ones this check questions are added to it. ``own``: the critic's own solutions
        (from :meth:`own_solutions`), compared before the model is asked. ``confidence``: the solution's turn's
        log-probabilities (``Turn.confidence``), for the verifier's head.
        """
        messages = [
            {"role": "system", "content": self.prompts.critic_system},
            {"role": "user", "content": self.prompts.critic_request(question, solution)},
        ]
        questioned = set() if questioned is None else questioned
        claimed = extract_final_answer(solution)
        compared = own.compare(claimed) if own is not None and claimed is not None else None
        findings = [f for f in (check_numbers(question, solution) if self.number_check else [])
                    if f.key not in questioned]
        # own solutions for another answer come first: a worked solution helps the solver more than a
        # questioned number; then the number check; then own solutions that agree; then the model
        if compared is not None and compared[0].kind == DISAGREE:
            verdict, answer = compared
            turn = _model_free_turn(round, "own_solutions", messages, "Compare with my own solutions.", verdict)
            turn.answer = answer
        elif findings:
            questioned.update(f.key for f in findings)
            verdict = Verdict(DISAGREE, number_check_reason(findings))
            turn = _model_free_turn(round, "number_check", messages, "Check the numbers against the problem.",
                                    verdict)
        elif compared is not None:
            verdict = compared[0]
            turn = _model_free_turn(round, "own_solutions", messages, "Compare with my own solutions.", verdict)
        elif judgement is not None and claimed is not None and (judged := self._judge(
                judgement, question, solution, claimed, round, options, confidence)) is not None:
            turn, verdict = judged
        else:
            turn = run_turn(self.backend, messages, options, agent="critic", round=round, task="critique",
                            budget=budget)
            verdict = parse_verdict(turn.text)
        if turn.model in MODEL_FREE or turn.task == "verify":
            Emitter(options.on_event, "critic", round)("turn_start", model=turn.model, task=turn.task)
        turn.verdict, turn.reason = verdict.kind, verdict.reason
        if (turn.error is None or turn.text) and turn.finish != "interrupted":  # a stopped check has no verdict
            Emitter(options.on_event, "critic", round)(
                "verdict", verdict.kind, reason=verdict.reason, answer=turn.answer,
                score=turn.score["p"] if turn.score else None,
            )
        end_turn(turn, options)
        return turn


    def _judge(self, judgement: Judgement, question: str, solution: str, claimed: str, round_no: int,
               options: TurnOptions, confidence: dict[str, float] | None) -> tuple[Turn, Verdict] | None:
        """The verifier's check: agree when the solution scores at least the threshold; else the answers of the
        sampled alternatives vote, weighted by their scores. None when the backend could not score it, or the
        score is low and there are no samples to vote (the model's own check then decides)."""
        assert self.verifier is not None
        messages = self.verifier.messages(question, solution)
        if judgement.voted:
            # a revision after the vote: the solver wrote it having been shown a solution, so its confidence
            # says how well it copied, not whether it is right; the vote over first solutions decides
            return self._by_vote(judgement, messages, claimed, round_no)
        if judgement.first is not None and judgement.first.text != solution:
            judgement.score_first()
        try:
            score = self.verifier.score(question, solution, options.cancel, confidence=confidence)
        except BackendError:
            return None
        judgement.scored.append((claimed, score.p, solution))
        turn = Turn("critic", round_no, "verify", self.backend.name, messages, prompt_tokens=score.prompt_tokens,
                    seconds=score.seconds, score=score.to_dict())
        if score.p >= judgement.threshold and not judgement.doubted:
            verdict = Verdict(AGREE, f"the verifier gives this answer P(correct) = {score.p:.2f}.")
        elif judgement.k <= 0:
            return None
        else:
            judgement.sampled()
            return self._by_vote(judgement, messages, claimed, round_no, turn, score)
        label = "AGREE" if verdict.kind == AGREE else "DISAGREE"
        turn.text = f"{VERDICT_PREFIX} {label} (P(correct) = {score.p:.2f}, read from {score.method})"
        return turn, verdict

    def _by_vote(self, judgement: Judgement, messages: list[dict], claimed: str, round_no: int,
                 turn: Turn | None = None, score: Score | None = None) -> tuple[Turn, Verdict]:
        """Agree when the weighted vote chooses ``claimed``; else disagree, showing the best-scored sampled
        solution of the vote's answer. ``turn``/``score``: the verifier's scoring of ``claimed``, when it was scored."""
        turn = turn or Turn("critic", round_no, "verify", self.backend.name, messages)
        winner, votes = judgement.vote()
        turn.votes = [{**v, "weight": round(v["weight"], 4)} for v in votes]
        scored = f"the verifier gives this answer P(correct) = {score.p:.2f}, and " if score else ""
        if winner is None or equivalent(winner, claimed):
            verdict = Verdict(AGREE, f"{scored}the weighted vote of the sampled solutions chooses {claimed}.")
        else:
            best = max(((t, s) for t, s in judgement.sampled() if s and t.answer is not None
                        and equivalent(t.answer, winner)), key=lambda ts: ts[1].p, default=None)
            if best is None:  # the vote kept the solver's first answer, which no sample gave
                verdict = Verdict(DISAGREE, f"the weighted vote of the solutions chooses {winner}, not {claimed}.")
            else:  # worded as the critic's own solutions are (the embedded model is trained to follow it)
                count = next(v["count"] for v in votes if equivalent(v["answer"], winner))
                verdict = Verdict(DISAGREE, own_solution_reason(winner, count, judgement.k, claimed, best[0].text))
            turn.answer = winner
        label = "AGREE" if verdict.kind == AGREE else "DISAGREE"
        read = f"P(correct) = {score.p:.2f}, read from {score.method}; " if score else ""
        turn.text = f"{VERDICT_PREFIX} {label} ({read}the weighted vote chooses {winner})"
        return turn, verdict


MODEL_FREE = (NUMBER_CHECK_MODEL, OWN_SOLUTIONS_MODEL)


def _model_free_turn(round: int, task: str, messages: list[dict], step: str, verdict: Verdict) -> Turn:
    """A critic turn decided without the model (``task``: number_check, own_solutions)."""
    label = "AGREE" if verdict.kind == AGREE else f"DISAGREE: {verdict.reason}"
    model = NUMBER_CHECK_MODEL if task == "number_check" else OWN_SOLUTIONS_MODEL
    return Turn("critic", round, task, model, messages, text=f"{step}\nVERDICT: {label}")


def own_solution_reason(answer: str, votes: int, tries: int, claimed: str, solution: str) -> str:
    """The critique when most of the critic's own solutions reach ``answer`` instead of ``claimed``: it shows
    one of them, which a small solver can follow (it rarely finds the other answer from the number alone)."""
    return (f"I solved it myself and got {answer} in {votes} of {tries} tries, not {claimed}. "
            f"My solution:\n{solution.strip()}")


def critique_message(turn: Turn) -> str:
    """The critique given to the solver: the critic's reason (or a generic one), plus its own answer."""
    if turn.verdict == DISAGREE:
        reason = turn.reason or GENERIC_DISAGREE
    else:
        reason = NO_VERDICT_REASON
    if turn.answer:
        reason = f"{reason.rstrip()} (the checker's answer: {turn.answer})"
    return reason

"""The verifier: one request for the verdict with log-probabilities, read from them or from the text."""

from __future__ import annotations

import math

import pytest

from duet.agents.backends import Completion, Request
from duet.agents.verifier import TOP_LOGPROBS, Verifier
from duet.prompts import load_prompts


class LogprobBackend:
    """Answers every verdict request with fixed first-token log-probabilities, and records the requests."""

    name = "logprobs-test"

    def __init__(self, first: dict[str, float] | None, text: str = " AGREE") -> None:
        self.first, self.text = first, text
        self.requests: list[Request] = []

    def complete(self, messages, request=Request(), *, on_text=None, cancel=None) -> Completion:
        self.requests.append(request)
        return Completion(self.text, top_logprobs=None if self.first is None else [self.first, {"REE": -0.1}])


def test_the_score_is_p_agree_over_agree_and_disagree_from_the_first_token():
    backend = LogprobBackend({" AG": math.log(0.6), " DIS": math.log(0.2), " maybe": math.log(0.1)})
    score = Verifier(backend, load_prompts()).score("What is 6 times 7?", "\\boxed{42}")
    assert score.method == "logprobs" and score.p == pytest.approx(0.75)
    (request,) = backend.requests
    assert request.logprobs == TOP_LOGPROBS and request.temperature == 0 and request.stop == ("\n",)


def test_without_logprobs_the_verdict_text_decides():
    prompts = load_prompts()
    assert Verifier(LogprobBackend(None), prompts).score("q", "s").p == 1.0
    wrong = Verifier(LogprobBackend(None, " DISAGREE: off by one"), prompts).score("q", "s")
    assert (wrong.p, wrong.method) == (0.0, "text")
    # a first token that is neither verdict: the text decides
    assert Verifier(LogprobBackend({" maybe": -0.1}), prompts).score("q", "s").method == "text"

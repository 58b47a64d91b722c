"""The response side of the HTTP API: OpenAI's envelopes, finish reasons and log-probabilities, and how the
dialogue's result and events read as a reply (`explain`) and as streamed reasoning text."""

from __future__ import annotations

import time
import uuid
from typing import Any

from duet.serve.service import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(prefix: str, kind: str, model: str, choices: list, usage: dict, rid: str | None = None) -> dict:
    return {"id": rid or new_id(prefix), "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def finish_reason(result: Any) -> str:
    return {"length": "length", "cancelled": "abort"}.get(result.finish_reason, "stop")


def chat_logprobs(logprobs: list[TokenLogprob]) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]} for t in logprobs]


def text_logprobs(logprobs: list[TokenLogprob]) -> dict:
    offsets, at = [], 0
    for t in logprobs:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [dict(t.top) for t in logprobs], "text_offset": offsets}


def event_text(event: Any) -> str:
    """How a dialogue event reads in the streamed reasoning text."""
    kind, data = event.kind, event.data
    if kind == "delta":
        return event.text
    if kind == "turn_start":
        return f"\n\n[{event.agent}, round {event.round}: {data.get('task', '')}]\n"
    if kind == "output":
        return f"```output\n{event.text}\n```\n"
    if kind == "verdict":
        reason = data.get("reason")
        return f"\n[critic's verdict: {event.text}{': ' + reason if reason else ''}]\n"
    if kind == "error":
        return f"\n[error: {event.text}]\n"
    return ""


EXPLANATION_CHARS = 1500


def explain(result: Any) -> str:
    """The dialogue's reply: the answer, how it was reached, and the solution that gave it."""
    stop = result.stop_reason
    if result.answer is None:
        why = f" ({result.error})" if result.error else ""
        return f"No answer: the dialogue ended without one ({stop}{why})."
    if result.agreed:
        how = f"The critic checked the solver's solution and agreed (round {result.rounds})."
    elif stop == "no_critic":
        how = "The solver's answer (solver only, not checked by the critic)."
    else:
        how = (f"The critic did not agree ({stop}, after {result.rounds} round{'s' * (result.rounds != 1)}); "
               "this is the solver's answer, unconfirmed.")
    solution = next((t.text for t in reversed(result.turns) if t.agent == "solver" and t.answer == result.answer
                     and t.task != "sample"), None)
    solution = solution or next((t.text for t in reversed(result.turns) if t.answer == result.answer), "")
    if len(solution) > EXPLANATION_CHARS:
        solution = solution[:EXPLANATION_CHARS] + " ..."
    text = f"The answer is {result.answer}.\n\n{how}"
    return f"{text}\n\n{solution.strip()}" if solution.strip() else text


def dialogue_summary(result: Any) -> dict[str, Any]:
    return {"answer": result.answer, "agreed": result.agreed, "rounds": result.rounds,
            "stop_reason": result.stop_reason, "error": result.error}


def dialogue_usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}

"""What ``GET /metrics`` reports, in the Prometheus text format (version 0.0.4), without a client library.

Counters only grow; gauges (queue length, batch size, requests in flight) are read when scraped, from the
engine (:meth:`duet.engine.Engine.occupancy`, :meth:`~duet.engine.Engine.prefix_cache_stats`).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

PREFIX = "duet"


class Metrics:
    """Thread-safe counters of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (endpoint, model, HTTP status)
        self.rejected = 0  # 429: the queue was full
        self.cancelled = 0  # generations cut short by a client that went away
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.drafted = 0
        self.accepted = 0
        self.generations = 0
        self.ttft_sum = 0.0
        self.latency_sum = 0.0
        self.dialogues = 0
        self.dialogue_tokens = 0

    def request(self, endpoint: str, model: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, model, status)] += 1
            if status == 429:
                self.rejected += 1

    def generation(self, result: Any) -> None:
        """Count one finished engine generation (a `GenerationResult`)."""
        with self._lock:
            self.generations += 1
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            self.cached_tokens += result.cached_tokens
            self.drafted += result.drafted
            self.accepted += result.accepted
            self.ttft_sum += result.first_token_seconds
            self.latency_sum += result.seconds
            if result.finish_reason == "cancelled":
                self.cancelled += 1

    def dialogue(self, result: Any) -> None:
        """Count one finished dialogue (a `DialogueResult`: its tokens, over all its engine requests)."""
        with self._lock:
            self.dialogues += 1
            self.dialogue_tokens += result.completion_tokens

    def render(self, *, in_flight: int, waiting: int, active: int, max_batch: int,
               prefix: dict | None) -> str:
        """The exposition text."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {PREFIX}_{name} {help}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            lines.extend(f"{PREFIX}_{name}{labels} {_number(value)}" for labels, value in samples)

        with self._lock:
            requests = sorted(self.requests.items())
            metric("requests_total", "counter", "HTTP requests answered, by endpoint, model and status.",
                   [(f'{{endpoint="{e}",model="{_label(m)}",status="{s}"}}', n) for (e, m, s), n in requests]
                   or [("", 0)])
            metric("requests_rejected_total", "counter", "Requests refused with 429 (the queue was full).",
                   [("", self.rejected)])
            metric("generations_total", "counter", "Engine generations finished (one per choice).",
                   [("", self.generations)])
            metric("generations_cancelled_total", "counter", "Generations cancelled by a client disconnect.",
                   [("", self.cancelled)])
            metric("dialogues_total", "counter", "Solver-critic dialogues run (models duet, duet:solver-only).",
                   [("", self.dialogues)])
            metric("dialogue_completion_tokens_total", "counter", "Tokens the dialogues generated (all turns).",
                   [("", self.dialogue_tokens)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations (not the dialogues').",
                   [("", self.prompt_tokens)])
            metric("completion_tokens_total", "counter", "Generated tokens of finished generations.",
                   [("", self.completion_tokens)])
            metric("prompt_tokens_cached_total", "counter", "Prompt tokens whose prefill the prefix cache saved.",
                   [("", self.cached_tokens)])
            metric("mtp_drafted_tokens_total", "counter", "MTP draft tokens proposed.", [("", self.drafted)])
            metric("mtp_accepted_tokens_total", "counter", "MTP draft tokens accepted by the main model.",
                   [("", self.accepted)])
            metric("mtp_acceptance_ratio", "gauge", "Accepted over drafted MTP tokens so far.",
                   [("", self.accepted / self.drafted if self.drafted else 0.0)])
            metric("time_to_first_token_seconds", "summary", "Queueing plus prefill, per generation.",
                   [("_sum", self.ttft_sum), ("_count", self.generations)])
            metric("generation_seconds", "summary", "Time from submission to the last token, per generation.",
                   [("_sum", self.latency_sum), ("_count", self.generations)])
        metric("requests_in_flight", "gauge", "Generations admitted by the server and not finished.",
               [("", in_flight)])
        metric("queue_length", "gauge", "Generations waiting for a row of the engine's batch.", [("", waiting)])
        metric("batch_size", "gauge", "Generations decoding in the engine's batch now.", [("", active)])
        metric("batch_size_max", "gauge", "Rows of the engine's batch.", [("", max_batch)])
        if prefix is not None:
            metric("prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache.",
                   [("", prefix.get("requests", 0))])
            metric("prefix_cache_hits_total", "counter", "Prompts that found a cached prefix.",
                   [("", prefix.get("hits", 0))])
            metric("prefix_cache_reused_tokens_total", "counter", "Prompt tokens taken from the prefix cache.",
                   [("", prefix.get("reused_tokens", 0))])
            metric("prefix_cache_hit_rate", "gauge", "Reused over looked-up prompt tokens.",
                   [("", prefix.get("hit_rate", 0.0))])
            metric("prefix_cache_held_bytes", "gauge", "Bytes the prefix cache holds.",
                   [("", prefix.get("held_bytes", 0))])
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, int) or float(value).is_integer() else repr(float(value))

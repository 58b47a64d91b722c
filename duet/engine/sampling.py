"""Turning logits into tokens: temperature, top-k, top-p, and speculative acceptance.

All functions work on one row's logits [vocab] (or [n, vocab]) so every request samples with its
own seeded generator, which keeps results reproducible however requests are batched together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to generate one completion. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    logprobs: int = 0  # record the top-k log-probabilities of every emitted token (GenerationResult.top_logprobs)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampling draws from, after temperature, top-k and top-p: [..., vocab] fp32."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row's logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def accept_draft(target_logits: Tensor, draft_logits: Tensor, draft: int, params: SamplingParams,
                 generator: torch.Generator | None) -> tuple[bool, int]:
    """Speculative sampling for one drafted token: (accepted, token to emit at this position).

    Greedy: accept when the draft is the target's argmax, else emit the argmax, so the output is
    exactly plain greedy decoding. Sampling: accept with probability min(1, p(d)/q(d)); on
    rejection resample from the normalised positive part of p - q. The emitted token is then
    distributed exactly as p (Leviathan et al. 2023; Chen et al. 2023).
    """
    if params.greedy:
        best = int(target_logits.argmax())
        return best == draft, best
    p = probabilities(target_logits, params)
    q = probabilities(draft_logits, params)
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[draft] <= p[draft]:
        return True, draft
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: any sample from p is exact
        residual, total = p, p.sum()
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


def top_logprobs(logp: Tensor, k: int, chosen: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of one position's log-probabilities [vocab] (log-softmax of its logits at
    temperature 1: the model's own distribution, whatever the request samples with), most likely first; `chosen`
    (the emitted token) is added at the end when it is not among them."""
    values, ids = logp.topk(min(k, logp.shape[-1]))
    top = list(zip(ids.tolist(), values.tolist(), strict=True))
    if all(i != chosen for i, _ in top):
        top.append((chosen, float(logp[chosen])))
    return top


def draft_token(draft_logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The MTP module's proposal: its argmax when greedy, a sample from q otherwise."""
    return sample(draft_logits, params, generator)

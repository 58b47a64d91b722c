r"""Fit the verifier's confidence head (`duet.agents.verifier.ConfidenceHead`) on a model's own solutions.

Each labelled solution (`python -m duet.train.onpolicy build`: the model's greedy and sampled solutions to
training problems, right or wrong by the gold answer) is read by the model again, token by token: the mean
and the minimum log-probability it gives the tokens it wrote (the step sentences, the code, the answer;
not the prompt nor the output blocks duet wrote) are features, exactly those `Turn.confidence` records
while it generates; the number check's findings on the solution (`number_features`, with the question read
as the dialogue reads it) are the others. A logistic regression on them, balanced between right and wrong,
is the head; it is written beside the model's weights, where the critic finds it.

    python -m duet.train.verifier_head --model duet/assets/model \
        --attempts data/training/onpolicy-phase6.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from duet.agents.number_check import number_features
from duet.agents.turn import confidence
from duet.agents.verifier import ConfidenceHead, auroc
from duet.answers.numbers import numbers_as_digits
from duet.errors import DuetError
from duet.model import load_model
from duet.prompts import load_prompts
from duet.train.conversations import solve_conversation
from duet.train.sources import load_attempts
from duet.train.trainer import encode_example, token_logprobs

FEATURES = (*ConfidenceHead.CONFIDENCE, *ConfidenceHead.NUMBERS)


@torch.no_grad()
def solution_confidence(model, tokenizer, prompts, question: str, solution: str) -> dict[str, float]:
    """``Turn.confidence`` of ``solution`` as if the model had just written it (teacher forcing)."""
    ids, mask = encode_example(tokenizer, solve_conversation(prompts, question, solution))
    logp = token_logprobs(model, torch.tensor([ids]))[0]
    written = [float(lp) for lp, m in zip(logp, mask[1:], strict=True) if m][:-1]  # not the end-of-turn token,
    # which generation never records
    return confidence(written)


def fit_head(features: list[dict[str, float]], labels: list[bool], l2: float = 1e-3) -> ConfidenceHead:
    """Logistic regression of ``labels`` on ``features`` (FEATURES of each), right and wrong weighted equally."""
    x = torch.tensor([[f[name] for name in FEATURES] for f in features], dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    pos = float(y.sum())
    if pos == 0 or pos == len(y):
        raise DuetError("the attempts must hold both right and wrong solutions to fit a verifier head")
    weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos)))
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    raw = (w / sd).detach()  # fold the standardisation into the weights
    bias = float(b.detach() - (raw * mu).sum())
    return ConfidenceHead({name: float(v) for name, v in zip(FEATURES, raw, strict=True)}, bias)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet.train.verifier_head", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory; the head is written into it")
    parser.add_argument("--attempts", type=Path, required=True, help="labelled solutions (duet.train.onpolicy build)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    from duet.engine.engine import load_tokenizer

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        attempts = load_attempts(args.attempts)
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, dtype=torch.float32).eval()
        prompts = load_prompts()
        features = [{**solution_confidence(model, tokenizer, prompts, a.problem.question, a.solution),
                     **number_features(numbers_as_digits(a.problem.question), a.solution)} for a in attempts]
        labels = [a.correct for a in attempts]
        head = fit_head(features, labels)
    except DuetError as e:
        parser.exit(1, f"error: {e}\n")
    scores = [head.p(f) for f in features]
    area = auroc(scores, labels)
    record = {**head.to_dict(), "fitted_on": {"attempts": str(args.attempts), "solutions": len(labels),
                                              "right": sum(labels), "auroc": round(area or 0.0, 4)}}
    out = args.model / ConfidenceHead.FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{len(labels)} solutions ({sum(labels)} right): AUROC {area:.3f} on them -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

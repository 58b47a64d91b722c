r"""Reinforcement learning from answer rewards: a group-relative policy gradient (as DeepSeek's GRPO for R1).

Each iteration:
1. draws training problems (MAWPS + ASDiv-A training rows with fresh numbers, their variations, generated
   stories; never a dev row), written as a `duet eval` dataset;
2. samples ``group`` solutions of each with the current policy, through `duet eval --modes sc@group` in a
   child process: the real solver turn, with every code block run in the sandbox;
3. rewards each solution 1 when its answer equals the gold answer (`duet.answers.equivalent`), else 0;
   its advantage is its reward minus its group's mean (problems whose samples all score the same teach
   nothing and drop out; no division by the group's spread, which would weigh near-unanimous groups most);
4. takes one optimizer step on  -sum(advantage x log p(solution tokens)) / tokens  (the tokens the model
   wrote: not the prompt, not the output blocks duet wrote), plus ``sft_weight`` times the supervised
   loss of `duet train` on a batch of its usual data, which anchors the model to what it already knew.

The samples are on-policy (one step per batch), so the probability ratio of PPO/GRPO is always 1 and
there is nothing to clip. The checkpoint is saved atomically after every iteration and a run resumes
from it; `rl_log.jsonl` records rewards, losses and the CPU seconds spent (this process and its
children), so a run can be compared with supervised training at equal compute.

    python -m duet.train.rl --out runs/rl --init-from duet/assets/model --iterations 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from duet.answers.numbers import numbers_as_digits
from duet.errors import DuetError
from duet.model import load_model
from duet.prompts import load_prompts
from duet.train.conversations import solve_conversation
from duet.train.data import MIX
from duet.train.generator import generated_story
from duet.train.onpolicy import join_attempts, write_jsonl
from duet.train.solutions import clean_result
from duet.train.sources import Sources, mawps_problem, story_problem
from duet.train.trainer import (
    TrainConfig,
    TrainError,
    all_finite,
    balance_experts,
    batch_for_step,
    encode_example,
    losses,
    save_checkpoint,
    token_logprobs,
)
from duet.train.variations import VARIATIONS, vary


@dataclass
class RLConfig:
    """Everything that defines a reinforcement-learning run (saved beside its checkpoint)."""

    data_dir: str = "../shared/data"
    out_dir: str = "runs/rl"
    init_from: str = "duet/assets/model"
    seed: int = 0
    iterations: int = 80
    problems: int = 48  # problems per iteration
    group: int = 6  # samples per problem
    temperature: float = 0.8  # at 1.0 the small model's samples were mostly wrong: few groups had mixed rewards
    lr: float = 1e-4  # constant: the run is short and starts from a trained model
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 16  # sequences per forward/backward pass
    sft_weight: float = 1.0  # weight of the supervised anchor loss (0: policy gradient alone)
    sft_batch: int = 4  # packed sequences of the supervised batch per iteration
    seq_len: int = 512
    mtp_lambda: float = 0.3
    bias_gamma: float = 1e-3
    mix: dict = field(default_factory=lambda: dict(MIX))  # the supervised anchor's data
    onpolicy: str | None = None  # attempts for the anchor's mix, as `duet train --onpolicy`
    threads: int = 0
    concurrency: int = 48  # sampling: problems in flight (the engine's batch)


# ----------------------------------------------------------------------------- problems and samples


def draw_problems(sources: Sources, rng: random.Random, n: int, prefix: str) -> list[dict]:
    """``n`` training problems as `duet eval` records: a third MAWPS + ASDiv-A rows with fresh numbers, a
    third their variations (each kind in turn), a third generated stories."""
    records: list[dict] = []
    kinds = list(VARIATIONS)
    for attempt in range(100 * n):  # a source whose rows never vary cleanly must not loop forever
        if len(records) == n:
            return records
        source = ("mawps", "variations", "stories")[attempt % 3]
        kind = source
        if source == "mawps":
            problem = mawps_problem(rng.choice(sources.mawps_train), rng)
        elif source == "variations":
            kind = kinds[(attempt // 3) % len(kinds)]
            story = vary(rng.choice(sources.mawps_train).story(), kind, rng)
            problem = story_problem(story, rng, "variations") if story else None
        else:
            story = generated_story(rng)
            problem = story_problem(story, rng, "stories") if story else None
        gold = problem and (problem.gold or clean_result(problem.cells))  # fresh numbers: the code's answer
        if gold is not None:
            records.append({"id": f"{prefix}-{len(records)}", "kind": kind, "question": problem.question,
                            "answer": f"#### {gold}", "cells": problem.cells})
    raise TrainError(f"drew only {len(records)} of {n} problems in {100 * n} tries; check the training data")


def sample_attempts(policy: Path, problems: Path, eval_dir: Path, cfg: RLConfig, seed: int) -> list[dict]:
    """``cfg.group`` sampled solutions of every problem by the model in ``policy``, each labelled right or
    wrong (`duet.train.onpolicy.join_attempts`), from a `duet eval` child process."""
    command = [sys.executable, "-m", "duet", "eval", "run", str(problems), "--modes", f"sc@{cfg.group}",
               "--sc-temperature", str(cfg.temperature), "-j", str(cfg.concurrency), "-m", str(policy),
               "--out", str(eval_dir), "--seed", str(seed), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads)) if cfg.threads else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (eval_dir / "results.jsonl").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TrainError(f"sampling failed (duet eval exited {done.returncode}: {tail[0]})")
    attempts, _ = join_attempts(problems, eval_dir)
    return attempts


def group_advantages(attempts: list[dict]) -> list[tuple[dict, float]]:
    """(attempt, reward - its problem's mean reward) for the attempts of problems whose samples differ."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for a in attempts:
        groups[a["id"]].append(a)
    out = []
    for group in groups.values():
        rewards = [1.0 if a["correct"] else 0.0 for a in group]
        mean = sum(rewards) / len(rewards)
        if 0.0 < mean < 1.0:
            out.extend((a, r - mean) for a, r in zip(group, rewards, strict=True))
    return out


# ----------------------------------------------------------------------------- the losses


def policy_gradient_step(model, tokenizer, prompts, weighted: list[tuple[dict, float]], micro_batch: int,
                         device: torch.device, bf16: bool) -> tuple[float, int]:
    """Accumulate the gradient of -sum(advantage x log p(written tokens)) / written tokens over ``weighted``
    (backward in micro-batches); returns (the loss, the tokens it covered)."""
    encoded = []
    for attempt, advantage in weighted:
        # the question as the sampling dialogue read it, so the gradient is of the tokens it conditioned on
        conv = solve_conversation(prompts, numbers_as_digits(attempt["question"]), attempt["solution"])
        ids, mask = encode_example(tokenizer, conv)
        encoded.append((ids, mask, advantage))
    total_tokens = sum(sum(m) for _, m, _ in encoded) or 1
    loss_sum = 0.0
    for start in range(0, len(encoded), micro_batch):
        chunk = encoded[start:start + micro_batch]
        width = max(len(ids) for ids, _, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        adv = torch.tensor([a for _, _, a in chunk])
        for row, (i, m, _) in enumerate(chunk):
            ids[row, :len(i)] = torch.tensor(i)
            mask[row, :len(m)] = torch.tensor(m)
        ids, mask, adv = ids.to(device), mask.to(device), adv.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logp = token_logprobs(model, ids)
        loss = -(adv[:, None] * logp * mask[:, 1:]).sum() / total_tokens
        loss.backward()
        loss_sum += loss.item()
    return loss_sum, total_tokens


# ----------------------------------------------------------------------------- the run


def _anchor_config(cfg: RLConfig) -> TrainConfig:
    return TrainConfig(data_dir=cfg.data_dir, seed=cfg.seed, batch_size=cfg.sft_batch, seq_len=cfg.seq_len,
                       mix=cfg.mix, onpolicy=cfg.onpolicy)


def cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (the sampling runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_rl(cfg: RLConfig, log=print) -> Path:
    """Run (or resume) ``cfg``; returns the checkpoint directory."""
    from duet.engine.engine import load_tokenizer

    out = Path(cfg.out_dir)
    ckpt = out / "checkpoint"
    state_path = ckpt / "trainer_state.pt"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sources = Sources.load(Path(cfg.data_dir), Path(cfg.onpolicy) if cfg.onpolicy else None)
    prompts = load_prompts()
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if state is not None:
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(RLConfig)}}
        differ = [k for k, v in saved.items() if k not in ("out_dir", "iterations", "threads") and getattr(cfg, k) != v]
        if differ:
            raise TrainError(f"{out} holds a run with other settings ({', '.join(differ)}); use another --out")
    source = ckpt if state is not None else Path(cfg.init_from)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=torch.float32)
    device = torch.device("cpu")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resuming {out} at iteration {start}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, tokenizer, opt, cfg, 0, out)  # the policy the first samples come from
    anchor = _anchor_config(cfg)
    cpu0 = cpu_seconds() - (state or {}).get("cpu_seconds", 0.0)
    with open(out / "rl_log.jsonl", "a") as log_file:
        for it in range(start, cfg.iterations):
            t0 = time.time()
            work = out / "iteration"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            problems = draw_problems(sources, random.Random(cfg.seed * 1_000_003 + it), cfg.problems, f"it{it}")
            write_jsonl(work / "problems.jsonl", problems)
            attempts = sample_attempts(ckpt, work / "problems.jsonl", work / "eval", cfg, cfg.seed * 1000 + it)
            weighted = group_advantages(attempts)
            opt.zero_grad(set_to_none=True)
            pg_loss, pg_tokens = (policy_gradient_step(model, tokenizer, prompts, weighted, cfg.micro_batch, device,
                                                       bf16=True) if weighted else (0.0, 0))
            sft = None
            if cfg.sft_weight > 0:
                ids, mask = (t.to(device) for t in batch_for_step(tokenizer, sources, anchor, it))
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                    main, mtp = losses(model, ids, mask)
                sft = main + cfg.mtp_lambda * mtp if mtp is not None else main
                (cfg.sft_weight * sft).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            balance_experts(model, cfg.bias_gamma)
            if not all_finite(model.state_dict().values()):
                raise TrainError(f"the weights are no longer finite at iteration {it + 1}; stopped without saving "
                                 f"(the last checkpoint is in {ckpt}; try a lower --lr)")
            used = cpu_seconds() - cpu0
            save_checkpoint(model, tokenizer, opt, cfg, it + 1, out, extra={"cpu_seconds": used})
            by_kind: dict[str, list[float]] = defaultdict(list)
            kinds = {p["id"]: p["kind"] for p in problems}
            for a in attempts:
                by_kind[kinds[a["id"]]].append(1.0 if a["correct"] else 0.0)
            reward = sum(a["correct"] for a in attempts) / max(1, len(attempts))
            record = {"iteration": it + 1, "reward": round(reward, 4),
                      "reward_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
                      "samples": len(attempts), "mixed_groups": len({a["id"] for a, _ in weighted}),
                      "pg_loss": round(pg_loss, 5), "pg_tokens": pg_tokens,
                      "sft_loss": round(sft.item(), 4) if sft is not None else None,
                      "seconds": round(time.time() - t0, 1), "cpu_seconds": round(used), "time": round(time.time())}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log(json.dumps(record))
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet.train.rl", description=__doc__.split("\n\n")[0])
    defaults = RLConfig()
    for f in fields(RLConfig):
        if f.name == "mix":
            parser.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in MIX.items()),
                                help="the supervised anchor's data, as duet train --mix")
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name))
    args = vars(parser.parse_args(argv))
    import typer

    from duet.train.cli import parse_mix

    try:
        args["mix"] = parse_mix(args["mix"])
    except typer.BadParameter as e:
        parser.error(e.format_message())
    cfg = RLConfig(**args)
    try:
        train_rl(cfg)
    except (DuetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine under torchrun (duet.engine.distributed) on the CPU: two real processes joined by gloo, rank 0 running
the engine over its half of a tiny random V3 (MTP module included) and rank 1 replaying its ops on the other half,
against the one-process engine; a rank that dies or hangs; and `torchrun -m duet bench|solve` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from duet.engine import Engine, SamplingParams, distributed
from duet.engine.runner import Runner
from tests.processes import free_port, run_ranks
from tests.tiny_models import make_engine_checkpoint

WAIT = 90.0  # seconds a test waits for its ranks (a loaded machine starts Python processes slowly)
PROMPTS = ["Tom has 12 apples", "A café", "```python\nprint(", "VERDICT:", "How many apples does he have now? " * 3]
SYSTEM = ("You are a careful solver. Think step by step, run code when it helps, and put the final answer "
          "in a box. Tom has 12 apples and buys 35 more. How many apples does he have now? ")
QUESTIONS = ["A café sells crêpes", "VERDICT: AGREE.", "```python\nprint(12 + 35)\n```", "How many apples"]
GREEDY = SamplingParams(max_new_tokens=24, stop_at_eos=False)
SAMPLED = [SamplingParams(max_new_tokens=24, stop_at_eos=False, temperature=0.9, top_p=0.95, seed=s)
           for s in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 4 heads and 8 routed experts: 2 and 4 per rank
    return make_engine_checkpoint(tmp_path_factory.mktemp("dist"), seed=11)


# ----------------------------------------------------------------------------- what rank 0 runs


def ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def workload(path: str) -> dict:
    """Greedy and seeded sampling, plain and MTP, five prompts through two rows (rows refill); and a shared
    system prompt asked, then continued, with the prefix cache (small blocks, MTP on and off)."""
    out = {}
    for depth in (0, 1):
        engine = Engine.load(path, max_batch=2, mtp_depth=depth)
        out[f"greedy{depth}"] = ids(engine.generate(PROMPTS, GREEDY))
        sampled = engine.generate(PROMPTS, SAMPLED)
        out[f"sampled{depth}"] = ids(sampled)
        out[f"accepted{depth}"] = sum(r.accepted for r in sampled)
        engine = Engine.load(path, max_batch=3, mtp_depth=depth, prefix_block=4)
        system = engine.encode(SYSTEM)
        prompts = [system + engine.encode(q) for q in QUESTIONS]
        first = engine.generate(prompts, GREEDY)
        again = engine.generate([p + r.token_ids for p, r in zip(prompts, first, strict=True)], GREEDY)
        out[f"prefix{depth}"] = (ids(first), ids(again), [r.cached_tokens for r in first + again])
    return out


def dies(path: str) -> dict:
    """Generate while rank 1 dies (or hangs) in its 5th decode step, then again."""
    engine = Engine.load(path, max_batch=2)
    begin = time.monotonic()
    failed = engine.generate(PROMPTS[:3], GREEDY)
    seconds = time.monotonic() - begin
    begin = time.monotonic()
    again = engine.generate(PROMPTS[:1], GREEDY)
    return {"failed": [(r.finish_reason, r.error) for r in failed], "seconds": seconds,
            "again": (again[0].finish_reason, again[0].error), "again_seconds": time.monotonic() - begin}


# ----------------------------------------------------------------------------- running ranks


def _rank_main(rank: int, size: int, port: int, out: Path, timeout: float, job, args: tuple,
               fault: tuple[str, int] | None) -> None:
    """One rank as torchrun starts it: rank 0 runs `job(*args)` and saves what it returns; the others follow and
    save how they failed, if they do. `fault` (how, rank): that rank dies or hangs in its 5th decode step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        (out / f"ready{rank}").touch()  # start together: a short timeout is not spent on a slow sibling's start
        while not all((out / f"ready{r}").exists() for r in range(size)):
            time.sleep(0.01)
        member = distributed.join("cpu", timeout=timeout)
        if fault is not None and fault[1] == rank:
            _break_decode(fault[0])
        if isinstance(member, distributed.Leader):
            try:
                result = job(*args)
            finally:
                member.stop()
            torch.save(result, out / f"rank{rank}.pt")
            return
        try:
            member.run()
        except Exception as e:  # what `distributed.launch` would print before exiting
            (out / f"rank{rank}.failed").write_text(f"{type(e).__name__}: {e}")
            os._exit(0)
        (out / f"rank{rank}.done").touch()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def _break_decode(how: str) -> None:
    """Make this rank die or hang in its 5th decode step."""
    decode, steps = Runner.decode, []

    def faulty(self, *args):
        steps.append(1)
        if len(steps) == 5:
            if how == "dies":
                os._exit(3)
            time.sleep(WAIT)
        return decode(self, *args)

    Runner.decode = faulty


def launch(out: Path, job, *args, size: int = 2, timeout: float = 30.0, fault: tuple[str, int] | None = None) -> dict:
    """Run `job` on rank 0 of `size` spawned ranks, the others following; wait for all but a faulty rank (stopped
    if it still runs). Returns rank 0's result ("result", None if it saved none) and how each follower failed
    ("failed": rank -> one line). Without a fault, every follower must end cleanly."""
    port = free_port()
    run_ranks(_rank_main, [(r, size, port, out, timeout, job, args, fault) for r in range(size)],
              [r for r in range(size) if fault is None or fault[1] != r], WAIT, out)
    failed = {r: (out / f"rank{r}.failed").read_text() for r in range(1, size) if (out / f"rank{r}.failed").exists()}
    assert fault or (not failed and all((out / f"rank{r}.done").exists() for r in range(1, size))), failed
    result = torch.load(out / "rank0.pt") if (out / "rank0.pt").exists() else None
    return {"result": result, "failed": failed}


# ----------------------------------------------------------------------------- equal to one process


@pytest.fixture(scope="module")
def two_ranks(ckpt, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), workload, str(ckpt))["result"]


@pytest.fixture(scope="module")
def one_process(ckpt):
    return workload(str(ckpt))


@pytest.mark.parametrize("depth", [0, 1])
def test_greedy_over_two_ranks_is_token_for_token_one_process(two_ranks, one_process, depth):
    assert two_ranks[f"greedy{depth}"] == one_process[f"greedy{depth}"]
    assert two_ranks["greedy0"] == two_ranks["greedy1"]  # MTP's output is plain greedy's
    assert all(len(t) == GREEDY.max_new_tokens for t in two_ranks[f"greedy{depth}"])


@pytest.mark.parametrize("depth", [0, 1])
def test_seeded_sampling_over_two_ranks_equals_one_process(two_ranks, one_process, depth):
    """Sampling and MTP's acceptance are decided on rank 0 alone, with each request's seeded generator."""
    assert two_ranks[f"sampled{depth}"] == one_process[f"sampled{depth}"]
    assert two_ranks[f"accepted{depth}"] == one_process[f"accepted{depth}"]
    assert (two_ranks["accepted1"] > 0) and two_ranks["sampled0"] != two_ranks["greedy0"]


@pytest.mark.parametrize("depth", [0, 1])
def test_prefix_cache_over_two_ranks_equals_one_process(two_ranks, one_process, depth):
    """Every rank copies the same blocks into and out of its pool; the continuations reuse nearly all their
    prompt, and the later questions the system prompt."""
    first, again, cached = two_ranks[f"prefix{depth}"]
    assert two_ranks[f"prefix{depth}"] == one_process[f"prefix{depth}"]
    n = len(QUESTIONS)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:n]) and min(cached[n:]) > 50


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_follower_that_dies_or_hangs_fails_rank_0_within_the_timeout(ckpt, tmp_path, fault):
    begin = time.monotonic()
    result = launch(tmp_path, dies, str(ckpt), timeout=3.0, fault=(fault, 1))["result"]
    assert [reason for reason, _ in result["failed"]] == ["error"] * 3, result
    error = result["failed"][0][1]
    assert error.startswith("DistributedError: the model's ranks are out of step") and "\n" not in error, error
    # a dead rank's closed connection is seen at once; a hung one after the process-group timeout
    assert result["seconds"] < 3.0 + 10.0 and (fault == "dies" or result["seconds"] > 2.5), result
    assert result["again"] == ("error", error) and result["again_seconds"] < 1.0  # no wait for a broken group
    assert time.monotonic() - begin < WAIT


def test_rank_0_that_dies_fails_the_followers_at_once(ckpt, tmp_path):
    begin = time.monotonic()
    ranks = launch(tmp_path, dies, str(ckpt), timeout=30.0, fault=("dies", 0))
    assert ranks["result"] is None and "Connection" in ranks["failed"][1], ranks  # closed, or reset, by peer
    assert time.monotonic() - begin < 25  # not the 30 s timeout


# ----------------------------------------------------------------------------- torchrun end to end


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUET_", "XDG_"))}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "duet", *args], capture_output=True, text=True, timeout=WAIT, env=env, cwd=tmp_path)


def test_torchrun_duet_bench(ckpt, tmp_path):
    r = _torchrun(tmp_path, "bench", "--model", str(ckpt), "--batch", "2", "--new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "2 ranks" in r.stdout and "decode tok/s" in r.stdout and "duet + MTP" in r.stdout, r.stdout
    assert "error" not in r.stderr and "note:" not in r.stderr, r.stderr


def test_torchrun_duet_solve(ckpt, tmp_path):
    """The random model writes nonsense: no answer (exit code 3, which torchrun reports as rank 0's failure), but
    the run goes through the dialogue and ends cleanly on every rank."""
    r = _torchrun(tmp_path, "solve", "--model", str(ckpt), "--no-critic", "--max-tokens", "16", "--no-log", "--json",
                  "What is 2+2?")
    result = json.loads(r.stdout)
    assert result["exit_code"] in (0, 3) and result.get("error") is None, result
    assert r.returncode == (0 if result["exit_code"] == 0 else 1)
    assert "error: rank" not in r.stderr, r.stderr

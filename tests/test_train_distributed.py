"""`duet train` data parallel under `accelerate launch`: two real processes on the CPU joined by gloo.

Each process runs the real command (`duet.cli.main(["train", ...])`) through a small wrapper that records,
without changing, what the trainer does in that process: the hash of every batch it packs, every MoE layer's
own expert loads before the balancing step, and its model, whose weights and buffers it saves at the end.
The processes must end with identical weights and routing biases (the biases moved by the loads summed over
both), having trained on different data; only the main process writes the log and the checkpoint, and a
second launch resumes the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duet.train.trainer import TrainConfig, TrainError, batch_for_step, train
from tests.processes import free_port
from tests.test_train import TINY_MODEL, write_data_dir

WAIT = 120  # seconds a launch may take before the test fails (the two runs take about 10 s each here)
STEPS_FIRST, STEPS = 3, 4
ARCH = ",".join(f"{k}={v}" for k, v in TINY_MODEL.items() if isinstance(v, int))  # not the float 1.0: the default
GAMMA = 1e-2  # larger than the default, so that the routing biases visibly move in a few steps

# Runs in each launched process: the command itself, with the trainer's batch packing and balancing recorded.
WORKER = r'''
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import duet.train.trainer as trainer
from duet.model.model import MoE


@dataclass
class SmallTokenizer(trainer.TrainConfig):  # `duet train` has no options for these: a small tokenizer, quickly
    vocab_size: int = 400
    tokenizer_sample: int = 300


seen = {"batches": [], "loads": [], "model": None}
batch_for_step, balance_experts = trainer.batch_for_step, trainer.balance_experts


def recording_batch(tokenizer, sources, cfg, step, process=0):
    ids, mask = batch_for_step(tokenizer, sources, cfg, step, process)
    seen["batches"].append((step, process, hashlib.sha256(ids.numpy().tobytes()).hexdigest()))
    return ids, mask


def recording_balance(model, gamma, reduce=None):
    seen["model"] = model
    seen["loads"].append([m.last_expert_load.tolist() for m in model.modules() if isinstance(m, MoE)])
    return balance_experts(model, gamma, reduce)


trainer.TrainConfig = SmallTokenizer
trainer.batch_for_step, trainer.balance_experts = recording_batch, recording_balance
from duet.cli import main  # noqa: E402

code = 0
try:
    main(["train", *sys.argv[2:]])
except SystemExit as stop:
    code = stop.code or 0
state = {k: v.clone() for k, v in seen["model"].state_dict().items()} if seen["model"] is not None else None
torch.save({"code": code, "state": state, "batches": seen["batches"], "loads": seen["loads"]},
           Path(sys.argv[1]) / f"rank{os.environ['RANK']}.pt")
sys.exit(code)
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The tiny data set of tests/test_train.py."""
    return write_data_dir(tmp_path_factory.mktemp("data"))


def _launch(tmp_path: Path, dump: Path, data: Path, out: Path, steps: int) -> tuple[subprocess.CompletedProcess, list]:
    """`accelerate launch` of two processes on the CPU (its torchrun launcher: `--cpu` starts one process unless
    under mpirun) running `duet train` through WORKER; returns the launch and what each process recorded."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    dump.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUET_", "XDG_", "ACCELERATE_"))}
    env.update(HOME=str(tmp_path), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(worker), str(dump),
               "--data", str(data), "--out", str(out), "--device", "cpu", "--arch", ARCH, "--steps", str(steps),
               "--batch-size", "2", "--seq-len", "256", "--save-every", "2", "--bias-gamma", str(GAMMA),
               "--threads", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=WAIT, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr
    return run, [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_identical(ranks: list) -> None:
    """Both processes hold the same weights and buffers, bit for bit (the routing biases included)."""
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


def _biases(state: dict) -> list[torch.Tensor]:
    return [v for k, v in state.items() if k.endswith("e_score_correction_bias")]


def test_two_processes_train_one_model_on_twice_the_data(tmp_path, data_dir):
    from duet.engine.engine import load_tokenizer
    from duet.model import load_model
    from duet.train.sources import Sources

    out = tmp_path / "run"
    run, ranks = _launch(tmp_path, tmp_path / "first", data_dir, out, STEPS_FIRST)
    assert [r["code"] for r in ranks] == [0, 0]
    _assert_identical(ranks)
    biases = _biases(ranks[0]["state"])
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # the MoE layer and the MTP module's

    # the biases moved by the loads summed over the two processes, step by step (as the trainer adds them)...
    expected = [torch.zeros_like(b) for b in biases]
    for step in range(STEPS_FIRST):
        for layer, bias in enumerate(expected):
            load = torch.tensor(ranks[0]["loads"][step][layer]) + torch.tensor(ranks[1]["loads"][step][layer])
            bias += GAMMA * torch.sign(load.float().mean() - load.float())
    assert all(torch.equal(b, e) for b, e in zip(biases, expected, strict=True))
    # ... where each process's own loads would have moved them apart
    def own_step(rank: int, step: int) -> list[torch.Tensor]:
        return [torch.sign(load.mean() - load) for load in torch.tensor(ranks[rank]["loads"][step]).float()]

    assert any(not torch.equal(x, y) for step in range(STEPS_FIRST)
               for x, y in zip(own_step(0, step), own_step(1, step), strict=True))

    # each process packed its own batches; process 0's are a one-process run's
    assert [(s, p) for s, p, _ in ranks[0]["batches"]] == [(s, 0) for s in range(STEPS_FIRST)]
    assert [(s, p) for s, p, _ in ranks[1]["batches"]] == [(s, 1) for s in range(STEPS_FIRST)]
    assert not {h for *_, h in ranks[0]["batches"]} & {h for *_, h in ranks[1]["batches"]}
    tokenizer = load_tokenizer(out / "checkpoint")
    one = TrainConfig(data_dir=str(data_dir), batch_size=2, seq_len=256)
    ids, _ = batch_for_step(tokenizer, Sources.load(data_dir), one, 0)
    assert hashlib.sha256(ids.numpy().tobytes()).hexdigest() == ranks[0]["batches"][0][2]

    # the main process alone wrote the log (each step once, finite losses) and the checkpoint: the processes' model
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS_FIRST + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["mtp_loss"]) for r in log)
    assert run.stdout.count("checkpoint: ") == 1 and "device: cpu, 2 processes" in run.stdout, run.stdout
    saved = load_model(out / "checkpoint", dtype=torch.float32).state_dict()
    assert saved.keys() == ranks[0]["state"].keys()
    assert all(torch.equal(saved[k], v) for k, v in ranks[0]["state"].items()), "the checkpoint is not the model"
    trainer_state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert trainer_state["step"] == STEPS_FIRST and trainer_state["config"]["processes"] == 2
    assert not (out / "checkpoint.tmp").exists()

    # one process refuses to continue the two processes' run (its data and batches would differ)
    with pytest.raises(TrainError, match="holds a run with processes=2; this command has processes=1"):
        train(TrainConfig(data_dir=str(data_dir), out_dir=str(out), steps=STEPS, batch_size=2, seq_len=256,
                          save_every=2, bias_gamma=GAMMA, threads=1, device="cpu", vocab_size=400,
                          tokenizer_sample=300, model=dict(TINY_MODEL)), progress=False, log=lambda *_: None)

    # a second launch resumes the run: the same step numbers go on, the processes stay identical
    run, ranks = _launch(tmp_path, tmp_path / "second", data_dir, out, STEPS)
    _assert_identical(ranks)
    assert run.stdout.count(f"resuming {out} at step {STEPS_FIRST}") == 1, run.stdout
    assert [s for s, _, _ in ranks[1]["batches"]] == list(range(STEPS_FIRST, STEPS))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    saved = load_model(out / "checkpoint", dtype=torch.float32).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in ranks[1]["state"].items())


@pytest.mark.parametrize(("launched", "bf16", "error"), [
    ("fp16", True, "asks for mixed precision fp16; duet train trains with bf16 autocast"),
    ("bf16", False, "asks for mixed precision bf16 and duet train for --fp32"),
])
def test_a_launch_in_another_precision_is_refused_before_anything_is_written(tmp_path, data_dir, monkeypatch,
                                                                             launched, bf16, error):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)  # what `accelerate launch --mixed_precision` sets
    with pytest.raises(TrainError, match=error):
        train(TrainConfig(data_dir=str(data_dir), out_dir=str(tmp_path / "run"), steps=1, bf16=bf16, device="cpu"),
              progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()

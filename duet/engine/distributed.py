"""The engine under torchrun: one model split over the ranks of a process group, driven by rank 0.

`torchrun --nproc-per-node N -m duet solve|repl|eval|bench ...` starts N processes, and the `duet` command hands
each to `launch` (torchrun's WORLD_SIZE is above 1). Rank 0 runs the command: the agents, the sandbox, the terminal,
and the engine, whose scheduling, sampling, MTP acceptance and prefix-cache index live there alone. Every other
rank follows (`Follower`): it loads its part of each model rank 0 loads (`duet.model.parallel`: every rank computes
the whole latent KV cache and the full logits) and replays the engine's tensor work, the `Runner` ops
(`duet.engine.runner`), which rank 0 broadcasts one by one, name and arguments (plain ints and lists), before
running each itself. So every forward pass and every cache copy happens on every rank, in the same order, on the
same inputs, and what rank 0 decided reaches the others as the arguments of later ops.

The messages travel over a gloo group of their own (beside NCCL's on GPUs) that waits without a practical limit: a
follower waits for as long as rank 0 idles (a REPL waiting for its user). The model's collectives keep the process
group's timeout (`TIMEOUT`), so a rank that dies or hangs makes the others fail within it. A failed op stops the
distributed engine for good, since the ranks are no longer in step: rank 0's requests then fail at once, with the
first error. Rank 0 tells the others to stop when its command ends, however it ends (an error, Ctrl-C).

Each rank runs on GPU LOCAL_RANK when CUDA is available, else on the CPU. `--compile` is refused: the parallel
MoE's dispatch has a data-dependent branch that `torch.compile` cannot trace in one graph.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from duet.engine.runner import Runner
from duet.errors import DuetError
from duet.model import Transformer
from duet.model import load_model as load_whole_model
from duet.model.parallel import World, init_from_env, load_parallel_model

TIMEOUT = 300.0  # seconds a collective of the model waits for the other ranks before it fails
IDLE = timedelta(days=365)  # how long a follower waits for rank 0's next message
STOP_WAIT = timedelta(seconds=5)  # how long rank 0's goodbye waits for the other ranks to listen (ms when well)


class DistributedError(DuetError):
    """The ranks of a model no longer work together: one failed or stopped answering."""


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


class Leader:
    """Rank 0's side: announces models, runners and their ops to the other ranks, one at a time."""

    def __init__(self, world: World, group: dist.ProcessGroup):
        self.world, self.group = world, group
        self._lock = threading.Lock()  # one message and its op at a time, from any thread (two engines)
        self._models: list[Transformer] = []
        self._runners = 0
        self._error: str | None = None  # set once the ranks are out of step (or stopped): every op fails

    def load_model(self, path: str | Path, device: str | torch.device, dtype: torch.dtype, mtp: bool,
                   fp8_weights: str = "auto") -> Transformer:
        """Rank 0's part of the checkpoint at `path`, each other rank loading its own."""
        if torch.device(device).type != self.world.device.type:
            raise DuetError(f"under torchrun every rank runs on its own {self.world.device.type} device, "
                            f"not {device}; drop --device")
        with self._lock:
            self._check()
            self._send(("load", str(path), dtype, mtp, fp8_weights))
            try:
                model = load_parallel_model(path, self.world.device, dtype, mtp, world=self.world,
                                            fp8_weights=fp8_weights)
            except Exception as error:  # the other ranks may have loaded theirs: they no longer match
                self._error = f"rank 0 could not load {path} ({_one_line(error)})"
                raise
            self._models.append(model)
        return model

    def attach(self, runner: Runner, options: dict[str, Any]) -> None:
        """For a model split by `load_model`: the other ranks build the same runner over their parts (`options`
        are its keyword arguments), and its ops are broadcast from now on."""
        number = next((i for i, m in enumerate(self._models) if m is runner.model), None)
        if number is None:
            return  # a model of this process alone
        if options.get("compile"):
            raise DuetError("--compile does not run under torchrun yet (the parallel MoE's dispatch cannot be "
                            "compiled in one graph); drop --compile")
        with self._lock:
            self._check()
            self._send(("runner", number, options))
            runner.broadcast = functools.partial(self.run, self._runners)
            self._runners += 1

    def run(self, number: int, name: str, args: tuple, call: Callable[[], Any]) -> Any:
        """Broadcast op `name` of runner `number` with `args`, then run it here (`call`)."""
        with self._lock:
            self._check()
            try:
                self._send(("op", number, name, args))
                return call()
            except Exception as error:
                self._error = (f"the model's ranks are out of step: {name} failed on rank 0 ({_one_line(error)}); "
                               "another rank stopped or failed (see its error), or timed out")
                raise DistributedError(self._error) from error

    def stop(self) -> None:
        """Tell the other ranks to exit, and leave the process group. When they do not all listen within
        `STOP_WAIT` (one is gone, hung, or out of step), the group is left as it is, for the process to exit."""
        with self._lock:
            failed = self._error is not None
            self._error = "the run is over: rank 0 stopped the other ranks"
            try:
                self._send(("stop",), wait=STOP_WAIT)
            except Exception:
                return
        if not self._models and not failed:
            print(f"note: torchrun started {self.world.size} ranks but this command loaded no local model: only "
                  "rank 0 worked", file=sys.stderr)
        dist.destroy_process_group()

    def _check(self) -> None:
        if self._error is not None:
            raise DistributedError(self._error)

    def _send(self, message: tuple, wait: timedelta | None = None) -> None:
        """Broadcast `message` (pickled: its size, then its bytes), waiting at most `wait` for the others."""
        payload = pickle.dumps(message)
        for t in (torch.tensor([len(payload)]), torch.frombuffer(bytearray(payload), dtype=torch.uint8)):
            if wait is None:
                dist.broadcast(t, 0, group=self.group)
            else:
                dist.broadcast(t, 0, group=self.group, async_op=True).wait(wait)


class Follower:
    """Any other rank's side: loads what rank 0 loads, builds the runners it builds, replays their ops."""

    def __init__(self, world: World, group: dist.ProcessGroup):
        self.world, self.group = world, group

    def run(self) -> None:
        """Until rank 0 says stop. Raises what fails (a message that never came, an op, a collective)."""
        models: list[Transformer] = []
        runners: list[Runner] = []
        while True:
            kind, *fields = self._receive()
            if kind == "stop":
                return
            if kind == "load":
                path, dtype, mtp, fp8_weights = fields
                models.append(load_parallel_model(path, self.world.device, dtype, mtp, world=self.world,
                                                  fp8_weights=fp8_weights))
            elif kind == "runner":
                model, options = fields
                runners.append(Runner(models[model], **options))
                runners[-1].setup_thread()
            else:
                number, name, args = fields
                with torch.inference_mode():
                    getattr(runners[number], name)(*args)

    def _receive(self) -> tuple:
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(payload, 0, group=self.group)
        return pickle.loads(payload.numpy().tobytes())


_leader: Leader | None = None


def leader() -> Leader | None:
    """Rank 0's `Leader` when this process runs under torchrun (after `join`), else None."""
    return _leader


def join(device: str | None = None, timeout: float = TIMEOUT) -> Leader | Follower:
    """Join the process group torchrun describes (`duet.model.parallel.init_from_env`; collectives fail after
    `timeout` seconds) and its message group: rank 0's `Leader` (used by `load_model` and `runner` from then on),
    or a `Follower` to run."""
    global _leader
    world = init_from_env(device, timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=IDLE)
    if world.rank > 0:
        return Follower(world, group)
    _leader = Leader(world, group)
    return _leader


def load_model(path: str | Path, device: str | torch.device, dtype: torch.dtype, mtp: bool,
               fp8_weights: str = "auto") -> Transformer:
    """The model at `path`: all of it, or under torchrun (on rank 0) this rank's part, the others loading theirs
    (`fp8_weights`: see `duet.model.load_model`)."""
    if _leader is None:
        return load_whole_model(path, device=device, dtype=dtype, mtp=mtp, fp8_weights=fp8_weights)
    return _leader.load_model(path, device, dtype, mtp, fp8_weights)


def runner(model: Transformer, **options: Any) -> Runner:
    """A `Runner` over `model`; under torchrun, for a model `load_model` split, every other rank runs its ops too."""
    built = Runner(model, **options)
    if _leader is not None:
        _leader.attach(built, options)
    return built


def launch(command: Callable[[], Any]) -> None:
    """The `duet` command under torchrun: rank 0 runs `command` and stops the other ranks however it ends; they
    follow until then, ignoring Ctrl-C (rank 0 decides what it stops), and exit 0, or 1 with one line on stderr."""
    rank = os.environ.get("RANK", "?")
    try:
        member = join()
    except Exception as error:
        print(f"error: rank {rank} could not join the other ranks: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)
    if isinstance(member, Leader):
        try:
            command()
        finally:
            member.stop()
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        member.run()
    except Exception as error:
        print(f"error: rank {rank} stopped: {_one_line(error)}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # no goodbye to ranks that are gone or out of step
    dist.destroy_process_group()
    sys.exit(0)

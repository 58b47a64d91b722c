"""The pool of concurrent dialogues of a run, and the early stop when a backend is broken."""

from __future__ import annotations

import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from duet.errors import DuetError
from duet.evaluation.datasets import Problem
from duet.evaluation.modes import Interrupted, Mode, error_record, run_problem
from duet.evaluation.progress import Progress
from duet.evaluation.results import ResultsFile, ordered, transcript_path, write_json_atomic
from duet.evaluation.run_types import Prepared, Say

MIN_ABORT_STREAK = 4
"""The run stops when its first max(this, concurrency) results are all errors (a broken backend)."""


def execute(prep: Prepared, tasks: list[tuple[Problem, Mode]], results: ResultsFile, progress: Progress,
            say: Say) -> tuple[int, bool, str | None]:
    """Run ``tasks`` on the pool; the calling thread is the only writer.

    Returns (completed, interrupted, aborted): ``aborted`` is the error that stopped the run when its first
    ``max(MIN_ABORT_STREAK, concurrency)`` results were all errors (a broken backend), else None.
    """
    from duet.evaluation.modes import FAILED

    ctx, run_dir = prep.context, prep.run_dir
    finished: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = ctx.cancel
    assert cancel is not None
    in_flight = [0]
    count_lock = threading.Lock()

    def work(problem: Problem, mode: Mode) -> None:
        if cancel.is_set():
            finished.put(("skipped", None))
            return
        with count_lock:
            in_flight[0] += 1
        started = time.time()
        try:
            try:
                record, transcript = run_problem(problem, mode, ctx)
            except Interrupted:
                finished.put(("skipped", None))
                return
            except Exception as error:  # a bug or a failure outside the dialogue's own guards
                record = error_record(problem, mode, error)
                transcript = {"version": 1, "id": problem.id, "mode": mode.name, "question": problem.question,
                              "gold": problem.gold, "dialogues": [], "error": traceback.format_exc()}
            rel = transcript_path(mode.name, problem.id)
            write_json_atomic(run_dir / rel, transcript)
            record.update(transcript=rel, line=problem.line, started=round(started, 3),
                          finished=round(time.time(), 3))
            if problem.kind:
                record["kind"] = problem.kind
            finished.put(("record", ordered(record)))
        except BaseException as error:  # cannot write the transcript (disk full, ...): stop the run
            finished.put(("fatal", error))
        finally:
            with count_lock:
                in_flight[0] -= 1

    completed = 0
    pending = len(tasks)
    interrupted = False
    aborted: str | None = None
    abort_after = max(MIN_ABORT_STREAK, prep.concurrency)
    failures: list[str] = []  # the errors of this invocation's results until the first success
    succeeded = False

    def abandoning() -> str:
        with count_lock:
            running = in_flight[0]
        return f"interrupted: abandoning {running} problem(s) in flight; they run again on resume"

    pool = ThreadPoolExecutor(max_workers=prep.concurrency, thread_name_prefix="duet-eval")
    try:
        for problem, mode in tasks:
            pool.submit(work, problem, mode)
        while pending:
            try:
                kind, value = finished.get(timeout=0.25)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    cancel.set()
                    say(abandoning() + " (Ctrl-C again to stop now)")
                    continue
                raise
            pending -= 1
            if kind == "record":
                results.append(value)
                completed += 1
                progress.advance(value["mode"], bool(value.get("correct")))
                if not succeeded and value.get("stop_reason") in FAILED:
                    failures.append(str(value.get("error") or value.get("stop_reason")))
                    if len(failures) >= abort_after and not interrupted:
                        aborted = failures[0]
                        cancel.set()
                        break
                else:
                    succeeded = True
            elif kind == "fatal":
                cancel.set()
                raise DuetError(f"cannot write results into {run_dir}: {value}")
    except KeyboardInterrupt:
        cancel.set()
        if not interrupted:  # the first Ctrl-C, caught outside the wait for results
            say(abandoning())
        interrupted = True
    finally:
        pool.shutdown(wait=not (interrupted or aborted), cancel_futures=True)
    return completed, interrupted, aborted

"""The steps of `eval claims` and `eval ablate` (a training, an evaluation) run in worker processes: `jobs` at
once, each with `threads` torch threads, each step's output in a log file of its own, a step started only when
the steps it needs have finished.

Why several one-thread processes: the toy models are too small for a second thread to help much (a stage II
step is 1.39x faster on two threads than on one), so on two cores two one-thread steps side by side do 1.47x
the work of one two-thread step (measured in docs/PERFORMANCE.md). A step's numbers depend on its thread count
(float sums in another order: 6e-7 apart after 400 stage II steps, another CLIP after a 600-step stage 0) and
not on `jobs`: any number of jobs gives the same numbers for the same `threads`.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cir.cli import cores
from eval.score import PredictionError


@dataclass(frozen=True)
class Step:
    name: str  # unique; what the progress lines say, e.g. "train stage2 seed 0"
    log: str  # the file the step's stdout and stderr go to (appended)
    run: Callable  # a module-level function (it is sent to a worker process by name) ...
    args: tuple  # ... and its arguments (picklable)
    after: tuple[str, ...] = ()  # names of steps that must finish first (steps not in the list are done)
    rank: int = 0  # among steps ready at once, a lower rank starts first (then the list's order)


def workers(jobs: int, threads: int) -> int:
    """jobs, or (0) as many as the cores hold at `threads` each."""
    return jobs if jobs > 0 else max(1, cores() // max(1, threads))


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A daemon thread that ends this worker once its parent is gone (a kill -9 of `eval claims` would leave it
    training with no one to read its result): the parent's pid changes when it dies."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker(threads: int) -> None:
    _exit_with_parent(os.getppid())
    # before torch starts its thread pools: OpenMP and MKL read these once
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _in_worker(step: Step) -> float:
    """Runs the step with file descriptors 1 and 2 on its log (so tqdm, logging and C code write there too);
    its seconds. A failure's traceback goes to the log; what comes back is a PredictionError with its message
    (any exception type would not survive the trip back)."""
    path = Path(step.log)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(path, "a", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            step.run(*step.args)
        except Exception as err:
            traceback.print_exc()
            raise PredictionError(f"{type(err).__name__}: {err}") from None
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return time.perf_counter() - started


def run_main(module: str, argv: list[str]) -> None:
    """A step that runs a command's `main(argv)` (module "train.stage2", ...); a nonzero exit (returned, or an
    argparse error's SystemExit) fails the step."""
    import importlib

    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as done:
        code = done.code
    if code:
        raise PredictionError(f"{module} {' '.join(argv)} exited with status {code}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def run_steps(steps: list[Step], jobs: int, threads: int, say: Callable[[str], None]) -> dict[str, float]:
    """Runs every step, at most `workers(jobs, threads)` at once, each after its `after`; {name: seconds}.
    A step that fails stops the run (steps already running finish; none starts): PredictionError naming the
    step, its error and the end of its log."""
    names = {s.name for s in steps}
    if len(names) != len(steps):
        raise ValueError("step names must be unique")
    waiting = sorted(steps, key=lambda s: s.rank)  # stable: the list's order within a rank
    done: set[str] = set()
    seconds: dict[str, float] = {}
    n = workers(jobs, threads)
    if not steps:
        return seconds
    say(f"{len(steps)} steps, {n} at a time, {threads} thread(s) each; each step's output in its log")
    # spawn, not fork: a forked copy of a process that has run torch can hang in its thread pools
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_start_worker,
                             initargs=(threads,)) as pool:
        running: dict[Future, Step] = {}
        while waiting or running:
            for step in [s for s in waiting if all(a in done or a not in names for a in s.after)]:
                if len(running) >= n:
                    break
                waiting.remove(step)
                say(f"{step.name} (log: {step.log})")
                running[pool.submit(_in_worker, step)] = step
            if not running:
                raise PredictionError(f"steps wait for steps that never run: {[s.name for s in waiting]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                try:
                    seconds[step.name] = round(future.result(), 1)
                except Exception as err:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise PredictionError(f"{step.name} failed: {err}\n(the end of its log, {step.log}:)\n"
                                          f"{_tail(step.log)}") from None
                done.add(step.name)
                say(f"done {len(done)}/{len(steps)}: {step.name} ({seconds[step.name]:.0f} s)")
    return seconds

"""eval.cells: steps run in worker processes, in the order their `after` says, output in their logs."""
import json
import os
import sys
import time

import pytest

from eval.cells import Step, run_main, run_steps
from eval.score import PredictionError


# the steps' functions: module level, as a worker process imports them by name

def _write(path, text, delay=0.0):
    time.sleep(delay)
    print(f"writing {path}")  # stdout: into the step's log
    os.write(2, b"from C-level code\n")  # file descriptor 2 itself: into the log too
    with open(path, "w") as f:
        f.write(text)


def _copy(src, dst):
    with open(src) as f:  # fails if src is not there yet
        text = f.read()
    with open(dst, "w") as f:
        f.write(text + "+")


def _threads(path):
    import torch

    with open(path, "w") as f:
        json.dump({"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}, f)


def _fail(message):
    print("about to fail", file=sys.stderr)
    raise ValueError(message)


def test_steps_run_after_what_they_need_and_log_to_their_files(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    lines = []
    steps = [Step("copy", str(tmp_path / "logs" / "copy.log"), _copy, (a, b), after=("write",)),
             Step("write", str(tmp_path / "logs" / "write.log"), _write, (a, "x", 0.5)),
             Step("copy again", str(tmp_path / "logs" / "again.log"), _copy, (b, c), after=("copy", "done before"))]
    seconds = run_steps(steps, jobs=2, threads=1, say=lines.append)
    assert open(c).read() == "x++"  # "done before" is no step of this run: it counts as finished
    assert set(seconds) == {"write", "copy", "copy again"} and seconds["write"] >= 0.5
    log = (tmp_path / "logs" / "write.log").read_text()
    assert f"writing {a}" in log and "from C-level code" in log
    assert lines[0].startswith("3 steps, 2 at a time, 1 thread(s) each")
    assert [line for line in lines if line.startswith("done")][-1].startswith("done 3/3: copy again")


def test_each_worker_runs_with_the_threads_asked_for(tmp_path):
    run_steps([Step("t", str(tmp_path / "t.log"), _threads, (str(tmp_path / "t.json"),))], jobs=1, threads=1,
              say=lambda line: None)
    assert json.loads((tmp_path / "t.json").read_text()) == {"torch": 1, "omp": "1"}


def test_a_failing_step_stops_the_run_naming_it_and_its_log(tmp_path):
    after = str(tmp_path / "after")
    steps = [Step("bad", str(tmp_path / "bad.log"), _fail, ("no such benchmark",)),
             Step("later", str(tmp_path / "later.log"), _write, (after, "x"), after=("bad",))]
    with pytest.raises(PredictionError) as err:
        run_steps(steps, jobs=1, threads=1, say=lambda line: None)
    message = str(err.value)
    assert message.startswith("bad failed: ValueError: no such benchmark") and str(tmp_path / "bad.log") in message
    assert "about to fail" in message  # the end of the log, with the traceback before it
    assert "Traceback" in (tmp_path / "bad.log").read_text()
    assert not os.path.exists(after)  # a step after a failed one never starts


def test_a_command_step_fails_on_a_nonzero_exit(tmp_path, capsys):
    """run_main: a command's main as a step (the demo's stage II runs); an argparse error is a failure too."""
    run_main("beam_runner", ["toy", "--output", str(tmp_path / "w"), "--num-images", "3", "--bench-queries", "2",
                             "--benchmarks", "cirr", "--jobs", "1"])
    assert (tmp_path / "w" / "world.json").is_file()
    with pytest.raises(PredictionError, match="beam_runner toy .* exited with status 2"):
        run_main("beam_runner", ["toy", "--output", str(tmp_path / "v"), "--num-images", "0"])
    assert "--num-images: must be at least 1" in capsys.readouterr().err


def _sleep_and_note(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """Issue 44: kill -9 of the process running the steps used to leave its workers training with no parent."""
    import signal
    import subprocess

    note = tmp_path / "worker.pid"
    script = (f"import sys; sys.path.insert(0, {str(os.path.dirname(__file__))!r}); "
              f"from test_eval_cells import _sleep_and_note; from eval.cells import Step, run_steps; "
              f"run_steps([Step('sleep', {str(tmp_path / 'log')!r}, _sleep_and_note, ({str(note)!r}, 120))], 1, 1, "
              f"print)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        for _ in range(600):  # the worker has started its step
            if note.is_file() and note.read_text():
                break
            time.sleep(0.1)
        worker = int(note.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        for _ in range(100):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived its parent by 10 s")
    finally:
        parent.kill()

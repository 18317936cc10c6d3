"""How the command-line entry points end, and how many processes they run at once by default."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from cir.errors import CIRError


def run_and_exit(main: Callable[[], int]) -> None:
    """sys.exit(main()), ending the process without the interpreter's teardown once everything is flushed.

    With torch and pyarrow both loaded, the C++ teardown at exit aborted about one run in seven ("terminate
    called without an active exception", exit 134) after the command had finished, an argument error included
    (reproduced: `import torch`, read a parquet file, `sys.exit(2)`: 5 aborts in 20). Our commands close their
    files and trackers themselves, so the teardown has nothing left to do: flush the streams and logs, then leave
    with the command's own status. A CIRError that gets this far (one the command itself did not catch) is
    printed as its message, without a traceback, with status 2, like every error the user can fix."""
    try:
        code = main()
    except SystemExit as done:  # argparse errors, --help
        code = done.code
    except CIRError as err:
        print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {err}", file=sys.stderr)
        code = 2
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells it, else the machine's count): what a
    `--jobs 0` means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1

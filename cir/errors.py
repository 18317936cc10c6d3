"""The one base class of the errors a user can fix: every command prints one as its message, without a
traceback, and exits 2 (cir.cli.run_and_exit). Each part raises its own subclass, which keeps the builtin
base it always had (ValueError, RuntimeError), so `except ValueError` around a call still means what it did."""
from __future__ import annotations


class CIRError(Exception):
    """Bad input, a bad config, a missing or damaged file: the message names it and says how to fix it."""

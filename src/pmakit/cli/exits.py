"""How a command ends: its exit codes, SIGTERM and Ctrl-C turned into a clean stop, and one line for an error
(a pmakit error exits 2, anything else 1, its traceback only with ``--debug``)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback

from .flags import cli_wording


BAD_INPUT = 2
PUSH_FAILED = 1
UNEXPECTED = 1  # an error pmakit did not expect (a bug, or one from a library below it)
INTERRUPTED = 128 + 2  # Ctrl-C (SIGINT), as the shell reports it
TERMINATED = 128 + 15  # the shell's code for a process stopped by SIGTERM


@contextlib.contextmanager
def interrupt_once():
    """The first SIGINT raises KeyboardInterrupt; after it SIGINT stays ignored, since the command is ending.

    A second Ctrl-C must neither cut the clean-up (removing a scratch model) short nor land in the
    interpreter's shutdown (torch's exit hooks), where it made the process die by the signal (-2)
    instead of exiting with 130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def interrupt(signum, frame):
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (how schedulers stop jobs), raised like Ctrl-C so that the same clean-up runs."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the command runs, SIGTERM raises `Terminated` in the main thread (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report(e: Exception, debug: bool) -> int:
    """One line on stderr for an error that ended a command, and its exit code: 2 for a pmakit error
    (bad input, a failed Hub request) or a missing/unwritable file, 1 for anything else (a bug: its
    traceback only with ``--debug``, so a user's terminal is not flooded)."""
    from ..errors import PmakitError

    message = cli_wording(" ".join(str(e).split()))
    if isinstance(e, (PmakitError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError)):
        print(f"pmakit: error: {message or type(e).__name__}", file=sys.stderr)
        return BAD_INPUT
    if debug:
        traceback.print_exc()
    hint = "" if debug else " (run with --debug for the traceback)"
    message = message if len(message) <= 300 else f"{message[:297]}..."
    print(f"pmakit: internal error: {type(e).__name__}: {message}{hint}", file=sys.stderr)
    return UNEXPECTED

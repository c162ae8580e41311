"""Preemption and Ctrl-C: how a run stops on SIGTERM and SIGINT.

SIGTERM (SLURM `--signal=TERM@<seconds>`, a TPU maintenance event, `kill`) asks the run to stop at
the next step boundary, after a checkpoint of that step is complete; a rerun with the same command
resumes from it. A run stopped this way exits with `EXIT_CODE`, so a job script can tell
"preempted, requeue me" from "finished" (0) and from a failure.

SIGINT (Ctrl-C) stops the run at the next step boundary once the checkpoint being written is
complete, without writing a new one; the command exits `INTERRUPTED_EXIT_CODE`. A second Ctrl-C
stops at once.

Before training installs these handlers (the entry module's imports, reading the config, loading
weights, compiling), `exit_during_start_up` makes both signals a plain exit with those codes.

One process: Python signal handlers set flags. Several processes must stop at the SAME step (the
checkpoint is a collective): there the JAX distributed runtime's preemption service, which receives
the SIGTERM itself, agrees on the step (`multihost_utils.reached_preemption_sync_point`).

This module imports JAX only when a run starts, so the entry module can import it first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary stop; rerunning the command continues
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what shells report for a Ctrl-C


def _exit(code: int) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        sys.exit(code)  # SystemExit: unwinds (releasing the workdir lock) without a traceback

    return handler


def exit_during_start_up() -> None:
    """Makes SIGTERM exit with `EXIT_CODE` and SIGINT with `INTERRUPTED_EXIT_CODE` (nothing to
    save yet) until a run installs its own handlers; no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _exit(INTERRUPTED_EXIT_CODE))
    signal.signal(signal.SIGTERM, _exit(EXIT_CODE))


@contextlib.contextmanager
def watch_sigterm() -> Iterator[Callable[[int], bool]]:
    """Yields `should_stop(step) -> bool`, True once a SIGTERM arrived (the same step on every
    process); the previous SIGTERM handler is restored on exit."""
    import jax  # here, not at the top: see the module docstring

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        yield multihost_utils.reached_preemption_sync_point
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    except ValueError:  # signal handlers can only be set from the main thread
        log.warning("not in the main thread: SIGTERM will not stop the run cleanly")
        yield lambda step: False
        return
    try:
        yield lambda step: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def defer_sigint() -> Iterator[Callable[[], bool]]:
    """Yields `interrupted() -> bool`, True once a SIGINT arrived; a second SIGINT raises
    KeyboardInterrupt at once. The previous handler is restored on exit. With several processes
    (which must stop together) or outside the main thread, SIGINT keeps its previous handler."""
    import jax

    received: list[int] = []

    def on_sigint(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)

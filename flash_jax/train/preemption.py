"""Preemption: SIGTERM (SLURM `--signal=TERM@<seconds>`, a TPU maintenance event, `kill`) asks the
run to stop at the next step boundary, after a checkpoint of that step is complete; a rerun with the
same command resumes from it. A run stopped this way exits with `EXIT_CODE`, so a job script can
tell "preempted, requeue me" from "finished" (0) and from a failure.

One process: a Python SIGTERM handler sets a flag. Several processes must stop at the SAME step (the
checkpoint is a collective): there the JAX distributed runtime's preemption service, which receives
the SIGTERM itself, agrees on the step (`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary stop; rerunning the command continues


@contextlib.contextmanager
def watch_sigterm() -> Iterator[Callable[[int], bool]]:
    """Yields `should_stop(step) -> bool`, True once a SIGTERM arrived (the same step on every
    process); the previous SIGTERM handler is restored on exit."""
    if jax.process_count() > 1:
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

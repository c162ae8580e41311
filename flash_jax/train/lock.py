"""One training run per workdir: `workdir/lock` held with `flock` while a run uses the workdir.

The kernel releases the lock when its holder exits, however it exits (kill -9 included), so a lock
file left by a dead run is stale by construction and simply taken over. The file records the
holder's host and pid for the refusal message. Only process 0 of a multi-process run locks.
(`flock` on network filesystems needs NFSv4 locking or equivalent; docs/faults.md.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str | Path) -> Iterator[Path]:
    """Holds `workdir/lock` (the workdir must exist) for the block; yields the lock file's path.

    Raises:
      WorkdirBusy: another process holds it, naming that process's host and pid.
    """
    path = Path(workdir) / "lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkdirBusy(
                f"{workdir} is in use by {holder} (lock file {path}); wait for that run to end or "
                "stop it, or give another --workdir"
            ) from None
        f.seek(0)
        stale = f.read().strip()
        if stale:
            log.warning("taking over the stale lock of %s (%s)", stale, path)
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.ctime()}\n")
        f.flush()
        try:
            yield path
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)

"""Is the agent running?  A lock on the state directory: kernel state, no disk write.

The runtime snapshot (``agent_state`` row ``runtime``) is committed with every
flush, so on a full or read-only disk it stops moving and its age alone would
say "not running" while the agent samples on into memory.  An ``flock(2)``
lives on an open file description: the daemon takes an exclusive lock on its
state directory at start and holds it until it exits; the kernel drops it
however the process ends (kill -9 and power cuts included).  A reader probes
with a non-blocking *shared* lock: refused means a daemon holds it.  Probes
never conflict with each other, and a daemon starting while a probe holds its
shared lock for a few microseconds retries briefly.  Only the directory is
opened (read-only): nothing is created or written, whatever the disk's state.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ACQUIRE_TRIES = 50
ACQUIRE_RETRY_S = 0.02


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class LivenessLock:
    """Held by the daemon for its lifetime."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        try:
            fd = _open_dir(self.state_dir)
        except OSError as exc:
            log.warning("liveness lock unavailable (%s): `edge-agent status` falls back to the snapshot's age", exc)
            return False
        for _ in range(ACQUIRE_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(ACQUIRE_RETRY_S)  # a status probe, gone in microseconds; or a second daemon
                continue
            except OSError as exc:
                os.close(fd)
                log.warning("liveness lock unavailable (%s)", exc)
                return False
            self._fd = fd
            return True
        os.close(fd)
        log.warning("another agent holds the state directory %s: two daemons share one database",
                    self.state_dir)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def probe(state_dir: Path) -> bool | None:
    """True: a running agent holds the lock; False: none does; None: cannot tell (no state
    directory, no permission to open it)."""
    try:
        fd = _open_dir(Path(state_dir))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

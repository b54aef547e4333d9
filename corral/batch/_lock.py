"""One run per output file: an exclusive, non-blocking lock held for the whole run.

Two runs appending to one output would send every request twice and write it twice. The lock
is ``flock`` on a small ``OUTPUT.lock`` file beside the output (the output itself is replaced
by ``--retry-failed``, so it cannot carry the lock); the kernel drops it when the process dies,
so a crash never leaves a stale lock. The holder writes its pid there for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from corral.core._errors import InvalidInput

__all__ = ["RunLock", "lock_path"]


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class RunLock:
    """``with RunLock(output):`` or raise ``InvalidInput`` naming the process holding it."""

    def __init__(self, output: Path) -> None:
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InvalidInput(
                f"another corral run (pid {holder}) is writing {self.path.name[:-5]}; "
                "wait for it to finish or stop it, then rerun"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

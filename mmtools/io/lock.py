"""One writer per output directory: an advisory lock that dies with its process."""

from __future__ import annotations

import contextlib
import fcntl
import os

from mmtools.errors import OutputLockedError


class DirLock:
    """An exclusive `flock` on a file; a lock left by a killed process is free again at once."""

    def __init__(self, path: str, wait: bool = False):
        self.path = path
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `OutputLockedError` naming the holder (wait if asked to)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputLockedError(
                    f"{os.path.dirname(self.path)} is being written by another mmtools process "
                    f"(pid {holder}); wait for it to finish, or pass --wait-lock"
                ) from None
            # The file may have been unlinked by the previous holder between open and flock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Unlink and release the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

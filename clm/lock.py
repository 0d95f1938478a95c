"""One run per output_dir: an exclusive ``flock`` on ``output_dir/.clm.lock`` for the run's life.

The kernel releases the lock when its process ends however it ends, so a lock left by a killed run never blocks
the next one. The file holds the owner's pid and host for the refusal message; it is hidden, so it is not one of
"the files clm did not write" and is not pushed to the Hub. The owner removes it when done; a process that opened
the file just before that checks, once locked, that the path still names the file it locked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from clm.errors import ClmError

logger = logging.getLogger("clm")

LOCK_FILE = ".clm.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]


class OutputDirBusy(ClmError):
    """Another clm run holds the output dir."""


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "another clm run"
    host = f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
    return f"another clm run (pid {text[0]}{host})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def hold(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Optional[Path]]:
    """Hold ``output_dir``'s lock for the block (creating the directory), or refuse in one line if another
    process holds it. ``enabled`` is False on processes other than the main one, which share the main one's run."""
    if not enabled or fcntl is None:
        yield None
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = _acquire(out, path)
    if fd is None:
        yield None
        return
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(out: Path, path: Path) -> Optional[int]:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _owner(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirBusy(f"--output_dir {str(out)!r} is in use by {owner}; wait for it to finish, or "
                                    "choose another --output_dir") from None
            logger.warning("Could not lock %s (%s); not guarding against a second run in it", path, exc.strerror)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the previous owner removed the file after we opened it: lock the one the path names

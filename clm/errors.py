"""User-facing errors: the CLI prints these as one line and exits 2 (or the error's own ``exit_code``), without a
traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional


class ClmError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""

    exit_code = 2


class ConfigError(ClmError, ValueError):
    """An invalid or conflicting setting."""


class DataError(ClmError):
    """Data that is missing, unreadable, empty or in the wrong layout."""


class BackendUnavailableError(ClmError, ImportError):
    """The chosen backend's framework is not installed."""


class Preempted(ClmError):
    """The run stopped on SIGTERM, SIGINT or SIGUSR1 (``clm.preemption``). ``saved`` when it wrote a checkpoint at
    the step it stopped; ``checkpoint`` is the newest complete one, which the same command resumes from. The exit
    code is the shell's for a signal: 128 + its number (SIGINT 130, SIGUSR1 138, SIGTERM 143)."""

    def __init__(self, signum: int, saved: bool = False) -> None:
        super().__init__(signum)
        self.signum, self.saved = signum, saved
        self.checkpoint: Optional[str] = None  # set by the runner, which knows output_dir
        self.command: Optional[str] = None  # the command line to run again, set by the CLI
        self.report = True  # False on processes other than the main one: one line per run

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum

    def __str__(self) -> str:
        name = _signal_name(self.signum)
        again = f"run the same command again{': ' + self.command if self.command else ''}"
        if self.checkpoint is None:
            return f"stopped by {name} before any checkpoint was written; to start over, {again}"
        what = "saved" if self.saved else "nothing new to save; the newest is"
        return f"stopped by {name}: {what} checkpoint {self.checkpoint}; to resume from it, {again}"


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WriteError(ClmError):
    """Writing a checkpoint, the model or the results failed (disk full, I/O error, permission). Checkpoints and
    the model are written to temporary names and renamed into place, so the previous complete checkpoint and any
    finished file stay valid; the runner names the checkpoint the same command resumes from. Exit code 1: the
    input was fine, the machine was not."""

    exit_code = 1

    def __init__(self, what: str, path: str | os.PathLike, reason: str) -> None:
        super().__init__(what, str(path), reason)
        self.what, self.path, self.reason = what, str(path), reason
        self.resume_from: Optional[str] = None  # set by the runner

    def __str__(self) -> str:
        then = (f"resume from {self.resume_from}" if self.resume_from
                else "start over (no complete checkpoint yet)")
        return (f"{self.what} failed: {self.reason} ({self.path}); free space or fix the permissions there, then "
                f"run the same command again to {then}")


def write_failure(exc: BaseException, path: str | os.PathLike) -> Optional[str]:
    """Why a write to ``path`` failed, in words, or None if ``exc`` is not an I/O failure. Libraries report a full
    disk in their own ways: OSError (errno), safetensors "os error 28", TensorFlow an OpError naming the errno,
    torch's zip writer a bare RuntimeError ("unexpected pos"); so the free space there is checked too."""
    library = type(exc).__name__ == "SafetensorError" or type(exc).__module__.startswith("tensorflow")
    if not isinstance(exc, (OSError, RuntimeError)) and not library:
        return None
    code = exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) else None
    text = str(exc)
    if code is None:
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]", text)
        code = int(found.group(1) or found.group(2)) if found else None
    if code is None:
        code = next((c for c in _WRITE_ERRNOS if os.strerror(c) in text), None)
    if code is None and _disk_full(path):
        code = errno.ENOSPC
    if code is not None:
        return os.strerror(code)
    if isinstance(exc, OSError):
        return text
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _disk_full(path: str | os.PathLike, margin: int = 1 << 20) -> bool:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < margin
    except OSError:
        return False


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into a one-line ``WriteError`` naming ``what`` and ``path``."""
    try:
        yield
    except ClmError:
        raise
    except Exception as exc:
        reason = write_failure(exc, path)
        if reason is None:
            raise
        raise WriteError(what, path, reason) from exc

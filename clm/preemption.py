"""Stopping on SIGTERM, SIGINT or SIGUSR1 without losing work (clusters and spot machines stop jobs this way).

While a run trains (inside ``deferred()``), a signal only records itself: each backend polls ``stop_signal()`` at
the end of every optimizer step, writes a checkpoint at that step and stops, and ``Backend.train`` raises
``clm.errors.Preempted``. Outside training (data preparation, evaluation) there is nothing to save, so the
signal interrupts at once, as Ctrl-C does: ``Interrupted`` (a BaseException, like KeyboardInterrupt, so no
``except Exception`` on the way swallows it), which the runner reports as ``Preempted``. A second signal exits at once with the shell's code, 128 + its number.

The same signal delivered twice within ``DUPLICATE_WINDOW`` counts once: a scheduler that signals every
process of a job reaches torchrun's workers both directly and through torchrun, which forwards it.
Framework-free: processes agree on a stop through ``votes``/``agree``, over their own collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

logger = logging.getLogger("clm")

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
DUPLICATE_WINDOW = 1.0  # seconds


class _State:
    signum: Optional[int] = None
    at = 0.0
    deferring = False


_state = _State()


class Interrupted(BaseException):
    """A stop signal outside training, raised where the program was; the runner turns it into ``Preempted``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _handle(signum: int, frame: object) -> None:
    now = time.monotonic()
    if _state.signum is not None:
        if now - _state.at < DUPLICATE_WINDOW:
            return
        os.write(2, f"clm: second {signal.Signals(signum).name}; exiting now, without saving\n".encode())
        os._exit(128 + signum)
    _state.signum, _state.at = signum, now
    if not _state.deferring:
        raise Interrupted(signum)
    logger.warning("%s received: finishing this step, saving a checkpoint, then stopping (send it again to exit "
                   "at once, without saving)", signal.Signals(signum).name)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Handle the stop signals for the block (a training run), then restore the previous handlers. A no-op off
    the main thread, where Python cannot install handlers (``clm.train`` called from a worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.signum, _state.deferring = None, False
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.signum, _state.deferring = None, False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal only records itself, for ``stop_signal()`` to report at the next step end."""
    before, _state.deferring = _state.deferring, True
    try:
        yield
    finally:
        _state.deferring = before


def stop_signal() -> Optional[int]:
    """The signal that asked this process to stop, if any."""
    return _state.signum


def request(signum: int) -> None:
    """Record a stop that another process received (the processes agreed to stop together)."""
    if _state.signum is None:
        _state.signum, _state.at = signum, time.monotonic()


def votes() -> list[int]:
    """This process's vote, one count per signal in ``SIGNALS`` order; sum the votes of all processes and
    pass the sum to ``agree``."""
    return [int(_state.signum == s) for s in SIGNALS]


def agree(summed: Sequence[float]) -> Optional[int]:
    """The signal every process stops for, given the summed ``votes`` (the same on every process), or None."""
    for s, count in zip(SIGNALS, summed):
        if count > 0:
            request(s)
            return int(s)
    return None


def reclaim() -> None:
    """Install clm's handlers again inside ``handling()``, after a library replaced one at the C level (Python
    still reports its own handler then, so re-installing is the only way to be sure)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            if signal.getsignal(s) is _handle:
                signal.signal(s, _handle)


def under_launcher() -> bool:
    """Started by torchrun/torchelastic or as a TF cluster task: one of several processes of one job."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("TF_CONFIG"))


def ignore_stop_signals() -> None:
    """For a process of a launched job that is leaving because of a stop: further stop signals change nothing
    (torchrun SIGTERMs the ranks still running once one has exited). Main thread only."""
    if under_launcher() and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def same_command(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """The command line to run again, as the user typed it (``python -m clm ...`` or ``clm ...``); None under a
    launcher (torchrun, a TF cluster), whose command this process cannot see."""
    import shlex

    if under_launcher():
        return None
    argv = list(sys.argv if argv is None else argv)
    head = argv[0] if argv else "clm"
    prog = "python -m clm" if head.endswith("__main__.py") else os.path.basename(head)
    return " ".join([prog, shlex.join(argv[1:])]) if len(argv) > 1 else prog

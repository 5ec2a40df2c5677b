"""SIGTERM and SIGHUP end a Timber merge the way Ctrl-C does: through its `finally` blocks.

A Slurm time limit, `docker stop` or `timeout` sends SIGTERM; a closed terminal sends
SIGHUP. Their default action kills the process on the spot, which would leave the
staging folder (a full-size model) behind. While a Timber merge runs in the main
thread, `terminate_as_exception` turns them into `Terminated`, so the merge's cleanup
runs; afterwards the signal is delivered again with its default action, so the process
still ends as killed by it (exit status 128 + signal in a shell). Only signals whose
handler is the default are taken over: an ignored SIGHUP (`nohup`) stays ignored, and
a program's own handler stays its own. `deferred` holds them back (and Ctrl-C) during
the few renames that publish a model.

Worker threads (`--multi-gpu`) get no signal: the main thread's cleanup first waits for
them (mergekit's thread pool joins its workers), so the handler also raises a flag the
method checks before each tensor and after each chunk (`raise_if_stopping`): the workers
stop at once and the merge ends as a single-device merge does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Dict, Optional

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(BaseException):
    """A termination signal, raised in the main thread so that cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _Guard:
    def __init__(self):
        self.previous: Dict[int, object] = {}
        self.fired: Optional[int] = None
        self.deferring = 0

    def handle(self, signum, frame):
        if self.fired is not None:
            return  # one cleanup is under way; a second signal does not cut it short
        self.fired = signum
        if not self.deferring:
            _stopping.set()  # for worker threads (raise_if_stopping)
            raise Terminated(signum)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


_active: Optional[_Guard] = None
_stopping = threading.Event()


def raise_if_stopping() -> None:
    """In any thread: raise Terminated if a termination signal is ending the merge."""
    guard = _active
    if _stopping.is_set() and guard is not None and guard.fired is not None:
        raise Terminated(guard.fired)


@contextlib.contextmanager
def terminate_as_exception():
    """Within: SIGTERM/SIGHUP raise Terminated in the main thread; after: the process ends by it."""
    global _active
    if _active is not None or threading.current_thread() is not threading.main_thread():
        yield  # nested, or not the main thread (Python delivers signals there only)
        return
    guard = _Guard()
    for signum in SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            guard.previous[signum] = signal.signal(signum, guard.handle)
    _active = guard
    try:
        yield
    except Terminated as stop:
        _active = None
        _stopping.clear()
        guard.restore()
        signal.raise_signal(stop.signum)  # default action: the process ends here
        raise
    finally:
        _active = None
        _stopping.clear()
        guard.restore()


@contextlib.contextmanager
def deferred():
    """Hold a termination signal (and Ctrl-C) back until the block is done, then act on it."""
    guard = _active
    if guard is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = []
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    guard.deferring += 1
    try:
        yield
    finally:
        guard.deferring -= 1
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        if guard.fired is not None and not guard.deferring:
            raise Terminated(guard.fired)
        if interrupted:
            raise KeyboardInterrupt

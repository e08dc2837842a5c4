"""Process hygiene: the signals that end a run, and no child process outliving stemlive.

A run can end by Ctrl-C (SIGINT), by SIGTERM (a job scheduler, `kill`, a closing terminal) or by
SIGKILL.  The first two end it the same way: :class:`Terminated` is raised in the main thread,
the store is closed as aborted with the reason, and the command exits 128 + the signal number.
Nothing can run on SIGKILL, so the children watch for it themselves: LiberTEM's pipelined
workers get :func:`exit_with_parent` as their early set-up and leave as soon as stemlive's
process is gone (the multiprocessing resource tracker then sees its last client go and exits
too); Dask's worker processes already watch their nanny the same way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import signal
import threading

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """The run was ended by a signal (SIGINT or SIGTERM): handled like Ctrl-C everywhere."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def reason(self) -> str:
        return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else f"terminated ({signal.Signals(self.signum).name})"


_deferring = {"depth": 0, "pending": None}


def _raise_terminated(signum, frame):
    if _deferring["depth"]:
        _deferring["pending"] = signum  # raised when the protected step is done
        return
    raise Terminated(signum)


@contextlib.contextmanager
def signals_deferred():
    """Let a closing step (finishing the store) run to its end: a SIGINT/SIGTERM that lands
    meanwhile is raised as :class:`Terminated` right after it."""
    _deferring["depth"] += 1
    try:
        yield
    finally:
        _deferring["depth"] -= 1
        pending, _deferring["pending"] = _deferring["pending"], None
        if pending is not None and not _deferring["depth"] and sys.exc_info()[0] is None:
            raise Terminated(pending)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Terminated` in the main thread (call from the main thread).

    A SIGINT that the shell set to be ignored (a job started with ``&``) stays ignored, as it
    would for any other program.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _raise_terminated)


def exit_with_parent() -> None:
    """In a multiprocessing child: exit at once when the parent process is gone (even SIGKILLed).

    Given to LiberTEM's PipelinedExecutor as ``early_setup``; a daemon thread waits on the
    parent's sentinel, which becomes ready when the parent dies.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="stemlive-exit-with-parent", daemon=True).start()


def child_processes() -> list:
    """Every live descendant of this process (psutil objects)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _is_resource_tracker(proc) -> bool:
    import psutil

    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def end_children(timeout: float = 5.0) -> None:
    """Terminate, then kill, every descendant of this process: called on every way out of a run.

    The multiprocessing resource tracker is left alone: it ignores SIGTERM, and exits by itself
    (cleaning up shared memory) once its last client, this process, is gone.
    """
    import psutil

    procs = [p for p in child_processes() if not _is_resource_tracker(p)]
    if not procs:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    if alive:
        log.info("killed %d child processes that did not end on SIGTERM", len(alive))

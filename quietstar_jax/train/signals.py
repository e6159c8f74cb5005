"""Stopping a training run: SIGTERM (preemption) and SIGINT (Ctrl-C).

While the loop runs (`StopRequest` installed), either signal only sets a flag: the
loop finishes the update in flight, saves a checkpoint and returns, and the run
says which signal stopped it (`train.py` exits 0 after SIGTERM, 130 after SIGINT).
A second Ctrl-C does not wait: it raises KeyboardInterrupt at once, as does a
Ctrl-C before the loop (while loading or compiling), where there is nothing to save.

XLA compiles in C++ without returning to Python, so a Ctrl-C during compilation
would wait for it to end (minutes, on a large model). `compile_in_background`
therefore compiles on a helper thread while the main thread waits, ready to take
the signal; a compile left behind that way cannot be cancelled and XLA aborts if the
interpreter ends under it, so a program that exits while `compile_running()` (as
`Interrupted.compile_abandoned` says) ends with `os._exit` (train.py does).

Nothing here runs per step but reading a flag.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C without saving (one line: where, and the last
    checkpoint). `compile_abandoned`: a compile thread is still running."""

    def __init__(self, message: str, compile_abandoned: bool = False) -> None:
        super().__init__(message)
        self.compile_abandoned = compile_abandoned


class CompileAbandoned(Exception):
    """A stop was requested while a step compiled; the loop saves and stops."""


class StopRequest:
    """SIGTERM and SIGINT set `signum`; the loop stops at the end of the update."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in _SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption support
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if self.signum is None:
            self.signum = signum

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> int | None:
        """The signal any process was asked to stop by (all processes take the same
        answer: the highest signal number asked for), or None."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        top = int(np.max(flags))
        return top or None


def signal_name(signum: int | None) -> str | None:
    return None if signum is None else signal.Signals(signum).name


def compile_in_background(lowered: Any, abandon: Any = None) -> Any:
    """`lowered.compile()` on a helper thread, the calling thread waiting so that it
    takes signals (Ctrl-C raises KeyboardInterrupt here at once). `abandon`: a
    callable polled while waiting; when it returns True, CompileAbandoned is raised
    (the compile goes on on its thread and is dropped)."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            result["compiled"] = lowered.compile()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=work, name="quietstar-compile", daemon=True)
    thread.start()
    while not done.wait(0.1):
        if abandon is not None and abandon():
            raise CompileAbandoned
    if "error" in result:
        raise result["error"]
    return result["compiled"]


def compile_running() -> bool:
    """Whether a compile thread left behind by an interrupt is still running."""
    return any(t.name == "quietstar-compile" and t.is_alive() for t in threading.enumerate())

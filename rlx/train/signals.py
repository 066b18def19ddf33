"""SIGINT / SIGTERM during a training phase: stop at once, never with a half-made save.

A phase loop runs under :func:`guard`::

    with signals.guard("RL") as g:
        while ...:
            ...                                 # a signal here stops the phase at once
            with g.deferred():                  # a signal here waits for the block's end
                checkpointer.save(...)

The first SIGINT or SIGTERM raises :class:`Interrupted` in the main thread (outside a
``deferred`` block at once, inside one when the block ends), so the in-memory state
of an unfinished step is dropped and the newest *complete* checkpoint is what a rerun
resumes from. The loop then calls :func:`stop`: it waits for the asynchronous save in
flight (the current save is finished), prints one line naming the signal, the phase,
the steps done and the checkpoint a rerun resumes from, and re-raises.
:class:`Interrupted` is a ``SystemExit`` with code 128 + signal number (130 for SIGINT,
143 for SIGTERM), so an uncaught one ends the process with that code and no traceback,
after every ``finally`` block of the callers ran (reward workers stopped, files closed).

A second signal while the first is handled (e.g. during a long wait for the save)
ends the process at once (``os._exit``) after one line: the save in flight is
abandoned, which is clean because orbax writes into a temporary directory that a rerun
ignores and removes.

Handlers are installed only in the main thread (elsewhere ``guard`` does nothing) and
the previous ones are restored when the block ends; nested guards share the outer one
(a recipe guards its whole run, each phase loop its own steps and saves); the message
is printed once, by the innermost ``stop``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """The phase was stopped by a signal. ``code`` = 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.reported = False      # the one-line message was printed (``stop``)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Guard:
    """Signal state of one guarded phase (see the module docstring)."""

    def __init__(self, phase: str, stream=None):
        self.phase = phase
        self.stream = stream
        self.received: int | None = None    # the first signal, once one arrived
        self._depth = 0                     # nesting of deferred() blocks
        self.active = False

    # ------------------------------------------------------------------ handler
    def _handle(self, signum, frame) -> None:
        if self.received is not None:        # a second signal: exit now
            name = signal.Signals(signum).name
            print(f"rlx: second signal ({name}) during {self.phase}: exiting now; the save "
                  "in flight (if any) is abandoned and its temporary files are removed by "
                  "the next run", file=self.stream or sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if self._depth == 0:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a signal does not interrupt; the signal is raised when it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0:
            self.check()

    def check(self) -> None:
        """Raises ``Interrupted`` if a signal arrived. Loops call it at each step
        boundary, so a signal whose exception some library swallowed (it is a
        ``SystemExit``) still stops the phase there."""
        if self.received is not None:
            raise Interrupted(self.received)


_current: Guard | None = None


@contextlib.contextmanager
def guard(phase: str, *, stream=None) -> Iterator[Guard]:
    """Installs the SIGINT/SIGTERM handlers for ``phase`` (main thread only)."""
    global _current
    if _current is not None:                 # nested: the outer guard handles signals
        yield _current
        return
    g = Guard(phase, stream)
    if threading.current_thread() is not threading.main_thread():
        yield g
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, g._handle)
    g.active, _current = True, g
    try:
        yield g
    finally:
        _current, g.active = None, False
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def whole_run(name: str, *, resume_from: Callable[[], str] | None = None,
              stream=None) -> Iterator[Guard]:
    """Guards a recipe's whole run (start-up, phases and the work between them).

    Inside a phase loop the loop's own ``stop`` reports (steps done, its checkpoint);
    a signal anywhere else (tokenizer training, evaluation, pair synthesis, export)
    stops the run with one line naming ``name`` and ``resume_from()``, and the
    ``Interrupted`` propagates (exit code 128 + signal, ``finally`` blocks run)."""
    with guard(name, stream=stream) as g:
        try:
            yield g
        except Interrupted as err:
            stop(err, phase=name, resume_from=resume_from, stream=stream)
            raise


def stop(err: Interrupted, *, phase: str, step: int | None = None, total: int | None = None,
         wait: Callable[[], None] | None = None, resume_from: Callable[[], str] | None = None,
         stream=None) -> None:
    """Finishes the save in flight (``wait``), prints the one-line message and returns;
    the caller re-raises ``err``. ``resume_from()`` describes the newest complete
    checkpoint (called after the wait)."""
    if err.reported:
        return
    if wait is not None:
        wait()
    where = resume_from() if resume_from is not None else "the start"
    err.reported = True
    done = f" ({step} of {total} steps done)" if step is not None else ""
    print(f"rlx: stopped by {err.name} during {phase}{done}; "
          f"rerun the same command to resume from {where}",
          file=stream or sys.stderr, flush=True)


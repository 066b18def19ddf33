"""Worker side of ``rlx.rewards.pool``: scores chunks of (completion, problem) pairs.

Run as ``python -m rlx.rewards._worker_main SOCKET_FD PROGRESS_FD`` by the pool (a fresh
interpreter: no fork of a JAX process, and the parent's ``__main__`` is never re-run),
or as a thread in the thread backend. Messages on the socket (``multiprocessing``
``Connection`` framing):

- parent -> worker: pickled spec bytes first, ``(chunk_id, [(completion, problem), ...])``
  per chunk, ``None`` to stop;
- worker -> parent: ``("ready",)`` or ``("error", text)`` after the spec, then
  ``("result", chunk_id, values [n, K] float64, status [n, K] int8, errors)``.

Before each reward call the worker writes ``chunk_id << 32 | call_index`` into an
8-byte shared ``progress`` buffer (call ``i·K + k`` is sample ``i``, component ``k``),
which the parent reads to find (and kill) a call that exceeds its time limit.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import threading
from multiprocessing.connection import Connection

import numpy as np

from rlx.rewards.spec import RewardSpec, check_score

OK, FAILED, TIMED_OUT, SKIPPED = 0, 1, 2, 3
MAX_ERRORS = 8


class CallTimeout(BaseException):
    """Raised by the SIGALRM handler inside a reward call (BaseException, so a reward
    function's own ``except Exception`` cannot swallow it)."""


class Progress:
    """An 8-byte shared cell holding ``chunk_id << 32 | call_index``."""

    def __init__(self, buf: mmap.mmap):
        self.buf = buf

    def set(self, chunk_id: int, call: int) -> None:
        struct.pack_into("q", self.buf, 0, (chunk_id << 32) | call)

    def get(self) -> tuple[int, int]:
        (v,) = struct.unpack_from("q", self.buf, 0)
        return v >> 32, v & 0xFFFFFFFF


class _Alarm:
    """Per-call soft timeout with SIGALRM (main thread of a process only)."""

    def __init__(self):
        self.armed = False

    def handler(self, signum, frame):
        if self.armed:
            self.armed = False
            raise CallTimeout()

    def arm(self, seconds: float) -> None:
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def score_chunk(
    spec: RewardSpec,
    items: list,
    *,
    failure_value: float,
    timeout_s: float,
    alarm: _Alarm | None = None,
    progress: Progress | None = None,
    chunk_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores ``items``; a raising / non-finite / timed-out call gets ``failure_value``."""
    comps = spec.components
    n, k_count = len(items), len(comps)
    values = np.full((n, k_count), failure_value, dtype=np.float64)
    status = np.zeros((n, k_count), dtype=np.int8)
    errors: list[str] = []
    for i, (completion, problem) in enumerate(items):
        for k, comp in enumerate(comps):
            if progress is not None:
                progress.set(chunk_id, i * k_count + k)
            try:
                if alarm is not None:
                    alarm.arm(timeout_s)
                try:
                    raw = comp(completion, problem)
                finally:
                    if alarm is not None:
                        alarm.disarm()
                values[i, k] = check_score(comp.name, raw)
            except CallTimeout:
                status[i, k] = TIMED_OUT
                if len(errors) < MAX_ERRORS:
                    errors.append(f"{comp.name}: timed out after {timeout_s:g}s")
            except Exception as e:  # noqa: BLE001 - isolation is the point
                values[i, k] = failure_value
                status[i, k] = FAILED
                if len(errors) < MAX_ERRORS:
                    errors.append(f"{comp.name}: {type(e).__name__}: {str(e)[:200]}")
    return values, status, errors


def serve(conn: Connection, progress: Progress, *, use_alarm: bool) -> None:
    """The worker loop (process main or thread body)."""
    alarm = None
    try:
        spec, timeout_s, failure_value = pickle.loads(conn.recv_bytes())
        if use_alarm:
            alarm = _Alarm()
            signal.signal(signal.SIGALRM, alarm.handler)
        conn.send(("ready",))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        chunk_id, items = msg
        values, status, errors = score_chunk(
            spec,
            items,
            failure_value=failure_value,
            timeout_s=timeout_s,
            alarm=alarm,
            progress=progress,
            chunk_id=chunk_id,
        )
        try:
            conn.send(("result", chunk_id, values, status, errors))
        except OSError:  # parent gone or thread abandoned
            return


def serve_thread(conn: Connection, progress: Progress) -> threading.Thread:
    t = threading.Thread(target=serve, args=(conn, progress), kwargs={"use_alarm": False}, daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> None:
    sock_fd, progress_fd = int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    progress = Progress(mmap.mmap(progress_fd, 8))
    os.close(progress_fd)
    serve(Connection(sock_fd), progress, use_alarm=hasattr(signal, "setitimer"))


"""Worker side of ``rlx.rewards.pool``: scores chunks of (completion, problem) pairs.

Run as ``python -m rlx.rewards._worker_main SOCKET_FD PROGRESS_FD MEMORY_LIMIT_BYTES``
by the pool (a fresh interpreter: no fork of a JAX process, and the parent's
``__main__`` is never re-run as ``__main__``), or as a thread in the thread backend.
Messages on the socket (``multiprocessing`` ``Connection`` framing):

- parent -> worker: the spec bytes first (``references.dumps`` of
  ``(spec, timeout_s, failure_value)``; unpickling imports the users' reward modules),
  ``(chunk_id, [(completion, problem), ...], skip)`` per chunk (``skip``: component
  indices not to call), ``None`` to stop;
- worker -> parent: ``("ready",)`` or ``("error", text)`` after the spec, then
  ``("result", chunk_id, values [n, K] float64, status [n, K] int8, [(k, message)])``.

Call order within a chunk: each batched component once (call index ``n·K + k``), then
sample by sample the per-sample components (call index ``i·K + k``). Before each call
the worker writes ``chunk_id << 32 | call_index`` into an 8-byte shared ``progress``
buffer, which the parent reads to find (and kill) a call that exceeds its time limit,
or to blame the call during which the process died.

In a worker process everything a reward raises is a failed call, including
``SystemExit`` and ``KeyboardInterrupt`` (the worker ignores SIGINT, so a
``KeyboardInterrupt`` there is the reward's own); ``RLIMIT_AS`` caps the worker's
address space, so a runaway allocation raises ``MemoryError`` (or kills the worker).
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import sys
import threading
from multiprocessing.connection import Connection

import numpy as np

from rlx.rewards.spec import RewardSpec, check_batch, check_score

OK, FAILED, TIMED_OUT, SKIPPED, CRASHED = 0, 1, 2, 3, 4
MAX_ERRORS = 8  # messages kept per batch in ``RewardResult.errors``
ERRORS_PER_COMPONENT = 2  # messages a worker reports per component and chunk
WORKER_ENV = "RLX_REWARD_WORKER"


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


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _guarded(call, *, alarm: _Alarm | None, limit: float, isolate_interrupts: bool):
    """``(OK, value, "")`` or ``(FAILED | TIMED_OUT, None, message)``."""
    try:
        if alarm is not None:
            alarm.arm(limit)
        try:
            return OK, call(), ""
        finally:
            if alarm is not None:
                alarm.disarm()
    except CallTimeout:
        return TIMED_OUT, None, f"timed out after {limit:g}s"
    except Exception as e:  # noqa: BLE001 - isolation is the point
        return FAILED, None, _describe(e)
    except BaseException as e:  # SystemExit, KeyboardInterrupt, GeneratorExit from a reward
        if isinstance(e, KeyboardInterrupt) and not isolate_interrupts:
            raise  # inline scoring: the user's Ctrl-C
        return FAILED, None, _describe(e)


def score_chunk(
    spec: RewardSpec,
    items: list,
    *,
    failure_value: float,
    timeout_s: float,
    alarm: _Alarm | None = None,
    progress: Progress | None = None,
    chunk_id: int = 0,
    skip: frozenset[int] = frozenset(),
    isolate_interrupts: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Scores ``items``; a raising / non-finite / timed-out call gets ``failure_value``.

    A per-sample call may take ``timeout_s``; a batched call ``timeout_s · n``.
    Returns ``values [n, K]``, ``status [n, K]`` (``OK`` / ``FAILED`` / ``TIMED_OUT``;
    skipped components stay ``OK`` with ``failure_value``, for the caller to ignore)
    and up to ``ERRORS_PER_COMPONENT`` ``(k, message)`` per component.
    """
    comps = spec.components
    n, k_count = len(items), len(comps)
    values = np.full((n, k_count), failure_value, dtype=np.float64)
    status = np.zeros((n, k_count), dtype=np.int8)
    errors: list[tuple[int, str]] = []
    reported = [0] * k_count

    def note(k: int, message: str) -> None:
        if reported[k] < ERRORS_PER_COMPONENT:
            reported[k] += 1
            errors.append((k, message))

    completions = [c for c, _ in items]
    problems = [p for _, p in items]
    for k, comp in enumerate(comps):
        if not comp.batched or k in skip or not n:
            continue
        if progress is not None:
            progress.set(chunk_id, n * k_count + k)
        kind, out, message = _guarded(
            lambda: check_batch(comp.name, comp.call_batch(list(completions), list(problems)), n),
            alarm=alarm, limit=timeout_s * n, isolate_interrupts=isolate_interrupts,
        )
        if kind != OK:
            status[:, k] = kind
            note(k, message)
            continue
        for i, v in enumerate(out):
            if isinstance(v, ValueError):
                status[i, k] = FAILED
                note(k, f"sample {i} of {n}: {v}")
            else:
                values[i, k] = v
    per_sample = [k for k, c in enumerate(comps) if not c.batched and k not in skip]
    for i, (completion, problem) in enumerate(items):
        for k in per_sample:
            comp = comps[k]
            if progress is not None:
                progress.set(chunk_id, i * k_count + k)
            kind, v, message = _guarded(
                lambda: check_score(comp.name, comp(completion, problem)),
                alarm=alarm, limit=timeout_s, isolate_interrupts=isolate_interrupts,
            )
            status[i, k] = kind
            if kind == OK:
                values[i, k] = v
            else:
                note(k, message)
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
    except BaseException as e:  # noqa: BLE001 - reported to the parent (a module may sys.exit)
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
        chunk_id, items, skip = msg
        values, status, errors = score_chunk(
            spec,
            items,
            failure_value=failure_value,
            timeout_s=timeout_s,
            alarm=alarm,
            progress=progress,
            chunk_id=chunk_id,
            skip=frozenset(skip),
        )
        try:
            conn.send(("result", chunk_id, values, status, errors))
        except OSError:  # parent gone or thread abandoned
            return


def serve_thread(conn: Connection, progress: Progress) -> threading.Thread:
    t = threading.Thread(target=serve, args=(conn, progress), kwargs={"use_alarm": False}, daemon=True)
    t.start()
    return t


def limit_memory(limit_bytes: int) -> None:
    """Caps this process's address space (soft and hard ``RLIMIT_AS``) at ``limit_bytes``."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def main(argv: list[str]) -> None:
    sock_fd, progress_fd, memory_limit = int(argv[1]), int(argv[2]), int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ[WORKER_ENV] = "1"
    if memory_limit > 0:
        try:
            limit_memory(memory_limit)
        except (ImportError, ValueError, OSError) as e:  # e.g. a platform without RLIMIT_AS
            print(f"rlx reward worker: no memory limit ({type(e).__name__}: {e})", file=sys.stderr)
    progress = Progress(mmap.mmap(progress_fd, 8))
    os.close(progress_fd)
    serve(Connection(sock_fd), progress, use_alarm=hasattr(signal, "setitimer"))


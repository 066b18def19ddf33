"""Reward worker pool: score a batch with host-side reward functions, isolating failures.

``RewardPool(spec, num_workers=2, timeout_s=5.0)`` scores B ``(completion, problem)``
pairs and returns a ``RewardResult``: weighted totals ``scores [B]`` float32, the
per-component matrix ``components [B, K]`` float32 (for GDPO-style multi-reward), a
``failed [B]`` mask and the counts ``failures`` (calls that raised or returned a
non-number / non-finite value, or whose worker process died) and ``timeouts`` (calls
that ran past ``timeout_s``). A failed or timed-out call scores ``failure_value`` for
its component; the total is always ``Σ_k w_k · components[:, k]``. Nothing a reward
function does ends the run.

Backends (``backend=``):

- ``"process"`` (default when the spec pickles): ``num_workers`` fresh interpreters
  (``python -m rlx.rewards._worker_main``, started with ``subprocess`` rather than
  ``multiprocessing``, so a JAX parent is never forked and the user's ``__main__`` is
  never re-imported). Timeouts are enforced twice: a per-call ``SIGALRM`` in the worker
  (the call raises, the worker lives on), and a parent watchdog that kills the worker
  (SIGKILL) when one call has been running for ``timeout_s + kill_grace_s`` (a call
  stuck in C code, or one that blocks signals), scores that call as timed out,
  restarts the worker and re-sends the rest of its chunk. Reward functions must be
  picklable (module-level functions; ``functools.partial`` of them).
- ``"thread"``: worker threads. Used by ``"auto"`` when the spec does not pickle
  (lambdas, closures), with a warning. A thread cannot be killed: a call past the
  watchdog deadline is scored as timed out and its thread abandoned (it keeps running
  in the background until the call returns; a replacement thread takes its place).
  Pure-Python rewards also contend for the GIL with the caller.
- ``"inline"``: in the calling thread, no workers; exceptions are isolated, and
  timeouts use SIGALRM when called from the main thread (else there is none). Lowest
  overhead, for cheap rewards and debugging.

Work is sent in chunks (``chunk_size``, default ``ceil(B / (4·num_workers))``) so cheap
functions pay one message round trip per chunk, not per sample. Results keep input
order. Use as a context manager (``with RewardPool(...) as pool:``) or call ``close()``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import gin
import numpy as np

from rlx.rewards._pool_worker import (
    FAILED,
    MAX_ERRORS,
    OK,
    SKIPPED,
    TIMED_OUT,
    Progress,
    _Alarm,
    score_chunk,
    serve_thread,
)
from rlx.rewards.spec import RewardSpec

BACKENDS = ("auto", "process", "thread", "inline")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Scores of one batch, in input order.

    Attributes:
      scores: ``[B]`` float32 weighted totals ``Σ_k w_k · components[:, k]``.
      components: ``[B, K]`` float32 per-component scores (failed calls hold
        ``failure_value``).
      names: the K component names.
      failed: ``[B]`` bool, True where any call of the sample failed or timed out.
      failures: number of calls that raised / returned a non-finite value / lost their
        worker.
      timeouts: number of calls that exceeded ``timeout_s``.
      errors: up to 8 messages describing failures, for logs.
      seconds: wall time of the ``score`` call.
    """

    scores: np.ndarray
    components: np.ndarray
    names: tuple[str, ...]
    failed: np.ndarray
    failures: int
    timeouts: int
    errors: tuple[str, ...]
    seconds: float

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalar metrics: mean total, mean per component, failures, timeouts."""
        out = {f"{prefix}mean": float(self.scores.mean()) if self.scores.size else 0.0}
        for k, name in enumerate(self.names):
            out[f"{prefix}{name}"] = float(self.components[:, k].mean()) if self.scores.size else 0.0
        out[f"{prefix}failures"] = float(self.failures)
        out[f"{prefix}timeouts"] = float(self.timeouts)
        out[f"{prefix}seconds"] = float(self.seconds)
        return out


class _ProcessWorker:
    """A ``python -m rlx.rewards._worker_main`` subprocess with a socket and progress cell."""

    def __init__(self, payload: bytes):
        parent_sock, child_sock = socket.socketpair()
        self._file = tempfile.TemporaryFile()
        self._file.truncate(8)
        self.progress = Progress(mmap.mmap(self._file.fileno(), 8))
        env = dict(os.environ)
        paths = [p or os.getcwd() for p in sys.path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        fds = (child_sock.fileno(), self._file.fileno())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlx.rewards._worker_main", *map(str, fds)],
            pass_fds=fds,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send_bytes(payload)

    def stop(self, *, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                kill = True
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.progress.buf.close()
        self._file.close()


class _ThreadWorker:
    """A daemon thread running the same worker loop over a socket pair."""

    def __init__(self, payload: bytes):
        a, b = socket.socketpair()
        self.conn = Connection(a.detach())
        self.progress = Progress(mmap.mmap(-1, 8))
        self.thread = serve_thread(Connection(b.detach()), self.progress)
        self.conn.send_bytes(payload)

    def stop(self, *, kill: bool) -> None:
        # A thread cannot be killed: closing our end makes it exit after its current call.
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.thread.join(timeout=2.0)
        self.conn.close()


@gin.configurable(module="rlx.rewards")
class RewardPool:
    """Scores batches with a ``RewardSpec`` in isolated workers (see module docstring).

    Args:
      spec: the reward spec (K components).
      num_workers: worker processes / threads (ignored by ``"inline"``).
      timeout_s: per reward-function call time limit, in seconds.
      failure_value: the score of a call that raised or timed out.
      backend: ``"auto"``, ``"process"``, ``"thread"`` or ``"inline"``.
      chunk_size: samples per message; default ``ceil(B / (4 · num_workers))``.
      kill_grace_s: extra time before the watchdog kills / abandons a stuck worker.
      startup_timeout_s: how long to wait for worker processes to start.
    """

    def __init__(
        self,
        spec: RewardSpec,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        failure_value: float = 0.0,
        backend: str = "auto",
        chunk_size: int | None = None,
        kill_grace_s: float = 1.0,
        startup_timeout_s: float = 120.0,
    ):
        if not isinstance(spec, RewardSpec):
            raise ValueError(f"spec must be a RewardSpec, got {type(spec).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not math.isfinite(failure_value):
            raise ValueError(f"failure_value must be finite, got {failure_value!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.spec = spec
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.failure_value = float(failure_value)
        self.chunk_size = chunk_size
        self.kill_grace_s = float(kill_grace_s)
        self.restarts = 0
        self._next_chunk_id = 1
        self._closed = False
        self._workers: list[Any] = []
        payload = None
        if backend in ("auto", "process"):
            try:
                payload = pickle.dumps((spec, self.timeout_s, self.failure_value))
            except Exception as e:  # noqa: BLE001 - pickling can raise many types
                if backend == "process":
                    raise ValueError(
                        f"backend='process' needs a picklable RewardSpec (module-level functions): {e}"
                    ) from e
                warnings.warn(
                    f"RewardSpec does not pickle ({e}); RewardPool falls back to threads, "
                    "which cannot kill a runaway reward function",
                    stacklevel=2,
                )
                backend = "thread"
            else:
                backend = "process"
        self.backend = backend
        if backend == "thread":
            # Threads share the spec object; only the config crosses the socket.
            payload = pickle.dumps((_SpecRef(spec), self.timeout_s, self.failure_value))
        self._payload = payload
        if backend in ("process", "thread"):
            self._workers = [self._new_worker() for _ in range(self.num_workers)]
            deadline = time.monotonic() + startup_timeout_s
            for w in self._workers:
                left = deadline - time.monotonic()
                if not w.conn.poll(max(left, 0.0)):
                    self.close()
                    raise RuntimeError(f"reward worker did not start within {startup_timeout_s}s")
                self._expect_ready(w.conn.recv())

    # -- workers ----------------------------------------------------------------------
    def _new_worker(self):
        return _ProcessWorker(self._payload) if self.backend == "process" else _ThreadWorker(self._payload)

    def _expect_ready(self, msg) -> None:
        if msg[0] == "error":
            self.close()
            raise RuntimeError(f"reward worker failed to start: {msg[1]}")

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.stop(kill=False)
        self._workers = []
        _SpecRef._live.pop(id(self.spec), None)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- scoring ----------------------------------------------------------------------
    def score(self, completions: Sequence[str], problems: Sequence[Any]) -> RewardResult:
        """Scores ``completions[i]`` against ``problems[i]`` for all i (see module doc)."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if len(completions) != len(problems):
            raise ValueError(
                f"completions has {len(completions)} entries but problems has {len(problems)}"
            )
        start = time.perf_counter()
        b, k = len(completions), len(self.spec)
        values = np.full((b, k), self.failure_value, dtype=np.float64)
        status = np.zeros((b, k), dtype=np.int8)
        errors: list[str] = []
        items = list(zip(completions, problems))
        if b and self.backend == "inline":
            self._score_inline(items, values, status, errors)
        elif b:
            try:
                self._score_workers(items, values, status, errors)
            except BaseException:
                self.close()  # workers may hold unfinished chunks; never reuse them
                raise
        components = values.astype(np.float32)
        return RewardResult(
            scores=self.spec.total(values).astype(np.float32),
            components=components,
            names=self.spec.names,
            failed=(status != OK).any(axis=1),
            failures=int((status == FAILED).sum()),
            timeouts=int((status == TIMED_OUT).sum()),
            errors=tuple(errors[:MAX_ERRORS]),
            seconds=time.perf_counter() - start,
        )

    def _score_inline(self, items, values, status, errors) -> None:
        alarm, previous = None, None
        if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            alarm = _Alarm()
            previous = signal.signal(signal.SIGALRM, alarm.handler)
        try:
            v, s, e = score_chunk(
                self.spec, items, failure_value=self.failure_value, timeout_s=self.timeout_s, alarm=alarm
            )
        finally:
            if alarm is not None:
                signal.signal(signal.SIGALRM, previous)
        values[:], status[:] = v, s
        errors.extend(e)

    def _score_workers(self, items, values, status, errors) -> None:
        b = len(items)
        size = self.chunk_size or max(1, math.ceil(b / (4 * self.num_workers)))
        pending = collections.deque(list(range(i, min(i + size, b))) for i in range(0, b, size))
        busy: dict[int, list] = {}  # worker slot -> [chunk_id, indices, last_progress, since]
        poll = min(0.05, self.timeout_s / 4)
        deadline_s = self.timeout_s + self.kill_grace_s
        while pending or busy:
            for slot, w in enumerate(self._workers):
                if slot not in busy and pending:
                    idx = pending.popleft()
                    # Ids are unique across calls, so stale progress never matches.
                    chunk_id = self._next_chunk_id
                    self._next_chunk_id = self._next_chunk_id % (2**31 - 1) + 1
                    try:
                        w.conn.send((chunk_id, [items[i] for i in idx]))
                    except OSError:
                        pending.appendleft(idx)
                        self._replace(slot)
                        continue
                    busy[slot] = [chunk_id, idx, None, time.monotonic()]
            by_conn = {self._workers[s].conn: s for s in busy}
            ready = wait(list(by_conn), timeout=poll)
            now = time.monotonic()
            for conn in ready:
                slot = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    entry = busy.pop(slot)
                    self._lost(slot, entry, FAILED, "worker process died", pending, values, status, errors)
                    continue
                if msg[0] == "ready":
                    continue
                if msg[0] == "error":
                    raise RuntimeError(f"reward worker failed to start: {msg[1]}")
                _, chunk_id, v, s, e = msg
                entry = busy.pop(slot)
                values[entry[1]], status[entry[1]] = v, s
                errors.extend(e)
            for slot in list(busy):
                if self._workers[slot].conn in ready:
                    continue
                entry = busy[slot]
                seen = self._workers[slot].progress.get()
                if seen != entry[2]:
                    entry[2], entry[3] = seen, now
                elif now - entry[3] > deadline_s:
                    busy.pop(slot)
                    reason = f"timed out after {self.timeout_s:g}s (worker killed)"
                    self._lost(slot, entry, TIMED_OUT, reason, pending, values, status, errors)

    def _lost(self, slot, entry, kind, reason, pending, values, status, errors) -> None:
        """A worker hung or died mid-chunk: blame the running call, resend the rest."""
        chunk_id, idx = entry[0], entry[1]
        k = len(self.spec)
        seen_chunk, call = self._workers[slot].progress.get()
        self._replace(slot)
        if seen_chunk == chunk_id and call // k < len(idx):
            i, comp = divmod(call, k)
            culprit = idx[i]
            status[culprit, :] = SKIPPED
            status[culprit, comp] = kind
            values[culprit, :] = self.failure_value
            rest = idx[:i] + idx[i + 1 :]
            if rest:
                pending.appendleft(rest)
            if len(errors) < MAX_ERRORS:
                errors.append(f"{self.spec.names[comp]}: {reason}")
        else:  # died before starting the chunk: nothing to blame, fail the whole chunk
            status[idx, :] = kind
            values[idx, :] = self.failure_value
            if len(errors) < MAX_ERRORS:
                errors.append(f"chunk of {len(idx)} samples: {reason} before scoring")

    def _replace(self, slot: int) -> None:
        self._workers[slot].stop(kill=True)
        self._workers[slot] = self._new_worker()
        self.restarts += 1


class _SpecRef:
    """Carries a spec to a thread worker through pickle without pickling it (same
    process): pickles to a registry id, unpickles to the original object."""

    _live: dict[int, RewardSpec] = {}

    def __init__(self, spec: RewardSpec):
        self.key = id(spec)
        _SpecRef._live[self.key] = spec

    def __reduce__(self):
        return (_SpecRef._lookup, (self.key,))

    @staticmethod
    def _lookup(key: int) -> RewardSpec:
        return _SpecRef._live[key]

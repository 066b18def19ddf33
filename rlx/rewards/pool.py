"""Reward worker pool: score a batch with host-side reward functions, isolating failures.

``RewardPool(spec)`` scores B ``(completion, problem)`` pairs and returns a
``RewardResult`` (``rlx.rewards.result``): weighted totals ``scores [B]`` float32 (what
the loop trains on), the per-component matrix ``components [B, K]`` float32 (for
GDPO-style multi-reward), a ``failed [B]`` mask and the counts ``failures`` (calls
that raised — any exception, ``SystemExit`` and a reward's own ``KeyboardInterrupt``
included —, returned a non-number / non-finite value / ``None`` / a string, or during
which the worker died), ``timeouts`` (calls past their limit) and ``crashes`` (worker
deaths: segfault, ``os._exit``, the memory limit), also per component. A failed or
timed-out call scores ``failure_value`` for its component; the total is always
``Σ_k w_k · components[:, k]``. Nothing a reward function does ends the run; a reward
that fails on *every* sample shows in ``result.all_failed``, and
``result.raise_if_all_failed()`` turns that into an error naming it.

Reward functions are per-sample ``fn(completion, problem) -> float`` or batched
``fn(completions, problems) -> list[float]`` (``@rlx.rewards.batched``); a batched
function is called once per chunk (below) with a time limit of ``timeout_s`` per sample
in the chunk. User functions are named by import path (``"my_rewards.brevity"``,
``"/tmp/x/my_rewards.py:brevity"``; ``rlx.rewards.references``) and each worker
imports them itself.

Backends (``backend=``, gin-configurable, default ``"auto"``):

- ``"process"``: ``num_workers`` fresh interpreters (``python -m
  rlx.rewards._worker_main``, started with ``subprocess`` rather than
  ``multiprocessing``, so a JAX parent is never forked), which inherit the parent's
  ``sys.path`` (and current directory) and import the reward modules by path. Each
  worker's address space is capped at ``memory_limit_mb`` (``RLIMIT_AS``; None for no
  cap), so a reward that allocates without bound gets a ``MemoryError`` or dies,
  and the trainer's memory is untouched. Timeouts are enforced twice: a per-call
  ``SIGALRM`` in the worker (the call raises, the worker lives on), and a parent
  watchdog that kills the worker (SIGKILL) when one call has run for its limit +
  ``kill_grace_s`` (a call stuck in C code, or one that blocks or ignores signals),
  scores that call as timed out, starts a replacement and re-sends the rest of its
  chunk. A worker that dies mid-call (segfault, ``os._exit``) is replaced the same
  way and the call counted as a crash. A worker process refuses to start another
  process pool (a training script imported by a worker without an
  ``if __name__ == "__main__":`` guard).
- ``"thread"``: worker threads, no memory cap. A thread cannot be killed: a call past
  the watchdog deadline is scored as timed out and its thread abandoned (it keeps
  running in the background until the call returns; a replacement thread takes its
  place), and ``os._exit`` or a segfault ends the trainer. Pure-Python rewards also
  contend for the GIL with the caller.
- ``"inline"``: in the calling thread, no workers; exceptions are isolated (except
  ``KeyboardInterrupt``, which is the user's Ctrl-C here), and timeouts use SIGALRM
  when called from the main thread (else there is none). For cheap, trusted rewards
  and debugging.
- ``"auto"``: ``"process"`` whenever the spec pickles for a worker (every component
  is a registered reward, an import path, or a module-level function — a function
  of the training script included), else ``"thread"`` with a warning (lambdas,
  closures).

Work is sent in chunks (``chunk_size``; default ``ceil(B / (4·num_workers))``, or
``ceil(B / num_workers)`` when a component is batched) so cheap functions pay one
message round trip per chunk, not per sample. Results keep input order. Use as a
context manager (``with RewardPool(spec) as pool:``) or call ``close()``.
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

from rlx.rewards import references
from rlx.rewards._pool_worker import (
    CRASHED,
    FAILED,
    MAX_ERRORS,
    OK,
    SKIPPED,
    TIMED_OUT,
    WORKER_ENV,
    Progress,
    _Alarm,
    score_chunk,
    serve_thread,
)
from rlx.rewards.result import RewardFailedError, RewardResult
from rlx.rewards.spec import RewardSpec

BACKENDS = ("auto", "process", "thread", "inline")
_UNBLAMED_RETRIES = 2  # re-sends of a chunk whose worker died before starting it

__all__ = ["BACKENDS", "RewardFailedError", "RewardPool", "RewardResult"]


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "worker process died"
    if code < 0:
        try:
            return f"worker process died ({signal.Signals(-code).name})"
        except ValueError:
            return f"worker process died (signal {-code})"
    return f"worker process died (exit code {code})"


class _ProcessWorker:
    """A ``python -m rlx.rewards._worker_main`` subprocess with a socket and progress cell."""

    def __init__(self, payload: bytes, memory_limit_bytes: int):
        parent_sock, child_sock = socket.socketpair()
        self._file = tempfile.TemporaryFile()
        self._file.truncate(8)
        self.progress = Progress(mmap.mmap(self._file.fileno(), 8))
        env = dict(os.environ)
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env[WORKER_ENV] = "1"
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")  # parallelism is the pool's; one BLAS thread per worker
        fds = (child_sock.fileno(), self._file.fileno())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlx.rewards._worker_main", *map(str, fds), str(memory_limit_bytes)],
            pass_fds=fds,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a kill takes the reward's children too
        )
        child_sock.close()
        self.started = time.monotonic()
        self.ready = False
        self.conn = Connection(parent_sock.detach())
        self.conn.send_bytes(payload)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_code(self, wait_s: float = 1.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, *, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                kill = True
        if kill and self.proc.poll() is None:
            try:  # not yet reaped, so the group id is still this worker's
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.progress.buf.close()
        self._file.close()


class _ThreadWorker:
    """A daemon thread running the same worker loop over a socket pair."""

    def __init__(self, payload: bytes, memory_limit_bytes: int = 0):
        a, b = socket.socketpair()
        self.conn = Connection(a.detach())
        self.progress = Progress(mmap.mmap(-1, 8))
        self.thread = serve_thread(Connection(b.detach()), self.progress)
        self.started = time.monotonic()
        self.ready = False
        self.conn.send_bytes(payload)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        return None

    def stop(self, *, kill: bool) -> None:
        # A thread cannot be killed: closing our end makes it exit after its current call.
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.thread.join(timeout=2.0)
        self.conn.close()


@dataclasses.dataclass
class _Chunk:
    idx: list[int]  # batch rows
    skip: frozenset[int] = frozenset()  # components already settled for these rows
    retries: int = 0


@dataclasses.dataclass
class _Running:
    chunk: _Chunk
    chunk_id: int
    seen: tuple[int, int] | None
    since: float
    sent: float


@gin.configurable(module="rlx.rewards")
class RewardPool:
    """Scores batches with a ``RewardSpec`` in isolated workers (see module docstring).

    Args:
      spec: the reward spec (K components).
      num_workers: worker processes / threads (ignored by ``"inline"``).
      timeout_s: time limit of one per-sample call (a batched call: ``timeout_s`` per
        sample of its chunk), in seconds.
      failure_value: the score of a call that failed or timed out.
      backend: ``"auto"``, ``"process"``, ``"thread"`` or ``"inline"``.
      chunk_size: samples per message (see module docstring for the default).
      kill_grace_s: extra time before the watchdog kills / abandons a stuck worker.
      startup_timeout_s: how long to wait for a worker process to start (import the
        reward modules).
      memory_limit_mb: address-space cap of each worker process (``RLIMIT_AS``), or
        None for none; ignored by the thread and inline backends.
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
        memory_limit_mb: float | None = 4096,
    ):
        self._closed = True  # until the workers exist: close() and __del__ are no-ops
        self._workers: list[Any] = []
        if not isinstance(spec, RewardSpec):
            raise ValueError(f"spec must be a RewardSpec, got {type(spec).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if not _positive(timeout_s):
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if isinstance(failure_value, bool) or not isinstance(failure_value, (int, float)) or \
                not math.isfinite(failure_value):
            raise ValueError(f"failure_value must be a finite number, got {failure_value!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if not _positive(kill_grace_s, allow_zero=True):
            raise ValueError(f"kill_grace_s must be >= 0, got {kill_grace_s!r}")
        if not _positive(startup_timeout_s):
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        if memory_limit_mb is not None and not _positive(memory_limit_mb):
            raise ValueError(f"memory_limit_mb must be > 0 or None, got {memory_limit_mb!r}")
        if backend in ("auto", "process") and os.environ.get(WORKER_ENV):
            raise RuntimeError(
                "a RewardPool was created inside a reward worker process: the training script "
                "was imported by a worker to load a reward defined in it; put the script's work "
                "under `if __name__ == \"__main__\":` or move the reward into a module"
            )
        self.spec = spec
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.failure_value = float(failure_value)
        self.chunk_size = chunk_size
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.memory_limit_mb = None if memory_limit_mb is None else float(memory_limit_mb)
        self.restarts = 0
        self._next_chunk_id = 1
        payload = None
        if backend in ("auto", "process"):
            try:
                payload = references.dumps((spec, self.timeout_s, self.failure_value))
            except Exception as e:  # noqa: BLE001 - pickling can raise many types
                if backend == "process":
                    raise ValueError(
                        "backend='process' needs a RewardSpec that pickles for a worker "
                        f"(registered names, import paths or module-level functions): {e}"
                    ) from e
                warnings.warn(
                    f"RewardSpec does not pickle ({e}); RewardPool falls back to threads, "
                    "which cannot kill a runaway reward function (name it by import path, "
                    "e.g. 'my_rewards.fn', to score it in worker processes)",
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
        self._closed = False
        # One batch at a time: two threads (an asynchronous rollout producer and the
        # trainer's evaluation) would otherwise read each other's replies.
        self._lock = threading.RLock()
        if backend in ("process", "thread"):
            self._workers = [self._new_worker() for _ in range(self.num_workers)]
            deadline = time.monotonic() + self.startup_timeout_s
            for w in self._workers:
                left = deadline - time.monotonic()
                try:
                    got = w.conn.poll(max(left, 0.0))
                    msg = w.conn.recv() if got else None
                except (EOFError, OSError):
                    code = w.exit_code()
                    self.close()
                    raise RuntimeError(f"reward worker failed to start: {_exit_reason(code)}") from None
                if msg is None:
                    self.close()
                    raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s:g}s")
                if msg[0] == "error":
                    self.close()
                    raise RuntimeError(f"reward worker failed to start: {msg[1]}")
                w.ready = True

    # -- workers ----------------------------------------------------------------------
    def _new_worker(self):
        if self.backend == "process":
            limit = 0 if self.memory_limit_mb is None else int(self.memory_limit_mb * 2**20)
            return _ProcessWorker(self._payload, limit)
        return _ThreadWorker(self._payload)

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
        """Scores ``completions[i]`` against ``problems[i]`` for all i (see module doc).

        Thread-safe: calls from several threads are scored one after the other."""
        with self._lock:
            return self._score(completions, problems)

    def _score(self, completions: Sequence[str], problems: Sequence[Any]) -> RewardResult:
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
        log = _ErrorLog(self.spec.names)
        items = list(zip(completions, problems))
        if b and self.backend == "inline":
            self._score_inline(items, values, status, log)
        elif b:
            try:
                self._score_workers(items, values, status, log)
            except BaseException:
                self.close()  # workers may hold unfinished chunks; never reuse them
                raise
        own = lambda kind: (status == kind).sum(axis=0).astype(np.int64)  # noqa: E731
        comp_failures = own(FAILED) + own(CRASHED)
        comp_timeouts = own(TIMED_OUT)
        return RewardResult(
            scores=self.spec.total(values).astype(np.float32),
            components=values.astype(np.float32),
            names=self.spec.names,
            failed=(status != OK).any(axis=1),
            failures=int(comp_failures.sum()),
            timeouts=int(comp_timeouts.sum()),
            errors=tuple(log.lines),
            seconds=time.perf_counter() - start,
            crashes=int((status == CRASHED).sum()),
            component_failures=comp_failures,
            component_timeouts=comp_timeouts,
            component_errors=tuple(log.first),
        )

    def _score_inline(self, items, values, status, log) -> None:
        alarm, previous = None, None
        if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            alarm = _Alarm()
            previous = signal.signal(signal.SIGALRM, alarm.handler)
        try:
            v, s, e = score_chunk(
                self.spec, items, failure_value=self.failure_value, timeout_s=self.timeout_s,
                alarm=alarm, isolate_interrupts=False,
            )
        finally:
            if alarm is not None:
                signal.signal(signal.SIGALRM, previous)
        values[:], status[:] = v, s
        for k, msg in e:
            log.add(k, msg)

    def _chunk_size(self, b: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        per = self.num_workers if any(self.spec.batched) else 4 * self.num_workers
        return max(1, math.ceil(b / per))

    def _limit(self, run: _Running) -> float:
        """Time limit of the call the worker is in (batched calls: per sample)."""
        n, k = len(run.chunk.idx), len(self.spec)
        seen = run.seen
        if seen is not None and seen[0] == run.chunk_id and seen[1] >= n * k:
            return self.timeout_s * n
        return self.timeout_s

    def _score_workers(self, items, values, status, log) -> None:
        b = len(items)
        size = self._chunk_size(b)
        pending = collections.deque(_Chunk(list(range(i, min(i + size, b)))) for i in range(0, b, size))
        busy: dict[int, _Running] = {}  # worker slot -> the chunk it is scoring
        poll = min(0.05, self.timeout_s / 4)
        while pending or busy:
            for slot in range(len(self._workers)):
                if slot in busy or not pending:
                    continue
                if not self._workers[slot].alive():  # died while idle
                    self._replace(slot)
                w = self._workers[slot]
                chunk = pending.popleft()
                # Ids are unique across calls, so stale progress never matches.
                chunk_id = self._next_chunk_id
                self._next_chunk_id = self._next_chunk_id % (2**31 - 1) + 1
                try:
                    w.conn.send((chunk_id, [items[i] for i in chunk.idx], tuple(sorted(chunk.skip))))
                except OSError:
                    pending.appendleft(chunk)
                    self._replace(slot)
                    continue
                sent = time.monotonic()
                busy[slot] = _Running(chunk, chunk_id, None, sent, sent)
            by_conn = {self._workers[s].conn: s for s in busy}
            ready = wait(list(by_conn), timeout=poll)
            now = time.monotonic()
            for conn in ready:
                slot = by_conn[conn]
                w = self._workers[slot]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    run = busy.pop(slot)
                    reason = _exit_reason(w.exit_code())
                    self._lost(slot, run, CRASHED, reason, pending, values, status, log)
                    continue
                if msg[0] == "ready":  # a replacement finished importing: start its clock now
                    w.ready = True
                    busy[slot].seen, busy[slot].since = None, now
                    continue
                if msg[0] == "error":
                    raise RuntimeError(f"reward worker failed to start: {msg[1]}")
                _, chunk_id, v, s, e = msg
                run = busy.pop(slot)
                if chunk_id != run.chunk_id:     # never expected: say so instead of mixing
                    raise RuntimeError(f"reward worker {slot} replied for chunk {chunk_id} "
                                       f"while scoring chunk {run.chunk_id}")
                cols = [c for c in range(len(self.spec)) if c not in run.chunk.skip]
                rows = np.asarray(run.chunk.idx)
                values[np.ix_(rows, cols)] = v[:, cols]
                status[np.ix_(rows, cols)] = s[:, cols]
                for k, m in e:
                    log.add(k, m)
            for slot in list(busy):
                w = self._workers[slot]
                if w.conn in ready:
                    continue
                run = busy[slot]
                if not w.ready:
                    if now - max(w.started, run.sent) > self.startup_timeout_s:
                        busy.pop(slot)
                        reason = f"worker did not start within {self.startup_timeout_s:g}s"
                        self._lost(slot, run, FAILED, reason, pending, values, status, log)
                    continue
                seen = w.progress.get()
                if seen != run.seen:
                    run.seen, run.since = seen, now
                elif now - run.since > self._limit(run) + self.kill_grace_s:
                    busy.pop(slot)
                    reason = f"timed out after {self._limit(run):g}s (worker killed)"
                    self._lost(slot, run, TIMED_OUT, reason, pending, values, status, log)

    def _lost(self, slot, run: _Running, kind, reason, pending, values, status, log) -> None:
        """A worker hung or died mid-chunk: blame the running call, resend the rest."""
        chunk, k_count = run.chunk, len(self.spec)
        n = len(chunk.idx)
        w = self._workers[slot]
        was_ready = w.ready
        seen_chunk, call = w.progress.get()
        self._replace(slot)
        open_cols = [c for c in range(k_count) if c not in chunk.skip]
        if seen_chunk == run.chunk_id and n * k_count <= call < (n + 1) * k_count:
            # A batched call: that component fails for the whole chunk; the others are re-run.
            comp = call - n * k_count
            status[chunk.idx, comp] = kind
            values[chunk.idx, comp] = self.failure_value
            log.add(comp, reason)
            skip = chunk.skip | {comp}
            if len(skip) < k_count:
                pending.appendleft(_Chunk(chunk.idx, skip, chunk.retries))
        elif seen_chunk == run.chunk_id and call < n * k_count:
            i, comp = divmod(call, k_count)
            culprit = chunk.idx[i]
            status[culprit, open_cols] = SKIPPED
            status[culprit, comp] = kind
            values[culprit, open_cols] = self.failure_value
            log.add(comp, reason)
            rest = chunk.idx[:i] + chunk.idx[i + 1:]
            if rest:
                pending.appendleft(_Chunk(rest, chunk.skip, chunk.retries))
        elif was_ready and kind == CRASHED and chunk.retries < _UNBLAMED_RETRIES:
            # Died before it began this chunk (e.g. a reward's background thread): resend.
            pending.appendleft(_Chunk(chunk.idx, chunk.skip, chunk.retries + 1))
        else:  # nothing to blame: fail the whole chunk
            rows = np.asarray(chunk.idx)
            status[np.ix_(rows, open_cols)] = kind
            values[np.ix_(rows, open_cols)] = self.failure_value
            for c in open_cols:
                log.add(c, f"{reason} before scoring a chunk of {n} samples")

    def _replace(self, slot: int) -> None:
        self._workers[slot].stop(kill=True)
        self._workers[slot] = self._new_worker()
        self.restarts += 1


class _ErrorLog:
    """The first message of each component, and up to ``MAX_ERRORS`` lines overall."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.first = [""] * len(names)
        self.lines: list[str] = []

    def add(self, k: int, message: str) -> None:
        if not self.first[k]:
            self.first[k] = message
        if len(self.lines) < MAX_ERRORS:
            self.lines.append(f"{self.names[k]}: {message}")


def _positive(x: Any, *, allow_zero: bool = False) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return False
    return x >= 0 if allow_zero else x > 0


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

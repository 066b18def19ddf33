"""Asynchronous off-policy RL: a rollout producer runs ahead of the trainer with
bounded staleness, optional partial rollouts and exact old logits.

``AsyncRLTrainer`` is an ``RLTrainer`` whose ``collect`` takes the batch of iteration
i from a rollout producer (a host thread; JAX's asynchronous dispatch lets its
sampling overlap the trainer's compiled update) instead of sampling it in place.
Everything after ``collect`` — ``iteration_batch``, the one compiled ``update_step``,
metrics, logging, evaluation — is the engine's own.

Versions. Policy version v is the parameters after v optimizer iterations (v = 0:
the starting ones); batch j is consumed by iteration j, whose update turns version j
into j + 1. Every completion token carries the version that sampled it
(``VersionedRollout.versions`` [B, T], −1 off the completion). The trainer consumes
batch j only if every loss token has j − k ≤ version ≤ j (k = ``max_staleness``),
else it stops with ``StalenessError``; the producer is gated so that this holds by
construction (it starts batch j only once version ≥ j − k exists).

Schedules (``AsyncConfig.schedule``). A batch is generated in units: one unit
(the whole batch, with every DAPO dynamic-sampling round) or, with partial rollouts,
C = ⌈max_new_tokens / chunk_tokens⌉ chunks of decode steps.
  "fixed" (deterministic, default): unit c of batch j needs version
      u(j, c) = max(0, j − k + ⌊min(c, C−1)·k / C⌋);
    the producer walks versions v = 0, 1, 2, … and at version v runs, in batch
    order, every unit with u ≤ v not yet run, with exactly version v's weights. Which
    weights produce which tokens is a function of (j, c) alone, so the run is
    reproducible bitwise on CPU whatever the thread timing (k = 0: batch j with
    version j, the synchronous loop; k ≥ 1 without partial rollouts: batch j with
    version j − k; with partial rollouts the chunks of batch j spread over versions
    j − k … j − 1, i.e. a generation still running when version v + 1 arrives
    continues under it).
  "free": the producer runs as fast as it can: batch j starts once version ≥ j − k
    is published, each unit uses the newest version at its start. Throughput-optimal,
    not reproducible.

Placement (``AsyncConfig.placement``). "shared": the producer samples on the
trainer's mesh (interleaved with the updates). "split": a rollout mesh and a
training mesh carved from the devices (``rollout_devices``; e.g. 4 + 4 of 8).
Publishing version v copies the trainer's parameters into the rollout layout
(``jax.device_put`` to the rollout shardings, never aliasing the trainer's buffers,
which the next update donates), verifies them with ``checkpoint.state_digest`` on
both sides, and only then makes them visible to the producer. A transfer that raises,
does not finish within ``publish_timeout_s`` or whose checksums differ stops the run
with ``WeightTransferError`` (naming the version and the differing leaves); the
producer never samples from a version that did not verify.

Partial rollouts. A chunk calls ``rlx.sampling.generate`` with the tokens so far as
the forced prefix (the user's ``completion_prefix`` tokens included) and the loop
limit moved ``chunk_tokens`` further; the same PRNG key is used for every chunk, so
token t is drawn with the same key whatever chunk draws it, and with unchanged
weights a chunked generation equals the one-shot one bitwise. The prefix is
re-encoded under the new weights (as AReaL's interruptible generation does: the old
KV entries belong to the old policy). The sampler log-prob, the policy log-prob and
the version of a token come from the chunk that sampled it, never from the forced
pass that re-feeds it. Rows that stopped are not continued (the chunk's tokens past
their end are discarded).

Old logits (``AsyncConfig.old_logits``; arXiv 2605.12070, ``rlx.objectives.offpolicy``).
"sampler": the objective sees ``sampler_logp`` = the inference-side log-probs at the
tokens' versions and the engine's ``old_logp`` at the consuming version, so an
``is_correction`` acts on the entangled ratio (discrepancy × staleness). "exact": the
producer also runs the trainer's teacher-forced forward with each chunk's own weights
(snapshot-based version tracking: the exact old logits π_train(v_b)), the trainer
masks the tokens whose same-version discrepancy π_train(v_b)/π_infer(v_b) leaves
``discrepancy_band`` (dropped from the loss mask) and hands the objective these exact
old logits in the ``sampler_logp`` slot, so a composed ``is_correction`` (e.g.
``offpolicy.truncated_is``) corrects the staleness factor π_old(v_now)/π_train(v_b)
alone. (The engine has one behaviour-log-prob field; a second one,
``behaviour_logp``, would let ``offpolicy.decoupled_is_weights`` run inside the
objective instead.) "ewma" (the seed paper's approximate route, a revised PPO-EWMA;
formula and reading in ``rlx.objectives.offpolicy``): no old logits are computed; the
trainer keeps θ̄, the bias-corrected EWMA of the parameter versions with decay β =
``ewma_decay`` (default k/(k+1)), as ``offpolicy.ewma_init`` / ``ewma_update`` state
beside the policy state (saved in the checkpoint as ``"ewma"``). Inside the one
compiled update of iteration i it computes the proximal log-probs π_prox =
π_train(θ̄_i) (θ̄_i covers versions 0..i), drops the tokens whose π_prox/π_infer leaves
``discrepancy_band`` from the loss mask (``offpolicy.ewma_decoupled_weights``), runs
the engine's update with the objective's ``old_logp`` = π_prox (the PPO clip is
centred on the EWMA policy) and ``sampler_logp`` = π_infer (a composed
``is_correction`` weighs π_prox/π_infer), then advances θ̄ by version i + 1. β = 0
makes θ̄ the current parameters bitwise: the "sampler" route with the separate
old-policy pass (``RLConfig.recompute_old_logp``) and the band.

Checkpoints. Before a save the producer is brought to a deterministic point: in the
fixed schedule, every unit needing a version older than the trainer's is done and it
is between units; in the free schedule, between units. The in-flight queue (finished
batches and partial generations: tokens, log-probs, versions, rewards, texts) is
saved in the checkpoint's ``extra`` (covered by its SHA-256 metadata digest), the
data-iterator state saved is the one before the first queued batch (what a
synchronous run would save), and the queued batches' problems are drawn again on
restore and compared with a digest. A restored run therefore continues with exactly
the state it had; killed and restarted on CPU with the fixed schedule it reproduces
the uninterrupted run's parameters bitwise.

Logged per iteration: ``async/lag_mean``, ``async/lag_max`` (version lag of the loss
tokens), ``async/multi_version_rows`` (rows sampled by more than one version),
``async/wait_s`` (the trainer waiting for rollouts), ``async/ready_batches``,
``async/publish_s``; with ``monitor_mismatch`` the objective's ``offpolicy/gap_*``
and ``offpolicy/kl_k3`` (sampler–trainer log-prob gap inside the compiled update);
with exact old logits ``offpolicy/discrepancy_masked`` and
``offpolicy/discrepancy_gap_abs_mean``; with "ewma" ``offpolicy/proximal_masked``,
``offpolicy/proximal_gap_abs_mean`` (|log π_prox − log π_infer|), ``ewma/age`` (mean
age of the proximal policy in versions, to compare with ``async/lag_mean``),
``ewma/weight`` and ``ewma/param_gap`` (‖θ − θ̄‖ / ‖θ‖), and the ``offpolicy/gap_*`` /
``ratio/*`` metrics then measure π_prox against π_infer and π_θ against π_prox; the
objective's own ``is/frac_corrected``.

Shapes: P prompts, G group size, B = P·G rows, T completion bucket, Sp prompt bucket.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import math
import threading
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlx import sharding as sh
from rlx.objectives import offpolicy
from rlx.sampling.buckets import bucket_length
from rlx.sampling.generate import generate
from rlx.sampling.rollout import Rollout
from rlx.train import checkpoint as ckpt_lib
from rlx.train import steps as steps_lib
from rlx.train.batches import Sequences
from rlx.train.rl import Collected, RLTrainer

log = logging.getLogger("rlx.async")

PLACEMENTS = ("shared", "split")
SCHEDULES = ("fixed", "free")
OLD_LOGITS = ("sampler", "exact", "ewma")
QUEUE_KEY = "async_queue"        # key of the in-flight queue in a checkpoint's extra
QUEUE_FORMAT = 1


@gin.configurable(module="rlx.train")
@dataclasses.dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous rollouts (module docstring).

    Attributes:
      max_staleness: k ≥ 0; every consumed token was sampled by a version at most k
        behind the one being trained (0: the synchronous loop, bitwise).
      placement: "shared" (the trainer's devices) or "split" (separate meshes).
      rollout_devices: "split": devices of the rollout mesh (default: half; with an
        explicit training ``mesh``, taken from the devices outside it).
      partial_rollouts: generate in chunks; a chunk after a new version continues
        the generation under it.
      chunk_tokens: decode steps per chunk (default ⌈max_new_tokens / max(k, 1)⌉).
      schedule: "fixed" (deterministic) or "free" (as fast as possible).
      old_logits: "sampler", "exact" (exact behaviour-version trainer log-probs) or
        "ewma" (the revised PPO-EWMA proximal policy stands in for them).
      discrepancy_band / discrepancy_level: "exact": the band of the same-version
        ratio π_train/π_infer outside which tokens (level "token") or rows
        ("sequence", "geometric") leave the loss; "ewma": the same band on the
        approximate ratio π_prox/π_infer.
      ewma_decay: "ewma" only: β of the proximal parameters' EWMA over policy
        versions, 0 <= β < 1 (None: k/(k+1), so that the EWMA's mean age β/(1−β)
        tends to k versions, the staleness bound; 0: the proximal policy is the current one).
      publish_timeout_s: a weight transfer taking longer stops the run.
      batch_timeout_s: waiting longer for a batch (or for the checkpoint barrier)
        stops the run (None: no limit).
      monitor_mismatch: log the sampler–trainer gap from inside the update
        (``offpolicy.monitored``).
    """

    max_staleness: int = 0
    placement: str = "shared"
    rollout_devices: int | None = None
    partial_rollouts: bool = False
    chunk_tokens: int | None = None
    schedule: str = "fixed"
    old_logits: str = "sampler"
    discrepancy_band: tuple[float, float] = (0.5, 2.0)
    discrepancy_level: str = "token"
    ewma_decay: float | None = None
    publish_timeout_s: float = 120.0
    batch_timeout_s: float | None = None
    monitor_mismatch: bool = True

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"AsyncConfig.{field}={getattr(self, field)!r}: {why}")

        def integer(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not integer(self.max_staleness) or self.max_staleness < 0:
            bad("max_staleness", "must be an integer >= 0")
        for field, allowed in (("placement", PLACEMENTS), ("schedule", SCHEDULES),
                               ("old_logits", OLD_LOGITS),
                               ("discrepancy_level", offpolicy.LEVELS)):
            if getattr(self, field) not in allowed:
                bad(field, f"expected one of {allowed}")
        for field in ("rollout_devices", "chunk_tokens"):
            x = getattr(self, field)
            if x is not None and (not integer(x) or x < 1):
                bad(field, "must be an integer >= 1 or None")
        band = tuple(self.discrepancy_band)
        if len(band) != 2 or not 0 <= band[0] < band[1]:
            bad("discrepancy_band", "must be (low, high) with 0 <= low < high")
        object.__setattr__(self, "discrepancy_band", (float(band[0]), float(band[1])))
        if self.ewma_decay is not None:
            x = self.ewma_decay
            if (isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating))
                    or not 0.0 <= float(x) < 1.0):
                bad("ewma_decay", "must be a number with 0 <= ewma_decay < 1, or None")
            if self.old_logits != "ewma":
                bad("ewma_decay", f"is only used with old_logits='ewma' (old_logits="
                    f"{self.old_logits!r})")
            object.__setattr__(self, "ewma_decay", float(x))
        if not self.publish_timeout_s > 0:
            bad("publish_timeout_s", "must be > 0")
        if self.batch_timeout_s is not None and not self.batch_timeout_s > 0:
            bad("batch_timeout_s", "must be > 0 or None")

    @property
    def proximal_decay(self) -> float:
        """β of the "ewma" mode: ``ewma_decay``, or k/(k+1) when it is None."""
        if self.ewma_decay is not None:
            return self.ewma_decay
        k = self.max_staleness
        return k / (k + 1.0)


class AsyncRLError(RuntimeError):
    """Base class of the errors that stop an asynchronous run."""


class WeightTransferError(AsyncRLError):
    """Publishing a policy version to the rollout devices failed, timed out or did
    not verify; the producer never saw that version."""


class StalenessError(AsyncRLError):
    """A batch would be consumed with tokens older than ``max_staleness`` versions."""


class ProducerError(AsyncRLError):
    """The rollout producer failed, stopped early or did not answer in time."""


@struct.dataclass
class VersionedRollout(Rollout):
    """A ``Rollout`` (host arrays) with the behaviour version of every token.

    versions: [B, T] int32 policy version that sampled each completion token (forced
      prefix tokens: the version of the chunk that fed them), −1 off the completion.
    behaviour_logp: [B, T] f32 trainer log-probs (teacher-forced, at the trainer's
      temperature) under each token's own version (exact old logits), or None.
    """

    versions: Any = None
    behaviour_logp: Any = None


@dataclasses.dataclass(frozen=True)
class Published:
    """A verified copy of policy version ``version`` in the rollout layout."""

    version: int
    params: Any
    digest: tuple[int, ...] = ()


@dataclasses.dataclass
class Generation:
    """One rollout batch in the making (producer-owned).

    index: batch j (consumed by iteration j). chunk: units done. done: finished.
    stream_state: the problem stream's state before the batch drew its problems.
    draws: the sizes of its ``stream.next_batch`` calls; problems: what they gave.
    arrays: partial-rollout progress (host arrays, module docstring).
    metrics: producer-side timings. result: the finished batch (``ReadyBatch``).
    """

    index: int
    chunk: int = 0
    done: bool = False
    stream_state: dict | None = None
    draws: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)
    arrays: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    result: Any = None


@dataclasses.dataclass
class ReadyBatch:
    """A finished batch: the ``Collected`` the engine reads, and what a checkpoint
    needs to restore it (the stream state before it, its draws, every problem drawn
    in draw order, and which drawn problem each kept group is)."""

    collected: Collected
    stream_state: dict | None
    draws: list
    problem_index: list
    drawn: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Snapshot:
    """The producer's queue at a barrier: finished and in-flight batches."""

    version: int
    next_batch: int
    ready: dict
    inflight: dict


class _Stopped(Exception):
    pass


# ============================================================ the scheduling core
class RolloutPipeline:
    """Thread-safe rollout schedule between one producer thread and the trainer.

    ``work`` does the rollouts: ``start(j) -> Generation``, ``advance(gen,
    published)`` (runs one unit with those weights, increments ``gen.chunk``, sets
    ``gen.done`` after the last one) and ``finish(gen) -> item``. ``units`` = C units
    per batch, ``steps`` batches in all. The trainer calls ``publish``, ``take``,
    ``barrier`` / ``release`` and ``stop``.
    """

    def __init__(self, work, *, max_staleness: int, schedule: str, units: int, steps: int,
                 version: int = 0, next_batch: int = 0, ready: dict | None = None,
                 inflight: dict | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
        if units < 1:
            raise ValueError(f"units={units}: must be >= 1")
        self.work, self.k, self.schedule = work, int(max_staleness), schedule
        self.units, self.steps = int(units), int(steps)
        self.version = int(version)          # fixed: the version being processed
        self.next_batch = int(next_batch)
        self.ready: dict = dict(ready or {})
        self.inflight: dict = dict(inflight or {})
        self.newest_used = -1
        self._published: dict[int, Published] = {}
        self._cond = threading.Condition()
        self._pause, self._pause_target = False, 0
        self._idle = self._stop = self._finished = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def required(self, j: int, c: int) -> int:
        """u(j, c): the version unit c of batch j needs in the fixed schedule."""
        return max(0, j - self.k + (min(c, self.units - 1) * self.k) // self.units)

    # ------------------------------------------------------------- trainer side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="rlx-rollout-producer",
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def publish(self, published: Published) -> None:
        with self._cond:
            self._published[published.version] = published
            if self.schedule == "free":      # only the newest is ever used
                for v in [v for v in self._published if v < published.version]:
                    del self._published[v]
            self._cond.notify_all()

    def take(self, j: int, timeout: float | None = None):
        """Batch j (blocking), and the number of finished batches still queued."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while j not in self.ready:
                self._raise_if_failed()
                if self._finished:
                    raise ProducerError(f"the rollout producer stopped before batch {j}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ProducerError(f"no rollout batch {j} after {timeout} s "
                                        "(AsyncConfig.batch_timeout_s)")
                self._cond.wait(left)
            return self.ready.pop(j), len(self.ready)

    def barrier(self, version: int, timeout: float | None = None) -> Snapshot:
        """Pauses the producer at a deterministic point for a checkpoint of version
        ``version`` (fixed: every unit needing an older version done, between units;
        free: between units) and returns the queue; ``release()`` resumes it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._pause, self._pause_target = True, int(version)
            self._cond.notify_all()
            while not (self._finished or (self._idle and self._may_pause())):
                self._raise_if_failed()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._pause = False
                    raise ProducerError(f"the rollout producer did not reach the checkpoint "
                                        f"barrier of version {version} within {timeout} s")
                self._cond.wait(left)
            self._raise_if_failed()
            return Snapshot(version=self.version, next_batch=self.next_batch,
                            ready=dict(self.ready), inflight=dict(self.inflight))

    def release(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ProducerError(f"the rollout producer failed: {type(self._error).__name__}: "
                                f"{self._error}") from self._error

    # ------------------------------------------------------------ producer side
    def _main(self) -> None:
        try:
            (self._run_fixed if self.schedule == "fixed" else self._run_free)()
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the trainer
            log.error("rollout producer failed: %s: %s", type(err).__name__, err)
            with self._cond:
                self._error = err
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _may_pause(self) -> bool:
        return self.schedule == "free" or self.version >= self._pause_target

    def _boundary(self) -> None:
        """Between two units: stop, or wait while a barrier holds the producer here."""
        with self._cond:
            while self._pause and self._may_pause() and not self._stop:
                self._idle = True
                self._cond.notify_all()
                self._cond.wait()
            self._idle = False
            if self._stop:
                raise _Stopped

    def _wait(self, ready_fn) -> Published:
        with self._cond:
            while not self._stop and (got := ready_fn()) is None:
                self._idle = True
                self._cond.notify_all()
                self._cond.wait()
            self._idle = False
            if self._stop:
                raise _Stopped
            return got

    def _newest(self) -> Published | None:
        return self._published[max(self._published)] if self._published else None

    def _finish(self, j: int, gen: Generation) -> None:
        item = self.work.finish(gen)
        with self._cond:
            self.ready[j] = item
            del self.inflight[j]
            self._cond.notify_all()

    def _open(self, j: int) -> Generation:
        gen = self.work.start(j)
        with self._cond:
            self.inflight[j] = gen
            self.next_batch = j + 1
        return gen

    def _run_unit(self, gen: Generation, weights) -> None:
        """One unit of ``gen`` after the boundary check, with ``weights()``'s version
        (read after a pause, so the free schedule takes the newest)."""
        self._boundary()
        pub = weights()
        self.newest_used = max(self.newest_used, pub.version)
        self.work.advance(gen, pub)

    def _run_fixed(self) -> None:
        while self.next_batch < self.steps or self.inflight:
            v = self.version
            pub = self._wait(lambda: self._published.get(v))
            j = min(self.inflight, default=self.next_batch)
            while j <= min(v + self.k, self.steps - 1):
                gen = self.inflight.get(j)
                if gen is None:
                    if j < self.next_batch:          # finished already
                        j += 1
                        continue
                    if self.required(j, 0) > v:
                        break
                    gen = self._open(j)
                while not gen.done and self.required(j, gen.chunk) <= v:
                    self._run_unit(gen, lambda: pub)
                if gen.done:
                    self._finish(j, gen)
                j += 1
            with self._cond:
                self.version = v + 1
                for old in [u for u in self._published if u <= v]:
                    del self._published[old]

    def _run_free(self) -> None:
        while True:
            j = min(self.inflight, default=self.next_batch)
            if j >= self.steps:
                return
            gen = self.inflight.get(j)
            if gen is None:
                floor = j - self.k
                self._wait(lambda: (self._newest() if self._published
                                    and max(self._published) >= floor else None))
                gen = self._open(j)
            while not gen.done:
                self._run_unit(gen, lambda: self._wait(self._newest))
            self._finish(j, gen)


# ================================================================ the trainer
def split_meshes(mesh, rollout_devices: int | None):
    """(training mesh, rollout mesh) carved from ``jax.devices()``: without ``mesh``
    the last ``rollout_devices`` (default half) devices roll out and the others train
    (both data-parallel); with ``mesh`` the rollout mesh takes devices outside it."""
    devices = jax.devices()
    if mesh is None:
        n = len(devices)
        r = rollout_devices if rollout_devices is not None else n // 2
        if n < 2 or not 1 <= r < n:
            raise ValueError(f"placement='split' needs at least one training and one "
                             f"rollout device: {n} devices, rollout_devices={rollout_devices}")
        return sh.make_mesh(devices=devices[:n - r]), sh.make_mesh(devices=devices[n - r:])
    used = set(mesh.devices.flat)
    free = [d for d in devices if d not in used]
    r = rollout_devices if rollout_devices is not None else len(free)
    if not 1 <= r <= len(free):
        raise ValueError(f"placement='split': the training mesh uses {len(used)} of "
                         f"{len(devices)} devices, leaving {len(free)} for rollouts; "
                         f"rollout_devices={rollout_devices}")
    return mesh, sh.make_mesh(devices=free[:r])


class _Work:
    """The trainer's rollout work, as the pipeline calls it (producer thread)."""

    def __init__(self, trainer: "AsyncRLTrainer"):
        self.t = trainer

    def start(self, j: int) -> Generation:
        return Generation(index=j)

    def advance(self, gen: Generation, pub: Published) -> None:
        if self.t.units == 1:
            self.t._collect_whole(gen, pub)
        else:
            self.t._advance_chunk(gen, pub)

    def finish(self, gen: Generation) -> ReadyBatch:
        return gen.result


def _problem_digest(problems) -> str:
    text = repr([(q.prompt, q.answer, q.meta) for q in problems])
    return hashlib.sha256(text.encode()).hexdigest()


def _enc(x) -> dict:
    a = np.ascontiguousarray(np.asarray(x))
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _dec(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"])).reshape(
        d["shape"]).copy()


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _proximal_objective(objective):
    """``objective`` for the "ewma" update: its batches carry ``sampler_logp`` as
    [B, T, 2] = (proximal log-probs, sampler log-probs) (``AsyncRLTrainer._ewma_update``
    stacks them inside the compiled update); the wrapped loss sees ``old_logp`` = the
    proximal (EWMA) log-probs and ``sampler_logp`` = the sampler's, so the PPO clip is
    centred on π_prox and a composed ``is_correction`` weighs π_prox/π_infer."""
    inner = objective.loss

    def loss(outputs, batch, state, *, axis_name=None):
        slot = batch.sampler_logp
        if slot is None or slot.ndim != 3 or slot.shape[-1] != 2:
            raise ValueError("the 'ewma' objective needs sampler_logp [B, T, 2] (proximal, "
                             f"sampler); got {None if slot is None else slot.shape}")
        batch = batch.replace(old_logp=slot[..., 0], sampler_logp=slot[..., 1])
        return inner(outputs, batch, state, axis_name=axis_name)

    return objective._replace(loss=loss, needs=frozenset(objective.needs) | {"sampler_logp"})


class AsyncRLTrainer(RLTrainer):
    """``RLTrainer`` with rollouts produced ahead by a host thread (module docstring).

    Takes every ``RLTrainer`` argument plus ``async_config``. With ``placement
    ="split"`` the given ``mesh`` (or one carved from the devices) is the training
    mesh and ``rollout_mesh`` holds the producer's devices.
    """

    def __init__(self, *, async_config: AsyncConfig | None = None, mesh=None, objective,
                 **kwargs):
        cfg = async_config if async_config is not None else AsyncConfig()
        rollout_mesh = None
        if cfg.placement == "split":
            mesh, rollout_mesh = split_meshes(mesh, cfg.rollout_devices)
        if cfg.monitor_mismatch:
            objective = offpolicy.monitored(objective)
        if cfg.old_logits == "ewma":
            objective = _proximal_objective(objective)
        super().__init__(mesh=mesh, objective=objective, **kwargs)
        self.async_config = cfg
        self.rollout_mesh = rollout_mesh if rollout_mesh is not None else self.mesh
        if self.config.dynamic_sampling and cfg.partial_rollouts:
            raise ValueError("AsyncConfig.partial_rollouts with RLConfig.dynamic_sampling is "
                             "not supported (a dynamic-sampling round is not split in chunks)")
        if cfg.max_staleness > 0 and jax.process_count() > 1:
            raise ValueError("AsyncConfig.max_staleness > 0 needs a single process: on a "
                             "multi-host run the producer thread and the trainer would issue "
                             "their collectives in a different order on each host")
        if cfg.old_logits in ("exact", "ewma") and self.sampler.greedy:
            raise ValueError(f"AsyncConfig.old_logits={cfg.old_logits!r} compares sampler and "
                             "trainer log-probs; greedy sampling (temperature 0) has none")
        k, n = cfg.max_staleness, self.sampler.max_new_tokens
        self.chunk_tokens = cfg.chunk_tokens or math.ceil(n / max(k, 1))
        self.units = math.ceil(n / self.chunk_tokens) if cfg.partial_rollouts else 1
        self.completion_width = bucket_length(n, self.sampler.completion_buckets,
                                              name="max_new_tokens")
        self._rollout_shardings = sh.param_shardings(self.state.params, self.rollout_mesh)
        self._pipeline: RolloutPipeline | None = None
        self._restored: dict = {}
        self._base_key = None
        self._last_publish_s = 0.0
        self._published_version = -1
        t, tau = self.completion_width, self.logprob_temperature

        def behaviour(params, seq):
            return steps_lib.token_outputs(self.graphdef, params, seq, t, temperature=tau).logp
        self._behaviour_fn = jax.jit(behaviour)
        # "ewma": the proximal parameters' EWMA state, in the parameters' layout
        self._ewma = self._ewma_shardings = None
        if cfg.old_logits == "ewma":
            self._ewma_shardings = {"params": self.state_shardings.params,
                                    "weight": sh.replicated(self.mesh),
                                    "age": sh.replicated(self.mesh)}
            self._ewma = sh.place(offpolicy.ewma_init(self.state.params), self._ewma_shardings)

    # ------------------------------------------------------------ publishing
    def _transfer(self, params):
        """Training layout → rollout layout (a copy: the next update donates the
        trainer's buffers). Tests replace this to inject failures."""
        return jax.device_put(params, self._rollout_shardings, may_alias=False)

    def _fail(self, err: BaseException, cause: BaseException | None = None) -> None:
        """Stops the producer (it never sees the failed version), then raises ``err``."""
        if self._pipeline is not None:
            self._pipeline.stop(timeout=5.0)
        raise err from cause

    def _publish(self, version: int) -> None:
        """Copies the current parameters to the rollout layout as ``version``,
        verifies the copy and hands it to the producer (module docstring)."""
        pipe = self._pipeline
        if pipe is None or version >= self.config.steps or version <= self._published_version:
            return
        t0 = time.perf_counter()
        params, box = self.state.params, {}
        timeout = self.async_config.publish_timeout_s

        def transfer():
            try:
                dst = jax.block_until_ready(self._transfer(params))
                box["result"] = (dst, ckpt_lib.state_digest(params), ckpt_lib.state_digest(dst))
            except BaseException as err:  # noqa: BLE001 - re-raised on the trainer thread
                box["error"] = err

        worker = threading.Thread(target=transfer, name=f"rlx-publish-{version}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            self._fail(WeightTransferError(
                f"publishing policy version {version} to the rollout devices did not finish "
                f"within {timeout} s (AsyncConfig.publish_timeout_s); the run is stopped and "
                "no rollout uses that version"))
        if "error" in box:
            err = box["error"]
            self._fail(WeightTransferError(
                f"publishing policy version {version} to the rollout devices failed: "
                f"{type(err).__name__}: {err}"), cause=err)
        dst, want, got = box["result"]
        if list(want) != list(got):
            paths = [sh.path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
            bad = [p for p, a, b in zip(paths, want, got) if a != b]
            if len(want) != len(got):
                bad.append(f"<{len(want)} leaves sent, {len(got)} received>")
            self._fail(WeightTransferError(
                f"policy version {version} arrived corrupted on the rollout devices: checksum "
                f"mismatch at {bad[:5]}{' …' if len(bad) > 5 else ''}; the run is stopped "
                "and no rollout uses that version"))
        pipe.publish(Published(version=version, params=dst, digest=tuple(got)))
        self._published_version = version
        self._last_publish_s = time.perf_counter() - t0

    # ------------------------------------------------------------- producer
    def _ensure_pipeline(self) -> None:
        if self._pipeline is not None:
            return
        cfg, restored = self.async_config, self._restored
        self._restored = {}
        self._base_key = np.asarray(sh.host_value(self.state.key))
        i = self.iteration_index
        self._pipeline = RolloutPipeline(
            _Work(self), max_staleness=cfg.max_staleness, schedule=cfg.schedule,
            units=self.units, steps=self.config.steps, version=i,
            next_batch=restored.get("next_batch", i), ready=restored.get("ready"),
            inflight=restored.get("inflight"))
        self._publish(i)
        self._pipeline.start()
        log.info("rollout producer started at iteration %d (k=%d, %s schedule, %s placement, "
                 "%d unit(s) per batch)", i, cfg.max_staleness, cfg.schedule, cfg.placement,
                 self.units)

    def _stop_pipeline(self) -> None:
        if self._pipeline is not None:
            self._pipeline.stop()

    def _batch_key(self, j: int) -> jax.Array:
        """fold_in(TrainState.key, j): the key ``RLTrainer.sampling_key`` gives iteration j."""
        return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(self._base_key)), j)

    def _generate(self, pub: Published, ids, mask, key, config, forced, forced_lengths):
        return generate(self.graphdef, pub.params, ids, mask, key=key, config=config,
                        forced_prefix=forced, forced_lengths=forced_lengths,
                        mesh=self.rollout_mesh, data_axis=sh.BATCH_AXES)

    def _behaviour_logp(self, pub: Published, rollout) -> np.ndarray:
        """[B, T] trainer log-probs of ``rollout``'s completions under ``pub``'s weights."""
        tokens, mask, positions = rollout.sequences()
        seq = sh.shard_batch(Sequences(tokens=tokens, attention_mask=mask, positions=positions),
                             self.rollout_mesh)
        return np.asarray(sh.host_value(self._behaviour_fn(pub.params, seq)), np.float32)

    def _score_round(self, gen: Generation, rollout, problems, metrics: dict):
        """Texts and rewards of one round, as ``RLTrainer.collect`` scores them
        (``RLTrainer._score``: once, broadcast from process 0)."""
        p, g = len(problems), self.sampler.num_generations
        t0 = time.perf_counter()
        texts = self._decode(rollout)
        t1 = time.perf_counter()
        scored = self._score(texts, [q for q in problems for _ in range(g)])
        if gen.index == 0 and scored["all_failed"]:
            raise RuntimeError(scored["all_failed"])      # a reward broken on every call
        bad = {k: scored["counts"].get(k, 0) for k in ("failures", "timeouts", "crashes")}
        if any(bad.values()):
            log.warning("batch %d: reward calls failed %s; e.g. %s", gen.index, bad,
                        "; ".join(scored["errors"][:2]))
        for name, dt in (("decode", t1 - t0), ("reward", time.perf_counter() - t1)):
            metrics[f"producer/time_{name}"] = metrics.get(f"producer/time_{name}", 0.0) + dt
        for k, v in scored["metrics"].items():
            if k.endswith(("failures", "timeouts", "crashes", "seconds")):
                metrics[k] = metrics.get(k, 0.0) + v
            else:
                metrics[k] = v
        rewards = np.asarray(scored["scores"], np.float32).reshape(p, g)
        components = np.asarray(scored["components"], np.float32).reshape(p, g, -1)
        return texts, rewards, components

    def _ready(self, gen: Generation, groups, metrics) -> ReadyBatch:
        """The first P groups (rollout, i, rewards, components, texts, problem, round)
        stacked into the engine's ``Collected``, with what a checkpoint needs."""
        p = self.config.prompts_per_step
        groups = groups[:p]
        collected = self._stack([grp[:6] for grp in groups], metrics)
        return ReadyBatch(collected=collected, stream_state=gen.stream_state,
                          draws=list(gen.draws), drawn=list(gen.problems),
                          problem_index=[grp[6] * p + grp[1] for grp in groups])

    def _collect_whole(self, gen: Generation, pub: Published) -> None:
        """The whole batch with one version: ``RLTrainer.collect`` on the published
        weights (with DAPO dynamic sampling), each round's rows versioned."""
        p = self.config.prompts_per_step
        key = self._batch_key(gen.index)
        kept, spare, metrics = [], [], {}
        exact = self.async_config.old_logits == "exact"
        gen.stream_state = self.stream.get_state()
        for round_ in range(self.config.max_sampling_rounds if self.config.dynamic_sampling
                            else 1):
            problems = self.stream.next_batch(p)
            gen.draws.append(p)
            gen.problems.extend(problems)
            ids, mask = self.tokenizer.batch_encode([q.prompt for q in problems],
                                                    padding_side="left", add_bos=None)
            forced, forced_lengths = self._forced_prefixes(problems)
            t0 = time.perf_counter()
            rollout = self._generate(pub, ids, mask, jax.random.fold_in(key, round_),
                                     self.sampler, forced, forced_lengths)
            host = sh.host_value(jax.block_until_ready(rollout))
            metrics["producer/time_generate"] = (metrics.get("producer/time_generate", 0.0)
                                                 + time.perf_counter() - t0)
            versions = np.where(host.completion_mask, pub.version, -1).astype(np.int32)
            vr = VersionedRollout(**{f.name: getattr(host, f.name)
                                     for f in dataclasses.fields(Rollout)}, versions=versions)
            if exact:
                t0 = time.perf_counter()
                vr = vr.replace(behaviour_logp=self._behaviour_logp(pub, vr)
                                * host.completion_mask)
                metrics["producer/time_behaviour"] = (metrics.get("producer/time_behaviour",
                                                                  0.0) + time.perf_counter() - t0)
            texts, rewards, components = self._score_round(gen, vr, problems, metrics)
            metrics["dynamic_sampling/rounds"] = float(round_ + 1)
            g = self.sampler.num_generations
            for i in range(p):
                group = (vr, i, rewards[i], components[i], texts[i * g:(i + 1) * g],
                         problems[i], round_)
                (kept if not self.config.dynamic_sampling or np.ptp(rewards[i]) > 0
                 else spare).append(group)
            if len(kept) >= p:
                break
        metrics["dynamic_sampling/kept_groups"] = float(min(len(kept), p))
        gen.result = self._ready(gen, kept + spare, metrics)
        gen.chunk, gen.done = 1, True

    def _continuation(self, gen: Generation, user_forced, user_lengths, limit: int):
        """[B, W] forced ids / [B] counts for the next chunk: every row's tokens so far,
        then what remains of its user forced prefix, at most ``limit`` tokens."""
        a = gen.arrays
        b, t = a["tokens"].shape
        have = a["lengths"]
        user = np.full((b, t), self.sampler.pad_id, np.int32)
        ulen = np.zeros((b,), np.int32)
        if user_forced is not None:
            user[:, :user_forced.shape[1]] = user_forced
            ulen = np.asarray(user_lengths, np.int32)
        lengths = np.minimum(np.maximum(have, ulen), limit).astype(np.int32)
        width = int(lengths.max(initial=0))
        if width == 0:
            return None, None
        pos = np.arange(width)[None, :]
        forced = np.where(pos < have[:, None], a["tokens"][:, :width], user[:, :width])
        forced = np.where(pos < lengths[:, None], forced, self.sampler.pad_id)
        return forced.astype(np.int32), lengths

    def _advance_chunk(self, gen: Generation, pub: Published) -> None:
        """One chunk of a partial rollout (module docstring)."""
        p, g = self.config.prompts_per_step, self.sampler.num_generations
        b, t, n = p * g, self.completion_width, self.sampler.max_new_tokens
        exact = self.async_config.old_logits == "exact"
        a, metrics = gen.arrays, gen.metrics
        if gen.chunk == 0:
            gen.stream_state = self.stream.get_state()
            gen.problems = self.stream.next_batch(p)
            gen.draws = [p]
            a.update(tokens=np.full((b, t), self.sampler.pad_id, np.int32),
                     lengths=np.zeros((b,), np.int32), finished=np.zeros((b,), bool),
                     sampling_logprobs=np.zeros((b, t), np.float32),
                     versions=np.full((b, t), -1, np.int32))
            if self.sampler.return_policy_logprobs:
                a["policy_logprobs"] = np.zeros((b, t), np.float32)
            if exact:
                a["behaviour_logp"] = np.zeros((b, t), np.float32)
        ids, mask = self.tokenizer.batch_encode([q.prompt for q in gen.problems],
                                                padding_side="left", add_bos=None)
        user_forced, user_lengths = self._forced_prefixes(gen.problems)
        limit = min(n, (gen.chunk + 1) * self.chunk_tokens)
        forced, forced_lengths = self._continuation(gen, user_forced, user_lengths, limit)
        config = self.sampler.replace(max_new_tokens=limit, completion_buckets=(t,))
        t0 = time.perf_counter()
        rollout = self._generate(pub, ids, mask, jax.random.fold_in(self._batch_key(gen.index), 0),
                                 config, forced, forced_lengths)
        h = sh.host_value(jax.block_until_ready(rollout))
        metrics["producer/time_generate"] = (metrics.get("producer/time_generate", 0.0)
                                             + time.perf_counter() - t0)
        active = ~a["finished"]
        pos = np.arange(t)[None, :]
        new = active[:, None] & (pos >= a["lengths"][:, None]) & (pos < h.lengths[:, None])
        a["tokens"] = np.where(active[:, None], h.completion_ids, a["tokens"]).astype(np.int32)
        a["sampling_logprobs"] = np.where(new, h.sampling_logprobs, a["sampling_logprobs"])
        if "policy_logprobs" in a:
            a["policy_logprobs"] = np.where(new, h.policy_logprobs, a["policy_logprobs"])
        a["versions"] = np.where(new, pub.version, a["versions"]).astype(np.int32)
        a["lengths"] = np.where(active, h.lengths, a["lengths"]).astype(np.int32)
        a["finished"] = np.where(active, h.finished, a["finished"])
        for name in ("prompt_ids", "prompt_mask", "group_id"):
            a[name] = np.asarray(getattr(h, name))
        a["decode_steps"] = np.asarray(h.decode_steps)
        ulen = (np.asarray(user_lengths, np.int32) if user_lengths is not None
                else np.zeros((b,), np.int32))
        a["user_lengths"] = ulen
        if exact:        # this chunk's tokens under this chunk's weights
            t0 = time.perf_counter()
            a["behaviour_logp"] = np.where(new, self._behaviour_logp(pub, self._assemble(a)),
                                           a["behaviour_logp"]).astype(np.float32)
            metrics["producer/time_behaviour"] = (metrics.get("producer/time_behaviour", 0.0)
                                                  + time.perf_counter() - t0)
        gen.chunk += 1
        if a["finished"].all() or limit >= n:
            vr = self._assemble(a)
            texts, rewards, components = self._score_round(gen, vr, gen.problems, metrics)
            metrics["dynamic_sampling/rounds"] = 1.0
            metrics["dynamic_sampling/kept_groups"] = float(p)
            metrics["producer/chunks"] = float(gen.chunk)
            groups = [(vr, i, rewards[i], components[i], texts[i * g:(i + 1) * g],
                       gen.problems[i], 0) for i in range(p)]
            gen.result = self._ready(gen, groups, metrics)
            gen.done = True

    def _assemble(self, a: dict) -> VersionedRollout:
        """The host ``VersionedRollout`` of a partial rollout's arrays."""
        t = a["tokens"].shape[1]
        cmask = np.arange(t)[None, :] < a["lengths"][:, None]
        return VersionedRollout(
            prompt_ids=a["prompt_ids"], prompt_mask=a["prompt_mask"], completion_ids=a["tokens"],
            completion_mask=cmask, sampling_logprobs=a["sampling_logprobs"] * cmask,
            policy_logprobs=a.get("policy_logprobs"), lengths=a["lengths"],
            finished=a["finished"], truncated=~a["finished"], group_id=a["group_id"],
            forced=(np.arange(t)[None, :] < a["user_lengths"][:, None]) & cmask,
            decode_steps=a["decode_steps"], versions=np.where(cmask, a["versions"], -1),
            behaviour_logp=(a["behaviour_logp"] * cmask if "behaviour_logp" in a else None))

    # ------------------------------------------------------------ iteration
    def staleness_metrics(self, rollout: VersionedRollout, iteration: int) -> dict:
        """Lag statistics of a batch consumed at ``iteration``; raises StalenessError
        if a loss token is older than ``max_staleness`` versions (or from the future)."""
        k = self.async_config.max_staleness
        loss = np.asarray(rollout.completion_mask) & ~np.asarray(rollout.forced)
        versions = np.asarray(rollout.versions)
        v = versions[loss]
        if v.size and (v.min() < iteration - k or v.max() > iteration):
            out = loss & ((versions < iteration - k) | (versions > iteration))
            rows = np.flatnonzero(out.any(-1))
            raise StalenessError(
                f"iteration {iteration} (max_staleness={k}) was handed tokens of versions "
                f"{int(v.min())}..{int(v.max())} (rows {rows[:8].tolist()}); allowed "
                f"{iteration - k}..{iteration}")
        lag = iteration - v
        spread = np.where(loss, versions, -1).max(-1) - np.where(loss, versions, 2**30).min(-1)
        has = loss.any(-1)
        return {"async/lag_mean": float(lag.mean()) if lag.size else 0.0,
                "async/lag_max": float(lag.max(initial=0)),
                "async/multi_version_rows": float(((spread > 0) & has).sum() / max(has.sum(), 1))}

    def collect(self, key) -> Collected:
        """Batch ``iteration_index`` from the producer (``key`` is the producer's own:
        ``fold_in(TrainState.key, iteration)``, as ``RLTrainer.sampling_key``)."""
        self._ensure_pipeline()
        i = self.iteration_index
        t0 = time.perf_counter()
        ready, queued = self._pipeline.take(i, timeout=self.async_config.batch_timeout_s)
        got = ready.collected
        got.reward_metrics = {**got.reward_metrics,
                              **self.staleness_metrics(got.rollout, i),
                              "async/wait_s": time.perf_counter() - t0,
                              "async/ready_batches": float(queued),
                              "async/publish_s": self._last_publish_s}
        return got

    def iteration_batch(self, got: Collected):
        batch = super().iteration_batch(got)
        if self.async_config.old_logits != "exact":
            return batch
        r = got.rollout
        loss = np.asarray(r.completion_mask) & ~np.asarray(r.forced)
        behaviour = np.asarray(r.behaviour_logp, np.float32)
        lr = behaviour - np.asarray(r.sampling_logprobs, np.float32)
        low, high = self.async_config.discrepancy_band
        w, frac = offpolicy.band_weights(jnp.asarray(lr), jnp.asarray(loss),
                                         level=self.async_config.discrepancy_level,
                                         mode="reject", low=low, high=high)
        keep = loss & (np.asarray(w) > 0)
        got.reward_metrics["offpolicy/discrepancy_masked"] = float(frac)
        got.reward_metrics["offpolicy/discrepancy_gap_abs_mean"] = float(
            np.abs(lr)[loss].mean()) if loss.any() else 0.0
        new = sh.shard_batch({"mask": keep, "sampler_logp": (behaviour * loss)}, self.mesh)
        return batch.replace(mask=new["mask"], sampler_logp=new["sampler_logp"])

    def update_step(self, batch) -> dict:
        """The engine's update (with "ewma": the proximal-policy update, one compiled
        program as well), then version ``iteration_index + 1`` published."""
        metrics = (super().update_step(batch) if self._ewma is None
                   else self._ewma_update_step(batch))
        if self._pipeline is not None:
            self._publish(self.iteration_index + 1)
        return metrics

    def _ewma_update(self, state, critic_state, ref_params, ewma, batch):
        """The "ewma" iteration (module docstring, "Old logits"), traced once per
        batch shape: π_prox from the EWMA parameters, the band on π_prox/π_infer
        dropped from the loss mask, the engine's update with the objective's
        ``old_logp`` = π_prox, then the EWMA advanced by the new version."""
        cfg = self.async_config
        t = batch.mask.shape[1]
        prox = jax.lax.stop_gradient(steps_lib.token_outputs(
            self.graphdef, ewma["params"], batch.seq, t,
            temperature=self.logprob_temperature).logp)
        sampler = batch.sampler_logp.astype(prox.dtype)
        loss = batch.mask.astype(prox.dtype)
        w, masked = offpolicy.ewma_decoupled_weights(
            prox, sampler, loss, level=cfg.discrepancy_level, band=cfg.discrepancy_band,
            reweight=False)
        keep = batch.mask & (w > 0)
        den = jnp.maximum(loss.sum(), 1.0)
        gap = jnp.abs(prox - sampler) * loss
        diff = jax.tree.map(lambda a, b: a - b, state.params, ewma["params"])
        extra = {"offpolicy/proximal_masked": masked,
                 "offpolicy/proximal_gap_abs_mean": gap.sum() / den,
                 "ewma/age": ewma["age"], "ewma/weight": ewma["weight"],
                 "ewma/param_gap": optax.global_norm(diff)
                 / jnp.maximum(optax.global_norm(state.params), 1e-12)}
        slot = jnp.stack([prox, sampler * loss], axis=-1)
        state, critic_state, metrics = self._update_fn(
            state, critic_state, ref_params, batch.replace(mask=keep, sampler_logp=slot))
        ewma = offpolicy.ewma_update(ewma, state.params, decay=cfg.proximal_decay)
        return state, critic_state, ewma, {**metrics, **extra}

    def _ewma_update_step(self, batch) -> dict:
        shape = (batch.mask.shape, tuple(x.shape for x in jax.tree.leaves(batch.seq)))
        fn = self._compiled.get(shape)
        if fn is None:
            batch_sh = jax.tree.map(
                lambda x: (sh.replicated(self.mesh) if jnp.ndim(x) == 0
                           else sh.batch_sharding(self.mesh, jnp.ndim(x))), batch)
            fn = jax.jit(self._ewma_update,
                         in_shardings=(self.state_shardings, self.critic_shardings,
                                       self.ref_shardings, self._ewma_shardings, batch_sh),
                         out_shardings=(self.state_shardings, self.critic_shardings,
                                        self._ewma_shardings, sh.replicated(self.mesh)),
                         donate_argnums=(0, 1, 3))
            self._compiled[shape] = fn
            self.compilations += 1
        critic_state = self.critic.state if self.critic is not None else None
        self.state, critic_state, self._ewma, metrics = fn(self.state, critic_state,
                                                           self.ref_params, self._ewma, batch)
        if self.critic is not None:
            self.critic.state = critic_state
        return metrics

    # ----------------------------------------------------------- checkpoints
    def _encode_queue(self, snap: Snapshot) -> tuple[dict, dict]:
        """(data state before the first queued batch, the queue as JSON)."""
        entries, next_batch = [], snap.next_batch
        for j in sorted(snap.ready):
            rb = snap.ready[j]
            c = rb.collected
            entries.append({
                "index": j, "state": "ready", "stream_state": rb.stream_state,
                "draws": rb.draws, "problems_sha": _problem_digest(rb.drawn),
                "problem_index": rb.problem_index,
                "rollout": {f.name: _enc(getattr(c.rollout, f.name))
                            for f in dataclasses.fields(c.rollout)
                            if getattr(c.rollout, f.name) is not None},
                "rewards": _enc(c.rewards), "components": _enc(c.components),
                "texts": list(c.texts), "metrics": _floats(c.reward_metrics)})
        for j in sorted(snap.inflight):
            gen = snap.inflight[j]
            if gen.chunk == 0:           # nothing drawn yet: it starts afresh
                next_batch = min(next_batch, j)
                continue
            entries.append({
                "index": j, "state": "running", "chunk": gen.chunk,
                "stream_state": gen.stream_state, "draws": gen.draws,
                "problems_sha": _problem_digest(gen.problems),
                "arrays": {k: _enc(v) for k, v in gen.arrays.items()},
                "metrics": _floats(gen.metrics)})
        entries.sort(key=lambda e: e["index"])
        data_state = entries[0]["stream_state"] if entries else self.stream.get_state()
        payload = {"format": QUEUE_FORMAT, "schedule": self.async_config.schedule,
                   "max_staleness": self.async_config.max_staleness, "units": self.units,
                   "next_batch": next_batch, "batches": entries}
        return data_state, payload

    def save(self, force: bool = False) -> None:
        """``RLTrainer.save`` with the producer at its barrier and the queue in the
        checkpoint's extra (module docstring, "Checkpoints")."""
        step = self.iteration_index
        if not force and not self.checkpointer.due(step):
            return
        states = {"policy": self.state}
        if self.critic is not None:
            states["critic"] = self.critic.state
        if self._ewma is not None:
            states["ewma"] = self._ewma
        extra = {"iteration": step}
        if self._pipeline is None:
            data_state = self.stream.get_state()
        else:
            snap = self._pipeline.barrier(step, timeout=self.async_config.batch_timeout_s)
            try:
                data_state, extra[QUEUE_KEY] = self._encode_queue(snap)
            finally:
                self._pipeline.release()
        guard = getattr(self, "_signals", None)       # as RLTrainer.save: SIGINT/SIGTERM wait
        with guard.deferred() if guard is not None else contextlib.nullcontext():
            self.checkpointer.save(step, states, data_state, extra)

    def resume(self) -> bool:
        """``RLTrainer.resume``, then the checkpoint's rollout queue (if any) restored
        for the producer."""
        if self._pipeline is not None:
            raise RuntimeError("AsyncRLTrainer.resume() after the producer started")
        box = {}
        real = self.checkpointer.restore_latest

        def recording(abstract, *args, init_state=None, **kwargs):
            if self._ewma is not None:       # the proximal EWMA is saved beside the policy
                abstract = {**abstract, "ewma": ckpt_lib.abstract_like(
                    self._ewma, self._ewma_shardings)}
                if init_state is not None:
                    init_state = {**init_state, "ewma": self._ewma}
            box["found"] = real(abstract, *args, init_state=init_state, **kwargs)
            return box["found"]

        self.checkpointer.restore_latest = recording
        try:
            found = super().resume()
        finally:
            del self.checkpointer.restore_latest
        if not found or box.get("found") is None:
            return found
        _, states, data_state, extra = box["found"]
        if self._ewma is not None:
            self._ewma = states["ewma"]
        payload = extra.get(QUEUE_KEY)
        if payload:
            self._restored = self._decode_queue(payload, data_state)
        return True

    def _decode_queue(self, payload: dict, data_state) -> dict:
        """The queue of a checkpoint, its problems drawn again from the stream."""
        cfg = self.async_config
        saved = (payload.get("format"), payload.get("units"), payload.get("schedule"),
                 payload.get("max_staleness"))
        if saved != (QUEUE_FORMAT, self.units, cfg.schedule, cfg.max_staleness):
            log.warning("the checkpoint's rollout queue (format, units per batch, schedule, "
                        "max_staleness = %s) does not fit this run (%s); it is regenerated with "
                        "the restored weights", saved,
                        (QUEUE_FORMAT, self.units, cfg.schedule, cfg.max_staleness))
            return {}
        ready, inflight = {}, {}
        for e in sorted(payload["batches"], key=lambda e: e["index"]):
            drawn = [q for n in e["draws"] for q in self.stream.next_batch(n)]
            if _problem_digest(drawn) != e["problems_sha"]:
                log.warning("the problems of queued batch %d differ from the checkpoint's (the "
                            "problem list changed?); the queue is regenerated with the "
                            "restored weights", e["index"])
                if data_state:
                    self.stream.set_state(data_state)
                return {}
            j = e["index"]
            if e["state"] == "ready":
                fields = {name: _dec(d) for name, d in e["rollout"].items()}
                rollout = VersionedRollout(**{f.name: fields.get(f.name)
                                              for f in dataclasses.fields(VersionedRollout)})
                collected = Collected(rollout=rollout, rewards=_dec(e["rewards"]),
                                      components=_dec(e["components"]), texts=list(e["texts"]),
                                      problems=[drawn[k] for k in e["problem_index"]],
                                      reward_metrics=dict(e["metrics"]))
                ready[j] = ReadyBatch(collected=collected, stream_state=e["stream_state"],
                                      draws=list(e["draws"]), drawn=drawn,
                                      problem_index=list(e["problem_index"]))
            else:
                inflight[j] = Generation(index=j, chunk=int(e["chunk"]),
                                         stream_state=e["stream_state"], draws=list(e["draws"]),
                                         problems=drawn,
                                         arrays={k: _dec(v) for k, v in e["arrays"].items()},
                                         metrics=dict(e["metrics"]))
        log.info("restored %d finished and %d partial rollout batch(es) of the queue",
                 len(ready), len(inflight))
        return {"next_batch": int(payload["next_batch"]), "ready": ready, "inflight": inflight}

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        try:
            return super().run()
        finally:
            self._stop_pipeline()

    def close(self) -> None:
        self._stop_pipeline()
        super().close()

"""Checkpoints: the full training state plus the data iterator's state, via orbax.

Layout: ``<run_dir>/checkpoints/<step>/{state, data, extra}``. ``state`` is the
``TrainState`` pytree (and any other array pytrees, e.g. a critic's state),
``data`` is the JSON state of the data iterator (grain's ``get_state()``), so a
restarted run continues with the same prompts. Saves are asynchronous; orbax
writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves no half-written step behind (the temporary directory is ignored and
cleaned up).

**Identity.** Every save records, in ``extra`` under :data:`DIGEST_KEY`, what the step
is a checkpoint *of*: the state's fingerprint (every leaf's '/'-joined key path, shape
and dtype, :func:`tree_fingerprint`) and the caller's ``identity`` (a JSON-able dict of
the configuration that determines the state, e.g. model preset, objective, critic).
On restore the newest step's fingerprint and identity are compared with the state
being restored into *before any array is read*. A difference is not corruption: by
default (``on_mismatch="error"``) :class:`CheckpointMismatch` is raised, naming the
added / removed / changed leaves and the differing identity keys with both values,
and every checkpoint is left as it is. Two deliberate ways on:

- ``on_mismatch="fresh"``: the mismatching checkpoints stay where they are and this
  run uses the sibling directory ``<directory>.fresh-<n>``: the first one whose newest
  step matches is resumed, else the first unused one is started (so rerunning the
  same changed command resumes the fresh run). Nothing is moved or deleted.
- ``on_mismatch="partial"``: a warm start. Leaves whose path, shape and dtype match
  are restored, the rest keep the values of ``init_state``; the lists of both are in
  :attr:`Checkpointer.last_restore` and in one warning line.

Identities are compared only when both the checkpoint and the Checkpointer have one
(key by key over the union of keys: a key on one side only is a difference).

**Corruption.** A step that cannot be read (corrupted or missing files) is reported
in one warning line, moved aside to ``<step>.corrupt`` (``<step>.corrupt.1``, ... when
that name is taken: an earlier quarantine is never replaced) and the previous good step
is used. Silent corruption (a flipped bit inside an uncompressed array chunk reads
back without any error) is caught by digests: a uint32 per state leaf
(:func:`state_digest`), and a SHA-256 over the step number, the data-iterator state,
the caller's ``extra`` (e.g. the iteration counter), the fingerprint, the identity and
the leaf digests. A mismatch of either is treated like an unreadable step.

**Several hosts: one step for all.** Every process checks its own view of every step's
metadata (process-local reads through orbax's handlers, no barrier), then one
collective that every process calls unconditionally (``process_allgather`` of the
per-step validity vector) gives the steps valid everywhere, and all processes take the
newest of those. Its arrays are read by each process (its own shards, again without a
collective), the outcome is agreed before the digest comparison (itself a collective),
and agreed once more after it; a step bad on any process is skipped by all, so every
host restores the same step whatever its own files say. The bad step is moved aside
in the view of each process that found it bad and by process 0, then all meet at a
barrier before listing the directory again.

**Fixed-length phases** (SFT warm-up, reward model, DPO) run under :class:`PhaseLoop`:
periodic saves (:class:`PhaseCheckpoints`, gin ``rlx.train.PhaseCheckpoints``), resume,
refusal of another identity, and SIGINT / SIGTERM handling (``rlx.train.signals``).

Checkpoints written before fingerprints existed (their ``extra`` holds only the leaf
digests) still restore: their tree is read from orbax's own metadata, so a structure
change is still a :class:`CheckpointMismatch` and never a quarantine; they carry no
identity and no metadata digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rlx.models.convert import CheckpointError
from rlx.train import signals

log = logging.getLogger("rlx.checkpoint")

DIGEST_KEY = "rlx_state_digest"   # reserved key in a checkpoint's ``extra``
FORMAT = 2                        # 1 (implicit): leaf digests only; 2: + fingerprint, identity
MISMATCH_MODES = ("error", "fresh", "partial")
_SHOWN = 6                        # paths / keys named per category in a mismatch message


class CheckpointMismatch(CheckpointError):
    """A checkpoint of another state structure or configuration than the one restored into.

    Attributes: ``step``, ``directory``, ``added`` / ``removed`` (paths present only
    in the state being restored into / only in the checkpoint), ``changed`` (path,
    saved (shape, dtype), wanted (shape, dtype)), ``identity`` (key, saved, wanted).
    """

    def __init__(self, step: int, directory: str, added: list[str], removed: list[str],
                 changed: list[tuple], identity: list[tuple]):
        self.step, self.directory = step, directory
        self.added, self.removed, self.changed, self.identity = added, removed, changed, identity
        super().__init__(
            f"checkpoint step {step} in {directory} is of another configuration "
            f"({self.describe()}); every checkpoint was left untouched. Use a new run "
            "directory, or restore with on_mismatch='fresh' (a fresh run in "
            f"{directory}.fresh-<n>) or on_mismatch='partial' (warm start from the "
            "matching leaves)")

    def describe(self) -> str:
        """One line: the differing tree paths and identity keys."""
        def some(items, fmt=str):
            more = f" … {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            return ", ".join(fmt(x) for x in items[:_SHOWN]) + more

        def leaf(spec):
            return f"{tuple(spec[0])} {spec[1]}"
        parts = []
        if self.identity:
            parts.append("identity differs: " + some(
                self.identity, lambda d: f"{d[0]}: saved {d[1]!r}, now {d[2]!r}"))
        if self.added:
            parts.append(f"{len(self.added)} leaves not in the checkpoint: {some(self.added)}")
        if self.removed:
            parts.append(f"{len(self.removed)} checkpoint leaves not in the state: "
                         f"{some(self.removed)}")
        if self.changed:
            parts.append(f"{len(self.changed)} leaves changed: " + some(
                self.changed, lambda c: f"{c[0]} saved {leaf(c[1])}, now {leaf(c[2])}"))
        return "; ".join(parts)

    @property
    def tree_differs(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclasses.dataclass
class RestoreReport:
    """What the last ``restore_latest`` did.

    ``mode``: "exact" (everything restored), "partial" (warm start), "fresh" (the
    checkpoints of ``mismatch.directory`` were of another configuration and this run
    uses ``directory``), or "none" (nothing to restore). ``restored`` / ``initialised``:
    the leaf paths taken from the checkpoint / kept from ``init_state``.
    """

    mode: str
    directory: str
    step: int | None = None
    restored: list[str] = dataclasses.field(default_factory=list)
    initialised: list[str] = dataclasses.field(default_factory=list)
    mismatch: CheckpointMismatch | None = None


# ------------------------------------------------------------------ fingerprints
def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(keypath) -> str:
    """'/'-joined key names: a dataclass field, a dict key and its serialised (orbax)
    form give the same path (``policy/params/trunk/layers/0/attn/q_proj/kernel/value``)."""
    return "/".join(_key_name(k) for k in keypath)


def _dtype(x) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else str(jnp.asarray(x).dtype)


def tree_fingerprint(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{leaf path: (shape, dtype)} of an array pytree (arrays or ShapeDtypeStructs)."""
    return {_path(p): (tuple(int(d) for d in np.shape(x)), _dtype(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The bits of every element as uint32, flattened (wider dtypes give 2 words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.reshape(-1).astype(jnp.uint32)
    width = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


@jax.jit
def _digests(leaves: list) -> jax.Array:
    out = []
    for x in leaves:
        u = _leaf_bits(x)
        i = jnp.arange(u.shape[0], dtype=jnp.uint32)
        out.append(jnp.sum((u + jnp.uint32(0x9E3779B9)) * (2 * i + 1), dtype=jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def state_digest(tree: Any) -> list[int]:
    """One uint32 per array leaf: Σ_i (u_i + c)·(2i + 1) mod 2³², u_i the element bits.

    Changing any single element changes its leaf's digest (2i + 1 is odd, hence
    invertible mod 2³²), and integer sums are exact, so the value does not depend on
    the sharding or the reduction order (identical on every host and mesh).
    """
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x)
              for x in jax.tree.leaves(tree)]
    out = _digests(leaves)
    if not out.is_fully_addressable:
        out = multihost_utils.process_allgather(out, tiled=True)
    return [int(v) for v in np.asarray(out)]


def _dtypes(tree: Any) -> list[str]:
    return [_dtype(x) for x in jax.tree.leaves(tree)]


def _json_default(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x, key=repr)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return repr(x)


def _plain(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples → lists, keys → str, dataclasses → dicts)."""
    return json.loads(json.dumps(x, default=_json_default))


def _meta_digest(step: int, data: Any, extra: Any, record: dict) -> str:
    body = {"step": int(step), "data": data, "extra": extra,
            **{k: record.get(k) for k in ("tree", "identity", "digest")}}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat_items(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


_ABSENT = "<absent>"


def _identity_diff(saved: dict | None, wanted: dict | None) -> list[tuple]:
    if saved is None or wanted is None:
        return []
    a, b = _flat_items(saved), _flat_items(wanted)
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT))
            for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _tree_diff(saved: dict, wanted: dict):
    added = sorted(set(wanted) - set(saved))
    removed = sorted(set(saved) - set(wanted))
    changed = [(p, saved[p], wanted[p]) for p in sorted(set(saved) & set(wanted))
               if tuple(saved[p][0]) != tuple(wanted[p][0]) or saved[p][1] != wanted[p][1]]
    return added, removed, changed


class _Corrupt(Exception):
    """A step that cannot be used: unreadable, or its digests do not match."""


def _one_line(err: BaseException, limit: int = 240) -> str:
    text = " ".join(str(err).split(" See full TensorStore details")[0].split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _ToDebugLog:
    """A stand-in for ``sys.stderr`` that sends what is written to the debug log."""

    def __init__(self, original):
        self._original = original

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("stderr during checkpoint read: %s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._original, name)


@contextlib.contextmanager
def _quiet(linger_s: float = 0.3):
    """Silences what a failing orbax read prints besides its exception: exceptions of
    abandoned coroutines and callbacks (``Exception ignored in …``), tracebacks that
    tensorstore's late callbacks print into a closed event loop (``Event loop is
    closed``, written to ``sys.stderr``; after a failure the block waits ``linger_s``
    for them) and absl/orbax error logs. They go to the debug log; the caller logs one
    line per step."""
    def unraisable(info):
        log.debug("suppressed during checkpoint read: %s", info.exc_value)

    def thread_hook(args):
        log.debug("suppressed in thread during checkpoint read: %s", args.exc_value)

    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio")]
    levels = [lg.level for lg in loggers]
    old_unraisable, old_thread, old_stderr = sys.unraisablehook, threading.excepthook, \
        sys.stderr
    sys.unraisablehook, threading.excepthook = unraisable, thread_hook
    sys.stderr = _ToDebugLog(old_stderr)
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            if linger_s:
                time.sleep(linger_s)   # late callbacks of the abandoned reads print meanwhile
            gc.collect()   # finalise the abandoned coroutines while their noise is muted
            # (only after a failure: a full collection costs ~0.2 s in a large process)
        sys.unraisablehook, threading.excepthook = old_unraisable, old_thread
        sys.stderr = old_stderr
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Checkpointer:
    """Saves every ``every_steps`` steps and/or ``every_minutes`` minutes, keeps ``keep``.

    ``identity``: a JSON-able dict of the configuration that determines the saved state
    (recorded with every save, compared on restore). ``on_mismatch``: "error" |
    "fresh" | "partial", what ``restore_latest`` does with a checkpoint of another
    structure or identity (module docstring).
    """

    def __init__(self, directory: str, *, every_steps: int | None = 50,
                 every_minutes: float | None = None, keep: int = 3,
                 async_save: bool = True, identity: dict | None = None,
                 on_mismatch: str = "error"):
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"checkpoint every_steps={every_steps} must be positive")
        if keep is None or keep < 1:
            raise ValueError(f"checkpoint keep={keep} must be at least 1")
        if identity is not None and not isinstance(identity, dict):
            raise ValueError(f"checkpoint identity must be a dict, got {type(identity).__name__}")
        _check_mode(on_mismatch)
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.identity = None if identity is None else _plain(identity)
        self.on_mismatch = on_mismatch
        self._keep, self._async = keep, async_save
        self._last_time = time.monotonic()
        self.corrupt_steps: list[int] = []
        self.last_restore: RestoreReport | None = None
        self._open(os.path.abspath(directory))

    def _open(self, directory: str) -> None:
        self.directory = directory
        with _quiet():             # orbax logs each unparsable step metadata file it lists
            self._manager = ocp.CheckpointManager(
                directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self._keep, enable_async_checkpointing=self._async,
                    create=True, cleanup_tmp_directories=True))

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_minutes is not None:
            return time.monotonic() - self._last_time >= 60 * self.every_minutes
        return False

    def save(self, step: int, state: Any, data_state: dict | None = None,
             extra: dict | None = None) -> None:
        """Starts an (asynchronous) save of ``state`` at ``step``."""
        if step in self._manager.all_steps():
            return
        if extra and DIGEST_KEY in extra:
            raise ValueError(f"checkpoint extra may not use the reserved key {DIGEST_KEY!r}")
        data, user_extra = _plain(data_state or {}), _plain(extra or {})
        tree = tree_fingerprint(state)
        digests = state_digest(state)
        record = {"format": FORMAT,
                  "tree": [[p, list(shape), dtype] for p, (shape, dtype) in tree.items()],
                  "digest": digests, "dtypes": _dtypes(state), "identity": self.identity}
        record["meta"] = _meta_digest(step, data, user_extra, record)
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(data),
                "extra": ocp.args.JsonSave({**user_extra, DIGEST_KEY: record})}
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._last_time = time.monotonic()

    def maybe_save(self, step: int, state: Any, data_state: dict | None = None,
                   extra: dict | None = None) -> bool:
        if self.due(step):
            self.save(step, state, data_state, extra)
            return True
        return False

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # --------------------------------------------------------------- restoring
    def steps(self) -> list[int]:
        with _quiet():             # orbax logs each unparsable step metadata file
            self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any, *, on_mismatch: str | None = None,
                       init_state: Any = None) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, extra) of the newest good checkpoint, or None.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) that
        says how to lay the arrays out. Unreadable steps, and steps whose contents do not
        match their digests, are quarantined and skipped. A step of another structure
        or identity raises :class:`CheckpointMismatch` (``on_mismatch="error"``, the
        constructor's default unless overridden here) or is handled as "fresh" /
        "partial" (module docstring; "partial" takes the values of unmatched leaves
        from ``init_state``, or from ``abstract_state`` when its leaves are arrays).
        What was done is in :attr:`last_restore`.
        """
        mode = _check_mode(on_mismatch or self.on_mismatch)
        wanted = tree_fingerprint(abstract_state)
        origin = self.directory
        found, mismatch = self._restore_here(abstract_state, wanted, mode, init_state)
        first = mismatch
        while mismatch is not None:          # only "fresh" returns a mismatch
            target = self._next_fresh(origin)
            log.warning("checkpoints in %s are of another configuration (%s); this run "
                        "uses %s and leaves them untouched", mismatch.directory,
                        mismatch.describe(), target)
            self.close()
            self._open(target)
            found, mismatch = self._restore_here(abstract_state, wanted, mode, init_state)
        if first is not None:
            self.last_restore.mode, self.last_restore.mismatch = "fresh", first
        return found

    def _next_fresh(self, origin: str) -> str:
        n = 1
        current = self.directory
        if current != origin and current.startswith(origin + ".fresh-"):
            n = int(current.rsplit("-", 1)[1]) + 1
        return f"{origin}.fresh-{n}"

    def _restore_here(self, abstract_state, wanted, mode, init_state):
        """(found, mismatch): the result in this directory, or the mismatch ("fresh").

        Every process checks its own view of every step's metadata; one collective
        (``_agree``) gives the steps valid on every process, and all processes take the
        newest of those. Its arrays are then read by every process (each its own
        shards, no collective) and the outcome agreed again before the digests (a
        collective) are compared; a step bad on any process is skipped by all.
        """
        steps = self._agreed_steps()
        metas, errors = {}, {}
        for step in steps:
            try:
                metas[step] = self._read_meta(step)
            except _Corrupt as err:
                errors[step] = err
        valid, bad_on = self._agree([s in metas for s in steps])
        candidates = [(s, v, b) for s, v, b in zip(steps, valid, bad_on)]
        for step, ok_everywhere, processes in reversed(candidates):
            if not ok_everywhere:
                self._corrupt(step, errors.get(step) or _Corrupt(
                    "this process reads it; the others do not"), bad_here=step in errors,
                    processes=processes)
                continue
            data, extra, saved_tree, record = metas[step]
            added, removed, changed = _tree_diff(saved_tree, wanted)
            ident = _identity_diff(record.get("identity"), self.identity)
            mismatch = (CheckpointMismatch(step, self.directory, added, removed, changed, ident)
                        if added or removed or changed or ident else None)
            if mismatch is not None and mode == "error":
                raise mismatch
            if mismatch is not None and mode == "fresh":
                return None, mismatch
            partial = mismatch is not None and mismatch.tree_differs
            got, err = None, None
            try:
                got = (self._read_partial(step, abstract_state, init_state, saved_tree, wanted)
                       if partial else self._read_full(step, abstract_state))
            except _Corrupt as e:
                err = e
            (ok,), (processes,) = self._agree([err is None])
            if ok:                     # every process holds its arrays: compare digests
                try:
                    state, restored, initialised = (
                        self._check_partial(got, abstract_state if init_state is None
                                            else init_state, wanted, record) if partial
                        else (self._check_full(got, record), sorted(wanted), []))
                except _Corrupt as e:
                    err = e
                (ok,), (processes,) = self._agree([err is None])
            if not ok:
                self._corrupt(step, err or _Corrupt("this process reads it; the others do not"),
                              bad_here=err is not None, processes=processes)
                continue
            if mismatch is not None:
                named = ", ".join(initialised[:_SHOWN]) + (" …" if len(initialised) > _SHOWN
                                                          else "")
                log.warning("warm start from checkpoint step %d in %s of another configuration "
                            "(%s): %d leaves restored, %d initialised%s", step, self.directory,
                            mismatch.describe(), len(restored), len(initialised),
                            f" ({named})" if initialised else "")
            self.last_restore = RestoreReport("exact" if mismatch is None else "partial",
                                              self.directory, step, restored, initialised,
                                              mismatch)
            return (step, state, data, extra), None
        self.last_restore = RestoreReport("none", self.directory)
        return None, None

    # ------------------------------------------------------ agreement across hosts
    def _agreed_steps(self) -> list[int]:
        """The union of the steps every process sees, ascending (one process: its own)."""
        mine = self.steps()
        if jax.process_count() == 1:
            return mine
        counts = multihost_utils.process_allgather(np.asarray([len(mine)], np.int64))
        width = max(1, int(np.max(counts)))
        padded = np.full((width,), -1, np.int64)
        padded[:len(mine)] = mine
        every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1)
        return sorted({int(s) for s in every if s >= 0})

    @staticmethod
    def _agree(flags: list[bool]) -> tuple[list[bool], list[list[int]]]:
        """(valid everywhere, processes where invalid) per flag. A collective every
        process calls with the same number of flags."""
        local = np.asarray(flags, np.int32).reshape(-1)
        if jax.process_count() == 1:
            return [bool(f) for f in local], [[] if f else [0] for f in local]
        every = np.asarray(multihost_utils.process_allgather(local)).reshape(
            jax.process_count(), local.size)
        return ([bool(c.all()) for c in every.T],
                [[int(p) for p in np.flatnonzero(c == 0)] for c in every.T])

    def _read_meta(self, step: int):
        """(data, extra, saved fingerprint, digest record) of ``step``, arrays unread.
        Process-local reads (orbax's handlers, no barriers)."""
        base = epath.Path(self.directory) / str(step)
        try:
            with _quiet():
                data = dict(ocp.JsonCheckpointHandler().restore(base / "data") or {})
                extra = dict(ocp.JsonCheckpointHandler().restore(base / "extra") or {})
        except Exception as err:  # noqa: BLE001 - any read failure means "corrupt"
            raise _Corrupt(_one_line(err)) from err
        record = extra.pop(DIGEST_KEY, None) or {}
        if not isinstance(record, dict):
            raise _Corrupt(f"its {DIGEST_KEY!r} record is not an object")
        if "meta" in record:
            if _meta_digest(step, data, extra, record) != record["meta"]:
                raise _Corrupt("its metadata (data-iterator state, extra such as the iteration "
                               "counter, fingerprint or identity) differs from its digest")
            try:
                tree = {p: (tuple(shape), dtype) for p, shape, dtype in record["tree"]}
            except (TypeError, ValueError, KeyError) as err:
                raise _Corrupt(f"its fingerprint is malformed ({_one_line(err)})") from err
        else:                      # format 1: the tree from orbax's own metadata
            try:
                with _quiet():
                    tree = tree_fingerprint(self._state_metadata(step))
            except Exception as err:  # noqa: BLE001
                raise _Corrupt(_one_line(err)) from err
            if not tree:
                raise _Corrupt("its state has no readable metadata")
        return data, extra, tree, record

    def _state_metadata(self, step: int) -> Any:
        """The saved state's tree (nested dicts / lists of orbax ArrayMetadata)."""
        path = epath.Path(self.directory) / str(step) / "state"
        tree = getattr(ocp.PyTreeCheckpointHandler().metadata(path), "tree", None)
        if tree is None:
            raise ValueError(f"no state metadata in {path}")
        return tree

    def _read_full(self, step: int, abstract_state: Any) -> Any:
        """This process's shards of every leaf of ``step`` (no collective)."""
        path = epath.Path(self.directory) / str(step) / "state"
        try:
            with _quiet():
                got = ocp.StandardCheckpointHandler().restore(
                    path, args=ocp.args.StandardRestore(abstract_state))
                return jax.block_until_ready(got)
        except Exception as err:  # noqa: BLE001 - any read failure means "corrupt"
            raise _Corrupt(_one_line(err)) from err

    @staticmethod
    def _check_full(state: Any, record: dict) -> Any:
        _verify(state, record)
        return state

    def _read_partial(self, step, abstract_state, init_state, saved_tree, wanted):
        """{path: array} of the leaves of ``step`` whose path, shape and dtype match."""
        init = init_state if init_state is not None else abstract_state
        if any(not isinstance(x, jax.Array) for x in jax.tree.leaves(init)):
            raise ValueError("on_mismatch='partial' needs the values of the leaves it does "
                             "not restore: pass restore_latest(..., init_state=<the fresh state>)")
        matched = {p for p in wanted if p in saved_tree
                   and tuple(saved_tree[p][0]) == tuple(wanted[p][0])
                   and saved_tree[p][1] == wanted[p][1]}
        targets = {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        try:
            with _quiet():
                meta_tree = self._state_metadata(step)

                def item_leaf(path, _):
                    p = _path(path)
                    if p not in matched:
                        return ocp.PLACEHOLDER
                    t = targets[p]
                    sharding = getattr(t, "sharding", None) or jax.sharding.SingleDeviceSharding(
                        jax.local_devices()[0])
                    return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding)
                item = jax.tree_util.tree_map_with_path(item_leaf, meta_tree)
                args = jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding)
                    if isinstance(x, jax.ShapeDtypeStruct) else None,
                    item, is_leaf=lambda x: x is ocp.PLACEHOLDER)
                got = ocp.PyTreeCheckpointHandler().restore(
                    epath.Path(self.directory) / str(step) / "state",
                    args=ocp.args.PyTreeRestore(item, restore_args=args))
                got = jax.block_until_ready(got)
        except Exception as err:  # noqa: BLE001 - any read failure means "corrupt"
            raise _Corrupt(_one_line(err)) from err
        return {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(got)
                if _path(p) in matched}

    @staticmethod
    def _check_partial(values, init, wanted, record):
        if "meta" in record:       # leaf digests by path (format 2)
            paths = [p for p, _, _ in record["tree"]]
            saved = dict(zip(paths, record["digest"]))
            names = sorted(values)
            bad = [p for p, d in zip(names, state_digest([values[p] for p in names]))
                   if saved.get(p) != d]
            if bad:
                raise _Corrupt(f"restored arrays differ from the saved digest at {bad[:5]}")
        state = jax.tree_util.tree_map_with_path(
            lambda p, x: values.get(_path(p), x), init)
        return state, sorted(values), sorted(set(wanted) - set(values))

    def _corrupt(self, step: int, err: BaseException, *, bad_here: bool = True,
                 processes: list[int] | None = None) -> None:
        target = self._quarantine(step, bad_here=bad_here)
        where = (f" on process {processes}" if jax.process_count() > 1 and processes
                 else "")
        log.warning("checkpoint step %d in %s is unreadable or corrupt%s (%s); moved to %s, "
                    "falling back to the previous one", step, self.directory, where, err,
                    target)
        self.corrupt_steps.append(step)

    def _quarantine(self, step: int, *, bad_here: bool = True) -> str:
        """Moves ``<step>`` to the first free name of ``<step>.corrupt``, ``<step>.corrupt.1``,
        … (an earlier quarantine is never replaced); returns the name used.

        Multi-process: the step is moved in the view of every process that found it
        bad and by process 0 (a shared directory is moved once; a rename that lost
        the race to another process is fine), then all processes meet at a barrier
        before listing the directory again.
        """
        path = os.path.join(self.directory, str(step))
        target = path + ".corrupt"
        if bad_here or jax.process_index() == 0:
            target = _free_name(path + ".corrupt")
            for _ in range(3):
                if not os.path.isdir(path):
                    break              # another process of this run moved it first
                try:
                    os.rename(path, target)
                    break
                except OSError:        # lost a race for the name: take the next free one
                    target = _free_name(path + ".corrupt")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rlx_checkpoint_quarantine_{step}")
        with _quiet():
            self._manager.reload()
        return os.path.basename(target)


def saved_arrays(step_dir: str) -> dict[str, np.ndarray]:
    """Every array of one saved step (``<directory>/<step>``), read back as NumPy
    without a target structure, keyed by ``jax.tree_util.keystr`` of its path: for
    comparing two runs' saves leaf by leaf."""
    path = epath.Path(step_dir) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    meta = handler.metadata(path).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _free_name(target: str) -> str:
    name, n = target, 0
    while os.path.exists(name):
        n += 1
        name = f"{target}.{n}"
    return name


def _check_mode(mode: str) -> str:
    if mode not in MISMATCH_MODES:
        raise ValueError(f"on_mismatch={mode!r}: expected one of {MISMATCH_MODES}")
    return mode


def _verify(state: Any, record: dict) -> None:
    """Raises _Corrupt when ``state`` does not match the leaf digests saved with it."""
    if not record or "digest" not in record:
        return
    leaves = jax.tree_util.tree_leaves_with_path(state)
    got = state_digest(state)
    if "tree" in record:           # format 2: by path
        saved = {p: d for (p, _, _), d in zip(record["tree"], record["digest"])}
        bad = [_path(p) for (p, _), d in zip(leaves, got) if saved.get(_path(p)) != d]
    else:                          # format 1: by position, when the dtypes agree
        if _dtypes(state) != list(record.get("dtypes", [])):
            return
        want = list(record["digest"])
        bad = [_path(leaves[i][0]) for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if len(got) != len(want):
            bad.append(f"<{len(want)} saved leaves, {len(got)} restored>")
    if bad:
        raise _Corrupt("restored arrays differ from the saved digest at "
                       f"{bad[:5]}{' …' if len(bad) > 5 else ''}")


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with shardings, if given) describing ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


# ------------------------------------------------------------ fixed-length phases
@gin.configurable(module="rlx.train")
@dataclasses.dataclass(frozen=True)
class PhaseCheckpoints:
    """How the fixed-length phases checkpoint: the SFT warm-up, the reward model and
    DPO (the RL phase has its own settings in ``rlx.train.RLConfig``).

    Attributes:
      every_steps: save every N steps (None: by time only).
      every_minutes: also save once this many minutes passed since the last save
        (None: by steps only).
      keep: how many of the newest saves are kept (at least 1).
    The last step of a phase is always saved.
    """

    every_steps: int | None = 50
    every_minutes: float | None = 10.0
    keep: int = 2

    def __post_init__(self):
        if self.every_steps is not None and (
                isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int)
                or self.every_steps < 1):
            raise ValueError(f"PhaseCheckpoints.every_steps={self.every_steps!r}: must be an "
                             "integer >= 1 or None")
        if self.every_minutes is not None and (
                isinstance(self.every_minutes, bool)
                or not isinstance(self.every_minutes, (int, float))
                or not self.every_minutes > 0):
            raise ValueError(f"PhaseCheckpoints.every_minutes={self.every_minutes!r}: must "
                             "be > 0 or None")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"PhaseCheckpoints.keep={self.keep!r}: must be an integer >= 1 "
                             "(a run needs a checkpoint to resume from)")


class PhaseLoop:
    """Checkpoints and signal handling of one fixed-length training loop (SFT, reward
    model, DPO), so that a killed phase continues from its last save, bitwise::

        with PhaseLoop(directory, phase="the SFT warm-up", steps=n,
                       identity={...}) as loop:
            start, state, data_state, extra = loop.restore(state, shardings)
            for i in range(start, n):
                state = ...one step...
                loop.done(i + 1, state, data_state=..., extra=...)

    ``restore`` returns ``(0, state, None, {})`` when nothing is saved (and says on the
    console when it resumed). ``done`` saves when due (``PhaseCheckpoints``) and always
    after the last step; ``data_state`` is the JSON state of whatever draws the
    batches (an RNG), ``extra`` any JSON the loop needs back (logged history). A
    checkpoint of another state structure or ``identity`` raises
    ``CheckpointMismatch`` before any step (nothing is touched), or is handled as
    ``on_mismatch`` says (``Checkpointer``: "fresh" continues in a sibling directory,
    "partial" warm-starts from the matching leaves).

    SIGINT / SIGTERM (``rlx.train.signals``): the unfinished step is dropped, the save in
    flight finished, one line printed and ``signals.Interrupted`` raised. With
    ``directory=None`` nothing is saved (the signals are still handled).
    """

    def __init__(self, directory: str | None, *, phase: str, steps: int,
                 identity: dict | None = None, config: PhaseCheckpoints | None = None,
                 on_mismatch: str = "error"):
        self.phase, self.steps = phase, steps
        self.on_mismatch = _check_mode(on_mismatch)
        self.config = config if config is not None else PhaseCheckpoints()
        self.directory = directory
        self.identity = identity
        self.checkpointer: Checkpointer | None = None
        self.step = 0
        self.resumed_from: int | None = None
        self._guard_cm = None
        self.guard: signals.Guard | None = None

    def __enter__(self) -> "PhaseLoop":
        self._guard_cm = signals.guard(self.phase)
        self.guard = self._guard_cm.__enter__()
        try:
            if self.directory is not None:
                self.checkpointer = Checkpointer(
                    self.directory, every_steps=self.config.every_steps,
                    every_minutes=self.config.every_minutes, keep=self.config.keep,
                    identity=self.identity, on_mismatch=self.on_mismatch)
        except BaseException as err:
            self._guard_cm.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def restore(self, state: Any, shardings: Any = None) -> tuple[int, Any, dict | None, dict]:
        """(first step to run, state, data_state, extra) from the newest good save."""
        if self.checkpointer is None:
            return 0, state, None, {}
        with self.guard.deferred():
            found = self.checkpointer.restore_latest(
                abstract_like(state, shardings),
                init_state=state if self.on_mismatch == "partial" else None)
        if found is None:
            return 0, state, None, {}
        step, restored, data_state, extra = found
        self.step = self.resumed_from = int(step)
        if jax.process_index() == 0:
            print(f"resumed {self.phase} from checkpoint step {step} of {self.steps} in "
                  f"{self.checkpointer.directory}", flush=True)
        return int(step), restored, data_state, extra

    def done(self, step: int, state: Any, *, data_state: dict | None = None,
             extra: dict | None = None) -> None:
        """Step ``step`` (1-based) is complete: saves when due and after the last one."""
        self.guard.check()
        self.step = step
        if self.checkpointer is None:
            return
        with self.guard.deferred():
            if step >= self.steps:
                self.checkpointer.save(step, state, data_state, extra)
            else:
                self.checkpointer.maybe_save(step, state, data_state, extra)

    def _newest(self) -> str:
        if self.checkpointer is None:
            return "its start (this phase keeps no checkpoints)"
        steps = self.checkpointer.steps()
        return (f"checkpoint step {steps[-1]} in {self.checkpointer.directory}" if steps
                else f"the start of {self.phase} (no checkpoint yet)")

    def __exit__(self, kind, err, tb) -> bool:
        try:
            if isinstance(err, signals.Interrupted):
                signals.stop(err, phase=self.phase, step=self.step, total=self.steps,
                             wait=self.checkpointer.wait if self.checkpointer else None,
                             resume_from=self._newest)
            if self.checkpointer is not None and isinstance(err, signals.Interrupted):
                self.checkpointer.close()    # waited for above; a second signal exits now
            elif self.checkpointer is not None:
                try:
                    with self.guard.deferred():
                        self.checkpointer.close()
                except signals.Interrupted as late:
                    signals.stop(late, phase=self.phase, step=self.step, total=self.steps,
                                 resume_from=self._newest)
                    raise
        finally:
            self._guard_cm.__exit__(kind, err, tb)
        return False


def data_fingerprint(items) -> str:
    """SHA-256 (16 hex digits) of the ``repr`` of each item: what a phase trains on, for a
    checkpoint ``identity`` (another data set is a mismatch, not a resume)."""
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def tree_identity(tree: Any) -> str:
    """SHA-256 (16 hex digits) of a pytree's leaf digests (:func:`state_digest`): the
    values a phase starts from, for a checkpoint ``identity`` (a phase whose starting
    point changed — another SFT result, model or seed — is a mismatch, not a resume)."""
    return hashlib.sha256(json.dumps(state_digest(tree)).encode()).hexdigest()[:16]

"""The one module that knows the mesh: axis names, partition rules, batch sharding.

Mesh axes:
  data   — pure data parallelism (parameters replicated along it),
  fsdp   — data parallelism with parameters and optimizer state sharded along it
           (ZeRO-3 / FSDP style; XLA inserts the all-gathers),
  tensor — Megatron-style tensor parallelism of attention heads and MLP width.

Batches are sharded over ("data", "fsdp") on their leading (row) dimension.

Partition rules map a parameter path (see ``rlx/models/transformer.py``) to a
``PartitionSpec`` over those axes. A dimension whose size is not divisible by the
product of its mesh axes is replicated instead (recorded by ``explain``), so any
preset runs on any mesh shape. The rules in force come from ``partition_rules()``,
which gin configures: ``rlx.sharding.partition_rules.extra`` puts rules in front of
the built-in ``PARAM_RULES`` (first match wins, so they override), and
``rlx.sharding.partition_rules.rules`` replaces them, e.g.

    rlx.sharding.partition_rules.extra = (("embed/embedding$", (None, "fsdp")),)

The mesh shape is set by the recipe (``rlx.Experiment.mesh_shape``).

Several hosts: ``init_distributed`` starts ``jax.distributed`` (auto-detected launchers
or explicit flags; the CLI calls it first), ``host_value`` gathers arrays that span
processes, ``broadcast_bytes`` shares process 0's bytes. ``place`` gives every leaf
fresh buffers in its shards; ``hand_over`` lets an owner give up arrays that are already
in place, so that the next ``place`` moves them instead of copying.

``jax.pmap`` is in maintenance mode in current JAX: data parallelism is expressed as
``jit`` over sharded arrays, and ``shard_map`` with the ``BATCH_AXES`` axis names where
a statistic must be reduced explicitly.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Any, Sequence

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined path, spec for the array's dims). First match wins.
PARAM_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (r"embed/embedding$", ("tensor", "fsdp")),          # [V, D]
    (r"attn/(q|k|v)_proj/kernel$", ("fsdp", "tensor")),  # [D, H·Dh]
    (r"attn/(q|k|v)_proj/bias$", ("tensor",)),           # [H·Dh]
    (r"attn/o_proj/kernel$", ("tensor", "fsdp")),        # [H·Dh, D]
    (r"mlp/(gate|up)_proj/kernel$", ("fsdp", "tensor")),  # [D, F]
    (r"mlp/down_proj/kernel$", ("tensor", "fsdp")),      # [F, D]
    (r"lm_head/kernel$", ("fsdp", "tensor")),            # [D, V]
    (r"head/kernel$", ("fsdp", None)),                   # [D, 1]
    (r"(norm/scale|head/bias)$", ()),                    # replicated
)


def _check_rules(rules, field: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise ValueError(f"partition_rules.{field}[{i}]={rule!r}: expected a pair "
                             "(path regex, spec)")
        pattern, spec = rule
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"partition_rules.{field}[{i}]: bad path regex "
                             f"{pattern!r}: {err}") from None
        if not isinstance(spec, (tuple, list)):
            raise ValueError(f"partition_rules.{field}[{i}]: spec {spec!r} must be a tuple "
                             "with one entry per array dimension")
        for ax in spec:
            names = ax if isinstance(ax, (tuple, list)) else (ax,)
            if ax is not None and any(a not in AXES for a in names):
                raise ValueError(f"partition_rules.{field}[{i}]: spec {tuple(spec)!r} "
                                 f"names {ax!r}; mesh axes are {AXES} (or None)")
        out.append((pattern, tuple(tuple(a) if isinstance(a, list) else a for a in spec)))
    return tuple(out)


@gin.configurable(module="rlx.sharding")
def partition_rules(rules: Sequence = PARAM_RULES, *, extra: Sequence = ()
                    ) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The partition rules in force: ``extra + rules`` (first match wins), validated.

    Each rule is ``(regex on the '/'-joined parameter path, spec)`` where the spec has
    one entry per array dimension: a mesh axis of ``AXES``, a tuple of axes, or None
    (replicated); missing trailing entries are None. Raises ValueError naming a rule
    with a bad regex or an unknown axis.
    """
    return _check_rules(extra, "extra") + _check_rules(rules, "rules")


def make_mesh(shape: Sequence[int] | None = None, *, axes: Sequence[str] = AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ``shape`` (default: all devices on ``data``) over ``axes``.

    A shape entry of -1 takes the remaining devices, e.g. ``(-1, 1, 2)``.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    shape = list(shape) if shape is not None else [n] + [1] * (len(axes) - 1)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axes {tuple(axes)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"have {n}")
    return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def path_string(path) -> str:
    parts = []
    for p in path:
        for attr in ("key", "idx", "name"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=None) -> P:
    """PartitionSpec for one parameter (replicating non-divisible dims); ``rules``
    default to ``partition_rules()``."""
    path = re.sub(r"/value$", "", path)  # nnx.Variable leaves flatten to .../value
    for pattern, spec in (partition_rules() if rules is None else rules):
        if re.search(pattern, path):
            spec = tuple(spec) + (None,) * (len(shape) - len(spec))
            spec = spec[:len(shape)]
            fixed = tuple(ax if ax is not None and dim % _axis_size(mesh, ax) == 0 else None
                          for ax, dim in zip(spec, shape))
            return P(*fixed)
    return P()


def param_shardings(params, mesh: Mesh, rules=None):
    """A pytree of NamedShardings matching ``params`` (any pytree whose paths end in
    parameter names — optimizer states that mirror params get the same specs);
    ``rules`` default to ``partition_rules()``."""
    rules = partition_rules() if rules is None else rules

    def one(path, x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, spec_for(path_string(path), tuple(shape), mesh, rules))
    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes, other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Places every array leaf of ``batch`` with rows sharded over the batch axes.

    Scalars are replicated. On multi-host runs each process passes its global batch
    (identical on all hosts) and keeps only its addressable shards; leaves that are
    already global arrays (outputs of jitted functions) are resharded on device.
    """
    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = replicated(mesh) if x.ndim == 0 else batch_sharding(mesh, x.ndim)
        if x.ndim and x.shape[0] % _axis_size(mesh, BATCH_AXES):
            raise ValueError(f"batch rows {x.shape[0]} not divisible by the data-parallel "
                             f"size {_axis_size(mesh, BATCH_AXES)} of mesh {dict(mesh.shape)}")
        if _spans_processes(x):      # e.g. a jitted function's output on multi-host
            return jax.device_put(x, sharding)
        if jax.process_count() > 1:
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.device_put(x, sharding)
    return jax.tree.map(put, batch)


def explain(params, mesh: Mesh, rules=None) -> list[str]:
    """Human-readable table of path -> shape -> spec (for logs and BUILD_NOTES)."""
    rules = partition_rules() if rules is None else rules
    lines = []
    def one(path, x):
        s = path_string(path)
        lines.append(f"{s:60s} {str(tuple(x.shape)):20s} {spec_for(s, tuple(x.shape), mesh, rules)}")
    jax.tree_util.tree_map_with_path(one, params)
    return lines


def data_parallel_size(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def state_shardings(state, mesh: Mesh, rules=None):
    """Shardings for a whole training state: parameter-like leaves (params and the
    optimizer moments that mirror them) by the rules (default ``partition_rules()``,
    i.e. the gin-configured ones), everything else replicated."""
    return param_shardings(state, mesh, rules)


def place(tree, shardings):
    """device_put a pytree onto matching shardings (works on multi-host too).

    Every leaf gets fresh buffers (the steps donate their state, which must not delete
    the caller's arrays) and goes straight into its shards: a host array is sliced on
    the host, a device array is resharded, never gathered whole onto one device first.
    The exception are arrays given up with ``hand_over`` that already have their
    target sharding: those are moved (returned as they are), so handing a state built
    in its shards to an owner that places it costs no second copy. On multi-host runs
    leaves are host values, process-local arrays, or global arrays that span other
    processes (e.g. the parameters of an earlier sharded phase), which are resharded on
    device since no single host holds their value.
    """
    multi = jax.process_count() > 1

    def put(x, s):
        if _take_handed(x, s):
            return x
        if not multi or _spans_processes(x):
            return _fresh_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def _buffers(x) -> set[int]:
    if isinstance(x, jax.Array):
        return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
    if isinstance(x, np.ndarray):
        return {x.ctypes.data}
    return set()


def _fresh_put(x, sharding):
    """``device_put(x, sharding)`` in buffers of its own. ``may_alias=False`` is not
    enough: a put that replicates a one-device array keeps the source buffer as the
    shard on its own device (jax 0.10), so such a shard is copied once more."""
    y = jax.device_put(x, sharding, may_alias=False)
    source = _buffers(x)
    if source and any(s.data.unsafe_buffer_pointer() in source for s in y.addressable_shards):
        y = jax.jit(lambda a: a.copy(), out_shardings=sharding)(y)
    return y


#: id(array) -> weak reference, for the arrays given up with ``hand_over``.
_HANDED: dict[int, weakref.ref] = {}


def hand_over(tree):
    """Marks the device arrays of ``tree`` as given up by their owner and returns
    ``tree``: the next ``place`` of each onto the sharding it already has moves it
    instead of copying it. The caller must not use those arrays afterwards (the new
    owner's steps may donate, i.e. delete, them)."""
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            key = id(x)
            _HANDED[key] = weakref.ref(x, lambda _, key=key: _HANDED.pop(key, None))
    return tree


def _take_handed(x, sharding) -> bool:
    """True (and forgets the mark) when ``x`` was handed over and already lies in
    ``sharding``."""
    ref = _HANDED.get(id(x))
    if ref is None or ref() is not x:
        return False
    del _HANDED[id(x)]
    try:
        return x.sharding.is_equivalent_to(sharding, x.ndim)
    except (AttributeError, TypeError, ValueError):
        return False


def _spans_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def host_value(tree):
    """NumPy copies of every leaf, identical on every process.

    A global array that spans other processes (multi-host) is all-gathered
    (``process_allgather``, a collective: every process must call this together);
    anything else is fetched locally.
    """
    def get(x):
        if _spans_processes(x):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)


def broadcast_bytes(blob: bytes | None) -> bytes:
    """Process 0's ``blob`` on every process (a collective: all processes call it; the
    others may pass None). Single-process: ``blob`` itself."""
    if jax.process_count() == 1:
        return b"" if blob is None else bytes(blob)
    mine = bytes(blob or b"") if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(mine), np.int64)))
    buf = np.frombuffer(mine, np.uint8) if mine else np.zeros((n,), np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8).tobytes()


# ------------------------------------------------------------------- several hosts
def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the multi-process launcher this process runs under, as
    jax's own cluster detection sees it (``jax._src.clusters``: Cloud TPU pods on GCE
    and GKE, SLURM, Open MPI, Kubernetes, ...; opt-in methods such as mpi4py are not
    probed), or None outside any."""
    try:
        from jax._src import clusters
    except ImportError:          # a jax without the module: no auto-detection
        return None
    import warnings

    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            with warnings.catch_warnings():    # e.g. "Kubernetes without its package"
                warnings.simplefilter("ignore")
                if not env.is_env_present():
                    continue
                count = int(env.get_process_count())
        except Exception:       # noqa: BLE001 - a half-present environment is not one
            continue
        return getattr(env, "name", "") or env.__name__, count
    return None


def init_distributed(coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None, *,
                     initialization_timeout: int = 300) -> int:
    """Starts ``jax.distributed`` when this process is one of several; returns the
    process count. Call it before anything touches a device (the mesh, an array).

    Explicit (``rlx train --coordinator_address HOST:PORT --num_processes N
    --process_id I``): ``num_processes`` and ``process_id`` are required together (the
    address may come from ``JAX_COORDINATOR_ADDRESS``); N = 1 starts nothing. Otherwise
    the launcher is auto-detected (``detect_cluster``) and, when it runs more than one
    process, ``jax.distributed.initialize()`` reads everything from it. A single plain
    process starts nothing. Idempotent: an initialised runtime is left as it is.
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if num_processes is None or process_id is None:
            raise ValueError("--num_processes and --process_id are needed together (with "
                             "--coordinator_address or JAX_COORDINATOR_ADDRESS), got "
                             f"num_processes={num_processes!r}, process_id={process_id!r}")
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
                or num_processes < 1:
            raise ValueError(f"num_processes={num_processes!r}: must be an integer >= 1")
        if isinstance(process_id, bool) or not isinstance(process_id, int) \
                or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id!r}: must be in [0, {num_processes})")
        if num_processes == 1:
            return 1
        address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            raise ValueError("several processes need --coordinator_address HOST:PORT (or "
                             "JAX_COORDINATOR_ADDRESS): process 0's address")
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id,
                                   initialization_timeout=initialization_timeout)
        return jax.process_count()
    found = detect_cluster()
    if found is None or found[1] <= 1:
        return 1
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
    return jax.process_count()

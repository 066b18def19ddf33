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

``jax.pmap`` is in maintenance mode in current JAX: data parallelism is expressed as
``jit`` over sharded arrays, and ``shard_map`` with the ``BATCH_AXES`` axis names where
a statistic must be reduced explicitly.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
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

    Leaves are host values, process-local arrays, or (multi-host) global arrays that
    span other processes, e.g. the parameters of an earlier sharded phase; those are
    resharded on device, since no single host holds their value.
    """
    if jax.process_count() > 1:
        def put(x, s):
            if _spans_processes(x):
                # A fresh buffer (may_alias=False): the steps donate their state.
                return jax.device_put(x, s, may_alias=False)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.tree.map(put, tree, shardings)
    # Copy first: a replicated put may alias the source buffer on its own device, and
    # the steps donate their state, which would delete the caller's arrays.
    tree = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    return jax.device_put(tree, shardings)


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

"""Reusing the KV cache's memory from one ``generate`` call to the next (CPU backend).

Every ``generate`` call builds a fresh per-row KV cache (the largest buffers of a
rollout: 33.5 MB on the issue-16 workload, gigabytes for long rollouts of large
models) and drops it when the decode ends. On the CPU backend the freed multi-MiB
buffers go back to the operating system (glibc unmaps them or trims its heap), so the
next call first-touches new pages: page faults for every 4 KiB the cache's zeros are
written to. Measured on the issue-16 workload: ``generate`` with the 64-slot cache
cost 2–17 ms more CPU time than with a 1-slot one (median ≈ 16 ms, as much as the
prefill's own compute, and its largest source of variance); with glibc told to keep
freed memory (``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` raised) the
difference is ≈ 1 ms.

``generate`` therefore keeps the per-row buffers its decode hands back and donates
them to the next ``prefill`` of the same shapes: XLA writes the new cache's zeros (or
the copied prompt slots of the "repeat"/"reprefill" layouts) into memory that is
already mapped. The contents are never read (``prefill`` overwrites every slot), only
the memory is taken over. The first call of a shape donates freshly allocated
buffers, so ``prefill`` is compiled once per shape, with the same argument structure
on every call.

Held buffers are process-wide, keyed by the model (its graphdef object), the sampler
config, the mesh and the prompt shape, at most ``MAX_ENTRIES`` entries and
``MAX_BYTES`` bytes in all; accelerator backends (whose allocators pool freed device
memory themselves) never hold any. ``clear()`` drops everything held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MAX_ENTRIES = 4
MAX_BYTES = 1 << 30

_lock = threading.Lock()
_held: OrderedDict[tuple, tuple[Any, tuple[jax.Array, ...]]] = OrderedDict()


def enabled(mesh: Mesh | None) -> bool:
    """Whether buffers are recycled for rollouts on ``mesh`` (default device: None)."""
    devices = mesh.devices.flat if mesh is not None else [jax.devices()[0]]
    return all(d.platform == "cpu" for d in devices)


def _key(graphdef, rest: tuple) -> tuple:
    return (id(graphdef),) + rest


def take(graphdef, rest: tuple) -> tuple[jax.Array, ...] | None:
    """The buffers held for (``graphdef``, ``rest``), removed from the pool, or None."""
    with _lock:
        entry = _held.pop(_key(graphdef, rest), None)
    if entry is None or entry[0] is not graphdef:
        return None
    buffers = entry[1]
    if any(x.is_deleted() for x in buffers):
        return None
    return buffers


def _rows_sharding(mesh: Mesh, data_axis, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(data_axis, *([None] * (ndim - 1))))


def _as_placed(x: jax.Array, mesh: Mesh | None, data_axis) -> jax.Array | None:
    """``x`` labelled with the sharding ``fresh`` gives (so that ``prefill`` sees the
    same input shardings on every call and compiles once), without moving data; None
    where that would need a copy. XLA reports a one-device mesh's outputs as
    replicated (P()), which is the same placement as rows over a size-1 axis."""
    if mesh is None:
        return x
    target = _rows_sharding(mesh, data_axis, x.ndim)
    if x.sharding == target:
        return x
    if not x.sharding.is_equivalent_to(target, x.ndim):
        return None
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [s.data for s in x.addressable_shards])


def give(graphdef, rest: tuple, buffers: tuple[jax.Array, ...], mesh: Mesh | None = None,
         data_axis="data") -> None:
    """Holds ``buffers`` for the next ``take`` of (``graphdef``, ``rest``), within the
    pool's limits (the oldest entries are dropped first)."""
    size = sum(x.nbytes for x in buffers)
    if size > MAX_BYTES:
        return
    buffers = tuple(_as_placed(x, mesh, data_axis) for x in buffers)
    if any(x is None for x in buffers):
        return
    with _lock:
        _held[_key(graphdef, rest)] = (graphdef, tuple(buffers))
        while len(_held) > MAX_ENTRIES or \
                sum(x.nbytes for _, bs in _held.values() for x in bs) > MAX_BYTES:
            _held.popitem(last=False)


def clear() -> None:
    """Drops every held buffer."""
    with _lock:
        _held.clear()


def fresh(avals, mesh: Mesh | None, data_axis) -> tuple[jax.Array, ...]:
    """New zero buffers of the given (shape, dtype) pairs, rows (axis 0) split over
    ``data_axis`` when a mesh is given: what the first call of a shape donates."""
    return tuple(jnp.zeros(shape, dtype) if mesh is None else
                 jnp.zeros(shape, dtype, device=_rows_sharding(mesh, data_axis, len(shape)))
                 for shape, dtype in avals)

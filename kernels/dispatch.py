"""Backend selection for rlx's Pallas kernels.

Every public kernel wrapper takes ``backend="auto" | "tpu" | "gpu" | "reference"``
and calls :func:`resolve_backend`, which returns the path to run and how to run it
(compiled or Pallas interpret mode).

Precedence, first match wins:

1. an explicit ``backend=`` argument other than ``"auto"`` at the call site;
2. the innermost :func:`force_backend` context (thread-local);
3. the process-wide override set with :func:`set_backend`;
4. the environment variable ``RLX_KERNEL_BACKEND`` (read at every call);
5. ``"auto"``: ``jax.default_backend()`` -- ``"tpu"`` runs the Mosaic TPU kernel,
   ``"gpu"`` (CUDA or ROCm) the Triton kernel, anything else (CPU) the pure-jnp
   reference.

A kernel path forced on a platform that cannot compile it runs in Pallas
interpret mode instead: the TPU kernel with ``pltpu.InterpretParams()`` (which
emulates TPU memory semantics on CPU, e.g. uninitialised out-of-bounds block
padding) and the GPU kernel with ``interpret=True``. This is how the tests check
both kernels on CPU. Interpret mode is for correctness only; it is slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Iterator, Literal

import jax
from jax.experimental.pallas import tpu as pltpu

Backend = Literal["auto", "tpu", "gpu", "reference"]
ENV_VAR = "RLX_KERNEL_BACKEND"
BACKENDS = ("auto", "tpu", "gpu", "reference")

_global_override: str | None = None
_local = threading.local()


def _check(name: str | None, what: str) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")


def set_backend(name: Backend | None) -> None:
    """Sets (or with ``None`` clears) the process-wide backend override."""
    global _global_override
    _check(name, "backend")
    _global_override = None if name == "auto" else name


def get_backend_override() -> str | None:
    """The override currently in force (context, then global, then env), or None."""
    stack = getattr(_local, "stack", [])
    for name in reversed(stack):
        if name != "auto":
            return name
    if _global_override is not None:
        return _global_override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        _check(env, f"environment variable {ENV_VAR}")
        return None if env == "auto" else env
    return None


@contextlib.contextmanager
def force_backend(name: Backend) -> Iterator[None]:
    """Context manager forcing a backend for calls that pass ``backend="auto"``.

    Selection happens at trace time: a function jitted inside the context keeps
    the backend it was traced with.
    """
    _check(name, "backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The path to run: ``kind`` in {"tpu", "gpu", "reference"} and the value for
    ``pl.pallas_call(interpret=...)`` (False when compiled for the platform)."""

    kind: str
    interpret: Any = False

    @property
    def is_kernel(self) -> bool:
        return self.kind != "reference"


def resolve_backend(backend: Backend = "auto", *, platform: str | None = None) -> Resolved:
    """Resolves ``backend`` with the precedence in the module docstring.

    ``platform`` defaults to ``jax.default_backend()`` (overridable for tests).
    """
    _check(backend, "backend")
    platform = jax.default_backend() if platform is None else platform
    name = backend if backend != "auto" else (get_backend_override() or "auto")
    if name == "auto":
        name = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(
            platform, "reference"
        )
    if name == "reference":
        return Resolved("reference")
    if name == "tpu":
        return Resolved("tpu", False if platform == "tpu" else pltpu.InterpretParams())
    return Resolved("gpu", not (platform in ("gpu", "cuda", "rocm")))


def _varying(x) -> frozenset:
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset() if mat is None else mat.varying


def match_varying(*arrays):
    """Casts every array to vary over the union of the mesh axes any of them varies
    over (a no-op outside ``shard_map``). Pallas interpret mode under
    ``shard_map(check_vma=True)`` needs all kernel operands to agree; the
    transpose of the cast sums gradients of replicated operands over devices."""
    varying = frozenset().union(*(_varying(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(varying - _varying(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return tuple(out)


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct`` for a ``pallas_call`` output.

    Under ``shard_map(check_vma=True)`` Pallas needs each output's manual-axis
    type: the output varies over every mesh axis any of ``like`` varies over.
    Outside ``shard_map`` the (empty) type is ignored.
    """
    varying = frozenset().union(*(_varying(x) for x in like))
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying)
    )

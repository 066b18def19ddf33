"""Reward functions named by import path, loaded the same way in the trainer and in the
reward worker processes.

A *reference* names a function in a user's module (``reward_spec(names=...)``,
``RewardComponent(name)`` or ``RewardComponent(label, ref=...)``):

- ``"my_rewards.brevity"`` or ``"my_rewards:brevity"``: module ``my_rewards`` —
  importable from ``sys.path``, or a ``my_rewards.py`` / ``my_rewards/`` package in the
  current directory (``rlx train`` does not put the current directory on ``sys.path``;
  the loader appends it when the module is found there) — attribute ``brevity``.
  ``"pkg.mod:Scorer.method"`` names a nested attribute.
- ``"/tmp/x/my_rewards.py:brevity"`` (or a relative ``"rewards/my_rewards.py:brevity"``):
  a file, loaded by path as a private module; its directory is appended to ``sys.path``
  so it can import its neighbours.

**Per-sample or batched.** A reward function is per-sample,
``fn(completion: str, problem) -> float``, unless it is decorated with ``@batched``
(``fn(completions: list[str], problems: list) -> list[float]``, one value per sample,
in order) or its component is built with ``batched=True`` (for a function you cannot
decorate). A batched function is called once per chunk of the pool's work (a
contiguous slice of the batch in input order; see ``RewardPool(chunk_size=...)``).

**Crossing into worker processes.** A component named by a reference is pickled as its
(absolute) reference, and the worker imports the module itself. Functions passed as
``fn=`` pickle through ``dumps``: module-level functions by module and name as usual,
but functions of the parent's ``__main__`` (a training script) and of modules loaded
by file path go as file path + qualified name; the worker imports the script under the
name ``__rlx_main__``, so its ``if __name__ == "__main__":`` block does not run (the
same rule as multiprocessing's ``spawn``: keep work in a script behind that guard).
Lambdas and closures do not pickle.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import os
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

MAIN_ALIAS = "__rlx_main__"
_FILE_MODULES: dict[str, str] = {}  # module name -> absolute path, for modules loaded from files


def batched(fn: Callable) -> Callable:
    """Marks ``fn(completions, problems) -> list[float]`` as a batched reward function."""
    if not callable(fn):
        raise ValueError(f"batched: expected a callable, got {fn!r}")
    fn.__rlx_batched__ = True
    return fn


def is_batched(fn: Callable) -> bool:
    """True when ``fn`` (or the function a ``functools.partial`` wraps) is ``@batched``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return bool(getattr(fn, "__rlx_batched__", False))


def is_reference(name: Any) -> bool:
    """Whether a component name reads as an import path rather than a registry name."""
    return isinstance(name, str) and any(ch in name for ch in ".:/" + os.sep)


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def resolve(ref: str) -> tuple[Callable, str]:
    """Loads the callable ``ref`` names; returns it and the canonical reference
    (``"module:attr"`` or ``"/abs/path.py:attr"``) that loads it in another process."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"reward reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    if ":" in ref:
        target, _, attr = ref.rpartition(":")
        if not target or not attr:
            raise ValueError(f"reward reference {ref!r}: expected 'module:function' or 'file.py:function'")
        if _is_file_target(target):
            path = os.path.abspath(os.path.expanduser(target))
            module = load_file(path, ref=ref)
            return _attr(module, attr, ref), f"{path}:{attr}"
        module = _import(target, ref)
        return _attr(module, attr, ref), f"{target}:{attr}"
    if _is_file_target(ref):
        raise ValueError(f"reward reference {ref!r}: a file needs a function name, e.g. {ref}:my_reward")
    parts = ref.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"reward reference {ref!r}: expected 'module.function'")
    missing = None
    for cut in range(len(parts) - 1, 0, -1):  # longest importable module prefix
        target, attr = ".".join(parts[:cut]), ".".join(parts[cut:])
        try:
            module = _import(target, ref, quiet=True)
        except ModuleNotFoundError as e:
            missing = missing or e
            continue
        return _attr(module, attr, ref), f"{target}:{attr}"
    raise ValueError(
        f"reward reference {ref!r}: cannot import {parts[0]!r} ({missing}); searched sys.path "
        f"and the current directory {os.getcwd()}"
    )


def load_reference(ref: str) -> Callable:
    """The callable a reference names (see ``resolve``)."""
    return resolve(ref)[0]


def _attr(module: types.ModuleType, attr: str, ref: str) -> Callable:
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module.__name__
            raise ValueError(f"reward reference {ref!r}: {where} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"reward reference {ref!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _on_path(directory: str) -> bool:
    directory = os.path.abspath(directory)
    return any(os.path.abspath(p or os.curdir) == directory for p in sys.path)


def _append_path(directory: str) -> None:
    if not _on_path(directory):
        sys.path.append(os.path.abspath(directory))


def _import(name: str, ref: str, *, quiet: bool = False) -> types.ModuleType:
    """``import_module(name)``, retried with the current directory on ``sys.path``.

    ``quiet``: let ``ModuleNotFoundError`` for ``name`` itself (or a parent package)
    through, for the caller to try another split; any other import failure is a
    ValueError naming the reference.
    """
    def attempt():
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise  # the module itself is missing (not something it imports)
            raise ValueError(f"reward reference {ref!r}: importing {name!r} raised {type(e).__name__}: {e}") from e
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module top level
            raise ValueError(f"reward reference {ref!r}: importing {name!r} raised {type(e).__name__}: {e}") from e

    try:
        return attempt()
    except ModuleNotFoundError as e:
        top = name.partition(".")[0]
        cwd = os.getcwd()
        here = os.path.isfile(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))
        if e.name == top and here and not _on_path(cwd):
            _append_path(cwd)
            return attempt()
        if quiet:
            raise
        raise ValueError(
            f"reward reference {ref!r}: cannot import {name!r} ({e}); searched sys.path and "
            f"the current directory {cwd}"
        ) from None


def load_file(path: str, *, ref: str | None = None, module_name: str | None = None) -> types.ModuleType:
    """Imports the Python file ``path`` (once per process) as a private module."""
    path = os.path.abspath(path)
    label = ref or path
    for name, p in _FILE_MODULES.items():
        if p == path and name in sys.modules:
            return sys.modules[name]
    if not os.path.isfile(path):
        raise ValueError(f"reward reference {label!r}: file {path} does not exist")
    stem = os.path.splitext(os.path.basename(path))[0]
    known = sys.modules.get(stem)
    if module_name is None and known is not None and os.path.abspath(getattr(known, "__file__", "") or "") == path:
        return known  # the user imported it by name already
    if module_name is None:
        digest = hashlib.sha1(path.encode()).hexdigest()[:8]
        module_name = f"_rlx_reward_file_{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward reference {label!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    _append_path(os.path.dirname(path))
    sys.modules[module_name] = module
    _FILE_MODULES[module_name] = path
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module top level
        sys.modules.pop(module_name, None)
        _FILE_MODULES.pop(module_name, None)
        raise ValueError(f"reward reference {label!r}: importing {path} raised {type(e).__name__}: {e}") from e
    return module


def _from_file(path: str, qualname: str, module_name: str | None) -> Any:
    return _attr(load_file(path, module_name=module_name), qualname, f"{path}:{qualname}")


def _from_module(module: str, qualname: str) -> Any:
    return _attr(_import(module, f"{module}:{qualname}"), qualname, f"{module}:{qualname}")


class _Pickler(pickle.Pickler):
    """Pickles functions and classes of ``__main__`` and of file-loaded modules by path."""

    def reducer_override(self, obj):
        if not isinstance(obj, (types.FunctionType, type)):
            return NotImplemented
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if "<" in qualname:  # <lambda>, <locals>: let pickle raise its own error
            return NotImplemented
        if module in _FILE_MODULES:
            return _from_file, (_FILE_MODULES[module], qualname, module)
        if module == MAIN_ALIAS and MAIN_ALIAS in _FILE_MODULES:
            return _from_file, (_FILE_MODULES[MAIN_ALIAS], qualname, MAIN_ALIAS)
        if module != "__main__":
            return NotImplemented
        main = sys.modules.get("__main__")
        spec_name = getattr(getattr(main, "__spec__", None), "name", None)
        if spec_name and spec_name != "__main__":  # python -m pkg.module
            return _from_module, (spec_name, qualname)
        main_file = getattr(main, "__file__", None)
        if not main_file:
            raise pickle.PicklingError(
                f"{qualname} is defined in an interactive __main__ (no file to import in a "
                "worker); define it in a module and name it by import path"
            )
        return _from_file, (os.path.abspath(main_file), qualname, MAIN_ALIAS)


def dumps(obj: Any) -> bytes:
    """``pickle.dumps`` that sends ``__main__`` / file-module functions by path."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()

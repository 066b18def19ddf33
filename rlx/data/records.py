"""User data: JSON Lines / Parquet records -> a seeded, sharded, checkpointable grain pipeline.

Two record kinds:

- ``"prompt"``: ``{"prompt": str, "answer": str | int | float}`` -> ``rlx.tasks.Problem``
  (so the reward functions score user data exactly like generated tasks). The answer is
  converted with ``str``; booleans are rejected.
- ``"preference"``: ``{"prompt": str, "chosen": str, "rejected": str}`` ->
  ``PreferencePair``.

Other fields are kept in ``meta`` together with ``source`` (the file) and ``line`` (1-based
line of a JSONL file, row of a Parquet file). Field names can be remapped
(``prompt_key="question"``). A malformed record raises ``RecordError`` whose message
starts with ``path:line:`` and names the field: bad JSON, a non-object line, a missing
field, a field of the wrong type, an empty prompt. Blank lines are skipped.

Files ending in ``.parquet`` are read with pyarrow, which rlx does not depend on; without
it, reading one raises ImportError saying ``pip install pyarrow``. Every other file is
read as JSON Lines.

Pipeline (``records_dataset``): ``grain.MapDataset.source(records)[shard_index::
shard_count].shuffle(seed).repeat(num_epochs)`` and a map that stores the epoch number in
``meta["epoch"]``. grain's shuffle reseeds each epoch (seed + epoch), so every epoch is a
different deterministic permutation. ``records_iterator`` returns the grain
``DatasetIterator``, whose ``get_state()`` / ``set_state()`` checkpoint the position
(``{"next_index": i}``), so a resumed run continues with the same records.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import gin
import grain

from rlx.tasks.base import Problem

KINDS = ("prompt", "preference")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


class RecordError(ValueError):
    """A malformed record; ``path``, ``line`` (1-based) and ``field`` (or None)."""

    def __init__(self, path: str, line: int, message: str, field: str | None = None, unit: str = "line"):
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{path}:{line}: {message}" if unit == "line" else f"{path} row {line}: {message}")


def _rows_jsonl(path: str) -> Iterable[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None


def _rows_parquet(path: str) -> Iterable[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading the Parquet file {path} needs pyarrow, which is not installed: "
            "pip install pyarrow (or convert the file to JSON Lines)"
        ) from None
    for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield row, record


def _text(record: dict, key: str, path: str, line: int, unit: str, *, allow_numbers: bool = False) -> str:
    if key not in record:
        raise RecordError(path, line, f"missing field {key!r} (fields: {sorted(record)})", key, unit)
    value = record[key]
    if isinstance(value, str):
        return value
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = "a string or a number" if allow_numbers else "a string"
    raise RecordError(path, line, f"field {key!r} must be {expected}, got {type(value).__name__}", key, unit)


def read_records(
    path: str | os.PathLike,
    *,
    kind: str = "prompt",
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
) -> list[Problem] | list[PreferencePair]:
    """Reads and validates every record of one file (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    parquet = path.endswith(".parquet")
    unit = "row" if parquet else "line"
    out: list = []
    for line, record in (_rows_parquet if parquet else _rows_jsonl)(path):
        if not isinstance(record, dict):
            raise RecordError(path, line, f"expected a JSON object, got {type(record).__name__}", None, unit)
        prompt = _text(record, prompt_key, path, line, unit)
        if not prompt.strip():
            raise RecordError(path, line, f"field {prompt_key!r} is empty", prompt_key, unit)
        if kind == "prompt":
            used = (prompt_key, answer_key)
            answer = _text(record, answer_key, path, line, unit, allow_numbers=True)
        else:
            used = (prompt_key, chosen_key, rejected_key)
            chosen = _text(record, chosen_key, path, line, unit)
            rejected = _text(record, rejected_key, path, line, unit)
        meta = {k: v for k, v in record.items() if k not in used}
        meta.update(source=path, line=line)
        if kind == "prompt":
            out.append(Problem(prompt, answer, meta))
        else:
            out.append(PreferencePair(prompt, chosen, rejected, meta))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def _with_epoch(index: int, record, *, length: int):
    return dataclasses.replace(record, meta={**record.meta, "epoch": index // length})


@gin.configurable(module="rlx.data")
def records_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    kind: str = "prompt",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    **keys: str,
) -> grain.MapDataset:
    """A grain ``MapDataset`` over the records of ``paths`` (one file or several, in order).

    Args:
      kind: ``"prompt"`` or ``"preference"``.
      seed: shuffle seed (epoch ``e`` uses ``seed + e``), in ``[0, 2**32)``.
      shuffle: shuffle within each epoch.
      num_epochs: epochs to repeat; None repeats forever.
      shard_index, shard_count: this process's shard (records ``shard_index::shard_count``);
        None for both takes ``jax.process_index()`` / ``jax.process_count()``.
      **keys: field-name remapping (``prompt_key``, ``answer_key``, ``chosen_key``,
        ``rejected_key``).
    """
    if shard_index is None and shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records: list = []
    for p in paths:
        records.extend(read_records(p, kind=kind, **keys))
    ds = grain.MapDataset.source(records)[shard_index::shard_count]
    n = len(ds)
    if n == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} is empty ({len(records)} records)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    # A partial of a module-level function (not a lambda) keeps the pipeline picklable
    # for grain's multiprocessing prefetch.
    return ds.map_with_index(functools.partial(_with_epoch, length=n))


def records_iterator(paths, **kwargs) -> grain.DatasetIterator:
    """``iter(records_dataset(paths, **kwargs))`` without reader threads; checkpoint it
    with ``get_state()`` / ``set_state()``."""
    ds = records_dataset(paths, **kwargs)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

"""User data: JSON Lines / Parquet records -> a seeded, sharded, checkpointable grain pipeline.

Two record kinds:

- ``"prompt"``: ``{"prompt": str, "answer": str | int | float}`` -> ``rlx.tasks.Problem``
  (so the reward functions score user data exactly like generated tasks). The answer is
  converted with ``str``; booleans are rejected.
- ``"preference"``: ``{"prompt": str, "chosen": str, "rejected": str}`` ->
  ``PreferencePair``.

Other fields are kept in ``meta`` together with ``source`` (the file) and ``line`` (1-based
line of a JSONL file, row of a Parquet file). Field names can be remapped
(``prompt_key="question"``). Bad input raises ``RecordError`` (a ``ValueError``) whose
message starts with ``path:line:`` (JSONL), ``path row N:`` (Parquet) or ``path:`` (the
whole file) and names the field or column:

- JSONL: bytes that are not UTF-8 (the byte and its offset are named), bad JSON (also
  nesting beyond Python's recursion limit and integers beyond its digit limit), a
  non-object line, ``NaN`` / ``Infinity`` anywhere in the record (Python's ``json``
  accepts them; they are not JSON, and a non-finite answer could never be matched), a
  line longer than ``max_record_bytes`` (read with a bounded ``readline``, so a huge
  line is refused before it is held in memory whole). A UTF-8 byte-order mark on the
  first line and blank lines are skipped.
- Parquet: an unreadable file (not Parquet, truncated, corrupt pages; page checksums are
  verified where the writer stored them), a missing column, a column of the wrong type
  (text fields must be string columns, dictionary-encoded or not; the answer a string,
  integer or floating-point column), a row whose string values exceed
  ``max_record_bytes``. NaN in other float columns is kept (Parquet's usual missing
  value); a null or non-finite value in a used field is refused.
- Both: a missing field, a field of the wrong type or null, an empty prompt, a file with
  no records, a path that is not a file.

Files ending in ``.parquet`` are read with pyarrow (the ``data`` extra,
``pip install 'rlx[data]'``); without it, reading one raises ImportError saying
``pip install pyarrow``. Every other file is read as JSON Lines.

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
import math
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
    """A malformed record or data file; ``path``, ``line`` (1-based line or row, None for
    the whole file) and ``field`` (or None)."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None,
                 unit: str = "line"):
        self.path, self.line, self.field = path, line, field
        if line is None:
            text = f"{path}: {message}"
        elif unit == "line":
            text = f"{path}:{line}: {message}"
        else:
            text = f"{path} row {line}: {message}"
        super().__init__(text)


def _preview(raw: bytes) -> str:
    head = raw[:40].decode("utf-8", errors="replace")
    return repr(head + ("..." if len(raw) > 40 else ""))


def _non_finite(value: Any) -> tuple[str, float] | None:
    """``(where, x)`` for the first NaN/Infinity float inside a parsed JSON value."""
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where, v
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def _rows_jsonl(path: str, max_record_bytes: int) -> Iterable[tuple[int, Any]]:
    with open(path, "rb") as f:
        lineno = 0
        while True:
            # A bounded read: a 10 GB line is refused after max_record_bytes + 1 bytes.
            raw = f.readline(max_record_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                raise RecordError(
                    path, lineno,
                    f"record is larger than max_record_bytes={max_record_bytes} bytes "
                    f"(starts {_preview(raw)}); shorten it or raise max_record_bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(
                    path, lineno,
                    f"not valid UTF-8: byte {raw[e.start]:#04x} at byte {e.start + 1} of the line "
                    "(re-encode the file as UTF-8)") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise RecordError(path, lineno, "invalid JSON: nested too deeply") from None
            except ValueError as e:  # e.g. an integer beyond Python's digit limit
                raise RecordError(path, lineno, f"invalid JSON: {e}") from None
            found = _non_finite(record)
            if found is not None:
                where, x = found
                top = where.split(".")[0].split("[")[0] if isinstance(record, dict) else None
                raise RecordError(
                    path, lineno,
                    f"field {where!r} is {x!r}: NaN and Infinity are not valid JSON numbers",
                    top or None)
            yield lineno, record


_TEXT_COLUMN = "a string column"
_ANSWER_COLUMN = "a string, integer or floating-point column"


def _column_kind(t) -> str | None:
    """``"text"``, ``"number"`` or None (anything else) for a pyarrow type."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or string_view(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    return None


def _record_bytes(record: dict) -> int:
    """UTF-8 bytes of a Parquet row's top-level string and binary values."""
    return sum(len(v.encode("utf-8")) if isinstance(v, str) else len(v)
               for v in record.values() if isinstance(v, (str, bytes)))


def _rows_parquet(path: str, max_record_bytes: int, columns: dict[str, str]
                  ) -> Iterable[tuple[int, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading the Parquet file {path} needs pyarrow, which is not installed: "
            "pip install pyarrow (or pip install 'rlx[data]', or convert the file to JSON Lines)"
        ) from None
    broken = (pa.ArrowException, OSError)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        schema = pf.schema_arrow
    except broken as e:
        raise RecordError(path, None, f"not a readable Parquet file ({type(e).__name__}: {e})") from None
    for key, expected in columns.items():
        if key not in schema.names:
            raise RecordError(path, None, f"missing column {key!r} (columns: {schema.names})", key)
        t = schema.field(key).type
        kind = _column_kind(t)
        if not (kind == "text" or (kind == "number" and expected == _ANSWER_COLUMN)):
            raise RecordError(path, None, f"column {key!r} has type {t}; expected {expected}", key)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=256, use_threads=False):
            for record in batch.to_pylist():
                row += 1
                size = _record_bytes(record)
                if size > max_record_bytes:
                    raise RecordError(
                        path, row,
                        f"record is {size} bytes, larger than max_record_bytes={max_record_bytes}; "
                        "shorten it or raise max_record_bytes", None, "row")
                yield row, record
    except RecordError:
        raise
    except broken as e:
        raise RecordError(path, None, f"unreadable Parquet data after row {row} "
                                      f"({type(e).__name__}: {e})") from None


def _text(record: dict, key: str, path: str, line: int, unit: str, *, allow_numbers: bool = False) -> str:
    if key not in record:
        raise RecordError(path, line, f"missing field {key!r} (fields: {sorted(record)})", key, unit)
    value = record[key]
    if isinstance(value, str):
        return value
    expected = "a string or a number" if allow_numbers else "a string"
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(path, line, f"field {key!r} is {value!r}; expected a finite number", key, unit)
        return str(value)
    got = "null" if value is None else type(value).__name__
    raise RecordError(path, line, f"field {key!r} must be {expected}, got {got}", key, unit)


#: default limit on one record's size (a JSONL line, a Parquet row's strings): 1 MiB.
MAX_RECORD_BYTES = 1 << 20


@gin.configurable(module="rlx.data")
def record_size_limit(max_record_bytes: int = MAX_RECORD_BYTES) -> int:
    """The ``max_record_bytes`` that ``read_records`` uses when not given one; bind
    ``rlx.data.record_size_limit.max_record_bytes`` to change it for the recipes."""
    return max_record_bytes


def read_records(
    path: str | os.PathLike,
    *,
    kind: str = "prompt",
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    max_record_bytes: int | None = None,
) -> list[Problem] | list[PreferencePair]:
    """Reads and validates every record of one file (see the module docstring).

    ``max_record_bytes`` bounds one record: a longer JSONL line or a Parquet row with more
    string bytes is refused when it is read, naming the file and line or row. None takes
    ``record_size_limit()`` (1 MiB unless bound in gin).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_record_bytes is None:
        max_record_bytes = record_size_limit()
    if isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int) or max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be an int >= 1, got {max_record_bytes!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecordError(path, None, "is a directory, not a data file" if os.path.isdir(path)
                          else "no such data file")
    parquet = path.endswith(".parquet")
    unit = "row" if parquet else "line"
    if kind == "prompt":
        columns = {prompt_key: _TEXT_COLUMN, answer_key: _ANSWER_COLUMN}
    else:
        columns = {prompt_key: _TEXT_COLUMN, chosen_key: _TEXT_COLUMN, rejected_key: _TEXT_COLUMN}
    rows = _rows_parquet(path, max_record_bytes, columns) if parquet else _rows_jsonl(path, max_record_bytes)
    out: list = []
    for line, record in rows:
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
        raise RecordError(path, None, "no records (the file is empty or has only blank lines)")
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
    max_record_bytes: int | None = None,
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
      max_record_bytes: the per-record size limit of ``read_records``; None takes
        ``record_size_limit()``.
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
        records.extend(read_records(p, kind=kind, max_record_bytes=max_record_bytes, **keys))
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

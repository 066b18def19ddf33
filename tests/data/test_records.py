"""User-data loader: validation errors with file/line/field, grain pipeline state."""

import json
import sys

import pytest

from rlx.data.records import PreferencePair, RecordError, read_records, records_dataset, records_iterator
from rlx.tasks import Problem


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def prompts(tmp_path):
    rows = [json.dumps({"prompt": f"q{i}", "answer": i, "level": i % 3}) for i in range(10)]
    return _write(tmp_path / "prompts.jsonl", rows[:4] + [""] + rows[4:])


def test_prompt_records_become_problems_with_meta(prompts):
    records = read_records(prompts)
    assert len(records) == 10 and all(isinstance(r, Problem) for r in records)
    assert (records[0].prompt, records[0].answer) == ("q0", "0")
    assert records[4].meta == {"level": 1, "source": str(prompts), "line": 6}  # blank line 5 skipped


def test_preference_records(tmp_path):
    path = _write(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "id": 7})])
    (pair,) = read_records(path, kind="preference")
    assert isinstance(pair, PreferencePair) and (pair.prompt, pair.chosen, pair.rejected) == ("p", "a", "b")
    assert pair.meta == {"id": 7, "source": str(path), "line": 1}


def test_field_names_can_be_remapped(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "2+2?", "final": "4"})])
    (p,) = read_records(path, prompt_key="question", answer_key="final")
    assert (p.prompt, p.answer) == ("2+2?", "4")


@pytest.mark.parametrize(
    "bad_line, kind, message, field",
    [
        ('{"prompt": "x", "answer": ', "prompt", "invalid JSON", None),
        ('["prompt", "answer"]', "prompt", "expected a JSON object, got list", None),
        ('{"prompt": "x"}', "prompt", "missing field 'answer'", "answer"),
        ('{"answer": "1"}', "prompt", "missing field 'prompt'", "prompt"),
        ('{"prompt": 3, "answer": "1"}', "prompt", "field 'prompt' must be a string, got int", "prompt"),
        ('{"prompt": "x", "answer": true}', "prompt", "field 'answer' must be a string or a number, got bool", "answer"),
        ('{"prompt": "x", "answer": null}', "prompt", "field 'answer' must be a string or a number, got NoneType", "answer"),
        ('{"prompt": "  ", "answer": "1"}', "prompt", "field 'prompt' is empty", "prompt"),
        ('{"prompt": "x", "chosen": "a"}', "preference", "missing field 'rejected'", "rejected"),
        ('{"prompt": "x", "chosen": "a", "rejected": ["b"]}', "preference", "field 'rejected' must be a string", "rejected"),
    ],
)
def test_malformed_record_error_names_file_line_and_field(tmp_path, bad_line, kind, message, field):
    good = json.dumps({"prompt": "ok", "answer": "1", "chosen": "a", "rejected": "b"})
    path = _write(tmp_path / "data.jsonl", [good, good, bad_line, good])
    with pytest.raises(RecordError) as info:
        read_records(path, kind=kind)
    err = info.value
    assert str(err).startswith(f"{path}:3: ") and message in str(err)
    assert (err.path, err.line, err.field) == (str(path), 3, field)


def test_empty_file_and_unknown_kind_are_rejected(tmp_path):
    path = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no records"):
        read_records(path)
    with pytest.raises(ValueError, match="kind must be one of"):
        read_records(path, kind="sft")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"data.parquet needs pyarrow.*pip install pyarrow"):
        read_records(path)


def test_parquet_rows_are_read_and_validated_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), path)
    assert [p.answer for p in read_records(path)] == ["1", "2"]
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), path)
    with pytest.raises(RecordError, match="row 2: field 'answer'"):
        read_records(path)


def test_parquet_rows_go_through_the_same_validation(tmp_path, monkeypatch):
    """A stand-in for pyarrow (not installed here) exercises the Parquet row path."""
    import types

    rows = {"good.parquet": [{"prompt": "a", "answer": 1}], "bad.parquet": [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]}

    class Table:
        def __init__(self, path):
            self.path = path

        def to_pylist(self):
            return rows[self.path.rsplit("/", 1)[-1]]

    parquet = types.ModuleType("pyarrow.parquet")
    parquet.read_table = Table
    pyarrow = types.ModuleType("pyarrow")
    pyarrow.parquet = parquet
    monkeypatch.setitem(sys.modules, "pyarrow", pyarrow)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", parquet)
    (p,) = read_records(tmp_path / "good.parquet")
    assert (p.prompt, p.answer, p.meta["line"]) == ("a", "1", 1)
    with pytest.raises(RecordError, match=r"bad.parquet row 2: missing field 'answer'"):
        read_records(tmp_path / "bad.parquet")


def test_pipeline_is_picklable_for_multiprocess_readers(prompts):
    import pickle

    ds = pickle.loads(pickle.dumps(records_dataset(prompts, seed=1, num_epochs=1)))
    assert [r.prompt for r in ds] == _prompts(records_iterator(prompts, seed=1, num_epochs=1))


def _prompts(items):
    return [r.prompt for r in items]


def test_iteration_is_seeded_shuffled_and_reshuffled_each_epoch(prompts):
    it = records_iterator(prompts, seed=3, num_epochs=2)
    items = list(it)
    first, second = _prompts(items[:10]), _prompts(items[10:])
    assert sorted(first) == sorted(second) == sorted(f"q{i}" for i in range(10))
    assert first != second and first != sorted(first, key=lambda s: int(s[1:]))
    assert [r.meta["epoch"] for r in items] == [0] * 10 + [1] * 10
    assert _prompts(records_iterator(prompts, seed=3, num_epochs=2)) == first + second
    assert _prompts(records_iterator(prompts, seed=4, num_epochs=1)) != first


def test_unshuffled_iteration_keeps_file_order(prompts):
    assert _prompts(records_iterator(prompts, shuffle=False, num_epochs=1)) == [f"q{i}" for i in range(10)]


def test_iterator_state_round_trips_for_resume(prompts):
    it = records_iterator(prompts, seed=0)
    for _ in range(13):
        next(it)
    state = it.get_state()
    expected = _prompts(next(it) for _ in range(9))
    resumed = records_iterator(prompts, seed=0)
    resumed.set_state(state)
    assert _prompts(next(resumed) for _ in range(9)) == expected


def test_shards_partition_the_records(prompts):
    shards = [set(_prompts(records_iterator(prompts, num_epochs=1, shard_index=i, shard_count=3))) for i in range(3)]
    assert set().union(*shards) == {f"q{i}" for i in range(10)}
    assert sum(len(s) for s in shards) == 10 and [len(s) for s in shards] == [4, 3, 3]


def test_default_sharding_can_follow_the_jax_process(prompts):
    ds = records_dataset(prompts, shard_index=None, shard_count=None, num_epochs=1)
    assert len(ds) == 10  # one process: everything


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"shard_index": 3, "shard_count": 3}, "shard_index"),
        ({"shard_count": 0}, "shard_count"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"shard_index": 15, "shard_count": 20}, "empty"),
    ],
)
def test_bad_pipeline_arguments_are_rejected(prompts, kwargs, field):
    with pytest.raises(ValueError, match=field):
        records_dataset(prompts, **kwargs)


def test_several_files_are_concatenated(tmp_path, prompts):
    other = _write(tmp_path / "more.jsonl", [json.dumps({"prompt": "extra", "answer": "x"})])
    items = list(records_iterator([prompts, other], shuffle=False, num_epochs=1))
    assert _prompts(items)[-1] == "extra" and items[-1].meta["source"] == str(other)

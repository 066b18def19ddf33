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
        ('{"prompt": "x", "answer": null}', "prompt", "field 'answer' must be a string or a number, got null", "answer"),
        ('{"prompt": "x", "answer": NaN}', "prompt", "field 'answer' is nan: NaN and Infinity are not valid JSON", "answer"),
        ('{"prompt": "x", "answer": Infinity}', "prompt", "field 'answer' is inf", "answer"),
        ('{"prompt": "x", "answer": -Infinity}', "prompt", "field 'answer' is -inf", "answer"),
        ('{"prompt": "x", "answer": 1e400}', "prompt", "field 'answer' is inf", "answer"),
        ('{"prompt": "x", "answer": "1", "scores": [1, NaN]}', "prompt", "field 'scores[1]' is nan", "scores"),
        ('{"prompt": "x", "answer": "1", "m": {"a": {"b": Infinity}}}', "prompt", "field 'm.a.b' is inf", "m"),
        ('{"prompt": "x", "answer": ' + "1" * 5000 + "}", "prompt", "invalid JSON", None),
        ("[" * 100_000 + "]" * 100_000, "prompt", "invalid JSON: nested too deeply", None),
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
    with pytest.raises(RecordError, match=f"^{path}: no records"):
        read_records(path)
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(RecordError, match="zero.jsonl: no records"):
        read_records(tmp_path / "zero.jsonl")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_records(path, kind="sft")


def test_missing_path_or_directory_is_named(tmp_path):
    with pytest.raises(RecordError, match=r"nowhere.jsonl: no such data file"):
        read_records(tmp_path / "nowhere.jsonl")
    with pytest.raises(RecordError, match=f"^{tmp_path}: is a directory"):
        read_records(tmp_path)


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "ok", "answer": 1}).encode()
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9", "answer": 1}'.encode("latin-1") + b"\n")
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:2: not valid UTF-8: byte 0xe9 at byte 16 of the line")
    assert info.value.line == 2


def test_utf8_byte_order_mark_and_non_ascii_text_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "caf\u00e9 \u2211", "answer": "\u00bd"},
                                                    ensure_ascii=False).encode() + b"\n")
    (p,) = read_records(path)
    assert (p.prompt, p.answer) == ("caf\u00e9 \u2211", "\u00bd")


def test_a_huge_record_is_refused_when_read_naming_its_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    small = json.dumps({"prompt": "ok", "answer": 1})
    huge = json.dumps({"prompt": "x" * (10 << 20), "answer": 1})  # a 10 MiB prompt
    path.write_text(small + "\n" + huge + "\n" + small + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"huge.jsonl:2: record is larger than "
                                          r"max_record_bytes=1048576 bytes \(starts '\{\"prompt\": \"xxx"):
        read_records(path)
    assert len(read_records(path, max_record_bytes=11 << 20)) == 3


def test_record_size_limit_is_exact_and_validated(tmp_path):
    line = json.dumps({"prompt": "p" * 50, "answer": 1})
    path = _write(tmp_path / "d.jsonl", [line])
    assert len(read_records(path, max_record_bytes=len(line))) == 1  # the newline is not counted
    with pytest.raises(RecordError, match=f"d.jsonl:1: record is larger than max_record_bytes={len(line) - 1}"):
        read_records(path, max_record_bytes=len(line) - 1)
    (tmp_path / "last.jsonl").write_text(line, encoding="utf-8")  # no final newline
    assert len(read_records(tmp_path / "last.jsonl", max_record_bytes=len(line))) == 1
    with pytest.raises(RecordError, match="last.jsonl:1: record is larger"):
        read_records(tmp_path / "last.jsonl", max_record_bytes=len(line) - 1)
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_record_bytes must be an int >= 1"):
            read_records(path, max_record_bytes=bad)


def test_record_size_limit_is_gin_bindable_and_reaches_the_pipeline(tmp_path):
    import gin

    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p" * 50, "answer": 1})])
    with pytest.raises(RecordError, match="record is larger than max_record_bytes=10 "):
        records_dataset(path, max_record_bytes=10)
    gin.clear_config()
    try:
        gin.parse_config("rlx.data.record_size_limit.max_record_bytes = 20")
        with pytest.raises(RecordError, match="max_record_bytes=20 "):
            read_records(path)
        with pytest.raises(RecordError, match="max_record_bytes=20 "):
            records_dataset(path)
        assert len(records_dataset(path, max_record_bytes=100, num_epochs=1)) == 1
    finally:
        gin.clear_config()


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"data.parquet needs pyarrow.*pip install pyarrow"):
        read_records(path)


def _parquet(path, columns, **kwargs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def test_parquet_rows_become_problems_with_row_numbers_and_meta(tmp_path):
    pa = pytest.importorskip("pyarrow")
    path = _parquet(tmp_path / "d.parquet", {
        "prompt": pa.array([f"q{i}" for i in range(600)]).dictionary_encode(),  # pandas categoricals
        "answer": list(range(600)),
        "level": [float("nan")] + [1.0] * 599,  # NaN in a meta column is Parquet's missing value
    }, row_group_size=250)
    records = read_records(path)
    assert len(records) == 600 and all(isinstance(r, Problem) for r in records)
    assert (records[0].prompt, records[0].answer, records[599].answer) == ("q0", "0", "599")
    assert records[300].meta == {"level": 1.0, "source": str(path), "line": 301}
    floats = _parquet(tmp_path / "f.parquet", {"question": ["a"], "final": [0.5]})
    (p,) = read_records(floats, prompt_key="question", answer_key="final")
    assert (p.prompt, p.answer) == ("a", "0.5")


def test_parquet_preference_records(tmp_path):
    path = _parquet(tmp_path / "prefs.parquet", {"prompt": ["p"], "chosen": ["a"], "rejected": ["b"], "id": [7]})
    (pair,) = read_records(path, kind="preference")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.meta["id"]) == ("p", "a", "b", 7)


def test_unreadable_parquet_files_are_named(tmp_path):
    pytest.importorskip("pyarrow")
    good = _parquet(tmp_path / "good.parquet",
                    {"prompt": [f"prompt number {i}" for i in range(3000)], "answer": list(range(3000))},
                    row_group_size=1000, compression="snappy")
    data = good.read_bytes()
    (tmp_path / "text.parquet").write_bytes(b'{"prompt": "a JSONL file with the wrong name"}\n')
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name in ("text", "truncated", "empty"):
        path = tmp_path / f"{name}.parquet"
        with pytest.raises(RecordError, match=f"^{path}: not a readable Parquet file") as info:
            read_records(path)
        assert info.value.line is None
    flipped = bytearray(data)
    for i in range(100, len(data) // 3):  # inside the first row group's compressed pages
        flipped[i] ^= 0xFF
    (tmp_path / "flipped.parquet").write_bytes(bytes(flipped))
    with pytest.raises(RecordError, match=r"flipped.parquet: unreadable Parquet data after row 0"):
        read_records(tmp_path / "flipped.parquet")


def test_parquet_column_problems_name_the_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    cases = [
        ({"prompt": ["a"]}, "prompt", "missing column 'answer' (columns: ['prompt'])", "answer"),
        ({"question": ["a"], "answer": ["1"]}, "prompt", "missing column 'prompt'", "prompt"),
        ({"prompt": [1], "answer": ["1"]}, "prompt", "column 'prompt' has type int64; expected a string column", "prompt"),
        ({"prompt": ["a"], "answer": [True]}, "prompt", "column 'answer' has type bool; expected a string, integer", "answer"),
        ({"prompt": ["a"], "answer": [[1, 2]]}, "prompt", "column 'answer' has type list<", "answer"),
        ({"prompt": ["a"], "answer": pa.array([None], pa.null())}, "prompt", "column 'answer' has type null", "answer"),
        ({"prompt": ["a"], "chosen": ["x"], "rejected": [2.0]}, "preference", "column 'rejected' has type double", "rejected"),
        ({"prompt": [b"a"], "answer": ["1"]}, "prompt", "column 'prompt' has type binary", "prompt"),
    ]
    for i, (columns, kind, message, field) in enumerate(cases):
        path = _parquet(tmp_path / f"c{i}.parquet", columns)
        with pytest.raises(RecordError) as info:
            read_records(path, kind=kind)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)
        assert (info.value.field, info.value.line) == (field, None)


@pytest.mark.parametrize(
    "answers, message",
    [
        (["1", None, "3"], "row 2: field 'answer' must be a string or a number, got null"),
        ([1.0, 2.0, float("nan")], "row 3: field 'answer' is nan; expected a finite number"),
        ([1.0, float("-inf"), 2.0], "row 2: field 'answer' is -inf"),
    ],
)
def test_parquet_nulls_and_non_finite_answers_name_the_row(tmp_path, answers, message):
    path = _parquet(tmp_path / "d.parquet", {"prompt": ["a", "b", "c"], "answer": answers})
    with pytest.raises(RecordError, match=message) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path} row ") and info.value.field == "answer"


def test_parquet_null_or_empty_prompt_names_the_row(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {"prompt": ["a", None], "answer": ["1", "2"]})
    with pytest.raises(RecordError, match=r"d.parquet row 2: field 'prompt' must be a string, got null"):
        read_records(path)
    path = _parquet(tmp_path / "e.parquet", {"prompt": ["a", " "], "answer": ["1", "2"]})
    with pytest.raises(RecordError, match=r"e.parquet row 2: field 'prompt' is empty"):
        read_records(path)


def test_parquet_huge_row_and_empty_table_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    path = _parquet(tmp_path / "d.parquet", {"prompt": ["a", "b", "\u00e9" * 60], "answer": ["1", "2", "3"]})
    with pytest.raises(RecordError, match=r"d.parquet row 3: record is 121 bytes, larger than max_record_bytes=100"):
        read_records(path, max_record_bytes=100)
    assert len(read_records(path, max_record_bytes=121)) == 3
    big = _parquet(tmp_path / "big.parquet", {"prompt": ["a", "x" * (10 << 20)], "answer": ["1", "2"]})
    with pytest.raises(RecordError, match=r"big.parquet row 2: record is 10485761 bytes"):
        read_records(big)
    empty = _parquet(tmp_path / "empty.parquet", {"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    with pytest.raises(RecordError, match="empty.parquet: no records"):
        read_records(empty)


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

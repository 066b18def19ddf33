"""benchmarks/scaling.py --quick: the table has every axis, both update layouts, both
sampler KV layouts and finite memory figures (no timed assertions)."""

import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def scaling():
    sys.path.insert(0, BENCH)
    try:
        import scaling
        yield scaling
    finally:
        sys.path.remove(BENCH)


@pytest.mark.slow      # ~55 s of CI on a cold cache for a benchmark's plumbing; run with -m slow
def test_quick_scaling_table(scaling, tmp_path, capsys):
    out_path = tmp_path / "scaling.json"
    # two axes keep the cold-cache cost of CI down (3 points × 2 configurations); the
    # other axes run the same code with another field of the workload changed
    axes = ["G", "prompt"]
    out = scaling.main(["--quick", "--in_process", "--axes", *axes, "--json", str(out_path)])
    text = capsys.readouterr().out
    rows = out["rows"]
    assert {r["axis"] for r in rows} == set(axes)
    assert {len({r["value"] for r in rows if r["axis"] == a}) for a in axes} == {2}
    for r in rows:
        for key in ("gen_repeat", "gen_shared", "upd_naive", "upd_packed", "iter_A", "iter_B"):
            assert r[key] is not None and r[key] > 0, (r["axis"], r["value"], key)
        for key in ("mem_upd_naive", "mem_upd_packed", "mem_smp_repeat", "mem_smp_shared"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, key
        assert r["model"]["c_update_packed"] > 0 and r["model"]["kv_repeat_bytes"] > 0
    # the packed update of a G-row group forwards fewer tokens than G naive rows
    assert all(r["model"]["update_packed"] < r["model"]["update_naive"] for r in rows)
    for heading in ("### Time", "### Memory", "### Growth exponents", "upd packed s",
                    "gen shared s", "update naive MB"):
        assert heading in text
    for label in (scaling.LABELS[a] for a in axes):
        assert f"| {label} |" in text
    assert json.loads(out_path.read_text())["rows"]

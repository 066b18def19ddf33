"""benchmarks/gpu_suite.sh --cpu-check: every part runs on CPU and none fails.

The CPU check is the suite's own run without a GPU: the Pallas kernels against their
references in interpret mode (real checks, OK or FAIL), each measurement's code path at
tiny sizes, and the GPU-sized kernel programs lowered for CUDA; measured targets are
SKIP(no GPU). About 60-90 s on an idle 2-core machine (one run, shared by the tests).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_suite  # noqa: E402


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"),
                           "--cpu-check"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    report_path = out / "gpu_suite.json"
    assert report_path.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(report_path.read_text()), out


def test_every_part_is_ok_or_skipped_for_want_of_a_gpu(cpu_check):
    proc, report, _ = cpu_check
    bad = [(r["part"], r["check"], r["status"], r["note"]) for r in report["rows"]
           if r["status"] not in ("OK", gpu_suite.NO_GPU)]
    assert not bad, f"{bad}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["mode"] == "cpu-check"
    assert {r["part"] for r in report["rows"]} == {p.id for p in gpu_suite.PARTS}


def test_kernel_checks_really_ran_against_their_references(cpu_check):
    """The interpret-mode kernel rows carry a measured error below their tolerance."""
    _, report, _ = cpu_check
    native = [r for r in report["rows"] if r["part"] == "a.native"]
    assert len(native) == 6
    for r in native:
        assert r["status"] == "OK" and r["met"] == "yes", r
        assert 0 <= r["data"]["fwd_err"] < 1e-4, r


def test_gpu_sized_programs_lowered_for_cuda(cpu_check):
    """Each lowered program contains Triton kernel calls (the count is in the note)."""
    _, report, _ = cpu_check
    lowered = [r for r in report["rows"] if "lowered for CUDA" in r["note"]]
    parts = {r["part"] for r in lowered}
    assert {"b.bandwidth", "c.sparse", "e.update", "e.update_flash"} <= parts, parts
    assert all("(0 Triton" not in r["note"] for r in lowered), lowered


def test_one_table_on_stdout_and_the_log_in_out(cpu_check):
    proc, report, out = cpu_check
    lines = proc.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("part ")]
    assert len(header) == 1, proc.stdout[-3000:]
    for r in report["rows"]:
        assert any(r["check"][:40] in line for line in lines[header[0]:]), r["check"]
    assert (out / "gpu_suite.log").exists()
    assert "0 FAIL" in proc.stdout


def test_junit_summary_tells_interpret_only_block_sizes_from_real_failures(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
 <testcase classname="tests.kernels.test_a" name="test_ok[gpu]"/>
 <testcase classname="tests.kernels.test_a" name="test_ok2"/>
 <testcase classname="tests.kernels.test_b" name="test_tiny[gpu]">
  <failure message="ValueError: GPU (Triton) needs block_q a power of two &gt;= 16, got 8">
  trace</failure></testcase>
 <testcase classname="tests.kernels.test_b" name="test_wrong[gpu]">
  <failure message="AssertionError: Not equal to tolerance&#10;more">trace</failure></testcase>
 <testcase classname="tests.kernels.test_c" name="test_broken">
  <error message="RuntimeError: Triton compile failed">trace</error></testcase>
 <testcase classname="tests.kernels.test_c" name="test_skipped">
  <skipped message="slow"/></testcase>
</testsuite></testsuites>""")
    passed, failed, interp, skipped = gpu_suite.summarize_junit(xml)
    assert passed == 2 and skipped == 1
    assert interp == [("test_b::test_tiny[gpu]",
                       "ValueError: GPU (Triton) needs block_q a power of two >= 16, got 8")]
    assert failed == [("test_b::test_wrong[gpu]", "AssertionError: Not equal to tolerance"),
                      ("test_c::test_broken", "RuntimeError: Triton compile failed")]


_FAULTY_SUITE = """
import sys, time
sys.path.insert(0, {benchmarks!r})
import gpu_suite

def boom(ctx):
    raise RuntimeError("kernel exploded")

def slow(ctx):
    ctx.emit("before the hang", "OK", "1", "1", "yes")
    time.sleep(60)

def fine(ctx):
    ctx.emit("fine check", "OK", "1", "1", "yes")

gpu_suite.PARTS[:] = [gpu_suite.Part("x.boom", "boom", boom, 20, 20),
                      gpu_suite.Part("x.slow", "slow", slow, 20, 4),
                      gpu_suite.Part("x.fine", "fine", fine, 20, 20)]
gpu_suite.BY_ID.clear()
gpu_suite.BY_ID.update((p.id, p) for p in gpu_suite.PARTS)
gpu_suite.CHILD_SCRIPT = __file__
sys.exit(gpu_suite.main(sys.argv[1:]))
"""


def test_a_failing_part_is_reported_and_the_suite_goes_on(tmp_path):
    """Failure isolation: a part that raises and one that outlives its timeout each give
    a FAIL row with the reason (rows emitted before the hang are kept), the part after
    them still runs, and the exit status says a row failed."""
    script = tmp_path / "faulty_suite.py"
    script.write_text(_FAULTY_SUITE.format(benchmarks=os.path.join(REPO, "benchmarks")))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(script), "--cpu-check", "--jobs", "1",
                           "--json", str(tmp_path / "r.json")], capture_output=True,
                          text=True, env=env, timeout=120)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    got = [(r["part"], r["status"]) for r in rows]
    assert got == [("x.boom", "FAIL"), ("x.fine", "OK"), ("x.slow", "OK"),
                   ("x.slow", "FAIL")], (got, proc.stdout[-3000:])
    assert "RuntimeError: kernel exploded" in rows[0]["note"]
    assert "timeout after 4 s" in rows[3]["note"]
    assert proc.returncode == 1

"""Fault-injection suite: injects every fault class into tiny runs and prints a table.

    python benchmarks/faults.py --quick          # a few minutes on a 2-core CPU
    python benchmarks/faults.py                  # every signal in every phase, more trials
    python benchmarks/faults.py --json out.json  # also the raw counts

Fault classes (rows of the table):

- ``signals``: SIGKILL / SIGTERM / SIGINT sent at random points of each phase of real
  ``python -m rlx.cli`` runs (RLHF with PPO: the SFT warm-up, the reward model, the RL
  phase with its critic; DPO), each followed by the same command until the run
  finishes; the final state of every phase is compared bitwise with an uninterrupted
  reference run (every saved array), the logged losses too. A signal step-counts as
  survived when the next run resumed (or, with nothing saved yet, restarted the phase).
  SIGTERM / SIGINT count as a clear error when the run stopped with the one-line
  ``rlx: stopped by ...`` message and no traceback.
- ``checkpoint files``: the newest step of a saved run is truncated, bit-flipped,
  emptied, overwritten or has a file deleted (array data, manifests, metadata);
  restore must fall back to a good step whose arrays equal what was saved, report the
  bad one in one warning line and move it aside with every file kept.
- ``config change``: a finished run is rerun with another setting that changes what
  its checkpoints are of (SFT steps, objective, model, reward-model steps, task,
  seed): the run must stop with an error naming the setting and leave every
  checkpoint byte as it was.
- ``malformed records``: broken JSON, missing / wrong-typed / null fields, empty
  files, non-UTF-8 bytes, NaN answers, huge lines, Parquet errors (not Parquet,
  truncated, missing or mistyped columns, nulls): each must be refused with an error
  naming the file and the line or row.
- ``reward faults``: user rewards that raise, hang (in Python and in C with signals
  blocked), return NaN / inf / strings / None, call ``sys.exit`` / ``os._exit``, raise
  ``KeyboardInterrupt``, segfault or allocate without bound, scored by the reward pool
  (process workers): every call must be counted as failed, the scores stay finite,
  the pool keeps scoring, the trainer's memory does not grow, and the error names
  the reward. One ``rlx train`` run with a reward failing on every call must stop.
- ``adversarial completions``: every built-in reward scores huge exponents, huge
  integers, deep nesting, unicode digits, NUL bytes, lone surrogates and 10 MB
  strings within its time limit (finite score, no timeout, no worker crash).

"data lost" counts completed work that disappeared: checkpoint files of a moved-aside
step that are gone, checkpoint bytes changed by a refused run, logged rows of the
reference missing from a resumed run, metrics lines that do not parse.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # this checkout's rlx, also for in-process sections
TIMEOUT_S = 900


@dataclasses.dataclass
class Row:
    name: str
    injected: int = 0
    survived: int = 0
    bitwise: int | None = None          # None: not applicable
    bad_inputs: int | None = None
    clear: int = 0
    clear_of: int = 0                   # how many could give a clear error
    lost: int = 0
    notes: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------- helpers
def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "RLX_TEST"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def _cli(kind: str, params: list[str], log: Path, cache: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "rlx.cli", kind]
    for p in params:
        argv += ["--gin_param", p]
    f = open(log, "ab")
    proc = subprocess.Popen(argv, env=_env(cache), stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=str(ROOT))
    proc.log_file = f
    return proc


def _end(proc, timeout=TIMEOUT_S) -> int:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        rc = f"timeout ({rc})"
    proc.log_file.close()
    return rc


def _steps(d: Path) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _same_arrays(a_dir: Path, b_dir: Path) -> bool:
    import numpy as np
    try:
        from rlx.train.checkpoint import saved_arrays
        a, b = saved_arrays(a_dir), saved_arrays(b_dir)
    except Exception:   # noqa: BLE001 - a missing or unreadable step is a difference
        return False
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _rows(run_dir: Path) -> tuple[dict, int]:
    """{(phase key, step): row} (the last row of a redone step) and unparsable lines."""
    out, bad = {}, 0
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out, 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        key = next((k for k in ("sft_loss", "rm_loss", "pref_loss", "loss", "eval/accuracy")
                    if k in row), "other")
        out[(key, row["step"])] = row
    return out, bad


def _snapshot(root: Path, parts=("checkpoints", "sft", "sft_progress", "reward_model",
                                 "dpo")) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] in parts}


def _orphan_workers() -> int:
    """Reward worker processes whose parent is gone (reparented to init)."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"rlx.rewards._worker_main" in cmd and stat[1] == "1":
            n += 1
    return n


# --------------------------------------------------------------------- pipelines
TINY = [
    'rlx.Experiment.model = "tiny"',
    'rlx.Experiment.model_overrides = {"num_layers": 1}',
    "rlx.Experiment.train_problems = 120",
    "rlx.Experiment.eval_problems = 4",
    "rlx.Experiment.sft_batch = 4",
    "rlx.Experiment.num_generations = 2",
    "rlx.Experiment.max_new_tokens = 4",
    "rlx.Experiment.export_hf = False",
    "rlx.rewards.RewardPool.num_workers = 1",
    "rlx.train.PhaseCheckpoints.every_steps = 2",
    "rlx.train.RLConfig.prompts_per_step = 2",
    "rlx.train.RLConfig.eval_every = 0",
    "rlx.train.RLConfig.checkpoint_every = 1",
    "rlx.train.RLConfig.log_samples_every = 0",
]


@dataclasses.dataclass
class Pipeline:
    kind: str
    params: list                                # without the run directory
    finals: dict                                # checkpoint subdirectory -> final step
    phases: dict                                # phase label -> (subdirectory, steps)

    def with_dir(self, run_dir: Path) -> list:
        return self.params + [f'rlx.Experiment.run_dir = "{run_dir}"']


def rlhf_pipeline(sft=40, rm=40, rl=12) -> Pipeline:
    params = TINY + [f"rlx.Experiment.sft_steps = {sft}", 'rlx.Experiment.objective = "ppo"',
                     f"rlx.train.RLConfig.steps = {rl}",
                     "rlx.RLHFExperiment.preference_problems = 16",
                     "rlx.RLHFExperiment.eval_pairs = 4", f"rlx.RLHFExperiment.rm_steps = {rm}",
                     "rlx.RLHFExperiment.rm_batch = 4"]
    return Pipeline("rlhf", params,
                    {"sft": sft, "sft_progress": sft, "reward_model": rm, "checkpoints": rl},
                    {"SFT": ("sft_progress", sft), "reward model": ("reward_model", rm),
                     "RL + critic": ("checkpoints", rl)})


def dpo_pipeline(sft=4, dpo=40) -> Pipeline:
    params = TINY + [f"rlx.Experiment.sft_steps = {sft}",
                     "rlx.DPOExperiment.preference_problems = 16",
                     "rlx.DPOExperiment.eval_pairs = 4", f"rlx.DPOExperiment.dpo_steps = {dpo}",
                     "rlx.DPOExperiment.dpo_batch = 4"]
    return Pipeline("dpo", params, {"sft": sft, "dpo": dpo}, {"DPO": ("dpo", dpo)})


def _phase_now(run_dir: Path, pipe: Pipeline) -> str:
    """The phase a run is in, judged from its checkpoints."""
    for label, (sub, steps) in pipe.phases.items():
        if not _steps(run_dir / sub) or max(_steps(run_dir / sub)) < steps:
            return label
    return "finishing"


def signals_section(work: Path, cache: Path, rng: random.Random, quick: bool) -> Row:
    row = Row("signals (SIGKILL/TERM/INT in every phase)", bitwise=0)
    names = {signal.SIGKILL: "SIGKILL", signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
    sigs = list(names)
    pipes = [rlhf_pipeline(), dpo_pipeline()]
    plans = []
    for pipe in pipes:
        if quick:
            chosen = rng.sample(sigs, len(pipe.phases)) if len(pipe.phases) <= 3 else sigs
            chosen = chosen if len(pipe.phases) > 1 else [rng.choice(sigs)]
            plans.append([(label, sig) for label, sig in zip(pipe.phases, chosen)])
        else:
            plans.append([(label, sig) for label in pipe.phases for sig in
                          rng.sample(sigs, len(sigs))])
    by_phase: dict = {}
    for pipe, plan in zip(pipes, plans):
        ref_dir, run_dir = work / f"{pipe.kind}_ref", work / f"{pipe.kind}_run"
        rc = _end(_cli(pipe.kind, pipe.with_dir(ref_dir), work / f"{pipe.kind}_ref.log", cache))
        if rc != 0:
            row.notes.append(f"{pipe.kind} reference run failed ({rc})")
            continue
        log = work / f"{pipe.kind}_run.log"
        injected_here = 0
        for label, sig in plan:
            sub, steps = pipe.phases[label]
            # a random point of the phase in *this* run: after a random number of new
            # saves of the phase, plus a random delay (mid-step or mid-save)
            baseline = max(_steps(run_dir / sub), default=0)
            if steps - baseline < 2:
                row.notes.append(f"{pipe.kind}: {label} already finished, "
                                 f"{names[sig]} not sent")
                continue
            target = baseline + rng.randint(2, max(2, (steps - baseline) // 3))
            start = log.stat().st_size if log.exists() else 0
            proc = _cli(pipe.kind, pipe.with_dir(run_dir), log, cache)
            deadline = time.monotonic() + TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                done = _steps(run_dir / sub)
                if done and max(done) >= target:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.15))
            if proc.poll() is not None:
                row.notes.append(f"{pipe.kind}: run ended before the {names[sig]} for {label}")
                _end(proc)
                continue
            where = _phase_now(run_dir, pipe)
            if sig == signal.SIGKILL:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            rc = _end(proc)
            text = log.read_bytes()[start:].decode(errors="replace")
            injected_here += 1
            row.injected += 1
            by_phase.setdefault(where, []).append(names[sig])
            if sig != signal.SIGKILL:
                row.clear_of += 1
                stopped = re.search(r"^rlx: stopped by SIG\w+ during .*rerun the same command",
                                    text, re.M)
                if stopped and "Traceback" not in text and rc == 128 + sig:
                    row.clear += 1
                else:
                    row.notes.append(f"{names[sig]} in {where}: exit {rc}, "
                                     + ("traceback" if "Traceback" in text else "no stop line"))
            time.sleep(0.5)
            orphans = _orphan_workers()
            if orphans:
                row.notes.append(f"{orphans} reward worker(s) outlived a {names[sig]}")
        start = log.stat().st_size if log.exists() else 0
        rc = _end(_cli(pipe.kind, pipe.with_dir(run_dir), log, cache))
        text = log.read_text(errors="replace")
        resumed = text.count("resumed ")
        if rc != 0:
            row.notes.append(f"{pipe.kind}: final run failed ({rc})")
            continue
        row.survived += injected_here
        same = all(_same_arrays(ref_dir / sub / str(step), run_dir / sub / str(step))
                   for sub, step in pipe.finals.items())
        want, _ = _rows(ref_dir)
        have, bad = _rows(run_dir)
        missing = [k for k in want if k not in have]
        differs = [k for k in want if k in have and any(
            have[k].get(m) != want[k].get(m) for m in ("sft_loss", "rm_loss", "pref_loss",
                                                        "loss", "value_loss", "reward_mean"))]
        row.lost += len(missing) + bad
        if same and not differs:
            row.bitwise += injected_here
        else:
            row.notes.append(f"{pipe.kind}: final state {'equal' if same else 'DIFFERS'}, "
                             f"{len(differs)} logged rows differ")
        row.notes.append(f"{pipe.kind}: {injected_here} signals, {resumed} resumes announced")
    row.notes.append("landed in: " + "; ".join(f"{k}: {', '.join(v)}"
                                              for k, v in by_phase.items()))
    return row


# --------------------------------------------------------------- checkpoint files
def checkpoint_files_section(work: Path, rng: random.Random, quick: bool) -> Row:
    import logging

    import jax
    import numpy as np

    from rlx.models import api, config
    from rlx.train import checkpoint as ck
    from rlx.train import optim
    from rlx.train import state as st

    row = Row("checkpoint files (truncated/flipped/deleted/...)", bitwise=0)
    graphdef, params = api.init(config.model_config("tiny", vocab_size=32), seed=0)
    tx = optim.optimizer(learning_rate=1e-3)
    states = {}
    base = work / "ckpt_base"
    writer = ck.Checkpointer(str(base), keep=5, async_save=False, identity={"k": 1})
    for step in (1, 2, 3):
        s = st.create(jax.tree.map(lambda x: x + step, params), tx, seed=step)
        states[step] = s
        writer.save(step, s, {"pos": step}, {"iteration": step})
    writer.close()
    abstract = ck.abstract_like(states[3])

    def files(step_dir):
        return sorted(str(p.relative_to(step_dir)) for p in Path(step_dir).rglob("*")
                      if p.is_file())

    def arrays(d):
        return [p for p in files(d) if "/d/" in "/" + p]

    kinds = ["truncate", "flip", "delete", "empty", "garbage"]
    trials = 12 if quick else 40
    plans = []
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        plans.append((kind, rng.random()))
    plans += [("delete_step", 0.0), ("all_steps", 0.0)]

    class Count(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    detected, harmless = [], []
    for n, (kind, u) in enumerate(plans):
        d = work / f"ckpt_{n}"
        shutil.copytree(base, d)
        target = d / "3"
        names = files(target)
        pick = arrays(target) if kind in ("flip", "truncate") and u < 0.6 else names
        victim = target / pick[int(u * len(pick)) % len(pick)]
        removed = set()
        if kind == "truncate":
            data = victim.read_bytes()
            victim.write_bytes(data[:len(data) // 2])
        elif kind == "flip":
            data = bytearray(victim.read_bytes())
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            victim.write_bytes(bytes(data))
        elif kind == "delete":
            victim.unlink()
            removed.add(str(victim.relative_to(target)))
        elif kind == "empty":
            victim.write_bytes(b"")
        elif kind == "garbage":
            victim.write_bytes(os.urandom(max(16, victim.stat().st_size)))
        elif kind == "delete_step":
            shutil.rmtree(target)
        elif kind == "all_steps":
            for s in (1, 2, 3):
                for p in arrays(d / str(s)):
                    q = d / str(s) / p
                    q.write_bytes(q.read_bytes()[: q.stat().st_size // 2])
        expected_files = {s: set(files(d / str(s))) for s in (1, 2, 3)
                          if (d / str(s)).exists()}
        handler = Count()
        logging.getLogger("rlx.checkpoint").addHandler(handler)
        row.injected += 1
        try:
            reader = ck.Checkpointer(str(d), identity={"k": 1})
            got = reader.restore_latest(abstract)
            reader.close()
        except Exception as err:   # noqa: BLE001 - a crash of the restore is a finding
            row.notes.append(f"{kind} {victim.name}: restore raised {type(err).__name__}: "
                             f"{str(err)[:120]}")
            continue
        finally:
            logging.getLogger("rlx.checkpoint").removeHandler(handler)
        row.survived += 1
        step = None if got is None else got[0]
        if got is None:
            ok = kind == "all_steps"
        else:
            leaves_a = jax.tree.leaves(got[1])
            leaves_b = jax.tree.leaves(states[step])
            ok = all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(leaves_a, leaves_b)) and got[2] == {"pos": step}
        row.bitwise += ok
        bad = [m for m in handler.messages if "unreadable or corrupt" in m]
        skipped = [s for s in expected_files if s > (step or 0)]
        if skipped:                      # steps passed over: each must be reported once
            row.clear_of += 1
            if len(bad) == len(skipped) and all("\n" not in m and len(m) < 700 for m in bad):
                row.clear += 1
            else:
                row.notes.append(f"{kind} {victim.relative_to(d)}: fell back to step {step} "
                                 f"with {len(bad)} warning(s) for {len(skipped)} skipped")
        # nothing lost: every file of every moved-aside step is still there
        for s, want in expected_files.items():
            if (d / str(s)).exists():
                continue
            moved = sorted(d.glob(f"{s}.corrupt*"))
            have = set(files(moved[-1])) if moved else set()
            row.lost += len(want - have)
        if not ok:
            row.notes.append(f"{kind} {victim.relative_to(d)}: restored step {step} "
                             "does not equal its save")
        outcome = ("fresh start" if step is None else f"step {step}")
        if kind in ("delete_step", "all_steps"):
            harmless.append(f"{kind} -> {outcome}")
        elif step == 3:
            harmless.append(f"{kind} {victim.relative_to(target)}")
        else:
            detected.append(f"{kind} {victim.relative_to(target)}")
    row.notes.append(f"detected, moved aside, previous step restored: {'; '.join(detected)}")
    row.notes.append(f"read back exactly despite the change (a file orbax does not need "
                     f"for these arrays, or a byte it ignores): {'; '.join(harmless)}")
    return row


# --------------------------------------------------------------------- config change
def config_section(work: Path, cache: Path, quick: bool) -> Row:
    """Reruns of a finished RLHF + PPO run (the signals section's reference when it
    ran, else a fresh one) with one setting changed each."""
    row = Row("config change between runs", bitwise=None)
    pipe = rlhf_pipeline()
    base_dir = work / "rlhf_ref"
    if not (base_dir / "summary.json").exists():
        rc = _end(_cli("rlhf", pipe.with_dir(base_dir), work / "rlhf_ref.log", cache))
        if rc != 0:
            row.notes.append(f"base run failed ({rc})")
            return row
    changes = [("rlx.Experiment.sft_steps = 44", "sft_steps"),
               ('rlx.Experiment.objective = "grpo"', "objective"),
               ('rlx.Experiment.model_overrides = {"num_layers": 2}', "num_layers")]
    if not quick:
        changes += [("rlx.RLHFExperiment.rm_steps = 44", "steps"),
                    ("rlx.Experiment.seed = 1", "seed"),
                    ('rlx.Experiment.task = "sorting"', "task"),
                    ("rlx.Experiment.train_problems = 100", "train_problems"),
                    ("rlx.RLHFExperiment.rm_lr = 0.002", "lr")]
    for n, (change, key) in enumerate(changes):
        d = work / f"config_{n}"
        shutil.copytree(base_dir, d)
        before = _snapshot(d)
        log = work / f"config_{n}.log"
        rc = _end(_cli("rlhf", pipe.with_dir(d) + [change], log, cache))
        text = log.read_text(errors="replace")
        row.injected += 1
        row.clear_of += 1
        error = next((s for s in text.splitlines() if s.startswith("rlx: error:")), "")
        if rc == 2 and "Traceback" not in text:
            row.survived += 1
            if "another configuration" in error and key in error:
                row.clear += 1
            else:
                row.notes.append(f"{change}: error does not name {key!r}: {error[:160]}")
        else:
            row.notes.append(f"{change}: exit {rc} (not refused): "
                             f"{(error or text.strip().splitlines()[-1])[:160]}")
        after = _snapshot(d)
        row.lost += sum(1 for k, v in before.items() if after.get(k) != v)
        if any(".corrupt" in p.name for p in d.rglob("*")):
            row.notes.append(f"{change}: a checkpoint was quarantined")
    return row


# ------------------------------------------------------------------------- records
def records_section(work: Path) -> Row:
    from rlx.data.records import read_records

    row = Row("malformed records (JSONL, Parquet)", bitwise=None, bad_inputs=0)
    d = work / "records"
    d.mkdir()
    good = '{"prompt": "1+1=", "answer": "2"}\n'
    cases = {
        "broken_json.jsonl": good + '{"prompt": "2+2=", "answer": \n',
        "missing_answer.jsonl": good + '{"prompt": "2+2="}\n',
        "missing_prompt.jsonl": '{"answer": "4"}\n',
        "prompt_is_number.jsonl": '{"prompt": 5, "answer": "4"}\n',
        "answer_is_list.jsonl": '{"prompt": "2+2=", "answer": [4]}\n',
        "answer_is_bool.jsonl": '{"prompt": "2+2=", "answer": true}\n',
        "answer_is_null.jsonl": '{"prompt": "2+2=", "answer": null}\n',
        "answer_nan.jsonl": '{"prompt": "2+2=", "answer": NaN}\n',
        "answer_infinity.jsonl": good + '{"prompt": "2+2=", "answer": Infinity}\n',
        "empty_prompt.jsonl": '{"prompt": "  ", "answer": "4"}\n',
        "not_an_object.jsonl": '[1, 2, 3]\n',
        "empty.jsonl": "",
        "blank_lines.jsonl": "\n\n\n",
        "non_utf8.jsonl": b'{"prompt": "caf\xe9=", "answer": "1"}\n',
        "huge_line.jsonl": '{"prompt": "' + "9" * (2 << 20) + '", "answer": "1"}\n',
        "deep_nesting.jsonl": '{"prompt": "x", "answer": "1", "m": ' + "[" * 100000
                              + "]" * 100000 + "}\n",
        "huge_integer.jsonl": '{"prompt": "x", "answer": ' + "9" * 10000 + "}\n",
        "nul_bytes.jsonl": b'{"prompt": "a\x00b", "answer": "1"\x00}\n',
        "truncated_utf8.jsonl": '{"prompt": "x", "answer": "1"}\n'.encode() + b"\xe2\x82",
    }
    for name, content in cases.items():
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"prompt": ["1+1="], "answer": ["2"]}), d / "good.parquet")
        data = (d / "good.parquet").read_bytes()
        (d / "truncated.parquet").write_bytes(data[: len(data) // 2])
        (d / "not_parquet.parquet").write_bytes(b"this is not parquet\n" * 10)
        (d / "empty.parquet").write_bytes(b"")
        pq.write_table(pa.table({"prompt": ["1+1="]}), d / "missing_column.parquet")
        pq.write_table(pa.table({"prompt": [1], "answer": ["2"]}), d / "int_prompt.parquet")
        pq.write_table(pa.table({"prompt": ["1+1=", None], "answer": ["2", "3"]}),
                       d / "null_prompt.parquet")
        pq.write_table(pa.table({"prompt": ["1+1="], "answer": [float("nan")]}),
                       d / "nan_answer.parquet")
        pq.write_table(pa.table({"prompt": ["1+1="], "answer": [[1, 2]]}),
                       d / "list_answer.parquet")
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                                 "answer": pa.array([], pa.string())}), d / "no_rows.parquet")
    except ImportError:
        row.notes.append("pyarrow missing: Parquet cases skipped")
    pref = d / "pref_missing_rejected.jsonl"
    pref.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    pref2 = d / "pref_rejected_number.jsonl"
    pref2.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": 3}\n')
    directory = d / "a_directory.jsonl"
    directory.mkdir()
    paths = [p for p in sorted(d.iterdir()) if p.name != "good.parquet"]
    for p in paths:
        row.bad_inputs += 1
        row.injected += 1
        row.clear_of += 1
        kind = "preference" if p.name.startswith("pref_") else "prompt"
        try:
            got = read_records(p, kind=kind)
        except ValueError as err:
            row.survived += 1
            text = str(err)
            line_or_row = re.match(rf"{re.escape(str(p))}(:\d+:| row \d+:|:) ", text)
            if line_or_row and len(text) < 2000:
                row.clear += 1
            else:
                row.notes.append(f"{p.name}: unclear error {text[:120]!r}")
        except Exception as err:   # noqa: BLE001 - anything but ValueError is a finding
            row.notes.append(f"{p.name}: {type(err).__name__}: {str(err)[:120]}")
        else:
            row.notes.append(f"{p.name}: accepted ({len(got)} records)")
    return row


# -------------------------------------------------------------------------- rewards
USER_REWARDS = '''
import ctypes, math, os, signal, sys, time

def good(completion, problem):
    return float(len(completion) % 3)

def raises(completion, problem):
    raise ValueError("this reward is broken")

def hangs(completion, problem):
    while True:
        time.sleep(1)

def hangs_in_c(completion, problem):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGINT, signal.SIGTERM})
    ctypes.CDLL(None).sleep(3600)
    return 1.0

def nan(completion, problem):
    return float("nan")

def inf(completion, problem):
    return math.inf

def string(completion, problem):
    return "1.0"

def none(completion, problem):
    return None

def exits(completion, problem):
    sys.exit(3)

def os_exit(completion, problem):
    os._exit(7)

def ctrl_c(completion, problem):
    raise KeyboardInterrupt

def segfault(completion, problem):
    ctypes.string_at(0)

def memory_bomb(completion, problem):
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
'''
BAD_REWARDS = ("raises", "hangs", "hangs_in_c", "nan", "inf", "string", "none", "exits",
               "os_exit", "ctrl_c", "segfault", "memory_bomb")


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rewards_section(work: Path, cache: Path, quick: bool) -> Row:
    import numpy as np

    from rlx.rewards.pool import RewardPool
    from rlx.rewards.result import RewardFailedError
    from rlx.rewards.spec import RewardComponent, RewardSpec
    from rlx.tasks import get_task

    row = Row("reward faults (raise/hang/NaN/str/exit/segv/OOM)", bitwise=None)
    module = work / "user_rewards.py"
    module.write_text(USER_REWARDS)
    problems = get_task("arithmetic", digits=1).train(4, seed=0)
    texts = ["1", "22", "333", "4444"]
    for name in BAD_REWARDS:
        spec = RewardSpec((RewardComponent("good", ref=f"{module}:good"),
                           RewardComponent(name, ref=f"{module}:{name}")))
        rss = _rss_mb()
        row.injected += 1
        row.clear_of += 1
        try:
            with RewardPool(spec, backend="process", num_workers=1, timeout_s=1.0,
                            kill_grace_s=0.5, memory_limit_mb=1024) as pool:
                got = pool.score(texts, problems)
                replaced = pool.restarts                 # workers killed or dead
                again = pool.score(texts, problems)      # the pool still works
        except Exception as err:   # noqa: BLE001 - the pool itself failing is a finding
            row.notes.append(f"{name}: the pool raised {type(err).__name__}: {str(err)[:120]}")
            continue
        grew = _rss_mb() - rss
        bad = int(got.failures + got.timeouts)
        finite = bool(np.isfinite(got.scores).all() and np.isfinite(again.scores).all())
        # a sample whose call killed its worker fails as a whole (its other components
        # hold the failure value); otherwise the good component is untouched
        good_ok = replaced > 0 or bool(np.array_equal(got.components[:, 0],
                                                      [1.0, 2.0, 0.0, 1.0]))
        good_ok = good_ok and bool(np.array_equal(again.components[:, 0],
                                                  got.components[:, 0]) or replaced)
        if bad == len(texts) and finite and good_ok and grew < 200:
            row.survived += 1
        else:
            row.notes.append(f"{name}: {bad}/{len(texts)} counted, finite={finite}, "
                             f"good component intact={good_ok}, trainer RSS +{grew:.0f} MB")
        try:
            got.raise_if_all_failed()
            row.notes.append(f"{name}: all-failed not detected")
        except RewardFailedError as err:
            if name in str(err):
                row.clear += 1
            else:
                row.notes.append(f"{name}: all-failed error does not name it: {err}")
    # end to end: rlx train with a reward that fails on every call
    if True:
        row.injected += 1
        row.clear_of += 1
        run_dir = work / "reward_fault_run"
        log = work / "reward_fault_run.log"
        params = TINY + ["rlx.Experiment.sft_steps = 2", "rlx.train.RLConfig.steps = 2",
                         f'rlx.Experiment.rewards = ("{module}:raises",)',
                         f'rlx.Experiment.run_dir = "{run_dir}"']
        rc = _end(_cli("train", params, log, cache))
        text = log.read_text(errors="replace")
        if rc not in (0,) and "this reward is broken" in text:
            row.survived += 1                 # stopped, the run's files intact
            if "Traceback" not in text:
                row.clear += 1
            else:
                row.notes.append("rlx train with an always-failing reward: stops naming "
                                 "it, but with a traceback (RuntimeError from "
                                 "RLTrainer.collect is not a ValueError)")
        else:
            row.notes.append(f"rlx train with an always-failing reward: exit {rc}")
    return row


# ------------------------------------------------------------------- adversarial
def adversarial_section(work: Path, quick: bool) -> Row:
    import numpy as np

    from rlx.rewards.pool import RewardPool
    from rlx.rewards.spec import RewardComponent, RewardSpec, available_rewards
    from rlx.tasks import get_task

    row = Row("adversarial completions to built-in rewards", bitwise=None, bad_inputs=0)
    big = 10_000_000
    inputs = {
        "huge exponent": "#### 1e999999999",
        "huge power": "#### 9**9**9**9**9",
        "latex power": "\\boxed{10^{10^{10^{10}}}}",
        "huge integer": "#### " + "9" * 100_000,
        "deep nesting": "#### " + "(" * 50_000 + "1" + ")" * 50_000,
        "deep braces": "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_000 + "}",
        "arabic-indic digits": "#### ١٢",
        "math bold digits": "#### 𝟏𝟐",
        "fullwidth digits": "#### １２",
        "superscripts": "#### ²³",
        "NUL bytes": "#### 1\x002\x00" * 1000,
        "lone surrogate": "#### 1\ud8002",
        "nan / inf": "#### nan inf -inf 1/0",
        "10 MB digits": "9" * big,
        "10 MB answer line": "#### " + "1" * big,
        "10 MB spaces": " " * big + "#### 2",
        "10 MB brackets": "[" * big,
        "countdown eval bomb": "(" * 100_000 + "2**99999" + ")" * 100_000,
    }
    if quick:
        inputs = {k: v for k, v in inputs.items()
                  if k not in ("10 MB spaces", "latex power", "superscripts")}
    tasks = {"countdown": get_task("countdown"), "sorting": get_task("sorting")}
    kwargs = {"format": {"pattern": r"#### -?\d+"}}
    for name in available_rewards():
        task = tasks.get(name, get_task("arithmetic", digits=1))
        problem = task.train(1, seed=0)[0]
        spec = RewardSpec((RewardComponent(name, kwargs=kwargs.get(name, {})),))
        texts = list(inputs.values())
        row.bad_inputs += len(texts)
        row.injected += len(texts)
        try:
            with RewardPool(spec, backend="process", num_workers=2, timeout_s=10.0) as pool:
                t0 = time.perf_counter()
                got = pool.score(texts, [problem] * len(texts))
                seconds = time.perf_counter() - t0
        except Exception as err:   # noqa: BLE001 - the pool failing is a finding
            row.notes.append(f"{name}: pool raised {type(err).__name__}: {str(err)[:100]}")
            continue
        ok = np.isfinite(got.scores) & ~got.failed
        row.survived += int(ok.sum())
        if not ok.all():
            failed = [k for k, good in zip(inputs, ok) if not good]
            row.notes.append(f"{name}: {len(failed)} not scored ({got.timeouts} timeouts, "
                             f"{got.crashes} crashes, {got.failures} failures: "
                             f"{', '.join(failed[:4])}); {got.errors[:1]}")
        row.notes.append(f"{name}: {len(texts)} inputs in {seconds:.1f} s")
    return row


# --------------------------------------------------------------------------- table
def table(rows: list[Row]) -> str:
    def cell(v, of=None):
        if v is None:
            return "—"
        return f"{v}/{of}" if of is not None else str(v)

    head = ("fault class", "faults injected", "runs that survived", "resumed bitwise",
            "bad inputs tried", "clear errors given", "data lost")
    body = []
    for r in rows:
        body.append((r.name, str(r.injected), cell(r.survived, r.injected),
                     cell(r.bitwise, r.injected if r.bitwise is not None else None),
                     cell(r.bad_inputs), cell(r.clear, r.clear_of) if r.clear_of else "—",
                     str(r.lost)))
    total = ("total", str(sum(r.injected for r in rows)),
             cell(sum(r.survived for r in rows), sum(r.injected for r in rows)),
             cell(sum(r.bitwise or 0 for r in rows),
                  sum(r.injected for r in rows if r.bitwise is not None)),
             str(sum(r.bad_inputs or 0 for r in rows)),
             cell(sum(r.clear for r in rows), sum(r.clear_of for r in rows)),
             str(sum(r.lost for r in rows)))
    widths = [max(len(x[i]) for x in [head, *body, total]) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, body), sep, line(total)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir, "
                        "removed at the end)")
    parser.add_argument("--only", default=None, help="comma-separated sections: signals, "
                        "files, config, records, rewards, adversarial")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rlx_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "jax_cache"
    rng = random.Random(args.seed)
    only = set(args.only.split(",")) if args.only else None
    sections = [
        ("records", lambda: records_section(work)),
        ("files", lambda: checkpoint_files_section(work, rng, args.quick)),
        ("rewards", lambda: rewards_section(work, cache, args.quick)),
        ("adversarial", lambda: adversarial_section(work, args.quick)),
        ("signals", lambda: signals_section(work, cache, rng, args.quick)),
        ("config", lambda: config_section(work, cache, args.quick)),
    ]
    rows, t0 = [], time.time()
    for name, run in sections:
        if only and name not in only:
            continue
        t = time.time()
        print(f"[faults] {name} ...", file=sys.stderr, flush=True)
        r = run()
        r.notes.append(f"{time.time() - t:.0f} s")
        rows.append(r)
        print(f"[faults] {name}: {r.injected} injected, {r.survived} survived, "
              f"{r.lost} lost ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    print()
    print(table(rows))
    print()
    for r in rows:
        for note in r.notes:
            print(f"  {r.name.split(' (')[0]}: {note}")
    print(f"\n{'quick' if args.quick else 'full'} mode, seed {args.seed}, "
          f"{time.time() - t0:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.lost == 0 and r.survived == r.injected for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

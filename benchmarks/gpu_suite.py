"""Every accelerator check and benchmark rlx has, in one call, as one table (issue 16.4).

Run it through ``benchmarks/gpu_suite.sh`` (which finds the interpreter and, on a bare
machine, imports rlx from the checkout); the header of that script says how to run it
on a lent GPU in one command. ``python benchmarks/gpu_suite.py --list`` names the parts.

Parts (each in its own process, with its own timeout; one that fails, crashes or runs
out of time prints FAIL with its reason and the suite goes on):

  a.native   every Pallas kernel natively (GPU: compiled Triton) against its pure-jnp
             reference, forward and gradients, at model-sized bf16 shapes: log-prob/
             entropy from logits and from hidden states, ratio statistics and the
             R²VPO ratio-variance gradient, block-sparse attention on streaming-head
             and Prefix Grouper schedules (attention_schedules), LServe paged decode.
             Error = relative L2 distance ‖kernel − reference‖ / ‖reference‖.
  a.tests    ``tests/kernels`` on the GPU: the tests parametrised by backend "gpu" (and
             the backend-free ones) then compile natively, since the dispatcher runs
             a kernel in interpret mode only off its platform (kernels/dispatch.py).
             Left out: the TPU-interpret cases and the two tests that assert a CPU
             machine. Tests written with interpret-only block sizes (Triton needs
             powers of two >= 16) are counted apart from real failures.
  b.bandwidth  achieved HBM bandwidth: a device copy, ratio statistics (target >= 70%
             of peak), the ratio-variance gradient, log-prob/entropy from logits; the
             fused log-prob/entropy kernel against the chunked jnp path the model
             takes otherwise (``rlx.models.logprobs.logprobs_from_hidden``).
  c.sparse   block-sparse attention (streaming Λ schedules) against the dense kernel ×
             density at 16k and 32k tokens, forward+backward (goal ratio <= 1.5).
  d.decode   one decode step of a qwen2.5-0.5b-shaped model (bf16, random weights) at
             256 rows (32 prompts × G = 8, shared-prefix KV; ``benchmarks/sampler.py``'s
             run_one) against its memory-bandwidth floor: (weights + the KV buffer the
             step reads) / peak bandwidth (target <= 1.5×, issue 16's decode target).
  e.update   MFU of the real update program (``rlx.train.update.make_update`` jitted as
             ``RLTrainer`` does: GRPO, one AdamW step, f32 master weights, bf16
             compute) of a qwen2.5-0.5b-shaped model on 16 rows × (512 + 512) tokens
             (target >= 50%). Model FLOPs = 3 × forward, forward = 2·N_mat·B·S
             (non-embedding weights) + 2·D·V·B·T (logits of the T scored tokens) +
             4·L·H·Dh·B·S(S+1)/2 (causal attention).
  extras (run while the budget lasts): c.prefix (Prefix Grouper packed row vs the
             naive G rows, attention fwd+bwd, against the ideal speed-up),
             e.update_flash (e.update with the Pallas flash attention,
             attention_backend="dense_kernel"), e.update_1.5b (qwen2.5-1.5b shape).

Peaks assumed (printed with the table; ``--peak-bw`` / ``--peak-flops`` override):
HBM bandwidth by device kind (H200 4.8 TB/s, H100 3.35 TB/s, A100 2.0 TB/s, else the
measured copy) and dense bf16 FLOP/s from ``rlx.train.flops`` (H200 989 TFLOP/s).

``--cpu-check`` runs the same parts on CPU: the kernel checks in Pallas interpret
mode at tiny shapes (these are real checks: OK or FAIL), every measurement's code
path at tiny shapes on the XLA reference (a dry run; its figures go to the note), and
each GPU-sized kernel program lowered for CUDA (Triton lowering enforces the hardware
block rules; the note counts its Triton calls); measured targets are SKIP(no GPU).
a.tests only collects the tests, and e.update_1.5b is not run.

Output: the table on stdout; with ``$OUT`` set (or ``--json``), ``gpu_suite.json``
(every row with its raw numbers, per-part exit status and error tails) and
``gpu_suite.log`` (each part's full output). Exit status 0 when no row is FAIL.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CHILD_SCRIPT = os.path.abspath(__file__)     # what each part's process runs (--child ID)
NO_GPU = "SKIP(no GPU)"
# --cpu-check runs the timing code of the measured parts at tiny sizes on the XLA
# reference (a.native checks the kernels themselves in interpret mode, and every
# GPU-sized kernel program is lowered for CUDA): cheap enough for the test suite.
TINY_BACKEND = "reference"
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}   # vendor HBM figures
TESTS_DESELECT = ("not tpu and not cpu_machine and not follows_dispatcher "
                  "and not shard_map_over_four")
INTERPRET_ONLY = "GPU (Triton) needs"        # _check_hardware_blocks' message
TESTS_PLATFORM = "cuda"        # JAX_PLATFORMS for a.tests (tests/conftest.py defaults to cpu)


# ============================================================== rows and context
@dataclasses.dataclass
class Ctx:
    cpu_check: bool
    deadline: float
    peak_bw: float | None = None
    peak_flops: float | None = None
    rows_file: str | None = None
    part: str = ""

    @property
    def mode(self) -> str:
        return "Pallas interpret (CPU)" if self.cpu_check else "native"

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def backend(self) -> str:
        """Kernel backend of the measured paths: the GPU kernels, or in --cpu-check the
        XLA reference at tiny sizes (see TINY_BACKEND)."""
        return TINY_BACKEND if self.cpu_check else "gpu"

    def reps(self, n: int) -> int:
        return 1 if self.cpu_check else n

    def result(self, check, value, target, ok, note, lowered=None, **data):
        """A measured row: on the GPU status OK and ``met`` from ``ok`` (None: nothing
        to judge); in --cpu-check SKIP(no GPU), the tiny-size figures in the note, with
        the number of Triton calls of the GPU-sized program lowered for CUDA."""
        if not self.cpu_check:
            self.emit(check, "OK", value or "", target, "" if ok is None else _met(ok), note,
                      **data)
            return
        parts = [f"dry run at tiny size: {value}; {note}" if value else note]
        if lowered is not None:
            parts.append(f"GPU-sized program lowered for CUDA ({lowered} Triton "
                         f"call{'s' if lowered != 1 else ''})")
        self.emit(check, NO_GPU, "", target, "", "; ".join(parts), lowered_triton_calls=lowered,
                  **data)

    def emit(self, check, status, value="", target="", met="", note="", **data):
        row = dict(part=self.part, check=check, status=status, value=value, target=target,
                   met=met, note=note, data=_jsonable(data))
        print(f"ROW {json.dumps(row)}", flush=True)
        with open(self.rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    @contextlib.contextmanager
    def check(self, name):
        """Runs one check; an exception becomes a FAIL row naming it."""
        t0 = time.time()
        print(f"-- {name}", flush=True)
        try:
            yield
        except Exception as e:  # noqa: BLE001 - isolation is the point
            traceback.print_exc()
            self.emit(name, "FAIL", note=_reason(e))
        print(f"-- {name}: {time.time() - t0:.1f} s", flush=True)


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text[:300]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    try:
        f = float(x)
        return f if math.isfinite(f) else str(f)
    except (TypeError, ValueError):
        return str(x)


def _load(name: str):
    """A benchmarks/ script as a module (by path: 'kernels' would clash with kernels/)."""
    spec = importlib.util.spec_from_file_location(f"rlx_bench_{name}",
                                                  os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def _ms(t):
    return f"{t * 1e3:.3g} ms"


# ============================================================== device facts
def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def peaks(ctx: Ctx) -> tuple[float, float]:
    """(HBM bytes/s, bf16 FLOP/s) the targets divide by; on CPU the H200's figures
    (only so that the tiny-size code path formats numbers; nothing is judged)."""
    from rlx.train.flops import PEAK_BF16, peak_flops

    kind = _device_kind()
    bw = ctx.peak_bw or next((v for k, v in PEAK_BW.items() if k.lower() in kind.lower()),
                             None)
    fl = ctx.peak_flops or peak_flops()
    if ctx.cpu_check:
        bw, fl = bw or PEAK_BW["H200"], fl or PEAK_BF16["H200"]
    if bw is None:       # a device kind without a vendor figure here: its measured copy
        bw = _load("kernels").measure_bandwidth(2 * 2**30, 10)
    if fl is None:       # likewise its measured bf16 matmul rate
        fl = matmul_rate(8192)
    return bw, fl


@contextlib.contextmanager
def native_dispatch():
    """While lowering for CUDA on a CPU host: kernels resolve as compiled Triton
    (interpret=False), as they would on the GPU."""
    from rlx_kernels import dispatch

    orig = dispatch.resolve_backend
    dispatch.resolve_backend = lambda backend="auto", platform=None: orig(backend,
                                                                          platform="gpu")
    try:
        yield
    finally:
        dispatch.resolve_backend = orig


def lower_cuda(fn, *args) -> int:
    """Lowers jit(fn)(*args) (arrays or ShapeDtypeStructs) for CUDA; returns the number
    of Triton kernel calls in the module (raises if the lowering fails)."""
    import jax

    with native_dispatch():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")


# ============================================================== a.native
def part_a_native(ctx: Ctx):
    import jax
    import jax.numpy as jnp

    gpu = not ctx.cpu_check
    dt = jnp.bfloat16 if gpu else jnp.float32
    kb = _load("kernels")
    make = kb.random_maker(jax.random.key(0))
    gpu_builders = {c[0]: c[2] for c in kb.check_cases(jnp.bfloat16)}

    for key, name_of, build, gpu_z, cpu_z in kb.check_cases(dt):
        name = name_of(gpu_z if gpu else cpu_z)
        with ctx.check(name):
            lowered = None
            if not gpu:   # the GPU-sized bf16 program, lowered for CUDA (kernel side only)
                kern, _, args, cot, _ = gpu_builders[key](gpu_z, kb.abstract_maker)
                lowered = _lower_case(kern, args, cot)
            kern, ref, args, cot, bf16_out = build(cpu_z if not gpu else gpu_z, make)
            fwd_err, grad_err = kb.compare(kern, ref, args, cot)
            tol_fwd, tol_grad = kb.tolerances(args[0].dtype, bf16_out)
            ok = fwd_err <= tol_fwd and (grad_err is None or grad_err <= tol_grad)
            value = f"fwd {fwd_err:.1e}" + ("" if grad_err is None else
                                             f" · grad {grad_err:.1e}")
            target = f"fwd ≤ {tol_fwd:g}" + ("" if grad_err is None else
                                              f" · grad ≤ {tol_grad:g}")
            note = ctx.mode + ("" if lowered is None else
                               f"; GPU-sized bf16 program lowered for CUDA ({lowered} Triton "
                               f"call{'s' if lowered != 1 else ''})")
            ctx.emit(name, "OK" if ok else "FAIL", value, target, _met(ok), note,
                     fwd_err=fwd_err, grad_err=grad_err, tol_fwd=tol_fwd, tol_grad=tol_grad,
                     lowered_triton_calls=lowered)


def _lower_case(kern, args, cot) -> int:
    """Triton calls of the kernel side of a case (forward, and its gradient if any)."""
    import jax

    if cot is None:
        return lower_cuda(kern, *args)
    if isinstance(cot, str):       # "variance": the gradient of the last (scalar) output
        return lower_cuda(lambda *a: (kern(*a), jax.grad(
            lambda x, *rest: kern(x, *rest)[-1])(*a)), *args)
    return lower_cuda(lambda a, c: jax.vjp(kern, *a)[1](c), tuple(args), cot)


def summarize_junit(path) -> tuple[int, list, list, int]:
    """(passed, failed, interpret_only, skipped) of a pytest JUnit XML report; failed and
    interpret_only are [(test id, first line of the message)], interpret_only holding the
    failures raised by the kernels' hardware block checks (tests written with block
    sizes only Pallas interpret mode accepts)."""
    passed, failed, interp, skipped = 0, [], [], 0
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            message = bad.get("message") or ""
            first = message.splitlines()[0][:160] if message else ""
            (interp if INTERPRET_ONLY in message + (bad.text or "") else failed).append(
                (tid, first))
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, interp, skipped


# ============================================================== a.tests
def part_a_tests(ctx: Ctx):
    base = [sys.executable, "-m", "pytest", os.path.join(REPO, "tests", "kernels"),
            "-p", "no:cacheprovider", "-k", TESTS_DESELECT]        # -q: pyproject addopts
    name = "tests/kernels with backend 'gpu' natively"
    env = dict(os.environ)
    if ctx.cpu_check:
        env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(base + ["--collect-only"], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=max(ctx.left() - 5, 5))
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        selected = 0                       # "path::id" lines (-q) or "path: N" (-qq)
        for line in proc.stdout.splitlines():
            head, _, count = line.strip().rpartition(": ")
            if "::" in line:
                selected += 1
            elif head.endswith(".py") and count.isdigit():
                selected += int(count)
        if proc.returncode != 0 or not selected:
            raise RuntimeError(f"pytest --collect-only rc={proc.returncode}: "
                               f"{(proc.stdout + proc.stderr).strip().splitlines()[-1:]}")
        ctx.emit(name, NO_GPU, f"{selected} selected", "all pass", "",
                 "collected only; they run in interpret mode in the normal test suite",
                 selected=selected)
        return
    env.update(JAX_PLATFORMS=TESTS_PLATFORM, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    xml = os.path.join(tempfile.mkdtemp(prefix="rlx-suite-"), "junit.xml")
    cmd = base + [f"--junitxml={xml}"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "4"]
    # pytest and its xdist workers in a process group of their own, ended as a whole
    # 10 s before this part's deadline (workers left behind would hold the GPU).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(ctx.left() - 10, 10))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        print(out[-20000:])
        raise RuntimeError("pytest did not finish before the part's deadline") from None
    finally:
        _kill_group(proc)
    print(out[-20000:])
    tail = (out.strip().splitlines() or [""])[-1]
    if not os.path.exists(xml):
        raise RuntimeError(f"pytest wrote no report (rc={proc.returncode}): {tail}")
    passed, failed, interp, skipped = summarize_junit(xml)
    value = f"{passed} passed, {len(failed)} failed"
    note = (f"{len(interp)} use interpret-only block sizes; " if interp else "") + \
        (f"{skipped} skipped; " if skipped else "") + \
        ("; ".join(f"{t}: {m}" for t, m in failed[:4]) if failed else tail)
    ctx.emit(name, "FAIL" if failed else "OK", value, "all pass", _met(not failed), note,
             passed=passed, failed=failed, interpret_only=interp, skipped=skipped)


# ============================================================== b.bandwidth
def part_b_bandwidth(ctx: Ctx):
    import jax
    import jax.numpy as jnp

    from rlx.models.logprobs import logprobs_from_hidden
    from rlx_kernels import logprob_entropy as le
    from rlx_kernels import ratio_stats as rs

    kb = _load("kernels")
    bw, _ = peaks(ctx)
    S = jax.ShapeDtypeStruct
    gpu, be = not ctx.cpu_check, ctx.backend
    pct = lambda nbytes, sec: 100 * nbytes / sec / bw  # noqa: E731
    peak_txt = f"of the {bw / 1e12:.2f} TB/s peak"

    name = "device copy (2 GiB f32)"
    with ctx.check(name):
        copy = kb.measure_bandwidth(2 * 2**30 if gpu else 16 * 2**20, 20 if gpu else 2)
        ctx.result(name, f"{copy / 1e12:.2f} TB/s", "(reference)", None,
                   f"{100 * copy / bw:.0f}% {peak_txt}", bytes_per_s=copy)

    b, t = 4096, 32768
    name = f"ratio_statistics [{b}, {t}] f32"
    with ctx.check(name):
        lowered = None if gpu else lower_cuda(
            lambda n, o, m, g: rs.ratio_statistics(n, o, m, g, num_groups=b // 8, eps_low=0.2,
                                                   eps_high=0.28, backend="gpu"),
            *[S((b, t), jnp.float32)] * 3, S((b,), jnp.int32))
        r = kb.ratio_stats_case(*((b, t) if gpu else (8, 1024)), be, ctx.reps(20))
        p = pct(r["bytes"], r["t_kernel"])
        ctx.result(name, f"{p:.0f}% ({r['bytes'] / r['t_kernel'] / 1e12:.2f} TB/s)",
                   "≥ 70% of peak", p >= 70, f"{_ms(r['t_kernel'])}; XLA reference "
                   f"{pct(r['bytes'], r['t_ref']):.0f}%; {peak_txt}", lowered, **r)

    name = f"ratio_variance fwd+bwd [{b}, {t}] f32"
    with ctx.check(name):
        lowered = None if gpu else lower_cuda(jax.value_and_grad(
            lambda n, o, m: rs.ratio_variance(n, o, m, backend="gpu")), *[S((b, t), jnp.float32)] * 3)
        r = kb.ratio_variance_case(*((b, t) if gpu else (8, 1024)), be, ctx.reps(20))
        ctx.result(name, f"{pct(r['bytes'], r['t_kernel']):.0f}%", "(info)", None,
                   f"{_ms(r['t_kernel'])}; XLA reference {pct(r['bytes'], r['t_ref']):.0f}%",
                   lowered, **r)

    n, v = 16384, 151_936
    name = f"logprob_entropy logits [{n}, {v}] bf16"
    with ctx.check(name):
        lowered = None if gpu else lower_cuda(
            jax.grad(lambda x, t: le.token_logprob_entropy(x, t, backend="gpu")[0].sum()),
            S((n, v), jnp.bfloat16), S((n,), jnp.int32))
        r = kb.logits_case(*((n, v) if gpu else (16, 2048)), be, ctx.reps(10),
                           jnp.bfloat16 if gpu else jnp.float32)
        ref = (f"; XLA reference fwd {pct(r['bytes_fwd'], r['t_ref_fwd']):.0f}%"
               if "t_ref_fwd" in r else "; XLA reference does not fit")
        ctx.result(name, f"fwd {pct(r['bytes_fwd'], r['t_kernel_fwd']):.0f}%", "(info)", None,
                   f"fwd {_ms(r['t_kernel_fwd'])}; fwd+bwd "
                   f"{pct(r['bytes_fwd_bwd'], r['t_kernel_fwd_bwd']):.0f}%{ref}", lowered, **r)

    bb, s, d, v = 16, 2048, 896, 151_936
    name = f"fused vs chunked log-prob [{bb}×{s}, D={d}, V={v}] bf16"
    with ctx.check(name):
        lowered = None if gpu else lower_cuda(
            jax.grad(lambda h, w, t: logprobs_from_hidden(h, w, t, backend="gpu")[0].sum(),
                     argnums=(0, 1)),
            S((bb, s, d), jnp.bfloat16), S((d, v), jnp.bfloat16), S((bb, s), jnp.int32))
        r = kb.hidden_vs_chunked(*((bb, s, d, v) if gpu else (2, 16, 32, 256)), ctx.reps(3),
                                 jnp.bfloat16 if gpu else jnp.float32, backend=be)
        fwd = r["t_chunked_fwd"] / r["t_fused_fwd"]
        both = r["t_chunked_fwd_bwd"] / r["t_fused_fwd_bwd"]
        tf = r["flops_fwd_bwd"] / r["t_fused_fwd_bwd"] / 1e12
        ctx.result(name, f"fwd {fwd:.2f}× · f+b {both:.2f}×", "fused ≥ 1× chunked",
                   min(fwd, both) >= 1.0,
                   f"fused f+b {_ms(r['t_fused_fwd_bwd'])} ({tf:.0f} TFLOP/s), chunked "
                   f"{_ms(r['t_chunked_fwd_bwd'])}; XLA temp {kb.fmt_bytes(r['temp_fused_fwd_bwd'])}"
                   f" vs {kb.fmt_bytes(r['temp_chunked_fwd_bwd'])}", lowered, **r)


# ============================================================== c.sparse / c.prefix
def part_c_sparse(ctx: Ctx):
    import jax
    import jax.numpy as jnp

    from rlx_kernels import block_sparse_attention as bsa

    at = _load("attention")
    gpu = not ctx.cpu_check
    cfg = dict(b=1, h=16, kh=8, d=128, bq=64, bk=64, dtype=jnp.bfloat16,
               lengths=[16384, 32768], densities=[1.0, 0.25, 0.1])
    tiny = dict(cfg, h=2, kh=1, d=16, bq=16, bk=16, dtype=jnp.float32, lengths=[64])
    S = jax.ShapeDtypeStruct
    tiny_rows = []

    def one_length(s):
        lowered = None
        if gpu:
            rows = at.sparse_vs_dense(dict(cfg, lengths=[s]), "gpu", 3, fwd=False)
        else:         # the GPU program at this length (middle density), and tiny timings
            sched, _ = at.streaming_for_density(s, cfg["bq"], cfg["bk"], 0.25)
            q, kv = S((1, s, 16, 128), jnp.bfloat16), S((1, s, 8, 128), jnp.bfloat16)
            lowered = lower_cuda(jax.grad(lambda q, k, v: bsa.block_sparse_attention(
                q, k, v, sched, backend="gpu").astype(jnp.float32).sum(),
                argnums=(0, 1, 2)), q, kv, kv)
            tiny_rows[:] = tiny_rows or at.sparse_vs_dense(tiny, ctx.backend, 1, fwd=False)
            rows = tiny_rows
        dense_tflops = None
        for r in rows:
            tf = r["flops_fwd_bwd"] / r["t_fwd_bwd"] / 1e12
            if "goal_ratio" not in r:
                dense_tflops = tf
                ctx.result(f"dense flash attention fwd+bwd S={s}", _ms(r["t_fwd_bwd"]),
                           "(baseline)", None, f"{tf:.0f} TFLOP/s; H=16/K=8 Dh=128 bf16, "
                           "blocks 64×64", lowered, **r)
                continue
            ratio = r["goal_ratio"]
            ctx.result(f"block-sparse fwd+bwd S={s} density {r['target_density']:g}",
                       f"{ratio:.2f}× dense×density", "≤ 1.5", ratio <= 1.5,
                       f"{_ms(r['t_fwd_bwd'])} at density {r['density']:.3f}, {tf:.0f} "
                       f"TFLOP/s (dense {dense_tflops:.0f})", lowered, **r)

    for s in cfg["lengths"]:
        with ctx.check(f"block-sparse vs dense S={s}"):
            one_length(s)


def part_c_prefix(ctx: Ctx):
    import jax.numpy as jnp

    at = _load("attention")
    cfg = dict(g=8, t=512, h=16, kh=8, d=128, bq=64, bk=64, dtype=jnp.bfloat16,
               prompts=[2048, 8192])
    if ctx.cpu_check:
        rows = at.prefix_vs_naive(dict(cfg, g=4, t=16, h=2, kh=1, d=16, bq=16, bk=16,
                                       dtype=jnp.float32, prompts=[32, 64]), ctx.backend, 1)
    else:
        rows = at.prefix_vs_naive(cfg, "gpu", 3)
    for prompt, r in zip(cfg["prompts"], rows):
        ctx.result(f"Prefix Grouper prompt {prompt} + 8×512 (attention f+b)",
                   f"{r['speedup']:.2f}× vs naive", f"→ ideal {r['ideal']:.2f}×",
                   r["speedup"] >= 1.0,
                   f"naive {_ms(r['t_naive'])}, packed {_ms(r['t_packed'])}", **r)


# ============================================================== d.decode
def part_d_decode(ctx: Ctx):
    import jax

    from rlx.models import api
    from rlx.models.config import model_config

    sampler = _load("sampler")
    bw, _ = peaks(ctx)
    preset, p, g, plen, new = "qwen2.5-0.5b", 32, 8, 256, 64
    name = f"decode step {preset} bf16, {p}×{g} rows, prompt ≤{plen}, shared KV"
    if ctx.cpu_check:
        preset, dtype, p, g, plen, new = "tiny", "float32", 2, 2, 8, 4
    else:
        dtype = "bfloat16"
    cfg = model_config(preset, dtype=dtype, param_dtype=dtype)
    graphdef, params = api.init(cfg, seed=0)
    r = sampler.run_one(cfg, graphdef, params, p, g, plen, new, "shared", ctx.reps(2))
    nbytes = sampler.bytes_per_step(cfg, params, p, g, r["sp"], r["t"], "shared")
    floor_ms = 1e3 * nbytes / bw
    ratio = r["step_ms"] / floor_ms
    ctx.result(name, f"{ratio:.2f}× floor", "≤ 1.5× floor", ratio <= 1.5,
               f"{r['step_ms']:.3g} ms/step vs floor {floor_ms:.3g} ms ({nbytes / 2**30:.2f} "
               f"GiB weights+KV / {bw / 1e12:.2f} TB/s); {r['tok_s']:.0f} tok/s; compile "
               f"{r['compile_s']:.0f} s", **r, bytes_per_step=nbytes, floor_ms=floor_ms,
               ratio=ratio, peak_bw=bw,
               weights_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))


# ============================================================== e.update
def _update_program(preset, *, p, g, sp, t, dtype, attention, abstract, mesh, layers=None):
    """(jitted update, state, batch, model config) of one GRPO update as RLTrainer builds
    it (``make_update`` + ``jit_update`` over ``mesh``), or with ``abstract`` the same
    program's ShapeDtypeStructs and a plain ``jax.jit`` (for lowering only)."""
    import jax
    import numpy as np

    from rlx import sharding as sh
    from rlx.models import api
    from rlx.models.config import model_config
    from rlx.objectives import presets
    from rlx.train import optim, update as update_lib
    from rlx.train import state as state_lib
    from rlx.train.batches import Sequences

    overrides = dict(dtype=dtype, param_dtype="float32", attention_backend=attention)
    if layers:
        overrides["num_layers"] = layers
    if preset == "micro":
        cfg = model_config("tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                           vocab_size=512, **{k: v for k, v in overrides.items()
                                              if k != "num_layers"})
    else:
        cfg = model_config(preset, **overrides)
    objective = presets.grpo(kl_coef=0.0)
    tx = optim.optimizer(learning_rate=1e-6)
    b, s = p * g, sp + t
    if abstract:
        graphdef, params = api.abstract_init(cfg)
        state = jax.eval_shape(lambda x: state_lib.create(x, tx, objective_state=objective.init()),
                               params)
    else:
        graphdef, params = api.init(cfg, seed=0)
        state = state_lib.create(params, tx, objective_state=objective.init())
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (b, s)).astype(np.int32)
    batch = update_lib.IterationBatch(
        seq=Sequences(tokens=tokens, attention_mask=np.ones((b, s), bool),
                      positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()),
        rewards=rng.standard_normal(b).astype(np.float32),
        components=rng.standard_normal((b, 1)).astype(np.float32),
        mask=np.ones((b, t), bool), tokens=tokens[:, sp:], lengths=np.full(b, t, np.int32),
        finished=np.ones(b, bool), truncated=np.zeros(b, bool), forced=np.zeros((b, t), bool),
        sampler_logp=np.zeros((b, t), np.float32),
        group_ids=(np.arange(b) // g).astype(np.int32))
    if abstract:
        update = update_lib.make_update(graphdef, tx, objective, num_generations=g,
                                        mesh=None, shard_map=False)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        return update, state, batch, cfg
    update = update_lib.make_update(graphdef, tx, objective, num_generations=g, mesh=mesh,
                                    shard_map=True)
    st_sh = sh.state_shardings(state, mesh)
    state = sh.place(state, st_sh)
    batch = sh.shard_batch(batch, mesh)
    fn = update_lib.jit_update(update, mesh, st_sh, None, None, batch)
    return fn, state, batch, cfg


def _layers(preset) -> int:
    from rlx.models.config import model_config

    return model_config(preset).num_layers


def update_flops(cfg, b, s, t) -> float:
    """Necessary FLOPs of one forward+backward of the update (docstring of this file)."""
    d, f, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    h, k, L = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
    n_mat = L * (d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f)
    fwd = 2.0 * n_mat * b * s + 2.0 * d * v * b * t + 4.0 * L * h * dh * b * s * (s + 1) / 2
    return 3.0 * fwd


def matmul_rate(n: int = 8192) -> float:
    """Measured bf16 FLOP/s of an n³ matmul (what 'achievable' means on this chip)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.bfloat16)
    return 2 * n ** 3 / _load("kernels").time_call(jax.jit(lambda a: a @ a), x, reps=10)


def _update_part(ctx: Ctx, preset, attention, *, p=2, g=8, sp=512, t=512, run_tiny=True):
    import jax

    from rlx import sharding as sh

    _, peak = peaks(ctx)
    name = f"update MFU {preset} bf16 {p * g}×({sp}+{t}) attention={attention}"
    lowered = None
    if ctx.cpu_check:
        fn, state, batch, _ = _update_program(preset, p=p, g=g, sp=sp, t=t, layers=2,
                                              dtype="bfloat16", attention=attention,
                                              abstract=True, mesh=None)
        lowered = lower_cuda(fn, state, None, None, batch)
        if not run_tiny:
            ctx.result(name, None, "≥ 50% MFU", None,
                       f"program at full width and length, 2 of {_layers(preset)} layers",
                       lowered)
            return
        preset, p, g, sp, t = "micro", 2, 2, 8, 8
    fn, state, batch, cfg = _update_program(preset, p=p, g=g, sp=sp, t=t, dtype="bfloat16",
                                            attention=attention, abstract=False,
                                            mesh=sh.make_mesh())
    t0 = time.perf_counter()
    state, _, m = fn(state, None, None, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, _, m = fn(state, None, None, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    gnorm = float(m["grad_norm"])
    if not math.isfinite(gnorm) or gnorm <= 0:
        raise FloatingPointError(f"update grad_norm {gnorm}: the update did not train")
    step = sorted(times)[1]
    flops = update_flops(cfg, p * g, sp + t, t)
    mfu = flops / step / peak
    rate = matmul_rate(8192 if not ctx.cpu_check else 256)
    mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    ctx.result(name, f"{100 * mfu:.1f}%", "≥ 50% MFU", mfu >= 0.5,
               f"{_ms(step)}/update, {flops / step / 1e12:.0f} TFLOP/s of {peak / 1e12:.0f} "
               f"peak ({flops / step / rate:.0%} of the measured {rate / 1e12:.0f} TFLOP/s "
               f"matmul); {cfg.num_params / 1e9:.2f}B params; compile {compile_s:.0f} s; grad "
               f"norm {gnorm:.3g}", lowered, step_s=step, times=times, flops=flops, mfu=mfu,
               matmul_rate=rate, compile_s=compile_s, peak_bytes=mem, grad_norm=gnorm)


def part_e_update(ctx: Ctx):
    _update_part(ctx, "qwen2.5-0.5b", "reference")


def part_e_update_flash(ctx: Ctx):
    _update_part(ctx, "qwen2.5-0.5b", "dense_kernel", run_tiny=False)


def part_e_update_15b(ctx: Ctx):
    _update_part(ctx, "qwen2.5-1.5b", "reference")


# ============================================================== the parts
@dataclasses.dataclass(frozen=True)
class Part:
    id: str
    title: str
    fn: object
    timeout: int            # seconds on the GPU
    cpu_timeout: int        # seconds in --cpu-check
    extra: bool = False     # run only while the budget lasts, after the core parts
    cpu_run: bool = True    # False: --cpu-check reports it SKIP(no GPU) without a process


PARTS = [  # execution order (the table is sorted by id)
    Part("a.native", "kernels vs references, fwd + grad", part_a_native, 90, 120),
    Part("b.bandwidth", "achieved HBM bandwidth", part_b_bandwidth, 90, 90),
    Part("c.sparse", "block-sparse vs dense × density", part_c_sparse, 100, 90),
    Part("d.decode", "decode step vs bandwidth floor", part_d_decode, 110, 90),
    Part("e.update", "update MFU", part_e_update, 120, 120),
    Part("a.tests", "tests/kernels natively", part_a_tests, 120, 90),
    Part("c.prefix", "Prefix Grouper attention", part_c_prefix, 60, 60, extra=True),
    Part("e.update_flash", "update MFU, flash attention", part_e_update_flash, 100, 90,
         extra=True),
    Part("e.update_1.5b", "update MFU, 1.5B", part_e_update_15b, 100, 60, extra=True,
         cpu_run=False),
]
BY_ID = {p.id: p for p in PARTS}


def run_child(args) -> int:
    part = BY_ID[args.child]
    ctx = Ctx(cpu_check=args.cpu_check, deadline=args.deadline, peak_bw=args.peak_bw,
              peak_flops=args.peak_flops, rows_file=args.rows, part=part.id)
    if part.fn is part_a_tests:   # its pytest workers need the GPU memory, not this process
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if not args.cpu_check and jax.default_backend() == "cpu":
        ctx.emit(part.title, "FAIL", note="no GPU visible to JAX (default backend cpu); "
                 "use --cpu-check on a machine without one")
        return 1
    try:
        part.fn(ctx)
    except Exception as e:  # noqa: BLE001 - reported as the part's FAIL row
        traceback.print_exc()
        ctx.emit(f"{part.title} (part)", "FAIL", note=_reason(e))
        return 1
    return 0


# ============================================================== orchestration
def _probe(env, timeout) -> dict:
    code = ("import json, jax; d = jax.devices()[0]; print(json.dumps(dict(platform="
            "jax.default_backend(), kind=d.device_kind, count=jax.device_count(), "
            "jax=jax.__version__, mem=(d.memory_stats() or {}).get('bytes_limit'))))")
    env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"gpu_suite: JAX does not start: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assumed_peaks(kind: str, args) -> str:
    """The peaks the parts judge by, in words (the parts compute them the same way)."""
    from rlx.train.flops import PEAK_BF16

    def lookup(table):
        return next((v for k, v in table.items() if k.lower() in kind.lower()), None)

    bw, fl = args.peak_bw or lookup(PEAK_BW), args.peak_flops or lookup(PEAK_BF16)
    if args.cpu_check:
        return ("peaks assumed for the dry-run figures: H200, HBM 4.80 TB/s, bf16 989 "
                "TFLOP/s")
    return (f"peaks: HBM {bw / 1e12:.2f} TB/s" if bw else "peaks: HBM = measured copy") + \
        (f", bf16 {fl / 1e12:.0f} TFLOP/s" if fl else ", bf16 = measured matmul") + \
        f" ({kind}; --peak-bw / --peak-flops override)"


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_part(part, args, env, budget_end, log) -> tuple[list[dict], dict]:
    limit = part.cpu_timeout if args.cpu_check else part.timeout
    limit = min(limit, budget_end - time.time() - 3)
    rows_file = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False).name
    cmd = [sys.executable, CHILD_SCRIPT, "--child", part.id, "--rows", rows_file,
           "--deadline", str(time.time() + limit)]
    if args.cpu_check:
        cmd.append("--cpu-check")
    for flag, val in (("--peak-bw", args.peak_bw), ("--peak-flops", args.peak_flops)):
        if val:
            cmd += [flag, str(val)]
    log.write(f"\n===== {part.id}: {part.title} (timeout {limit:.0f} s) =====\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, _ = proc.communicate()
    _kill_group(proc)            # anything the part started and left running
    wall = time.time() - t0
    log.write(out or "")
    log.flush()
    rows = []
    with open(rows_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    os.unlink(rows_file)
    tail = [ln for ln in (out or "").splitlines() if ln.strip() and not ln.startswith("ROW ")]
    reason = next((ln.strip() for ln in reversed(tail) if "Error" in ln or "error" in ln),
                  tail[-1].strip() if tail else "")
    if timed_out:
        rows.append(dict(part=part.id, check=f"{part.title} (part)", status="FAIL",
                         value="", target="", met="",
                         note=f"timeout after {limit:.0f} s ({len(rows)} rows before it kept)",
                         data={}))
    elif proc.returncode and not any(r["status"] == "FAIL" for r in rows):
        rows.append(dict(part=part.id, check=f"{part.title} (part)", status="FAIL", value="",
                         target="", met="", note=f"exit {proc.returncode}: {reason[:300]}",
                         data={}))
    info = dict(id=part.id, rc=proc.returncode, wall_s=round(wall, 1), timed_out=timed_out,
                timeout_s=round(limit, 1), tail=tail[-30:])
    return rows, info


def _table(rows) -> list[str]:
    cols = [("part", "part"), ("check", "check"), ("status", "status"),
            ("measured", "value"), ("target", "target"), ("met", "met"), ("note", "note")]
    width = {k: max(len(h), *(len(str(r[k])) for r in rows)) for h, k in cols[:-1]}
    width = {k: min(w, 58) for k, w in width.items()}
    clip = lambda s, w: s if len(s) <= w else s[:w - 1] + "…"  # noqa: E731
    head = "  ".join(f"{h:<{width[k]}}" for h, k in cols[:-1]) + "  note"
    lines = [head, "-" * min(len(head) + 40, 200)]
    for r in rows:
        lines.append("  ".join(f"{clip(str(r[k]), width[k]):<{width[k]}}" for _, k in cols[:-1])
                     + "  " + str(r["note"]))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-check", action="store_true",
                    help="CPU: interpret mode, tiny sizes, CUDA lowering; targets SKIP(no GPU)")
    ap.add_argument("--parts", nargs="+", default=None, help="part ids (default: all)")
    ap.add_argument("--no-extras", action="store_true", help="core parts only")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole suite (default 450 on GPU; 240 in --cpu-check, "
                    "which takes about 60-90 s on an idle 2-core machine)")
    ap.add_argument("--json", default=None, help="JSON path (default: $OUT/gpu_suite.json)")
    ap.add_argument("--peak-bw", type=float, default=None, help="HBM bytes/s to judge by")
    ap.add_argument("--peak-flops", type=float, default=None, help="bf16 FLOP/s to judge by")
    ap.add_argument("--jobs", type=int, default=None,
                    help="parts run at once (default 1 on GPU, where parts time the one "
                    "device; 2 in --cpu-check)")
    ap.add_argument("--list", action="store_true", help="list the parts and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.list:
        for p in PARTS:
            print(f"{p.id:<16} {p.title}{' (extra)' if p.extra else ''}; timeout {p.timeout} s "
                  f"GPU / {p.cpu_timeout} s CPU")
        return 0
    start = time.time()
    budget = args.budget or (240.0 if args.cpu_check else 450.0)
    budget_end = start + budget
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu_check:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                 "rlx-gpu-suite-jax-cache"))
    unknown = [p for p in (args.parts or []) if p not in BY_ID]
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {list(BY_ID)}")
    chosen = [p for p in PARTS if (args.parts is None or p.id in args.parts)
              and not (args.no_extras and p.extra and args.parts is None)]
    out_dir = os.environ.get("OUT")
    json_path = args.json or (os.path.join(out_dir, "gpu_suite.json") if out_dir else None)
    log_path = (os.path.join(out_dir, "gpu_suite.log") if out_dir else
                tempfile.NamedTemporaryFile(prefix="gpu_suite-", suffix=".log",
                                            delete=False).name)
    dev = _probe(env, timeout=120)
    if not args.cpu_check and dev["platform"] == "cpu":
        print("gpu_suite: no GPU visible to JAX (default backend cpu). On a machine without "
              "one run `bash benchmarks/gpu_suite.sh --cpu-check`.", file=sys.stderr)
        return 2
    mode = "cpu-check (interpret mode / lowering, tiny sizes)" if args.cpu_check else "GPU"
    print(f"rlx gpu_suite — {mode} — {dev['kind']} ×{dev['count']} ({dev['platform']}), "
          f"jax {dev['jax']} — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
          f"UTC — budget {budget:.0f} s", flush=True)
    rows, infos, logs = [], [], {}
    lock = threading.Lock()

    def one(part):
        left = budget_end - time.time()
        if args.cpu_check and not part.cpu_run:
            got = [dict(part=part.id, check=part.title, status=NO_GPU, value="", target="",
                        met="", note="GPU only (the code path is e.update's)", data={})]
            info = dict(id=part.id, rc=None, wall_s=0.0, timed_out=False, timeout_s=0, tail=[])
        elif left < (10 if args.cpu_check else 30):
            got = [dict(part=part.id, check=part.title, status="SKIP(budget)", value="",
                        target="", met="", note=f"suite budget of {budget:.0f} s spent",
                        data={})]
            info = dict(id=part.id, rc=None, wall_s=0.0, timed_out=False, timeout_s=0, tail=[])
        else:
            buf = io.StringIO()
            got, info = run_part(part, args, env, budget_end, buf)
            logs[part.id] = buf.getvalue()
        worst = ("FAIL" if any(r["status"] == "FAIL" for r in got) else
                 "OK" if any(r["status"] == "OK" for r in got) else got[0]["status"])
        with lock:
            rows.extend(got)
            infos.append(info)
            print(f"[{part.id}] {worst}: {len(got)} rows in {info['wall_s']:.1f} s", flush=True)

    jobs = args.jobs or (2 if args.cpu_check else 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(one, p) for p in chosen]:
            fut.result()
    with open(log_path, "w") as log:
        for part in chosen:
            log.write(logs.get(part.id, f"\n===== {part.id}: not run =====\n"))
    order = {p.id: i for i, p in enumerate(sorted(PARTS, key=lambda p: p.id))}
    rows.sort(key=lambda r: order.get(r["part"], 99))
    wall = time.time() - start
    counts = {s: sum(r["status"] == s for r in rows) for s in ("OK", "FAIL")}
    skips = sum(r["status"].startswith("SKIP") for r in rows)
    judged = [r for r in rows if r["met"] in ("yes", "NO")]
    met = sum(r["met"] == "yes" for r in judged)
    print()
    print("\n".join(_table(rows)))
    print(f"\n{counts['OK']} OK, {counts['FAIL']} FAIL, {skips} SKIP; targets met {met}/"
          f"{len(judged)}; wall {wall:.0f} s of a {budget:.0f} s budget; "
          f"{_assumed_peaks(dev['kind'], args)}")
    report = dict(suite="rlx benchmarks/gpu_suite", mode="cpu-check" if args.cpu_check else
                  "gpu", device=dev, date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), budget_s=budget, wall_s=round(wall, 1),
                  rows=rows, parts=infos, log=log_path)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"JSON: {json_path}; log: {log_path}")
    else:
        print(f"log: {log_path} (set $OUT or --json for the JSON)")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())

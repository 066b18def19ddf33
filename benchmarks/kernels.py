"""Benchmark of rlx's Pallas kernels against their XLA references (not a test).

    .venv/bin/python benchmarks/kernels.py [--backend auto|tpu|gpu] [--reps N]

For every kernel and shape it prints: kernel time and XLA-reference time, achieved
bytes/s of the kernel as a share of the device's memory bandwidth (the peak you
pass with ``--peak-bw``, default: a large on-device copy measured here), and
memory: ``jax.Device.memory_stats()['peak_bytes_in_use']`` after the call where
the device reports it, XLA's compiled temp-buffer size, and the analytic scratch of
the log-prob kernel (marked "analytic").

Timing: after one compiling call, ``reps`` calls are dispatched back to back and
blocked on once (asynchronous dispatch hides the host's per-call overhead, so short
bandwidth-bound kernels are not timed as Python dispatch); the median of 3 such
rounds, per call.

The measurement functions (``ratio_stats_case``, ``ratio_variance_case``,
``logits_case``, ``hidden_vs_chunked``) return plain dicts; ``benchmarks/gpu_suite.py``
calls them for its bandwidth part. ``hidden_vs_chunked`` compares the two paths the
model itself takes in ``rlx.models.logprobs.logprobs_from_hidden``: the fused Pallas
kernel (``backend="auto"`` on GPU/TPU) and the chunked jnp path (``"reference"``,
what runs on CPU: one [B, C, V] f32 chunk of logits at a time, rematerialised in
the backward).

On CPU no kernel can be compiled: the kernels run in Pallas interpret mode
(the GPU path, ``interpret=True``) on tiny shapes, the times mean nothing and
the script says so. On GPU/TPU it uses the issue's shapes: the ratio statistics
at 32 × 8k and larger, log-prob from logits at vocab 151 936, and log-prob from
hidden states at 32 × 8k tokens × 151 936 vocab (D = 3584) -- run only where
device memory permits; the reference's memory need is always printed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp

from rlx_kernels import logprob_entropy as le
from rlx_kernels import ratio_stats as rs

GiB = 2**30


# ------------------------------------------------------------------ measuring
def time_call(fn, *args, reps: int, rounds: int = 3) -> float:
    """Seconds per call of ``fn(*args)``: one compiling call, then ``rounds`` rounds
    of ``reps`` back-to-back calls blocked on at the end (on the last result: the device
    runs them in order; earlier results are freed as they are replaced, so memory holds
    about two outputs); the median round / reps."""
    jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / reps)
        del out
    return statistics.median(per_call)


def measure_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of a jitted device copy (reads + writes nbytes each)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0 + 0.0)
    return 2 * x.nbytes / time_call(copy, x, reps=reps)


def device_limit():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def peak_in_use():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def temp_bytes(fn, *args):
    """XLA's temp-buffer bytes of the compiled ``fn(*args)`` (None where unreported)."""
    try:
        lowered = fn.lower(*args) if hasattr(fn, "lower") else jax.jit(fn).lower(*args)
        mem = lowered.compile().memory_analysis()
        return getattr(mem, "temp_size_in_bytes", None)
    except Exception:  # memory_analysis is optional per backend
        return None


def fmt_bytes(b):
    if b is None:
        return "n/a"
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b} B"


# --------------------------------------------------------------- the cases
def _ratio_inputs(b, t):
    k = jax.random.split(jax.random.key(0), 3)
    new = jax.random.normal(k[0], (b, t)) * 0.1 - 2
    old = new + jax.random.normal(k[1], (b, t)) * 0.1
    mask = jax.random.bernoulli(k[2], 0.8, (b, t)).astype(jnp.float32)
    gid = jnp.arange(b, dtype=jnp.int32) // 8
    return new, old, mask, gid


def ratio_stats_case(b: int, t: int, backend: str, reps: int, *, with_ref: bool = True) -> dict:
    """One pass over new/old log-probs + mask [B, T] f32, writing the ratio [B, T] f32:
    4·B·T·4 bytes moved (the per-row sums are negligible)."""
    new, old, mask, gid = _ratio_inputs(b, t)

    def run(n, o, m, g, be):
        st = rs.ratio_statistics(n, o, m, g, num_groups=max(b // 8, 1), eps_low=0.2,
                                 eps_high=0.28, backend=be)
        return st.ratio, st.total

    kern = jax.jit(lambda n, o, m, g: run(n, o, m, g, backend))
    args = (new, old, mask, gid)
    out = dict(name="ratio_statistics", shape=[b, t], dtype="float32", bytes=4 * b * t * 4,
               t_kernel=time_call(kern, *args, reps=reps), kernel_temp=temp_bytes(kern, *args))
    if with_ref:
        ref = jax.jit(lambda n, o, m, g: run(n, o, m, g, "reference"))
        out["t_ref"] = time_call(ref, *args, reps=reps)
    out["peak_in_use"] = peak_in_use()
    return out


def ratio_variance_case(b: int, t: int, backend: str, reps: int, *,
                        with_ref: bool = True) -> dict:
    """Value and gradient of R²VPO's ratio variance: forward reads new, old, mask and
    writes the ratio; backward reads new, old, mask, ratio and writes the gradient:
    7·B·T·4 bytes."""
    new, old, mask, _ = _ratio_inputs(b, t)
    vk = jax.jit(jax.value_and_grad(lambda n, o, m: rs.ratio_variance(n, o, m, backend=backend)))
    out = dict(name="ratio_variance fwd+bwd", shape=[b, t], dtype="float32",
               bytes=7 * b * t * 4, t_kernel=time_call(vk, new, old, mask, reps=reps))
    if with_ref:
        vr = jax.jit(jax.value_and_grad(rs.reference_ratio_variance))
        out["t_ref"] = time_call(vr, new, old, mask, reps=reps)
    return out


def logits_case(n: int, v: int, backend: str, reps: int, dtype, *,
                with_ref: bool | None = None) -> dict:
    """log-prob + entropy from logits [N, V]: the forward reads the logits once
    (N·V·itemsize bytes); forward+backward reads them twice and writes the gradient
    (3·N·V·itemsize). The reference runs where its [N, V] f32 temporaries fit."""
    item = jnp.dtype(dtype).itemsize
    k1, k2 = jax.random.split(jax.random.key(1))
    logits = (jax.random.normal(k1, (n, v)) * 2).astype(dtype)
    targets = jax.random.randint(k2, (n,), 0, v)
    limit = device_limit()
    ref_need = 3 * 4 * n * v + n * v * item
    if with_ref is None:
        with_ref = limit is None or ref_need < 0.8 * limit

    def fwd(be):
        return jax.jit(lambda x, t: le.token_logprob_entropy(x, t, backend=be))

    def grad(be):
        return jax.jit(jax.grad(lambda x, t: le.token_logprob_entropy(x, t, backend=be)[0].sum()))

    out = dict(name="token_logprob_entropy", shape=[n, v], dtype=jnp.dtype(dtype).name,
               bytes_fwd=n * v * item, bytes_fwd_bwd=3 * n * v * item,
               t_kernel_fwd=time_call(fwd(backend), logits, targets, reps=reps),
               t_kernel_fwd_bwd=time_call(grad(backend), logits, targets, reps=reps),
               kernel_scratch_analytic=le.scratch_bytes(n, v, itemsize=item)["kernel_fwd"],
               reference_need=ref_need)
    if with_ref:
        out["t_ref_fwd"] = time_call(fwd("reference"), logits, targets, reps=reps)
        out["t_ref_fwd_bwd"] = time_call(grad("reference"), logits, targets, reps=reps)
        out["ref_temp"] = temp_bytes(fwd("reference"), logits, targets)
    out["peak_in_use"] = peak_in_use()
    return out


def hidden_vs_chunked(b: int, s: int, d: int, v: int, reps: int, dtype, *,
                      backend: str = "auto", chunk_size: int = 512) -> dict:
    """``rlx.models.logprobs.logprobs_from_hidden`` on hidden [B, S, D] and an
    unembedding [D, V]: the fused kernel (``backend``) against the chunked jnp path
    the model runs otherwise (``backend="reference"``, ``chunk_size`` tokens per
    chunk); forward and forward+backward (gradients of hidden and unembedding).
    FLOPs: 2·B·S·D·V forward (the logits), 3× that forward+backward; the chunked
    backward recomputes its chunk's logits (4× counted as work done, not needed)."""
    from rlx.models.logprobs import logprobs_from_hidden

    k = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k[0], (b, s, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) * d ** -0.5).astype(dtype)
    t = jax.random.randint(k[2], (b, s), 0, v)

    def fns(be):
        def f(h, w):
            return logprobs_from_hidden(h, w, t, chunk_size=chunk_size, backend=be)

        def loss(h, w):
            lp, ent = f(h, w)
            return lp.sum() + 1e-3 * ent.sum()

        return jax.jit(f), jax.jit(jax.grad(loss, argnums=(0, 1)))

    fk, gk = fns(backend)
    fr, gr = fns("reference")
    out = dict(name="logprobs_from_hidden", shape=[b, s, d, v], dtype=jnp.dtype(dtype).name,
               flops_fwd=2.0 * b * s * d * v, chunk_size=chunk_size,
               t_fused_fwd=time_call(fk, h, w, reps=reps),
               t_fused_fwd_bwd=time_call(gk, h, w, reps=reps),
               t_chunked_fwd=time_call(fr, h, w, reps=reps),
               t_chunked_fwd_bwd=time_call(gr, h, w, reps=reps),
               temp_fused_fwd_bwd=temp_bytes(gk, h, w),
               temp_chunked_fwd_bwd=temp_bytes(gr, h, w))
    out["flops_fwd_bwd"] = 3 * out["flops_fwd"]
    return out


# ------------------------------------------------------------------ printing
def _row(name, shape, t_kernel, t_ref, nbytes, bw, mem):
    ref = f"{t_ref * 1e3:9.3f} ms" if t_ref is not None else "  skipped  "
    speed = f"{t_ref / t_kernel:5.2f}x" if t_ref is not None else "   - "
    achieved = nbytes / t_kernel
    print(f"{name:<26} {shape:<24} {t_kernel * 1e3:9.3f} ms {ref} {speed} "
          f"{achieved / 1e9:8.1f} GB/s {100 * achieved / bw:5.1f}%  {mem}")


def _header(what, note):
    print(f"{'kernel':<26} {what:<24} {'kernel':>12} {'XLA ref':>12} {'speed':>6} "
          f"{'achieved':>13} {'%BW':>6}  memory{note}")


def bench_ratio_stats(shapes, backend, bw, reps, note):
    print("\n== ratio_statistics (one pass over new/old log-probs + mask; writes ratio) ==")
    _header("[B, T]", note)
    for b, t in shapes:
        r = ratio_stats_case(b, t, backend, reps)
        _row(r["name"], f"[{b}, {t}]", r["t_kernel"], r["t_ref"], r["bytes"], bw,
             f"peak {fmt_bytes(r['peak_in_use'])}, kernel temp {fmt_bytes(r['kernel_temp'])}")
        r = ratio_variance_case(b, t, backend, reps)
        _row(r["name"], f"[{b}, {t}]", r["t_kernel"], r["t_ref"], r["bytes"], bw, "")


def bench_logprob(shapes, backend, bw, reps, note, dtype):
    print("\n== token_logprob_entropy from logits [N, V] (streams over V) ==")
    _header("[N, V]", note)
    for n, v in shapes:
        r = logits_case(n, v, backend, reps, dtype)
        label = f"[{n}, {v}] {r['dtype']}"
        _row("logprob+entropy fwd", label, r["t_kernel_fwd"], r.get("t_ref_fwd"),
             r["bytes_fwd"], bw,
             f"peak {fmt_bytes(r['peak_in_use'])}, kernel scratch "
             f"{fmt_bytes(r['kernel_scratch_analytic'])} (analytic) vs ref temp "
             f"{fmt_bytes(r.get('ref_temp'))}")
        _row("logprob fwd+bwd", label, r["t_kernel_fwd_bwd"], r.get("t_ref_fwd_bwd"),
             r["bytes_fwd_bwd"], bw, "")


def bench_hidden(n, d, v, backend, reps, dtype, note):
    print("\n== token_logprob_entropy_from_hidden: logits computed chunk by chunk ==")
    item = jnp.dtype(dtype).itemsize
    an = le.scratch_bytes(n, v, d, itemsize=item, block_n=256, block_v=512)
    inputs = (n * d + d * v) * item
    print(f"shape N={n} D={d} V={v} {jnp.dtype(dtype).name}: inputs {fmt_bytes(inputs)}; "
          f"kernel fwd scratch {fmt_bytes(an['kernel_fwd'])} + residuals "
          f"{fmt_bytes(an['kernel_residuals'])}; backward chunk scratch "
          f"{fmt_bytes(an['kernel_bwd_hidden'])} (analytic); reference needs "
          f"{fmt_bytes(an['reference'])} ([N, V] f32 x3; >= {fmt_bytes(an['reference_fwd_min'])}"
          f" for the forward alone){note}")
    limit = device_limit()
    need = inputs * 3 + an["kernel_bwd_hidden"] + (n * d + d * v) * 4
    if limit is not None and need > 0.9 * limit:
        print(f"  skipped: kernel needs ~{fmt_bytes(need)} > device limit {fmt_bytes(limit)}")
        return
    k = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) * d ** -0.5).astype(dtype)
    t = jax.random.randint(k[2], (n,), 0, v)
    fwd = jax.jit(lambda h, w: le.token_logprob_entropy_from_hidden(h, w, t, backend=backend))
    tf = time_call(fwd, h, w, reps=reps)
    grad = jax.jit(jax.grad(lambda h, w: le.token_logprob_entropy_from_hidden(
        h, w, t, backend=backend)[0].sum(), argnums=(0, 1)))
    tb = time_call(grad, h, w, reps=reps)
    flops = 2 * n * d * v
    tr = None
    if limit is None or an["reference"] < 0.8 * limit:
        ref = jax.jit(lambda h, w: le.reference_from_hidden(h, w, t))
        tr = time_call(ref, h, w, reps=reps)
    print(f"  fwd {tf * 1e3:.3f} ms ({flops / tf / 1e12:.2f} TFLOP/s); fwd+bwd {tb * 1e3:.3f} ms;"
          f" reference fwd {'skipped (does not fit)' if tr is None else f'{tr * 1e3:.3f} ms'};"
          f" peak {fmt_bytes(peak_in_use())}")


def bench_model_path(b, s, d, v, backend, reps, dtype, note):
    print("\n== rlx.models.logprobs.logprobs_from_hidden: fused kernel vs chunked jnp path ==")
    r = hidden_vs_chunked(b, s, d, v, reps, dtype, backend=backend)
    print(f"[B={b}, S={s}, D={d}] x V={v} {r['dtype']}{note}")
    for what in ("fwd", "fwd_bwd"):
        tf, tc = r[f"t_fused_{what}"], r[f"t_chunked_{what}"]
        print(f"  {what:<8} fused {tf * 1e3:9.3f} ms ({r[f'flops_{what}'] / tf / 1e12:6.1f} "
              f"TFLOP/s)  chunked {tc * 1e3:9.3f} ms  speed-up {tc / tf:5.2f}x")
    print(f"  temp (fwd+bwd): fused {fmt_bytes(r['temp_fused_fwd_bwd'])}, chunked "
          f"{fmt_bytes(r['temp_chunked_fwd_bwd'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "tpu", "gpu"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--peak-bw", type=float, default=None,
                        help="bytes/s the %%BW column divides by (default: measured copy)")
    args = parser.parse_args()
    platform = jax.default_backend()
    dev = jax.devices()[0]
    on_accel = platform in ("gpu", "tpu")
    backend = args.backend if args.backend != "auto" else (platform if on_accel else "gpu")
    reps = args.reps or (20 if on_accel else 2)
    print(f"rlx kernel benchmark — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
          f" UTC — device: {dev.device_kind} ({platform}), jax {jax.__version__}")
    note = ""
    if not on_accel or backend != platform:
        note = " [INTERPRET MODE: correctness only, times are meaningless]"
        print(f"No {backend.upper()} here: the {backend} kernels run in Pallas interpret mode on "
              "tiny shapes; the XLA reference is timed natively.")
    measured = measure_bandwidth((2 * GiB) if on_accel else 64 * 2**20, reps)
    bw = args.peak_bw or measured
    print(f"measured memory bandwidth (jitted copy): {measured / 1e9:.1f} GB/s; %BW of "
          f"{bw / 1e9:.1f} GB/s")
    if on_accel and not note:
        bench_ratio_stats([(32, 8192), (256, 32768), (1024, 32768)], backend, bw, reps, note)
        bench_logprob([(4096, 151_936), (16_384, 151_936)], backend, bw, reps, note,
                      jnp.bfloat16)
        bench_model_path(16, 2048, 896, 151_936, backend, max(reps // 4, 2), jnp.bfloat16, note)
        bench_hidden(4096, 3584, 151_936, backend, reps, jnp.bfloat16, note)
        bench_hidden(32 * 8192, 3584, 151_936, backend, max(reps // 10, 2), jnp.bfloat16, note)
    else:
        bench_ratio_stats([(8, 256)], backend, bw, reps, note)
        bench_logprob([(16, 512)], backend, bw, reps, note, jnp.float32)
        bench_model_path(2, 16, 32, 256, backend, reps, jnp.float32, note)
        bench_hidden(16, 32, 256, backend, reps, jnp.float32, note)
        an = le.scratch_bytes(32 * 8192, 151_936, 3584, itemsize=2, block_n=256, block_v=512)
        print("\nAnalytic memory at the issue's scale (32 x 8192 tokens, V=151936, D=3584, "
              "bf16): " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in an.items()))


if __name__ == "__main__":
    main()

"""Benchmark of rlx's Pallas kernels against their XLA references (not a test).

    .venv/bin/python benchmarks/kernels.py [--backend auto|tpu|gpu] [--reps N]

For every kernel and shape it prints: kernel time and XLA-reference time
(median of ``--reps`` jitted calls), achieved bytes/s of the kernel against the
device's memory bandwidth measured with a large on-device copy, and memory:
``jax.Device.memory_stats()['peak_bytes_in_use']`` after the call where the
device reports it, XLA's compiled temp-buffer size, and the analytic scratch
of the log-prob kernel (marked "analytic").

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


def _time(fn, *args, reps):
    out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of a jitted device copy (reads + writes nbytes each)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0 + 0.0)
    return 2 * x.nbytes / _time(copy, x, reps=reps)


def _device_limit():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _peak():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _temp_bytes(fn, *args):
    try:
        mem = jax.jit(fn).lower(*args).compile().memory_analysis()
        return getattr(mem, "temp_size_in_bytes", None)
    except Exception:  # memory_analysis is optional per backend
        return None


def _fmt_bytes(b):
    if b is None:
        return "n/a"
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b} B"


def _row(name, shape, t_kernel, t_ref, nbytes, bw, mem):
    ref = f"{t_ref * 1e3:9.3f} ms" if t_ref is not None else "  skipped  "
    speed = f"{t_ref / t_kernel:5.2f}x" if t_ref is not None else "   - "
    achieved = nbytes / t_kernel
    print(f"{name:<26} {shape:<24} {t_kernel * 1e3:9.3f} ms {ref} {speed} "
          f"{achieved / 1e9:8.1f} GB/s {100 * achieved / bw:5.1f}%  {mem}")


def bench_ratio_stats(shapes, backend, bw, reps, interpret_note):
    print("\n== ratio_statistics (one pass over new/old log-probs + mask; writes ratio) ==")
    print(f"{'kernel':<26} {'[B, T]':<24} {'kernel':>12} {'XLA ref':>12} {'speed':>6} "
          f"{'achieved':>13} {'%BW':>6}  memory{interpret_note}")
    for b, t in shapes:
        k = jax.random.split(jax.random.key(0), 3)
        new = jax.random.normal(k[0], (b, t)) * 0.1 - 2
        old = new + jax.random.normal(k[1], (b, t)) * 0.1
        mask = jax.random.bernoulli(k[2], 0.8, (b, t)).astype(jnp.float32)
        gid = jnp.arange(b, dtype=jnp.int32) // 8

        def run(n, o, m, g, be):
            return rs.ratio_statistics(n, o, m, g, num_groups=max(b // 8, 1), eps_low=0.2,
                                       eps_high=0.28, backend=be)

        kern = jax.jit(lambda n, o, m, g: run(n, o, m, g, backend))
        ref = jax.jit(lambda n, o, m, g: run(n, o, m, g, "reference"))
        args = (new, old, mask, gid)
        tk = _time(kern, *args, reps=reps)
        tr = _time(ref, *args, reps=reps)
        nbytes = 4 * b * t * 4  # read new, old, mask; write ratio (f32)
        mem = f"peak {_fmt_bytes(_peak())}, kernel temp {_fmt_bytes(_temp_bytes(kern, *args))}"
        _row("ratio_stats", f"[{b}, {t}]", tk, tr, nbytes, bw, mem)
        vk = jax.jit(jax.value_and_grad(lambda n: rs.ratio_variance(n, old, mask,
                                                                    backend=backend)))
        vr = jax.jit(jax.value_and_grad(lambda n: rs.reference_ratio_variance(n, old, mask)))
        _row("ratio_variance fwd+bwd", f"[{b}, {t}]", _time(vk, new, reps=reps),
             _time(vr, new, reps=reps), 7 * b * t * 4, bw, "")


def bench_logprob(shapes, backend, bw, reps, interpret_note, dtype):
    print("\n== token_logprob_entropy from logits [N, V] (streams over V) ==")
    print(f"{'kernel':<26} {'[N, V]':<24} {'kernel':>12} {'XLA ref':>12} {'speed':>6} "
          f"{'achieved':>13} {'%BW':>6}  memory{interpret_note}")
    limit = _device_limit()
    item = jnp.dtype(dtype).itemsize
    for n, v in shapes:
        k1, k2 = jax.random.split(jax.random.key(1))
        logits = (jax.random.normal(k1, (n, v)) * 2).astype(dtype)
        targets = jax.random.randint(k2, (n,), 0, v)
        ref_need = 3 * 4 * n * v + n * v * item
        kern = jax.jit(lambda x, t: le.token_logprob_entropy(x, t, backend=backend))
        ref = jax.jit(lambda x, t: le.token_logprob_entropy(x, t, backend="reference"))
        tk = _time(kern, logits, targets, reps=reps)
        run_ref = limit is None or ref_need < 0.8 * limit
        tr = _time(ref, logits, targets, reps=reps) if run_ref else None
        an = le.scratch_bytes(n, v, itemsize=item)
        mem = (f"peak {_fmt_bytes(_peak())}, kernel scratch {_fmt_bytes(an['kernel_fwd'])} "
               f"(analytic) vs ref temp {_fmt_bytes(_temp_bytes(ref, logits, targets))}")
        _row("logprob+entropy fwd", f"[{n}, {v}] {jnp.dtype(dtype).name}", tk, tr,
             n * v * item, bw, mem)
        gk = jax.jit(jax.grad(lambda x, t: le.token_logprob_entropy(x, t, backend=backend)[0]
                              .sum()))
        gr = jax.jit(jax.grad(lambda x, t: le.token_logprob_entropy(
            x, t, backend="reference")[0].sum()))
        tgk = _time(gk, logits, targets, reps=reps)
        tgr = _time(gr, logits, targets, reps=reps) if run_ref else None
        _row("logprob fwd+bwd", f"[{n}, {v}] {jnp.dtype(dtype).name}", tgk, tgr,
             3 * n * v * item, bw, "")


def bench_hidden(n, d, v, backend, reps, dtype, interpret_note):
    print("\n== token_logprob_entropy_from_hidden: logits computed chunk by chunk ==")
    item = jnp.dtype(dtype).itemsize
    an = le.scratch_bytes(n, v, d, itemsize=item, block_n=256, block_v=512)
    inputs = (n * d + d * v) * item
    print(f"shape N={n} D={d} V={v} {jnp.dtype(dtype).name}: inputs {_fmt_bytes(inputs)}; "
          f"kernel fwd scratch {_fmt_bytes(an['kernel_fwd'])} + residuals "
          f"{_fmt_bytes(an['kernel_residuals'])}; backward chunk scratch "
          f"{_fmt_bytes(an['kernel_bwd_hidden'])} (analytic); reference needs "
          f"{_fmt_bytes(an['reference'])} ([N, V] f32 x3; >= {_fmt_bytes(an['reference_fwd_min'])}"
          f" for the forward alone){interpret_note}")
    limit = _device_limit()
    need = inputs * 3 + an["kernel_bwd_hidden"] + (n * d + d * v) * 4
    if limit is not None and need > 0.9 * limit:
        print(f"  skipped: kernel needs ~{_fmt_bytes(need)} > device limit {_fmt_bytes(limit)}")
        return
    k = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) * d ** -0.5).astype(dtype)
    t = jax.random.randint(k[2], (n,), 0, v)
    fwd = jax.jit(lambda h, w: le.token_logprob_entropy_from_hidden(h, w, t, backend=backend))
    tf = _time(fwd, h, w, reps=reps)
    grad = jax.jit(jax.grad(lambda h, w: le.token_logprob_entropy_from_hidden(
        h, w, t, backend=backend)[0].sum(), argnums=(0, 1)))
    tb = _time(grad, h, w, reps=reps)
    flops = 2 * n * d * v
    ref_fits = limit is None or an["reference"] < 0.8 * limit
    tr = None
    if ref_fits:
        ref = jax.jit(lambda h, w: le.reference_from_hidden(h, w, t))
        tr = _time(ref, h, w, reps=reps)
    print(f"  fwd {tf * 1e3:.3f} ms ({flops / tf / 1e12:.2f} TFLOP/s); fwd+bwd {tb * 1e3:.3f} ms;"
          f" reference fwd {'skipped (does not fit)' if tr is None else f'{tr * 1e3:.3f} ms'};"
          f" peak {_fmt_bytes(_peak())}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "tpu", "gpu"])
    parser.add_argument("--reps", type=int, default=None)
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
    bw = measure_bandwidth((2 * GiB) if on_accel else 64 * 2**20, reps)
    print(f"measured memory bandwidth (jitted copy): {bw / 1e9:.1f} GB/s")
    if on_accel and not note:
        bench_ratio_stats([(32, 8192), (256, 32768), (1024, 32768)], backend, bw, reps, note)
        bench_logprob([(4096, 151_936), (16_384, 151_936)], backend, bw, reps, note,
                      jnp.bfloat16)
        bench_hidden(4096, 3584, 151_936, backend, reps, jnp.bfloat16, note)
        bench_hidden(32 * 8192, 3584, 151_936, backend, max(reps // 10, 2), jnp.bfloat16, note)
    else:
        bench_ratio_stats([(8, 256)], backend, bw, reps, note)
        bench_logprob([(16, 512)], backend, bw, reps, note, jnp.float32)
        bench_hidden(16, 32, 256, backend, reps, jnp.float32, note)
        an = le.scratch_bytes(32 * 8192, 151_936, 3584, itemsize=2, block_n=256, block_v=512)
        print("\nAnalytic memory at the issue's scale (32 x 8192 tokens, V=151936, D=3584, "
              "bf16): " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in an.items()))


if __name__ == "__main__":
    main()

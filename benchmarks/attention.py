"""Benchmark: dense vs block-sparse attention, and shared-prefix vs naive group layout.

Not a test. ``python benchmarks/attention.py [--backend auto|tpu|gpu|reference]``
``[--lengths S ...] [--densities d ...] [--prompts P ...] [--no-fwd]``.

1. Dense causal vs block-sparse (streaming Λ schedules: sink block + local
   window sized to hit a target density of the causal block pairs) at several
   sequence lengths: forward and forward+backward time, achieved FLOP/s
   (FLOPs counted on the visited block pairs: 4·bq·bk·Dh per pair and head
   forward, 2.5× that for backward) and the goal ratio
   time_sparse / (time_dense · density) of forward+backward (issue 6 goal: ≤ 1.5
   at 16k–32k), density = visited block pairs / causal block pairs.
2. Prefix Grouper: a G = 8 group with prompt lengths 512…8k and completion
   length T, naive batch of G rows ``[prompt | ci]`` vs one packed row
   ``[prompt | c1 … cG]``: attention forward+backward time, and the ideal
   speedup (P+T)·G / (P + G·T) of the attention FLOPs.

``sparse_vs_dense`` and ``prefix_vs_naive`` return one dict per measured row;
``benchmarks/gpu_suite.py`` calls them. Timing: one compiling call, then the
median of 3 rounds of ``reps`` back-to-back calls (blocked on once per round).

On CPU (no accelerator) it runs tiny shapes through the pure-jnp reference,
which computes the dense masked attention whatever the schedule: the numbers
only show that the script runs, not kernel speed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlx_kernels import attention_schedules as sl
from rlx_kernels import block_sparse_attention as bsa
from rlx_kernels import dispatch


def _time(fn, *args, reps: int, rounds: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):     # in order on the device: blocking on the last is enough
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / reps)
        del out
    return statistics.median(per_call)


def _inputs(b, s, h, kh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, s, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, kh, d), dtype)
    v = jax.random.normal(ks[2], (b, s, kh, d), dtype)
    return q, k, v


def _fns(schedule, seg, backend):
    def fwd(q, k, v):
        return bsa.block_sparse_attention(q, k, v, schedule, segment_ids=seg, backend=backend)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def streaming_for_density(s, bq, bk, density):
    """All heads streaming with sink 1 and the local window (in key blocks) whose
    density of the causal block pairs is closest to ``density`` (bisection: the
    density grows with the window). Returns (schedule, density)."""
    causal = sl.causal_block_mask(s, block_q=bq, block_k=bk).sum()

    def build(local):
        m = sl.streaming_block_mask(s, streaming_heads=[True], sink_blocks=1, local_blocks=local,
                                    block_q=bq, block_k=bk)
        return m, float(m[0, 0].sum() / causal)

    lo, hi = 1, -(-s // bk)
    while lo < hi:                       # smallest window reaching the target
        mid = (lo + hi) // 2
        if build(mid)[1] >= density:
            hi = mid
        else:
            lo = mid + 1
    candidates = [build(x) for x in {max(lo - 1, 1), lo}]
    mask, dens = min(candidates, key=lambda c: abs(c[1] - density))
    return sl.make_schedule(mask, seq_len=s, block_q=bq, block_k=bk), dens


def sparse_vs_dense(cfg, backend, reps, *, fwd=True) -> list[dict]:
    """One dict per (S, density): times (s), visited block pairs, FLOPs, goal ratio."""
    b, h, kh, d, bq, bk, dtype = (cfg[n] for n in ("b", "h", "kh", "d", "bq", "bk", "dtype"))
    rows = []
    for s in cfg["lengths"]:
        q, k, v = _inputs(b, s, h, kh, d, dtype)
        dense_sched = sl.dense_causal_schedule(s, block_q=bq, block_k=bk)
        dense_pairs = int(np.asarray(dense_sched.block_mask).sum())
        t_dense = None
        for target in cfg["densities"]:
            if target >= 1.0:
                sched, dens = dense_sched, 1.0
            else:
                sched, dens = streaming_for_density(s, bq, bk, target)
            pairs = int(np.asarray(sched.block_mask).sum())
            flops = 4.0 * bq * bk * d * h * b * pairs
            f, fb = _fns(sched, None, backend)
            row = dict(seq_len=s, target_density=target, density=pairs / dense_pairs,
                       pairs=pairs, flops_fwd=flops, flops_fwd_bwd=3.5 * flops,
                       shape=dict(b=b, h=h, kh=kh, d=d, bq=bq, bk=bk,
                                  dtype=jnp.dtype(dtype).name))
            if fwd:
                row["t_fwd"] = _time(f, q, k, v, reps=reps)
            row["t_fwd_bwd"] = _time(fb, q, k, v, reps=reps)
            if target >= 1.0:
                t_dense = row["t_fwd_bwd"]
            if t_dense is not None and target < 1.0:
                row["goal_ratio"] = row["t_fwd_bwd"] / (t_dense * row["density"])
            rows.append(row)
    return rows


def bench_sparse(cfg, backend, reps):
    b, h, kh, d, bq, bk, dtype = (cfg[n] for n in ("b", "h", "kh", "d", "bq", "bk", "dtype"))
    print(f"\n== dense vs block-sparse  B={b} H={h} K={kh} Dh={d} blocks={bq}x{bk} {jnp.dtype(dtype).name}")
    print(f"{'S':>7} {'density':>8} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} {'f+b TF/s':>9} {'goal ratio':>10}")
    for r in sparse_vs_dense(cfg, backend, reps):
        ratio = f"{r['goal_ratio']:10.2f}" if "goal_ratio" in r else ""
        print(f"{r['seq_len']:>7} {r['density']:>8.3f} {r['t_fwd'] * 1e3:>9.2f} "
              f"{r['flops_fwd'] / r['t_fwd'] / 1e12:>9.2f} {r['t_fwd_bwd'] * 1e3:>9.2f} "
              f"{r['flops_fwd_bwd'] / r['t_fwd_bwd'] / 1e12:>9.2f} {ratio:>10}", flush=True)


def prefix_vs_naive(cfg, backend, reps) -> list[dict]:
    """One dict per prompt length: naive and packed attention fwd+bwd times (s)."""
    g, t, h, kh, d, bq, bk, dtype = (cfg[n] for n in ("g", "t", "h", "kh", "d", "bq", "bk", "dtype"))
    rows = []
    for p in cfg["prompts"]:
        lens = np.full(g, t)
        packed = sl.prefix_grouper_pack(np.zeros(p, np.int32), p, np.zeros((g, t), np.int32), lens)
        seg_p = np.asarray(packed.segment_ids)[None]
        sched_p = sl.prefix_grouper_schedule(seg_p, block_q=bq, block_k=bk)
        sched_n = sl.dense_causal_schedule(p + t, block_q=bq, block_k=bk)
        _, fb_p = _fns(sched_p, seg_p, backend)
        _, fb_n = _fns(sched_n, None, backend)
        t_p = _time(fb_p, *_inputs(1, p + g * t, h, kh, d, dtype), reps=reps)
        t_n = _time(fb_n, *_inputs(g, p + t, h, kh, d, dtype), reps=reps)
        rows.append(dict(prompt=p, completion=t, group=g, t_naive=t_n, t_packed=t_p,
                         speedup=t_n / t_p, ideal=(p + t) * g / (p + g * t)))
    return rows


def bench_prefix(cfg, backend, reps):
    g, t, h, kh, d, dtype = (cfg[n] for n in ("g", "t", "h", "kh", "d", "dtype"))
    print(f"\n== shared prefix (Prefix Grouper) vs naive  G={g} T={t} H={h} K={kh} Dh={d} "
          f"{jnp.dtype(dtype).name}, attention forward+backward")
    print(f"{'prompt':>7} {'naive ms':>9} {'packed ms':>10} {'speedup':>8} {'ideal':>6}")
    for r in prefix_vs_naive(cfg, backend, reps):
        print(f"{r['prompt']:>7} {r['t_naive'] * 1e3:>9.2f} {r['t_packed'] * 1e3:>10.2f} "
              f"{r['speedup']:>8.2f} {r['ideal']:>6.2f}", flush=True)


def configs(on_accel: bool, kind: str):
    """(sparse, prefix) benchmark configurations for an accelerator or for CPU."""
    if on_accel:
        sparse = dict(b=1, h=16, kh=8, d=128, bq=128, bk=128, dtype=jnp.bfloat16,
                      lengths=[4096, 8192, 16384, 32768], densities=[1.0, 0.5, 0.25, 0.1])
        prefix = dict(g=8, t=512, h=16, kh=8, d=128, bq=128, bk=128, dtype=jnp.bfloat16,
                      prompts=[512, 1024, 2048, 4096, 8192])
        if kind == "gpu":
            for c in (sparse, prefix):
                c.update(bq=64, bk=64)
    else:
        sparse = dict(b=1, h=2, kh=1, d=32, bq=32, bk=32, dtype=jnp.float32, lengths=[256, 512],
                      densities=[1.0, 0.5, 0.25])
        prefix = dict(g=8, t=32, h=2, kh=1, d=32, bq=32, bk=32, dtype=jnp.float32, prompts=[64, 128, 256])
    return sparse, prefix


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", choices=dispatch.BACKENDS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths S")
    ap.add_argument("--densities", type=float, nargs="+", default=None,
                    help="target densities (1.0 = the dense kernel, needed for the goal ratio)")
    ap.add_argument("--prompts", type=int, nargs="+", default=None,
                    help="Prefix Grouper prompt lengths (none: skip part 2)")
    args = ap.parse_args()
    res = dispatch.resolve_backend(args.backend)
    platform = jax.default_backend()
    on_accel = res.is_kernel and not res.interpret
    print(f"device: {jax.devices()[0].device_kind} ({platform}); backend: {res.kind}"
          f"{' (interpret mode)' if res.interpret else ''}; date: {datetime.date.today()}")
    sparse, prefix = configs(on_accel, res.kind)
    if not on_accel:
        print("NOTE: no accelerator path: tiny shapes"
              + (" through the jnp reference (dense masked attention whatever the schedule);"
                 if not res.is_kernel else " in Pallas interpret mode;")
              + " these figures do not measure kernel speed.")
    for key, value in (("lengths", args.lengths), ("densities", args.densities)):
        if value:
            sparse[key] = value
    if args.prompts:
        prefix["prompts"] = args.prompts
    reps = args.reps if on_accel else 2
    bench_sparse(sparse, args.backend, reps)
    bench_prefix(prefix, args.backend, reps)


if __name__ == "__main__":
    main()

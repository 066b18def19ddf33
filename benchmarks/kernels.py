"""Benchmark of rlx's Pallas kernels against their XLA references (not a test).

    .venv/bin/python benchmarks/kernels.py [--backend auto|tpu|gpu] [--reps N] [--peak-bw B/s]
    .venv/bin/python benchmarks/kernels.py --check   # GPU kernels vs references, fwd + grad

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
calls them for its bandwidth part, and ``check_cases`` / ``compare`` (kernel against
reference, forward and gradients, at model shapes on a GPU) for its kernel part. ``hidden_vs_chunked`` compares the two paths the
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
import numpy as np

from rlx_kernels import attention_schedules as sl
from rlx_kernels import block_sparse_attention as bsa
from rlx_kernels import logprob_entropy as le
from rlx_kernels import paged_decode as pd
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


# ------------------------------------------------- correctness at model shapes
def check_cases(dt):
    """Every kernel's GPU path against its pure-jnp reference, as cases
    ``(key, name(size), build(size, make), gpu_size, cpu_size)``.

    ``build(size, make)`` returns ``(kernel, reference, args, cot, bf16_out)``: two
    functions of ``args``, the cotangent of their outputs for the gradient check (None:
    forward only; "variance": the gradient of the last, scalar output w.r.t. the first
    argument) and whether the kernel's floating output is in the input dtype ``dt``.
    ``make(shape, dtype, kind)`` gives the arrays (``random_maker``) or, for lowering
    only, ShapeDtypeStructs (``abstract_maker``). Sizes: model-sized on the GPU
    (vocabulary 151 936, D = 896, 4k-token attention, 4k-slot decode cache), tiny for
    Pallas interpret mode on CPU. Cases: log-prob/entropy from logits and from hidden
    states, ratio statistics with the ratio-variance gradient, block-sparse attention
    on a streaming-head schedule and on a Prefix Grouper packed row
    (attention_schedules), LServe paged decode.
    """
    name_dt = jnp.dtype(dt).name

    def logits(z, make):
        n, v = z
        tgt = make((n,), jnp.int32, f"int:{v}")
        return (lambda x, t: le.token_logprob_entropy(x, t, temperature=0.9, backend="gpu"),
                lambda x, t: le.reference(x, t, temperature=0.9),
                (make((n, v), dt, "normal3"), tgt),
                (make((n,), jnp.float32, "normal"), make((n,), jnp.float32, "normal")), False)

    def hidden(z, make):
        n, d, v = z
        return (lambda h, w, t: le.token_logprob_entropy_from_hidden(h, w, t, backend="gpu"),
                le.reference_from_hidden,
                (make((n, d), dt, "normal"), make((d, v), dt, f"scaled:{3 * d ** -0.5}"),
                 make((n,), jnp.int32, f"int:{v}")),
                (make((n,), jnp.float32, "normal"), make((n,), jnp.float32, "normal")), False)

    def ratio(z, make):
        b, t = z

        def kernel(new, old, mask, gid):
            st = rs.ratio_statistics(new, old, mask, gid, num_groups=b // 4, eps_low=0.2,
                                     eps_high=0.28, backend="gpu")
            var = rs.ratio_variance(new, old, mask, backend="gpu")
            return st.ratio, st.total, st.group, var

        def reference(new, old, mask, gid):
            st = rs.reference(new, old, mask, gid, num_groups=b // 4, eps_low=0.2,
                              eps_high=0.28)
            return st.ratio, st.total, st.group, rs.reference_ratio_variance(new, old, mask)

        new = make((b, t), jnp.float32, "logp")
        return (kernel, reference,
                (new, make((b, t), jnp.float32, "logp"), make((b, t), bool, "mask"),
                 make((b,), jnp.int32, "groups:4")), "variance", False)

    def attention(schedule, seg, shape):
        s, h, kh, dh = shape
        seg = None if seg is None else jnp.asarray(seg)
        return (lambda q, k, v: bsa.block_sparse_attention(q, k, v, schedule, segment_ids=seg,
                                                           backend="gpu"),
                lambda q, k, v: bsa.reference_block_sparse_attention(q, k, v, schedule,
                                                                     segment_ids=seg))

    def streaming(z, make):
        s, h, kh, dh, blk = z
        sched = sl.streaming_schedule(s, streaming_heads=[i % 2 == 0 for i in range(h)],
                                      sink_blocks=1, local_blocks=4, block_q=blk, block_k=blk)
        kern, ref = attention(sched, None, (s, h, kh, dh))
        return (kern, ref, (make((1, s, h, dh), dt, "normal"), make((1, s, kh, dh), dt, "normal"),
                            make((1, s, kh, dh), dt, "normal")),
                make((1, s, h, dh), dt, "normal"), True)

    def grouper(z, make):
        plen, g, t, h, kh, dh, blk = z
        lens = np.array([t - (i % 3) * (t // 4) for i in range(g)])   # ragged completions
        packed = sl.prefix_grouper_pack(np.zeros(plen, np.int32), plen,
                                        np.zeros((g, t), np.int32), lens)
        seg = np.asarray(packed.segment_ids)[None]
        sched = sl.prefix_grouper_schedule(seg, block_q=blk, block_k=blk)
        s = plen + g * t
        kern, ref = attention(sched, seg, (s, h, kh, dh))
        return (kern, ref, (make((1, s, h, dh), dt, "normal"), make((1, s, kh, dh), dt, "normal"),
                            make((1, s, kh, dh), dt, "normal")),
                make((1, s, h, dh), dt, "normal"), True)

    def decode(z, make):
        b, c, kh, h, dh, ps, budget = z

        def kernel(q, kc, vc, mask):
            summ = pd.page_summary(kc, mask, page_size=ps)
            out, sel = pd.sparse_decode(q, kc, vc, mask, summ, budget=budget, backend="gpu")
            return out, sel.index, sel.valid

        def reference(q, kc, vc, mask):
            """Dense f32 attention over the pages the kernel path selects (selected from
            the inputs in their own dtype: the upcast is exact, so cast back)."""
            qd, kd = q.astype(dt), kc.astype(dt)
            summ = pd.page_summary(kd, mask, page_size=ps)
            sel = pd.select_pages(pd.page_scores(qd, summ), summ, budget=budget)
            tmask = pd.selected_token_mask(sel, mask, page_size=ps)
            return pd.reference_decode_attention(q, kc, vc, tmask), sel.index, sel.valid

        return (kernel, reference,
                (make((b, h, dh), dt, "normal"), make((b, c, kh, dh), dt, "normal"),
                 make((b, c, kh, dh), dt, "normal"), make((b, c), bool, "fill")), None, True)

    gpu_z = dict(logits=(4096, 32768), hidden=(2048, 896, 151_936), ratio=(256, 4096),
                 streaming=(4096, 8, 2, 128, 64), grouper=(1024, 8, 384, 8, 2, 128, 64),
                 decode=(32, 4096, 2, 16, 128, 64, 16))
    cpu_z = dict(logits=(32, 2048), hidden=(24, 32, 512), ratio=(8, 1024),
                 streaming=(128, 2, 1, 16, 16), grouper=(32, 4, 16, 2, 1, 16, 16),
                 decode=(2, 256, 1, 2, 16, 16, 4))
    names = dict(
        logits=lambda z: f"logprob_entropy logits [{z[0]}, {z[1]}] {name_dt}",
        hidden=lambda z: f"logprob_entropy hidden [{z[0]}, {z[1]}]×[{z[1]}, {z[2]}] {name_dt}",
        ratio=lambda z: f"ratio_stats + ratio_variance grad [{z[0]}, {z[1]}] float32",
        streaming=lambda z: f"block_sparse_attention streaming S={z[0]} H={z[1]}/K={z[2]} "
                            f"Dh={z[3]}",
        grouper=lambda z: f"block_sparse_attention Prefix Grouper {z[0]}+{z[1]}×{z[2]}",
        decode=lambda z: f"paged_decode B={z[0]} C={z[1]} page {z[5]} budget {z[6]}")
    builders = dict(logits=logits, hidden=hidden, ratio=ratio, streaming=streaming,
                    grouper=grouper, decode=decode)
    return [(k, names[k], builders[k], gpu_z[k], cpu_z[k]) for k in builders]


def random_maker(key):
    """make(shape, dtype, kind) -> random arrays: kind "normal" (N(0, 1)), "normal3"
    (×3: logits), "scaled:<c>", "logp" (log-prob-like, N(−2, 0.3²)), "int:<high>",
    "groups:<n>" (row // n), "mask" (Bernoulli 0.8), "fill" ([B, C] rows filled to a
    random length in [C/2, C])."""
    keys = iter(jax.random.split(key, 64))

    def make(shape, dtype, kind):
        k = next(keys)
        if kind.startswith("int:"):
            return jax.random.randint(k, shape, 0, int(kind[4:]), dtype)
        if kind.startswith("groups:"):
            return (jnp.arange(shape[0]) // int(kind[7:])).astype(dtype)
        if kind == "mask":
            return jax.random.bernoulli(k, 0.8, shape)
        if kind == "fill":
            b, c = shape
            fill = jax.random.randint(k, (b, 1), c // 2, c + 1)
            return jnp.arange(c)[None] < fill
        x = jax.random.normal(k, shape)
        if kind == "normal3":
            x = x * 3
        elif kind == "logp":
            x = x * 0.3 - 2
        elif kind.startswith("scaled:"):
            x = x * float(kind[7:])
        return x.astype(dtype)

    return make


def abstract_maker(shape, dtype, kind):
    return jax.ShapeDtypeStruct(shape, dtype)


def tolerances(dt, bf16_out: bool) -> tuple[float, float]:
    """(forward, gradient) tolerance on the relative L2 error for inputs of dtype ``dt``
    (a case's first argument). float32 inputs: 1e-4 and 1e-3 (summation order only).
    bfloat16 inputs: float32 outputs computed in f32 from the same, exactly upcast,
    inputs 2e-3; outputs rounded to bf16 (attention, decode) 1e-2 (bf16 rounds by up
    to 2⁻⁹ of each element, and flash attention multiplies P·V in bf16); gradients,
    rounded to bf16, 3e-2."""
    if jnp.dtype(dt) == jnp.float32:
        return 1e-4, 1e-3
    return (1e-2 if bf16_out else 2e-3), 3e-2


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64 (inf if a has a non-finite entry)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(kern, ref, args, cot):
    """(forward error, gradient error or None) of ``kern`` against ``ref`` on ``args``:
    the worst relative L2 error over the outputs (integer outputs must match exactly) and
    over the input gradients of Σ cot·output (floating inputs; ``cot`` None: no gradient;
    "variance": the gradient of the last output, a scalar, w.r.t. the first argument).
    The reference sees float inputs and cotangents upcast to float32."""
    def up(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    mode = "fwd" if cot is None else "variance" if isinstance(cot, str) else "vjp"

    @jax.jit
    def run(args, cot):
        if mode == "fwd":
            return kern(*args), ref(*up(args)), None, None
        if mode == "variance":
            g = jax.grad(lambda x, *rest: kern(x, *rest)[-1])(*args)
            rg = jax.grad(lambda x, *rest: ref(x, *rest)[-1])(*up(args))
            return kern(*args), ref(*up(args)), (g,), (rg,)
        out, vjp = jax.vjp(kern, *args)
        rout, rvjp = jax.vjp(ref, *up(args))
        return out, rout, vjp(cot), rvjp(up(cot))

    out, rout, grads, rgrads = run(tuple(args), cot if mode == "vjp" else None)
    fwd = 0.0
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(rout)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            fwd = max(fwd, rel_err(a, b))
        elif not bool(jnp.all(a == b)):
            fwd = float("inf")                 # e.g. a different page selection
    if grads is None:
        return fwd, None
    floats = [(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads))
              if jnp.issubdtype(g.dtype, jnp.floating)]
    return fwd, max(rel_err(g, r) for g, r in floats)


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


def check_all(on_accel: bool):
    """Prints every ``check_cases`` case: forward and gradient error against the
    reference, and the tolerance (GPU path: compiled on a GPU, interpret mode else)."""
    dt = jnp.bfloat16 if on_accel else jnp.float32
    make = random_maker(jax.random.key(0))
    print(f"\n== GPU kernels vs references ({'native' if on_accel else 'interpret mode'}),"
          " relative L2 error ==")
    failed = 0
    for _, name_of, build, gpu_z, cpu_z in check_cases(dt):
        kern, ref, args, cot, bf16_out = build(gpu_z if on_accel else cpu_z, make)
        fwd, grad = compare(kern, ref, args, cot)
        tf, tg = tolerances(args[0].dtype, bf16_out)
        ok = fwd <= tf and (grad is None or grad <= tg)
        failed += not ok
        print(f"{name_of(gpu_z if on_accel else cpu_z):<58} fwd {fwd:.1e} (≤ {tf:g})"
              + ("" if grad is None else f"  grad {grad:.1e} (≤ {tg:g})")
              + ("" if ok else "  FAIL"), flush=True)
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", choices=["auto", "tpu", "gpu"])
    parser.add_argument("--check", action="store_true",
                        help="only compare the GPU kernels with their references "
                        "(check_cases) and exit 1 on a failure")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--peak-bw", type=float, default=None,
                        help="bytes/s the %%BW column divides by (default: measured copy)")
    args = parser.parse_args()
    platform = jax.default_backend()
    dev = jax.devices()[0]
    on_accel = platform in ("gpu", "tpu")
    backend = args.backend if args.backend != "auto" else (platform if on_accel else "gpu")
    reps = args.reps or (20 if on_accel else 2)
    if args.check:
        raise SystemExit(1 if check_all(platform == "gpu") else 0)
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

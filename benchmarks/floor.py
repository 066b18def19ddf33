"""Compute floor of a GRPO iteration: necessary FLOPs / measured matmul rate, per phase.

    .venv/bin/python benchmarks/floor.py                  # peer model + one 2× as wide
    .venv/bin/python benchmarks/floor.py --layout naive   # one update layout only
    .venv/bin/python benchmarks/floor.py --quick          # smoke test, tiny sizes
    .venv/bin/python benchmarks/floor.py --json runs/floor.json --rlx_root /tmp/rlx-old

1. Matmul rate. For every matmul shape the workload needs, a jitted loop of repeated
   ``[rows, k] × [k, n]`` products (each reading the previous result, so nothing is
   hoisted) is timed and its sustained FLOP/s recorded (median of ``--repeats``).
   Attention's two matmuls (QKᵀ, then scores·V) are timed the same way as batched
   products ``[n·K, q·H/K, Dh] × [n·K, Dh, keys]`` (GQA: the H/K query heads of a
   key-value head share one product).
2. Necessary FLOPs of each phase (matmuls only; norms, softmax, sampling and the
   optimizer's elementwise work are left out, they are O(tokens·D) or O(N)):
     forward over `tok` tokens = 2·N_mat·tok
                               + 2·D·V · (positions whose logits are needed)
                               + 4·L·H·Dh · (query, key) pairs   (QKᵀ and AV; causal)
       with N_mat = L·(D·H·Dh + 2·D·K·Dh + H·Dh·D + 3·D·F), the non-embedding weights
       (the "2·N_params·tokens" rule with the embedding counted only where logits are)
     forward + backward        = 3 × forward   (dX and dW each cost one forward)
   Phases (P prompts, G group, B = P·G rows, Sp prompt, T new tokens, S = Sp + T):
     prefill      P·Sp tokens, P logit rows, P·Sp(Sp+1)/2 pairs
     decode step  B tokens, B logit rows, B·(Sp + t) pairs at step t; rlx picks token 0
                  from the prefill logits, so T − 1 model steps
     log-prob pass (old or reference policy), naive layout: B·S tokens, B·T logit
                  rows, B·S(S+1)/2 pairs; packed (Prefix Grouper): P·(Sp + G·T) tokens,
                  B·T logit rows, P·(Sp(Sp+1)/2 + G·(T·Sp + T(T+1)/2)) pairs
     update       3 × one log-prob pass in the same layout
   At one on-policy optimizer step per batch the old-policy pass is not necessary
   (the ratio is 1 by construction) and there is no reference pass without KL; the
   iteration's floor is then prefill + decode + update.
3. Floor = Σ over a phase's matmuls of FLOPs / (rate measured at that matmul's shape).
4. rlx's times come from the real ``RLTrainer.iteration()`` (``_workload.py``, medians
   after warm-up): ``time/generate``, ``time/logprobs``, ``time/update``,
   ``time/iteration``. Generation is split by calling ``rlx.sampling.generate`` directly
   with ``max_new_tokens`` = 1 (prefill, zero decode steps; same compiled functions
   since the completion bucket stays T) and = T: decode = the difference, per step
   = / (T − 1). Host work = iteration − direct generate − log-prob pass − update
   (tokenization, text decoding, rewards, transfers, dispatch).

Models: the peer workload's 3.2M-parameter model and the same depth at twice every
width (about 4× the non-embedding parameters), both under the same workload.

Columns: GFLOP = necessary FLOPs of the phase (above); floor ms = its floor (3.);
rlx ms = rlx's measured time (4.); × floor = rlx ms / floor ms. "—" = not reported by
this version of rlx (an engine that runs the old-policy pass inside its update program
reports no time/logprobs; time/update then includes it). The rate table lists every
shape measured, in GFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workload as wl  # noqa: E402


# ------------------------------------------------------------------- FLOPs
@dataclasses.dataclass(frozen=True)
class Part:
    """One matmul family of a phase: kind "matmul" with shape (rows, k, n) or
    "attention" with shape (batch, queries, keys, head_dim); flops already summed over
    layers and over how often the shape occurs."""

    kind: str
    shape: tuple
    flops: float


def forward_parts(cfg, tokens: int, logit_rows: int, attn_seqs: int, qlen: int, klen: int,
                  pairs: float) -> list[Part]:
    d, f, v, dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    h, k = cfg.num_heads, cfg.num_kv_heads
    hq, hkv = h * dh, k * dh
    weights = {}
    for shape in [(d, hq), (d, hkv), (d, hkv), (hq, d), (d, f), (d, f), (f, d)]:
        weights[shape] = weights.get(shape, 0) + 1
    parts = [Part("matmul", (tokens, a, b), 2.0 * tokens * a * b * cfg.num_layers * n)
             for (a, b), n in weights.items()]
    if logit_rows:
        parts.append(Part("matmul", (logit_rows, d, v), 2.0 * logit_rows * d * v))
    parts.append(Part("attention", (attn_seqs * k, qlen * (h // k), klen, dh),
                      4.0 * cfg.num_layers * h * dh * pairs))
    return parts


def phases(cfg, w: wl.Workload) -> dict[str, tuple[list[Part], float]]:
    """name -> (forward parts, multiplier)."""
    p, g, sp, t = w.prompts, w.group, w.prompt_tokens, w.new_tokens
    b, s = p * g, sp + t
    steps = t - 1
    mean_ctx = sp + (steps + 1) / 2                 # average of Sp + t over t = 1..T−1
    out = {
        "prefill": (forward_parts(cfg, p * sp, p, p, sp, sp, p * sp * (sp + 1) / 2), 1.0),
        "decode_step": (forward_parts(cfg, b, b, b, 1, s, b * mean_ctx), 1.0),
    }
    if w.shared_prefix_update:
        sk = sp + g * t
        pairs = p * (sp * (sp + 1) / 2 + g * (t * sp + t * (t + 1) / 2))
        fwd = forward_parts(cfg, p * sk, b * t, p, sk, sk, pairs)
    else:
        fwd = forward_parts(cfg, b * s, b * t, b, s, s, b * s * (s + 1) / 2)
    out["logprob_pass"] = (fwd, 1.0)
    out["update"] = (fwd, 3.0)
    return out


# -------------------------------------------------------------- measured rates
class Rates:
    """Sustained FLOP/s per shape, measured once per shape and cached."""

    def __init__(self, dtype: str, target_flops: float, repeats: int):
        self.dtype, self.target, self.repeats = dtype, target_flops, repeats
        self.cache: dict[tuple, float] = {}

    def rate(self, part: Part) -> float:
        key = (part.kind, part.shape)
        if key not in self.cache:
            self.cache[key] = (self._matmul if part.kind == "matmul" else self._attention)(
                *part.shape)
        return self.cache[key]

    def _time(self, fn, args, flops_per_rep: float) -> float:
        import jax

        reps = int(min(max(self.target / flops_per_rep, 1), 4096))
        run = jax.jit(lambda *a: fn(reps, *a))
        jax.block_until_ready(run(*args))
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*args))
            times.append(time.perf_counter() - t0)
        return flops_per_rep * reps / statistics.median(times)

    def _matmul(self, rows, k, n) -> float:
        import jax
        import jax.numpy as jnp

        key = jax.random.key(0)
        x = jax.random.normal(key, (rows, k), self.dtype)
        wt = jax.random.normal(jax.random.fold_in(key, 1), (k, n), self.dtype) / k ** 0.5

        def fn(reps, x, wt):
            def body(_, x):
                y = x @ wt
                return x + 1e-6 * jnp.tanh(jnp.sum(y, axis=-1, keepdims=True))
            return jax.lax.fori_loop(0, reps, body, x)

        return self._time(fn, (x, wt), 2.0 * rows * k * n)

    def _attention(self, batch, queries, keys, dh) -> float:
        import jax
        import jax.numpy as jnp

        key = jax.random.key(0)
        q = jax.random.normal(key, (batch, queries, dh), self.dtype)
        kk = jax.random.normal(jax.random.fold_in(key, 1), (batch, keys, dh), self.dtype)
        vv = jax.random.normal(jax.random.fold_in(key, 2), (batch, keys, dh), self.dtype)

        def fn(reps, q, kk, vv):
            def body(_, q):
                scores = jnp.einsum("bqd,bkd->bqk", q, kk) * (1.0 / keys)
                out = jnp.einsum("bqk,bkd->bqd", scores, vv)
                return q + 1e-6 * jnp.tanh(jnp.sum(out, axis=-1, keepdims=True))
            return jax.lax.fori_loop(0, reps, body, q)

        return self._time(fn, (q, kk, vv), 4.0 * batch * queries * keys * dh)

    def floor(self, parts: list[Part], multiplier: float = 1.0) -> float:
        return multiplier * sum(p.flops / self.rate(p) for p in parts)


# ----------------------------------------------------------------- rlx times
def rlx_times(w: wl.Workload, warmup: int, iters: int, repeats: int, split_generate: bool
              ) -> dict:
    import jax

    from rlx import sharding as sh
    from rlx.sampling import generate

    built = wl.build_trainer(w, steps=warmup + iters)
    try:
        times = wl.time_iterations(built.trainer, warmup=warmup, iters=iters)
        out = {k: times.median(k) for k in times.keys()}
        out["compiles_after_first_iteration"] = len(times.compiles_after)
        if split_generate:
            tr, tok = built.trainer, built.tokenizer
            ids, mask = tok.batch_encode([q.prompt for q in built.problems[:w.prompts]],
                                         padding_side="left", add_bos=True)
            key = jax.random.key(1)
            axes = getattr(sh, "BATCH_AXES", "data")

            def gen(n):
                cfg = w.sampler(tok.pad_id, max_new_tokens=n)
                return lambda: generate(tr.graphdef, tr.state.params, ids, mask, key=key,
                                        config=cfg, mesh=tr.mesh, data_axis=axes)

            out["generate_1"] = wl.median_time(gen(1), repeats)
            out["generate_T"] = wl.median_time(gen(w.new_tokens), repeats)
    finally:
        built.close()
    return out


# --------------------------------------------------------------------- report
def report(name: str, cfg, w: wl.Workload, rates: Rates, rlx: dict, gen: dict) -> tuple:
    try:
        from rlx.train import flops as flops_lib
    except ImportError:             # older checkouts have no rlx.train.flops
        flops_lib = None

    ph = phases(cfg, w)
    steps = w.new_tokens - 1
    g = {k: m * sum(p.flops for p in parts) / 1e9 for k, (parts, m) in ph.items()}  # GFLOP
    f = {k: rates.floor(parts, m) for k, (parts, m) in ph.items()}                   # s
    one_step = w.minibatches == 1           # the old-policy pass is then unnecessary
    g_gen, f_gen = g["prefill"] + steps * g["decode_step"], f["prefill"] + steps * f["decode_step"]
    g_it = g_gen + g["update"] + (0.0 if one_step else g["logprob_pass"])
    f_it = f_gen + f["update"] + (0.0 if one_step else f["logprob_pass"])

    t_pre, t_gen = gen.get("generate_1"), gen.get("generate_T")
    t_dec = t_gen - t_pre if t_pre is not None and t_gen is not None else None
    t_lp, t_upd, t_it = (rlx.get(k) for k in ("time/logprobs", "time/update", "time/iteration"))
    t_gen_it = rlx.get("time/generate", rlx.get("time/generate_and_reward"))
    host = t_it - t_gen - (t_lp or 0.0) - t_upd if None not in (t_it, t_gen, t_upd) else None

    rows = [
        (f"prefill ({w.prompts}×{w.prompt_tokens} tokens)", g["prefill"], f["prefill"], t_pre),
        (f"decode, per step ({w.rows} rows)", g["decode_step"], f["decode_step"],
         t_dec / steps if t_dec is not None else None),
        (f"decode, {steps} steps", steps * g["decode_step"], steps * f["decode_step"], t_dec),
        ("generate in the iteration (time/generate)", g_gen, f_gen, t_gen_it),
        ("old log-prob pass" + ("†" if one_step else "") + " (time/logprobs)",
         g["logprob_pass"], f["logprob_pass"], t_lp),
        ("reference log-prob pass (no KL here)", 0.0, 0.0, None),
        ("update, fwd+bwd+AdamW (time/update)", g["update"], f["update"], t_upd),
        ("host work: iteration − phases", 0.0, 0.0, host),
        *([("time/host (rlx's own count)", 0.0, 0.0, rlx["time/host"])]
          if rlx.get("time/host") is not None else []),
        ("iteration (time/iteration)", g_it, f_it, t_it),
    ]
    layout = "packed" if w.shared_prefix_update else "naive"
    lines = [f"== {name}: {cfg.num_params / 1e6:.2f}M params (L={cfg.num_layers}, "
             f"D={cfg.hidden_size}, F={cfg.intermediate_size}, H={cfg.num_heads}, "
             f"K={cfg.num_kv_heads}, V={cfg.vocab_size}), {layout} update layout",
             f"{'phase':<44} {'GFLOP':>9} {'floor ms':>10} {'rlx ms':>10} {'× floor':>8}",
             "-" * 85]
    for label, gf, floor, t in rows:
        ms = f"{t * 1e3:10.1f}" if t is not None else f"{'—':>10}"
        ratio = f"{t / floor:8.2f}" if t is not None and floor > 0 else f"{'—':>8}"
        lines.append(f"{label:<44} {gf:9.3f} {floor * 1e3:10.1f} {ms} {ratio}")
    b, s = w.rows, w.prompt_tokens + w.new_tokens
    if one_step:
        lines.append("† not necessary at one on-policy optimizer step per batch (ratio ≡ 1); "
                     "not in the iteration's floor")
    lines.append(f"host work share of the iteration: {host / t_it:.1%}" if host is not None
                 and t_it else "host work share: —")
    if flops_lib is not None:
        lines.append(f"rlx.train.flops.train_flops (perf/update_mfu's count: 6·N·B·S, the "
                     f"embedding at every position, + causal attention; naive rows): "
                     f"{flops_lib.train_flops(cfg, b, s) / 1e9:.3f} GFLOP")
    lines.append(f"compilations after the first iteration: "
                 f"{rlx.get('compiles_after_first_iteration')}")
    record = {"model": name, "layout": layout, "num_params": cfg.num_params,
              "rows": [dict(phase=r[0], gflop=r[1], floor_s=r[2], rlx_s=r[3],
                            ratio=(r[3] / r[2] if r[3] is not None and r[2] else None))
                       for r in rows], "rlx_medians": rlx, "generate_split": gen}
    return lines, record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", choices=("naive", "packed", "both"), default=None,
                    help="update layout(s) to run (default both; --quick: naive)")
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 3)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per matmul shape and per direct generate (default 5)")
    ap.add_argument("--no_large", action="store_true", help="only the peer workload's model")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--rlx_root", default=None,
                    help="checkout or git worktree whose rlx is measured (default: this one)")
    args = ap.parse_args(argv)
    layout = args.layout or ("naive" if args.quick else "both")
    warmup = args.warmup or (1 if args.quick else 2)
    iters = args.iters or (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 5)
    root = wl.use_checkout(args.rlx_root)

    base = wl.Workload(minibatches=args.minibatches)
    if args.quick:
        base = base.quick()
    models = [("peer model", base)] + ([] if args.no_large else [("2× width", base.wider(2))])
    layouts = {"naive": [False], "packed": [True], "both": [False, True]}[layout]
    rlx_desc = wl.describe_checkout(root)
    print(f"rlx: {rlx_desc}")
    print(f"machine: {wl.machine()}")
    print(f"workload: {base.describe().split('; model')[0]}; GRPO without KL, "
          f"{args.minibatches} AdamW step(s)/iteration; {warmup} warm-up + {iters} timed "
          f"iterations", flush=True)

    rates = Rates(base.dtype, target_flops=2e8 if args.quick else 1e10, repeats=repeats)
    plans = [(name, dataclasses.replace(w, shared_prefix_update=packed))
             for name, w in models for packed in layouts]
    for _, w in plans:                      # every shape first, so one table, one moment
        for parts, _ in phases(w.model_config(), w).values():
            for part in parts:
                rates.rate(part)
    print(f"\nmeasured matmul rates (sustained, median of {repeats}; {base.dtype}):")
    print(f"{'kind':<10} {'shape':<28} {'GFLOP/s':>9}")
    for (kind, shape), r in sorted(rates.cache.items()):
        label = ("[{}×{}]·[{}×{}]".format(shape[0], shape[1], shape[1], shape[2])
                 if kind == "matmul" else
                 "{}×([{}×{}]·[{}×{}])".format(shape[0], shape[1], shape[3], shape[3], shape[2]))
        print(f"{kind:<10} {label:<28} {r / 1e9:9.1f}", flush=True)

    records, gens = [], {}
    for name, w in plans:
        rlx = rlx_times(w, warmup, iters, repeats, split_generate=name not in gens)
        if name not in gens:
            gens[name] = {k: rlx.pop(k) for k in ("generate_1", "generate_T")}
        lines, rec = report(name, w.model_config(), w, rates, rlx, gens[name])
        print("\n" + "\n".join(lines), flush=True)
        records.append(rec)

    if args.json:
        import jax

        out = {"rlx": rlx_desc, "machine": wl.machine(), "jax": jax.__version__,
               "workload": dataclasses.asdict(base), "warmup": warmup, "iters": iters,
               "results": records,
               "rates": [{"kind": k, "shape": list(s), "flop_per_s": r}
                         for (k, s), r in rates.cache.items()]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

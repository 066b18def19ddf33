"""Batched in-graph sampling of group rollouts: one prefill, then a ``lax.while_loop``.

``generate`` = ``prepare`` (host: validate, bucket, left-pad) → ``prefill`` (jit: run
the P prompts once, build the group KV cache, choose token 0) → ``decode`` (jit, with
the cache and the sampling state donated: one token per row per iteration until every
row has stopped or ``max_new_tokens`` is reached) → a ``Rollout``.

Rows are b = p·G + g. Prompts are left-padded to a shared bucket length Sp so all rows
decode in lockstep at one scalar cache slot; rotary positions are per row (the number of
real tokens before the token). Row b's PRNG key is
``fold_in(fold_in(key, prompt_index[p]), g)`` and step t uses ``fold_in(row_key, t)``,
so a row's tokens depend only on (key, its prompt index, g, its prompt), never on the
rest of the batch.

Group KV layouts (``SamplerConfig.prefix_cache``):
  "shared"    the prompt's KV entries are stored once per prompt (``share_prefix``);
              the G rows attend prefix + their own T slots with one softmax;
  "repeat"    one prefill, KV entries copied G times (``repeat_rows``);
  "reprefill" the naive baseline: the prompt is repeated G times and prefilled P·G times.
All three give the same tokens and log-probs (up to float summation order).

Sharding: with ``mesh``, rows (and prompts) are split over ``data_axis`` (data
parallel); params are replicated unless the caller already placed them with a sharding.
The number of prompts is padded to a multiple of the data-axis size with copies of the
last prompt, whose rows are dropped from the result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlx.models import api
from rlx.models.cache import KVCache, init_cache, repeat_rows, share_prefix
from rlx.sampling import controls, recycle
from rlx.sampling.buckets import bucket_length, left_pad
from rlx.sampling.config import SamplerConfig
from rlx.sampling.rollout import Rollout


@struct.dataclass
class DecodeState:
    """Loop carry. B rows, T completion bucket.

    Attributes:
      step: [] int32 tokens chosen so far (the next token's index).
      last_token: [B] int32 the token to feed next.
      tokens, sampling_logprobs, policy_logprobs: [B, T] buffers (policy may be None).
      lengths: [B] int32 tokens in the completion so far.
      done: [B] bool, the row sampled a stop token.
    """

    step: jax.Array
    last_token: jax.Array
    tokens: jax.Array
    sampling_logprobs: jax.Array
    policy_logprobs: jax.Array | None
    lengths: jax.Array
    done: jax.Array


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """Host-side, bucketed inputs (numpy). Pp ≥ P prompts (padded for the mesh).

    Attributes:
      prompts, prompt_mask: [Pp, Sp] left-padded ids / mask.
      prompt_index: [Pp] int32 index folded into the PRNG key per prompt.
      forced, forced_lengths: [Pp·G, T] forced-prefix ids (right-padded) / [Pp·G] counts.
      max_new_tokens: the loop limit (≤ T).
      num_prompts: P, the caller's prompt count.
      config: the sampler config with ``max_new_tokens`` rounded up to T (static).
    """

    prompts: np.ndarray
    prompt_mask: np.ndarray
    prompt_index: np.ndarray
    forced: np.ndarray
    forced_lengths: np.ndarray
    max_new_tokens: int
    num_prompts: int
    config: SamplerConfig


def _data_size(mesh: Mesh | None, data_axis) -> int:
    if mesh is None:
        return 1
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"data_axis {a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(np.prod([mesh.shape[a] for a in axes]))


def prepare(prompts, prompt_mask, config: SamplerConfig, *, vocab_size: int,
            forced_prefix=None, forced_lengths=None, prompt_index=None,
            data_shards: int = 1) -> PreparedBatch:
    """Validates and buckets a batch on the host.

    Args:
      prompts: [P, S] int token ids, padded on either side.
      prompt_mask: [P, S] 1 on real tokens. Every prompt needs at least one token.
      forced_prefix: optional [P·G, F] ids fed (not sampled) as the first tokens of each
        row's completion, F ≤ max_new_tokens.
      forced_lengths: optional [P·G] number of forced tokens per row (default F).
      prompt_index: optional [P] ints folded into the key (default 0..P-1); pass
        dataset indices to make a prompt's samples independent of its batch.
      data_shards: pad the prompt count to a multiple of this (mesh data size).
    """
    prompts = np.asarray(prompts)
    prompt_mask = np.asarray(prompt_mask)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts: expected a 2-D integer array [P, S], got "
                         f"shape {prompts.shape} dtype {prompts.dtype}")
    if prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompts shape "
                         f"{prompts.shape}")
    mask = prompt_mask.astype(bool)
    if prompts.shape[0] == 0:
        raise ValueError("prompts: the batch has no prompts")
    lengths = mask.sum(axis=1)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"prompts {empty.tolist()} are empty (prompt_mask has no real "
                         "token); every prompt needs at least one token, e.g. BOS")
    real = prompts[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(f"prompts: token ids must be in [0, {vocab_size}), got range "
                         f"[{real.min()}, {real.max()}]")
    config.check_vocab(vocab_size)
    largest = max(config.prompt_buckets)
    truncate = config.overlong_prompt == "truncate_left"
    longest = int(lengths.max())
    if longest > largest and not truncate:
        raise ValueError(f"prompt {int(lengths.argmax())} has {longest} tokens, more than "
                         f"the largest prompt bucket {largest} (set "
                         "overlong_prompt='truncate_left' to keep the last tokens)")
    sp = bucket_length(min(longest, largest), config.prompt_buckets, name="prompt length")
    t = bucket_length(config.max_new_tokens, config.completion_buckets,
                      name="max_new_tokens")
    ids, pmask = left_pad(prompts, mask, sp, config.pad_id, truncate=truncate)

    p, g = prompts.shape[0], config.num_generations
    if prompt_index is None:
        prompt_index = np.arange(p)
    prompt_index = np.asarray(prompt_index, np.int32)
    if prompt_index.shape != (p,):
        raise ValueError(f"prompt_index shape {prompt_index.shape} != ({p},)")

    forced = np.full((p * g, t), config.pad_id, np.int32)
    flens = np.zeros((p * g,), np.int32)
    if forced_prefix is not None:
        fp = np.asarray(forced_prefix)
        if fp.ndim != 2 or fp.shape[0] != p * g:
            raise ValueError(f"forced_prefix: expected [P·G, F] = [{p * g}, F], got "
                             f"{fp.shape}")
        if fp.shape[1] > config.max_new_tokens:
            raise ValueError(f"forced_prefix has F={fp.shape[1]} tokens, more than "
                             f"max_new_tokens={config.max_new_tokens}")
        if fp.size and (fp.min() < 0 or fp.max() >= vocab_size):
            raise ValueError(f"forced_prefix: token ids must be in [0, {vocab_size})")
        fl = np.full((p * g,), fp.shape[1]) if forced_lengths is None else \
            np.asarray(forced_lengths)
        if fl.shape != (p * g,) or fl.min(initial=0) < 0 or fl.max(initial=0) > fp.shape[1]:
            raise ValueError(f"forced_lengths: expected [{p * g}] ints in "
                             f"[0, {fp.shape[1]}], got {fl.tolist()}")
        forced[:, :fp.shape[1]] = fp
        flens[:] = fl
    elif forced_lengths is not None:
        raise ValueError("forced_lengths given without forced_prefix")

    pad = (-p) % data_shards
    if pad:
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
        pmask = np.concatenate([pmask, np.repeat(pmask[-1:], pad, 0)])
        prompt_index = np.concatenate([prompt_index, np.repeat(prompt_index[-1:], pad)])
        forced = np.concatenate([forced, np.full((pad * g, t), config.pad_id, np.int32)])
        flens = np.concatenate([flens, np.zeros((pad * g,), np.int32)])
    return PreparedBatch(prompts=ids, prompt_mask=pmask, prompt_index=prompt_index,
                         forced=forced, forced_lengths=flens,
                         max_new_tokens=config.max_new_tokens, num_prompts=p,
                         config=config.replace(max_new_tokens=t))


# ----------------------------------------------------------------------------- jit


@functools.lru_cache(maxsize=32)
def _auto(mesh: Mesh) -> Mesh:
    """The same devices and names with Auto axes (GSPMD propagates through the model)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def _constrain(x, mesh, data_axis, row_axis: int):
    if mesh is None or x is None:
        return x
    spec = [None] * x.ndim
    spec[row_axis] = data_axis
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _constrain_cache(cache: KVCache, mesh, data_axis) -> KVCache:
    """Rows (and prompts) of every cache buffer over ``data_axis``."""
    if mesh is None:
        return cache
    c = functools.partial(_constrain, mesh=mesh, data_axis=data_axis, row_axis=0)
    layers = lambda xs: None if xs is None else tuple(map(c, xs))  # noqa: E731
    return cache.replace(k=layers(cache.k), v=layers(cache.v), mask=c(cache.mask),
                         prefix_k=layers(cache.prefix_k), prefix_v=layers(cache.prefix_v),
                         prefix_mask=c(cache.prefix_mask))


def _constrain_state(state: DecodeState, mesh, data_axis) -> DecodeState:
    c = functools.partial(_constrain, mesh=mesh, data_axis=data_axis, row_axis=0)
    return state.replace(last_token=c(state.last_token), tokens=c(state.tokens),
                         sampling_logprobs=c(state.sampling_logprobs),
                         policy_logprobs=c(state.policy_logprobs),
                         lengths=c(state.lengths), done=c(state.done))


def _row_keys(key, prompt_index, g: int):
    """[B] keys: fold_in(fold_in(key, prompt_index[p]), g) for b = p·G + g."""
    per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(key, prompt_index)
    per_row = jnp.repeat(per_prompt, g, axis=0)
    gen = jnp.tile(jnp.arange(g, dtype=jnp.int32), prompt_index.shape[0])
    return jax.vmap(jax.random.fold_in)(per_row, gen)


def _choose(logits, state: DecodeState, row_keys, forced, forced_lengths,
            config: SamplerConfig) -> DecodeState:
    """Picks token ``state.step`` for every row from next-token logits [B, V]."""
    t = state.step
    active = ~state.done
    is_forced = t < forced_lengths
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
    processed = controls.process_logits(
        logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        min_p=config.min_p, forbidden_ids=config.forbidden_token_ids)
    sampled, slp = controls.sample(step_keys, processed, greedy=config.greedy)
    forced_tok = jax.lax.dynamic_index_in_dim(forced, t, axis=1, keepdims=False)
    tok = jnp.where(is_forced, forced_tok, sampled)
    tok = jnp.where(active, tok, config.pad_id).astype(jnp.int32)
    slp = jnp.where(active & ~is_forced, slp, 0.0)

    def put(buf, col):
        return jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, t))

    policy = state.policy_logprobs
    if policy is not None:
        plp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], 1)[:, 0]
        policy = put(policy, jnp.where(active, plp, 0.0))
    stopped = jnp.zeros_like(active)
    if config.stop_token_ids:
        stopped = jnp.isin(tok, jnp.asarray(config.stop_token_ids, jnp.int32))
    return state.replace(
        step=t + 1, last_token=tok, tokens=put(state.tokens, tok),
        sampling_logprobs=put(state.sampling_logprobs, slp), policy_logprobs=policy,
        lengths=state.lengths + active.astype(jnp.int32),
        done=state.done | (active & ~is_forced & stopped))


def _positions(mask):
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def row_buffer_avals(model_config, config: SamplerConfig, rows: int, prompt_len: int
                     ) -> list[tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of the per-row cache buffers ``prefill`` builds, L keys then L
    values (``rlx.models.cache`` layout): T = ``config.max_new_tokens`` slots, or
    Sp + T for the layouts that copy the prompt into every row."""
    slots = config.max_new_tokens + (0 if config.prefix_cache == "shared" else prompt_len)
    kh, dh, n = model_config.num_kv_heads, model_config.head_dim, model_config.num_layers
    dtype = jnp.dtype(model_config.dtype)
    return [((rows, kh, dh, slots), dtype)] * n + [((rows, kh, slots, dh), dtype)] * n


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh", "data_axis"),
                   donate_argnames=("recycled",), keep_unused=True)
def prefill(graphdef, params, prompts, prompt_mask, key, prompt_index, forced,
            forced_lengths, recycled=None, *, config: SamplerConfig,
            mesh: Mesh | None = None, data_axis="data") -> tuple[KVCache, DecodeState]:
    """Runs the prompts [P, Sp] once, builds the group cache for B = P·G rows with
    T = ``config.max_new_tokens`` continuation slots, and chooses token 0 of each row.

    ``recycled``: optional buffers (``row_buffer_avals``) donated for their memory only:
    the new cache's per-row buffers are written into them (``rlx.sampling.recycle``).
    """
    del recycled            # only the donated memory is used (aliased to the outputs)
    model = api.merge(graphdef, params)
    cfg = model.cfg
    g, t = config.num_generations, config.max_new_tokens
    p, sp = prompts.shape
    prompts = _constrain(prompts, mesh, data_axis, 0)
    prompt_mask = _constrain(prompt_mask.astype(bool), mesh, data_axis, 0)
    if config.prefix_cache == "reprefill":
        ids, m = jnp.repeat(prompts, g, axis=0), jnp.repeat(prompt_mask, g, axis=0)
        cache = init_cache(cfg, p * g, sp + t)
    else:
        ids, m = prompts, prompt_mask
        cache = init_cache(cfg, p, sp)
    cache = _constrain_cache(cache, mesh, data_axis)
    hidden, cache = model(ids, _positions(m), m, cache=cache, cache_slot=0)
    logits = model.logits(hidden[:, -1:])[:, 0]
    if config.prefix_cache == "shared":
        cache = share_prefix(cache, g, t)
    elif config.prefix_cache == "repeat":
        cache = repeat_rows(cache, g, extra_slots=t)
    if config.prefix_cache != "reprefill":
        logits = jnp.repeat(logits, g, axis=0)
    cache = _constrain_cache(cache, mesh, data_axis)
    b = p * g
    zeros = jnp.zeros((b, t), jnp.float32)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), last_token=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, t), config.pad_id, jnp.int32), sampling_logprobs=zeros,
        policy_logprobs=zeros if config.return_policy_logprobs else None,
        lengths=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))
    state = _choose(_constrain(logits, mesh, data_axis, 0), state,
                    _row_keys(key, prompt_index, g), forced, forced_lengths, config)
    return cache, _constrain_state(state, mesh, data_axis)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh", "data_axis"),
                   donate_argnames=("cache", "state"))
def decode(graphdef, params, cache: KVCache, state: DecodeState, prompts, prompt_mask,
           key, prompt_index, forced, forced_lengths, max_new_tokens, *,
           config: SamplerConfig, mesh: Mesh | None = None, data_axis="data"
           ) -> tuple[Rollout, KVCache]:
    """Decodes until every row stopped or ``max_new_tokens`` (traced, ≤ T) tokens.

    ``cache`` and ``state`` are donated: the loop updates them in place and the final
    cache is returned (aliasing the donated buffer) alongside the ``Rollout``.
    """
    g = config.num_generations
    p, sp = prompts.shape
    prompt_mask = prompt_mask.astype(bool)
    offset = 0 if config.prefix_cache == "shared" else sp
    row_mask = jnp.repeat(prompt_mask, g, axis=0)
    prompt_len = jnp.sum(row_mask, axis=1, dtype=jnp.int32)
    row_keys = _row_keys(key, prompt_index, g)
    feed_mask = jnp.ones((p * g, 1), bool)

    def cond(carry):
        _, st = carry
        return (st.step < max_new_tokens) & ~jnp.all(st.done)

    def body(carry):
        cache, st = carry
        t = st.step
        logits, cache = api.forward_with_cache(
            graphdef, params, st.last_token[:, None], (prompt_len + t - 1)[:, None],
            feed_mask, cache, offset + t - 1)
        st = _choose(logits[:, 0], st, row_keys, forced, forced_lengths, config)
        return _constrain_cache(cache, mesh, data_axis), _constrain_state(st, mesh, data_axis)

    cache, state = jax.lax.while_loop(cond, body, (cache, state))
    index = jnp.arange(config.max_new_tokens)[None, :]
    completion_mask = index < state.lengths[:, None]
    rollout = Rollout(
        prompt_ids=jnp.repeat(prompts, g, axis=0), prompt_mask=row_mask,
        completion_ids=state.tokens, completion_mask=completion_mask,
        sampling_logprobs=state.sampling_logprobs, policy_logprobs=state.policy_logprobs,
        lengths=state.lengths, finished=state.done, truncated=~state.done,
        group_id=jnp.arange(p * g, dtype=jnp.int32) // g,
        forced=(index < forced_lengths[:, None]) & completion_mask,
        decode_steps=state.step)
    return rollout, cache


def _vocab_size(graphdef, params) -> int:
    """V, read off the embedding's shape (merging the module costs ~0.4 ms a call)."""
    try:
        return int(params["trunk"]["embed"]["embedding"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        return api.merge(graphdef, params).cfg.vocab_size


def device_inputs(batch: PreparedBatch, mesh: Mesh | None = None, data_axis="data"
                  ) -> dict[str, Any]:
    """The prepared arrays on device (rows split over ``data_axis`` when a mesh is given)."""
    arrays = dict(prompts=batch.prompts, prompt_mask=batch.prompt_mask,
                  prompt_index=batch.prompt_index, forced=batch.forced,
                  forced_lengths=batch.forced_lengths)
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return {k: jax.device_put(v, NamedSharding(
        mesh, PartitionSpec(data_axis, *([None] * (v.ndim - 1))))) for k, v in arrays.items()}


def _place_params(params, mesh: Mesh):
    """Replicates leaves that are not already on exactly ``mesh``'s devices (leaves
    already there, sharded or, on a one-device mesh, simply resident, are kept: a
    ``device_put`` per leaf per call is ~1 ms of host time on a 50-leaf model)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    devices = set(mesh.devices.flat)

    def place(x):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and set(sharding.device_set) == devices:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, params)


def generate(graphdef, params, prompts, prompt_mask, *, key: jax.Array,
             config: SamplerConfig, forced_prefix=None, forced_lengths=None,
             prompt_index=None, mesh: Mesh | None = None, data_axis="data") -> Rollout:
    """Samples ``config.num_generations`` completions for each prompt.

    Args:
      graphdef, params: the policy from ``rlx.models.api``.
      prompts, prompt_mask: [P, S] host arrays (ids, 1 on real tokens; any padding side).
      key: a PRNG key; row b = p·G + g uses fold_in(fold_in(key, prompt_index[p]), g).
      config: sampling controls (static: a new config value compiles anew).
      forced_prefix, forced_lengths: optional [P·G, F] / [P·G] forced completion prefixes
        (fed, not sampled; marked in ``Rollout.forced``).
      prompt_index: optional [P] ints folded into the key (default 0..P-1).
      mesh, data_axis: data-parallel rows over this mesh axis (or tuple of axes).
    Returns:
      A ``Rollout`` with B = P·G rows, completion length T = the completion bucket of
      ``max_new_tokens``, prompt length Sp = the prompt bucket of the longest prompt.

    ``generate`` is a host-level entry point (it validates and buckets concrete arrays,
    then dispatches two jitted calls without a host sync in between). Code that is
    itself jitted calls ``prefill`` and ``decode`` on a ``PreparedBatch``. On the CPU
    backend the decode's per-row KV buffers are kept for the next call of the same
    shapes (``rlx.sampling.recycle``).
    """
    if mesh is not None:
        mesh = _auto(mesh)
        params = _place_params(params, mesh)
    batch = prepare(prompts, prompt_mask, config, vocab_size=_vocab_size(graphdef, params),
                    forced_prefix=forced_prefix, forced_lengths=forced_lengths,
                    prompt_index=prompt_index, data_shards=_data_size(mesh, data_axis))
    x = device_inputs(batch, mesh, data_axis)
    static = dict(config=batch.config, mesh=mesh, data_axis=data_axis)
    recycled, pool_key = None, None
    if recycle.enabled(mesh):
        pool_key = (batch.config, mesh, data_axis, batch.prompts.shape)
        recycled = recycle.take(graphdef, pool_key)
        if recycled is None:
            cfg = api.merge(graphdef, params).cfg
            recycled = recycle.fresh(row_buffer_avals(
                cfg, batch.config, batch.prompts.shape[0] * config.num_generations,
                batch.prompts.shape[1]), mesh, data_axis)
    cache, state = prefill(graphdef, params, x["prompts"], x["prompt_mask"], key,
                           x["prompt_index"], x["forced"], x["forced_lengths"], recycled,
                           **static)
    rollout, cache = decode(graphdef, params, cache, state, x["prompts"], x["prompt_mask"],
                            key, x["prompt_index"], x["forced"], x["forced_lengths"],
                            np.int32(batch.max_new_tokens), **static)
    if pool_key is not None:
        recycle.give(graphdef, pool_key, tuple(cache.k) + tuple(cache.v), mesh, data_axis)
    rows = batch.num_prompts * config.num_generations
    if rows == rollout.lengths.shape[0]:
        return rollout
    return jax.tree.map(lambda a: a if a.ndim == 0 else a[:rows], rollout)

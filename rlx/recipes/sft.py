"""Supervised warm-up on demonstrations (the SFT phase every recipe starts with).

Rows are ``[bos] prompt | demonstration eos`` (bos as the tokenizer's rule says), right
padded to a multiple of 16 tokens so few shapes compile; the loss is the mean
next-token cross-entropy over the demonstration tokens (eos included). The optimizer
is ``rlx.train.optim.warmup_cosine``: ``lr`` with min(10, steps) warmup steps and a
cosine decay to 0.1·lr.
"""

from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.train import optim
from rlx.train import state as state_lib
from rlx.train import steps as steps_lib
from rlx.train.batches import SFTBatch, make_sequences
from rlx.train.logger import RunLogger


def prompt_bos(tok) -> bool | None:
    """``add_bos`` for prompts: None (the tokenizer's own rule) on tokenizers that state
    one (``add_bos_token``), else a bos whenever the tokenizer has one."""
    return None if hasattr(tok, "add_bos_token") else tok.bos_id is not None


def sft_batches(tok, task, problems, batch: int, seed: int):
    """Endless ``SFTBatch`` es [batch, S]: [bos] prompt | demonstration eos, loss on the
    response (demonstrations drawn with a seeded ``random.Random``, so styles may vary
    per draw)."""
    rng = random.Random(seed)
    bos = prompt_bos(tok)
    eos = [tok.eos_id] if tok.eos_id is not None else []
    while True:
        chosen = [problems[rng.randrange(len(problems))] for _ in range(batch)]
        prompts = [tok.encode(q.prompt, add_bos=bos) for q in chosen]
        answers = [tok.encode(task.demonstration(q, rng)) + eos for q in chosen]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        width = -(-width // 16) * 16          # few distinct shapes: few compilations
        ids = np.full((batch, width), tok.pad_id, np.int32)
        mask = np.zeros((batch, width), bool)
        loss = np.zeros((batch, width), np.float32)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = p + a
            mask[i, :len(p) + len(a)] = True
            loss[i, len(p):len(p) + len(a)] = 1.0
        yield SFTBatch(seq=make_sequences(ids, mask), loss_mask=jnp.asarray(loss))


def run_sft(graphdef, params, tok, task, problems, *, steps: int, batch: int, lr: float,
            seed: int, mesh, logger: RunLogger | None = None):
    """``steps`` SFT steps from ``params``; returns the new params. Logs ``sft_loss``
    every 25 steps at steps −(steps − i − 1), so the phase ends at step 0."""
    tx = optim.warmup_cosine(lr, steps)
    state = state_lib.create(params, tx, seed=seed)
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    batches = sft_batches(tok, task, problems, batch, seed)
    step_fns: dict = {}                       # one compiled step per batch shape
    for i in range(steps):
        b = sh.shard_batch(next(batches), mesh)
        shape = b.seq.tokens.shape
        if shape not in step_fns:
            step_fns[shape] = steps_lib.jit_step(steps_lib.make_sft_step(graphdef, tx), mesh,
                                                 shardings, b)
        state, metrics = step_fns[shape](state, b)
        if logger is not None and (i + 1) % 25 == 0:
            logger.log(-(steps - i - 1), {"sft_loss": float(metrics["sft_loss"])})
    return state.params

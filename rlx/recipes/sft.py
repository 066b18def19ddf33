"""Supervised warm-up on demonstrations (the SFT phase every recipe starts with).

Rows are ``[bos] prompt | demonstration eos`` (bos as the tokenizer's rule says), right
padded to a multiple of 16 tokens so few shapes compile; the loss is the mean
next-token cross-entropy over the demonstration tokens (eos included). The optimizer
is ``rlx.train.optim.warmup_cosine``: ``lr`` with min(10, steps) warmup steps and a
cosine decay to 0.1·lr.

Resumable: with ``checkpoint_dir`` the training state (params, optimizer state, step,
key) and the position of the batch RNG are saved as ``rlx.train.PhaseCheckpoints``
says (and after the last step), so a killed warm-up rerun with the same arguments
continues from its last save and ends bitwise where an uninterrupted one ends (CPU).
A save of other settings (steps, batch, lr, seed, problems, model) is refused
(``CheckpointMismatch``) rather than resumed.
"""

from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np

from rlx import sharding as sh
from rlx.train import checkpoint as ckpt_lib
from rlx.train import optim
from rlx.train import state as state_lib
from rlx.train import steps as steps_lib
from rlx.train.batches import SFTBatch, make_sequences
from rlx.train.logger import RunLogger


def prompt_bos(tok) -> bool | None:
    """``add_bos`` for prompts: None (the tokenizer's own rule) on tokenizers that state
    one (``add_bos_token``), else a bos whenever the tokenizer has one."""
    return None if hasattr(tok, "add_bos_token") else tok.bos_id is not None


def sft_batches(tok, task, problems, batch: int, seed: int, *,
                rng: random.Random | None = None):
    """Endless ``SFTBatch`` es [batch, S]: [bos] prompt | demonstration eos, loss on the
    response (demonstrations drawn with a seeded ``random.Random``, so styles may vary
    per draw; pass ``rng`` to own that generator, e.g. to checkpoint its state between
    batches)."""
    rng = rng if rng is not None else random.Random(seed)
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
            seed: int, mesh, logger: RunLogger | None = None,
            checkpoint_dir: str | None = None,
            checkpoints: ckpt_lib.PhaseCheckpoints | None = None,
            on_mismatch: str = "error"):
    """``steps`` SFT steps from ``params``; returns the new params. Logs ``sft_loss``
    every 25 steps at steps −(steps − i − 1), so the phase ends at step 0. With
    ``checkpoint_dir``, resumes from and saves to it (module docstring)."""
    tx = optim.warmup_cosine(lr, steps)
    state = state_lib.create(params, tx, seed=seed)
    shardings = sh.state_shardings(state, mesh)
    state = sh.place(state, shardings)
    rng = random.Random(seed)
    identity = {"phase": "sft", "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                "problems": ckpt_lib.data_fingerprint(
                    (q.prompt, q.answer) for q in problems)}
    with ckpt_lib.PhaseLoop(checkpoint_dir, phase="the SFT warm-up", steps=steps,
                            identity=identity, config=checkpoints,
                            on_mismatch=on_mismatch) as loop:
        start, state, data_state, _ = loop.restore(state, shardings)
        if data_state and "rng" in data_state:
            version, internal, gauss = data_state["rng"]
            rng.setstate((version, tuple(internal), gauss))
        batches = sft_batches(tok, task, problems, batch, seed, rng=rng)
        step_fns: dict = {}                   # one compiled step per batch shape
        for i in range(start, steps):
            b = sh.shard_batch(next(batches), mesh)
            shape = b.seq.tokens.shape
            if shape not in step_fns:
                step_fns[shape] = steps_lib.jit_step(steps_lib.make_sft_step(graphdef, tx),
                                                     mesh, shardings, b)
            state, metrics = step_fns[shape](state, b)
            if logger is not None and (i + 1) % 25 == 0:
                logger.log(-(steps - i - 1), {"sft_loss": float(metrics["sft_loss"])})
            loop.done(i + 1, state, data_state={"rng": list(rng.getstate())})
    return state.params

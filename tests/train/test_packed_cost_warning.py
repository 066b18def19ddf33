"""The Prefix Grouper layout warns (once per shape) where dense attention makes it cost
more than G separate rows, and stays quiet where it pays off or the kernel is sparse."""

import logging
import types

from rlx.train.rl import RLTrainer


def _trainer(g, backend):
    return types.SimpleNamespace(sampler=types.SimpleNamespace(num_generations=g),
                                 model_config=types.SimpleNamespace(attention_backend=backend),
                                 _packed_checked=set())


def test_packed_layout_warns_once_where_it_computes_more_attention(caplog):
    tr = _trainer(8, "reference")
    with caplog.at_level(logging.WARNING, logger="rlx.rl"):
        for _ in range(2):                  # long completions: (128 + 8·256)² > 8·384²
            RLTrainer._check_packed_cost(tr, 128, 256, 128 + 8 * 256)
    assert len(caplog.records) == 1
    assert "shared_prefix_update = False" in caplog.records[0].getMessage()


def test_packed_layout_is_quiet_where_it_pays_off_or_attention_is_block_sparse(caplog):
    with caplog.at_level(logging.WARNING, logger="rlx.rl"):
        RLTrainer._check_packed_cost(_trainer(8, "reference"), 1024, 64, 1024 + 8 * 64)
        RLTrainer._check_packed_cost(_trainer(8, "block_sparse"), 128, 256, 128 + 8 * 256)
    assert not caplog.records

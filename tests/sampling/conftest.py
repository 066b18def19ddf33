"""A tiny random policy and a small batch of variable-length prompts."""

import numpy as np
import pytest

from rlx.models import api
from rlx.models.config import model_config


@pytest.fixture(scope="session")
def policy():
    cfg = model_config("tiny")
    graphdef, params = api.init(cfg, seed=0)
    return cfg, graphdef, params


@pytest.fixture(scope="session")
def prompts():
    """Three right-padded prompts of 3, 5 and 1 tokens (ids ≥ 1), as (ids, mask)."""
    ids = np.array([[11, 12, 13, 0, 0], [21, 22, 23, 24, 25], [31, 0, 0, 0, 0]], np.int32)
    return ids, ids > 0

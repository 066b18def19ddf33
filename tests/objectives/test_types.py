import jax
import jax.numpy as jnp
import pytest

import rlx.objectives as O
from rlx.objectives.types import AdvantageOutput, LossOutput, PolicyBatch, RewardBatch, TokenOutputs


def test_dataclasses_are_pytrees_with_optional_fields():
    x = jnp.ones((2, 3))
    b = PolicyBatch(mask=x, old_logp=x, advantages=x)
    assert len(jax.tree.leaves(b)) == 3
    b2 = jax.jit(lambda b: b.replace(advantages=2 * b.advantages))(b)
    assert float(b2.advantages.sum()) == 12.0 and b2.ref_logp is None
    assert len(jax.tree.leaves(TokenOutputs(logp=x, entropy=x))) == 2
    assert len(jax.tree.leaves(RewardBatch(rewards=jnp.ones((1, 2)), mask=x))) == 2
    ao = AdvantageOutput(advantages=x, mask=x)
    assert ao.metrics == {} and ao.returns is None
    lo = LossOutput(loss=x.sum(), numerator=x.sum(), denominator=x.sum(), metrics={"a": x.sum()})
    assert len(jax.tree.leaves(lo)) == 4


def test_package_exports_every_public_name_lazily():
    for name in O.__all__:
        assert getattr(O, name) is not None, name
    import rlx.objectives.compose  # noqa: F401  (must not shadow the function)

    assert callable(O.compose) and O.compose.__module__ == "rlx.objectives.compose"
    assert O.gspo is not O.gspo_loss  # preset vs surrogate
    with pytest.raises(AttributeError):
        O.no_such_name  # noqa: B018

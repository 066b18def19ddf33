"""Backend selection: precedence of call-site argument, context, global flag, env var."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from rlx_kernels import dispatch
from rlx_kernels import logprob_entropy as le
from rlx_kernels import ratio_stats as rs


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


@pytest.mark.parametrize(
    "platform,kind", [("cpu", "reference"), ("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"),
                      ("rocm", "gpu")],
)
def test_auto_picks_by_platform_and_compiles_natively(platform, kind):
    res = dispatch.resolve_backend("auto", platform=platform)
    assert res.kind == kind and res.interpret is False


def test_auto_on_this_cpu_machine_is_the_reference():
    assert jax.default_backend() == "cpu"
    assert dispatch.resolve_backend() == dispatch.Resolved("reference")


def test_kernel_forced_off_its_platform_runs_in_interpret_mode():
    tpu = dispatch.resolve_backend("tpu", platform="cpu")
    gpu = dispatch.resolve_backend("gpu", platform="cpu")
    assert isinstance(tpu.interpret, pltpu.InterpretParams)
    assert gpu.interpret is True
    assert dispatch.resolve_backend("tpu", platform="gpu").interpret is not False
    assert dispatch.resolve_backend("reference", platform="tpu").kind == "reference"


def test_precedence_argument_then_context_then_global_then_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    assert dispatch.resolve_backend(platform="cpu").kind == "gpu"
    dispatch.set_backend("tpu")
    assert dispatch.resolve_backend(platform="cpu").kind == "tpu"
    with dispatch.force_backend("reference"):
        assert dispatch.resolve_backend(platform="tpu").kind == "reference"
        with dispatch.force_backend("gpu"):
            assert dispatch.resolve_backend(platform="cpu").kind == "gpu"
            assert dispatch.resolve_backend("tpu", platform="cpu").kind == "tpu"
        assert dispatch.resolve_backend(platform="tpu").kind == "reference"
    assert dispatch.resolve_backend(platform="cpu").kind == "tpu"
    dispatch.set_backend(None)
    assert dispatch.resolve_backend(platform="cpu").kind == "gpu"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_backend(platform="cpu").kind == "reference"


def test_context_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with dispatch.force_backend("gpu"):
            raise RuntimeError("boom")
    assert dispatch.get_backend_override() is None


@pytest.mark.parametrize("bad", ["cuda", "TPU", "", "triton"])
def test_unknown_backend_names_raise_value_error(bad, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with dispatch.force_backend(bad):
            pass
    if bad.lower() not in dispatch.BACKENDS + ("",):  # the env var is case-insensitive
        monkeypatch.setenv(dispatch.ENV_VAR, bad)
        with pytest.raises(ValueError, match=dispatch.ENV_VAR):
            dispatch.resolve_backend()


def test_env_var_is_case_insensitive(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, " TPU ")
    assert dispatch.resolve_backend(platform="cpu").kind == "tpu"


def test_flag_switches_the_kernels_actually_traced():
    """The public wrappers honour the override: a pallas_call appears only when forced."""
    logits = jnp.zeros((2, 3, 130))
    targets = jnp.zeros((2, 3), jnp.int32)
    logp = lambda: jax.make_jaxpr(lambda x: le.token_logprob_entropy(x, targets))(logits)
    new = jnp.zeros((4, 130))
    stats = lambda: jax.make_jaxpr(lambda x: rs.ratio_statistics(
        x, x, x, jnp.zeros(4, jnp.int32), num_groups=1, eps_low=0.2, eps_high=0.2))(new)
    assert "pallas_call" not in str(logp()) and "pallas_call" not in str(stats())
    with dispatch.force_backend("gpu"):
        assert "pallas_call" in str(logp()) and "pallas_call" in str(stats())
    dispatch.set_backend("tpu")
    assert "pallas_call" in str(logp()) and "pallas_call" in str(stats())

"""Parity of rlx's decoder against the reference `transformers` implementation.

Small random Qwen2 (q/k/v bias, tied embeddings) and Llama (untied, Llama-3 rope
scaling) models are built with transformers, saved as safetensors, imported into rlx
and compared on a left-padded batch (positions and mask as transformers computes them
for generation). Tolerance: |rlx − hf| ≤ 1e-4 · max|hf| elementwise in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlx.models import api, cache as cache_lib, convert  # noqa: E402

V, D, F, L, H, K = 128, 64, 96, 2, 4, 2
RTOL = 1e-4


def _hf_model(arch: str, seed: int):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=K, rms_norm_eps=1e-5,
                  initializer_range=0.2, max_position_embeddings=256,
                  attn_implementation="eager")
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, rope_theta=10000.0,
                                       **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        # original_max_position_embeddings=64 puts the head's frequencies in all three
        # bands (kept, interpolated, divided by factor).
        cfg = transformers.LlamaConfig(
            tie_word_embeddings=False, rope_theta=500.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64),
            **common)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def _batch(seed=0, lengths=(9, 5, 1, 7), pad_id=0):
    """Left-padded batch: tokens, mask, positions (cumsum(mask) − 1, pads at 1 as HF)."""
    rng = np.random.default_rng(seed)
    s = max(lengths)
    tokens = np.full((len(lengths), s), pad_id, np.int32)
    mask = np.zeros((len(lengths), s), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, s - n:] = rng.integers(1, V, n)
        mask[i, s - n:] = 1
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1).astype(np.int32)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _assert_close(ours, ref, mask):
    real = mask.astype(bool)
    ours, ref = np.asarray(ours)[real], np.asarray(ref)[real]
    scale = np.abs(ref).max()
    assert scale > 1.0  # logits are not trivially small
    err = np.abs(ours - ref).max() / scale
    assert err < RTOL, f"max relative error {err:.2e}"


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_case(request, tmp_path_factory):
    model = _hf_model(request.param, seed=1 if request.param == "qwen2" else 2)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    tokens, mask, positions = _batch()
    return request.param, model, str(folder), (tokens, mask, positions), _hf_logits(
        model, tokens, mask, positions)


def test_import_reads_architecture_features(hf_case):
    arch, _, folder, _, _ = hf_case
    config, _, params = convert.load_hf(folder)
    paths = api.param_paths(params)
    if arch == "qwen2":
        assert config.qkv_bias and config.tie_embeddings and config.rope_scaling is None
        assert "trunk/layers/1/attn/v_proj/bias" in paths and "lm_head/kernel" not in paths
    else:
        assert not config.qkv_bias and not config.tie_embeddings
        assert config.rope_scaling.factor == 8.0
        assert config.rope_scaling.original_max_position_embeddings == 64
        assert "lm_head/kernel" in paths and not any(p.endswith("bias") for p in paths)


def test_logits_match_transformers_on_left_padded_batch(hf_case):
    _, _, folder, (tokens, mask, positions), ref = hf_case
    config, graphdef, params = convert.load_hf(folder)
    ours = api.logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
                      jnp.asarray(mask))
    _assert_close(ours, ref, mask)


def test_kv_cache_decode_matches_full_forward_position_by_position(hf_case):
    """Prefill the first 4 slots, then decode one token per step; every real position's
    logits equal transformers' full forward."""
    _, _, folder, (tokens, mask, positions), ref = hf_case
    config, graphdef, params = convert.load_hf(folder)
    b, s = tokens.shape
    step = jax.jit(lambda p, t, pos, m, c, slot: api.forward_with_cache(
        graphdef, p, t, pos, m, c, slot))
    cache = cache_lib.init_cache(config, b, s)
    prefill = 4
    logits, cache = api.forward_with_cache(
        graphdef, params, jnp.asarray(tokens[:, :prefill]),
        jnp.asarray(positions[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(prefill, s):
        logits, cache = step(params, jnp.asarray(tokens[:, t:t + 1]),
                             jnp.asarray(positions[:, t:t + 1]),
                             jnp.asarray(mask[:, t:t + 1]), cache, t)
        pieces.append(np.asarray(logits))
    _assert_close(np.concatenate(pieces, axis=1), ref, mask)


def test_export_loads_in_transformers_with_same_logits(hf_case, tmp_path):
    arch, _, folder, (tokens, mask, positions), ref = hf_case
    config, _, params = convert.load_hf(folder)
    convert.save_hf(tmp_path / "out", config, params)
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["architectures"] == [
        "Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", dtype=torch.float32)
    assert type(reloaded).__name__ == hf_cfg["architectures"][0]
    assert reloaded.config.tie_word_embeddings == config.tie_embeddings
    np.testing.assert_allclose(_hf_logits(reloaded.eval(), tokens, mask, positions)[
        mask.astype(bool)], ref[mask.astype(bool)], rtol=0, atol=1e-5)


def test_sharded_export_round_trips_through_transformers_and_rlx(hf_case, tmp_path):
    _, _, folder, (tokens, mask, positions), ref = hf_case
    config, graphdef, params = convert.load_hf(folder)
    out = tmp_path / "sharded"
    names = convert.save_hf(out, config, params, shard_size="40KB")
    assert len(names) > 2
    index = json.loads((out / convert.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(names)
    assert not os.path.exists(out / convert.SINGLE_FILE)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32).eval()
    _assert_close(_hf_logits(reloaded, tokens, mask, positions), ref, mask)
    config2, graphdef2, params2 = convert.load_hf(out)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_transformers_sharded_checkpoint_imports(hf_case, tmp_path):
    _, model, _, (tokens, mask, positions), ref = hf_case
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / convert.INDEX_FILE).exists()
    _, graphdef, params = convert.load_hf(tmp_path)
    _assert_close(api.logits(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(mask)), ref, mask)

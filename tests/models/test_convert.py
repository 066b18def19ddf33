"""Checkpoint conversion without transformers: config mapping, file layout, clear errors."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlx.models import api, convert
from rlx.models.config import PRESETS, ModelConfig, RopeScaling
from rlx.models.convert import CheckpointError

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                  num_heads=2, num_kv_heads=1, qkv_bias=True, tie_embeddings=False,
                  rope_theta=1000.0, rms_norm_eps=1e-5, max_position_embeddings=128)

# Abridged from the published config.json files (transformers 4 layout).
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 128256}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936}


@pytest.fixture(scope="module")
def model():
    graphdef, params = api.init(CFG, seed=3)
    return graphdef, params


@pytest.fixture
def hf_dir(tmp_path, model):
    folder = tmp_path / "hf"
    convert.save_hf(folder, CFG, model[1])
    return folder


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------------ configs


def test_published_configs_map_to_presets():
    assert convert.config_from_hf(LLAMA32_1B) == PRESETS["llama3.2-1b"]
    assert convert.config_from_hf(QWEN25_05B) == PRESETS["qwen2.5-0.5b"]


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-7b", "llama3.1-8b", "llama3.2-1b"])
def test_config_round_trips_through_hf_dict(name):
    config = PRESETS[name]
    hf = json.loads(json.dumps(convert.config_to_hf(config)))
    assert convert.config_from_hf(hf) == config
    # transformers 5 layout only (rope_parameters) reads the same.
    hf5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    assert convert.config_from_hf(hf5) == config


def test_config_to_hf_picks_architecture_from_bias():
    assert convert.config_to_hf(CFG)["architectures"] == ["Qwen2ForCausalLM"]
    llama = convert.config_to_hf(CFG.replace(qkv_bias=False))
    assert llama["architectures"] == ["LlamaForCausalLM"] and not llama["attention_bias"]
    with pytest.raises(CheckpointError, match="qkv_bias=True cannot be exported"):
        convert.config_to_hf(CFG, architecture="LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="always has q/k/v bias"):
        convert.config_to_hf(CFG.replace(qkv_bias=False), architecture="Qwen2ForCausalLM")
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        convert.config_to_hf(CFG, architecture="GPT2LMHeadModel")


def test_llama3_rope_defaults_original_max_positions_to_max_positions():
    hf = dict(LLAMA32_1B, rope_scaling={"type": "llama3", "factor": 8.0},
              max_position_embeddings=4096)
    assert convert.config_from_hf(hf).rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=4096)


@pytest.mark.parametrize("change, match", [
    (dict(architectures=["MistralForCausalLM"]), "unsupported architecture.*Mistral"),
    (dict(architectures=None, model_type="gpt2"), "unsupported architecture 'gpt2'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=5), "num_kv_heads"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_config_from_hf_rejects_unsupported_features(change, match):
    hf = {k: v for k, v in {**LLAMA32_1B, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        convert.config_from_hf(hf)


def test_config_from_hf_rejects_qwen_sliding_window():
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        convert.config_from_hf(dict(QWEN25_05B, use_sliding_window=True))


# ------------------------------------------------------------------------ HF folders


def test_save_then_load_hf_restores_params(hf_dir, model):
    files = sorted(p.name for p in hf_dir.iterdir())
    assert files == ["config.json", "model.safetensors"]
    tensors = load_file(hf_dir / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (16, 24)  # [out, in]
    assert tensors["lm_head.weight"].shape == (32, 16)
    flat = convert.flatten_params(model[1])
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.weight"],
                                  np.asarray(flat["trunk/layers/1/mlp/down_proj/kernel"]).T)
    config, graphdef, params = convert.load_hf(hf_dir)
    assert config == CFG
    _same(params, model[1])


def test_tied_checkpoint_has_no_lm_head_and_accepts_a_duplicate(tmp_path):
    cfg = CFG.replace(tie_embeddings=True)
    _, params = api.init(cfg, seed=1)
    convert.save_hf(tmp_path, cfg, params)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    _same(convert.load_hf(tmp_path)[2], params)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs"):
        convert.load_hf(tmp_path)


def test_bfloat16_export_and_load_dtypes(tmp_path, model):
    convert.save_hf(tmp_path, CFG, model[1], dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    config, graphdef, params = convert.load_hf(tmp_path, dtype="bfloat16",
                                               overrides={"dtype": "bfloat16"})
    assert config.param_dtype == config.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), model[1])
    _same(params, expected)
    config32, _, params32 = convert.load_hf(tmp_path)
    assert {str(x.dtype) for x in jax.tree.leaves(params32)} == {"float32"}


def test_load_hf_reports_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert.load_hf(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        convert.load_hf(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        convert.load_hf(tmp_path / "empty")


def test_load_hf_refuses_pickled_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never loaded"):
        convert.load_hf(hf_dir)


def test_load_hf_unsupported_architecture(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        convert.load_hf(hf_dir)


def test_load_hf_names_tensor_and_both_shapes_on_mismatch(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 15), np.float32)
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor "
                       r"'model.layers.1.self_attn.k_proj.weight' has shape \(8, 15\), "
                       r"expected \(8, 16\)"):
        convert.load_hf(hf_dir)


def test_load_hf_lists_missing_and_unexpected_tensors(hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.norm.weight"], tensors["model.layers.0.self_attn.q_proj.bias"]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.0.self_attn"
                       r".q_proj.bias', 'model.norm.weight'\]"):
        convert.load_hf(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    tensors.update({"model.norm.weight": np.ones(16, np.float32),
                    "model.layers.0.self_attn.q_proj.bias": np.ones(16, np.float32),
                    "model.layers.2.mlp.up_proj.weight": np.ones((24, 16), np.float32),
                    "score.weight": np.ones((1, 16), np.float32)})
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.2.mlp"
                       r".up_proj.weight', 'score.weight'\]"):
        convert.load_hf(hf_dir)


def test_sharded_save_writes_index_and_loads(tmp_path, model):
    names = convert.save_hf(tmp_path, CFG, model[1], shard_size="3KB")
    index = json.loads((tmp_path / convert.INDEX_FILE).read_text())
    assert len(names) > 3 and sorted(set(index["weight_map"].values())) == sorted(names)
    shards = [load_file(tmp_path / n) for n in names]
    sizes = [sum(t.nbytes for t in shard.values()) for shard in shards]
    assert index["metadata"]["total_size"] == sum(sizes)
    assert all(size <= 3000 or len(shard) == 1 for size, shard in zip(sizes, shards))
    _same(convert.load_hf(tmp_path)[2], model[1])
    (tmp_path / names[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{names[-1]}'.*not found"):
        convert.load_hf(tmp_path)


def test_save_hf_refuses_non_empty_output_unless_overwrite(hf_dir, model):
    with pytest.raises(CheckpointError, match="not empty"):
        convert.save_hf(hf_dir, CFG, model[1])
    convert.save_hf(hf_dir, CFG, model[1], overwrite=True, shard_size="3KB")
    assert not (hf_dir / "model.safetensors").exists()  # stale single file removed
    _same(convert.load_hf(hf_dir)[2], model[1])


def test_save_hf_rejects_params_of_another_config(tmp_path, model):
    with pytest.raises(CheckpointError, match="trunk/embed/embedding.*shape"):
        convert.save_hf(tmp_path, CFG.replace(vocab_size=40), model[1])


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("5GB", 5 * 10**9),
                                            ("200MB", 2 * 10**8), ("2KiB", 2048)])
def test_parse_size(size, expected):
    assert convert.parse_size(size) == expected


@pytest.mark.parametrize("size", ["big", "0", -1])
def test_parse_size_rejects_bad_values(size):
    with pytest.raises(CheckpointError, match="shard_size"):
        convert.parse_size(size)


# ------------------------------------------------------------------------ rlx folders


@pytest.mark.parametrize("kind", ["policy", "value"])
def test_rlx_folder_round_trips_any_kind(tmp_path, kind):
    cfg = CFG.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64))
    _, params = api.init(cfg, kind=kind, seed=2)
    convert.save_rlx(tmp_path, cfg, params, kind=kind)
    keys = set(load_file(tmp_path / convert.RLX_PARAMS_FILE))
    assert keys == set(api.param_paths(params))
    config, graphdef, loaded = convert.load_rlx(tmp_path)
    assert config == cfg
    _same(loaded, params)
    if kind == "value":
        tokens = np.zeros((1, 3), np.int32)
        assert api.values(graphdef, loaded, tokens).shape == (1, 3)


def test_load_rlx_explains_a_hugging_face_folder(hf_dir):
    with pytest.raises(CheckpointError, match="looks like a Hugging Face folder"):
        convert.load_rlx(hf_dir)


def test_unflatten_reports_missing_and_shape(model):
    flat = convert.flatten_params(model[1])
    with pytest.raises(CheckpointError, match=r"missing parameters \['trunk/final_norm"):
        convert.unflatten_params(CFG, {k: v for k, v in flat.items()
                                       if k != "trunk/final_norm/scale"})
    bad = dict(flat, **{"trunk/final_norm/scale": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"'trunk/final_norm/scale' has shape \(3,\)"):
        convert.unflatten_params(CFG, bad)


# ------------------------------------------------------------------------ clear import errors


def _one_line_naming(err, *parts):
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    for part in parts:
        assert part in message, (part, message)


@pytest.fixture
def sharded_dir(tmp_path, model):
    folder = tmp_path / "sharded"
    names = convert.save_hf(folder, CFG, model[1], shard_size="3KB")
    return folder, names


def test_truncated_shard_names_file_and_cut_tensor(sharded_dir):
    folder, names = sharded_dir
    path = folder / names[1]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(folder)
    index = json.loads((folder / convert.INDEX_FILE).read_text())["weight_map"]
    assert err.value.path == str(path) and index[err.value.tensor] == names[1]
    _one_line_naming(err, names[1], "truncated", repr(err.value.tensor), "re-download")


def test_truncated_single_file_names_the_tensor(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(hf_dir)
    assert err.value.tensor is not None
    _one_line_naming(err, "model.safetensors", "truncated", repr(err.value.tensor))
    path.write_bytes(data[:5])
    with pytest.raises(convert.ShardError, match="too short for a safetensors header"):
        convert.load_hf(hf_dir)


@pytest.mark.parametrize("corrupt", [
    lambda d: d[:8] + b"{not json" + d[17:],
    lambda d: (10**12).to_bytes(8, "little") + d[8:],
    lambda d: b"\x00" * len(d),
])
def test_corrupt_header_is_a_one_line_shard_error(sharded_dir, corrupt):
    folder, names = sharded_dir
    path = folder / names[0]
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(folder)
    assert err.value.path == str(path)
    first = json.loads((folder / convert.INDEX_FILE).read_text())["weight_map"]
    assert first[err.value.tensor] == names[0]
    _one_line_naming(err, names[0], f"it should hold {err.value.tensor!r}")


def test_stale_index_naming_a_missing_shard(sharded_dir):
    folder, names = sharded_dir
    index_path = folder / convert.INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(folder)
    assert err.value.tensor == "model.norm.weight"
    _one_line_naming(err, convert.INDEX_FILE, "'model-00099-of-00099.safetensors'",
                     "'model.norm.weight'", "not found")


def test_stale_index_naming_the_wrong_shard(sharded_dir):
    folder, names = sharded_dir
    index_path = folder / convert.INDEX_FILE
    index = json.loads(index_path.read_text())
    real = index["weight_map"]["model.norm.weight"]
    wrong = next(n for n in names if n != real)
    index["weight_map"]["model.norm.weight"] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(folder)
    assert (err.value.tensor, err.value.path) == ("model.norm.weight", str(folder / wrong))
    _one_line_naming(err, f"listed in shard {wrong!r}", "does not contain it",
                     f"it is in {real!r}", "stale")
    index["weight_map"]["model.norm.weight"] = "../model.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="expected a file name in the folder"):
        convert.load_hf(folder)


def test_missing_tensor_names_the_file(hf_dir, sharded_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(hf_dir)
    assert err.value.tensor == "model.layers.1.mlp.up_proj.weight"
    _one_line_naming(err, "model.safetensors: missing tensors",
                     "'model.layers.1.mlp.up_proj.weight'")
    folder, _ = sharded_dir
    index_path = folder / convert.INDEX_FILE
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(convert.ShardError) as err:
        convert.load_hf(folder)
    _one_line_naming(err, f"{convert.INDEX_FILE}: missing tensors ['model.norm.weight']")


def test_corrupt_rlx_params_file_is_a_shard_error(tmp_path, model):
    convert.save_rlx(tmp_path, CFG, model[1])
    path = tmp_path / convert.RLX_PARAMS_FILE
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(convert.ShardError) as err:
        convert.load_rlx(tmp_path)
    _one_line_naming(err, convert.RLX_PARAMS_FILE, "truncated")


# ------------------------------------------------------------------------ export ids


class _Tok:
    """A minimal rlx Tokenizer with chosen ids (no files)."""

    @staticmethod
    def make(*, vocab=32, bos=1, eos=2, pad=0, stop=None):
        from rlx.data.tokenizer import Tokenizer

        class T(Tokenizer):
            vocab_size, bos_id, eos_id, pad_id = vocab, bos, eos, pad
            stop_ids = tuple(stop) if stop is not None else (eos,)

            def _encode(self, text):
                return [3] * len(text)

            def decode(self, ids, *, skip_special=True):
                return ""

        return T()


def test_save_hf_writes_token_ids_and_generation_config(tmp_path, model):
    tok = _Tok.make(bos=None, eos=5, pad=4, stop=(5, 6))
    convert.save_hf(tmp_path, CFG, model[1], tokenizer=tok,
                    generation={"temperature": 0.7})
    cfg = json.loads((tmp_path / "config.json").read_text())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (None, [5, 6], 4)
    assert gen == {"bos_token_id": None, "eos_token_id": [5, 6], "pad_token_id": 4,
                   "temperature": 0.7}
    convert.save_hf(tmp_path, CFG, model[1], tokenizer=_Tok.make(), overwrite=True,
                    generation={"eos_token_id": [2, 9]}, extra_config={"pad_token_id": 3})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, [2, 9], 3)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [2, 9]
    _same(convert.load_hf(tmp_path)[2], model[1])


def test_save_hf_rejects_a_tokenizer_of_another_model(tmp_path, model):
    with pytest.raises(CheckpointError, match="tokenizer has 40 tokens but the model's "
                       "vocab_size is 32"):
        convert.save_hf(tmp_path, CFG, model[1], tokenizer=_Tok.make(vocab=40))
    with pytest.raises(CheckpointError, match=r"eos_token_id=\[2, 32\]"):
        convert.save_hf(tmp_path, CFG, model[1], generation={"eos_token_id": [2, 32]})
    with pytest.raises(CheckpointError, match="tokenizer=.*no tokenizer.json"):
        convert.save_hf(tmp_path, CFG, model[1], tokenizer=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written before the checks


def test_save_hf_copies_sentencepiece_and_hf_tokenizer_files(tmp_path, model):
    from rlx.data.tokenizer import load_tokenizer, train_sentencepiece

    sp = train_sentencepiece(["ab ba abc cab"] * 10, vocab_size=20)
    assert sp.vocab_size <= CFG.vocab_size
    convert.save_hf(tmp_path / "sp", CFG, model[1], tokenizer=sp)
    back = load_tokenizer(tmp_path / "sp")
    assert back.encode("abc cab") == sp.encode("abc cab") and back.stop_ids == (3,)
    cfg = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 3, 0)
    assert convert.has_tokenizer(tmp_path / "sp") and not convert.has_tokenizer(tmp_path)

    from tokenizers import Tokenizer, models

    src = tmp_path / "src"
    (src / convert.CHAT_TEMPLATE_DIR).mkdir(parents=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "a": 4}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "x"}))
    (src / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 3], "top_p": 0.9}))
    (src / convert.CHAT_TEMPLATE_DIR / "tool_use.jinja").write_text("t")
    out = tmp_path / "out"
    convert.save_hf(out, CFG, model[1], tokenizer=str(src))
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "generation_config.json", convert.CHAT_TEMPLATE_DIR])
    assert json.loads((out / "generation_config.json").read_text()) == {
        "eos_token_id": [2, 3], "top_p": 0.9, "bos_token_id": 1, "pad_token_id": 2}
    (out / "special_tokens_map.json").write_text("{}")  # stale: removed on overwrite
    convert.save_hf(out, CFG, model[1], tokenizer=load_tokenizer(src), overwrite=True)
    assert not (out / "special_tokens_map.json").exists()
    assert load_tokenizer(out).stop_ids == (2, 3)


# ------------------------------------------------------------------ sharded loading
_SHARDED_SCRIPT = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from rlx import sharding as sh
from rlx.models import api, convert
from rlx.models.config import ModelConfig

folder, tied_folder = sys.argv[1], sys.argv[2]
reads = []
original = convert._get_block
def spy(handle, path, name, index):
    block = original(handle, path, name, index)
    reads.append((name, block.size))
    return block
convert._get_block = spy

cfg, _, full = convert.load_hf(folder, dtype="float32")
sizes = {s.hf_name: int(np.prod(s.shape)) for s in convert.tensor_specs(cfg)}
out = {}
for shape in [(1, 4, 2), (2, 2, 2), (1, 8, 1)]:
    mesh = sh.make_mesh(shape)
    reads.clear()
    cfg2, _, params = convert.load_hf(folder, mesh=mesh)
    want = jax.tree.leaves(sh.param_shardings(params, mesh))
    full_leaves, leaves = jax.tree.leaves(full), jax.tree.leaves(params)
    ok_values = all(np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(full_leaves, leaves))
    ok_shards = all(np.array_equal(np.asarray(s.data), np.asarray(a)[s.index])
                    for a, b in zip(full_leaves, leaves) for s in b.addressable_shards)
    ok_specs = all(b.sharding == w for b, w in zip(leaves, want))
    # every tensor whose spec splits it was only ever read in blocks smaller than itself
    split = {spec.hf_name for spec in convert.tensor_specs(cfg)
             if any(sh._axis_size(mesh, ax) > 1
                    for ax in sh.spec_for(spec.path, spec.shape, mesh))}
    whole = sorted({n for n, size in reads if n in split and size >= sizes[n]})
    out[str(shape)] = dict(values=ok_values, shards=ok_shards, specs=ok_specs,
                           split=len(split), whole_reads=whole, config=cfg2 == cfg,
                           reads=len(reads))
try:
    convert.load_hf(tied_folder, mesh=sh.make_mesh((1, 4, 2)))
    out["tied"] = "loaded"
except convert.CheckpointError as e:
    out["tied"] = str(e)
print(json.dumps(out))
'''


def test_load_hf_with_a_mesh_reads_each_device_slice_straight_into_its_shard(tmp_path, model):
    """8 simulated devices, three meshes: the sharded load equals the plain one leaf by
    leaf and shard by shard, every leaf has the partition rules' sharding, and a tensor
    the rules split is never read whole (the callback reads blocks with get_slice)."""
    import subprocess
    import sys

    folder = tmp_path / "hf"
    convert.save_hf(folder, CFG, model[1], dtype="bfloat16", shard_size="8KB")
    assert (folder / convert.INDEX_FILE).exists()
    tied_cfg = CFG.replace(tie_embeddings=True)
    _, tied = api.init(tied_cfg, seed=1)
    tied_folder = tmp_path / "tied"
    convert.save_hf(tied_folder, tied_cfg, tied)
    flat = load_file(str(tied_folder / convert.SINGLE_FILE))
    flat["lm_head.weight"] = flat["model.embed_tokens.weight"] + 1.0   # a differing head
    save_file(flat, str(tied_folder / convert.SINGLE_FILE))
    script = tmp_path / "load.py"
    script.write_text(_SHARDED_SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script), str(folder), str(tied_folder)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for mesh in ["(1, 4, 2)", "(2, 2, 2)", "(1, 8, 1)"]:
        got = out[mesh]
        assert got["values"] and got["shards"] and got["specs"] and got["config"], (mesh, got)
        assert got["split"] > 10 and got["whole_reads"] == [], (mesh, got)
    assert "lm_head.weight" in out["tied"] and "differs" in out["tied"]

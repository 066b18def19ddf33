"""An export a user can serve: transformers loads it, resolves the ids, stops at eos.

For a Qwen2-style folder (no bos, eos <|im_end|>, pad <|endoftext|>, generation eos
[<|im_end|>, <|endoftext|>]) and a Llama-3-style one (bos, eos <|end_of_text|>, generation
eos [<|end_of_text|>, <|eot_id|>]), built in-process by ``tests/data/hf_folders.py``, a
tiny rlx model is exported with its tokenizer. Its weights are set so that greedy decoding
is known: attention and MLP outputs are zero, so the logits depend on the last token only,
and the head maps the prompt's last token a -> an ordinary token b -> the *second* stop id
(not the tokenizer's eos). ``model.generate`` must therefore return exactly [b, stop]
after the prompt, which it can only do by reading generation_config.json's eos list.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from hf_folders import llama3_folder, qwen2_folder  # noqa: E402

from rlx.data.tokenizer import load_tokenizer  # noqa: E402
from rlx.models import api, convert  # noqa: E402
from rlx.models.config import ModelConfig  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 12 + 7?"}]


def _model(vocab: int, qkv_bias: bool, a: int, b: int, stop: int, seed=0):
    """(config, params) whose greedy continuation of '... a' is 'b stop'."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, qkv_bias=qkv_bias, tie_embeddings=False,
                      rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256)
    _, params = api.init(cfg, seed=seed)
    flat = {k: np.array(v) for k, v in convert.flatten_params(params).items()}
    rng = np.random.default_rng(seed)
    embed = rng.normal(size=(vocab, cfg.hidden_size)).astype(np.float32)
    flat["trunk/embed/embedding"] = embed
    for name in flat:
        if name.endswith(("o_proj/kernel", "down_proj/kernel")):
            flat[name] = np.zeros_like(flat[name])
    flat["trunk/final_norm/scale"] = np.ones(cfg.hidden_size, np.float32)
    unit = embed / np.sqrt(np.mean(embed ** 2, axis=1, keepdims=True) + cfg.rms_norm_eps)
    head = np.zeros((cfg.hidden_size, vocab), np.float32)
    head[:, b] = unit[a]
    head[:, stop] = unit[b]
    flat["lm_head/kernel"] = head
    return cfg, convert.unflatten_params(cfg, flat)[1]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def export(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build = {"qwen2": qwen2_folder, "llama3": llama3_folder}[request.param]
    folder = build(root / "tokenizer")
    tok = load_tokenizer(folder.path)
    prompt = tok.encode(tok.apply_chat_template(MESSAGES), add_bos=None)
    b = tok.encode("19")[0]
    stop = tok.stop_ids[1]
    assert stop != tok.eos_id and b not in tok.stop_ids and b != prompt[-1]
    vocab = -(-tok.vocab_size // 64) * 64  # a model vocabulary padded past the tokenizer's
    cfg, params = _model(vocab, request.param == "qwen2", prompt[-1], b, stop)
    out = root / "export"
    convert.save_hf(out, cfg, params, tokenizer=folder.path)
    return request.param, folder, tok, str(out), prompt, b, stop


def test_transformers_resolves_the_checkpoints_ids(export):
    name, folder, tok, out, *_ = export
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    gen = model.generation_config
    assert model.config.bos_token_id == tok.bos_id
    assert gen.eos_token_id == list(tok.stop_ids)
    assert model.config.pad_token_id == gen.pad_token_id == tok.pad_id is not None
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    if name == "llama3":
        assert model.config.eos_token_id == [folder.ids["<|end_of_text|>"],
                                             folder.ids["<|eot_id|>"]]
        assert gen.bos_token_id == folder.ids["<|begin_of_text|>"]
        assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)  # kept
        assert tok.pad_id == tok.eos_id  # Llama ships no pad token: eos pads
    else:
        assert model.config.bos_token_id is None
        assert tok.pad_id == hf_tok.pad_token_id == folder.ids["<|endoftext|>"]
    assert hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) \
        == tok.apply_chat_template(MESSAGES)


def test_generate_stops_at_the_checkpoints_eos(export):
    _, _, tok, out, prompt, b, stop = export
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        done = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=8)
        # Told to stop on the tokenizer's eos only, it runs past the second stop id.
        runs_on = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, eos_token_id=tok.eos_id)
    assert done[0, len(prompt):].tolist() == [b, stop]
    assert runs_on[0, len(prompt):len(prompt) + 2].tolist() == [b, stop]
    assert runs_on.shape[1] == len(prompt) + 8


def test_cli_style_round_trip_keeps_tokenizer_and_ids(export, tmp_path):
    """hf-to-rlx (load_hf, save_rlx, copy_tokenizer_files) then rlx-to-hf (load_rlx,
    save_hf(tokenizer=rlx folder)) gives the same config ids and generation config."""
    _, _, tok, out, *_ = export
    config, _, params = convert.load_hf(out)
    rlx_dir = tmp_path / "rlx"
    convert.save_rlx(rlx_dir, config, params)
    convert.copy_tokenizer_files(out, rlx_dir)
    assert convert.has_tokenizer(rlx_dir)
    config, _, params = convert.load_rlx(rlx_dir)
    again = tmp_path / "hf"
    convert.save_hf(again, config, params, tokenizer=rlx_dir)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_text() == (Path(out) / name).read_text()
    first, second = (json.loads((Path(p) / "config.json").read_text()) for p in (out, again))
    assert {k: second[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {k: first[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert load_tokenizer(again).stop_ids == tok.stop_ids

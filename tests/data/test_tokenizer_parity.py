"""rlx's HFTokenizer against transformers.AutoTokenizer on the same tiny folders.

Two folders built in-process (``hf_folders``): a Qwen2-style byte-level BPE (no bos,
ChatML template with a default system prompt) and a Llama-3-style one (bos from the
post-processor, a template writing ``{{ bos_token }}``, several eos ids in
generation_config.json). Compared: special ids, plain encodings (bos rule), decoding,
rendered chat prompts and their token ids, and the stop ids.
"""

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from hf_folders import llama3_folder, qwen2_folder  # noqa: E402

from rlx.data.templates import chat_prompt, render_prompt  # noqa: E402
from rlx.data.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402
from rlx.tasks import Problem  # noqa: E402

TEXTS = ["What is 12 + 7?", "", " leading space", "Ünïcödé 🙂 and\n\nnewlines  ",
         "<|im_end|> in the middle <|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "Answer with a number."},
     {"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3? é "}],
]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def pair(request, tmp_path_factory):
    build = {"qwen2": qwen2_folder, "llama3": llama3_folder}[request.param]
    folder = build(tmp_path_factory.mktemp(request.param))
    return (request.param, folder, load_tokenizer(folder.path),
            transformers.AutoTokenizer.from_pretrained(folder.path))


def test_special_ids_match(pair):
    name, folder, ours, hf = pair
    assert isinstance(ours, HFTokenizer)
    assert ours.vocab_size == len(hf) == folder.vocab_size
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    if name == "qwen2":
        assert ours.bos_id is None and not ours.add_bos_token
        assert ours.pad_id == hf.pad_token_id == folder.ids["<|endoftext|>"]
    else:
        assert ours.add_bos_token and ours.bos_id == folder.ids["<|begin_of_text|>"]
        assert hf.pad_token_id is None and ours.pad_id == ours.eos_id  # documented fallback


@pytest.mark.parametrize("text", TEXTS)
def test_plain_encoding_follows_the_checkpoints_bos_rule(pair, text):
    _, _, ours, hf = pair
    expected = hf(text)["input_ids"]
    assert ours.encode(text, add_bos=None) == expected
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    ids, mask = ours.batch_encode([text, "x"], padding_side="left")
    assert ids[0][mask[0]].tolist() == expected
    assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=True)
    assert ours.decode(expected, skip_special=False) == hf.decode(expected)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompts_and_their_ids_match(pair, messages, add_generation_prompt):
    _, _, ours, hf = pair
    expected = hf.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    assert text == expected
    hf_ids = hf.apply_chat_template(messages, tokenize=True,
                                    add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ours.apply_chat_template(messages, tokenize=True,
                                    add_generation_prompt=add_generation_prompt) == hf_ids
    # What the training loop feeds the sampler: one bos at most (Llama writes it itself).
    assert ours.encode(text, add_bos=None) == hf_ids
    assert hf_ids.count(ours.bos_id) == (ours.bos_id is not None)


def test_tools_reach_the_template_as_transformers_passes_them(pair):
    name, _, ours, hf = pair
    if name != "qwen2":
        pytest.skip("only the Qwen2-style template reads tools")
    tools = [{"type": "function", "function": {"name": "add", "description": "a + b"}}]
    msgs = CONVERSATIONS[0]
    assert ours.apply_chat_template(msgs, tools=tools) == hf.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "# Tools" in ours.apply_chat_template(msgs, tools=tools)
    assert "# Tools" not in ours.apply_chat_template(msgs)  # tools=None is passed


def test_chat_prompt_and_render_prompt_use_the_checkpoint_template(pair):
    _, _, ours, hf = pair
    msgs = CONVERSATIONS[1]
    expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_prompt(ours, "What is 12 + 7?", system="Answer with a number.") == expected
    assert chat_prompt(hf, "What is 12 + 7?", system="Answer with a number.") == expected
    problem = Problem("What is 12 + 7?", "19", {})
    assert render_prompt(problem, tokenizer=ours, system="Answer with a number.") == expected
    multi = CONVERSATIONS[2]
    assert chat_prompt(ours, multi[1:], system="Be brief.") == hf.apply_chat_template(
        multi, tokenize=False, add_generation_prompt=True)


def test_stop_ids_match_the_generation_config(pair):
    name, folder, ours, _ = pair
    gen = transformers.GenerationConfig.from_pretrained(folder.path)
    assert list(ours.stop_ids) == gen.eos_token_id
    if name == "llama3":
        assert ours.stop_ids == (folder.ids["<|end_of_text|>"], folder.ids["<|eot_id|>"])
        assert ours.eos_id == folder.ids["<|end_of_text|>"]
    else:
        assert ours.stop_ids == (folder.ids["<|im_end|>"], folder.ids["<|endoftext|>"])

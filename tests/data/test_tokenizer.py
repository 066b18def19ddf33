"""Tokenizer interface and both backends, built in-process (no downloads)."""

import json
import random

import numpy as np
import pytest

from rlx.data import tokenizer as tok_lib
from rlx.data.tokenizer import (HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                train_sentencepiece)


def _corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [f"What is {rng.randint(0, 999)} + {rng.randint(0, 999)}? "
            f"<answer>{rng.randint(0, 2000)}</answer> the sum is correct" for _ in range(n)]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "arith"
    return train_sentencepiece(_corpus(), vocab_size=200, model_prefix=prefix,
                               user_defined_symbols=["<answer>", "</answer>",
                                                     *tok_lib.CHAT_MARKERS])


# ------------------------------------------------------------------------ SentencePiece


def test_sentencepiece_special_ids_exist_and_are_distinct(sp):
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (0, 2, 3)
    assert len({sp.pad_id, sp.bos_id, sp.eos_id}) == 3
    assert 10 < sp.vocab_size <= 200


def test_sentencepiece_splits_every_digit(sp):
    pieces = [sp.id_to_piece(i) for i in sp.encode("12345 + 67890")]
    digits = [p.lstrip("▁") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("1234567890")


def test_sentencepiece_user_symbols_are_single_tokens(sp):
    pieces = [sp.id_to_piece(i) for i in sp.encode("<answer>42</answer>")]
    assert [p for p in pieces if p != "▁"] == ["<answer>", "4", "2", "</answer>"]
    assert len(sp.encode("<|assistant|>")) <= 2  # "▁" may precede the marker


def test_sentencepiece_round_trips_text_and_handles_special_ids(sp):
    text = "What is 12 + 7? <answer>19</answer>"
    ids = sp.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    assert sp.decode(ids) == text
    assert sp.decode(ids + [sp.pad_id, sp.pad_id]) == text
    shown = sp.decode(ids, skip_special=False)
    assert shown.startswith("<s>") and shown.endswith("</s>") and text in shown
    assert sp.decode(np.asarray(ids, np.int32)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sp.decode([sp.vocab_size])


def test_sentencepiece_saved_model_reloads_identically(sp, tmp_path):
    reloaded = load_tokenizer(sp.model_path)
    assert isinstance(reloaded, SentencePieceTokenizer)
    text = "What is 5 + 6? <answer>11</answer>"
    assert reloaded.encode(text) == sp.encode(text)
    (tmp_path / "tokenizer.model").write_bytes(sp.model_proto)
    assert load_tokenizer(tmp_path).encode(text) == sp.encode(text)


def test_sentencepiece_training_is_reproducible_and_accepts_a_file(tmp_path):
    corpus = _corpus(100, seed=3)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus) + "\n")
    a = train_sentencepiece(corpus, vocab_size=100, model_type="unigram")
    b = train_sentencepiece(path, vocab_size=100, model_type="unigram")
    pieces = lambda t: [t.id_to_piece(i) for i in range(t.vocab_size)]  # noqa: E731
    assert pieces(a) == pieces(b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=3), "vocab_size"),
    (dict(vocab_size=100, model_type="word"), "model_type"),
])
def test_sentencepiece_training_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_sentencepiece(_corpus(10), **kwargs)


def test_sentencepiece_training_rejects_empty_or_missing_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["", "  "], vocab_size=50)
    with pytest.raises(ValueError, match="not a file"):
        train_sentencepiece(str(tmp_path / "nope.txt"), vocab_size=50)


# ------------------------------------------------------------------------ batch encoding


def test_batch_encode_left_and_right_padding(sp):
    texts = ["1 + 1", "What is 123 + 456?", "7"]
    rows = [sp.encode(t, add_bos=True) for t in texts]
    for side in ("left", "right"):
        ids, mask = sp.batch_encode(texts, padding_side=side, add_bos=True)
        assert ids.dtype == np.int32 and mask.dtype == bool
        assert ids.shape == mask.shape == (3, max(map(len, rows)))
        for i, row in enumerate(rows):
            assert mask[i].sum() == len(row)
            assert list(ids[i][mask[i]]) == row
            assert np.all(ids[i][~mask[i]] == sp.pad_id)
            real = np.flatnonzero(mask[i])
            assert real[-1 if side == "left" else 0] == (ids.shape[1] - 1 if side == "left"
                                                         else 0)
            assert np.all(np.diff(real) == 1)  # contiguous
    assert sp.decode_batch(ids, mask) == texts


def test_batch_encode_truncation_and_width_rounding(sp):
    texts = ["What is 123 + 456?", "1"]
    full = sp.encode(texts[0], add_bos=True)  # batch_encode's default: bos by the rule
    ids, mask = sp.batch_encode(texts, max_length=4, padding_side="right")
    assert ids.shape == (2, 4) and list(ids[0]) == full[:4]
    ids, _ = sp.batch_encode(texts, max_length=4, truncation_side="left")
    assert list(ids[0]) == full[-4:]
    ids, mask = sp.batch_encode(texts, pad_to_multiple_of=8)
    assert ids.shape[1] % 8 == 0 and ids.shape[1] >= len(full)
    ids, mask = sp.batch_encode(["1"], max_length=6, pad_to_max_length=True)
    assert ids.shape == (1, 6) and mask.sum() == len(sp.encode("1")) + 1
    ids, mask = sp.batch_encode([""], add_bos=False)
    assert ids.shape == (1, 1) and not mask.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(texts=[]), "non-empty"),
    (dict(texts="abc"), "non-empty"),
    (dict(texts=["a"], padding_side="middle"), "padding_side"),
    (dict(texts=["a"], max_length=0), "max_length"),
    (dict(texts=["a"], pad_to_multiple_of=0), "pad_to_multiple_of"),
    (dict(texts=["a"], pad_to_max_length=True), "needs max_length"),
])
def test_batch_encode_rejects_bad_arguments(sp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.batch_encode(**kwargs)


def test_default_chat_template_renders_roles_and_generation_prompt(sp):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = sp.apply_chat_template(msgs)
    assert text == "<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n"
    assert not sp.apply_chat_template(msgs, add_generation_prompt=False).endswith(
        "<|assistant|>\n")
    with pytest.raises(ValueError, match="role"):
        sp.apply_chat_template([{"role": "robot", "content": "x"}])


# ------------------------------------------------------------------------ HF tokenizer.json


@pytest.fixture
def hf_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for word in "what is the sum of one two three 1 2 3 4 5 6 7 8 9 0 + ? =".split():
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    # A post-processor that would add <s> ... </s>: rlx must bypass it.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>",
        "chat_template": template}))
    return tmp_path, vocab


def test_hf_tokenizer_encodes_without_implicit_specials(hf_folder):
    folder, vocab = hf_folder
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(vocab)
    ids = tok.encode("what is 12 + 3 ?")
    assert ids == [vocab[w] for w in "what is 1 2 + 3 ?".split()]
    assert tok.encode("what is", add_bos=True, add_eos=True) == [1, vocab["what"],
                                                                 vocab["is"], 2]
    assert tok.decode([1] + ids + [2, 0]) == "what is 1 2 + 3 ?"
    assert "<s>" in tok.decode([1] + ids, skip_special=False)


def test_hf_tokenizer_batch_encode_and_chat_template(hf_folder):
    folder, vocab = hf_folder
    tok = HFTokenizer(folder / "tokenizer.json")
    ids, mask = tok.batch_encode(["one", "the sum of 12"], padding_side="left",
                                 add_bos=False)
    assert ids.shape == (2, 5) and list(mask[0]) == [False] * 4 + [True]
    assert ids[0, 0] == tok.pad_id and ids[0, -1] == vocab["one"]
    # The post-processor inserts <s>: the default (add_bos=None) follows it.
    assert tok.add_bos_token
    ids, mask = tok.batch_encode(["one", "the sum of 12"], padding_side="left")
    assert ids.shape == (2, 6) and list(ids[0, -2:]) == [tok.bos_id, vocab["one"]]
    text = tok.apply_chat_template([{"role": "user", "content": "1 + 1 ?"}])
    assert text == "[user] 1 + 1 ?</s>[assistant] "
    plain = HFTokenizer(folder / "tokenizer.json", chat_template=None)
    assert plain.chat_template is not None  # from tokenizer_config.json


def test_hf_tokenizer_falls_back_to_eos_pad_and_default_template(hf_folder):
    folder, _ = hf_folder
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = load_tokenizer(folder / "tokenizer.json")
    assert tok.bos_id is None and tok.pad_id == tok.eos_id == 2
    with pytest.raises(ValueError, match="no bos"):
        tok.encode("one", add_bos=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|user|>\nhi\n<|assistant|>\n"


def test_hf_tokenizer_rejects_unknown_special_token(hf_folder):
    folder, _ = hf_folder
    with pytest.raises(ValueError, match="eos_token='<eos>'"):
        HFTokenizer(folder, eos_token="<eos>")


def test_load_tokenizer_reports_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "x.model")


def test_jinja_templates_get_transformers_helpers():
    pytest.importorskip("jinja2")
    template = ("{{ strftime_now('%Y') }}|{{ messages[0]['content'] | tojson }}"
                "{% if messages | length > 1 %}{{ raise_exception('one message only') }}"
                "{% endif %}")
    text = tok_lib.render_jinja_chat_template(template, [{"role": "user", "content": "é"}])
    year, content = text.split("|")
    assert year.isdigit() and len(year) == 4 and content == '"é"'
    with pytest.raises(ValueError, match="chat template: one message only"):
        tok_lib.render_jinja_chat_template(template, [{"role": "user", "content": "a"}] * 2)


# ------------------------------------------------------------------------ bos rule


def test_sentencepiece_bos_rule_applies_only_when_asked_for(sp):
    text = "What is 5 + 6?"
    plain = sp.encode(text)
    assert sp.add_bos_token and plain[0] != sp.bos_id
    assert sp.encode(text, add_bos=None) == [sp.bos_id] + plain
    assert sp.encode(text, add_bos=True) == [sp.bos_id] + plain
    ids, mask = sp.batch_encode([text])
    assert list(ids[0][mask[0]]) == [sp.bos_id] + plain
    with pytest.raises(ValueError, match="add_bos='yes'"):
        sp.encode(text, add_bos="yes")


def test_bos_rule_never_doubles_a_bos_the_text_already_has(hf_folder):
    folder, vocab = hf_folder
    tok = load_tokenizer(folder)
    assert tok.encode("<s> one", add_bos=None) == [1, vocab["one"]]
    assert tok.encode("one", add_bos=None) == [1, vocab["one"]]
    assert tok.encode("<s> one", add_bos=True) == [1, 1, vocab["one"]]  # explicit: as asked


@pytest.mark.parametrize("config_flag, post_processor, expected", [
    (None, True, True), (None, False, False), (False, True, False), (True, False, True)])
def test_config_add_bos_token_overrides_the_post_processor(hf_folder, config_flag,
                                                           post_processor, expected):
    from tokenizers import Tokenizer

    folder, vocab = hf_folder
    if not post_processor:
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        raw.post_processor = None
        raw.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if config_flag is not None:
        config["add_bos_token"] = config_flag
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.add_bos_token is expected
    assert tok.encode("one", add_bos=None) == [1] * expected + [vocab["one"]]
    assert HFTokenizer(folder, add_bos_token=not expected).add_bos_token is not expected


def test_tokenizer_without_bos_never_adds_one(hf_folder):
    folder, vocab = hf_folder
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    config["add_bos_token"] = True  # asks for a token it does not have
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.bos_id is None and not tok.add_bos_token
    assert tok.encode("one", add_bos=None) == [vocab["one"]]
    ids, _ = tok.batch_encode(["one"])
    assert list(ids[0]) == [vocab["one"]]
    with pytest.raises(ValueError, match="no bos token"):
        tok.batch_encode(["one"], add_bos=True)


def test_tokenizer_json_padding_and_truncation_are_switched_off(hf_folder):
    from tokenizers import Tokenizer

    folder, vocab = hf_folder
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.enable_padding(length=8, pad_id=0, pad_token="<pad>")
    raw.enable_truncation(max_length=2)
    raw.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    assert tok.encode("one two three") == [vocab["one"], vocab["two"], vocab["three"]]


# ------------------------------------------------------------------------ stop ids


def test_stop_ids_come_from_generation_config(hf_folder):
    folder, vocab = hf_folder
    assert load_tokenizer(folder).stop_ids == (2,)  # no generation_config.json: eos
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [vocab["?"], 2, vocab["?"]]}))
    assert load_tokenizer(folder).stop_ids == (vocab["?"], 2)
    gen.write_text(json.dumps({"eos_token_id": vocab["="]}))
    assert load_tokenizer(folder).stop_ids == (vocab["="],)
    gen.write_text(json.dumps({"temperature": 0.7}))
    assert load_tokenizer(folder).stop_ids == (2,)


@pytest.mark.parametrize("value, match", [
    ("</s>", "eos_token_id='</s>': expected an int or a list"),
    ([2, 1.5], r"eos_token_id=\[2, 1.5\]: expected an int or a list"),
    ([2, 10_000], r"eos_token_id \[10000\] outside the vocabulary"),
])
def test_bad_generation_config_eos_is_named(hf_folder, value, match):
    folder, _ = hf_folder
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(ValueError, match=f"generation_config.json: {match}"):
        load_tokenizer(folder)
    (folder / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json: invalid JSON"):
        load_tokenizer(folder)


def test_sentencepiece_stop_ids(sp, tmp_path):
    assert sp.stop_ids == (sp.eos_id,)
    (tmp_path / "tokenizer.model").write_bytes(sp.model_proto)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5]}))
    assert load_tokenizer(tmp_path).stop_ids == (3, 5)
    assert SentencePieceTokenizer(sp.model_proto).stop_ids == (3,)


# ------------------------------------------------------------------------ chat templates


CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c {{ x }} é"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_template_in_jinja_matches_the_python_one(messages, add_generation_prompt):
    pytest.importorskip("jinja2")
    assert tok_lib.render_jinja_chat_template(
        tok_lib.DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=add_generation_prompt
    ) == tok_lib.default_chat_template(messages, add_generation_prompt=add_generation_prompt)
    with pytest.raises(ValueError, match="role tool is not"):
        tok_lib.render_jinja_chat_template(tok_lib.DEFAULT_CHAT_TEMPLATE,
                                           [{"role": "tool", "content": "x"}])


def test_sentencepiece_chat_template_takes_the_transformers_call(sp):
    msgs = CONVERSATIONS[2]
    text = sp.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == tok_lib.default_chat_template(msgs)
    assert text.count("<|user|>") == 2 and text.startswith("<|system|>\nS\n")
    ids = sp.apply_chat_template(msgs, tokenize=True)
    assert ids == sp.encode(text) and ids[0] != sp.bos_id  # no specials added
    with pytest.raises(ValueError, match="no tool support"):
        sp.apply_chat_template(msgs, tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="list of"):
        sp.apply_chat_template("hi")


def test_jinja_rendering_passes_transformers_variables():
    pytest.importorskip("jinja2")
    template = ("{{ tools is none }}|{{ documents is none }}|{{ bos_token is defined }}|"
                "{{ eos_token }}|{{ messages[0] | length }}|{{ flag }}|"
                "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}")
    text = tok_lib.render_jinja_chat_template(
        template, [{"role": "user", "content": "hi", "tool_calls": None}],
        eos_token="</s>", flag=np.int32(3))
    assert text == "True|True|False|</s>|2|3|hi"
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] is a object"):
        tok_lib.render_jinja_chat_template(template, [{"role": "user", "content": object()}])
    with pytest.raises(ValueError, match="does not parse"):
        tok_lib.render_jinja_chat_template("{% if %}", [])


def test_hf_template_sources_and_named_templates(hf_folder):
    folder, _ = hf_folder
    msgs = [{"role": "user", "content": "one"}]
    (folder / "chat_template.jinja").write_text("file:{{ messages[0]['content'] }}")
    assert load_tokenizer(folder).apply_chat_template(msgs) == "file:one"
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "plain:{{ bos_token }}{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "tools:{{ tools | tojson }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.apply_chat_template(msgs) == "plain:<s>one"
    assert tok.apply_chat_template(msgs, tools=[{"name": "ä"}]) == 'tools:[{"name": "ä"}]'
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode("plain:<s>one")

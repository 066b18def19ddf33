"""Prompt templates and the duck-typed chat-template path."""

import pytest

from rlx.data.templates import PromptTemplate, chat_messages, chat_prompt, has_chat_template, render_prompt
from rlx.tasks import Problem


class FakeChatTokenizer:
    """Mimics a Hugging Face tokenizer's apply_chat_template(tokenize=False)."""

    chat_template = "fake"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, *, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class PlainTokenizer:
    def encode(self, text):
        return list(text.encode())


def test_template_renders_named_fields_and_ignores_extras():
    t = PromptTemplate("Q: {prompt}\nLevel {level:>2}:")
    assert t.fields == ("prompt", "level")
    assert t.render({"prompt": "2+2", "level": 3, "unused": 0}) == "Q: 2+2\nLevel  3:"
    assert t.render(prompt="x", level="a") == "Q: x\nLevel  a:"


def test_missing_field_is_named():
    with pytest.raises(ValueError, match="needs field 'level'"):
        PromptTemplate("{prompt} {level}").render(prompt="x")


@pytest.mark.parametrize("template", ["{}", "{0}", "{prompt.__class__}", "{x[0]}", "{x:{y}}", "{unclosed", 3])
def test_unsafe_or_invalid_templates_are_rejected(template):
    with pytest.raises(ValueError, match="template"):
        PromptTemplate(template)


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = FakeChatTokenizer()
    out = chat_prompt(tok, "2+2=", system="Be brief.")
    assert out == "<|system|>Be brief.<|end|><|user|>2+2=<|end|><|assistant|>"
    assert tok.calls[0][1:] == (False, True)


def test_tokenizer_without_chat_template_uses_the_fallback():
    assert not has_chat_template(PlainTokenizer())
    assert chat_prompt(PlainTokenizer(), "2+2=", system="ignored") == "2+2="
    assert chat_prompt(PlainTokenizer(), "2+2=", fallback=PromptTemplate("Q: {prompt} A:")) == "Q: 2+2= A:"
    hf_without_template = FakeChatTokenizer()
    hf_without_template.chat_template = None
    assert not has_chat_template(hf_without_template)


def test_message_lists_pass_through_and_are_validated():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    assert chat_messages(msgs, system="s")[0] == {"role": "system", "content": "s"}
    assert chat_prompt(FakeChatTokenizer(), msgs).count("<|user|>") == 2
    with pytest.raises(ValueError, match="message 0 needs string 'role'"):
        chat_messages([{"content": "x"}])
    with pytest.raises(ValueError, match="apply_chat_template"):
        chat_prompt(PlainTokenizer(), msgs)


def test_non_string_chat_template_output_is_an_error():
    class Tokenizing(FakeChatTokenizer):
        def apply_chat_template(self, messages, **kw):
            return [1, 2, 3]

    with pytest.raises(ValueError, match="returned list, expected str"):
        chat_prompt(Tokenizing(), "x")


def test_render_prompt_fills_from_problem_fields_and_meta():
    p = Problem("12+7=", "19", {"task": "arithmetic"})
    assert render_prompt(p) == "12+7="
    assert render_prompt(p, template="[{task}] {prompt}") == "[arithmetic] 12+7="
    assert render_prompt({"prompt": "hi"}, template="> {prompt}") == "> hi"
    tok = FakeChatTokenizer()
    assert render_prompt(p, tokenizer=tok, system="S") == "<|system|>S<|end|><|user|>12+7=<|end|><|assistant|>"
    assert render_prompt(p, tokenizer=tok, use_chat_template=False) == "12+7="


def test_chat_prompt_works_with_rlx_tokenizers(tmp_path):
    """The call chat_prompt makes (tokenize=False) is accepted by rlx's own tokenizers."""
    from rlx.data.tokenizer import CHAT_MARKERS, train_sentencepiece

    sp = train_sentencepiece(["What is 1 + 2? 3", "Be brief. 12+7= 19"] * 20, vocab_size=60,
                             user_defined_symbols=list(CHAT_MARKERS))
    assert has_chat_template(sp)
    assert chat_prompt(sp, "12+7=", system="Be brief.") == (
        "<|system|>\nBe brief.\n<|user|>\n12+7=\n<|assistant|>\n")
    turns = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
             {"role": "user", "content": "12+7="}]
    assert chat_prompt(sp, turns) == "<|user|>\n1+2=\n<|assistant|>\n3\n<|user|>\n12+7=\n<|assistant|>\n"
    p = Problem("12+7=", "19", {})
    assert render_prompt(p, tokenizer=sp, template="Q: {prompt}") == "<|user|>\nQ: 12+7=\n<|assistant|>\n"

    pytest.importorskip("tokenizers")
    from hf_folders import qwen2_folder

    from rlx.data.tokenizer import load_tokenizer

    qwen = load_tokenizer(qwen2_folder(tmp_path).path)
    assert chat_prompt(qwen, "12+7=") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n")
    assert chat_prompt(qwen, turns, system="S").startswith("<|im_start|>system\nS<|im_end|>\n")

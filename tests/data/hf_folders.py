"""Tiny Hugging Face tokenizer folders built in-process with ``tokenizers`` (no downloads).

``qwen2_folder(path)``: byte-level BPE, no bos, ChatML template (Qwen2.5-style: a default
system prompt, ``tools`` block), eos ``<|im_end|>``, pad ``<|endoftext|>``,
generation_config eos [<|im_end|>, <|endoftext|>].

``llama3_folder(path)``: byte-level BPE whose post-processor inserts
``<|begin_of_text|>`` (Llama-3), a header-style template that writes ``{{ bos_token }}``,
eos ``<|end_of_text|>`` and generation_config eos [<|end_of_text|>, <|eot_id|>] (so
``stop_ids`` differ from the tokenizer's eos).

Both return ``Folder(path, vocab_size, ids)`` with ``ids`` the special-token ids by text.
Not a test module: imported by tests under tests/data and tests/models.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

CORPUS = [
    "What is 12 + 7? The answer is 19.",
    "Sort the list 3 1 2 into 1 2 3, then say done.",
    "You are a helpful assistant. Think step by step and answer briefly.",
    "hello world, hello there; numbers 0 1 2 3 4 5 6 7 8 9 and words like carry.",
    "Ünïcödé text and emoji 🙂 still tokenise byte by byte.",
] * 4

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")


class Folder(NamedTuple):
    path: str
    vocab_size: int
    ids: dict


def _byte_level_bpe(specials, vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _write(path, tok, config, generation):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if generation is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=1)


def qwen2_folder(path, *, generation: bool = True) -> Folder:
    from tokenizers import processors

    tok = _byte_level_bpe(QWEN_SPECIALS)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "chat_template": QWEN_TEMPLATE, "model_max_length": 512,
              "clean_up_tokenization_spaces": False}
    gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"]} if generation else None
    _write(path, tok, config, gen)
    return Folder(os.fspath(path), tok.get_vocab_size(with_added_tokens=True), ids)


def llama3_folder(path, *, generation: bool = True) -> Folder:
    from tokenizers import processors

    tok = _byte_level_bpe(LLAMA_SPECIALS)
    ids = {t: tok.token_to_id(t) for t in LLAMA_SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0",
                                      pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, ids[bos])])])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": "<|end_of_text|>", "chat_template": LLAMA_TEMPLATE,
              "model_max_length": 512, "clean_up_tokenization_spaces": True}
    gen = {"bos_token_id": ids[bos],
           "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]],
           "do_sample": True, "temperature": 0.6, "top_p": 0.9} if generation else None
    _write(path, tok, config, gen)
    return Folder(os.fspath(path), tok.get_vocab_size(with_added_tokens=True), ids)

"""Tokenizers: one small interface, two backends (SentencePiece, Hugging Face tokenizer.json).

``Tokenizer`` fixes the interface the rest of rlx uses:
  encode(text, *, add_bos, add_eos) -> list[int]
  decode(ids, *, skip_special) -> str
  batch_encode(texts, *, padding_side, ...) -> (ids int32 [B, S], mask bool [B, S])
  vocab_size, bos_id, eos_id, pad_id
  apply_chat_template(messages, *, add_generation_prompt) -> str

Backends:
  ``SentencePieceTokenizer``: a SentencePiece ``.model`` (``train_sentencepiece`` trains one
    in memory from a text corpus: the CPU demo and the default experiment use this).
  ``HFTokenizer``: a Hugging Face ``tokenizer.json`` through the optional ``tokenizers``
    package, so real Qwen/Llama checkpoints come with their own tokenizer.
``load_tokenizer(path)`` picks the backend from the file or folder.

Special tokens are never added implicitly: ``encode`` adds bos/eos only when asked
(a tokenizer.json post-processor that would insert them is bypassed), so prompts and
completions concatenate exactly.
"""

from __future__ import annotations

import abc
import datetime
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

Message = Mapping[str, str]

# ----------------------------------------------------------------------------------
# Chat templates. The default template is used by SentencePiece tokenizers and by HF
# tokenizers whose folder ships no template; HF templates (tokenizer_config.json's
# "chat_template" or chat_template.jinja) are rendered with jinja2.
# ----------------------------------------------------------------------------------

DEFAULT_CHAT_TEMPLATE_DOC = """Default chat template (one line per role marker):

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ...

and, with add_generation_prompt, a trailing "<|assistant|>\\n". Train a SentencePiece
model with user_defined_symbols=CHAT_MARKERS to make each marker one token."""

CHAT_ROLES = ("system", "user", "assistant")
CHAT_MARKERS = tuple(f"<|{role}|>" for role in CHAT_ROLES)


def default_chat_template(messages: Sequence[Message], *,
                          add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` with the default template (see DEFAULT_CHAT_TEMPLATE_DOC)."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r}: expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {content!r}")
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def render_jinja_chat_template(template: str, messages: Sequence[Message], *,
                               add_generation_prompt: bool = True, **variables) -> str:
    """Renders a Hugging Face style jinja chat template in a sandbox.

    Variables: ``messages``, ``add_generation_prompt`` and ``variables`` (e.g.
    ``bos_token``, ``eos_token``); ``raise_exception(msg)`` and ``strftime_now(fmt)``
    (Llama 3.2 templates) are available as in transformers, and ``tojson`` keeps
    non-ASCII text.
    """
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with the test extra
        raise ImportError("rendering a Hugging Face chat template needs jinja2 "
                          "(pip install jinja2)") from e

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
        x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)


# ----------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------


class Tokenizer(abc.ABC):
    """Text <-> token ids with bos/eos/pad ids and padded batch encoding."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (including special and added tokens)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the vocabulary has none (Qwen)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id (the sampler stops on it), or None."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id (always defined; backends document their fallback)."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Plain encoding, no special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """ids -> text; ``skip_special`` drops bos/eos/pad (and other control tokens)."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False
               ) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("encode(add_bos=True): this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise ValueError("encode(add_eos=True): this tokenizer has no eos token")
            ids = ids + [self.eos_id]
        return ids

    def batch_encode(self, texts: Sequence[str], *,
                     padding_side: Literal["left", "right"] = "left",
                     max_length: int | None = None, pad_to_multiple_of: int | None = None,
                     pad_to_max_length: bool = False,
                     truncation_side: Literal["left", "right"] = "right",
                     add_bos: bool = False, add_eos: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads a batch.

        Rows longer than ``max_length`` are truncated on ``truncation_side`` ("right"
        keeps the first tokens). The width S is the longest row (or ``max_length`` with
        ``pad_to_max_length``), at least 1, rounded up to ``pad_to_multiple_of``.
        Padding goes on ``padding_side``: "left" for prompts fed to the sampler (all rows
        end at the same slot), "right" for training sequences.

        Returns:
          ids: int32 [B, S], pad_id in the padding; mask: bool [B, S], True on real tokens.
        """
        if isinstance(texts, str) or not len(texts):
            raise ValueError("batch_encode: texts must be a non-empty sequence of strings")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side={truncation_side!r}: expected 'left' or 'right'")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length={max_length!r}: expected a positive int")
        if pad_to_multiple_of is not None and (
                not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}: expected a "
                             "positive int")
        if pad_to_max_length and max_length is None:
            raise ValueError("pad_to_max_length=True needs max_length")
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        if max_length is not None:
            rows = [r[:max_length] if truncation_side == "right" else r[-max_length:]
                    for r in rows]
        width = max(1, max_length if pad_to_max_length else max(map(len, rows)))
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            n = len(row)
            if not n:
                continue
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[i, sl] = row
            mask[i, sl] = True
        return ids, mask

    def decode_batch(self, ids: np.ndarray, mask: np.ndarray | None = None, *,
                     skip_special: bool = True) -> list[str]:
        """Decodes each row of ids [B, S], keeping only positions where ``mask`` is set."""
        ids = np.asarray(ids)
        if mask is None:
            return [self.decode(row, skip_special=skip_special) for row in ids]
        mask = np.asarray(mask, bool)
        return [self.decode(row[m], skip_special=skip_special) for row, m in zip(ids, mask)]

    # --- chat templates -----------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message], *,
                            add_generation_prompt: bool = True) -> str:
        """Formats chat ``messages`` ([{"role", "content"}]) as one prompt string.

        The base class uses ``default_chat_template``; backends with their own template
        (HFTokenizer) override this.
        """
        return default_chat_template(messages, add_generation_prompt=add_generation_prompt)


def _ids_list(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


# ----------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------

SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, from a ``.model`` path or its serialized bytes.

    ``pad_id`` falls back to eos (then unk) for models trained without a pad piece;
    padding is always masked, so the fallback only matters for display.
    """

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        if isinstance(model, (bytes, bytearray)):
            proto = bytes(model)
            self.model_path = None
        else:
            self.model_path = os.fspath(model)
            if not os.path.isfile(self.model_path):
                raise ValueError(f"SentencePiece model {self.model_path!r} does not exist")
            with open(self.model_path, "rb") as f:
                proto = f.read()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model ({self.model_path or 'bytes'}): "
                             f"{e}") from e
        self.model_proto = proto

    @staticmethod
    def _opt(i: int) -> int | None:
        return None if i < 0 else int(i)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int | None:
        return self._opt(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._opt(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        for i in (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()):
            if i >= 0:
                return int(i)
        return 0

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return int(self._sp.piece_to_id(piece))

    def _encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Control pieces (pad/bos/eos) are dropped, or written as their piece text
        ("<s>", "</s>", "<pad>") when ``skip_special=False``."""
        ids = _ids_list(ids)
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside the vocabulary [0, {n})")
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def save(self, path: str | os.PathLike) -> str:
        """Writes the serialized model to ``path`` (a ``.model`` file)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.model_proto)
        return path


def train_sentencepiece(corpus: str | os.PathLike | Iterable[str], *, vocab_size: int,
                        model_prefix: str | os.PathLike | None = None,
                        model_type: Literal["bpe", "unigram"] = "bpe",
                        user_defined_symbols: Sequence[str] = (),
                        split_digits: bool = True, byte_fallback: bool = False,
                        character_coverage: float = 1.0, hard_vocab_limit: bool = False,
                        num_threads: int = 1, extra_options: Mapping[str, object] | None = None
                        ) -> SentencePieceTokenizer:
    """Trains a SentencePiece model in memory.

    Args:
      corpus: a text file path (one sentence per line) or an iterable of strings.
      vocab_size: target size. With ``hard_vocab_limit=False`` (default) it is an upper
        bound, so tiny corpora (the arithmetic demo) train without error; read the real
        size from ``tokenizer.vocab_size``.
      model_prefix: when given, also writes ``{model_prefix}.model``.
      model_type: "bpe" or "unigram".
      user_defined_symbols: strings always kept as one token (e.g. "<answer>",
        ``CHAT_MARKERS``).
      split_digits: every digit is its own token (default on: the tasks are arithmetic,
        and multi-digit pieces make numbers tokenise inconsistently).
      byte_fallback: unknown characters become byte tokens instead of unk (+256 pieces).
      num_threads: 1 keeps training reproducible.
      extra_options: further ``SentencePieceTrainer`` options.

    Ids: pad=0, unk=1, bos=2, eos=3 (``SP_*_ID``).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: expected 'bpe' or 'unigram'")
    if not isinstance(vocab_size, int) or vocab_size < 5 + len(user_defined_symbols):
        raise ValueError(f"vocab_size={vocab_size!r}: must be an int of at least 4 special "
                         f"ids + {len(user_defined_symbols)} user symbols + 1")
    if isinstance(corpus, (str, os.PathLike)):
        path = os.fspath(corpus)
        if not os.path.isfile(path):
            raise ValueError(f"corpus {path!r} is not a file (pass a list for in-memory "
                             "text)")
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        lines = [str(t) for t in corpus]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: the corpus is empty")
    writer = io.BytesIO()
    options = dict(vocab_size=vocab_size, model_type=model_type,
                   user_defined_symbols=list(user_defined_symbols),
                   split_digits=split_digits, byte_fallback=byte_fallback,
                   character_coverage=character_coverage, hard_vocab_limit=hard_vocab_limit,
                   pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
                   num_threads=num_threads, minloglevel=2)
    options.update(extra_options or {})
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer,
                                       **options)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    tokenizer = SentencePieceTokenizer(writer.getvalue())
    if model_prefix is not None:
        tokenizer.model_path = tokenizer.save(f"{os.fspath(model_prefix)}.model")
    return tokenizer


# ----------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ----------------------------------------------------------------------------------


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``) via the ``tokenizers`` package.

    Special tokens come from the arguments, else ``tokenizer_config.json`` /
    ``special_tokens_map.json`` next to tokenizer.json. ``pad_id`` falls back to eos
    (Llama ships no pad token). The chat template comes from the ``chat_template``
    argument, ``tokenizer_config.json`` or ``chat_template.jinja``; without one, the
    default template of ``Tokenizer.apply_chat_template`` is used.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:
            raise ImportError("HFTokenizer needs the optional 'tokenizers' package: "
                              "pip install 'rlx[hf]' (or pip install tokenizers)") from e
        path = os.fspath(path)
        folder, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
            else (os.path.dirname(path), path)
        if not os.path.isfile(file):
            raise ValueError(f"no tokenizer.json at {path!r}")
        try:
            self._tok = _Tok.from_file(file)
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        self.path = file
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg_path = os.path.join(folder, name)
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    config.update(json.load(f))
        self.bos_token = bos_token or _token_text(config.get("bos_token"))
        self.eos_token = eos_token or _token_text(config.get("eos_token"))
        self.pad_token = pad_token or _token_text(config.get("pad_token"))
        self._bos = self._lookup("bos_token", self.bos_token)
        self._eos = self._lookup("eos_token", self.eos_token)
        self._pad = self._lookup("pad_token", self.pad_token)
        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        self.chat_template = template

    def _lookup(self, field: str, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{field}={token!r} is not in the vocabulary of {self.path}")
        return int(i)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        for i in (self._pad, self._eos):
            if i is not None:
                return i
        return 0

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[Message], *,
                            add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            return super().apply_chat_template(messages,
                                               add_generation_prompt=add_generation_prompt)
        return render_jinja_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


# ----------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, **kwargs) -> Tokenizer:
    """Opens a tokenizer by path: a ``tokenizer.json`` (HF), a ``.model`` (SentencePiece),
    or a folder holding either (tokenizer.json preferred, then tokenizer.model, then a
    single ``*.model``). ``kwargs`` go to HFTokenizer."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(path, **kwargs)
        models = sorted(p for p in os.listdir(path) if p.endswith(".model"))
        if "tokenizer.model" in models:
            models = ["tokenizer.model"]
        if len(models) == 1:
            return SentencePieceTokenizer(os.path.join(path, models[0]))
        raise ValueError(f"tokenizer folder {path!r} has no tokenizer.json and "
                         f"{'several' if models else 'no'} .model files {models}")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer path {path!r} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path, **kwargs)
    return SentencePieceTokenizer(path)

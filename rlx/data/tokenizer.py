"""Tokenizers: one small interface, two backends (SentencePiece, Hugging Face tokenizer.json).

``Tokenizer`` fixes the interface the rest of rlx uses:
  encode(text, *, add_bos=False, add_eos=False) -> list[int]
  decode(ids, *, skip_special) -> str
  batch_encode(texts, *, padding_side, ..., add_bos=None) -> (ids int32 [B, S], mask bool [B, S])
  vocab_size, bos_id, eos_id, pad_id
  add_bos_token -> bool         (the checkpoint's rule: do prompts start with bos?)
  stop_ids -> tuple[int, ...]   (the ids generation stops on)
  apply_chat_template(messages, *, add_generation_prompt=True, tokenize=False, tools=None,
                      **template_kwargs) -> str (list[int] with tokenize=True)

Backends:
  ``SentencePieceTokenizer``: a SentencePiece ``.model`` (``train_sentencepiece`` trains one
    in memory from a text corpus: the CPU demo and the default experiment use this).
  ``HFTokenizer``: a Hugging Face ``tokenizer.json`` through the optional ``tokenizers``
    package, so real Qwen/Llama checkpoints come with their own tokenizer.
``load_tokenizer(path)`` picks the backend from the file or folder.

Special tokens:
  * ``add_bos`` takes True, False or None. None applies the tokenizer's own rule
    ``add_bos_token``: SentencePiece models with a bos piece (those rlx trains) yes; HF
    tokenizers as their checkpoint says: an explicit ``add_bos_token`` in
    tokenizer_config.json, else whether tokenizer.json's post-processor inserts the bos
    token (Llama-3 yes, Qwen2 has no bos at all). With None a text that already starts
    with the bos token (a chat template that writes ``{{ bos_token }}``) gets no second
    one. True on a tokenizer without bos raises ValueError.
  * ``encode`` defaults to ``add_bos=False`` so that prompt and completion pieces
    concatenate exactly; ``batch_encode`` (prompts) defaults to None, the rule.
  * eos is only added when asked (``add_eos=True``); a post-processor that would append it
    is bypassed.
  * ``stop_ids``: ``eos_token_id`` (an int or a list, e.g. Llama-3's ``<|eot_id|>`` and
    ``<|end_of_text|>``) of the ``generation_config.json`` next to the tokenizer when there
    is one, else ``(eos_id,)`` (or ``()`` without eos).
"""

from __future__ import annotations

import abc
import datetime
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Message = Mapping[str, Any]
GENERATION_CONFIG_FILE = "generation_config.json"

# ----------------------------------------------------------------------------------
# Chat templates. The default template is used by SentencePiece tokenizers and by HF
# tokenizers whose folder ships no template; HF templates (tokenizer_config.json's
# "chat_template" or chat_template.jinja) are rendered with jinja2.
# ----------------------------------------------------------------------------------

DEFAULT_CHAT_TEMPLATE_DOC = """Default chat template (one line per role marker):

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ...

and, with add_generation_prompt, a trailing "<|assistant|>\\n". No bos or eos is written
(``encode(add_bos=None)`` adds bos by the tokenizer's rule). Train a SentencePiece model
with user_defined_symbols=CHAT_MARKERS to make each marker one token. The same template
as jinja (for a serving stack's chat_template.jinja) is ``DEFAULT_CHAT_TEMPLATE``."""

CHAT_ROLES = ("system", "user", "assistant")
CHAT_MARKERS = tuple(f"<|{role}|>" for role in CHAT_ROLES)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' + message['role'] + ' is not system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def default_chat_template(messages: Sequence[Message], *,
                          add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` with the default template (see DEFAULT_CHAT_TEMPLATE_DOC)."""
    if isinstance(messages, (str, Mapping)):
        raise ValueError("messages must be a list of {'role', 'content'} mappings, got "
                         f"{type(messages).__name__}")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping, got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role={role!r}: expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {content!r}")
        parts.append(f"<|{role}|>\n{content}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made of JSON types only (what a sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):  # subclasses (enums, numpy scalars) back to the base type
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"chat template input {where} is a {type(value).__name__}; only "
                     "JSON-like values (str, numbers, bools, None, lists, dicts) are passed")


def _jinja_environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with the hf and test extras
        raise ImportError("rendering a Hugging Face chat template needs jinja2 "
                          "(pip install jinja2)") from e

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text for
        its assistant-token masks with it): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


_TEMPLATE_CACHE: dict[str, Any] = {}


def render_jinja_chat_template(template: str, messages: Sequence[Message], *,
                               add_generation_prompt: bool = True, tools=None,
                               documents=None, **variables) -> str:
    """Renders a Hugging Face style jinja chat template in a sandbox, as transformers does.

    The template sees ``messages`` (keys whose value is None dropped, as transformers
    does), ``add_generation_prompt``, ``tools`` and ``documents`` (None unless given) and
    ``variables`` (``bos_token``, ``eos_token``, ... and any template keyword such as
    ``enable_thinking``); the helpers ``raise_exception(msg)`` (raises ValueError) and
    ``strftime_now(fmt)``; ``tojson`` keeps non-ASCII text; ``{% generation %}`` blocks
    render their body. Environment: trim_blocks, lstrip_blocks, loop controls.
    """
    if isinstance(messages, (str, Mapping)):
        raise ValueError("messages must be a list of {'role', 'content'} mappings, got "
                         f"{type(messages).__name__}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping, got {message!r}")
        chat.append({k: _plain(v, f"messages[{i}][{k!r}]") for k, v in message.items()
                     if v is not None})
    compiled = _TEMPLATE_CACHE.get(template)
    if compiled is None:
        try:
            compiled = _jinja_environment().from_string(template)
        except Exception as e:  # jinja2.TemplateSyntaxError
            raise ValueError(f"chat template does not parse: {e}") from e
        _TEMPLATE_CACHE[template] = compiled
    return compiled.render(
        messages=chat, add_generation_prompt=bool(add_generation_prompt),
        tools=_plain(tools, "tools"), documents=_plain(documents, "documents"),
        **{k: _plain(v, k) for k, v in variables.items()})


# ----------------------------------------------------------------------------------
# generation_config.json
# ----------------------------------------------------------------------------------


def read_generation_config(folder: str | os.PathLike | None) -> dict | None:
    """``folder/generation_config.json`` as a dict, or None when there is none."""
    if folder is None:
        return None
    path = os.path.join(os.fspath(folder), GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def eos_ids_from(value, *, vocab_size: int, source: str) -> tuple[int, ...]:
    """An ``eos_token_id`` value (int, list of ints or None) as a tuple of distinct ids."""
    if value is None:
        return ()
    values = [value] if _is_int(value) else value
    if not isinstance(values, (list, tuple)) or not all(_is_int(i) for i in values):
        raise ValueError(f"{source}: eos_token_id={value!r}: expected an int or a list of "
                         "ints")
    bad = [int(i) for i in values if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"{source}: eos_token_id {bad} outside the vocabulary "
                         f"[0, {vocab_size})")
    return tuple(dict.fromkeys(int(i) for i in values))


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

    @property
    def add_bos_token(self) -> bool:
        """The tokenizer's own rule for ``add_bos=None``: True when prompts start with bos
        (never True without a bos token). Base rule: whenever there is a bos token."""
        return self.bos_id is not None

    #: generation_config.json next to the tokenizer (None when there is none).
    generation_config: dict | None = None
    _generation_source: str = GENERATION_CONFIG_FILE

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids generation stops on: generation_config.json's ``eos_token_id`` (an int or a
        list) when the folder has one that sets it, else ``(eos_id,)``, else ``()``."""
        ids = eos_ids_from((self.generation_config or {}).get("eos_token_id"),
                           vocab_size=self.vocab_size, source=self._generation_source)
        if ids:
            return ids
        return () if self.eos_id is None else (self.eos_id,)

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Plain encoding, no special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """ids -> text; ``skip_special`` drops bos/eos/pad (and other control tokens)."""

    def encode(self, text: str, *, add_bos: bool | None = False, add_eos: bool = False
               ) -> list[int]:
        """text -> ids. ``add_bos``: True prepends bos (ValueError without one), False
        never, None by ``add_bos_token`` unless the text already starts with bos.
        ``add_eos=True`` appends eos (ValueError without one)."""
        if not isinstance(text, str):
            raise ValueError(f"encode: text must be a str, got {type(text).__name__}")
        if add_bos is not None and not isinstance(add_bos, (bool, np.bool_)):
            raise ValueError(f"add_bos={add_bos!r}: expected True, False or None")
        ids = self._encode(text)
        if add_bos is None:
            add_bos = self.add_bos_token and not (ids and ids[0] == self.bos_id)
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
                     add_bos: bool | None = None, add_eos: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads a batch (``add_bos``/``add_eos`` as in ``encode``; the default
        None follows the tokenizer's bos rule, as prompts need).

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
    #: The jinja chat template (None: this tokenizer has none of its own).
    chat_template: str | None = None

    def apply_chat_template(self, messages: Sequence[Message], *,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            tools: Sequence[Mapping] | None = None,
                            **template_kwargs) -> str | list[int]:
        """Formats chat ``messages`` ([{"role", "content"}, ...], multi-turn, optionally a
        system message first) as one prompt string.

        The call matches transformers' ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True)``, so templating code can take either kind of
        tokenizer. With ``tokenize=True`` the text is encoded with no special tokens added
        (as transformers does: a template that wants bos writes it). The base class uses
        ``default_chat_template`` (no tools; ``template_kwargs`` are ignored); backends
        with their own template (HFTokenizer) override ``_render_chat``.
        """
        text = self._render_chat(messages, add_generation_prompt=add_generation_prompt,
                                 tools=tools, **template_kwargs)
        return self.encode(text, add_bos=False) if tokenize else text

    def _render_chat(self, messages, *, add_generation_prompt, tools, **template_kwargs
                     ) -> str:
        if tools is not None:
            raise ValueError("the default chat template has no tool support (tools=...)")
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
    padding is always masked, so the fallback only matters for display. Prompts start with
    bos when the model has one (``add_bos_token``). SentencePiece models carry no chat
    template: ``apply_chat_template`` uses the default one (``DEFAULT_CHAT_TEMPLATE_DOC``).
    ``stop_ids`` reads a ``generation_config.json`` next to the ``.model`` file.
    """

    chat_template = DEFAULT_CHAT_TEMPLATE

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
        if self.model_path is not None:
            folder = os.path.dirname(os.path.abspath(self.model_path))
            self.generation_config = read_generation_config(folder)
            self._generation_source = os.path.join(folder, GENERATION_CONFIG_FILE)
            _ = self.stop_ids  # validates generation_config.json's eos_token_id now

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


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``) via the ``tokenizers`` package.

    Special tokens come from the arguments, else ``tokenizer_config.json`` /
    ``special_tokens_map.json`` next to tokenizer.json. ``pad_id`` falls back to eos
    (Llama ships no pad token). tokenizer.json's own padding and truncation settings are
    switched off (``batch_encode`` pads).

    ``add_bos_token`` (the rule behind ``add_bos=None``): the constructor argument, else an
    explicit ``add_bos_token`` in tokenizer_config.json (the checkpoint author's statement;
    transformers 4's Llama/Gemma classes honour it, transformers 5 follows the
    post-processor only), else whether tokenizer.json's post-processor inserts the bos token
    (Llama-3: yes). Always False without a bos token (Qwen2).

    ``stop_ids``: ``eos_token_id`` of ``generation_config.json`` in the same folder when it
    sets one, else the eos token.

    Chat template, in transformers' order: the ``chat_template`` argument, else
    ``chat_template.jinja`` (and named templates in ``additional_chat_templates/``), else
    tokenizer_config.json's ``chat_template`` (a string, or a list of {"name", "template"});
    with named templates, "tool_use" is used when ``tools`` are passed and "default"
    otherwise. It is rendered with ``render_jinja_chat_template`` and the special tokens the
    folder defines (``bos_token``, ``eos_token``, ... — only those set, as transformers).
    Without any template the default one of ``Tokenizer`` is used.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool | None = None):
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
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = file
        self.folder = folder
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg_path = os.path.join(folder, name)
            if os.path.isfile(cfg_path):
                try:
                    with open(cfg_path) as f:
                        data = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
                if not isinstance(data, dict):
                    raise ValueError(f"{cfg_path}: expected a JSON object")
                config.update(data)
        self.config = config
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = given.get(name) or _token_text(config.get(name))
            if isinstance(text, str) and text:
                self.special_tokens[name] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self._bos = self._lookup("bos_token", self.bos_token)
        self._eos = self._lookup("eos_token", self.eos_token)
        self._pad = self._lookup("pad_token", self.pad_token)

        if add_bos_token is None and isinstance(config.get("add_bos_token"), bool):
            add_bos_token = config["add_bos_token"]
        if add_bos_token is None:
            add_bos_token = self._post_processor_adds_bos()
        self._add_bos = bool(add_bos_token) and self._bos is not None

        self.chat_templates = self._find_chat_templates(folder, config)
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.chat_template = self.chat_templates.get("default")
        if self.chat_template is None and len(self.chat_templates) == 1:
            self.chat_template = next(iter(self.chat_templates.values()))

        self.generation_config = read_generation_config(folder)
        self._generation_source = os.path.join(folder, GENERATION_CONFIG_FILE)
        _ = self.stop_ids  # validates generation_config.json's eos_token_id now

    @staticmethod
    def _find_chat_templates(folder: str, config: Mapping) -> dict[str, str]:
        templates: dict[str, str] = {}
        jinja_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
        extra_dir = os.path.join(folder, CHAT_TEMPLATE_DIR)
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                templates["default"] = f.read()
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        templates[name[:-len(".jinja")]] = f.read()
        if templates:  # template files take priority over tokenizer_config.json
            return templates
        value = config.get("chat_template")
        if isinstance(value, str):
            templates["default"] = value
        elif isinstance(value, list):
            for entry in value:
                if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                    templates[str(entry.get("name", "default"))] = entry["template"]
        return templates

    def _post_processor_adds_bos(self) -> bool:
        if self._bos is None:
            return False
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        return len(full) > len(plain) and full[0] == self._bos

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

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=skip_special)

    def _render_chat(self, messages, *, add_generation_prompt, tools, **template_kwargs
                     ) -> str:
        template = self.chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        if template is None:
            return super()._render_chat(messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **template_kwargs)
        return render_jinja_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **{**self.special_tokens, **template_kwargs})


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

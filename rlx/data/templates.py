"""Prompt templating: named-field format strings and tokenizer chat templates.

``PromptTemplate("Question: {prompt}\\nAnswer:")`` renders records by field name. Fields
must be plain identifiers: positional fields (``{}``, ``{0}``) and attribute or index
access (``{prompt.__class__}``, ``{x[0]}``) are rejected when the template is built, so a
template from a config file cannot reach into objects. Rendering ignores extra values and
raises ValueError naming a missing field. Format specs and conversions (``{x:>5}``,
``{x!r}``) are allowed.

``chat_prompt(tokenizer, prompt, system=...)`` builds the message list
``[{"role": "system", ...}, {"role": "user", "content": prompt}]`` (or takes a multi-turn
message list as given, adding the system message when it has none) and, when the
tokenizer object has a chat template (checked by duck typing: a callable
``apply_chat_template`` and a ``chat_template`` that is not None), returns
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
i.e. the model's own chat format ending where the assistant's reply starts. rlx's
tokenizers and Hugging Face ``transformers`` tokenizers both take that call: an
``HFTokenizer`` renders its checkpoint's jinja template, a ``SentencePieceTokenizer`` the
documented default template (``rlx.data.tokenizer.DEFAULT_CHAT_TEMPLATE_DOC``).
Tokenizers without a template (an HF folder that ships none, or objects without
``apply_chat_template``) use the ``fallback`` ``PromptTemplate`` (default ``"{prompt}"``,
the system text is then ignored). ``render_prompt`` picks the path from its arguments, so
an experiment can switch between them from gin.

The rendered text is encoded with ``tokenizer.encode(text, add_bos=None)`` /
``batch_encode(texts)`` (the tokenizer's bos rule; a template that writes the bos token
itself does not get a second one).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import gin

_FORMATTER = string.Formatter()


@gin.configurable(module="rlx.data")
class PromptTemplate:
    """A ``str.format`` template over named fields.

    Args:
      template: the format string, e.g. ``"Q: {prompt}\\nA:"``.
    """

    def __init__(self, template: str = "{prompt}"):
        if not isinstance(template, str):
            raise ValueError(f"template must be a string, got {type(template).__name__}")
        try:
            parsed = list(_FORMATTER.parse(template))
        except ValueError as e:
            raise ValueError(f"template {template!r} is not a valid format string: {e}") from None
        fields: list[str] = []
        for _, name, spec, _ in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                raise ValueError(
                    f"template {template!r}: field {{{name}}} must be a plain name "
                    "(no positional fields, attributes or indexing)"
                )
            if spec and "{" in spec:
                raise ValueError(f"template {template!r}: nested fields in format specs are not allowed")
            if name not in fields:
                fields.append(name)
        self.template = template
        self.fields: tuple[str, ...] = tuple(fields)

    def render(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> str:
        """Fills the fields from ``values`` and/or keyword arguments."""
        merged = {**(values or {}), **kwargs}
        missing = [f for f in self.fields if f not in merged]
        if missing:
            raise ValueError(
                f"template {self.template!r} needs field {missing[0]!r}; got {sorted(merged)}"
            )
        return self.template.format(**{f: merged[f] for f in self.fields})

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` has a callable ``apply_chat_template`` (and, for Hugging
    Face tokenizers, a non-empty ``chat_template``)."""
    fn = getattr(tokenizer, "apply_chat_template", None)
    if not callable(fn):
        return False
    return getattr(tokenizer, "chat_template", True) is not None


def chat_messages(
    prompt: str | Sequence[Mapping[str, str]], *, system: str | None = None
) -> list[dict[str, str]]:
    """A user prompt (or an existing message list) as chat messages, system first."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs string 'role' and 'content', got {m!r}")
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def chat_prompt(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    fallback: PromptTemplate | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text through the tokenizer's chat template, or ``fallback``.

    ``template_kwargs`` reach the template as variables (e.g. ``enable_thinking=False``).
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            chat_messages(prompt, system=system), tokenize=False, add_generation_prompt=True,
            **template_kwargs,
        )
        if not isinstance(text, str):
            raise ValueError(
                f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
            )
        return text
    if not isinstance(prompt, str):
        raise ValueError("a message list needs a tokenizer with apply_chat_template")
    return (fallback or PromptTemplate()).render(prompt=prompt)


@gin.configurable(module="rlx.data")
def render_prompt(
    record: Any,
    *,
    template: PromptTemplate | str | None = None,
    tokenizer: Any = None,
    use_chat_template: bool = True,
    system: str | None = None,
) -> str:
    """The model input for ``record`` (a ``Problem``/``PreferencePair``-like object with
    ``.prompt`` and ``.meta``, or a mapping).

    The template (default ``"{prompt}"``) is filled from the record's fields (``prompt``,
    ``answer`` when present, and ``meta``); then, if ``use_chat_template`` and the
    tokenizer has a chat template, the result is wrapped as the user message of
    ``chat_prompt``.
    """
    if isinstance(template, str) or template is None:
        template = PromptTemplate(template or "{prompt}")
    if isinstance(record, Mapping):
        values = dict(record)
    else:
        values = dict(getattr(record, "meta", {}) or {})
        for name in ("prompt", "answer"):
            if hasattr(record, name):
                values[name] = getattr(record, name)
    text = template.render(values)
    if use_chat_template and tokenizer is not None and has_chat_template(tokenizer):
        return chat_prompt(tokenizer, text, system=system)
    return text

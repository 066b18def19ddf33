"""One owner per setting: gin bindings a recipe would ignore are refused up front.

gin lets a caller's explicit argument win over a binding without a word, so a recipe
that passes ``learning_rate=exp.rl_lr`` to ``rlx.train.optimizer`` would silently drop
``rlx.train.optimizer.learning_rate = ...``. The rule rlx follows instead: every
setting has one owner. Where a recipe sets a parameter of a configurable itself (or,
in the chosen mode, builds that object another way), the parameter belongs to the
recipe's own setting, and a binding of it is an error raised before anything is built,
naming the setting to use. Configurables of an alternative the run did not select
(another objective preset, another task class) keep their bindings unused, as gin
does; ``operative_config.gin`` in the run directory lists what was used.

``Owned(configurable, parameters, owner)`` states one such fact; ``check`` raises a
single ValueError listing every bound parameter that some rule owns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import gin
import gin.config as gin_config


@dataclasses.dataclass(frozen=True)
class Owned:
    """``parameters`` of the gin ``configurable`` (None: all of them) are set by the
    recipe; ``owner`` says by what (the setting to bind instead, or why)."""

    configurable: Any
    parameters: tuple[str, ...] | None
    owner: str


def selector(configurable) -> str | None:
    """gin's complete selector of a registered configurable (None if unregistered)."""
    found = gin_config._inverse_lookup(configurable)
    return None if found is None else found.selector


def bound(configurable) -> dict[str, list[str]]:
    """Bound parameter -> the binding keys ``"scope/selector.param"`` that bind it, over
    every scope of the current gin configuration."""
    name = selector(configurable)
    out: dict[str, list[str]] = {}
    if name is None:
        return out
    config = getattr(gin_config, "_CONFIG", None)
    if config is None:      # gin without the private table: unscoped bindings only
        config = {("", name): gin.get_bindings(configurable, resolve_references=False)}
    for (scope, sel), params in config.items():
        if sel != name:
            continue
        for param in params:
            out.setdefault(param, []).append(f"{scope + '/' if scope else ''}{sel}.{param}")
    return out


def violations(rules: Iterable[Owned]) -> list[str]:
    """One line per bound parameter that a rule owns."""
    lines = []
    for rule in rules:
        for param, keys in sorted(bound(rule.configurable).items()):
            if rule.parameters is None or param in rule.parameters:
                lines.extend(f"{key} is set by the recipe: {rule.owner}" for key in keys)
    return lines


def check(rules: Iterable[Owned], extra: Iterable[str] = ()) -> None:
    """Raises one ValueError listing every violation of ``rules`` (and the ``extra``
    messages of value-level checks); returns None when there is none."""
    lines = list(extra) + violations(rules)
    if lines:
        raise ValueError("settings that would be ignored (each setting has one owner):\n  "
                         + "\n  ".join(lines))

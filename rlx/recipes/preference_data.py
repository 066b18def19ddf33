"""Synthetic preference pairs from a verifiable task (the RLHF and DPO recipes' data).

For each problem the *chosen* response is the task's correct demonstration and the
*rejected* one a plausible wrong answer made by corrupting it — a number moved by a
small amount (``offset``), two adjacent digits of a number swapped (``digit_swap``),
two numbers exchanged (``number_swap``: a wrong order for sorting, a wrong expression
for Countdown), or a broken format (``format``: a digit dropped or the answer
repeated). Every pair is checked with the task's own verifier (``task.reward_spec()``:
first component ≥ 0.5 for chosen, < 0.5 for rejected), so a corruption that happens to
still be correct is never used. Batching and the training loops are engine code
(``rlx.train.preference``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from rlx.data.records import PreferencePair

CORRUPTIONS = ("offset", "digit_swap", "number_swap", "format")
_NUMBER = re.compile(r"\d+")


def corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    """One corruption of ``text`` (see the module docstring), or None if it has no
    number to corrupt in that way."""
    spans = [m.span() for m in _NUMBER.finditer(text)]
    if kind == "offset":
        if not spans:
            return None
        a, b = rng.choice(spans)
        value, delta = int(text[a:b]), rng.choice((1, 2, 3))
        value = value - delta if value >= delta and rng.random() < 0.5 else value + delta
        return text[:a] + str(value) + text[b:]
    if kind == "digit_swap":
        options = [(a + i) for a, b in spans for i in range(b - a - 1)
                   if text[a + i] != text[a + i + 1]]
        if not options:
            return None
        i = rng.choice(options)
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if kind == "number_swap":
        pairs = [(s, t) for j, s in enumerate(spans) for t in spans[j + 1:]
                 if text[s[0]:s[1]] != text[t[0]:t[1]]]
        if not pairs:
            return None
        (a, b), (c, d) = rng.choice(pairs)
        return text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
    if kind == "format":
        if not spans:
            return None
        a, b = rng.choice(spans)
        if b - a > 1 and rng.random() < 0.5:
            i = rng.randrange(a, b)
            return text[:i] + text[i + 1:]
        return text + text[a:b]
    raise ValueError(f"corruption kind {kind!r}: expected one of {CORRUPTIONS}")


def _correct(spec, completion: str, problem) -> bool:
    try:
        return bool(spec.score(completion, problem)[1][0] >= 0.5)
    except Exception:  # noqa: BLE001 - a verifier error means "not verified correct"
        return False


def make_preference_pairs(task, problems: Sequence[Any], *, rng: random.Random,
                          pairs_per_problem: int = 1,
                          corruptions: Sequence[str] = CORRUPTIONS,
                          tries: int = 8) -> list[PreferencePair]:
    """Synthetic (prompt, chosen = correct demonstration, rejected = wrong answer) pairs.

    Args:
      task: has ``demonstration(problem, rng)`` and ``reward_spec()`` (an
        ``rlx.tasks.Task`` or the experiment's user-data adapter); the chosen response
        is drawn like an SFT demonstration, in the style the policy was taught.
      problems: the problems to make pairs from (one split only, to keep held-out
        pairs held out).
      rng: ``random.Random``; the same seed gives the same pairs.
      pairs_per_problem: distinct rejected responses per problem (fewer when a problem
        has fewer distinct verified-wrong corruptions within ``tries`` draws each).
      corruptions: kinds drawn uniformly (subset of ``CORRUPTIONS``).

    A problem whose demonstration the verifier rejects (bad data, or a sloppy teacher's
    slip) is skipped; the pair's ``meta`` records the corruption kind and the problem.
    """
    bad = [k for k in corruptions if k not in CORRUPTIONS]
    if bad or not corruptions:
        raise ValueError(f"corruptions={tuple(corruptions)!r}: expected a non-empty subset "
                         f"of {CORRUPTIONS}")
    if pairs_per_problem < 1:
        raise ValueError(f"pairs_per_problem must be >= 1, got {pairs_per_problem!r}")
    spec = task.reward_spec()
    out: list[PreferencePair] = []
    for q in problems:
        chosen = task.demonstration(q, rng)
        if not _correct(spec, chosen, q):
            continue
        seen: set[str] = set()
        for _ in range(pairs_per_problem):
            for _ in range(tries):
                kind = rng.choice(tuple(corruptions))
                rejected = corrupt(chosen, kind, rng)
                if rejected and rejected not in seen and rejected != chosen \
                        and not _correct(spec, rejected, q):
                    seen.add(rejected)
                    out.append(PreferencePair(q.prompt, chosen, rejected,
                                              {"corruption": kind, "problem": q}))
                    break
    return out

"""Final-answer extraction and bounded number parsing for model completions.

Everything here is linear-time in the input and bounded in the size of the numbers it
builds, so it is safe on adversarial output (megabyte strings, 100000-digit numbers).
Only ASCII digits count as digits (``re.ASCII``): Arabic-Indic, full-width and other
Unicode digits are not numbers here, so such answers score 0 (a deliberate, documented
strictness: the reference answers are ASCII).
"""

from __future__ import annotations

import re
from fractions import Fraction

#: numbers with more digits than this are rejected (not parsed).
MAX_DIGITS = 400
#: decimal exponents larger in magnitude than this are rejected.
MAX_EXPONENT = 400

_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", re.ASCII)
_RATIO = re.compile(r"([+-]?\d+)\s*/\s*(\d+)", re.ASCII)
_LATEX_FRAC = re.compile(r"(-?)\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}", re.ASCII)
_EXP = re.compile(r"[eE]([+-]?\d+)$", re.ASCII)
_LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?", re.ASCII)
_ANSWER_MARK = re.compile(r"(?:answer\s*(?:is|:)|####)[ \t]*", re.ASCII | re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE = re.compile(r"[{}]")
_WRAPPERS = ("$", "\\(", "\\)", "\\[", "\\]", "**")


def _digits_ok(text: str) -> bool:
    return sum(ch.isdigit() for ch in text) <= MAX_DIGITS


def parse_number(text: str | None) -> Fraction | None:
    """Parses ``text`` as an exact rational, or returns None.

    Accepts integers, decimals (``-3.25``, ``.5``), scientific notation (``1.5e3``),
    thousands separators (``1,234``), ratios (``3/4``) and ``\\frac{3}{4}``, surrounded
    by optional ``$``/``\\(``/``**`` wrappers and a trailing period. Rejects anything
    with more than ``MAX_DIGITS`` digits or an exponent beyond ``MAX_EXPONENT``.
    """
    if text is None:
        return None
    s = text.strip()
    if len(s) > 4 * MAX_DIGITS or not s:
        return None
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if s.startswith(w) or s.endswith(w):
                s = s.removeprefix(w).removesuffix(w).strip()
                changed = True
    s = s.removesuffix(".").strip()
    if not s or not _digits_ok(s):
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        m = _EXP.search(s)
        if m and abs(int(m.group(1))) > MAX_EXPONENT:
            return None
        return Fraction(s)
    m = _RATIO.fullmatch(s)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den else None
    m = _LATEX_FRAC.fullmatch(s)
    if m:
        den = int(m.group(3))
        if not den:
            return None
        value = Fraction(int(m.group(2)), den)
        return -value if m.group(1) else value
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces allowed.

    Returns None when there is none or its braces never close (only the last four
    ``\\boxed`` are tried, which keeps the scan linear). ``\\boxed 5`` (no braces)
    yields the following whitespace-delimited token.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts[-4:]):  # bounded retries keep this linear
        i = start
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for m in _BRACE.finditer(text, i):
                depth += 1 if m.group() == "{" else -1
                if depth == 0:
                    return text[i + 1 : m.start()].strip()
            continue  # unbalanced: try an earlier \boxed
        token = text[i:].split(None, 1)
        if token and i > start:
            return token[0].rstrip("$.")
    return None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``; else the rest of the line
    after the last ``answer:`` / ``answer is`` / ``####``; else (if ``last_number``) the
    last number. None if nothing is found."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        rest = text[marks[-1].end() :].split("\n", 1)[0].strip()
        if rest:
            return rest.rstrip(".").strip() or rest
    if not last_number:
        return None
    last = None
    for last in _LAST_NUMBER.finditer(text):
        pass
    return last.group() if last is not None else None


def numbers_equal(a: Fraction, b: Fraction, *, rel_tol: float, abs_tol: float) -> bool:
    """Exact equality, or ``|a - b| <= max(rel_tol·max(|a|, |b|), abs_tol)`` (computed
    exactly with rationals, so huge values never overflow)."""
    if a == b:
        return True
    diff = abs(a - b)
    return diff <= max(Fraction(rel_tol) * max(abs(a), abs(b)), Fraction(abs_tol))

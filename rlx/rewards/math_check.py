"""Math answer checking: extract the final answer, compare numerically or symbolically.

``math_answer(completion, problem)`` scores 1.0 when the completion's final answer
equals ``problem.answer``:

1. The answer is extracted by ``rlx.rewards.extract.extract_answer`` (last
   ``\\boxed{...}`` with nested braces, else text after the last ``answer:`` / ``answer
   is`` / ``####``, else the last number). No answer scores 0. The reference answer is
   parsed the same way when it is not a bare number (``"#### 72"``, ``"\\boxed{72}"``),
   except that it never falls back to its last number (``"\\frac{1}{\\sqrt{2}}"`` stays
   whole).
2. If both parse as numbers (``parse_number``: decimals, ``3/4``, ``\\frac{3}{4}``,
   ``1,234``) they are compared exactly as rationals, with tolerance
   ``|a-b| <= max(rel_tol·max(|a|,|b|), abs_tol)``.
3. Else, identical text after whitespace/``$`` normalisation scores 1.
4. Else the symbolic backend decides: ``backend="auto"`` uses the ``math_verify``
   library when it is importable (``verify(parse(gold), parse(completion))``; it does its
   own extraction from the whole completion), else sympy when importable, else none
   (score 0). The sympy path never calls ``sympify``/``parse_expr`` (they use ``eval``):
   a small LaTeX normaliser (``\\frac``, ``\\sqrt``, ``\\cdot``, ``^``, ``\\pi``, implicit
   multiplication) feeds ``ast.parse``, and a whitelisting walker builds the sympy
   expression (numbers, one-letter symbols, ``pi``, ``+ - * / **`` with a constant
   exponent ``|n| <= 16``, unary ``±``, ``sqrt``), with bounded length, depth, node count
   and number of powers. Equality: for constant expressions, ``|N(a-b, 30)| <= abs_tol``;
   with symbols, ``simplify(a - b) == 0``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from fractions import Fraction
from typing import Any

from rlx.rewards.extract import extract_answer, numbers_equal, parse_number
from rlx.rewards.spec import register_reward

BACKENDS = ("auto", "math_verify", "sympy", "none")
_MAX_SYMBOLIC_CHARS = 200
_MAX_NODES = 100
_MAX_DEPTH = 20
_MAX_POWERS = 4
_MAX_EXPONENT = 16


def available_backend() -> str:
    """The backend ``"auto"`` resolves to in this environment."""
    if importlib.util.find_spec("math_verify") is not None:
        return "math_verify"
    if importlib.util.find_spec("sympy") is not None:
        return "sympy"
    return "none"


def _normalize_text(s: str) -> str:
    s = s.strip().strip("$").strip().removesuffix(".")
    for tok in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "\\displaystyle"):
        s = s.replace(tok, "")
    return re.sub(r"\s+", "", s)


def _brace_group(s: str, i: int) -> tuple[str, int]:
    """Content of the brace group starting at ``s[i] == "{"`` and the index after it."""
    if i >= len(s) or s[i] != "{":
        raise ValueError("expected '{'")
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")


def latex_to_python(s: str) -> str:
    """LaTeX-lite -> Python arithmetic syntax (raises ValueError on malformed braces)."""
    s = _normalize_text(s)
    for tok, rep in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("^", "**")):
        s = s.replace(tok, rep)
    for cmd in ("\\dfrac", "\\tfrac", "\\frac", "\\sqrt"):
        while cmd in s:
            i = s.index(cmd)
            a, j = _brace_group(s, i + len(cmd))
            if cmd == "\\sqrt":
                s = f"{s[:i]}sqrt({a}){s[j:]}"
            else:
                b, k = _brace_group(s, j)
                s = f"{s[:i]}(({a})/({b})){s[k:]}"
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"(?<=[0-9)])(?=[A-Za-z(])", "*", s)  # implicit multiplication: 2x, 2(3), )(
    s = re.sub(r"(?<![A-Za-z])([A-Za-z])\(", r"\1*(", s)  # x(x+1); sqrt( stays a call
    return s


def to_sympy(text: str):
    """Safe LaTeX-lite/Python-syntax -> sympy expression (ValueError when not allowed)."""
    import sympy

    if len(text) > _MAX_SYMBOLIC_CHARS:
        raise ValueError("expression too long")
    src = latex_to_python(text)
    if len(src) > 2 * _MAX_SYMBOLIC_CHARS or not re.fullmatch(r"[0-9A-Za-z+\-*/(). ]*", src, re.ASCII):
        raise ValueError("disallowed characters")
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression: {type(e).__name__}") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > _MAX_NODES:
        raise ValueError("expression has too many nodes")
    if sum(isinstance(n, ast.Pow) for n in ast.walk(tree)) > _MAX_POWERS:
        raise ValueError("expression has too many powers")
    return _build(tree.body, sympy, 0)


def _bounded(x):
    """Rejects exact rationals beyond 4096 bits (nested powers of big numbers)."""
    if getattr(x, "is_Rational", False) and max(abs(x.p).bit_length(), x.q.bit_length()) > 4096:
        raise ValueError("number too large")
    return x


def _build(node: ast.AST, sympy, depth: int):
    if depth > _MAX_DEPTH:
        raise ValueError("expression too deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sympy.Rational(Fraction(str(node.value)).numerator, Fraction(str(node.value)).denominator)
    if isinstance(node, ast.Name):
        if node.id == "pi":
            return sympy.pi
        if len(node.id) == 1:
            return sympy.Symbol(node.id)
        raise ValueError(f"name {node.id!r} not allowed")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _build(node.operand, sympy, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call):
        if (
            isinstance(node.func, ast.Name)
            and node.func.id == "sqrt"
            and len(node.args) == 1
            and not node.keywords
        ):
            return sympy.sqrt(_build(node.args[0], sympy, depth + 1))
        raise ValueError("call not allowed")
    if isinstance(node, ast.BinOp):
        a = _build(node.left, sympy, depth + 1)
        b = _build(node.right, sympy, depth + 1)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return _bounded(a * b)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ValueError("division by zero")
            return _bounded(a / b)
        if isinstance(node.op, ast.Pow):
            if not (b.is_Rational and abs(b) <= _MAX_EXPONENT):
                raise ValueError("exponent must be a constant with |n| <= 16")
            if a == 0 and b < 0:
                raise ValueError("division by zero")
            return _bounded(a**b)
    raise ValueError(f"syntax {type(node).__name__} not allowed")


def sympy_equal(pred: str, gold: str, *, abs_tol: float = 1e-9) -> bool:
    """Symbolic equality of two answers via the safe sympy path (False if unparsable)."""
    import sympy

    try:
        a, b = to_sympy(pred), to_sympy(gold)
    except ValueError:
        return False
    diff = a - b
    if not diff.free_symbols:
        return bool(abs(sympy.N(diff, 30)) <= abs_tol)
    return bool(sympy.simplify(diff) == 0)


def _math_verify_equal(completion: str, gold: str) -> bool:
    import math_verify

    gold_src = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
    return bool(math_verify.verify(math_verify.parse(gold_src), math_verify.parse(completion)))


@register_reward("math_answer")
def math_answer(
    completion: str,
    problem: Any,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    backend: str = "auto",
) -> float:
    """1.0 if the completion's final answer equals ``problem.answer`` (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    pred = extract_answer(completion)
    gold = str(problem.answer).strip()
    gold_num = parse_number(gold)
    if gold_num is None:
        gold = extract_answer(gold, last_number=False) or gold
        gold_num = parse_number(gold)
    if pred is None:
        return 0.0
    pred_num = parse_number(pred)
    if gold_num is not None and pred_num is not None:
        return 1.0 if numbers_equal(pred_num, gold_num, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0
    if _normalize_text(pred) == _normalize_text(gold):
        return 1.0
    chosen = available_backend() if backend == "auto" else backend
    if chosen == "math_verify":
        return 1.0 if _math_verify_equal(completion, gold) else 0.0
    if chosen == "sympy":
        return 1.0 if sympy_equal(pred, gold, abs_tol=abs_tol) else 0.0
    return 0.0

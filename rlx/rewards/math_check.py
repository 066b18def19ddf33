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
4. Else the symbolic backend decides, chosen by ``backend`` (a keyword, bound per reward
   component like every reward hyperparameter: ``reward_spec.kwargs = {"math_answer":
   {"backend": "sympy"}}``). ``"auto"`` resolves (``resolve_backend``) to ``math_verify``
   when the ``math-verify`` package is installed (``pip install 'rlx[math]'``), else to
   ``sympy``, else to ``none`` (score 0); the first use of each resolution in a process
   is logged (a WARNING when ``auto`` falls back, so a run without math-verify says so).
   An explicit ``"math_verify"`` or ``"sympy"`` that is not installed raises ImportError.
   Both backends compare the same extracted answers (never the whole completion):

   - ``math_verify``: ``verify(parse("$gold$"), parse("$pred$"))`` (HuggingFace
     math-verify: LaTeX and plain expressions, sets, intervals, matrices, equations).
     Its own ``signal.alarm`` timeouts are switched off: they work only in a main
     thread and would cancel the reward pool's per-call timer (the same
     ``ITIMER_REAL``). Instead, before parsing, each answer is screened (at most
     ``_MAX_SYMBOLIC_CHARS`` characters, bracket nesting at most ``_MAX_BRACKET_DEPTH``
     — 20 nested ``\\frac`` take math-verify minutes —, no chained scripts such as
     ``x^x^x`` or ``a_a_a`` — exponential in its ANTLR parser —, no non-ASCII digits,
     as in ``rlx.rewards.extract``), and before ``verify`` the parsed (unevaluated)
     sympy trees are bounded (``_bounded_cost``, which the sympy backend applies too):
     an upper bound on the decimal digits of every constant sub-expression (powers,
     ``exp``, factorials, binomials, sums and products) must stay under
     ``_MAX_RESULT_DIGITS``, a power of a symbolic base has an exponent of at most
     ``_MAX_SYMBOLIC_EXPONENT``, and the expression multiplied out has at most
     ``_MAX_TERMS`` terms (``9^{9^{9^9}}``, ``(10^6)!``, ``(x+1)^{1000}`` or
     ``(a+b)(c+d)···(w+y)`` would otherwise run for minutes, partly in C code no
     signal can interrupt). A refused answer scores 0.
   - ``sympy``: never calls ``sympify``/``parse_expr`` (they use ``eval``): a small LaTeX
     normaliser (``\\frac``, ``\\sqrt``, ``\\cdot``, ``^``, ``\\pi``, implicit
     multiplication) feeds ``ast.parse``, and a whitelisting walker builds the sympy
     expression (numbers, one-letter symbols, ``pi``, ``+ - * / **`` with a constant
     exponent ``|n| <= 16``, unary ``±``, ``sqrt``), with bounded length, depth, node
     count and number of powers. Equality: for constant expressions,
     ``|N(a-b, 30)| <= abs_tol``; with symbols, ``simplify(a - b) == 0``.

   Either comparison also runs under a wall-clock deadline ``timeout_s`` (default 2 s;
   None for none) when called in a process's main thread: a ``SIGALRM`` timer that
   saves and restores any timer already armed (the reward pool's), and leaves an
   earlier-expiring one in charge. A comparison past the deadline scores 0 (logged
   once per process). In other threads (the pool's thread backend) only the static
   bounds apply.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from rlx.rewards.extract import extract_answer, numbers_equal, parse_number
from rlx.rewards.spec import register_reward

log = logging.getLogger("rlx.rewards.math_check")

BACKENDS = ("auto", "math_verify", "sympy", "none")
DEFAULT_TIMEOUT_S = 2.0
_MAX_SYMBOLIC_CHARS = 200
_MAX_NODES = 100
_MAX_DEPTH = 20
_MAX_POWERS = 4
_MAX_EXPONENT = 16
_MAX_BRACKET_DEPTH = 8
_MAX_RESULT_DIGITS = 10_000
_MAX_SYMBOLIC_EXPONENT = 64
_MAX_TERMS = 128
_PACKAGES = {"math_verify": "math-verify (pip install 'rlx[math]')", "sympy": "sympy (pip install sympy)"}


def available_backend() -> str:
    """The backend ``"auto"`` resolves to in this environment."""
    if importlib.util.find_spec("math_verify") is not None:
        return "math_verify"
    if importlib.util.find_spec("sympy") is not None:
        return "sympy"
    return "none"


_reported: set[tuple[str, str]] = set()
_timeouts_reported: list[float] = []


def resolve_backend(backend: str = "auto") -> str:
    """The symbolic backend ``math_answer(..., backend=backend)`` uses here.

    Raises ValueError for an unknown name and ImportError for an explicit backend whose
    package is not installed. The first resolution of each kind in a process is logged.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chosen = available_backend() if backend == "auto" else backend
    if backend in _PACKAGES and importlib.util.find_spec(backend) is None:
        raise ImportError(f"math_answer backend={backend!r} needs {_PACKAGES[backend]}")
    if (backend, chosen) not in _reported:
        _reported.add((backend, chosen))
        if backend == "auto" and chosen != "math_verify":
            log.warning("math_answer: math-verify is not installed, so symbolic answers are compared "
                        "with %s; pip install 'rlx[math]' for math-verify",
                        "the sympy fallback" if chosen == "sympy" else "nothing (sympy is missing too)")
        else:
            log.info("math_answer: symbolic backend %s (backend=%r)", chosen, backend)
    return chosen


class _Deadline(BaseException):
    """Raised by the deadline's SIGALRM handler (BaseException: a library's own
    ``except Exception`` cannot swallow it)."""


def _within_deadline(fn: Callable[[], bool], timeout_s: float | None) -> bool:
    """``fn()``, or False when it runs past ``timeout_s`` (main thread only; elsewhere
    ``fn()`` unbounded). A timer already armed is saved and restored (its remaining time
    reduced by the time spent), and one expiring first is left in charge."""
    if (timeout_s is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        return fn()
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= timeout_s:
        return fn()
    armed = [True]

    def handler(signum, frame):
        if armed[0]:
            armed[0] = False
            raise _Deadline()

    previous = signal.signal(signal.SIGALRM, handler)
    if previous is None:  # a handler not installed from Python
        previous = signal.SIG_DFL
    start = time.monotonic()
    restored = [False]

    def restore():
        armed[0] = False
        if restored[0]:
            return
        restored[0] = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            left = max(outer_left - (time.monotonic() - start), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)

    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            return fn()
        finally:
            restore()
    except _Deadline:
        restore()  # the alarm may have fired inside the first restore()
        if not _timeouts_reported:
            _timeouts_reported.append(timeout_s)
            log.warning("math_answer: a symbolic comparison ran past timeout_s=%gs and scored 0 "
                        "(reported once per process)", timeout_s)
        return False


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


def sympy_equal(pred: str, gold: str, *, abs_tol: float = 1e-9,
                timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Symbolic equality of two answers via the safe sympy path (False if unparsable or
    past ``timeout_s``)."""
    import sympy

    try:
        a, b = to_sympy(pred), to_sympy(gold)
    except ValueError:
        return False
    if not (_bounded_cost(a, sympy) and _bounded_cost(b, sympy)):
        return False

    def compare() -> bool:
        diff = a - b
        if not diff.free_symbols:
            return bool(abs(sympy.N(diff, 30)) <= abs_tol)
        return bool(sympy.simplify(diff) == 0)

    return _within_deadline(compare, timeout_s)


_SCRIPT = r"(?:\{[^{}]*\}|\\[A-Za-z]+|[^\s{}])\s*"
# x^a^b, a_b_c, a_b^c_d: not LaTeX, and exponential for math-verify's ANTLR parser.
_CHAINED_SCRIPTS = re.compile(rf"\^{_SCRIPT}\^|_{_SCRIPT}_|(?:[\^_]{_SCRIPT}){{3}}")


def _screened(text: str) -> str:
    """``text`` without ``$`` wrappers if math-verify may parse it (ValueError if not)."""
    text = text.strip().strip("$").strip()
    if not text or len(text) > _MAX_SYMBOLIC_CHARS:
        raise ValueError("empty or too long")
    if any(ch.isdigit() and not ch.isascii() for ch in text):
        raise ValueError("non-ASCII digits")
    depth = 0
    for ch in text:
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth > _MAX_BRACKET_DEPTH:
            raise ValueError("nested too deeply")
    if text.count("|") > 2 * _MAX_BRACKET_DEPTH or _CHAINED_SCRIPTS.search(text):
        raise ValueError("ambiguous nesting")
    return text


class _Unbounded(ValueError):
    pass


_LOG10_2 = math.log10(2)


def _digits_of(n: int) -> float:
    return max(abs(n).bit_length() * _LOG10_2, 1.0)


def _times_ten_to(m: float, e: float) -> float:
    """``m * 10**e`` for the digit bounds, refusing anything past the limit."""
    if e > math.log10(_MAX_RESULT_DIGITS) + 1:
        raise _Unbounded("too large")
    return m * 10.0**e


def _digit_bound(e, sympy, depth: int = 0) -> float:
    """An upper bound on the decimal digits evaluating ``e`` can produce (symbols count
    as small numbers); raises _Unbounded past ``_MAX_RESULT_DIGITS``."""
    if depth > 4 * _MAX_SYMBOLIC_CHARS:
        raise _Unbounded("too deep")
    if isinstance(e, sympy.MatrixBase) and not isinstance(e, sympy.Basic):
        return max((_digit_bound(x, sympy, depth + 1) for x in e), default=1.0)
    if not isinstance(e, sympy.Basic):
        return 1.0
    rec = lambda x: _digit_bound(x, sympy, depth + 1)  # noqa: E731
    if e.is_Integer:
        out = _digits_of(int(e))
    elif e.is_Rational:
        out = max(_digits_of(e.p), _digits_of(e.q))
    elif e.is_Float:
        _, _, exp, bits = e._mpf_
        out = max(abs(exp + bits) * _LOG10_2, 1.0)
    elif not e.args:  # symbols, pi, E, I, oo, nan
        out = 1.0
    elif isinstance(e, sympy.Pow):
        base, ex = e.args
        base_digits = rec(base)
        if ex.free_symbols:
            out = base_digits + rec(ex)
        else:  # |b**(p/q)| <= |b|**|p|: digits(b) * |p|
            n = abs(ex.p) if ex.is_Rational else _times_ten_to(1.0, rec(ex))
            if base.free_symbols and n > _MAX_SYMBOLIC_EXPONENT:
                raise _Unbounded("power of a symbolic base too high")
            out = base_digits * n
    elif isinstance(e, sympy.exp):
        out = _times_ten_to(0.5, rec(e.args[0]))
    elif isinstance(e, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)):
        d = rec(e.args[0])
        out = _times_ten_to(d, d)  # n! <= n**n
    elif isinstance(e, sympy.binomial):
        out = _times_ten_to(_LOG10_2, rec(e.args[0])) + rec(e.args[1])  # C(n, k) <= 2**n
    elif isinstance(e, (sympy.Sum, sympy.Product)):
        body = rec(e.function)
        terms = 0.0
        for _, *bounds in e.limits:
            terms += max((rec(b) for b in bounds), default=1.0)  # log10 of the number of terms
        # the summation variable is as large as the bounds: body * bound digits
        out = body * terms + terms if isinstance(e, sympy.Sum) else _times_ten_to(body * terms, terms)
    elif isinstance(e, sympy.Add):
        out = max(rec(a) for a in e.args) + math.log10(len(e.args))
    else:  # Mul, functions, relations, sets, tuples, matrices: as a product of the arguments
        out = sum(rec(a) for a in e.args) + 1.0
    if out > _MAX_RESULT_DIGITS:
        raise _Unbounded("too large")
    return out


def _term_bound(e, sympy, depth: int = 0) -> int:
    """An upper bound on the number of terms of ``e`` multiplied out (what ``simplify`` /
    ``cancel`` may build): atoms 1, sums add, products multiply, ``(t terms)^n`` has at
    most ``C(n + t - 1, t - 1)``; raises _Unbounded past ``_MAX_TERMS``."""
    if depth > 4 * _MAX_SYMBOLIC_CHARS:
        raise _Unbounded("too deep")
    if not isinstance(e, sympy.Basic) or not e.args:
        return 1
    inner = [_term_bound(a, sympy, depth + 1) for a in e.args]
    if isinstance(e, sympy.Add):
        out = sum(inner)
    elif isinstance(e, sympy.Mul):
        out = math.prod(inner)
    elif isinstance(e, sympy.Pow) and e.args[1].is_Rational and inner[0] > 1:
        n = abs(e.args[1].p)
        out = math.comb(n + inner[0] - 1, inner[0] - 1) if n <= _MAX_TERMS else _MAX_TERMS + 1
    else:  # functions, symbolic or fractional powers, relations, sets: not multiplied out
        out = 1
    if out > _MAX_TERMS:
        raise _Unbounded("too many terms")
    return out


def _bounded_cost(tree, sympy) -> bool:
    """Whether comparing ``tree`` stays within the digit and term bounds."""
    try:
        _digit_bound(tree, sympy)
        if isinstance(tree, sympy.MatrixBase) and not isinstance(tree, sympy.Basic):
            for x in tree:
                _term_bound(x, sympy)
        else:
            _term_bound(tree, sympy)
    except (_Unbounded, RecursionError):
        return False
    return True


_quieted: list[bool] = []


def _quiet_math_verify() -> None:
    """math-verify warns once that its own timeouts are off; rlx bounds the call itself."""
    if _quieted:
        return
    _quieted.append(True)

    class _DropTimeoutDisabled(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabled())


def math_verify_equal(pred: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """``math_verify.verify(parse(gold), parse(pred))`` on two extracted answers, bounded
    as the module docstring says (False when refused, unparsable or past ``timeout_s``)."""
    import math_verify
    import sympy

    _quiet_math_verify()
    try:
        pred, gold = _screened(pred), _screened(gold)
    except ValueError:
        return False

    def compare() -> bool:
        parsed_gold = math_verify.parse(f"${gold}$", parsing_timeout=None)
        parsed_pred = math_verify.parse(f"${pred}$", parsing_timeout=None)
        if not parsed_gold or not parsed_pred:
            return False
        if not all(_bounded_cost(tree, sympy) for tree in (*parsed_gold, *parsed_pred)):
            return False
        return bool(math_verify.verify(parsed_gold, parsed_pred, timeout_seconds=None))

    return _within_deadline(compare, timeout_s)


@register_reward("math_answer")
def math_answer(
    completion: str,
    problem: Any,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    backend: str = "auto",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float:
    """1.0 if the completion's final answer equals ``problem.answer`` (module docstring).

    Args:
      rel_tol, abs_tol: numeric tolerance.
      backend: ``"auto"``, ``"math_verify"``, ``"sympy"`` or ``"none"`` (symbolic step).
      timeout_s: wall-clock bound of one symbolic comparison (> 0, or None).
    """
    chosen = resolve_backend(backend)
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a number > 0 or None, got {timeout_s!r}")
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
    if chosen == "math_verify":
        return 1.0 if math_verify_equal(pred, gold, timeout_s=timeout_s) else 0.0
    if chosen == "sympy":
        return 1.0 if sympy_equal(pred, gold, abs_tol=abs_tol, timeout_s=timeout_s) else 0.0
    return 0.0

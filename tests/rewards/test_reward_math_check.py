"""Math answer checking: extraction, numeric tolerance, both symbolic backends on the same
cases, explicit backend choice, bounded time on adversarial input."""

# A generous bound: catches super-linear blow-ups (regex backtracking, huge ints, ANTLR
# ambiguity, multiplied-out polynomials) without flaking on a loaded 2-core CI machine.
LIMIT_S = 5.0

import importlib.machinery
import logging
import signal
import sys
import threading
import time
import types

import pytest

from rlx.rewards import math_check as math_answer_module
from rlx.rewards.math_check import (
    available_backend, latex_to_python, math_answer, math_verify_equal, resolve_backend, sympy_equal,
    to_sympy,
)
from rlx.tasks import Problem


def _p(answer):
    return Problem("", answer, {})


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    assert time.perf_counter() - start < LIMIT_S
    return out


@pytest.fixture(params=["sympy", "math_verify"])
def backend(request):
    pytest.importorskip(request.param)
    return request.param


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"so $x = \boxed{42}$", "42"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        ("Answer: 1,000", "1000"),
        ("the answer is 3/4.", "0.75"),
        ("we find 7 then 12", "12"),
        ("x = 2.0000001", "2"),
        ("#### 72", "#### 72"),
        (r"\boxed{72}", r"\boxed{72}"),
    ],
)
def test_numeric_answers_match(completion, answer):
    assert math_answer(completion, _p(answer)) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        (r"\boxed{41}", "42"),
        ("the answer is 2.01", "2"),
        ("no number here", "5"),
        ("", "5"),
    ],
)
def test_wrong_or_missing_answers_score_zero(completion, answer):
    assert math_answer(completion, _p(answer)) == 0.0


def test_tolerance_is_configurable():
    assert math_answer("3.14159", _p("3.1416"), rel_tol=1e-4) == 1.0
    assert math_answer("3.14159", _p("3.1416"), rel_tol=1e-7) == 0.0


# (completion, reference, equal): cases both symbolic backends decide alike.
SAME_CASES = [
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
    (r"\boxed{2x + x}", "3x", True),
    (r"\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    (r"\boxed{(x+1)^{2}}", "x^2+2x+1", True),
    (r"\boxed{2\pi}", r"2 \cdot \pi", True),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{\frac{x}{2}}", "0.5x", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{\frac{1}{1+\frac{1}{1+\frac{1}{2}}}}", r"\frac{3}{5}", True),
    (r"the answer is $\frac{\pi}{4}$", r"\frac{\pi}{4}", True),
    (r"\boxed{x^2 + 1}", "(x-1)(x+1)", False),
    (r"\boxed{\sqrt{3}}", r"\frac{1}{\sqrt{2}}", False),
    (r"\boxed{2x}", "3x", False),
    (r"\boxed{\pi}", "3.14159", False),
    ("\\boxed{\u0663\u0664}", "34", False),  # Arabic-Indic digits are not numbers here
    ("\\boxed{\uff13\uff14}", "34", False),  # nor are full-width ones
]


@pytest.mark.parametrize("completion, answer, equal", SAME_CASES)
def test_both_backends_decide_the_same_cases(backend, completion, answer, equal):
    assert _timed(math_answer, completion, _p(answer), backend=backend) == float(equal)


def test_math_verify_decides_what_the_sympy_fallback_cannot():
    """Sets and equations: the reason math-verify is preferred when installed."""
    pytest.importorskip("math_verify")
    pytest.importorskip("sympy")
    for completion, answer in [(r"\boxed{\{1, 2\}}", r"\{2, 1\}"), (r"\boxed{x = 3}", "3"),
                               (r"\boxed{(x+1)^{60}}", r"(x+1)^{59}(x+1)")]:
        assert math_answer(completion, _p(answer), backend="math_verify") == 1.0
        assert math_answer(completion, _p(answer), backend="sympy") == 0.0


def test_none_backend_only_compares_numbers_and_text():
    assert math_answer(r"\boxed{\frac{\sqrt{2}}{2}}", _p(r"\frac{1}{\sqrt{2}}"), backend="none") == 0.0
    assert math_answer(r"\boxed{ \sqrt{2} }", _p(r"$\sqrt{2}$"), backend="none") == 1.0


def test_unknown_backend_and_bad_timeout_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        math_answer("1", _p("1"), backend="mathematica")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("Sympy")
    for bad in (0, -1.0, "2", True):
        with pytest.raises(ValueError, match="timeout_s must be a number > 0 or None"):
            math_answer("1", _p("1"), timeout_s=bad)


def _hide(monkeypatch, *names):
    real = math_answer_module.importlib.util.find_spec
    monkeypatch.setattr(math_answer_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in names else real(name, *a))
    monkeypatch.setattr(math_answer_module, "_reported", set())


def test_auto_resolves_to_math_verify_then_sympy_then_none_and_says_so(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="rlx.rewards.math_check")
    if math_answer_module.importlib.util.find_spec("math_verify") is not None:
        _hide(monkeypatch)
        assert resolve_backend("auto") == available_backend() == "math_verify"
        assert "symbolic backend math_verify (backend='auto')" in caplog.text
    _hide(monkeypatch, "math_verify")
    expected = "sympy" if math_answer_module.importlib.util.find_spec("sympy") else "none"
    assert resolve_backend("auto") == available_backend() == expected
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "math-verify is not installed" in warned[0].getMessage()
    resolve_backend("auto")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once per process
    _hide(monkeypatch, "math_verify", "sympy")
    assert resolve_backend("auto") == "none"
    assert math_answer(r"\boxed{\sqrt{4}}", _p("x")) == 0.0


def test_an_explicit_backend_that_is_not_installed_raises(monkeypatch):
    _hide(monkeypatch, "math_verify", "sympy")
    with pytest.raises(ImportError, match=r"backend='math_verify' needs math-verify \(pip install 'rlx\[math\]'\)"):
        math_answer(r"\boxed{\sqrt{4}}", _p("x"), backend="math_verify")
    with pytest.raises(ImportError, match="backend='sympy' needs sympy"):
        math_answer(r"\boxed{\sqrt{4}}", _p("x"), backend="sympy")


def test_auto_uses_math_verify_on_the_extracted_answers(monkeypatch):
    calls = []
    fake = types.ModuleType("math_verify")
    fake.__spec__ = importlib.machinery.ModuleSpec("math_verify", None)
    fake.parse = lambda text, **kw: calls.append(("parse", text, kw)) or [text]
    fake.verify = lambda gold, pred, **kw: calls.append(("verify", gold, pred, kw)) or True
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    monkeypatch.setattr(math_answer_module, "_reported", set())
    assert math_answer(r"we get $\boxed{\sqrt{4}}$, done", _p("x")) == 1.0
    assert calls == [("parse", "$x$", {"parsing_timeout": None}),
                     ("parse", r"$\sqrt{4}$", {"parsing_timeout": None}),
                     ("verify", ["$x$"], [r"$\sqrt{4}$"], {"timeout_seconds": None})]


def test_backend_is_bound_per_component_from_gin():
    import gin

    from rlx.rewards.spec import reward_spec

    pytest.importorskip("math_verify")
    pytest.importorskip("sympy")
    gin.clear_config()
    try:
        scores = {}
        for name in ("sympy", "math_verify"):
            gin.parse_config(f'rlx.rewards.reward_spec.kwargs = {{"math_answer": {{"backend": "{name}"}}}}')
            (component,) = reward_spec(names=("math_answer",)).components
            assert component.kwargs == {"backend": name}
            scores[name] = component(r"\boxed{\{1, 2\}}", _p(r"\{2, 1\}"))
        assert scores == {"sympy": 0.0, "math_verify": 1.0}
    finally:
        gin.clear_config()


def test_latex_normaliser():
    assert latex_to_python(r"\frac{a}{\sqrt{b}} \cdot 2^{3}") == "((a)/(sqrt(b)))*2**(3)"
    assert latex_to_python("2x(3)") == "2*x*(3)"
    with pytest.raises(ValueError):
        latex_to_python(r"\frac{1}{2")


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('echo hi')",
        "x.__class__",
        "exp(1)",
        "x**100",
        "2**2**2**2**2**2",
        "((10**16)**16)**16",
        "9" * 500,
        "a" * 300,
        "(" * 150 + "1" + ")" * 150,
        r"\frac{" * 60 + "1" + "}{2}" * 60,
        "x" + "+x" * 80,
        "sin(x)",
        "x.real",
        "lambda: 1",
    ],
)
def test_to_sympy_rejects_unsafe_or_oversized_input_quickly(text):
    pytest.importorskip("sympy")
    with pytest.raises(ValueError):
        _timed(to_sympy, text)


def _rep(s, n):
    return s * n


ADVERSARIAL = [
    "",
    "\\boxed{" * 20_000,
    r"\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}",
    r"\boxed{" + "9" * 100_000 + "}",
    "1" * 1_000_000,
    "x" * 10_000_000,  # 10 MB
    "\\boxed{1}" * 1_000_000,  # 9 MB of answers
    r"\boxed{__import__('os').system('echo pwned')}",
    r"\boxed{(x+1)^{16}^{16}^{16}}",
    r"\boxed{x^{16} - (x+1)^{16}}",
    "\u0663\u0664",
    "answer: " + "\\frac{" * 10_000,
    # huge numbers: C-level big-integer work no signal interrupts
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{9^{999999999}}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{((10^{1000})^{1000})^{1000}}",
    r"\boxed{e^{e^{e^{100}}}}",
    r"\boxed{100000000!}",
    r"\boxed{(10^{6})!}",
    r"\boxed{\binom{10^{9}}{5 \cdot 10^{8}}}",
    r"\boxed{\sum_{i=1}^{10^{9}} i}",
    r"\boxed{\prod_{i=1}^{100000} i}",
    r"\boxed{\begin{pmatrix} 9^{9^{9}} \end{pmatrix}}",
    r"\boxed{1e999999999}",
    # polynomials that multiply out to millions of terms
    r"\boxed{(x+1)^{1000}}",
    r"\boxed{(x+y+z+1)^{30}}",
    r"\boxed{(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)(q+r)(s+t)(u+v)(w+y)}",
    # deep nesting and parser ambiguity
    r"\boxed{" + _rep(r"\frac{", 20) + "1" + _rep("}{2}", 20) + "}",
    r"\boxed{" + _rep("{", 30) + "1" + _rep("}", 30) + "}",
    r"\boxed{x" + _rep("^x", 70) + "}",
    r"\boxed{a" + _rep("_a", 30) + "}",
    r"\boxed{" + _rep("|", 40) + "x" + _rep("|", 40) + "}",
]


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_completions_score_zero_within_the_limit(backend, completion):
    for answer in ("34", "(x+1)^{2}"):
        assert _timed(math_answer, completion, _p(answer), backend=backend) == 0.0


@pytest.mark.parametrize("completion", [
    r"\boxed{(x+y+z+1)^{30}}",
    r"\boxed{(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)(q+r)(s+t)(u+v)(w+y)}",
    r"\boxed{x" + _rep("^x", 70) + "}",
    r"\boxed{a" + _rep("_a", 30) + "}",
])
def test_static_bounds_hold_where_no_deadline_can_be_armed(backend, completion):
    """Outside the main thread (the pool's thread backend) there is no SIGALRM deadline:
    the static bounds alone must keep these quick."""
    out = []
    worker = threading.Thread(target=lambda: out.append(_timed(math_answer, completion, _p("34"), backend=backend)))
    worker.start()
    worker.join(timeout=3 * LIMIT_S)
    assert out == [0.0]


def test_cost_bounds_accept_ordinary_answers_and_refuse_blow_ups():
    sympy = pytest.importorskip("sympy")
    x, y, z = sympy.symbols("x y z")

    def pw(b, e):
        return sympy.Pow(b, e, evaluate=False)

    ok = [pw(2, 2023), pw(x + 1, 64), pw(x + y + 1, 14), sympy.factorial(100, evaluate=False),
          sympy.Matrix([[1, x], [pw(2, 100), 3]]), sympy.FiniteSet(1, 2, 3), sympy.Eq(x, 3)]
    refused = [pw(9, pw(9, pw(9, 9))), pw(10, 10**5), pw(x + 1, 65), pw(x + y + 1, 15),
               pw(x + y + z + 1, 30), sympy.factorial(10**6, evaluate=False),
               sympy.binomial(10**9, 5, evaluate=False), sympy.exp(pw(10, 10), evaluate=False),
               sympy.Product(x, (x, 1, 10**5)), sympy.Matrix([[pw(9, pw(9, 9))]]),
               sympy.Mul(*[a + b for a, b in zip(sympy.symbols("a:8"), sympy.symbols("b:8"))])]
    assert all(math_answer_module._bounded_cost(e, sympy) for e in ok)
    assert not any(math_answer_module._bounded_cost(e, sympy) for e in refused)


def _spin():
    while True:
        pass


def test_deadline_stops_a_slow_comparison_and_restores_the_signal_state():
    before = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    assert math_answer_module._within_deadline(_spin, 0.2) is False
    assert 0.2 <= time.perf_counter() - start < LIMIT_S
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert math_answer_module._within_deadline(lambda: True, 0.2) is True
    assert math_answer_module._within_deadline(lambda: True, None) is True


class _OuterTimeout(BaseException):
    pass


def _outer_handler(signum, frame):
    raise _OuterTimeout()


def test_deadline_keeps_an_outer_timer_like_the_reward_pools():
    """The reward pool's worker arms ITIMER_REAL for each call; a comparison inside it
    must neither cancel that timer nor outlive it."""
    previous = signal.signal(signal.SIGALRM, _outer_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert math_answer_module._within_deadline(_spin, 0.2) is False
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left < 30.0 and signal.getsignal(signal.SIGALRM) is _outer_handler
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # the outer timer expires first: it fires
        with pytest.raises(_OuterTimeout):
            math_answer_module._within_deadline(_spin, 10.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_math_verify_comparison_is_bounded_by_timeout_s(monkeypatch):
    mv = pytest.importorskip("math_verify")
    monkeypatch.setattr(mv, "verify", lambda *a, **k: _spin())
    start = time.perf_counter()
    assert math_verify_equal(r"\sqrt{4}", "2", timeout_s=0.2) is False
    assert time.perf_counter() - start < LIMIT_S


def test_math_verify_runs_in_a_thread_without_signal_errors():
    pytest.importorskip("math_verify")
    out = []
    worker = threading.Thread(target=lambda: out.append(math_answer(r"\boxed{2x+x}", _p("3x"), backend="math_verify")))
    worker.start()
    worker.join(timeout=3 * LIMIT_S)
    assert out == [1.0]


def test_sympy_equal_is_false_for_unparsable_input():
    pytest.importorskip("sympy")
    assert not sympy_equal("import os", "1")


def test_math_verify_scores_inside_a_reward_pool_worker_process():
    """In the worker, the pool's own per-call SIGALRM timer is armed: math-verify's
    alarm-based timeouts would have cancelled it; rlx's deadline leaves it in charge."""
    pytest.importorskip("math_verify")
    from rlx.rewards.pool import RewardPool
    from rlx.rewards.spec import RewardComponent, RewardSpec

    spec = RewardSpec((RewardComponent("math_answer", 1.0, {"backend": "math_verify"}),))
    completions = [r"\boxed{2x+x}", r"\boxed{\{1,2\}}", r"\boxed{9^{9^{9^{9}}}}", "x" * 1_000_000]
    problems = [_p("3x"), _p(r"\{2,1\}"), _p("34"), _p("34")]
    with RewardPool(spec, num_workers=1, backend="process", timeout_s=LIMIT_S) as pool:
        result = pool.score(completions, problems)
    assert result.scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert (result.failures, result.timeouts) == (0, 0)

#!/usr/bin/env bash
# rlx GPU suite: every accelerator check and benchmark rlx has, in one call, as one table
# (issue 16, item 4). The parts, their targets and the peaks they are judged against are
# described in benchmarks/gpu_suite.py (`bash benchmarks/gpu_suite.sh --list` names them).
#
# On a lent GPU, one command (about 6-8 minutes with JAX start-up and compilation; the
# suite stops starting parts once its 450 s budget is spent, --budget changes it):
#
#     pip install -e ".[gpu,test]" && bash benchmarks/gpu_suite.sh
#
# The table goes to stdout; with $OUT set, $OUT/gpu_suite.json (every row with its raw
# numbers, each part's exit status and error tail) and $OUT/gpu_suite.log (each part's
# full output) are written too. Exit status 0 when no row is FAIL.
#
# Without internet (this workplace's device machine: JAX with CUDA, flax, optax, chex
# and numpy are already there, and nothing can be fetched from it): if rlx is not
# installed, this script imports it from the checkout (rlx/ and kernels/ as
# rlx_kernels); the kernel parts (a-c) need nothing else. The model parts (d, e) also
# import gin-config, which that machine lacks: put its wheel in .whl/ (git-ignored)
# here beforehand,
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps -d .whl gin-config==0.5.0
#
# and run `bash benchmarks/gpu_suite.sh` there with `.whl` carried: wheels found in
# .whl/ are unpacked with `pip --no-index` (nothing fetched) into /tmp/rlx-suite-site,
# which goes on PYTHONPATH. A missing package fails only the parts that import it.
#
# On a machine without a GPU:
#
#     bash benchmarks/gpu_suite.sh --cpu-check
#
# runs the same parts on CPU (the kernels in Pallas interpret mode at tiny sizes, each
# measurement's code at tiny sizes, the GPU-sized kernel programs lowered for CUDA) and
# reports every measured target SKIP(no GPU); tests/test_gpu_suite.py runs it.
#
# Environment: PYTHON picks the interpreter (default: .venv/bin/python if it runs, else
# python3); other arguments go to benchmarks/gpu_suite.py (--parts, --budget, --json,
# --peak-bw, --peak-flops, --no-extras, --jobs).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
  else
    PY="python3"
  fi
fi

# Offline wheels for packages a bare machine lacks (see above); nothing is downloaded.
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/rlx-suite-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_suite.sh: installing the wheels in .whl/ failed; going on without them" >&2
  fi
fi

# rlx not installed: import it from this checkout (kernels/ is the package rlx_kernels).
if ! (cd / && "$PY" -c "import rlx, rlx_kernels" 2>/dev/null); then
  LINKS="$(mktemp -d "${TMPDIR:-/tmp}/rlx-suite-path.XXXXXX")"
  ln -s "$ROOT/kernels" "$LINKS/rlx_kernels"
  export PYTHONPATH="$ROOT:$LINKS${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu_suite.py" "$@"

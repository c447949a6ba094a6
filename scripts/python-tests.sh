#!/usr/bin/env bash
# The Python package's tests: sets up (once) a virtual environment with what python/ needs
# (python/requirements-test.txt: torch, pytorch-optimizer, scikit-learn, pytest, maturin), installs
# the package from the repository with `pip install ./python` (maturin builds the extension in
# release mode; its build folder is cached too), and runs pytest over python/tests.
#
#   scripts/python-tests.sh [PYTEST ARGS...]
#
# OPTC_PY_VENV overrides the environment's place (default ~/.cache/optc-python-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${OPTC_PY_VENV:-$HOME/.cache/optc-python-venv}"
REQ="python/requirements-test.txt"
STAMP="$VENV/.optc-requirements-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    echo "setting up $VENV (torch and the references: a few minutes, about 5 GB)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir -r "$REQ"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# The extension's build folder outlives the clone, so a rebuild compiles only what changed.
export CARGO_TARGET_DIR="${OPTC_PY_TARGET:-$HOME/.cache/optc-python-target}"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python
# Run from python/tests so `import optc` is the installed package, not the source folder.
cd python/tests
exec "$VENV/bin/python" -m pytest -q "$@"

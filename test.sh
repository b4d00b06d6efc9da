#!/usr/bin/env bash
# The tests from a fresh clone: sets up .venv if needed (see scripts/ensure_venv.sh), then runs pytest (the fast
# suite by default; ./test.sh -m slow runs the real-model tests). Arguments go to pytest.
source "$(dirname "$0")/scripts/ensure_venv.sh"
exec .venv/bin/python -m pytest -q "$@"

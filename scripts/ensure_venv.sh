# Sourced by ./run.sh and ./test.sh: make .venv hold the project with its test and default-model extras, doing
# only what is missing. The install is redone when pyproject.toml changes (its sha256 is stamped into .venv).
# Override the interpreter that creates the venv with PYTHON=..., e.g. PYTHON=python3.12 ./test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.refusal_jax-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
    echo "setting up: creating .venv" >&2
    "${PYTHON:-python3}" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up: pip install torch==2.13.0 -e '.[test,default-model,eval]' into .venv" >&2
    .venv/bin/pip install -q torch==2.13.0 -e '.[test,default-model,eval]'
    echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# The main job from a fresh clone: sets up .venv if needed (see scripts/ensure_venv.sh), then finds the refusal
# direction of the bundled model (the first run assembles and converts it into ~/.cache/refusal_jax; later runs
# reuse it). Arguments go to `python -m refusal_jax.extract`, e.g. ./run.sh --preset reference --help
source "$(dirname "$0")/scripts/ensure_venv.sh"
exec .venv/bin/python -m refusal_jax.extract "$@"

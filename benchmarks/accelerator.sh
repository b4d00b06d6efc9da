#!/usr/bin/env bash
# The stage-1 forward, the sweep and decoding with random bf16 weights in the shapes of Qwen2.5-0.5B/7B, Llama-3-8B
# and Gemma-2-9B on this host's accelerators; under 8 minutes on one GPU/TPU host. Last line: one JSON record.
# Runs from a copy of the working tree (no install): needs only jax, flax, chex, optax, orbax-checkpoint, numpy.
#   benchmarks/accelerator.sh                 # all four models, mesh model=<all local devices>
#   benchmarks/accelerator.sh --tiny          # toy sizes (what tests/test_accelerator_bench.py runs on CPU)
#   PEAK_TFLOPS=989 benchmarks/accelerator.sh --models llama-3-8b --mesh model=8
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${ACCELERATOR_BENCH_TIMEOUT_S:-470}" "${PYTHON:-python3}" benchmarks/accelerator.py "$@"

"""benchmarks/accelerator.sh: the real configs have the published parameter counts, and the script runs end to end
at toy sizes on 8 simulated CPU devices (so it is known to run before an accelerator is lent)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import accelerator  # noqa: E402

from refusal_jax.model.params import param_shapes  # noqa: E402

# Parameter counts of the published checkpoints (embeddings, norms and biases included; tied heads counted once).
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "llama-3-8b": 8_030_261_248,
             "gemma-2-9b": 9_241_705_984}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_have_the_published_shapes(name):
    cfg = accelerator.model_config(name, tiny=False)
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == PUBLISHED[name]


def test_accelerator_script_runs_tiny_on_8_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHON=sys.executable)
    models = ["qwen2.5-0.5b", "gemma-2-9b"]  # the two ends: tied + biases; post-norms, softcaps, sliding window
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "accelerator.sh"), "--tiny", "--models", ",".join(models),
                           "--batch", "8", "--seq", "16", "--new-tokens", "4", "--repeats", "1"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["tiny"] and record["mesh"].startswith("model=8") and record["dtype"] == "bfloat16"
    assert record["foreign_modules"] == []  # no torch / gguf / transformers on this path
    for name in models:
        r = record["models"][name]
        for bench in ("stage1_forward", "sweep_chunk", "decode"):
            assert r[bench]["tokens_per_s"] > 0 and r[bench]["tflops_per_s"] > 0, (name, bench, r)
            assert r[bench]["mfu"] is None  # CPU: no peak rate known

"""Shared helpers for the benchmarks: machine description, timing, JSON output, the PyTorch reference model."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()]}
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def timed(fn, repeats: int = 3):
    """(first-call seconds, best steady-state seconds over `repeats`, last result)."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return first, best, result


def emit(record: dict) -> None:
    print(json.dumps(record, indent=2, default=str))


def hf_reference_model(gguf_path: Path):
    """transformers + torch model from the same GGUF file (the PyTorch reference side)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def chat_prompts(n: int, tokenizer, family: str):
    """`n` templated prompts from the bundled sets (half harmful, half harmless)."""
    from refusal_jax.prompts import datasets, templates

    harmful, harmless = datasets.default_sets()
    fmt = templates.chat_format_for(family, tokenizer)
    mixed = [x for pair in zip(harmful, harmless) for x in pair][:n]
    return templates.format_instructions(fmt, mixed), fmt


def xla_op_times(fn, repeats: int = 3, top: int = 8) -> dict:
    """Milliseconds per call spent in each kind of XLA:CPU operation (fusion names without their numeric suffix,
    e.g. `dynamic-slice_bitcast_fusion`, `dot`), read from a jax.profiler trace of `repeats` calls of `fn`."""
    import collections
    import gzip
    import re
    import tempfile

    import jax

    fn()
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(repeats):
            fn()
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kinds = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "Pjit", "end:")) or "::" in name:
            continue  # Python frames and runtime bookkeeping, not XLA operations
        kinds[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / repeats
    return {k: round(v, 2) for k, v in kinds.most_common(top)}

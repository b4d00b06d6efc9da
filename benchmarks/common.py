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
    from refusal_jax import datasets, templates

    harmful, harmless = datasets.default_sets()
    fmt = templates.chat_format_for(family, tokenizer)
    mixed = [x for pair in zip(harmful, harmless) for x in pair][:n]
    return templates.format_instructions(fmt, mixed), fmt

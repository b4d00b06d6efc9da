"""Peak memory of the refusal-score pass over 63 short prompts and one long one, with and without a memory budget.

    python benchmarks/memory_plan.py [--length 800] [--batch-size 16] [--budget 128MB]

Each variant runs in its own process (so its peak resident memory is its own): the prompts batched as before
(`bucketed` without a cost: the long prompt padded into a full batch) and planned by `batching.plan` within the
budget. Prints JSON: per variant the batches (rows x padded length), the estimated peak of the largest batch, the
measured peak RSS of the process, the wall time, and the largest difference of the per-prompt scores between the
two (absolute, and relative to the largest score). A tiny random model (2 layers, d_model 128, 8 heads,
vocabulary 2048); no reference method is involved: both variants are this library, the question is only what a
batch asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def variant(length: int, batch_size: int, budget: int | None) -> dict:
    import jax
    import numpy as np

    from refusal_jax.method import scoring
    from refusal_jax.model.batching import ForwardCost, bucketed
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random

    cfg = tiny_config("qwen2", vocab_size=2048, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                      d_ff=256)
    params = init_random(cfg, jax.random.key(0), scale=0.3)
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(4, cfg.vocab_size, 40)) for _ in range(63)] + [list(rng.integers(4, 2048, length))]
    cost = ForwardCost.for_model(cfg)
    batches = list(bucketed(ids, batch_size, 0, cost=cost if budget else None, budget=budget))
    t0 = time.perf_counter()
    scores = scoring.baseline_refusal_scores(params, cfg, batches, (3, 5))
    seconds = time.perf_counter() - t0
    return {"budget": budget, "batches": [f"{b.tokens.shape[0]}x{b.tokens.shape[1]}" for b in batches],
            "largest_estimate_mb": round(max(cost(*b.tokens.shape) for b in batches) / 1e6, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(seconds, 2), "scores": scores.tolist()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget", default="128MB")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant is not None:
        budget = None if args.variant == "none" else int(args.variant)
        print(json.dumps(variant(args.length, args.batch_size, budget)))
        return
    from refusal_jax.model.batching import parse_bytes

    results = {}
    for name, budget in (("unplanned", "none"), ("planned", str(parse_bytes(args.budget)))):
        out = subprocess.run([sys.executable, __file__, "--length", str(args.length), "--batch-size",
                              str(args.batch_size), "--variant", budget], capture_output=True, text=True,
                             check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = (results[k].pop("scores") for k in ("unplanned", "planned"))
    results["max_score_difference"] = max(abs(x - y) for x, y in zip(a, b))
    results["max_score_difference_relative"] = results["max_score_difference"] / max(abs(x) for x in a)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

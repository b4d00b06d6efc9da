"""Selection sweep: refusal_jax's batched candidates vs the reference's per-candidate hook loop (PyTorch).

Same model, same candidate grid, same validation prompts (unfiltered, so both sides see identical batches),
same run. Reports candidates/s, wall time, compile time separately, and how far the two sides' scores agree.

    python benchmarks/sweep.py [--n-val 32] [--layers 4-11] [--positions=-1] [--chunk 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import emit, hf_reference_model, machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--positions", default="-1")
    p.add_argument("--layers", default="4-11")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also time the sweep's three parts and measure this machine's fp32 matmul rate (JAX and "
                        "torch), to see what bounds the sweep")
    args = p.parse_args()

    import refusal_jax
    from refusal_jax.convert import bundled
    from refusal_jax.method import directions
    from refusal_jax.prompts import datasets, templates
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.pipeline import _int_list

    m = refusal_jax.load_model(args.model, progress=False)
    fmt = templates.chat_format_for(m.cfg.family, m.tokenizer)
    harmful, harmless = datasets.default_sets()

    def batches(xs, bs=32):
        ids = encode(m.tokenizer, templates.format_instructions(fmt, xs))
        return list(bucketed(ids, min(bs, len(ids)), pad_id(m.tokenizer)))

    n_pos = len(templates.eoi_tokens(fmt, m.tokenizer))
    train_h, train_b = batches(harmful[: args.n_train]), batches(harmless[: args.n_train])
    val_h = batches(harmful[args.n_train: args.n_train + args.n_val])
    val_b = batches(harmless[args.n_train: args.n_train + args.n_val])
    diffs = directions.mean_diffs(m.params, m.cfg, train_h, train_b, n_pos)
    grid = directions.candidate_grid(m.cfg, n_pos, _int_list(args.positions), _int_list(args.layers))
    ids = fmt.refusal_token_ids

    t0 = time.perf_counter()
    ours, _ = directions.score_candidates(m.params, m.cfg, diffs, val_h, val_b, ids, grid, chunk=args.chunk)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours, _ = directions.score_candidates(m.params, m.cfg, diffs, val_h, val_b, ids, grid, chunk=args.chunk)
    steady = time.perf_counter() - t0
    record = {"benchmark": "selection_sweep", "machine": machine(), "model": args.model, "dtype": "float32",
              "n_candidates": len(grid), "n_val_harmful": args.n_val, "n_val_harmless": args.n_val,
              "chunk": args.chunk,
              "jax": {"first_run_s": first, "compile_s_approx": first - steady, "steady_s": steady,
                      "candidates_per_s": len(grid) / steady}}
    if not args.skip_torch:
        import reference_torch

        hf = hf_reference_model(bundled.model_path(args.model))
        t0 = time.perf_counter()
        ref = reference_torch.score_candidates(hf, diffs, val_h, val_b, ids, grid)
        t_ref = time.perf_counter() - t0
        record["torch_reference_loop"] = {"wall_s": t_ref, "candidates_per_s": len(grid) / t_ref}
        record["speedup_steady"] = t_ref / steady
        record["speedup_including_compile"] = t_ref / first
        for key in ("refusal_score", "steering_score", "kl_div_score"):
            record[f"max_abs_diff_{key}"] = float(max(abs(a[key] - b[key]) for a, b in zip(ours, ref)))
        best = lambda evs: min(evs, key=lambda e: e["refusal_score"])  # noqa: E731
        record["same_best_candidate"] = (best(ours)["position"], best(ours)["layer"]) == \
            (best(ref)["position"], best(ref)["layer"])
    if args.profile:
        record["profile"] = profile(m, diffs, val_h, val_b, ids, grid, args.chunk)
    emit(record)


def profile(m, diffs, val_h, val_b, ids, grid, chunk) -> dict:
    """Wall time of each part of the sweep, and the machine's fp32 matmul rate on both sides. (XLA's
    cost_analysis counts a lax.scan body once, not once per layer, so it is no use for FLOP counts here.)"""
    from refusal_jax.method import directions
    from refusal_jax.model.transformer import Intervention

    ids = tuple(int(i) for i in ids)
    ablations = [Intervention.ablation(m.cfg, diffs[g]) for g in grid]
    vectors, layers = np.asarray([diffs[g] for g in grid]), [g[1] for g in grid]
    parts = {
        "ablation_harmful": lambda: directions.evaluate_interventions(m.params, m.cfg, val_h, ablations, ids,
                                                                      chunk=chunk),
        "ablation_harmless_kl": lambda: directions.evaluate_interventions(m.params, m.cfg, val_b, ablations, ids,
                                                                          chunk=chunk),
        "actadd_resumed": lambda: directions.evaluate_additions(m.params, m.cfg, val_b, vectors, layers, ids,
                                                                chunk=chunk),
    }
    out = {}
    for name, fn in parts.items():
        fn()
        t0 = time.perf_counter()
        fn()
        out[name] = {"s": time.perf_counter() - t0}
    out["matmul_gflop_per_s"] = matmul_rates(m.cfg)
    return out


def matmul_rates(cfg) -> dict:
    """fp32 [T, D] x [D, F] rate of JAX (XLA) and torch here, at the sweep's shapes (T = 32 prompts x 64 tokens)."""
    import jax
    import jax.numpy as jnp

    T, D, F = 2048, cfg.d_model, cfg.d_ff
    a = jnp.asarray(np.random.default_rng(0).normal(size=(T, D)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(D, F)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        f(a, b).block_until_ready()
    rates = {"jax": 2 * T * D * F * 10 / (time.perf_counter() - t0) / 1e9}
    try:
        import torch

        ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
        ta @ tb
        t0 = time.perf_counter()
        for _ in range(10):
            ta @ tb
        rates["torch"] = 2 * T * D * F * 10 / (time.perf_counter() - t0) / 1e9
    except ImportError:
        pass
    return rates


if __name__ == "__main__":
    main()

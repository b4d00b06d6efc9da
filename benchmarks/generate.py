"""Greedy generation with directional ablation: refusal_jax (KV cache, jit) vs transformers generate() + hooks.

    python benchmarks/generate.py [--n-prompts 16] [--batch-size 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import chat_prompts, emit, hf_reference_model, machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    import jax

    import refusal_jax
    from refusal_jax import Intervention, bundled
    from refusal_jax.batching import bucketed, encode, pad_id
    from refusal_jax.generate import cut_at_stop, greedy_generate, stop_token_ids

    m = refusal_jax.load_model(args.model, progress=False)
    prompts, _ = chat_prompts(args.n_prompts, m.tokenizer, m.cfg.family)
    batches = list(bucketed(encode(m.tokenizer, prompts), args.batch_size, pad_id(m.tokenizer)))
    direction = np.random.default_rng(0).standard_normal(m.cfg.d_model).astype(np.float32)
    iv = Intervention.ablation(m.cfg, direction)
    stops, pad = stop_token_ids(m.tokenizer), pad_id(m.tokenizer)

    def ours():
        return [np.asarray(jax.block_until_ready(greedy_generate(
            m.params, m.cfg, b.tokens, b.mask, iv, max_new_tokens=args.max_new_tokens, stop_ids=stops, pad=pad)))
            for b in batches]

    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = ours()
    steady = time.perf_counter() - t0
    n_new = sum(len(cut_at_stop(r.tolist(), stops)) for g in gen for r in g)
    # batch steps actually run: each batch decodes until its longest row stops
    record = {"benchmark": "generate_ablation", "machine": machine(), "model": args.model, "dtype": "float32",
              "n_prompts": args.n_prompts, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "jax": {"first_run_s": first, "compile_s_approx": first - steady, "steady_s": steady,
                      "generated_tokens": n_new, "tokens_per_s": n_new / steady}}
    if not args.skip_torch:
        import reference_torch

        hf = hf_reference_model(bundled.model_path(args.model))
        t0 = time.perf_counter()
        ref = reference_torch.generate(hf, batches, args.max_new_tokens, pad, stops, direction)
        t_ref = time.perf_counter() - t0
        ref_new = sum(len(cut_at_stop(r, stops)) for r in ref)
        ours_rows = [r.tolist() for g in gen for r in g]
        real = [i for b in batches for i in b.index]
        same = sum(cut_at_stop(ours_rows[k], stops) == cut_at_stop(ref[k], stops)
                   for k in range(len(real)) if real[k] >= 0)
        record["torch_generate_hooks"] = {"wall_s": t_ref, "generated_tokens": ref_new, "tokens_per_s": ref_new / t_ref}
        record["speedup_steady"] = (n_new / steady) / (ref_new / t_ref)
        record["identical_completions"] = f"{same}/{args.n_prompts}"
    emit(record)


if __name__ == "__main__":
    main()

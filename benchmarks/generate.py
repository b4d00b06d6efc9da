"""Greedy generation with directional ablation: refusal_jax (KV cache, jit) vs transformers generate() + hooks.

    python benchmarks/generate.py [--n-prompts 16] [--batch-size 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import chat_prompts, emit, hf_reference_model, machine, xla_op_times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also time one decoding step in both weight layouts, with XLA op times and the matvec "
                        "bandwidth of both sides")
    args = p.parse_args()

    import jax

    import refusal_jax
    from refusal_jax import Intervention
    from refusal_jax.convert import bundled
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.model.generate import cut_at_stop, decoding_params, greedy_generate, stop_token_ids

    m = refusal_jax.load_model(args.model, progress=False)
    prompts, _ = chat_prompts(args.n_prompts, m.tokenizer, m.cfg.family)
    batches = list(bucketed(encode(m.tokenizer, prompts), args.batch_size, pad_id(m.tokenizer)))
    direction = np.random.default_rng(0).standard_normal(m.cfg.d_model).astype(np.float32)
    iv = Intervention.ablation(m.cfg, direction)
    stops, pad = stop_token_ids(m.tokenizer), pad_id(m.tokenizer)

    def ours():
        params = decoding_params(m.params)  # once per set of prompts, as generate_completions
        return [np.asarray(jax.block_until_ready(greedy_generate(
            params, m.cfg, b.tokens, b.mask, iv, max_new_tokens=args.max_new_tokens, stop_ids=stops, pad=pad)))
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
    if args.profile:
        record["profile"] = profile(m, iv, args.batch_size, batches[0].tokens.shape[1] + args.max_new_tokens)
    emit(record)


def profile(m, iv, batch: int, capacity: int) -> dict:
    """One decoding step (batch rows, cache half full) with the stacked layer scan and with `decoding_params`; XLA
    op times of each; the bytes of weights a step reads, against the machine's few-row matmul bandwidth."""
    import jax
    import jax.numpy as jnp

    from refusal_jax.model.generate import CPU_DECODE_OPTIONS, decoding_params
    from refusal_jax.model.transformer import KVCache, forward_unjitted

    out, decoding = {}, decoding_params(m.params, True)
    for name, params, options in (("layer_scan", m.params, None), ("per_layer", decoding, CPU_DECODE_OPTIONS)):
        per_layer = isinstance(params.layers, tuple)
        cache = KVCache.init(m.cfg, batch, capacity, per_layer=per_layer)
        cache = cache.replace(mask=cache.mask.at[:, :capacity // 2].set(True),
                              index=jnp.asarray(capacity // 2, jnp.int32),
                              lengths=jnp.full((batch,), capacity // 2, jnp.int32))
        # the cache is donated and carried from step to step, as in generation's loop (writes past the end clamp)
        step = jax.jit(lambda p, t, c: forward_unjitted(p, m.cfg, t, jnp.ones_like(t), iv, c, logits="last"),
                       donate_argnums=2, compiler_options=options)
        tok = jnp.ones((batch, 1), jnp.int32)
        state = {"cache": cache}

        def run():
            out = step(params, tok, state["cache"])
            state["cache"] = out.cache
            jax.block_until_ready(out.logits)

        run()
        t0 = time.perf_counter()
        for _ in range(10):
            run()
        out[name] = {"step_s": (time.perf_counter() - t0) / 10, "xla_op_ms": xla_op_times(run, top=14)}
    out["weight_bytes_per_step"] = sum(a.nbytes for a in jax.tree.leaves(decoding.layers)) + decoding.lm_head.nbytes
    out["matvec_gb_per_s"] = matvec_bandwidth(batch, m.cfg.d_model, m.cfg.d_ff)
    out["step_floor_s"] = out["weight_bytes_per_step"] / (out["matvec_gb_per_s"]["jax_default_dot"] * 1e9)
    return out


def matvec_bandwidth(rows: int, d: int, f: int, n: int = 48) -> dict:
    """GB/s of weights read by [rows, d] x [d, f] products over n distinct weight matrices (more than the caches)."""
    import jax
    import jax.numpy as jnp

    from refusal_jax.model.generate import CPU_DECODE_OPTIONS

    rng = np.random.default_rng(0)
    ws = [rng.random((d, f), np.float32) for _ in range(n)]
    x = np.ones((rows, d), np.float32)
    out = {}

    def rate(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        return n * d * f * 4 * 5 / (time.perf_counter() - t0) / 1e9

    jw, jx = [jnp.asarray(w) for w in ws], jnp.asarray(x)
    for name, options in (("jax_ynn_fusion", None), ("jax_default_dot", CPU_DECODE_OPTIONS)):
        f_ = jax.jit(lambda x, ws: [x @ w for w in ws], compiler_options=options)
        out[name] = rate(lambda: jax.block_until_ready(f_(jx, jw)))
    try:
        import torch

        tw, tx = [torch.from_numpy(w.T.copy()) for w in ws], torch.from_numpy(x)  # nn.Linear's [out, in]
        with torch.no_grad():
            out["torch_linear"] = rate(lambda: [torch.nn.functional.linear(tx, w) for w in tw])
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    main()

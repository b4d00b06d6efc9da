"""The three hot programs of a run on an accelerator host, with random weights in the shapes of real models.

For each config below (written out from the models' config.json, so nothing is downloaded): the stage-1 forward
(`directions._resid_sums`: resid_pre capture at the post-instruction positions), one sweep chunk
(`scoring._scores`: C candidate ablations vmapped over a batch, last-position logits, refusal score and KL)
and greedy decoding (`generate.greedy_generate`), all in bfloat16 on a mesh over this host's devices
(default model=<all>: tensor parallel, so a model larger than one device fits). Weights are drawn on the devices
straight into their shardings. Prints one JSON record as its last line: per model and benchmark, tokens/s,
compile and steady times, and model-FLOP utilization (useful matmul FLOPs / time / the devices' peak bf16 rate,
from a table of device kinds or $PEAK_TFLOPS per device; null where unknown, e.g. CPU).

Imports only jax, flax, chex, orbax-checkpoint, numpy and refusal_jax's model code (no torch, no gguf, no
transformers on this path). `--tiny` shrinks every config to a few thousand parameters (the CPU test).

    benchmarks/accelerator.sh [--tiny] [--models qwen2.5-0.5b,llama-3-8b] [--mesh model=8] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# config.json of each model, as published (the keys refusal_jax reads; dtype fields dropped)
CONFIGS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 152064},
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "vocab_size": 128256},
    "gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
        "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 16,
        "num_hidden_layers": 42, "num_key_value_heads": 8, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": True, "vocab_size": 256000},
}

# Peak dense bf16 FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12), ("A10G", 70e12), ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
              ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_flops(device) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    kind = getattr(device, "device_kind", "")
    return next((f for key, f in PEAK_FLOPS if key.lower() in kind.lower()), None)


def model_config(name: str, tiny: bool):
    from refusal_jax.model.config import from_hf_config

    hf = dict(CONFIGS[name])
    if tiny:  # same family features, toy sizes
        hf.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
        if "head_dim" in hf:
            hf.update(head_dim=16, query_pre_attn_scalar=16)
    return from_hf_config(hf, strict=False)


def random_params(cfg, mesh, dtype, seed: int = 0):
    """Random weights generated on the devices, each directly in its sharding (never whole on one device)."""
    import jax
    import jax.numpy as jnp

    from refusal_jax.model import sharding
    from refusal_jax.model.params import from_flat, param_shapes, to_flat

    shapes = dict(sorted(param_shapes(cfg).items()))
    shardings = to_flat(sharding.param_shardings(cfg, mesh))

    def make(key):
        out = {}
        for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes.items()):
            noise = jax.random.normal(k, shape, jnp.float32 if "norm" in name else dtype)
            out[name] = (1.0 + 0.1 * noise).astype(dtype) if "norm" in name else (0.02 * noise).astype(dtype)
        return out

    flat = jax.jit(make, out_shardings={n: shardings[n] for n in shapes})(jax.random.key(seed))
    return from_flat(flat)


def matmul_flops_per_token(cfg, context: int, logits: bool) -> float:
    """Forward FLOPs of one token: 2 x matmul weights, attention over `context` keys (QK and AV), LM head if
    `logits`."""
    D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers,
                           cfg.vocab_size)
    weights = L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F)
    return 2.0 * weights + 4.0 * L * N * H * context + (2.0 * D * V if logits else 0.0)


def timed(fn, repeats: int):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def bench_model(name, cfg, mesh, args, peak):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from refusal_jax.method import directions, scoring
    from refusal_jax.model import sharding
    from refusal_jax.model.generate import greedy_generate
    from refusal_jax.model.transformer import Intervention

    t0 = time.perf_counter()
    params = random_params(cfg, mesh, jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    B, T, C, n_pos = args.batch, args.seq, args.chunk, 5
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[: B // 2, : T // 4] = 0  # left padding on half the prompts, as in real batches
    tok, msk = sharding.shard_batch(tokens, mesh), sharding.shard_batch(mask, mesh)
    weight = np.ones(B, np.float32)
    n_devices, out = mesh.devices.size, {"init_s": round(init_s, 3), "n_params": cfg.n_params}

    def record(key, first, best, n_tokens, flops):
        out[key] = {"compile_and_first_s": round(first, 4), "steady_s": round(best, 5),
                    "tokens_per_s": round(n_tokens / best, 2),
                    "tflops_per_s": round(flops / best / 1e12, 4),
                    "mfu": None if peak is None else round(flops / best / (peak * n_devices), 4)}
        log(f"  {name} {key}: {out[key]}")

    # stage 1: resid_pre at the last n_pos positions, summed over the batch (no LM head)
    first, best = timed(lambda: directions._resid_sums(params, cfg, tok, msk, weight, n_pos=n_pos), args.repeats)
    record("stage1_forward", first, best, B * T, B * T * matmul_flops_per_token(cfg, T, logits=False))
    # sweep: one chunk of C ablation candidates over the batch, last-position logits
    dirs = rng.standard_normal((C, cfg.d_model)).astype(np.float32)
    ivs = scoring._stack([Intervention.ablation(cfg, d) for d in dirs])
    base = scoring.last_logits(params, cfg, tok, msk)
    ids = (0, 1)
    first, best = timed(lambda: scoring._scores(params, cfg, tok, msk, ivs, base, ids), args.repeats)
    # per candidate: a full forward of the batch, the LM head at one position per prompt
    flops = C * (B * T * matmul_flops_per_token(cfg, T, logits=False) + B * 2.0 * cfg.d_model * cfg.vocab_size)
    record("sweep_chunk", first, best, C * B * T, flops)
    # decoding: greedy, a prompt batch of gen_batch, new tokens at every step (prefill included in the time)
    G, new = args.gen_batch, args.new_tokens
    gtok, gmsk = sharding.shard_batch(tokens[:G], mesh), sharding.shard_batch(mask[:G], mesh)
    first, best = timed(lambda: greedy_generate(params, cfg, gtok, gmsk, None, max_new_tokens=new), 1)
    flops = G * T * matmul_flops_per_token(cfg, T, logits=False) + sum(
        G * matmul_flops_per_token(cfg, T + s, logits=True) for s in range(new))
    record("decode", first, best, G * new, flops)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--mesh", default="model=-1", help="mesh over this host's devices (default model=<all>)")
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("REFUSAL_JAX_BENCH_TINY")),
                   help="toy sizes of every config (tests; also $REFUSAL_JAX_BENCH_TINY=1)")
    p.add_argument("--batch", type=int, default=32, help="prompts per stage-1/sweep batch (default 32)")
    p.add_argument("--seq", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--chunk", type=int, default=8, help="sweep candidates per chunk (default 8)")
    p.add_argument("--gen-batch", type=int, default=8, help="prompts per decoding batch (default 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decoding call (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after the first call (default 3)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining models once this many seconds have passed (default 420)")
    args = p.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(CONFIGS)}")

    import jax

    from refusal_jax.model import sharding

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(args.mesh)
    device = jax.devices()[0]
    peak = peak_flops(device)
    result = {"benchmark": "accelerator", "tiny": args.tiny, "mesh": sharding.describe(mesh),
              "device_kind": getattr(device, "device_kind", str(device)), "platform": device.platform,
              "jax": jax.__version__, "peak_flops_per_device": peak, "dtype": "bfloat16",
              "shapes": {"batch": args.batch, "seq": args.seq, "chunk": args.chunk, "gen_batch": args.gen_batch,
                         "new_tokens": args.new_tokens}, "models": {}}
    for name in names:
        if time.perf_counter() - t0 > args.budget_s:
            result["models"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        log(f"{name} ...")
        try:
            result["models"][name] = bench_model(name, model_config(name, args.tiny), mesh, args, peak)
        except Exception as e:  # e.g. out of device memory on a small host: report, go on with the next
            result["models"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            log(f"  {name} failed: {result['models'][name]['error']}")
    result["total_s"] = round(time.perf_counter() - t0, 2)
    result["foreign_modules"] = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "gguf", "transformers"})
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Mixture-of-experts forward pass: refusal_jax vs transformers (torch, CPU) on the same random model, same run.

A random model with OLMoE-1B-7B's block shapes (d_model 2048, 16 heads, 64 experts of width 1024, top 8; fewer
layers so that both copies fit in memory) is saved with transformers' `save_pretrained` and converted by
refusal_jax's reader. Both sides run the same left-padded batches and return the last position's logits; the
record has tokens/s of each, their ratio, the largest logit difference, and the per-device bytes of the expert
weights when the experts are split over an `expert` mesh axis of 1, 2, 4 and 8 devices (from the sharding rules,
no devices needed). Prints one JSON record.

    python benchmarks/moe.py [--layers 2] [--batch-size 8] [--seq 128] [--family olmoe]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
from common import emit, machine, timed

SHAPES = {  # the published block shapes; layers and vocabulary are arguments
    "olmoe": dict(arch="OlmoeForCausalLM", config="OlmoeConfig",
                  kw=dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                          num_experts_per_tok=8, intermediate_size=1024, norm_topk_prob=False)),
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", config="Qwen3MoeConfig",  # Qwen3-30B-A3B
                      kw=dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                              intermediate_size=6144, norm_topk_prob=True)),
}


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def expert_bytes_per_device(cfg, ways: int) -> int:
    """Bytes of the expert weights one device holds on a data=1,expert=ways mesh (float32)."""
    from jax.sharding import AbstractMesh, AxisType

    from refusal_jax.model import sharding as shd
    from refusal_jax.model.params import PARAM_AXES, param_shapes

    mesh = AbstractMesh((1, ways, 1), ("data", "expert", "model"), axis_types=(AxisType.Auto,) * 3)
    total = 0
    for name, shape in param_shapes(cfg).items():
        if not name.startswith("layers.expert_"):
            continue
        spec = shd.spec_for(shape, PARAM_AXES[name], mesh)
        split = math.prod(ways if s == "expert" else 1 for s in spec)
        total += 4 * math.prod(shape) // split
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="olmoe", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import torch
    import transformers

    from refusal_jax.convert.hf import load_hf
    from refusal_jax.model.transformer import forward

    spec = SHAPES[args.family]
    hf_cfg = getattr(transformers, spec["config"])(vocab_size=args.vocab, num_hidden_layers=args.layers,
                                                   max_position_embeddings=4096, **spec["kw"])
    torch.manual_seed(0)
    model = getattr(transformers, spec["arch"])(hf_cfg).eval().float()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                w.normal_(0.0, 0.5 / math.sqrt(hf_cfg.hidden_size))  # a router that spreads tokens over experts
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        cfg, params, _ = load_hf(tmp, with_tokenizer=False)
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    B, T = args.batch_size, args.seq
    lengths = rng.integers(T // 2, T + 1, B)
    lengths[0] = T
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n:] = rng.integers(1, args.vocab, n)
        mask[b, T - n:] = 1
    n_tokens = int(mask.sum())

    def ours():
        return np.asarray(jax.block_until_ready(forward(params, cfg, tokens, mask, logits="last").logits))

    positions = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long)

    def theirs():
        with torch.no_grad():
            out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].numpy()

    # alternated, best of each: a machine whose load changes during the run biases neither side
    first, _, ours_logits = timed(ours, 0)
    t_first, _, ref_logits = timed(theirs, 0)
    steady = t_steady = float("inf")
    for _ in range(args.repeats):
        steady = min(steady, seconds(ours))
        t_steady = min(t_steady, seconds(theirs))
    err = float(np.abs(ours_logits - ref_logits).max() / np.abs(ref_logits).max())
    emit({
        "benchmark": "moe_forward", "machine": machine(), "family": args.family, "dtype": "float32",
        "shapes": {"d_model": cfg.d_model, "layers": cfg.n_layers, "heads": [cfg.n_heads, cfg.n_kv_heads],
                   "experts": cfg.n_experts, "top_k": cfg.n_experts_per_tok, "expert_width": cfg.d_expert,
                   "vocab": cfg.vocab_size, "params": cfg.n_params},
        "batch": [B, T], "real_tokens": n_tokens,
        "jax": {"first_call_s": first, "steady_s": steady, "tokens_per_s": n_tokens / steady},
        "torch": {"first_call_s": t_first, "steady_s": t_steady, "tokens_per_s": n_tokens / t_steady,
                  "threads": torch.get_num_threads(),
                  "experts_implementation": getattr(model.config, "_experts_implementation", None)},
        "speedup": t_steady / steady,
        "last_logits_max_rel_diff": err,
        "expert_bytes_per_device": {f"expert={w}": expert_bytes_per_device(cfg, w) for w in (1, 2, 4, 8)},
    })


if __name__ == "__main__":
    main()

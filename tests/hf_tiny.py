"""Tiny random Hugging Face models (torch) saved as safetensors, for parity tests."""

from __future__ import annotations

import numpy as np

FAMILIES = {
    "llama": dict(arch="LlamaForCausalLM", config="LlamaConfig"),
    "llama3_rope": dict(arch="LlamaForCausalLM", config="LlamaConfig",
                        extra=dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=16),
                                   rope_theta=500000.0)),
    "mistral_gqa": dict(arch="MistralForCausalLM", config="MistralConfig", extra=dict(sliding_window=None)),
    "qwen2": dict(arch="Qwen2ForCausalLM", config="Qwen2Config", extra=dict(tie_word_embeddings=True)),
}

# Run by tests/test_parity_families.py (kept apart so tests/test_parity_hf.py does not run them twice). Windows of
# 4-5 tokens, so prompts of 12+ tokens slide; softcaps small enough to bend these tiny models' logits; Gemma-3
# with a linear-scaled global RoPE and a different local base.
MORE_FAMILIES = {
    "mistral_swa": dict(arch="MistralForCausalLM", config="MistralConfig", extra=dict(sliding_window=4)),
    "qwen3": dict(arch="Qwen3ForCausalLM", config="Qwen3Config", extra=dict(head_dim=16)),
    "qwen3_swa": dict(arch="Qwen3ForCausalLM", config="Qwen3Config",
                      extra=dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma": dict(arch="GemmaForCausalLM", config="GemmaConfig", extra=dict(head_dim=16, hidden_act="gelu")),
    "gemma2": dict(arch="Gemma2ForCausalLM", config="Gemma2Config",
                   extra=dict(head_dim=16, num_hidden_layers=4, query_pre_attn_scalar=24, sliding_window=4,
                              attn_logit_softcapping=1.0, final_logit_softcapping=2.0)),
    "gemma3_text": dict(arch="Gemma3ForCausalLM", config="Gemma3TextConfig",
                        extra=dict(head_dim=16, num_hidden_layers=4, query_pre_attn_scalar=32, sliding_window=5,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                "full_attention"],
                                   final_logit_softcapping=3.0,
                                   rope_parameters=dict(
                                       full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1000.0),
                                       sliding_attention=dict(rope_type="default", rope_theta=50.0)))),
}

# Dense families of 2025-26 (tests/test_families_2026.py): Granite with every multiplier away from 1, SmolLM3 with
# its no-RoPE layers (every 2nd here), which SmolLM3Config makes the sliding-window ones (window 4).
DENSE_2026 = {
    "granite": dict(arch="GraniteForCausalLM", config="GraniteConfig",
                    extra=dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                               logits_scaling=2.5)),
    # Phi-3: fused qkv_proj / gate_up_proj, every layer sliding (window 4)
    "phi3": dict(arch="Phi3ForCausalLM", config="Phi3Config", extra=dict(sliding_window=4, bos_token_id=None,
                                                                          eos_token_id=None, pad_token_id=None)),
    # OLMo-2: post-norms only, q/k norm over all heads; OLMo-3 adds sliding layers (window 4) with their own RoPE base
    "olmo2": dict(arch="Olmo2ForCausalLM", config="Olmo2Config", extra=dict(pad_token_id=None, eos_token_id=None)),
    "olmo3": dict(arch="Olmo3ForCausalLM", config="Olmo3Config",
                  extra=dict(pad_token_id=None, eos_token_id=None, num_hidden_layers=4, sliding_window=4,
                             rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1000.0),
                                                  sliding_attention=dict(rope_type="default", rope_theta=50.0)))),
    "smollm3": dict(arch="SmolLM3ForCausalLM", config="SmolLM3Config",
                    extra=dict(num_hidden_layers=4, no_rope_layer_interval=2, tie_word_embeddings=False,
                               use_sliding_window=True, sliding_window=4,
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)),
}

# Mixtures of experts (tests/test_moe.py): 8 experts (Mixtral 4), top 2-3, one with renormalised top-k weights,
# Qwen2-MoE with its gated shared expert, OLMoE with its all-heads q/k norm.
MOE_FAMILIES = {
    "qwen3_moe": dict(arch="Qwen3MoeForCausalLM", config="Qwen3MoeConfig",
                      extra=dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40)),
    "qwen2_moe": dict(arch="Qwen2MoeForCausalLM", config="Qwen2MoeConfig",
                      extra=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                                 shared_expert_intermediate_size=56, norm_topk_prob=True)),
    "mixtral": dict(arch="MixtralForCausalLM", config="MixtralConfig",
                    extra=dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)),
    # gpt-oss: sliding / full layers alternating (window 4), YaRN RoPE, attention sinks, biases, fused experts; a
    # small swiglu_limit so that the clamps act on these tiny activations
    "gpt_oss": dict(arch="GptOssForCausalLM", config="GptOssConfig",
                    extra=dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=40,
                               sliding_window=4, swiglu_limit=0.05)),
    "olmoe": dict(arch="OlmoeForCausalLM", config="OlmoeConfig",
                  extra=dict(num_experts=8, num_experts_per_tok=3, intermediate_size=40, eos_token_id=None,
                             pad_token_id=None)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    import torch
    import transformers

    spec = {**FAMILIES, **MORE_FAMILIES, **MOE_FAMILIES, **DENSE_2026}[family]
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "llama":
        kwargs["num_key_value_heads"] = 4
    kwargs.update(spec.get("extra", {}))
    kwargs.update(overrides)
    cfg = getattr(transformers, spec["config"])(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["arch"])(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-trivial norms catch mapping mistakes
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
                p.copy_(0.5 * torch.randn_like(p))  # routers start at zero (all experts tied); spread the choices
    return model


def left_padded_batch(vocab: int, lengths=(9, 5, 12), seed: int = 0):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n:] = rng.integers(1, vocab, n)
        mask[b, T - n:] = 1
    return tokens, mask


def hf_forward(model, tokens, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def save_and_convert(family: str, path):
    """A tiny random HF model of `family`, saved as safetensors in `path` and converted by refusal_jax:
    (family, hf_model, cfg, params)."""
    from refusal_jax.convert.hf import load_hf

    model = make_hf_model(family)
    model.save_pretrained(path, safe_serialization=True)
    cfg, params, _ = load_hf(str(path), with_tokenizer=False)
    return family, model, cfg, params


def rel_err(a, b, real) -> float:
    """Max abs difference of a and b at the `real` (unpadded) positions, relative to b's largest value there."""
    b = np.asarray(b)[real]
    return float(np.abs(np.asarray(a)[real] - b).max() / max(np.abs(b).max(), 1e-6))

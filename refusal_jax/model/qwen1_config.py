"""Qwen-1 Chat `config.json` (`QWenLMHeadModel`, model_type "qwen") read as the HF-Qwen2-style dict that
`config.from_hf_config` reads: numerically a Qwen-1 block is a Qwen2 block with multi-head attention (see
`refusal_jax.convert.qwen1` for the tensors and the tokenizer, and for what is not implemented and why)."""

from __future__ import annotations

from typing import Any, Mapping

from refusal_jax.errors import ConfigError

ARCHITECTURE = "QWenLMHeadModel"
MODEL_TYPE = "qwen"

# Keys of QWenConfig (configuration_qwen.py) read here, with QWenConfig's defaults.
_DEFAULTS = {
    "layer_norm_epsilon": 1e-6, "kv_channels": 128, "rotary_pct": 1.0, "rotary_emb_base": 10000,
    "no_bias": True, "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
    "seq_length": 8192, "use_cache_quantization": False,
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# QWenConfig keys with no effect on a float forward pass within seq_length.
_NO_EFFECT = {
    "bf16", "fp16", "fp32", "use_flash_attn", "softmax_in_fp32", "use_cache_kernel", "scale_attn_weights",
    "attn_dropout_prob", "emb_dropout_prob", "onnx_safe", "tokenizer_type",
}
_OLD_FORMAT = ("n_embd", "n_head", "n_layer", "ffn_hidden_size", "padded_vocab_size")
# Keys from_hf_config interprets: they have no meaning in a Qwen-1 config, so one there is refused, not ignored.
_QWEN2_KEYS = {
    "rope_scaling", "rope_theta", "rope_parameters", "rope_local_base_freq", "head_dim", "layer_types",
    "sliding_window", "hidden_activation", "hidden_act", "attention_bias", "mlp_bias", "query_pre_attn_scalar",
    "final_logit_softcapping", "attn_logit_softcapping", "num_key_value_heads", "rms_norm_eps",
    "use_bidirectional_attention", "use_sliding_window", "max_window_layers", "sliding_window_pattern",
    "sliding_window_size", "_sliding_window_pattern", "quantization_config_ignored",
}


def is_qwen1_config(hf: Mapping[str, Any]) -> bool:
    return ARCHITECTURE in (hf.get("architectures") or []) or hf.get("model_type") == MODEL_TYPE


def qwen2_style_config(hf: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """A Qwen-1 `config.json` dict as the HF-Qwen2-style dict `from_hf_config` reads (family "qwen").

    Args:
      hf: the parsed Qwen-1 config.json.
      strict: refuse keys that are neither read here nor known to have no effect (see the module docstring).
    Raises:
      ConfigError: an option refusal_jax does not implement, named in the message.
    """
    from refusal_jax.model.config import _IGNORED_KEYS

    hf = dict(hf)
    old = [k for k in _OLD_FORMAT if k in hf]
    if old:
        raise ConfigError(f"old-format Qwen-1 config.json (attributes {', '.join(old)}); download the current "
                          "revision of the model, whose config.json uses hidden_size/num_hidden_layers/...")
    if strict:
        known = set(_DEFAULTS) | set(_REQUIRED) | _NO_EFFECT | ((_IGNORED_KEYS - _QWEN2_KEYS) | {"seq_length"})
        unknown = sorted(k for k in hf if k not in known)
        if unknown:
            raise ConfigError(
                f"unsupported config attribute(s) {', '.join(unknown)} for Qwen-1 ({ARCHITECTURE}): refusal_jax does "
                "not know whether they change the forward pass (pass strict=False / --no-strict-config if you have "
                "checked)")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"Qwen-1 config.json lacks required attribute(s) {', '.join(missing)}")
    get = lambda key: hf.get(key, _DEFAULTS.get(key))  # noqa: E731
    if float(get("rotary_pct")) != 1.0:
        raise ConfigError(f"unsupported config attribute rotary_pct={get('rotary_pct')!r} (partial rotary "
                          "embeddings are not implemented; only rotary_pct=1.0)")
    if not get("no_bias"):
        raise ConfigError("unsupported config attribute no_bias=False (biases on attn.c_proj and the MLP are not "
                          "implemented)")
    if get("use_cache_quantization"):
        raise ConfigError("unsupported config attribute use_cache_quantization=True (int8 KV cache)")
    d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(get("kv_channels"))
    if head_dim * n_heads != d_model:
        raise ConfigError(f"unsupported config attribute kv_channels={head_dim}: modeling_qwen.py splits heads of "
                          f"hidden_size / num_attention_heads = {d_model}/{n_heads}, so kv_channels * "
                          "num_attention_heads must equal hidden_size")
    intermediate = int(hf["intermediate_size"])
    if intermediate % 2:
        raise ConfigError(f"config attribute intermediate_size={intermediate} is odd; Qwen-1's MLP width is "
                          "intermediate_size // 2")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": d_model,
        "intermediate_size": intermediate // 2,  # w1/w2 are [intermediate_size // 2, hidden_size]
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("layer_norm_epsilon")),
        "rope_theta": float(get("rotary_emb_base")),
        "tie_word_embeddings": bool(get("tie_word_embeddings")),
        # Informational only: dynamic NTK / log-n attention (not implemented) start beyond this length.
        "max_position_embeddings": int(get("seq_length")),
    }

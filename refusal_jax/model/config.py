"""ModelConfig: one frozen, hashable description of every supported decoder-only architecture.

The forward pass is one shared block implementation driven by the flags below; a family is only a preset of
flags. Configs come from a Hugging Face `config.json` (`from_hf_config`) or from GGUF metadata (the GGUF
converter turns that metadata into an HF-style dict first). Any attribute that changes the computation and is
not implemented here is refused with a `ConfigError` that names it: a silent wrong answer is worse than none.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from refusal_jax.errors import ConfigError
from refusal_jax.model import families

CONFIG_FORMAT_VERSION = 1

# HF `architectures[0]` / `model_type` -> family (from the family table). Detection never looks at the model's
# name or path.
ARCHITECTURES = families.BY_ARCHITECTURE
MODEL_TYPES = families.BY_MODEL_TYPE
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (HF `rope_parameters` / `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    attention_factor: float = 1.0  # yarn: cos and sin are scaled by it (0.1 ln(factor) + 1 unless given)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a model. Hashable, so it can be a `static_argnames` of jitted functions."""

    family: str
    architecture: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    # RoPE of sliding-window layers where it differs (Gemma-3's local base); None = same as `rope`.
    rope_local: RopeConfig | None = None
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma-3: RMSNorm over head_dim of q and k before RoPE
    tie_embeddings: bool = False
    mlp_activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model), rounded to the activation dtype
    post_norms: bool = False  # Gemma-2/3: RMSNorm on attention/MLP outputs before the residual add
    pre_norms: bool = True  # False: no RMSNorm on the sub-blocks' inputs (OLMo-2/3, which have post_norms only)
    attn_softcap: float | None = None  # Gemma-2
    final_softcap: float | None = None  # Gemma-2
    query_scale: float | None = None  # None = head_dim ** -0.5; Gemma-2/3 use query_pre_attn_scalar ** -0.5
    sliding_window: int | None = None
    # Per layer: True where the layer attends within `sliding_window` only.
    sliding_layers: tuple[bool, ...] = ()
    # Mixture of experts (every block): n_experts SwiGLU experts of width d_expert, n_experts_per_tok chosen per
    # token by softmax(router); norm_topk_prob renormalises the chosen probabilities to sum to 1. Qwen2-MoE adds
    # a shared expert of width d_ff (the dense gate/up/down) scaled by sigmoid(shared_gate). 0 experts = dense.
    n_experts: int = 0
    n_experts_per_tok: int = 0
    d_expert: int = 0
    norm_topk_prob: bool = False
    shared_expert: bool = False
    qk_norm_flat: bool = False  # OLMoE: q/k RMSNorm over all heads at once ([N*H] / [K*H] weights)
    # Expert parallelism: the experts run as this many groups of n_experts / expert_groups, one per shard of the
    # "experts" axis (`sharding.fit_config` sets it from the mesh); 1 = one group. Results do not depend on it.
    expert_groups: int = 1
    # gpt-oss: biases on o_proj, the router and the experts, per-head attention sinks (a learned logit in every
    # softmax), experts' gate/up stored fused and interleaved, and the clamped SwiGLU
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate) with gate <= swiglu_limit, |up| <= swiglu_limit.
    o_bias: bool = False
    attn_sinks: bool = False
    expert_bias: bool = False
    fused_experts: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
    # Per layer: False where the layer's attention has no RoPE (SmolLM3's no_rope_layers); () = RoPE everywhere.
    rope_layers: tuple[bool, ...] = ()
    # Granite: embeddings times embed_multiplier, each sub-block's output times residual_multiplier before the
    # residual add, logits divided by logits_scaling (its attention_multiplier is query_scale).
    embed_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    def __post_init__(self):
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.n_layers)
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.n_layers)
        if len(self.rope_layers) != self.n_layers:
            raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries for {self.n_layers} layers")
        if len(self.sliding_layers) != self.n_layers:
            raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ConfigError("layer_types asks for sliding-window layers but sliding_window is not set")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads={self.n_heads} is not a multiple of "
                              f"num_key_value_heads={self.n_kv_heads}")
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"hidden_act={self.mlp_activation!r} is not supported (silu, gelu_pytorch_tanh)")

    @property
    def norm_offset(self) -> bool:
        """Gemma families: HF applies RMSNorm weights as (1 + w) in float32; we store the folded 1 + w."""
        return self.family in families.FAMILIES and families.FAMILIES[self.family].gemma

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def dense_mlp(self) -> bool:
        """The block has the dense gate/up/down weights: a dense model, or an MoE model's shared expert."""
        return not self.moe or self.shared_expert

    @property
    def q_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    @property
    def n_params(self) -> int:
        d, h = self.d_model, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.d_ff if self.dense_mlp else 0
        if self.moe:
            mlp += 3 * d * self.d_expert * self.n_experts + d * self.n_experts + (d if self.shared_expert else 0)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp) + emb

    # ----------------------------------------------------------------------------------------------
    # (de)serialisation of our own versioned config file
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = CONFIG_FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        version = d.pop("format_version", None)
        if version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"converted checkpoint has config format_version={version!r}, this refusal_jax reads "
                f"version {CONFIG_FORMAT_VERSION}: convert the model again"
            )
        try:
            d["rope"] = RopeConfig(**d["rope"])
            d["rope_local"] = RopeConfig(**d["rope_local"]) if d.get("rope_local") else None
            d["sliding_layers"] = tuple(d["sliding_layers"])
            d["rope_layers"] = tuple(d.get("rope_layers", ()))
            return check_config(cls(**d))
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise ConfigError(f"malformed refusal_jax config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig

# Keys that describe training, generation or bookkeeping, never the forward computation.
_IGNORED_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "attention_dropout",
    "max_position_embeddings", "pretraining_tp", "auto_map", "cache_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "tie_encoder_decoder", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "pruned_heads", "tf_legacy_loss", "cross_attention_hidden_size",
    "quantization_config_ignored", "use_return_dict", "embedding_dropout", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "hidden_dropout", "classifier_dropout", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "output_router_logits",
    "max_window_layers",  # Qwen2: only decides which layers slide; HF writes the outcome into layer_types
    "sliding_window_pattern",  # Gemma-3: likewise summarised by layer_types
    "sliding_window_size",  # old Gemma-2 configs repeat sliding_window under this name; transformers ignores it
    "_sliding_window_pattern",
    "use_sliding_window",  # checked below, together with layer_types
    "attn_implementation", "_attn_implementation_autoset", "rope_scaling", "rope_theta", "rope_parameters",
    "rope_local_base_freq", "head_dim", "layer_types", "sliding_window", "hidden_activation", "hidden_act",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "query_pre_attn_scalar", "final_logit_softcapping",
    "attn_logit_softcapping", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "use_bidirectional_attention",
    # mixtures of experts: read (and checked) in `_moe_fields`; the router's training-only knobs change nothing
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
    "router_jitter_noise", "clip_qkv", "qkv_bias", "swiglu_alpha", "swiglu_limit",
    "quantization_config",  # checked in _from_hf_config: gpt-oss's MXFP4 only
    # read in `_dense_variant_fields` (Granite's multipliers, SmolLM3's layers without RoPE)
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling", "no_rope_layers",
    "no_rope_layer_interval",
    "original_max_position_embeddings",  # Phi-3: only read by longrope, whose rope_type is refused
}


def detect_family(hf: Mapping[str, Any]) -> str:
    """Family from the config's declared architecture or model_type; a clear error for anything else."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    declared = ", ".join(map(str, archs)) or f"model_type={model_type!r}"
    raise ConfigError(
        f"unknown architecture {declared}; refusal_jax supports {', '.join(ARCHITECTURES)} "
        f"(model_type {', '.join(MODEL_TYPES)})"
    )


# RoPE types checked against transformers only for some families (YaRN: gpt-oss's)
ROPE_TYPE_FAMILIES = {"yarn": ("gpt_oss",)}


def _rope_from_params(p: Mapping[str, Any] | None, theta: float, where: str, family: str = "") -> RopeConfig:
    if not p:
        return RopeConfig(theta=float(theta))
    rope_type = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor") not in (None, 1, 1.0):  # Phi-4-mini, GLM-4: RoPE on part of each head
        raise ConfigError(f"unsupported config attribute {where}.partial_rotary_factor={p['partial_rotary_factor']!r}")
    if rope_type not in SUPPORTED_ROPE_TYPES or family not in ROPE_TYPE_FAMILIES.get(rope_type, (family,)):
        raise ConfigError(
            f"unsupported config attribute {where}.rope_type={rope_type!r} "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    theta = float(p.get("rope_theta", theta))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(p["factor"]))
    if rope_type == "yarn":
        for key in ("mscale", "mscale_all_dim", "partial_rotary_factor"):
            if p.get(key) not in (None, 1, 1.0):
                raise ConfigError(f"unsupported config attribute {where}.{key}={p[key]!r}")
        factor = float(p["factor"])
        attention = p.get("attention_factor")
        return RopeConfig(
            theta=theta, rope_type="yarn", factor=factor,
            original_max_position_embeddings=int(p["original_max_position_embeddings"]),
            beta_fast=float(p.get("beta_fast") or 32.0), beta_slow=float(p.get("beta_slow") or 1.0),
            truncate=bool(p.get("truncate", True)),
            attention_factor=float(attention) if attention is not None else
            (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(p["factor"]),
        low_freq_factor=float(p["low_freq_factor"]),
        high_freq_factor=float(p["high_freq_factor"]),
        original_max_position_embeddings=int(p["original_max_position_embeddings"]),
    )


def _ropes(hf: Mapping[str, Any], family: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope) from either transformers-5 `rope_parameters` or the older keys.

    Defaults follow transformers: rope_theta 10000, except Gemma-3 (global 1e6; local `rope_local_base_freq`,
    default 10000). Gemma-3's old-style `rope_scaling` applies to the global (full-attention) layers only.
    """
    default_theta = float(hf.get("rope_theta", 1_000_000.0 if family == "gemma3" else 10000.0))
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        full = _rope_from_params(params.get("full_attention"), default_theta, "rope_parameters.full_attention",
                                 family)
        local = params.get("sliding_attention")
        if family == "gemma3":
            local_rope = _rope_from_params(local, local_theta, "rope_parameters.sliding_attention", family)
        else:
            local_rope = (_rope_from_params(local, default_theta, "rope_parameters.sliding_attention", family)
                          if local else None)
        return full, local_rope
    rope = _rope_from_params(params if params else hf.get("rope_scaling"), default_theta,
                             "rope_parameters" if params else "rope_scaling", family)
    local = None
    if family == "gemma3":
        local = RopeConfig(theta=local_theta)
    return rope, local


def from_hf_config(hf: Mapping[str, Any], *, strict: bool = True) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dict.

    Args:
      hf: the parsed `config.json` (or the HF-style dict the GGUF reader builds).
      strict: refuse keys this function does not know. Set False only to experiment with a config whose extra
        keys you have checked do not change the forward pass.
    Raises:
      ConfigError: unknown architecture, an attribute refusal_jax does not implement (named in the message), or a
        malformed value (wrong type, null, zero or negative size).
    """
    if not isinstance(hf, Mapping):
        raise ConfigError(f"malformed config: expected a JSON object, got {type(hf).__name__}")
    try:
        return check_config(_from_hf_config(hf, strict=strict))
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError,
            RecursionError) as e:
        raise ConfigError(f"malformed config value ({type(e).__name__}: {e})") from None


def check_config(cfg: "ModelConfig") -> "ModelConfig":
    """Sizes positive, heads consistent, norms and RoPE bases finite and positive; returns cfg.

    Raises:
      ConfigError: naming the attribute.
    """
    import math

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"malformed config value {name}={v!r}: must be a positive integer")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"malformed config: n_heads={cfg.n_heads} is not a multiple of n_kv_heads={cfg.n_kv_heads}")
    if not (isinstance(cfg.rms_norm_eps, float) and math.isfinite(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0):
        raise ConfigError(f"malformed config value rms_norm_eps={cfg.rms_norm_eps!r}: must be a positive number")
    for rope in (cfg.rope, cfg.rope_local):
        if rope is not None and not (math.isfinite(rope.theta) and rope.theta > 0 and math.isfinite(rope.factor)
                                     and rope.factor > 0):
            raise ConfigError(f"malformed config value rope theta={rope.theta!r} / factor={rope.factor!r}")
    if len(cfg.sliding_layers) != cfg.n_layers:
        raise ConfigError(f"malformed config: {len(cfg.sliding_layers)} sliding_layers for {cfg.n_layers} layers")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        raise ConfigError(f"malformed config value sliding_window={cfg.sliding_window!r}")
    if cfg.moe:
        for name in ("n_experts_per_tok", "d_expert"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"malformed config value {name}={v!r}: must be a positive integer for an MoE model")
        if not isinstance(cfg.expert_groups, int) or cfg.expert_groups < 1 or cfg.n_experts % cfg.expert_groups:
            raise ConfigError(f"malformed config: expert_groups={cfg.expert_groups!r} does not divide "
                              f"n_experts={cfg.n_experts}")
        if cfg.n_experts_per_tok > cfg.n_experts:
            raise ConfigError(f"malformed config: num_experts_per_tok={cfg.n_experts_per_tok} selects more experts "
                              f"than the {cfg.n_experts} that exist")
    elif cfg.n_experts < 0 or cfg.n_experts_per_tok or cfg.shared_expert:
        raise ConfigError(f"malformed config: n_experts={cfg.n_experts!r} with n_experts_per_tok="
                          f"{cfg.n_experts_per_tok!r} / shared_expert={cfg.shared_expert!r}")
    return cfg


def _from_hf_config(hf: Mapping[str, Any], *, strict: bool) -> ModelConfig:
    hf = dict(hf)
    if "text_config" in hf and "hidden_size" not in hf:
        raise ConfigError(
            "this is a multimodal config (text_config); convert the text-only model (e.g. Gemma3ForCausalLM)"
        )
    family = detect_family(hf)
    if family == "qwen" and "rms_norm_eps" not in hf:
        # A Qwen-1 config.json: map it onto Qwen2 numerics first (its own keys are checked there).
        from refusal_jax.model.qwen1_config import qwen2_style_config

        hf = qwen2_style_config(hf, strict=strict)
    quant = hf.get("quantization_config")
    if family == "gpt_oss" and isinstance(quant, Mapping) and quant.get("quant_method") == "mxfp4":
        pass  # its experts are dequantized on load (refusal_jax.convert.mxfp4); the forward pass is unchanged
    elif "quantization_config" in hf:
        raise ConfigError(
            f"unsupported config attribute quantization_config={hf['quantization_config'].get('quant_method', '?')!r}: "
            "convert an unquantized checkpoint (or a GGUF file, which refusal_jax dequantizes)"
        )
    if strict:
        unknown = sorted(k for k in hf if k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(
                f"unsupported config attribute(s) {', '.join(unknown)} for {family}: refusal_jax does not know "
                "whether they change the forward pass (pass strict=False / --no-strict-config if you have checked)"
            )

    def req(key):
        if key not in hf:
            raise ConfigError(f"config.json lacks required attribute {key!r}")
        return hf[key]

    n_layers = int(req("num_hidden_layers"))
    n_heads = int(req("num_attention_heads"))
    d_model = int(req("hidden_size"))
    spec = families.family(family)
    gemma = spec.gemma

    # transformers reads exactly one key per family: Gemma-2/3 `hidden_activation`, everything else (Gemma-1
    # included) `hidden_act`; the other key, when present, is ignored there and so here.
    if family in ("gemma2", "gemma3"):
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        act = hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if family == "gpt_oss":
        act = "silu"  # its experts' clamped SwiGLU is fixed by swiglu_alpha / swiglu_limit, not hidden_act
    if act in ("gelu_pytorch_tanh", "gelu_tanh") or (family == "gemma" and act == "gelu"):
        # Gemma-1 configs say "gelu" but HF (and the original JAX code) run the tanh approximation.
        act = "gelu_tanh"
    elif act != "silu":
        raise ConfigError(f"unsupported config attribute hidden_act={act!r} (supported: silu, gelu_pytorch_tanh)")

    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key) and not (spec.name == "gpt_oss" and key == "attention_bias"):
            raise ConfigError(f"unsupported config attribute {key}=True (biases on o_proj / MLP are not implemented)")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("unsupported config attribute use_bidirectional_attention=True")

    layer_types = hf.get("layer_types")
    if family in ("mistral", "mixtral", "phi3"):
        # MistralModel (and MixtralModel) ignores layer_types (it warns and points to Ministral): every layer slides iff
        # sliding_window is set.
        layer_types = None
    if layer_types is not None:
        bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ConfigError(f"unsupported config attribute layer_types containing {bad}")
        if len(layer_types) != n_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}")
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and hf.get("sliding_window"):
        start = int(hf.get("max_window_layers", 28))  # transformers' default for both
        sliding = tuple(i >= start for i in range(n_layers))
    elif family == "qwen3_moe" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        sliding = (True,) * n_layers  # Qwen3MoeConfig: every layer or none
    elif family in ("mistral", "mixtral", "phi3") and hf.get("sliding_window"):
        sliding = (True,) * n_layers
    elif family == "gemma2":
        sliding = tuple(i % 2 == 0 for i in range(n_layers))
    elif family == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
    else:
        sliding = (False,) * n_layers
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "smollm3") and not hf.get("use_sliding_window", False):
        # Qwen configs carry a sliding_window value that is unused unless use_sliding_window is set.
        sliding = (False,) * n_layers
    window = hf.get("sliding_window") if any(sliding) else None

    moe = _moe_fields(hf, spec, n_layers)
    if spec.qkv_bias and hf.get("qkv_bias") is False:
        raise ConfigError(f"unsupported config attribute qkv_bias=False for {family} (its attention has biases)")

    rope, rope_local = _ropes(hf, family)
    query_scale = None
    if family in ("gemma2", "gemma3"):
        query_scale = float(hf.get("query_pre_attn_scalar", hf.get("head_dim", d_model // n_heads))) ** -0.5
    variant = _dense_variant_fields(hf, family, n_layers)
    if "query_scale" in variant:
        query_scale = variant.pop("query_scale")

    return ModelConfig(
        family=family,
        architecture=(hf.get("architectures") or [family])[0],
        vocab_size=int(req("vocab_size")),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(hf["shared_expert_intermediate_size"] if spec.shared_expert else req("intermediate_size")),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        rope_local=rope_local,
        qkv_bias=spec.qkv_bias,
        qk_norm=spec.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        mlp_activation=act,
        embed_scale=gemma,
        post_norms=spec.post_norms,
        pre_norms=not spec.no_pre_norms,
        attn_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=hf.get("final_logit_softcapping") if family in ("gemma2", "gemma3") else None,
        query_scale=query_scale,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding,
        **moe,
        **variant,
    )


def _dense_variant_fields(hf: Mapping[str, Any], family: str, n_layers: int) -> dict[str, Any]:
    """Granite's four multipliers and SmolLM3's per-layer RoPE switch as ModelConfig fields; the same keys on any
    other family are refused unless they hold the value that changes nothing."""
    granite = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    out: dict[str, Any] = {}
    if family == "granite":
        m = {k: float(hf.get(k, 1.0)) for k in granite}
        for k, v in m.items():
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"malformed config value {k}={hf[k]!r}: must be a positive number")
        out = dict(embed_multiplier=m["embedding_multiplier"], residual_multiplier=m["residual_multiplier"],
                   query_scale=m["attention_multiplier"], logits_scaling=m["logits_scaling"])
    else:
        present = [k for k in granite if hf.get(k) not in (None, 1, 1.0)]
        if present:
            raise ConfigError(f"unsupported config attribute(s) {', '.join(present)} for {family}")
    if family == "smollm3":
        flags = hf.get("no_rope_layers")
        if flags is None:  # SmolLM3Config's default: every no_rope_layer_interval-th layer has no RoPE
            interval = int(hf.get("no_rope_layer_interval", 4))
            flags = [int((i + 1) % interval != 0) for i in range(n_layers)]
        if len(flags) != n_layers:
            raise ConfigError(f"no_rope_layers has {len(flags)} entries for num_hidden_layers={n_layers}")
        out["rope_layers"] = tuple(bool(f) for f in flags)
    elif hf.get("no_rope_layers") is not None and not all(hf["no_rope_layers"]):
        raise ConfigError(f"unsupported config attribute no_rope_layers for {family}")
    spec = families.family(family)
    if spec.qk_norm_flat and not spec.moe:  # OLMo-2/3 (an MoE family's comes with its MoE fields)
        out["qk_norm_flat"] = True
    return out


def _moe_fields(hf: Mapping[str, Any], spec: "families.Family", n_layers: int) -> dict[str, Any]:
    """The MoE fields of ModelConfig from an HF config (empty for a dense family); a ConfigError names what is not
    implemented: dense layers between the sparse ones (decoder_sparse_step, mlp_only_layers), clip_qkv."""
    moe_keys = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "clip_qkv", "swiglu_alpha",
                "swiglu_limit")
    if not spec.moe:
        present = [k for k in moe_keys if hf.get(k) not in (None, [], 0)]
        if present:
            raise ConfigError(f"unsupported config attribute(s) {', '.join(present)} for the dense family {spec.name}")
        return {}
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"unsupported config attribute clip_qkv={hf['clip_qkv']!r}")
    if int(hf.get("decoder_sparse_step", 1)) != 1:
        raise ConfigError(f"unsupported config attribute decoder_sparse_step={hf['decoder_sparse_step']!r}: every "
                          "block must be sparse (1)")
    if hf.get("mlp_only_layers"):
        raise ConfigError(f"unsupported config attribute mlp_only_layers={hf['mlp_only_layers']!r}: every block "
                          "must be sparse")
    n_experts = hf.get("num_local_experts", hf.get("num_experts"))
    if n_experts is None:
        raise ConfigError("config.json lacks required attribute 'num_experts' (or 'num_local_experts')")
    if "num_experts_per_tok" not in hf:
        raise ConfigError("config.json lacks required attribute 'num_experts_per_tok'")
    # Mixtral, OLMoE and gpt-oss experts are intermediate_size wide; Qwen-MoE names it moe_intermediate_size.
    d_expert = (hf.get("intermediate_size") if spec.name in ("mixtral", "olmoe", "gpt_oss")
                else hf.get("moe_intermediate_size"))
    if d_expert is None:
        raise ConfigError("config.json lacks required attribute 'moe_intermediate_size'")
    if spec.shared_expert and "shared_expert_intermediate_size" not in hf:
        raise ConfigError("config.json lacks required attribute 'shared_expert_intermediate_size'")
    gpt_oss = spec.name == "gpt_oss"
    if gpt_oss and not hf.get("attention_bias", True):
        raise ConfigError("unsupported config attribute attention_bias=False for gpt_oss")
    return dict(
        o_bias=gpt_oss, attn_sinks=gpt_oss, expert_bias=gpt_oss, fused_experts=gpt_oss,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)) if gpt_oss else None,
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)) if gpt_oss else 1.0,
        n_experts=int(n_experts),
        n_experts_per_tok=int(hf["num_experts_per_tok"]),
        d_expert=int(d_expert),
        # Mixtral always renormalises the top-k probabilities (gpt-oss: a softmax over the top-k logits, the same);
        # Qwen-MoE and OLMoE when the config says so.
        norm_topk_prob=True if spec.name in ("mixtral", "gpt_oss") else bool(hf.get("norm_topk_prob", False)),
        shared_expert=spec.shared_expert,
        qk_norm_flat=spec.qk_norm_flat,
    )


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """A few-hundred-parameter config for tests and examples."""
    base = dict(
        family=family, architecture=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=8, d_ff=48, qkv_bias=family in ("qwen", "qwen2"), tie_embeddings=family == "qwen2",
    )
    base.update(overrides)
    return ModelConfig(**base)

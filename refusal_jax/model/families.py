"""The model families refusal_jax implements, in one table that config, templates, conversion and export read.

Adding a family means one `Family` entry here (and its tests); numerics that are not a flag here (sliding-window
patterns, RoPE variants) are read in `config.from_hf_config`.
"""

from __future__ import annotations

import dataclasses

from refusal_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    hf_architecture / hf_model_type: HF config.json `architectures[0]` / `model_type` (detection and export).
    chat_style: the default chat template (a key of `templates.TEMPLATES`); None = chosen from the tokenizer.
    refusal_strings: first tokens of a refusal that the refusal score reads.
    end_of_turn: tokens that end an assistant turn in the family's chat formats (generation stops there, and the
      HF export lists them in generation_config.json) where the tokenizer has them as special tokens.
    gguf_arch: llama.cpp `general.architecture` read as this family (None: no GGUF); gguf_export_arch: the one
      written on export (None: no GGUF export); gguf_qk_permuted: llama.cpp stores q/k rows permuted.
    qkv_bias, qk_norm, post_norms: block structure. gemma: embeddings scaled by sqrt(d_model), RMSNorm weights
      applied as (1 + w) (stored folded), tied embeddings by default.
    hf_export: a Hugging Face safetensors export is supported.
    moe: a mixture-of-experts family (config keys num_experts / num_local_experts, num_experts_per_tok).
    moe_names: HF names of the MoE block and of each expert's (gate, up, down) projections:
      "model.layers.{i}.{block}.experts.{e}.{gate}.weight"; the router is "{block}.{moe_router}.weight".
    shared_expert: Qwen2-MoE's always-on expert ("{block}.shared_expert.*"), scaled by a sigmoid gate
      ("{block}.shared_expert_gate.weight").
    qk_norm_flat: OLMoE's q/k RMSNorm over all heads together (weights [N*H] / [K*H]), before the head split.
    no_pre_norms: OLMo-2/3: the sub-blocks read the residual unnormed (their post_norms normalise the outputs).
    """

    name: str
    hf_architecture: str
    hf_model_type: str
    chat_style: str | None
    refusal_strings: tuple[str, ...] = ("I",)
    end_of_turn: tuple[str, ...] = ()
    gguf_arch: str | None = None
    gguf_export_arch: str | None = None
    gguf_qk_permuted: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    gemma: bool = False
    hf_export: bool = True
    moe: bool = False
    moe_names: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")
    moe_router: str = "gate"
    shared_expert: bool = False
    qk_norm_flat: bool = False
    no_pre_norms: bool = False


_CHATML_END = ("<|im_end|>", "<|endoftext|>")
_GEMMA_END = ("<end_of_turn>",)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Llama-3 ends a turn with <|eot_id|> (and text with <|end_of_text|>), Llama-2 with </s>
    Family("llama", "LlamaForCausalLM", "llama", None, end_of_turn=("<|eot_id|>", "<|end_of_text|>", "</s>"),
           gguf_arch="llama", gguf_export_arch="llama", gguf_qk_permuted=True),
    Family("mistral", "MistralForCausalLM", "mistral", None, end_of_turn=("</s>",), gguf_arch="mistral",
           gguf_export_arch="llama", gguf_qk_permuted=True),
    # Qwen-1: remote-code checkpoints, read by refusal_jax.convert.qwen1
    Family("qwen", "QWenLMHeadModel", "qwen", "chatml", ("I", "As"), _CHATML_END, qkv_bias=True, hf_export=False),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", "chatml", ("I", "As"), _CHATML_END, gguf_arch="qwen2",
           gguf_export_arch="qwen2", qkv_bias=True),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", "chatml", ("I", "As"), _CHATML_END, gguf_arch="qwen3",
           gguf_export_arch="qwen3", qk_norm=True),
    Family("gemma", "GemmaForCausalLM", "gemma", "gemma", end_of_turn=_GEMMA_END, gguf_arch="gemma",
           gguf_export_arch="gemma", gemma=True),
    Family("gemma2", "Gemma2ForCausalLM", "gemma2", "gemma", end_of_turn=_GEMMA_END, gguf_arch="gemma2",
           gguf_export_arch="gemma2", post_norms=True, gemma=True),
    Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", "gemma", end_of_turn=_GEMMA_END, gguf_arch="gemma3",
           gguf_export_arch="gemma3", qk_norm=True, post_norms=True, gemma=True),
    # Granite 3.x (llama blocks with four multipliers: ModelConfig.embed_multiplier ...); its chat format, with
    # <|start_of_role|> turns, comes from the tokenizer
    Family("granite", "GraniteForCausalLM", "granite", None, end_of_turn=("<|end_of_text|>",)),
    # SmolLM3 (llama blocks, every 4th layer without RoPE): ChatML, the thinking switch from the tokenizer
    Family("smollm3", "SmolLM3ForCausalLM", "smollm3", None, end_of_turn=_CHATML_END),
    # Phi-3 / Phi-4 (q/k/v and gate/up stored fused, split on load by convert/fused.py; exported as the Mistral
    # checkpoint it computes): <|user|> ... <|end|> turns from the tokenizer
    Family("phi3", "Phi3ForCausalLM", "phi3", None, end_of_turn=("<|end|>", "<|endoftext|>"), hf_export=False),
    # OLMo-2 / OLMo-3 (OLMo-3: sliding layers from layer_types): norms after attention and MLP only, q/k RMSNorm over
    # all heads together; chat format from the tokenizer
    Family("olmo2", "Olmo2ForCausalLM", "olmo2", None, end_of_turn=("<|im_end|>", "<|endoftext|>"), qk_norm=True,
           qk_norm_flat=True, post_norms=True, no_pre_norms=True),
    Family("olmo3", "Olmo3ForCausalLM", "olmo3", None, end_of_turn=("<|im_end|>", "<|endoftext|>"), qk_norm=True,
           qk_norm_flat=True, post_norms=True, no_pre_norms=True),
    # mixtures of experts: every block's MLP is a routed set of SwiGLU experts
    # Mixtral's GGUF files are llama files with experts (read as mixtral by convert.gguf)
    Family("mixtral", "MixtralForCausalLM", "mixtral", None, end_of_turn=("</s>",), gguf_export_arch="llama", moe=True,
           moe_names=("block_sparse_moe", "w1", "w3", "w2")),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "chatml", ("I", "As"), _CHATML_END, gguf_arch="qwen2moe",
           gguf_export_arch="qwen2moe",
           qkv_bias=True, moe=True, shared_expert=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "chatml", ("I", "As"), _CHATML_END, gguf_arch="qwen3moe",
           gguf_export_arch="qwen3moe",
           qk_norm=True, moe=True),
    Family("olmoe", "OlmoeForCausalLM", "olmoe", None, end_of_turn=("<|endoftext|>",), gguf_arch="olmoe",
           gguf_export_arch="olmoe", qk_norm=True, moe=True, qk_norm_flat=True),
    # gpt-oss (harmony chat format, from the tokenizer): biases everywhere, attention sinks, fused experts
    Family("gpt_oss", "GptOssForCausalLM", "gpt_oss", None, end_of_turn=("<|return|>", "<|end|>", "<|call|>"),
           qkv_bias=True, moe=True, moe_router="router"),
)}

# Derived views, keyed the way each reader looks a family up.
BY_ARCHITECTURE = {f.hf_architecture: f.name for f in FAMILIES.values()}
BY_MODEL_TYPE = {f.hf_model_type: f.name for f in FAMILIES.values()}
BY_GGUF_ARCH = {f.gguf_arch: f for f in FAMILIES.values() if f.gguf_arch}
# Every family's end-of-turn tokens: generation stops at those the tokenizer has as special tokens, whatever the
# family (a checkpoint may carry another family's chat template).
END_OF_TURN = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.end_of_turn))


def family(name: str) -> Family:
    """The table entry of `name`; ConfigError naming the supported families otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]

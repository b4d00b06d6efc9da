"""Export a (possibly edited) model as a Hugging Face checkpoint: config.json, safetensors, tokenizer.

The exported directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and with
`refusal_jax.load_model(out_dir)`. Weights are streamed: tensors are converted back to HF layout one at a time
(`engine.to_hf_tensors`) and written straight into their safetensors file, whose header is computed up front
from the config, so peak host memory is the model plus one tensor. Everything is written into a sibling
temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from refusal_jax.convert import engine
from refusal_jax.convert.safetensors_io import raw_bytes
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model import families
from refusal_jax.model.config import ARCHITECTURES, ModelConfig, RopeConfig, from_hf_config
from refusal_jax.model.params import Params

# family -> (HF architecture, model_type)
HF_NAMES = {f.name: (f.hf_architecture, f.hf_model_type) for f in families.FAMILIES.values() if f.hf_export}
DEFAULT_SHARD_SIZE = 2 * 2**30  # bytes; one file up to this size, shards of at most this size above it

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
_DTYPE_NAMES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ------------------------------------------------------------------------------------------------
# config.json

def _rope_parameters(rope: RopeConfig) -> dict[str, Any]:
    """transformers-5 `rope_parameters` entry of one attention kind."""
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.rope_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.rope_type == "yarn":
        out.update(factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate,
                   original_max_position_embeddings=rope.original_max_position_embeddings,
                   attention_factor=rope.attention_factor)
    return out


def _rope_scaling(rope: RopeConfig) -> dict[str, Any] | None:
    """The pre-transformers-5 `rope_scaling` dict (None for plain RoPE)."""
    if rope.rope_type == "default":
        return None
    out = _rope_parameters(rope)
    out.pop("rope_theta")
    return out


def as_exportable(cfg: ModelConfig) -> ModelConfig:
    """Qwen-1 exports as Qwen2 (same computation: fused c_attn split into biased q/k/v, SwiGLU, RMSNorm), which
    transformers loads without remote code."""
    if cfg.family == "qwen":
        return dataclasses.replace(cfg, family="qwen2", architecture="Qwen2ForCausalLM")
    if cfg.family == "phi3":  # Phi-3 = Mistral with q/k/v and gate/up fused (every layer slides or none)
        return dataclasses.replace(cfg, family="mistral", architecture="MistralForCausalLM")
    return cfg


def _normalised(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with fields that HF cannot distinguish replaced by what they compute (for the round-trip check)."""
    arch = cfg.architecture if cfg.architecture in ARCHITECTURES else HF_NAMES[cfg.family][0]
    window = cfg.sliding_window if any(cfg.sliding_layers) else None
    local = cfg.rope_local
    if cfg.family in ("gemma3", "olmo3") and local is None:
        local = cfg.rope
    query_scale = cfg.q_scale if cfg.family in ("gemma2", "gemma3", "granite") else cfg.query_scale
    return dataclasses.replace(cfg, architecture=arch, sliding_window=window, rope_local=local,
                               query_scale=query_scale)


def _query_pre_attn_scalar(cfg: ModelConfig) -> int | float:
    scalar = cfg.q_scale ** -2
    nearest = round(scalar)
    # HF configs hold an integer; recover it exactly so from_hf_config gives back the same float.
    if nearest > 0 and abs(scalar - nearest) <= 1e-9 * nearest:
        return int(nearest)
    return scalar


def to_hf_config(cfg: ModelConfig, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A transformers `config.json` dict for `cfg`.

    Writes RoPE both as transformers-5 `rope_parameters` and as the older `rope_theta` / `rope_scaling` (and
    Gemma-3's `rope_local_base_freq`), so transformers 4.x and 5.x read the same model.

    Args:
      cfg: the model config.
      extra: keys to add that ModelConfig does not hold (max_position_embeddings, bos/eos/pad_token_id, dtype);
        they never override the keys computed from `cfg`.
    Raises:
      ConfigError: a config that the family's Hugging Face class cannot express (e.g. per-layer sliding windows
        on Mistral, q/k/v biases on Llama); checked by reading the dict back with `from_hf_config`.
    """
    cfg = as_exportable(cfg)
    if cfg.family not in HF_NAMES:
        raise ConfigError(f"cannot export family {cfg.family!r} (supported: {', '.join(HF_NAMES)})")
    arch, model_type = HF_NAMES[cfg.family]
    if cfg.architecture in ARCHITECTURES and ARCHITECTURES[cfg.architecture] == cfg.family:
        arch = cfg.architecture
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp_activation]
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        ("hidden_activation" if cfg.family in ("gemma2", "gemma3") else "hidden_act"): act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }

    # RoPE
    if cfg.family == "gemma3":
        local = cfg.rope_local or cfg.rope
        if local.rope_type != "default":
            raise ConfigError("Gemma-3 sliding-window layers with a scaled RoPE cannot be written as "
                              "rope_local_base_freq")
        hf["rope_parameters"] = {"full_attention": _rope_parameters(cfg.rope),
                                 "sliding_attention": _rope_parameters(local)}
        hf["rope_local_base_freq"] = local.theta
    else:
        if cfg.rope_local is not None and cfg.rope_local != cfg.rope and cfg.family != "olmo3":
            raise ConfigError(f"{cfg.family} has one RoPE for all layers; this config has a separate local RoPE")
        hf["rope_parameters"] = _rope_parameters(cfg.rope)
    hf["rope_theta"] = cfg.rope.theta
    scaling = _rope_scaling(cfg.rope)
    if scaling is not None:
        hf["rope_scaling"] = scaling
        if cfg.rope.rope_type == "llama3":
            # transformers warns when original_max_position_embeddings >= max_position_embeddings
            hf["max_position_embeddings"] = int(cfg.rope.original_max_position_embeddings * cfg.rope.factor)

    # sliding windows
    sliding = list(cfg.sliding_layers)
    layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    window = cfg.sliding_window if any(sliding) else None
    if cfg.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = any(sliding)
        hf["sliding_window"] = window
        first = sliding.index(True) if any(sliding) else cfg.n_layers
        hf["max_window_layers"] = first
        hf["layer_types"] = layer_types
    elif cfg.family == "mistral":
        if any(sliding) and not all(sliding):
            raise ConfigError("Mistral applies its sliding window to every layer; this config slides only some")
        hf["sliding_window"] = window
    elif cfg.family in ("gemma2", "gemma3"):
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = layer_types
        if cfg.family == "gemma3":
            for p in range(1, cfg.n_layers + 2):  # the pre-`layer_types` encoding, when the pattern has one
                if sliding == [(i + 1) % p != 0 for i in range(cfg.n_layers)]:
                    hf["sliding_window_pattern"] = p
                    break
    elif cfg.family == "olmo3":  # per-layer sliding, and a RoPE per attention kind
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = layer_types
        hf["rope_parameters"] = {"full_attention": _rope_parameters(cfg.rope),
                                 "sliding_attention": _rope_parameters(cfg.rope_local or cfg.rope)}
    elif any(sliding) and cfg.family not in ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "smollm3"):
        raise ConfigError(f"{cfg.family} has no sliding-window attention; this config slides layers {sliding}")

    if cfg.moe:  # mixtures of experts, in each family's own keys (Mixtral / OLMoE experts are intermediate_size wide)
        hf["num_local_experts" if cfg.family in ("mixtral", "gpt_oss") else "num_experts"] = cfg.n_experts
        hf["num_experts_per_tok"] = cfg.n_experts_per_tok
        if cfg.family in ("mixtral", "olmoe", "gpt_oss"):
            hf["intermediate_size"] = cfg.d_expert
        else:
            hf["moe_intermediate_size"] = cfg.d_expert
            hf["decoder_sparse_step"], hf["mlp_only_layers"] = 1, []
        if cfg.family not in ("mixtral", "gpt_oss"):
            hf["norm_topk_prob"] = cfg.norm_topk_prob
        if cfg.shared_expert:
            hf["shared_expert_intermediate_size"] = cfg.d_ff
        if cfg.family == "qwen2_moe":
            hf["qkv_bias"] = True
    if cfg.family in ("qwen2_moe", "qwen3_moe"):
        if any(sliding) and not all(sliding):
            raise ConfigError(f"{cfg.family} export writes a sliding window for every layer or none")
        hf["use_sliding_window"] = any(sliding)
        hf["sliding_window"] = window
        if cfg.family == "qwen2_moe":
            hf["max_window_layers"] = cfg.n_layers
            hf["layer_types"] = layer_types
    elif cfg.family == "gpt_oss":
        hf["attention_bias"] = True
        hf["swiglu_alpha"], hf["swiglu_limit"] = cfg.swiglu_alpha, cfg.swiglu_limit
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = layer_types
    elif cfg.family == "mixtral":
        if any(sliding) and not all(sliding):
            raise ConfigError("Mixtral applies its sliding window to every layer; this config slides only some")
        hf["sliding_window"] = window
    if cfg.family in ("gemma2", "gemma3"):
        hf["query_pre_attn_scalar"] = _query_pre_attn_scalar(cfg)
        hf["final_logit_softcapping"] = cfg.final_softcap
        hf["attn_logit_softcapping"] = cfg.attn_softcap
    if cfg.family == "granite":
        hf.update(embedding_multiplier=cfg.embed_multiplier, residual_multiplier=cfg.residual_multiplier,
                  attention_multiplier=cfg.q_scale, logits_scaling=cfg.logits_scaling)
    if cfg.family == "smollm3":
        hf["no_rope_layers"] = [int(r) for r in cfg.rope_layers]
        hf["use_sliding_window"] = any(sliding)
        hf["sliding_window"] = window
        hf["layer_types"] = layer_types
    for key, value in (extra or {}).items():
        hf.setdefault(key, value)
    if cfg.family == "smollm3":  # SmolLM3Config defaults to token ids of its own 128k vocabulary
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            hf.setdefault(key, None)

    # Anything the family's HF class cannot express shows up as a difference here.
    back = from_hf_config(hf)
    want = _normalised(cfg)
    if _normalised(back) != want:
        diff = [f"{f.name}={getattr(want, f.name)!r} (HF would give {getattr(_normalised(back), f.name)!r})"
                for f in dataclasses.fields(ModelConfig)
                if getattr(want, f.name) != getattr(_normalised(back), f.name)]
        raise ConfigError(f"cannot express this {cfg.family} config as a Hugging Face {arch} config: "
                          + "; ".join(diff))
    return hf


def generation_config(tokenizer) -> dict[str, Any]:
    """generation_config.json: BOS, pad, and as EOS the tokenizer's EOS plus the end-of-turn tokens of the
    supported chat formats that this tokenizer has as added/special tokens (an ordinary vocabulary entry
    spelled "</s>", as in Qwen's BPE vocabulary, is not an end of turn)."""
    from refusal_jax.model.families import END_OF_TURN

    out: dict[str, Any] = {}
    if tokenizer is None:
        return out
    special = {str(tok): int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    stops = sorted({int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set())
    stops += sorted({special[t] for t in END_OF_TURN if t in special} - set(stops))
    if getattr(tokenizer, "bos_token_id", None) is not None:
        out["bos_token_id"] = int(tokenizer.bos_token_id)
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if getattr(tokenizer, "pad_token_id", None) is not None:
        out["pad_token_id"] = int(tokenizer.pad_token_id)
    return out


# ------------------------------------------------------------------------------------------------
# streamed safetensors

def _plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_size: int) -> list[list[int]]:
    """Group tensor indices (in order) into shards of at most shard_size bytes (one tensor may exceed it)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(specs):
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(specs: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors_stream(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype,
                             tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write one safetensors file whose header is known up front, consuming `tensors` one at a time.

    `tensors` must yield exactly the names of `specs`, in order, with those shapes and dtype `dtype`.
    """
    dtype = np.dtype(dtype)
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(_header(specs, dtype))
        for name, shape in specs:
            got_name, arr = next(it)
            if got_name != name or tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
                raise CheckpointError(f"{path}: expected tensor {name} {shape} {dtype}, got {got_name} "
                                      f"{tuple(arr.shape)} {arr.dtype}")
            f.write(raw_bytes(arr))


def save_hf(
    out_dir: str | Path,
    cfg: ModelConfig,
    params: Params,
    tokenizer=None,
    *,
    dtype: str = "float32",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    edit: Callable[[str, int | None, np.ndarray], np.ndarray] | None = None,
    sources=(),
) -> Path:
    """Write `params` as a Hugging Face checkpoint directory.

    Args:
      out_dir: the output directory; refused if it exists unless `overwrite` (and then only a refusal_jax output,
        moved aside, see `refusal_jax.runs.outputs`).
      cfg: the config of `params` (for an orthogonalized model: `untied_config(cfg)`).
      params: Params (numpy or jax arrays).
      tokenizer: saved with `save_pretrained` (chat template included) and used for generation_config.json's
        bos/eos/pad ids; None writes no tokenizer files.
      dtype: "float32", "bfloat16" or "float16" for the weights.
      shard_size: bytes; a larger model is split into model-0000i-of-0000n.safetensors files plus
        model.safetensors.index.json.
      overwrite: replace an existing `out_dir`.
      extra_config: extra config.json keys (e.g. max_position_embeddings of the source model).
      on_tensor: called with each tensor name after it is written.
      edit: a per-tensor edit applied while streaming (see `engine.to_hf_tensors`).
      sources: paths `out_dir` must never replace (the source model, ...).
    Returns:
      The resolved output directory.
    """
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPE_NAMES)}")
    np_dtype = np.dtype(_DTYPE_NAMES[dtype])
    from refusal_jax.runs import outputs

    out_dir = outputs.check_target(out_dir, overwrite=overwrite, sources=sources, create_parents=True,
                                   kind="hf_export")

    extra = dict(extra_config or {})
    tok_ids = generation_config(tokenizer)
    for key in ("bos_token_id", "pad_token_id"):
        if key in tok_ids:
            extra.setdefault(key, tok_ids[key])
    if "eos_token_id" in tok_ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        extra.setdefault("eos_token_id", int(tokenizer.eos_token_id))
    extra.setdefault("dtype", dtype)
    hf_config = to_hf_config(cfg, extra=extra)

    with outputs.atomic_output(out_dir, overwrite=overwrite, sources=sources, kind="hf_export",
                               create_parents=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(tok_ids, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

        specs = [(name, shape) for name, shape, _, _ in engine.hf_tensor_plan(cfg)]
        shards = _plan_shards(specs, np_dtype.itemsize, shard_size)
        tensors = engine.to_hf_tensors(cfg, params, dtype=np_dtype, edit=edit)
        if on_tensor is not None:
            tensors = _tap(tensors, on_tensor)
        if len(shards) == 1:
            write_safetensors_stream(tmp / "model.safetensors", specs, np_dtype, tensors)
        else:
            weight_map, total = {}, 0
            for k, idxs in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                shard_specs = [specs[i] for i in idxs]
                write_safetensors_stream(tmp / fname, shard_specs, np_dtype, tensors)
                for name, shape in shard_specs:
                    weight_map[name] = fname
                    total += int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _tap(tensors, on_tensor):
    for name, arr in tensors:
        yield name, arr
        on_tensor(name)

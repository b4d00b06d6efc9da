"""Write a (possibly edited, e.g. orthogonalized) model as a llama.cpp GGUF file.

    >>> from refusal_jax.convert.gguf_writer import save_gguf
    >>> save_gguf("out.gguf", cfg, params, tokenizer_source="model.gguf", tensor_type="source")

The command: `python -m refusal_jax.convert.export_gguf --model SRC --out OUT.gguf [--direction D --method ...]`.

What is written is exactly what `refusal_jax.convert.gguf` reads back (and what llama.cpp's
`convert_hf_to_gguf.py` writes):

* Architecture metadata for `general.architecture` = llama (also used for Mistral without a sliding window, as
  llama.cpp does), qwen2, qwen3, gemma, gemma2, gemma3: sizes, head counts, head dim (`key_length` /
  `value_length`, and `rope.dimension_count` for llama), RMSNorm epsilon, RoPE base, linear RoPE scaling, and for
  Gemma-2/3 the soft-caps, sliding window, `attention.scale` (= the query scale) and Gemma-3's local RoPE base
  and per-layer sliding pattern. Llama-3 RoPE scaling is written as llama.cpp's `rope_freqs.weight` tensor.
  Configs a GGUF file cannot express (sliding windows on llama/qwen, a non-default Gemma-2 pattern) are refused.
* Tensors in llama.cpp naming (`token_embd`, `blk.{i}.attn_q`, ...; the exact inverse of the reader's table) and
  layout: GGUF stores numpy row-major = HF torch order, so tensors come from `engine.to_hf_tensors`; q/k rows of
  llama-architecture files are permuted to ggml's interleaved RoPE layout (`gguf.permute_qk`, the inverse of the
  reader's `unpermute_qk`); Gemma norms are written as the folded 1 + w llama.cpp stores. An untied config (every
  orthogonalized model) gets an `output.weight`.
* Tokenizer: with `tokenizer_source` (the source GGUF file) every `tokenizer.*` key and the descriptive
  `general.*` keys are copied with their exact GGUF value types. Without it no tokenizer is written: llama.cpp
  needs one, so export from a GGUF source, or load the file with `load_gguf(..., tokenizer=False)`.
* Tensor types (`tensor_type`): "f32"; "f16" and "bf16" (2-D weights; norms and biases stay F32, as llama.cpp
  keeps them); "q8_0" (2-D weights whose rows are a multiple of 32 long, others F16); "source": each tensor in
  the type it had in `tokenizer_source` when gguf-py can encode that type (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
  Q5_0, Q5_1), otherwise (K-quants, IQ types, or a row length the block size does not divide) Q8_0, else F16;
  a tensor the source does not have (the untied output.weight of an orthogonalized tied model) is F16.
  Quantized re-encoding is lossy, and gguf-py cannot encode K-quants: an edited Q4_K_M model comes back mostly
  Q8_0, larger than its source. `save_gguf` returns every such change (`type_changes`) and the command prints
  them with both file sizes.
* Provenance: `metadata` adds keys of its own; the command records an edit as `refusal_jax.version`,
  `refusal_jax.edit.method`, `refusal_jax.edit.direction_sha256` (sha256 of the direction as float32
  little-endian bytes, shape [D] or [k, D]) and `refusal_jax.edit.direction_source`, and appends
  " (refusal direction orthogonalized)" to the source's general.name unless --name is given.

The file is written tensor by tensor (header first, from the plan), into a temporary sibling that is renamed
into place at the end, so peak memory is the model plus one tensor and no half-written file keeps the name.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refusal_jax.convert import dtypes, engine
from refusal_jax.convert.gguf import _EXPERT_WEIGHTS_NORM, _GLOBAL_NAMES, _layer_names, _moe_layer_names, permute_qk
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model import families
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params

# family -> GGUF general.architecture
GGUF_ARCH = {f.name: f.gguf_export_arch for f in families.FAMILIES.values() if f.gguf_export_arch}
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "source")
# general.* keys that describe the file itself, never copied from the source
_OWN_GENERAL = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


def _qtypes():
    import gguf

    Q = gguf.GGMLQuantizationType
    return Q, {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}


# ------------------------------------------------------------------------------------------------
# names


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, for every tensor of `cfg` (the inverse of the reader's mapping)."""
    arch = _arch(cfg)
    inv_global = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    layer_names = _layer_names(arch)
    if cfg.moe:
        layer_names.update(_moe_layer_names(families.FAMILIES[cfg.family]))
    inv_layer = {hf: g for g, hf in layer_names.items()}
    out = {}
    for hf_name, _, _, layer in stacked_plan(cfg):
        if layer is None:
            out[hf_name] = inv_global[hf_name]
        else:
            prefix = f"model.layers.{layer}."
            base, suffix = hf_name[len(prefix):].rsplit(".", 1)
            out[hf_name] = f"blk.{layer}.{inv_layer[base]}.{suffix}"
    return out


# a per-expert HF tensor: (prefix up to the expert index, expert, projection and suffix)
_EXPERT_TENSOR = re.compile(r"(model\.layers\.\d+\.\w+\.experts\.)(\d+)(\.\w+\.weight)")


def stacked_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str, int | None]]:
    """`engine.hf_tensor_plan` as llama.cpp lays a file out: each layer's experts of one projection as one stacked
    entry [E, out, in] named with an {e} field (ffn_*_exps), placed where its last expert is; Qwen2-MoE's
    shared-expert gate [1, D] as llama.cpp's [D]. Entries: (HF name, GGUF-order shape, field, layer or None)."""
    plan, seen = [], Counter()
    for hf_name, shape, field, index in engine.hf_tensor_plan(cfg):
        if isinstance(index, tuple):
            m = _EXPERT_TENSOR.fullmatch(hf_name)
            template = f"{m.group(1)}{{e}}{m.group(3)}"
            seen[template] += 1
            if seen[template] == cfg.n_experts:
                plan.append((template, (cfg.n_experts, *shape), field, index[0]))
        elif hf_name.endswith("shared_expert_gate.weight"):
            plan.append((hf_name, (int(np.prod(shape)),), field, index))
        else:
            plan.append((hf_name, tuple(shape), field, index))
    return plan


def _arch(cfg: ModelConfig) -> str:
    if cfg.family not in GGUF_ARCH:
        raise ConfigError(f"cannot export family {cfg.family!r} as GGUF (supported: {', '.join(GGUF_ARCH)})")
    return GGUF_ARCH[cfg.family]


# ------------------------------------------------------------------------------------------------
# metadata


def _check_expressible(cfg: ModelConfig) -> None:
    arch = _arch(cfg)
    sliding = any(cfg.sliding_layers)
    if cfg.moe and cfg.norm_topk_prob != _EXPERT_WEIGHTS_NORM[cfg.family]:
        raise ConfigError(f"llama.cpp's {arch} {'never' if cfg.norm_topk_prob else 'always'} renormalises the "
                          f"top-k expert weights; this {cfg.family} config has norm_topk_prob={cfg.norm_topk_prob}")
    if arch in ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe") and sliding:
        raise ConfigError(f"{cfg.family} with sliding-window attention cannot be written as a GGUF {arch} file")
    if cfg.family == "gemma2":
        want = tuple(i % 2 == 0 for i in range(cfg.n_layers))
        if cfg.sliding_layers != want:
            raise ConfigError("GGUF gemma2 files always slide the even layers; this config slides "
                              f"{[i for i, s in enumerate(cfg.sliding_layers) if s]}")
    if cfg.rope.rope_type == "llama3" and arch != "llama":
        raise ConfigError(f"llama3 RoPE scaling can only be written for llama files, not {arch}")
    if cfg.rope_local is not None and cfg.family != "gemma3" and cfg.rope_local != cfg.rope:
        raise ConfigError(f"{cfg.family} has one RoPE for all layers; this config has a separate local RoPE")
    if cfg.family == "gemma3" and cfg.rope_local is not None and cfg.rope_local.rope_type != "default":
        raise ConfigError("Gemma-3 sliding-window layers with a scaled RoPE cannot be written as GGUF")
    if cfg.attn_softcap and cfg.family != "gemma2":
        raise ConfigError(f"attention soft-capping cannot be written for {arch}")
    if cfg.final_softcap and cfg.family not in ("gemma2", "gemma3"):
        raise ConfigError(f"final logit soft-capping cannot be written for {arch}")
    if cfg.family == "gemma2" and not (cfg.attn_softcap and cfg.final_softcap):
        raise ConfigError("GGUF gemma2 files without soft-capping are read with llama.cpp's defaults (50, 30)")
    if cfg.query_scale is not None and cfg.family not in ("gemma2", "gemma3"):
        raise ConfigError(f"a non-default query scale cannot be written for {arch}")


def _write_arch_metadata(w, cfg: ModelConfig, context_length: int) -> None:
    import gguf

    arch = _arch(cfg)
    w.add_context_length(int(context_length))
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    # Mixtral (a llama file) and OLMoE name the experts' width feed_forward_length, Qwen-MoE has a key of its own
    w.add_feed_forward_length(cfg.d_expert if cfg.moe and arch in ("llama", "olmoe") else cfg.d_ff)
    if cfg.moe:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)
        if arch in ("qwen2moe", "qwen3moe"):
            w.add_expert_feed_forward_length(cfg.d_expert)
        if cfg.shared_expert:
            w.add_expert_shared_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(cfg.rope.theta))
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope.rope_type == "linear" and cfg.rope.factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope.factor))
    if cfg.family in ("gemma2", "gemma3"):
        w.add_attention_scale(float(cfg.q_scale))
        w.add_sliding_window(int(cfg.sliding_window or 4096))
        if cfg.final_softcap:
            w.add_final_logit_softcapping(float(cfg.final_softcap))
    if cfg.family == "gemma2":
        w.add_attn_logit_softcapping(float(cfg.attn_softcap))
    if cfg.family == "gemma3":
        w.add_rope_freq_base_swa(float((cfg.rope_local or cfg.rope).theta))
        w.add_sliding_window_pattern([bool(s) for s in cfg.sliding_layers])



def _copy_metadata(w, source, keys: Callable[[str], bool]) -> list[str]:
    """Copy metadata keys (with their exact GGUF types) from a GGUF file; returns the keys copied."""
    import gguf

    from refusal_jax.convert.gguf import _field_value, read_gguf

    src = source if hasattr(source, "_reader") else read_gguf(source, strict=False)
    copied = []
    for key, field in src._reader.fields.items():
        if not keys(key) or key.startswith("GGUF."):
            continue
        types = list(field.types)
        if not types:
            continue
        value = _field_value(field)
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=types[-1])
        else:
            w.add_key_value(key, value, types[0])
        copied.append(key)
    return copied


def _file_type(types: list) -> int | None:
    import gguf

    Q = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    two_d = [t for t in types if t != Q.F32] or [Q.F32]
    common = Counter(two_d).most_common(1)[0][0]
    return {Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0, Q.Q4_0: F.MOSTLY_Q4_0,
            Q.Q4_1: F.MOSTLY_Q4_1, Q.Q5_0: F.MOSTLY_Q5_0, Q.Q5_1: F.MOSTLY_Q5_1}.get(common)


# ------------------------------------------------------------------------------------------------
# tensor types


def _source_types(source) -> dict[str, Any]:
    """HF tensor name -> GGMLQuantizationType of that tensor in a GGUF source file."""
    from refusal_jax.convert.gguf import read_gguf

    src = source if hasattr(source, "_reader") else read_gguf(source, strict=False)
    return {src._names[t.name]: t.tensor_type for t in src._reader.tensors if t.name in src._names}


def _choose_type(tensor_type: str, hf_name: str, shape: tuple[int, ...], source_types: dict):
    """The GGMLQuantizationType a tensor is written in (see the module docstring)."""
    import gguf

    Q, writable = _qtypes()
    if len(shape) < 2 or tensor_type == "f32":
        return Q.F32

    def fits(q):
        block = gguf.GGML_QUANT_SIZES[q][0]
        return shape[-1] % block == 0

    if tensor_type == "f16":
        return Q.F16
    if tensor_type == "bf16":
        return Q.BF16
    if tensor_type == "q8_0":
        return Q.Q8_0 if fits(Q.Q8_0) else Q.F16
    # "source"
    src = source_types.get(hf_name, Q.F16)
    if src in writable and fits(src):
        return src
    return Q.Q8_0 if fits(Q.Q8_0) else Q.F16


def _encode(value: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q, _ = _qtypes()
    if qtype == Q.F32:
        return np.ascontiguousarray(value, np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(value.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(value, np.float32), qtype)


def _byte_spec(shape, qtype):
    """(shape, numpy dtype, nbytes, raw_dtype) for GGUFWriter.add_tensor_info."""
    from gguf.quants import quant_shape_to_byte_shape

    Q, _ = _qtypes()
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4, None
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2, None
    bshape = quant_shape_to_byte_shape(shape, qtype)
    return bshape, np.dtype(np.uint8), int(np.prod(bshape)), qtype


# ------------------------------------------------------------------------------------------------
# the writer


def gguf_tensors(cfg: ModelConfig, params: Params):
    """Yield (HF name, GGUF name, float32 array in GGUF layout): permuted q/k for llama files, Gemma norms 1 + w."""
    arch = _arch(cfg)
    names = gguf_names(cfg)
    stacks: dict[str, list[np.ndarray]] = {}
    for hf_name, value in engine.to_hf_tensors(cfg, params, dtype=np.float32, norm_offset_folded=True):
        if m := _EXPERT_TENSOR.fullmatch(hf_name):  # experts come in order; the stack is written after the last
            template = f"{m.group(1)}{{e}}{m.group(3)}"
            stacks.setdefault(template, []).append(value)
            if len(stacks[template]) < cfg.n_experts:
                continue
            hf_name, value = template, np.stack(stacks.pop(template))
        elif hf_name.endswith("shared_expert_gate.weight"):
            value = value.reshape(-1)
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            value = permute_qk(value, cfg.n_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            value = permute_qk(value, cfg.n_kv_heads)
        yield hf_name, names[hf_name], value


def save_gguf(path: str | Path, cfg: ModelConfig, params: Params, *, tokenizer_source=None, tensor_type: str = "f32",
              context_length: int | None = None, name: str | None = None, metadata: dict | None = None,
              overwrite: bool = False, on_tensor: Callable[[str], None] | None = None, sources=()) -> dict:
    """Write `params` as a GGUF file (see the module docstring).

    Args:
      path: the output .gguf file; refused if it exists unless `overwrite` (and then only a file refusal_jax
        wrote, moved aside, see `refusal_jax.runs.outputs`).
      cfg: the config of `params` (for an orthogonalized model: `orthogonalization.untied_config(cfg)`).
      tokenizer_source: a GGUF file (path or `read_gguf` result) whose tokenizer and general.* metadata are
        copied, and whose tensor types "source" follows.
      tensor_type: one of TENSOR_TYPES.
      context_length: `{arch}.context_length`; default the source file's, else 4096 (it does not change the
        computation: llama.cpp's default context size).
      name: general.name (default: the source's).
      metadata: extra key -> value (str, int, float or bool) written after the copied keys, e.g. provenance.
      on_tensor: called with each GGUF tensor name after it is written.
      sources: paths the output must never replace (the source model, ...).
    Returns:
      {"path", "tensor_types": {GGUF name: type name}, "counts": {type name: n}, "copied_keys": [...],
       "type_changes": {"SRC -> OUT": n} for tensors written in another type than the source's (empty
       without a source)}.
    Raises:
      ConfigError: a config a GGUF file cannot express; CheckpointError: bad arguments or shapes.
    """
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise CheckpointError(f"unknown tensor type {tensor_type!r}; choose from {', '.join(TENSOR_TYPES)}")
    if tensor_type == "source" and tokenizer_source is None:
        raise CheckpointError("tensor_type='source' needs the source GGUF file (tokenizer_source)")
    from refusal_jax.runs import outputs

    path = outputs.check_target(path, overwrite=overwrite, sources=sources, directory=False, create_parents=True)
    _check_expressible(cfg)
    arch = _arch(cfg)

    source_types, src_md = {}, {}
    if tokenizer_source is not None:
        from refusal_jax.convert.gguf import read_gguf

        if not hasattr(tokenizer_source, "_reader"):
            tokenizer_source = read_gguf(tokenizer_source, strict=False)
        source_types = _source_types(tokenizer_source)
        src_md = tokenizer_source.metadata
    if context_length is None:
        src_arch = src_md.get("general.architecture")
        context_length = int(src_md.get(f"{src_arch}.context_length", 4096))

    # plan: names, shapes and types of every tensor, before any data is converted
    plan = []
    for hf_name, shape, _, _ in stacked_plan(cfg):
        plan.append((hf_name, tuple(shape), _choose_type(tensor_type, hf_name, tuple(shape), source_types)))
    names = gguf_names(cfg)
    extra = []
    if cfg.rope.rope_type == "llama3":
        from refusal_jax.convert.gguf import llama3_rope_factors

        rope = cfg.rope
        factors = llama3_rope_factors({"factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                                       "high_freq_factor": rope.high_freq_factor,
                                       "original_max_position_embeddings": rope.original_max_position_embeddings},
                                      cfg.head_dim, rope.theta)
        extra.append(("rope_freqs.weight", factors))

    types = {}
    copied: list[str] = []
    with outputs.atomic_output(path, overwrite=overwrite, sources=sources, directory=False,
                               create_parents=True) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        if tokenizer_source is not None:
            own = _OWN_GENERAL | ({"general.name"} if name is not None else set())
            copied = _copy_metadata(w, tokenizer_source,
                                    lambda k: k.startswith("tokenizer.") or (k.startswith("general.") and k not in own))
        if name is not None:
            w.add_name(name)
        w.add_string(outputs.MARKER_KEY, "refusal_jax")  # lets a later --overwrite know this file is ours
        for key, value in (metadata or {}).items():
            _add_value(w, key, value)
        _write_arch_metadata(w, cfg, context_length)
        all_types = [q for _, _, q in plan]
        ftype = _file_type(all_types)
        if ftype is not None:
            w.add_file_type(int(ftype))
        if any(q not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) for q in all_types):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, arr in extra:
            w.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes)
        for hf_name, shape, q in plan:
            bshape, dtype, nbytes, raw = _byte_spec(shape, q)
            w.add_tensor_info(names[hf_name], bshape, dtype, nbytes, raw_dtype=raw)
            types[names[hf_name]] = q.name
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, arr in extra:
            w.write_tensor_data(arr)
        it = gguf_tensors(cfg, params)
        for hf_name, shape, q in plan:
            got_name, gname, value = next(it)
            if got_name != hf_name or value.shape != shape:
                raise CheckpointError(f"tensor {got_name} {value.shape} does not match the plan ({hf_name} {shape})")
            dtypes.check_gguf(value, q.name, gname)  # no inf written (F16 values, float16 block scales)
            w.write_tensor_data(_encode(value, q))
            if on_tensor:
                on_tensor(gname)
        w.close()
    changes = Counter(f"{source_types[hf].name} -> {q.name}" for hf, _, q in plan
                      if hf in source_types and source_types[hf] != q)
    return {"path": path, "tensor_types": types, "counts": dict(Counter(types.values())), "copied_keys": copied,
            "type_changes": dict(changes)}


def _add_value(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise CheckpointError(f"GGUF metadata {key!r}: unsupported value type {type(value).__name__}")


def direction_sha256(direction: np.ndarray) -> str:
    """sha256 of a direction as float32 little-endian bytes (the value `refusal_jax.edit.direction_sha256`)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(direction, dtype="<f4").tobytes()).hexdigest()


def edit_metadata(direction: np.ndarray, method: str, source: str) -> dict:
    """The provenance keys of an orthogonalized export."""
    from refusal_jax import __version__

    return {"refusal_jax.version": __version__, "refusal_jax.edit.method": method,
            "refusal_jax.edit.direction_sha256": direction_sha256(direction),
            "refusal_jax.edit.direction_source": str(source)}

"""Read llama.cpp GGUF files: an HF-style config, dequantized tensors in Hugging Face naming and layout, the tokenizer.

    >>> from refusal_jax.convert.gguf import load_gguf
    >>> cfg, params, tokenizer = load_gguf("model.gguf")

`read_gguf(path)` parses the header only (tensor data is memory-mapped, not read) and refuses unknown architectures,
unknown tensor names, unknown metadata that could change the computation, and corrupt or truncated files with a
`ConfigError` / `CheckpointError` that names the file and the problem. `GGUFSource.tensors()` then yields one
dequantized float32 tensor at a time, in Hugging Face torch layout, ready for `convert.engine.fill_params`.

What llama.cpp's `convert_hf_to_gguf.py` changes, and how it is undone here:

* Names: `blk.{i}.attn_q.weight` for `model.layers.{i}.self_attn.q_proj.weight`, etc. (`_LAYER_NAMES`). Gemma-2/3's
  four norms: `attn_norm` = input_layernorm, `post_attention_norm` = post_attention_layernorm, `ffn_norm` =
  pre_feedforward_layernorm, `post_ffw_norm` = post_feedforward_layernorm. Everywhere else `ffn_norm` is HF's
  post_attention_layernorm (the norm before the MLP).
* Shapes: GGUF lists dimensions fastest-first (ggml `ne`); `GGUFReader` already exposes the data in numpy (row-major)
  order, which is HF's torch order ([out_features, in_features]). Checked against the reversed header shape.
* Llama-architecture files (`llama`, and `mistral` where a file says so) have the rows of q and k (weights and biases)
  permuted from HF's rotate-half RoPE layout to ggml's interleaved-pairs layout (`LlamaModel.permute`):
  `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`, with n_head_kv heads for k. `unpermute_qk` is the
  exact inverse (transformers' `LlamaTensorProcessor._reverse_permute_weights` does the same). Qwen2/3 and Gemma
  1/2/3 use ggml's NEOX RoPE, which is HF's layout, so llama.cpp leaves them unpermuted.
* Gemma 1/2/3 RMSNorm weights (all of them, q/k norms included) are stored as `1 + w`: `norm_offset_folded = True`,
  which tells `fill_params` not to add the 1 again.
* Llama-3.x files carry `rope_freqs.weight`, llama.cpp's precomputed llama3 RoPE frequency factors, instead of the
  `rope_scaling` config; the matching llama3 parameters are recovered from it (`_apply_rope_freqs`).

Torch is never imported here. The tokenizer is built from the GGUF metadata with transformers' own torch-free GGUF
tokenizer builders (`AutoTokenizer.from_pretrained(..., gguf_file=...)` imports torch on this path, see
`load_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model import families

# GGUF `general.architecture` -> (HF architectures[0], HF model_type, q/k rows permuted by llama.cpp,
# norm weights stored as 1 + w)
ARCHITECTURES: dict[str, tuple[str, str, bool, bool]] = {
    arch: (f.hf_architecture, f.hf_model_type, f.gguf_qk_permuted, f.gemma) for arch, f in families.BY_GGUF_ARCH.items()
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF per-block leaf -> HF per-layer suffix (`ffn_norm` depends on the architecture, see `_layer_names`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_POST_NORM_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Mixtures of experts: llama.cpp stacks each layer's experts into one tensor ([E, out, in] in numpy order) where HF
# has one tensor per expert; the stack is split into the family's per-expert names ({e} = the expert).
_EXPERT_STACKS = {"ffn_gate_exps": 1, "ffn_up_exps": 2, "ffn_down_exps": 3}  # index into Family.moe_names
_SHARED_EXPERT_NAMES = {  # Qwen2-MoE's shared expert and its sigmoid gate
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# llama.cpp's top-k renormalisation when a file has no {arch}.expert_weights_norm (its per-architecture default)
_EXPERT_WEIGHTS_NORM = {"qwen3_moe": True, "qwen2_moe": False, "olmoe": False, "mixtral": True}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 frequency factors: folded into the config, not a parameter

# `{arch}.*` metadata keys that are read into the config or checked below; any other `{arch}.*` key is refused
# (strict) because nothing says it leaves the forward pass unchanged.
_KNOWN_ARCH_KEYS = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.sliding_window_pattern",
    "attention.scale", "attn_logit_softcapping", "final_logit_softcapping",
    "rope.freq_base", "rope.freq_base_swa", "rope.dimension_count", "rope.scale_linear",
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "rope.scaling.attn_factor", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
    "expert_count", "expert_used_count",  # accepted only for a mixture-of-experts family
    "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_weights_norm",
}


# ------------------------------------------------------------------------------------------------
# llama.cpp's q/k permutation


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `LlamaModel.permute`: HF rotate-half rows -> ggml interleaved rows (for tests and writers)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The exact inverse of `permute_qk` (rows of a q/k weight [n_head*head_dim, d] or bias [n_head*head_dim])."""
    if w.shape[0] % (2 * n_head):
        raise CheckpointError(f"cannot undo llama.cpp's q/k permutation: {w.shape[0]} rows for {n_head} heads")
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# the source


DEQUANT_BLOCK = 1 << 22  # values dequantized at a time (bounds the dequantizers' temporaries)


@dataclasses.dataclass
class GGUFSource:
    """A parsed GGUF file. Tensor data stays memory-mapped until `tensors()` dequantizes it, one at a time.

    Attributes:
      path: the file.
      architecture: GGUF `general.architecture` (e.g. "qwen2").
      hf_config: a Hugging Face config.json-style dict for `refusal_jax.model.config.from_hf_config`.
      norm_offset_folded: True when norm weights are stored as 1 + w (Gemma families); pass to `fill_params`.
      permuted_qk: True when q/k rows were permuted by llama.cpp (and are unpermuted by `tensors()`).
      chat_template: the `tokenizer.chat_template` metadata, or None.
      metadata: every metadata key except the tokenizer's vocabulary arrays (tokens, merges, scores, token types).
    """

    path: Path
    architecture: str
    hf_config: dict
    norm_offset_folded: bool
    permuted_qk: bool
    chat_template: str | None
    metadata: dict[str, Any]
    _reader: Any = dataclasses.field(repr=False)
    _names: dict[str, str] = dataclasses.field(repr=False)  # GGUF name -> HF name (parameters only)
    n_experts: int = 0  # an expert stack's HF name has an {e} field, one HF tensor per expert

    def tensor_names(self) -> list[str]:
        """HF names of the parameter tensors `tensors()` yields, in file order."""
        return [n.format(e=e) for n in self._names.values() for e in (range(self.n_experts) if "{e}" in n else [0])]

    def __len__(self) -> int:
        return len(self.tensor_names())

    def _release_pages(self) -> None:
        """Drop the file pages read so far from this process's resident set (they stay in the page cache):
        otherwise the memory map of the whole file accumulates in RSS while the model is converted."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array in HF torch layout), dequantizing one tensor at a time."""
        n_head = self.hf_config["num_attention_heads"]
        n_kv = self.hf_config["num_key_value_heads"]
        for t in self._reader.tensors:
            hf_name = self._names.get(t.name)
            if hf_name is None:
                continue
            if "{e}" in hf_name:
                stack = self._dequantize(t, hf_name, n_head, n_kv)
                yield from ((hf_name.format(e=e), stack[e]) for e in range(self.n_experts))
            else:
                yield hf_name, self._dequantize(t, hf_name, n_head, n_kv)

    def _dequantize(self, t, hf_name: str, n_head: int, n_kv: int) -> np.ndarray:
        from gguf.quants import dequantize

        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne (fastest first) -> torch order
        # Dequantize in row blocks into one float32 array: gguf's dequantizers make several temporaries the size
        # of their input, so a whole embedding at once would need a few times its size (peak memory).
        data = t.data if t.data.ndim > 1 else t.data.reshape(1, -1)
        values = np.empty(math.prod(shape), np.float32)
        step, filled = max(1, DEQUANT_BLOCK // max(1, values.size // max(1, data.shape[0]))), 0
        try:
            for i in range(0, data.shape[0], step):
                block = np.asarray(dequantize(data[i:i + step], t.tensor_type), np.float32).reshape(-1)
                if filled + block.size > values.size:
                    filled = -1  # more values than the header's shape
                    break
                values[filled:filled + block.size] = block
                filled += block.size
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, which gguf {_gguf_version()} "
                "cannot dequantize"
            ) from None
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {t.name} ({type(e).__name__}: {e}); "
                                  "the file is corrupt or truncated") from None
        if filled != values.size:
            raise CheckpointError(f"{self.path}: tensor {t.name} does not dequantize to the {values.size} values "
                                  f"of its header's shape {shape}")
        values = values.reshape(shape)
        self._release_pages()
        if "{e}" in hf_name and shape[0] != self.n_experts:
            raise CheckpointError(f"{self.path}: tensor {t.name} stacks {shape[0]} experts, the metadata says "
                                  f"{self.n_experts} ({self.architecture}.expert_count)")
        if hf_name.endswith("shared_expert_gate.weight") and values.ndim == 1:  # llama.cpp stores [D], HF [1, D]
            values = values.reshape(1, -1)
        if self.permuted_qk:
            if ".self_attn.q_proj." in hf_name:
                values = unpermute_qk(values, n_head)
            elif ".self_attn.k_proj." in hf_name:
                values = unpermute_qk(values, n_kv)
        return values


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "?"


def _open_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "an empty file" if size == 0 else f"it starts with {magic!r}, not b'GGUF'"
        raise CheckpointError(f"{path} is not a GGUF file ({what})")
    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # the layout is checked before any tensor view is made
            check_tensor_layout(path, [_info_of_field(f) for f in fields], int(start_offs), int(self.alignment),
                                size)
            super()._build_tensors(start_offs, fields)

    try:
        reader = CheckedReader(path)
    except CheckpointError:
        raise
    except Exception as e:  # gguf raises ValueError/KeyError/IndexError/struct errors on damaged headers
        raise CheckpointError(
            f"{path}: corrupt or truncated GGUF file ({size} bytes): gguf could not parse it "
            f"({type(e).__name__}: {e})"
        ) from None
    # Again from the parsed tensors, in case a gguf version builds them without `_build_tensors`.
    check_tensor_layout(path, [(t.name, [int(d) for d in t.shape], int(t.tensor_type),
                                int(t.data_offset) - int(reader.data_offset)) for t in reader.tensors],
                        int(reader.data_offset), int(reader.alignment), size)
    return reader


def _info_of_field(field) -> tuple[str, list[int], int, int]:
    """(name, ggml ne, raw type, data offset) of one tensor-info field of GGUFReader."""
    _, name, _, dims, raw_type, offset = field.parts
    return bytes(name).decode("utf-8", "replace"), [int(d) for d in dims], int(raw_type[0]), int(offset[0])


GGML_MAX_DIMS = 4


def check_tensor_layout(path: Path, infos, data_start: int, alignment: int, file_size: int) -> None:
    """The checks of llama.cpp's gguf loader (`gguf_init_from_file_impl`, `llama_tensor_weight`) on the tensor
    infos [(name, ne, raw ggml type, offset in the data section)], in file order: at most 4 dimensions, a known
    type whose block size divides ne[0], each offset a multiple of `general.alignment` and equal to the sum of
    the padded sizes before it (tensors packed in order: no overlap, no gap), every tensor inside the file.
    Raises a CheckpointError naming the first bad tensor; nothing is allocated."""
    import gguf

    previous, expected = None, 0
    for name, ne, raw_type, offset in infos:
        where = f"{path}: tensor {name}"
        if len(ne) > GGML_MAX_DIMS:
            raise CheckpointError(f"{where} has {len(ne)} dimensions (ggml allows {GGML_MAX_DIMS})")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"{where} has unknown ggml type {raw_type}") from None
        n = math.prod(ne)
        if n >= 2**63:
            raise CheckpointError(f"{where} has shape {ne} with more than 2^63 elements")
        if ne and ne[0] % block:
            raise CheckpointError(f"{where}: its first dimension {ne[0]} is not a multiple of the {qtype.name} "
                                  f"block size {block}")
        n_bytes = n // block * type_size
        if offset % alignment:
            raise CheckpointError(f"{where}: data offset {offset} is not a multiple of general.alignment "
                                  f"{alignment}")
        if offset < expected:
            raise CheckpointError(f"{where}: data offset {offset} overlaps tensor {previous}, which ends at "
                                  f"{expected} (with padding)")
        if offset > expected:
            after = f"after tensor {previous}" if previous is not None else "at the start of the data"
            raise CheckpointError(f"{where}: data offset {offset} leaves {offset - expected} unused bytes {after} "
                                  f"(expected {expected}: llama.cpp requires tensors packed in file order)")
        end = data_start + offset + n_bytes
        if end > file_size:
            raise CheckpointError(f"{path}: corrupt or truncated GGUF file: tensor {name} ends at byte {end}, "
                                  f"the file has {file_size} bytes")
        previous, expected = name, offset + -(-n_bytes // alignment) * alignment


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF metadata key {field.name} ({type(e).__name__}: {e})") from None


_BIG_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.precompiled_charsmap"}


def read_gguf(path: str | Path, *, strict: bool = True) -> GGUFSource:
    """Parse a GGUF file's header into an HF-style config and a lazy tensor source.

    Args:
      path: the .gguf file.
      strict: refuse `{arch}.*` metadata keys this reader does not know (they may change the forward pass);
        False only warns.
    Raises:
      CheckpointError: not a GGUF file, corrupt or truncated, a tensor layout llama.cpp would refuse (overlapping,
        misaligned or out-of-bounds data, see `check_tensor_layout`), unknown tensor names, missing token embedding.
      ConfigError: unknown architecture, or metadata describing a computation refusal_jax does not implement.
    """
    path = Path(path)
    reader = _open_reader(path)
    metadata = {k: _field_value(f) for k, f in reader.fields.items() if k not in _BIG_ARRAYS}
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF metadata lacks general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: unknown GGUF architecture {arch!r}; refusal_jax reads {', '.join(sorted(ARCHITECTURES))}"
        )
    hf_arch, model_type, permuted, folded = ARCHITECTURES[arch]
    n_experts = int(_scalar(path, f"{arch}.expert_count", metadata.get(f"{arch}.expert_count", 0)) or 0)
    if arch == "llama" and n_experts:  # Mixtral is written as a llama file with experts
        hf_arch, model_type = families.FAMILIES["mixtral"].hf_architecture, families.FAMILIES["mixtral"].hf_model_type

    names, unknown, rope_freqs = {}, [], None
    layer_names = _layer_names(arch)
    if n_experts:
        layer_names.update(_moe_layer_names(families.FAMILIES[families.BY_ARCHITECTURE[hf_arch]]))
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            names[t.name] = _GLOBAL_NAMES[t.name]
        elif t.name == _ROPE_FREQS and arch in ("llama", "mistral"):
            rope_freqs = t
        elif (m := _BLOCK_RE.fullmatch(t.name)) and m.group(2) in layer_names:
            names[t.name] = f"model.layers.{int(m.group(1))}.{layer_names[m.group(2)]}.{m.group(3)}"
        else:
            unknown.append(t.name)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} GGUF tensor(s) that refusal_jax cannot map for architecture {arch!r}: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    vocab_size = int(embed.shape[-1])  # ggml ne = (d_model, vocab)

    hf = _hf_config(path, arch, hf_arch, model_type, metadata, vocab_size,
                    tied=not any(t.name == "output.weight" for t in reader.tensors), strict=strict)
    if rope_freqs is not None:
        _apply_rope_freqs(path, hf, rope_freqs)
    return GGUFSource(
        path=path, architecture=arch, hf_config=hf, norm_offset_folded=folded, permuted_qk=permuted,
        chat_template=metadata.get("tokenizer.chat_template"), metadata=metadata, _reader=reader, _names=names,
        n_experts=n_experts,
    )


def _layer_names(arch: str) -> dict[str, str]:
    names = dict(_LAYER_NAMES)
    if arch in ("gemma2", "gemma3"):
        names.update(_GEMMA_POST_NORM_NAMES)
    else:
        names["ffn_norm"] = "post_attention_layernorm"
    return names


def _moe_layer_names(family: "families.Family") -> dict[str, str]:
    """GGUF per-block leaf -> HF per-layer suffix of an MoE family's router, expert stacks and shared expert."""
    block = family.moe_names[0]
    names = {"ffn_gate_inp": f"{block}.{family.moe_router}"}
    names.update({leaf: f"{block}.experts.{{e}}.{family.moe_names[i]}" for leaf, i in _EXPERT_STACKS.items()})
    if family.shared_expert:
        names.update(_SHARED_EXPERT_NAMES)
    return names


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07): the value
    the original config.json held. Differs from the float32 by far less than its own rounding error."""
    return float(str(np.float32(value)))


def _scalar(path: Path, key: str, value: Any) -> Any:
    """A per-layer array whose entries all agree is that value; otherwise refuse."""
    if isinstance(value, (list, tuple)):
        if not value or any(v != value[0] for v in value):
            raise ConfigError(f"{path}: metadata {key} varies per layer ({value}); refusal_jax needs one value")
        return value[0]
    return value


def _hf_config(path: Path, arch: str, hf_arch: str, model_type: str, md: dict, vocab_size: int, *, tied: bool,
               strict: bool) -> dict:
    pre = arch + "."

    def get(key, default=None):
        return _scalar(path, pre + key, md.get(pre + key, default))

    def req(key):
        if pre + key not in md:
            raise ConfigError(f"{path}: GGUF metadata lacks {pre + key}")
        return get(key)

    unknown = sorted(k for k in md if k.startswith(pre) and k[len(pre):] not in _KNOWN_ARCH_KEYS)
    if unknown:
        msg = (f"{path}: unsupported GGUF metadata {', '.join(f'{k}={md[k]!r}' for k in unknown)}: refusal_jax does "
               "not know whether it changes the forward pass")
        if strict:
            raise ConfigError(msg + " (pass strict=False / --no-strict-config if you have checked)")
        warnings.warn(msg, stacklevel=3)
    moe = _moe_config(path, arch, model_type, get, req)

    d_model, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = get("attention.key_length")
    if head_dim is None and arch in ("llama", "mistral"):
        head_dim = get("rope.dimension_count")  # what transformers reads for llama files
    head_dim = int(head_dim) if head_dim is not None else d_model // n_heads
    value_dim = get("attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ConfigError(f"{path}: value head size {value_dim} differs from key head size {head_dim}")
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ConfigError(f"{path}: partial rotary embedding (rope.dimension_count={rot}, head_dim={head_dim}) "
                          "is not supported")

    hf: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length") or get("expert_feed_forward_length")
                                 or req("feed_forward_length")),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
    }
    hf.update(moe)
    if get("context_length") is not None:
        hf["max_position_embeddings"] = int(get("context_length"))
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in md:
            hf[hf_key] = int(md[f"tokenizer.ggml.{key}"])

    rope_scaling = _rope_scaling(path, get)
    if rope_scaling is not None:
        hf["rope_scaling"] = rope_scaling

    if arch.startswith("gemma"):
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    if arch in ("gemma2", "gemma3"):
        scale = get("attention.scale")
        if scale is not None:
            hf["query_pre_attn_scalar"] = float(scale) ** -2
        else:
            # llama.cpp has no key for it: it uses d_model / n_heads for the 27B models (46 layers for Gemma-2,
            # 62 for Gemma-3) and head_dim otherwise, which is what their HF configs say.
            big = hf["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
            hf["query_pre_attn_scalar"] = d_model // n_heads if big else head_dim
        # Absent keys take llama.cpp's defaults, which are also transformers' config defaults: a 4096 window, and
        # for Gemma-2 softcapping at 50 (attention) and 30 (final logits).
        hf["sliding_window"] = int(get("attention.sliding_window", 4096))
        for key in ("final_logit_softcapping",) + (("attn_logit_softcapping",) if arch == "gemma2" else ()):
            if md.get(pre + key) is not None:
                hf[key] = _f32(md[pre + key])
        if arch == "gemma2":
            hf.setdefault("attn_logit_softcapping", 50.0)
            hf.setdefault("final_logit_softcapping", 30.0)
    elif get("attention.scale") is not None:
        raise ConfigError(f"{path}: {pre}attention.scale={get('attention.scale')} (a non-default query scale) is "
                          f"not supported for {arch}")
    if arch == "gemma3":
        hf["rope_local_base_freq"] = _f32(get("rope.freq_base_swa", 10000.0))
        pattern = md.get(pre + "attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):
            if len(pattern) != hf["num_hidden_layers"]:
                raise ConfigError(f"{path}: {pre}attention.sliding_window_pattern has {len(pattern)} entries for "
                                  f"{hf['num_hidden_layers']} layers")
            hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            hf["sliding_window_pattern"] = int(pattern) if pattern is not None else 6  # llama.cpp's default
    elif get("attention.sliding_window_pattern") is not None:
        raise ConfigError(f"{path}: {pre}attention.sliding_window_pattern is not supported for {arch}")
    if arch not in ("gemma2", "gemma3") and get("attention.sliding_window") is not None:
        if arch == "mistral":
            hf["sliding_window"] = int(get("attention.sliding_window"))
        else:
            raise ConfigError(f"{path}: sliding-window attention ({pre}attention.sliding_window) is not supported "
                              f"for {arch}")
    if arch != "gemma2" and get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{path}: {pre}attn_logit_softcapping is not supported for {arch}")
    if arch not in ("gemma2", "gemma3") and get("final_logit_softcapping") is not None:
        raise ConfigError(f"{path}: {pre}final_logit_softcapping is not supported for {arch}")
    return hf


def _moe_config(path: Path, arch: str, model_type: str, get: Callable, req: Callable) -> dict:
    """The HF config keys of a mixture of experts ({} for a dense file); a dense family with experts is refused."""
    if not get("expert_count", 0):
        if get("expert_used_count", 0):
            raise ConfigError(f"{path}: {arch}.expert_used_count={get('expert_used_count')} without experts")
        return {}
    family = families.BY_MODEL_TYPE[model_type]
    if family not in _EXPERT_WEIGHTS_NORM:
        raise ConfigError(f"{path}: mixture-of-experts {arch} files ({arch}.expert_count={get('expert_count')}) "
                          f"are not supported")
    hf = {"num_local_experts" if family == "mixtral" else "num_experts": int(get("expert_count")),
          "num_experts_per_tok": int(req("expert_used_count"))}
    norm = bool(get("expert_weights_norm", _EXPERT_WEIGHTS_NORM[family]))
    if family == "mixtral":
        if not norm:
            raise ConfigError(f"{path}: {arch}.expert_weights_norm=false: Mixtral always renormalises its top-k")
    else:
        hf["norm_topk_prob"] = norm
    if family in ("qwen2_moe", "qwen3_moe"):
        hf["moe_intermediate_size"] = int(req("expert_feed_forward_length"))
    if family == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = int(req("expert_shared_feed_forward_length"))
    return hf


def _rope_scaling(path: Path, get: Callable) -> dict | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind is None and get("rope.scale_linear") is not None:
        kind, factor = "linear", get("rope.scale_linear")
    if kind in (None, "none"):
        return None
    out = {"rope_type": str(kind)}
    if factor is not None:
        out["factor"] = float(factor)
    if get("rope.scaling.original_context_length") is not None:
        out["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if kind == "linear" and out.get("factor", 1.0) == 1.0:
        return None
    return out  # anything but linear is refused by from_hf_config with the rope type named


# llama.cpp `LlamaModel.generate_extra_tensors` computes rope_freqs from these llama3 settings; the candidates are
# the published Llama-3.1 (factor 8) and Llama-3.2 (factor 32) values.
_LLAMA3_CANDIDATES = tuple(
    {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    for f in (8.0, 32.0, 16.0, 4.0)
)


def llama3_rope_factors(p: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` for llama3 rope settings `p` (the divisor of each inverse frequency)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(out, np.float32)


def _apply_rope_freqs(path: Path, hf: dict, tensor) -> None:
    from gguf.quants import dequantize

    factors = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(-1)
    if factors.shape != (hf["head_dim"] // 2,):
        raise CheckpointError(f"{path}: rope_freqs.weight has {factors.size} entries, expected {hf['head_dim'] // 2}")
    if np.all(factors == 1.0):
        return
    if "rope_scaling" in hf:
        raise ConfigError(f"{path}: both rope scaling metadata and rope_freqs.weight; cannot tell which applies")
    for cand in _LLAMA3_CANDIDATES:
        if np.allclose(llama3_rope_factors(cand, hf["head_dim"], hf["rope_theta"]), factors, rtol=1e-5, atol=0):
            hf["rope_scaling"] = dict(cand)
            return
    raise ConfigError(f"{path}: rope_freqs.weight holds RoPE frequency factors that match no known llama3 rope "
                      "scaling; convert the model from its Hugging Face checkpoint instead")


# ------------------------------------------------------------------------------------------------
# tokenizer


_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}


def _tokenizer_dicts(src: GGUFSource) -> tuple[dict, dict]:
    """(tokenizer_dict, tokenizer_config) exactly as transformers' `get_gguf_tokenizer` builds them, from our reader."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    fields = src._reader.fields

    def value(key):
        if key in src.metadata:
            return src.metadata[key]
        if key in fields:
            return _field_value(fields[key])
        return None

    grouped = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {}
        for key, name in renames.items():
            v = value(f"tokenizer.{key}")
            if v is not None:
                grouped[group][name] = v
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer:
        raise CheckpointError(f"{src.path}: GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = value(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return tokenizer, config


def load_tokenizer(source: GGUFSource | str | Path):
    """A transformers fast tokenizer built from the GGUF metadata, without torch.

    `AutoTokenizer.from_pretrained(dir, gguf_file=name)` gives the same tokenizer but imports torch on the way
    (transformers 5: `integrations/gguf/reader.py` imports torch at module level; transformers 4: the GGUF loader
    checks `is_torch_available()`). So this builds the `tokenizers` backend with transformers' own torch-free
    builders (`gguf_tokenizer_mapping.convert_gguf_tokenizer`) from metadata read by gguf's reader, and wraps it in
    `PreTrainedTokenizerFast` with the file's special tokens and chat template. Falls back to AutoTokenizer on a
    transformers without that module.
    """
    src = source if isinstance(source, GGUFSource) else read_gguf(source)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: F401
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        return _auto_tokenizer(src)
    from transformers import PreTrainedTokenizerFast

    tokenizer_dict, config = _tokenizer_dicts(src)
    try:
        backend, extra = convert_gguf_tokenizer(src.architecture, tokenizer_dict)
    except ValueError as e:
        raise CheckpointError(f"{src.path}: cannot build its tokenizer: {e}") from None
    kwargs = {k: v for k, v in {**config, **extra}.items() if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if src.chat_template is not None:
        tok.chat_template = src.chat_template
    return tok


def _auto_tokenizer(src: GGUFSource):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    if src.chat_template is not None and not getattr(tok, "chat_template", None):
        tok.chat_template = src.chat_template
    return tok


def sharded_source(path: str | Path, *, strict: bool = True):
    """A GGUF file opened for `placement.place_params`: each tensor dequantized only when placed."""
    from refusal_jax.convert.placement import ShardedSource
    from refusal_jax.model.config import from_hf_config

    src = read_gguf(path, strict=strict)
    try:
        cfg = from_hf_config(src.hf_config, strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{src.path}: {e}") from None
    n_head, n_kv = src.hf_config["num_attention_heads"], src.hf_config["num_key_value_heads"]
    loaders, duplicates, stacks = {}, [], {}
    for t in src._reader.tensors:
        hf_name = src._names.get(t.name)
        if hf_name is None:
            continue
        if "{e}" in hf_name:  # one loader per expert; the stack is dequantized once while its experts are placed
            for e in range(src.n_experts):
                loaders[hf_name.format(e=e)] = (lambda t=t, n=hf_name, e=e: _expert_of_stack(src, t, n, e, stacks))
            continue
        if hf_name in loaders:
            duplicates.append(hf_name)
        loaders[hf_name] = (lambda t=t, n=hf_name: src._dequantize(t, n, n_head, n_kv))
    return ShardedSource(str(src.path), cfg, loaders, lambda: load_tokenizer(src),
                         norm_offset_folded=src.norm_offset_folded, duplicates=tuple(duplicates))


def _expert_of_stack(src: GGUFSource, t, hf_name: str, e: int, stacks: dict) -> np.ndarray:
    """Expert e of the stacked tensor t; the last stack read is kept (only that one) for its other experts."""
    if t.name not in stacks:
        stacks.clear()
        stacks[t.name] = src._dequantize(t, hf_name, src.hf_config["num_attention_heads"],
                                         src.hf_config["num_key_value_heads"])
    return stacks[t.name][e]


# ------------------------------------------------------------------------------------------------
# everything at once


def load_gguf(path: str | Path, dtype=np.float32, on_tensor: Callable[[str], None] | None = None, *,
              strict: bool = True, tokenizer: bool = True):
    """Load a GGUF file as (ModelConfig, Params of numpy arrays, tokenizer).

    Args:
      path: the .gguf file.
      dtype: numpy dtype of the params (np.float32, np.float16 or ml_dtypes.bfloat16); dequantization is float32.
      on_tensor: called with each HF tensor name as it is placed (progress bars).
      strict: see `read_gguf` and `from_hf_config`.
      tokenizer: False to skip building the tokenizer (returns None in its place).
    Returns:
      (cfg, params, tokenizer); the tokenizer's `chat_template` is the file's `tokenizer.chat_template`.
    """
    from refusal_jax.convert.engine import fill_params
    from refusal_jax.model.config import from_hf_config

    src = read_gguf(path, strict=strict)
    try:
        cfg = from_hf_config(src.hf_config, strict=strict)
    except ConfigError as e:
        raise ConfigError(f"{src.path}: {e}") from None
    from refusal_jax.convert.engine import check_sizes

    check_sizes(cfg, sum(int(t.n_elements) for t in src._reader.tensors), str(src.path))
    params = fill_params(cfg, src.tensors(), dtype=dtype, norm_offset_folded=src.norm_offset_folded,
                         on_tensor=on_tensor, source=str(src.path))
    tok = load_tokenizer(src) if tokenizer else None
    return cfg, params, tok

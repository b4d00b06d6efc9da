"""Strict one-to-one fill of a Params pytree from Hugging Face-named tensors.

Every source (safetensors directory, GGUF file) yields `(hf_name, array)` pairs in Hugging Face's torch layout
and naming; this module owns the single table that maps them onto our einsum layouts. The fill is strict:
every expected tensor must be found exactly once with the right shape, and every source tensor must be used or
explicitly ignored; anything else is a `CheckpointError` that names the tensors.

Tensors are written one at a time into preallocated arrays of the target dtype, so peak host memory is the
converted model plus the largest single source tensor.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from refusal_jax.convert.dtypes import cast, check_fits
from refusal_jax.errors import CheckpointError
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params, ParamSpec, axis_sizes, from_flat, param_shapes, present_params

# Source tensors that carry no parameters of ours (buffers saved by old transformers versions).
_IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layouts(cfg: ModelConfig, spec: ParamSpec) -> tuple[tuple[int, ...], Callable, Callable]:
    """(HF shape, HF -> ours, ours -> HF) of one parameter (per layer: without the "layers" axis), derived from
    its axes: HF's tensor is our axes in `hf_axes` order with each group flattened."""
    sizes = axis_sizes(cfg)
    ours = tuple(a for a in spec.axes if a != "layers" and not (spec.per_expert and a == "experts"))
    hf_order = tuple(a for group in spec.hf_axes for a in group)
    assert sorted(hf_order) == sorted(ours), (spec, ours)
    hf_shape = tuple(math.prod(sizes[a] for a in group) for group in spec.hf_axes)
    unflat = tuple(sizes[a] for a in hf_order)
    to_ours = tuple(hf_order.index(a) for a in ours)  # permutation: HF's unflattened order -> ours
    to_hf = tuple(ours.index(a) for a in hf_order)
    return (hf_shape, lambda w: w.reshape(unflat).transpose(to_ours),
            lambda w: w.transpose(to_hf).reshape(hf_shape))


def layer_table(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray],
                                                    int | None]]:
    """HF per-layer tensor suffix -> (our field, expected HF shape, transform to our layout, expert index or None),
    from PARAM_SPEC. Per-expert tensors (MoE) appear once per expert and fill that expert's slice of the field."""
    table = {}
    for name, spec in present_params(cfg).items():
        if name.startswith("layers."):
            hf_shape, to_ours, _ = _layouts(cfg, spec)
            field = name.split(".", 1)[1]
            if spec.per_expert:
                for e in range(cfg.n_experts):
                    table[spec.hf(cfg).format(e=e)] = (field, hf_shape, to_ours, e)
            else:
                table[spec.hf(cfg)] = (field, hf_shape, to_ours, None)
    return table


def global_table(cfg: ModelConfig):
    """HF name -> (our field, expected HF shape, transform to our layout) of the parameters outside the layers."""
    table = {}
    for name, spec in present_params(cfg).items():
        if not name.startswith("layers."):
            hf_shape, to_ours, _ = _layouts(cfg, spec)
            table[spec.hf(cfg)] = (name, hf_shape, to_ours)
    return table


def _is_norm(field: str) -> bool:
    return field.endswith("norm")


def _all_finite(a: np.ndarray, chunk: int = 1 << 22) -> bool:
    """np.isfinite(a).all() with a bounded temporary (row blocks of about `chunk` elements)."""
    if a.ndim == 0 or a.size <= chunk:
        return bool(np.isfinite(a).all())
    step = max(1, chunk // (a.size // a.shape[0]))
    return all(np.isfinite(a[i:i + step]).all() for i in range(0, a.shape[0], step))


def check_sizes(cfg: ModelConfig, source_numel: int, source: str) -> None:
    """Refuse a config that describes far more parameters than the checkpoint holds, before anything is allocated
    (a config.json with huge sizes would otherwise ask for terabytes first and compare shapes after). A near miss
    passes here and gets the precise missing / mis-shaped tensor message from `fill_params`."""
    need = 0
    for shape in param_shapes(cfg).values():
        n = 1
        for d in shape:
            n *= int(d)
        need += n
    if need > 2 * source_numel + (1 << 20):
        raise CheckpointError(
            f"{source}: the config describes {need:,} parameters (n_layers={cfg.n_layers}, {describe_shapes(cfg)}) "
            f"but the checkpoint's tensors hold {source_numel:,}: the "
            "config does not match the weights")


def fill_params(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    dtype=np.float32,
    norm_offset_folded: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    source: str = "checkpoint",
) -> Params:
    """Build Params from (hf_name, array) pairs.

    Args:
      cfg: the model config (decides which tensors are expected).
      tensors: iterable of (Hugging Face tensor name, numpy array in HF/torch layout); consumed once.
      dtype: numpy dtype of the converted params (np.float32, np.float16 or ml_dtypes.bfloat16).
      norm_offset_folded: Gemma only. HF stores RMSNorm weights w and applies 1 + w; we store 1 + w (computed in
        float32). Set True when the source already holds 1 + w (llama.cpp's GGUF files do).
      on_tensor: called with each tensor name after it is placed (on_tensor bars).
      source: a name for error messages.
    Returns:
      Params holding numpy arrays (device placement is the caller's choice).
    Raises:
      CheckpointError: unexpected, missing, duplicated or mis-shaped tensors, or non-finite values.
    """
    shapes = param_shapes(cfg)
    flat = {name: np.zeros(shape, dtype) for name, shape in shapes.items()}
    layers, globals_ = layer_table(cfg), global_table(cfg)
    seen: set[str] = set()
    unexpected: list[str] = []
    fold = cfg.norm_offset and not norm_offset_folded  # Gemma families use the 1 + w convention

    for name, array in tensors:
        if any(p.fullmatch(name) for p in _IGNORED):
            continue
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints also store the (identical) head
        m = _LAYER_RE.fullmatch(name)
        if m and int(m.group(1)) < cfg.n_layers and m.group(2) in layers:
            layer = int(m.group(1))
            field, hf_shape, transform, expert = layers[m.group(2)]
            target = flat[f"layers.{field}"]
            if expert is not None:
                layer = (layer, expert)
        elif name in globals_:
            layer = None
            field, hf_shape, transform = globals_[name]
            target = flat[field]
        else:
            unexpected.append(name)
            continue
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name} appears more than once")
        seen.add(name)
        if tuple(array.shape) != hf_shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(array.shape)}, expected {hf_shape} "
                                  f"for this config ({describe_shapes(cfg)})")
        value = np.asarray(array, dtype=np.float32)  # no copy for a float32 (memory-mapped) source
        if not _all_finite(value):
            raise CheckpointError(f"{source}: tensor {name} contains NaN or infinite values")
        if fold and _is_norm(field):
            value = value + np.float32(1.0)
        # Cast on assignment: no intermediate copy of the tensor in the target dtype (peak memory).
        (target if layer is None else target[layer])[...] = check_fits(transform(value), target.dtype, name, source)
        if on_tensor:
            on_tensor(name)

    expected = {f"model.layers.{i}.{s}" for i in range(cfg.n_layers) for s in layers} | set(globals_)
    check_tensor_names(source, cfg, sorted(expected - seen), sorted(unexpected))
    return from_flat(flat)


def describe_shapes(cfg: ModelConfig) -> str:
    """The config sizes a tensor shape follows from, for shape-mismatch messages."""
    text = (f"{cfg.architecture}, d_model={cfg.d_model}, heads={cfg.n_heads}/{cfg.n_kv_heads}, "
            f"head_dim={cfg.head_dim}, d_ff={cfg.d_ff}, vocab={cfg.vocab_size}")
    if cfg.moe:
        text += f", experts={cfg.n_experts} (top {cfg.n_experts_per_tok}) of width {cfg.d_expert}"
    return text


def check_tensor_names(source, cfg: ModelConfig, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a checkpoint whose tensor names do not match `cfg`'s plan, naming the first few of each kind."""
    def listed(names):
        return f"{len(names)} tensor(s): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"

    parts = ([f"missing {listed(missing)}"] if missing else []) + (
        [f"unexpected {listed(unexpected)}"] if unexpected else [])
    if parts:
        raise CheckpointError(f"{source} does not match {cfg.architecture} ({cfg.family}): " + "; ".join(parts))


DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def numpy_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------------------------------------
# The inverse: Params -> Hugging Face-named tensors (export of edited models)

def hf_tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str, int | None]]:
    """Every HF tensor of `cfg` in checkpoint order: (hf_name, HF shape, our field, index or None). The index of
    a per-layer tensor is its layer, of a per-expert tensor (layer, expert): either indexes the stacked field.

    Tied configs have no lm_head.weight. Built from `layer_table`/`global_table`, so it names exactly the
    tensors `fill_params` expects.
    """
    layers, globals_ = layer_table(cfg), global_table(cfg)
    def glob(name):
        field, shape, _ = globals_[name]
        return name, shape, field, None

    plan = [glob("model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        for suffix, (field, shape, _, expert) in layers.items():
            plan.append((f"model.layers.{i}.{suffix}", shape, f"layers.{field}", i if expert is None else (i, expert)))
    plan.append(glob("model.norm.weight"))
    if "lm_head.weight" in globals_:
        plan.append(glob("lm_head.weight"))
    return plan


def to_hf_tensors(
    cfg: ModelConfig,
    params: Params,
    *,
    dtype=None,
    norm_offset_folded: bool = False,
    edit: Callable[[str, int | None, np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, numpy array in HF/torch layout), tensor by tensor: the exact inverse of `fill_params`.

    Args:
      cfg: the model config (decides the tensor names; tied configs yield no lm_head.weight).
      params: Params of numpy or jax arrays. Stacked layer arrays are sliced one layer at a time, so only one
        tensor at a time is copied to the host.
      dtype: numpy dtype of the yielded arrays; None keeps each parameter's own dtype.
      norm_offset_folded: Gemma only: yield the stored multiplier 1 + w instead of HF's w (the GGUF convention).
        By default Gemma norms are un-folded as w = stored - 1, computed in float32 and rounded once to `dtype`.
      edit: applied to each tensor in our layout before it is converted, as edit(field, layer index or None,
        array) (e.g. `method.orthogonalization.streaming_edit`), so an edited model is exported without being held
        twice.
    Raises:
      CheckpointError: params whose shapes do not match `cfg`, or an lm_head on a tied config.
    """
    from refusal_jax.model.params import to_flat

    flat = to_flat(params)
    if cfg.tie_embeddings and "lm_head" in flat:
        raise CheckpointError("params have an lm_head but the config ties embeddings: export with an untied config "
                              "(refusal_jax.method.orthogonalization.untied_config)")
    if not cfg.tie_embeddings and "lm_head" not in flat:
        flat["lm_head"] = _Transposed(flat["embed"])  # untied config, tied params: the head is the embedding
    shapes = param_shapes(cfg)
    for name, shape in shapes.items():
        got = tuple(flat[name].shape) if name in flat else None
        if got != shape:
            raise CheckpointError(f"parameter {name} has shape {got}, config expects {shape}")
    inverse = {name: _layouts(cfg, spec)[2] for name, spec in present_params(cfg).items()}
    unfold = cfg.norm_offset and not norm_offset_folded
    for hf_name, hf_shape, field, layer in hf_tensor_plan(cfg):
        source = flat[field]
        value = np.asarray(source if layer is None else source[layer])
        if edit is not None:
            value = edit(field, layer, value)
        short = field.rsplit(".", 1)[-1]
        out_dtype = np.dtype(dtype) if dtype is not None else value.dtype
        if unfold and _is_norm(short):
            value = value.astype(np.float32) - np.float32(1.0)
        value = np.ascontiguousarray(cast(inverse[field](value), out_dtype, hf_name))
        assert value.shape == hf_shape, (hf_name, value.shape, hf_shape)
        yield hf_name, value


class _Transposed:
    """embed [V, D] seen as an lm_head [D, V] without copying it (only materialised when exported)."""

    def __init__(self, embed):
        self.embed = embed
        self.shape = tuple(embed.shape[::-1])

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.embed).T
        return arr if dtype is None else arr.astype(dtype)

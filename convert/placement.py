"""Converting a checkpoint straight onto a device mesh, shard by shard (models larger than one device).

`engine.fill_params` builds the whole model in host memory. `place_params` instead builds one parameter at a time:
for each of our (layer-stacked) parameters it reads the source tensors that feed it one by one (memory-mapped
safetensors, or one dequantized GGUF tensor), writes each one's slices into host buffers for the shards this
process's devices hold, and hands those to `jax.make_array_from_callback`. At any moment the host holds one source
tensor plus this process's shards of one parameter; each device only ever receives its own shard. The checks are
`fill_params`'s: every expected tensor exactly once, right shapes, finite values, nothing unexpected.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import numpy as np

from refusal_jax.convert import engine
from refusal_jax.errors import CheckpointError
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params, from_flat, param_shapes, to_flat


@dataclasses.dataclass
class ShardedSource:
    """A checkpoint opened for random access: its config and, per HF tensor name, a loader returning the tensor in
    HF/torch layout (loaded only when called)."""

    name: str
    cfg: ModelConfig
    loaders: Mapping[str, Callable[[], np.ndarray]]
    load_tokenizer: Callable[[], object]
    norm_offset_folded: bool = False
    duplicates: tuple[str, ...] = ()  # HF names the source holds more than once


def _plan(cfg: ModelConfig) -> dict[str, list[tuple[str, int | None, tuple[int, ...], Callable]]]:
    """Our field -> the HF tensors that fill it: (hf_name, index or None, HF shape, transform to our layout); the
    index is (layer,) or, for a per-expert tensor, (layer, expert)."""
    plan: dict[str, list] = {}
    for suffix, (field, hf_shape, transform, expert) in engine.layer_table(cfg).items():
        plan.setdefault(f"layers.{field}", []).extend(
            (f"model.layers.{i}.{suffix}", (i,) if expert is None else (i, expert), hf_shape, transform)
            for i in range(cfg.n_layers))
    for hf_name, (field, hf_shape, transform) in engine.global_table(cfg).items():
        plan[field] = [(hf_name, None, hf_shape, transform)]
    return plan


def _check_names(source: ShardedSource, plan) -> None:
    cfg = source.cfg
    if source.duplicates:
        raise CheckpointError(f"{source.name}: tensor {source.duplicates[0]} appears more than once")
    expected = {name for entries in plan.values() for name, *_ in entries}
    unexpected = sorted(n for n in source.loaders
                        if n not in expected and not any(p.fullmatch(n) for p in engine._IGNORED)
                        and not (cfg.tie_embeddings and n == "lm_head.weight"))
    engine.check_tensor_names(source.name, cfg, sorted(expected - set(source.loaders)), unexpected)


def _key(index: tuple[slice, ...], shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def place_params(source: ShardedSource, shardings: Params, *, dtype=np.float32,
                 on_tensor: Callable[[str], None] | None = None) -> Params:
    """Params of global `jax.Array`s in `shardings` (a Params tree of `NamedSharding`s), filled from `source`.

    Every process calls this with the same source; each reads every source tensor once and keeps only the slices
    its own devices hold. Raises CheckpointError like `engine.fill_params`.
    """
    cfg = source.cfg
    plan = _plan(cfg)
    _check_names(source, plan)
    targets = to_flat(shardings)
    fold = cfg.norm_offset and not source.norm_offset_folded  # Gemma: store 1 + w
    out = {}
    for field, shape in param_shapes(cfg).items():
        sharding = targets[field]
        buffers: dict[tuple, tuple[tuple[slice, ...], np.ndarray]] = {}
        for index in sharding.addressable_devices_indices_map(shape).values():
            key = _key(index, shape)
            if key not in buffers:  # devices holding the same slice (replicas) share one host buffer
                buffers[key] = (index, np.empty([b - a for a, b in key], dtype))
        for hf_name, layer, hf_shape, transform in plan[field]:
            array = source.loaders[hf_name]()
            if tuple(array.shape) != hf_shape:
                raise CheckpointError(f"{source.name}: tensor {hf_name} has shape {tuple(array.shape)}, expected "
                                      f"{hf_shape} for this config ({engine.describe_shapes(cfg)})")
            value = np.asarray(array, dtype=np.float32)
            if not engine._all_finite(value):
                raise CheckpointError(f"{source.name}: tensor {hf_name} contains NaN or infinite values")
            if fold and field.endswith("norm"):
                value = value + np.float32(1.0)
            value = transform(value)
            for key, (index, buffer) in buffers.items():
                if layer is None:
                    buffer[...] = value[index]  # cast on assignment
                elif all(a <= i < b for i, (a, b) in zip(layer, key)):  # this shard holds the (layer, expert) slice
                    buffer[tuple(i - a for i, (a, _) in zip(layer, key))] = value[index[len(layer):]]
            del array, value
            if on_tensor:
                on_tensor(hf_name)
        out[field] = jax.make_array_from_callback(shape, sharding,
                                                  lambda index, b=buffers, s=shape: b[_key(index, s)][1])
        del buffers
    return from_flat(out)

"""Checkpoints that store q/k/v and gate/up as one tensor each (Phi-3/4: `self_attn.qkv_proj.weight`,
`mlp.gate_up_proj.weight`), split into the separate HF names `engine.fill_params` reads.

transformers slices qkv_proj's output rows as [q (N*H) | k (K*H) | v (K*H)] and gate_up_proj's as
`chunk(2)`: [gate (F) | up (F)]; the split takes the same rows. Exports write the separate names (a Mistral
checkpoint, see `export_hf.as_exportable`).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

from refusal_jax.errors import CheckpointError
from refusal_jax.model.config import ModelConfig

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")


def split_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str = "checkpoint"
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs with every fused tensor replaced by its parts; other names pass through unchanged (the
    strict fill names anything unexpected)."""
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    for name, array in tensors:
        m = _LAYER_RE.fullmatch(name)
        if m is None:
            yield name, array
            continue
        prefix = f"model.layers.{m.group(1)}."
        if m.group(2) == "self_attn.qkv_proj":
            rows, parts = (q, kv, kv), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        else:
            rows, parts = (f, f), ("mlp.gate_proj", "mlp.up_proj")
        if array.ndim != 2 or array.shape[0] != sum(rows):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(array.shape)}, expected "
                                  f"({sum(rows)}, {cfg.d_model}) for this config (rows {' + '.join(map(str, rows))})")
        start = 0
        for part, n in zip(parts, rows):
            yield f"{prefix}{part}.weight", np.asarray(array[start:start + n])
            start += n


def fused_family(cfg: ModelConfig) -> bool:
    return cfg.family == "phi3"


def wrap(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str = "checkpoint"):
    """`split_tensors` for a fused family, the stream unchanged otherwise."""
    return split_tensors(cfg, tensors, source) if fused_family(cfg) else tensors

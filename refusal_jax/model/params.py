"""Parameter pytrees. Layers are stacked on a leading axis L so the forward pass is one `lax.scan` (or, for
decoding on CPU, split into per-layer copies by `unstack_layers`).

Axis letters (used in every einsum of the project):
  B batch, T query positions, S key positions, D d_model, N query heads, K kv heads, G query heads per kv head,
  H head_dim, F MLP width, V vocabulary, L layers.

Norm weights are stored as the multiplier actually applied (Gemma's `1 + w` is folded in by the converter).
Optional tensors are None when the architecture has none (a None leaf is an empty pytree node).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from refusal_jax.model.config import ModelConfig


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [L, D]
    q: jax.Array  # [L, D, N, H]
    k: jax.Array  # [L, D, K, H]
    v: jax.Array  # [L, D, K, H]
    o: jax.Array  # [L, N, H, D]
    mlp_norm: jax.Array  # [L, D]
    gate: jax.Array  # [L, D, F]
    up: jax.Array  # [L, D, F]
    down: jax.Array  # [L, F, D]
    q_bias: jax.Array | None = None  # [L, N, H]
    k_bias: jax.Array | None = None  # [L, K, H]
    v_bias: jax.Array | None = None  # [L, K, H]
    q_norm: jax.Array | None = None  # [L, H]
    k_norm: jax.Array | None = None  # [L, H]
    post_attn_norm: jax.Array | None = None  # [L, D]
    post_mlp_norm: jax.Array | None = None  # [L, D]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: LayerParams  # stacked [L, ...]; or a tuple of L per-layer LayerParams (`unstack_layers`)
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to `embed`


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Field path ("embed", "layers.q", ...) -> shape, for exactly the fields this config uses."""
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size)
    shapes = {
        "embed": (V, D),
        "final_norm": (D,),
        "layers.attn_norm": (L, D),
        "layers.q": (L, D, N, H),
        "layers.k": (L, D, K, H),
        "layers.v": (L, D, K, H),
        "layers.o": (L, N, H, D),
        "layers.mlp_norm": (L, D),
        "layers.gate": (L, D, F),
        "layers.up": (L, D, F),
        "layers.down": (L, F, D),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    if cfg.qkv_bias:
        shapes.update({"layers.q_bias": (L, N, H), "layers.k_bias": (L, K, H), "layers.v_bias": (L, K, H)})
    if cfg.qk_norm:
        shapes.update({"layers.q_norm": (L, H), "layers.k_norm": (L, H)})
    if cfg.post_norms:
        shapes.update({"layers.post_attn_norm": (L, D), "layers.post_mlp_norm": (L, D)})
    return shapes


def from_flat(flat: dict[str, np.ndarray | jax.Array]) -> Params:
    """Params from a {"embed": ..., "layers.q": ...} dict (the inverse of `to_flat`)."""
    layer = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    return Params(
        embed=flat["embed"],
        layers=LayerParams(**layer),
        final_norm=flat["final_norm"],
        lm_head=flat.get("lm_head"),
    )


def to_flat(params: Params) -> dict[str, jax.Array]:
    flat = {"embed": params.embed, "final_norm": params.final_norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    for name in LayerParams.__dataclass_fields__:
        value = getattr(params.layers, name)
        if value is not None:
            flat[f"layers.{name}"] = value
    return flat


def init_random(cfg: ModelConfig, key: jax.Array | int, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params in the shapes of `cfg` (tests, and benchmarks where weight values do not matter).

    Norm weights are 1 + 0.1 N(0, 1), everything else scale * N(0, 1). Drawn on the host with numpy, seeded by an
    int or by the data of a jax PRNG key: jax.random would compile one program per parameter shape (seconds each on
    a CPU), which dominated small tests.
    """
    seed = key if isinstance(key, int) else np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(param_shapes(cfg).items()):
        noise = rng.standard_normal(shape)
        flat[name] = jnp.asarray(((1.0 + 0.1 * noise) if "norm" in name else scale * noise).astype(np.float32), dtype)
    return from_flat(flat)


def unembedding(params: Params) -> jax.Array:
    """The [D, V] matrix that maps the final normed residual to logits."""
    return params.embed.T if params.lm_head is None else params.lm_head


def unstack_layers(layers: LayerParams) -> tuple[LayerParams, ...]:
    """The stacked [L, ...] layer weights as L separate per-layer LayerParams (copies). The forward pass loops over
    such a tuple instead of scanning; `generate.decoding_params` says why decoding on CPU wants that."""
    return tuple(jax.tree.map(lambda a: a[i], layers) for i in range(layers.attn_norm.shape[0]))


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)

"""Weight orthogonalization: a Params -> Params edit equivalent to directional ablation at inference time.

Every matrix that writes into the residual stream (token embedding, attention output projections, MLP down
projections) loses its component along r̂: W <- W - (W r̂) r̂ᵀ on the d_model axis. Then no block can write r̂ into
the residual, which is what hook-based ablation enforces (paper App. E).

Gemma-2/3 apply an RMSNorm *after* attention/MLP and before the residual add; projecting o/down does not remove
r̂ from a normed output, so for those families orthogonalization is not equivalent and we refuse it (use the
inference-time ablation, which acts on the tensors actually added).

Tied embeddings: the unembedding is the embedding matrix. Orthogonalizing it in place would also ablate r̂ from
the final normed residual before the LM head, which hook-based ablation does not do. We untie: the LM head keeps
the original embedding (transposed), so the edited model equals the ablated one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refusal_jax.config import ModelConfig
from refusal_jax.errors import ConfigError
from refusal_jax.params import Params


def _unit_basis(direction) -> jax.Array:
    d = jnp.asarray(direction, jnp.float32)
    if d.ndim == 1:
        return (d / jnp.linalg.norm(d))[None]
    return d  # [R, D] rows assumed orthonormal (see refusal_jax.subspace)


def project_out(w: jax.Array, basis: jax.Array, axis: int) -> jax.Array:
    """Remove the span of `basis` [R, D] from axis `axis` (of size D) of w, computing in float32."""
    w32 = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    w32 = w32 - jnp.einsum("...r,rd->...d", jnp.einsum("...d,rd->...r", w32, basis), basis)
    return jnp.moveaxis(w32, -1, axis).astype(w.dtype)


def orthogonalize(params: Params, cfg: ModelConfig, direction) -> Params:
    """Params with r̂ (or an orthonormal [R, D] basis) projected out of every residual-writing matrix."""
    if cfg.post_norms:
        raise ConfigError(
            f"weight orthogonalization is not equivalent to ablation for {cfg.family}: its post-attention/MLP "
            "norms rescale what is added to the residual. Use inference-time ablation instead."
        )
    basis = _unit_basis(direction)
    layers = params.layers.replace(
        o=project_out(params.layers.o, basis, axis=-1),  # [L, N, H, D]
        down=project_out(params.layers.down, basis, axis=-1),  # [L, F, D]
    )
    lm_head = params.lm_head if params.lm_head is not None else params.embed.T  # untie, see module docstring
    return params.replace(embed=project_out(params.embed, basis, axis=-1), layers=layers, lm_head=lm_head)


def untied_config(cfg: ModelConfig) -> ModelConfig:
    """The config of an orthogonalized model: tie_embeddings is False because the head was untied."""
    import dataclasses

    return dataclasses.replace(cfg, tie_embeddings=False)

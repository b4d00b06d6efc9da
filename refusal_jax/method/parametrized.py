"""Parametrized abliteration (heretic's parametrization, p-e-w/heretic): per-layer, per-component removal scales.

Instead of removing r̂ fully from every residual-writing matrix, layer l's attention output projection and MLP down
projection lose a fraction s_l of their r̂_l component:  W <- W - s_l (W r̂_l) r̂_lᵀ  (on the d_model axis, biases
likewise). The token embedding is not edited. The scales come from heretic's kernel (one per component):

    s_l = max_weight + (|l - max_weight_position| / min_weight_distance) * (min_weight - max_weight)
          where |l - max_weight_position| <= min_weight_distance, else 0,

or are given freely per layer. The direction is one r̂ for every layer, per-layer r̂_l, or heretic's direction
index: a float i between layers whose direction is the normalised linear interpolation of the per-layer
difference-in-means directions at floor(i) and floor(i) + 1.

At inference time the same edit is the hook  y <- y - s_l (y·r̂_l) r̂_l  on the outputs of layer l's o_proj and
down_proj (tests/test_parametrized.py checks the edited model against exactly those hooks in transformers).
"""

from __future__ import annotations

import math

import numpy as np

from refusal_jax.errors import ConfigError, DataError
from refusal_jax.method.orthogonalization import _check_editable
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params

COMPONENTS = ("attn", "mlp")  # attention output projection, MLP down projection


def kernel_scales(n_layers: int, max_weight: float, max_weight_position: float, min_weight: float,
                  min_weight_distance: float) -> np.ndarray:
    """heretic's per-layer weight kernel, float32 [L]: max_weight at max_weight_position, falling linearly to
    min_weight at min_weight_distance layers away, 0 beyond."""
    if not min_weight_distance > 0:
        raise DataError(f"min_weight_distance must be > 0, got {min_weight_distance}")
    distance = np.abs(np.arange(n_layers, dtype=np.float64) - max_weight_position)
    scale = max_weight + (distance / min_weight_distance) * (min_weight - max_weight)
    return np.where(distance <= min_weight_distance, scale, 0.0).astype(np.float32)


def interpolated_direction(directions, index: float) -> np.ndarray:
    """Unit float32 [D]: lerp of per-layer directions [L, D] (each normalised first) at fractional `index`."""
    d = np.asarray(directions, np.float64)
    if d.ndim != 2:
        raise DataError(f"per-layer directions must be [L, D], got shape {d.shape}")
    if not 0 <= index <= d.shape[0] - 1:
        raise DataError(f"direction index {index} is outside [0, {d.shape[0] - 1}]")
    d = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12)
    frac, whole = math.modf(index)
    lo = int(whole)
    hi = min(lo + 1, d.shape[0] - 1)
    r = (1 - frac) * d[lo] + frac * d[hi]
    return (r / np.linalg.norm(r)).astype(np.float32)


def _per_layer_units(direction, n_layers: int) -> np.ndarray:
    d = np.asarray(direction, np.float64)
    if d.ndim == 1:
        d = np.broadcast_to(d, (n_layers, d.shape[0]))
    if d.ndim != 2 or d.shape[0] != n_layers:
        raise DataError(f"direction must be [D] or [{n_layers}, D], got shape {np.asarray(direction).shape}")
    norms = np.linalg.norm(d, axis=-1, keepdims=True)
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise DataError("cannot abliterate along a zero or non-finite direction")
    return (d / norms).astype(np.float32)


def _scaled_projection(w, units, scales):
    """w [L, ..., D] minus scales[l] * (w r̂_l) r̂_l on the last axis, float32 math, w's dtype."""
    w32 = np.asarray(w, np.float32)
    flat = w32.reshape(w32.shape[0], -1, w32.shape[-1])
    coef = np.einsum("lrd,ld->lr", flat, units) * scales[:, None]
    out = flat - np.einsum("lr,ld->lrd", coef, units)
    return out.reshape(w32.shape).astype(np.asarray(w).dtype)


def parametrized_edit(params: Params, cfg: ModelConfig, direction, attn_scales, mlp_scales) -> Params:
    """Params with s_l of r̂_l removed from layer l's o_proj (scales attn_scales [L]) and down_proj (mlp_scales
    [L]); `direction` is [D] (every layer) or [L, D] (per layer). Embedding and LM head are unchanged.

    Raises:
      ConfigError: post-norm families (the edit would not act on what is added to the residual).
      DataError: wrong shapes, zero or non-finite directions or scales.
    """
    L = cfg.n_layers
    units = _per_layer_units(direction, L)
    _check_editable(cfg, units[:, None])
    scales = {}
    for name, s in (("attn", attn_scales), ("mlp", mlp_scales)):
        s = np.asarray(s, np.float32)
        if s.shape != (L,) or not np.isfinite(s).all():
            raise DataError(f"{name} scales must be {L} finite numbers, got shape {s.shape}")
        scales[name] = s
    if params.layers.expert_down is not None:
        raise ConfigError("parametrized abliteration of mixture-of-experts models is not supported yet")
    edited = {"o": _scaled_projection(params.layers.o, units, scales["attn"]),
              "down": _scaled_projection(params.layers.down, units, scales["mlp"])}
    if params.layers.o_bias is not None:
        edited["o_bias"] = _scaled_projection(params.layers.o_bias, units, scales["attn"])
    return params.replace(layers=params.layers.replace(**edited))


def heretic_edit(params: Params, cfg: ModelConfig, directions, direction_index: float | None,
                 attn: dict, mlp: dict) -> Params:
    """heretic's abliteration: per-layer directions [L, D] (layer l's own r̂_l when direction_index is None, else
    one interpolated direction), kernel scales from attn/mlp dicts of kernel_scales' keyword arguments."""
    directions = np.asarray(directions, np.float32)
    direction = directions if direction_index is None else interpolated_direction(directions, direction_index)
    return parametrized_edit(params, cfg, direction, kernel_scales(cfg.n_layers, **attn),
                             kernel_scales(cfg.n_layers, **mlp))


# ------------------------------------------------------------------------------------------------
# a population of trials in one compiled program


def traced_edit(params: Params, units, attn_scales, mlp_scales) -> Params:
    """parametrized_edit as a traceable function of unit directions [L, D] and scales [L] (no checks: call
    parametrized_edit once first, or check the inputs yourself), so that trials can be mapped over in one program."""
    import jax.numpy as jnp

    def project(w, s):
        w32 = w.astype(jnp.float32)
        flat = w32.reshape(w32.shape[0], -1, w32.shape[-1])
        coef = jnp.einsum("lrd,ld->lr", flat, units) * s[:, None]
        return (flat - jnp.einsum("lr,ld->lrd", coef, units)).reshape(w32.shape).astype(w.dtype)

    edited = {"o": project(params.layers.o, attn_scales), "down": project(params.layers.down, mlp_scales)}
    if params.layers.o_bias is not None:
        edited["o_bias"] = project(params.layers.o_bias, attn_scales)
    return params.replace(layers=params.layers.replace(**edited))


def population_first_token(params: Params, cfg: ModelConfig, tokens, mask, units, attn_scales, mlp_scales,
                           refusal_tokens):
    """Score P trials on one prompt batch in one compiled program (trials mapped sequentially: one edited copy of
    o_proj/down_proj at a time, not P).

    units [P, L, D] unit directions, attn_scales / mlp_scales [P, L], refusal_tokens [K] token ids.
    Returns (kl [P], refusal_prob [P]): the mean over prompts of KL(unedited || trial) of the next-token
    distribution after the last prompt token, and the mean probability mass on refusal_tokens there.
    """
    import jax
    import jax.numpy as jnp

    from refusal_jax.model.transformer import forward

    _check_editable(cfg, np.zeros((1, cfg.d_model), np.float32))
    if params.layers.expert_down is not None:
        raise ConfigError("parametrized abliteration of mixture-of-experts models is not supported yet")
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    base = jax.nn.log_softmax(forward(params, cfg, tokens, mask, logits="last").logits, -1)  # [B, V]
    return _score_population(params, cfg, tokens, mask, base, jnp.asarray(units, jnp.float32),
                             jnp.asarray(attn_scales, jnp.float32), jnp.asarray(mlp_scales, jnp.float32),
                             jnp.asarray(refusal_tokens, jnp.int32))


def _score_population_unjitted(params, cfg, tokens, mask, base, units, attn_scales, mlp_scales, refusal_tokens):
    import jax
    import jax.numpy as jnp

    from refusal_jax.model.transformer import forward

    def one(trial):
        u, a, m = trial
        logp = jax.nn.log_softmax(forward(traced_edit(params, u, a, m), cfg, tokens, mask, logits="last").logits, -1)
        kl = jnp.sum(jnp.exp(base) * (base - logp), -1).mean()
        return kl, jnp.exp(logp[:, refusal_tokens]).sum(-1).mean()

    return jax.lax.map(one, (units, attn_scales, mlp_scales))


def _score_population(*args):
    import jax

    global _score_population_jit
    if _score_population_jit is None:  # jitted on first use: importing this module must not start JAX
        _score_population_jit = jax.jit(_score_population_unjitted, static_argnums=(1,))
    return _score_population_jit(*args)


_score_population_jit = None

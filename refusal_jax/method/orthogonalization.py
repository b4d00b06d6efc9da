"""Weight orthogonalization: a Params -> Params edit equivalent to directional ablation at inference time.

Every matrix that writes into the residual stream (token embedding, attention output projections, MLP down
projections; in a mixture of experts every routed expert's down projection and the shared expert's) loses its
component along r̂: W <- W - (W r̂) r̂ᵀ on the d_model axis. Then no block can write r̂ into the residual, which is
what hook-based ablation enforces (paper App. E).

Gemma-2/3 apply an RMSNorm *after* attention/MLP and before the residual add; projecting o/down does not remove
r̂ from a normed output, so for those families orthogonalization is not equivalent and we refuse it (use the
inference-time ablation, which acts on the tensors actually added).

Tied embeddings: the unembedding is the embedding matrix. Orthogonalizing it in place would also ablate r̂ from
the final normed residual before the LM head, which hook-based ablation does not do. We untie: the LM head keeps
the original embedding (transposed), so the edited model equals the ablated one.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import ConfigError, DataError
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params
from refusal_jax.runs import rundir as runs


def _unit_basis(direction) -> np.ndarray:
    """float32 [1, D] unit direction, or an [R, D] basis as given (rows assumed orthonormal, see subspace)."""
    d = np.asarray(direction, np.float64)
    if d.ndim == 1:
        norm = float(np.linalg.norm(d))
        if not norm > 0 or not np.isfinite(norm):
            raise DataError(f"cannot orthogonalize against a direction of norm {norm}")
        d = (d / norm)[None]
    return d.astype(np.float32)


# the matrices whose rows write into the residual stream, and the biases added with them (those a config has: an
# MoE model without a shared expert has no dense down; only gpt-oss has biases there)
EDITED_FIELDS = ("embed", "layers.o", "layers.down", "layers.expert_down", "layers.o_bias", "layers.expert_down_bias")


def project_rows(w, basis, *, preserve_norm: bool = False, xp=jnp):
    """Remove span(basis) from the last axis (D) of w [..., D]; basis [R, D] or one per leading index [L, R, D].

    Computed in float32 and returned in w's dtype; with preserve_norm, each row is rescaled to its original norm
    (a row inside the span becomes zero). xp=np computes on the host (the streaming export's row blocks: no
    device copies); results then differ from jax.numpy's by float32 rounding only.
    """
    w32 = xp.asarray(w).astype(xp.float32)
    b = xp.asarray(basis, xp.float32)
    if b.ndim == 2:
        out = w32 - (w32 @ b.T) @ b  # [..., D] @ [D, R] @ [R, D]
    else:  # per layer: w [L, ..., D], b [L, R, D]
        flat = w32.reshape(w32.shape[0], -1, w32.shape[-1])
        out = (flat - (flat @ b.transpose(0, 2, 1)) @ b).reshape(w32.shape)
    if preserve_norm:
        before = xp.linalg.norm(w32, axis=-1, keepdims=True)
        after = xp.linalg.norm(out, axis=-1, keepdims=True)
        out = xp.where(after > 0, out * (before / xp.where(after > 0, after, 1.0)), 0.0)
    return out.astype(w.dtype)


def _check_editable(cfg: ModelConfig, basis: np.ndarray) -> None:
    if cfg.post_norms:
        raise ConfigError(
            f"weight edits are not equivalent to ablation for {cfg.family}: its post-attention/MLP norms rescale "
            "what is added to the residual. Use inference-time ablation instead.")
    if basis.ndim == 3 and basis.shape[0] != cfg.n_layers:
        raise DataError(f"per-layer basis has {basis.shape[0]} layers, the model {cfg.n_layers}")


def _field_basis(field: str, basis: np.ndarray, layer: int | None = None) -> np.ndarray:
    """The basis that edits `field` (or its layer slice): a per-layer basis edits the embedding with layer 0's."""
    if basis.ndim == 2:
        return basis
    if field == "embed":
        return basis[0]
    return basis if layer is None else basis[layer]


def edit_weights(params: Params, cfg: ModelConfig, basis, *, preserve_norm: bool = False) -> Params:
    """Project `basis` (unit [R, D], or [L, R, D] per layer) out of every residual-writing row (EDITED_FIELDS),
    optionally rescaling rows to their original norms. The LM head is untied (keeps the original embedding)."""
    b = np.asarray(basis, np.float32)
    _check_editable(cfg, b)
    edited = {}
    for field in EDITED_FIELDS[1:]:  # o [L, N, H, D], down [L, F, D], expert_down [L, E, X, D], biases [L, (E,) D]
        name = field.split(".", 1)[1]
        w = getattr(params.layers, name)
        if w is not None:
            edited[name] = project_rows(w, _field_basis(field, b), preserve_norm=preserve_norm)
    layers = params.layers.replace(**edited)
    lm_head = params.lm_head if params.lm_head is not None else params.embed.T  # untie, see module docstring
    return params.replace(embed=project_rows(params.embed, _field_basis("embed", b), preserve_norm=preserve_norm),
                          layers=layers, lm_head=lm_head)


def orthogonalize(params: Params, cfg: ModelConfig, direction) -> Params:
    """Params with r̂ (or an orthonormal [R, D] basis) projected out of every residual-writing matrix."""
    return edit_weights(params, cfg, _unit_basis(direction))


def streaming_edit(cfg: ModelConfig, basis, *, preserve_norm: bool = False, chunk_bytes: int = 16 << 20):
    """The edit of `edit_weights` as a per-tensor function (field, layer or None, array) -> array, for
    `convert.engine.to_hf_tensors(edit=...)`: an export then holds the original model plus one edited tensor, not
    a second copy of every edited matrix. Rows are projected in chunks of about `chunk_bytes` (float32)."""
    b = np.asarray(basis, np.float32)
    _check_editable(cfg, b)

    def edit(field: str, layer: int | tuple[int, int] | None, w):
        if field not in EDITED_FIELDS:
            return w
        fb = _field_basis(field, b, layer[0] if isinstance(layer, tuple) else layer)  # (layer, expert): one expert
        w = np.asarray(w)
        rows = w.reshape(-1, w.shape[-1])
        out = np.empty(rows.shape, w.dtype)
        step = max(1, chunk_bytes // (4 * rows.shape[1]))
        for i in range(0, rows.shape[0], step):
            out[i:i + step] = project_rows(rows[i:i + step], fb, preserve_norm=preserve_norm, xp=np)
        return out.reshape(w.shape)

    return edit


def untied_config(cfg: ModelConfig) -> ModelConfig:
    """The config of an orthogonalized model: tie_embeddings is False because the head was untied."""
    import dataclasses

    return dataclasses.replace(cfg, tie_embeddings=False)


# ------------------------------------------------------------------------------------------------
# direction files and checks


def load_direction(path, d_model: int | None):
    """A refusal direction [D] (any norm) or an orthonormal basis [R, D] from a .npy file, checked.

    `path` may also be a run directory holding `direction.npy`. d_model=None skips the size check (to check the
    file before the model is loaded).
    Raises:
      DataError: missing or unreadable file, wrong shape, non-finite or zero values, non-orthonormal basis rows.
    """
    from pathlib import Path

    path = Path(path).expanduser()
    if path.is_dir() and (path / "direction.npy").exists():
        path = path / "direction.npy"
    arr = runs.read_npy(path, "direction")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a real-valued array, got {getattr(arr, 'dtype', type(arr))}")
    arr = arr.astype(np.float32)
    want = "D" if d_model is None else d_model
    if arr.ndim not in (1, 2) or arr.size == 0 or (d_model is not None and arr.shape[-1] != d_model):
        raise DataError(f"{path}: direction has shape {tuple(arr.shape)}; this model needs [{want}] "
                        f"(one direction) or [R, {want}] (orthonormal rows)")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: direction contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=-1)
    if (norms == 0).any():
        raise DataError(f"{path}: direction is zero (nothing to project out)")
    if arr.ndim == 2:
        gram = arr.astype(np.float64) @ arr.T.astype(np.float64)
        err = np.abs(gram - np.eye(arr.shape[0])).max()
        if err > 1e-3:
            raise DataError(f"{path}: the {arr.shape[0]} rows are not orthonormal (max |B Bᵀ - I| = {err:.2e}); "
                            "pass one direction [D] or orthonormalise the basis")
    return arr


SITE_NAMES = {"embed": "embed", "layers.o": "o_proj", "layers.down": "down_proj",
              "layers.expert_down": "experts.down_proj",
              "layers.o_bias": "o_proj.bias", "layers.expert_down_bias": "experts.down_proj.bias"}


def max_projection(w, direction, chunk_bytes: int = 16 << 20) -> float:
    """max |w r̂| over the rows of w [..., D] (0 once r̂ is projected out), in float32 row blocks on the host
    (one einsum over a whole stacked matrix made XLA copy it)."""
    basis = _unit_basis(direction)
    rows = np.asarray(w).reshape(-1, basis.shape[-1])
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    return max(float(np.abs(rows[i:i + step].astype(np.float32) @ basis.T).max())
               for i in range(0, rows.shape[0], step))


def residual_write_norms(params: Params, direction) -> dict[str, float]:
    """max |W r̂| over every residual-writing matrix (embedding, o_proj, down_proj, experts' down_proj): 0 after
    orthogonalization."""
    fields = {"embed": params.embed, "layers.o": params.layers.o, "layers.down": params.layers.down,
              "layers.expert_down": params.layers.expert_down, "layers.o_bias": params.layers.o_bias,
              "layers.expert_down_bias": params.layers.expert_down_bias}
    return {SITE_NAMES[f]: max_projection(w, direction) for f, w in fields.items() if w is not None}

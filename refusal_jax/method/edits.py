"""Weight edits that aim to keep capabilities: projected and norm-preserving (biprojected) abliteration.

Every method is a Params -> Params function and a `--method` of `python -m refusal_jax.orthogonalize`. The
residual-writing weight vectors are the D-dimensional rows that a matrix adds into the residual stream:

  embedding  embed[v, :]          one row per token                      [V, D]
  attention  o[l, n, h, :]        one row per (head, head dim) input     [L, N, H, D]
  MLP        down[l, f, :]        one row per MLP neuron                 [L, F, D]

(HF's o_proj.weight / down_proj.weight are [D, in]: these rows are their columns.) The LM head is untied and
keeps the original embedding, as `orthogonalize` does.

plain            w <- w - (w·r̂) r̂ on every row: what `orthogonalization.orthogonalize` does. Equivalent to
                 inference-time directional ablation of r̂.
projected        "projected abliteration" (J. Lai, 2025): only the part of r orthogonal to the harmless mean μ
                 is removed, r' = r - (r·μ̂) μ̂, then plain orthogonalization against r'. The part of r along μ̂
                 (argued to be shared by all prompts, not refusal) is left in the model. Equivalent to
                 inference-time ablation of r'.
norm-preserving  "norm-preserving biprojected abliteration" (J. Lai, 2025): project r' (or r̂ without a harmless
                 mean) out of each row as above, then rescale the row to its original Euclidean norm:
                 w <- ‖w‖ · u/‖u‖ with u = w - (w·r̂')r̂'. Rows keep their magnitudes and lose their r̂' component
                 exactly (rescaling a vector orthogonal to r̂' keeps it orthogonal); only their directions change.
                 A row parallel to r̂' becomes zero. Not equivalent to any inference-time ablation.

Biprojection with per-layer means: `harmless_mean` may be one vector [D] (the same r' for every matrix) or one
per layer [L, D] (e.g. mean resid_pre of harmless prompts at the chosen position): then the weights of layer l
are edited against r'_l = r - (r·μ̂_l) μ̂_l, the harmless mean *of the layer being edited*, and the embedding
against layer 0's. An [R, D] basis is projected row by row and re-orthonormalised (`subspace.orthonormalize`).

Harmless means: stage 1 of the pipeline writes `generate_directions/mean_harmless.npy` (HARMLESS_MEAN_FILE: float64
[n_pos, L, D], the `directions.mean_activations` of the harmless train set, same layout as mean_diffs.npy); any
.npy of shape [D], [L, D] or [n_pos, L, D] is accepted too (`load_harmless_mean`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refusal_jax.errors import DataError
from refusal_jax.method.orthogonalization import _unit_basis, edit_weights
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params
from refusal_jax.runs import rundir as runs

METHODS = ("plain", "projected", "norm-preserving")
HARMLESS_MEAN_FILE = "generate_directions/mean_harmless.npy"


# --------------------------------------------------------------------------------------------------
# directions


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if (n == 0).any():
        raise DataError("the harmless mean is zero")
    return x / n


def projected_direction(direction, harmless_mean) -> np.ndarray:
    """r' = r - (r·μ̂) μ̂, float64, not normalised.

    direction [D] with harmless_mean [D] -> [D]; with harmless_mean [L, D] -> [L, D] (one r'_l per layer).
    """
    r = np.asarray(direction, np.float64)
    mu = _unit(np.asarray(harmless_mean, np.float64))
    if r.ndim != 1 or mu.shape[-1] != r.shape[0]:
        raise DataError(f"direction {r.shape} and harmless mean {mu.shape} do not match")
    return r - (mu @ r)[..., None] * mu


def projected_basis(direction, harmless_mean) -> np.ndarray:
    """The unit basis to project out: [R', D] for a [D] mean, [L, R', D] for an [L, D] mean (float32).

    `direction` is [D] (any norm) or an orthonormal [R, D] basis; each row is projected orthogonally to μ̂ and
    the result re-orthonormalised (a row that lies along μ̂ disappears, and an [L, D] mean needs the same number
    of surviving rows in every layer).
    """
    from refusal_jax.method.subspace import orthonormalize

    d = np.atleast_2d(np.asarray(direction, np.float64))
    mu = np.asarray(harmless_mean, np.float64)
    per_layer = mu.ndim == 2
    mus = mu if per_layer else mu[None]
    bases = []
    for m in mus:
        m = _unit(m)
        proj = d - np.outer(d @ m, m)
        bases.append(orthonormalize(proj))
    if len({b.shape for b in bases}) != 1:
        raise DataError("the projected basis has a different rank in different layers")
    return np.stack(bases) if per_layer else bases[0]


def resolve_harmless_mean(mean, cfg: ModelConfig, pos: int | None = None) -> np.ndarray:
    """A harmless mean as [D] or [L, D] float64; an [n_pos, L, D] array (HARMLESS_MEAN_FILE) needs `pos`."""
    mu = np.asarray(mean, np.float64)
    D, L = cfg.d_model, cfg.n_layers
    if mu.ndim == 3:
        if mu.shape[1:] != (L, D):
            raise DataError(f"harmless mean has shape {mu.shape}; expected [n_pos, {L}, {D}]")
        if pos is None:
            raise DataError("a [n_pos, L, D] harmless mean needs the position (pos of direction_metadata.json)")
        if not -mu.shape[0] <= pos < 0:
            raise DataError(f"position {pos} out of range for {mu.shape[0]} positions")
        mu = mu[pos]
    if mu.shape not in ((D,), (L, D)):
        raise DataError(f"harmless mean has shape {mu.shape}; expected [{D}], [{L}, {D}] or [n_pos, {L}, {D}]")
    if not np.isfinite(mu).all():
        raise DataError("harmless mean contains NaN or infinite values")
    if (np.linalg.norm(mu, axis=-1) == 0).any():
        raise DataError("harmless mean is zero")
    return mu


def load_harmless_mean(path, cfg: ModelConfig, direction_path=None, pos: int | None = None) -> np.ndarray:
    """Read a harmless mean .npy (or a run directory holding HARMLESS_MEAN_FILE) as [D] or [L, D].

    For an [n_pos, L, D] file the position is `pos`, else "pos" of direction_metadata.json next to
    `direction_path`.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / HARMLESS_MEAN_FILE
    arr = runs.read_npy(path, "harmless mean")
    if arr.ndim == 3 and pos is None and direction_path is not None:
        d = Path(direction_path).expanduser()
        meta = (d if d.is_dir() else d.parent) / "direction_metadata.json"
        if meta.exists():
            pos = runs.read_direction_metadata(meta)["pos"]
    try:
        return resolve_harmless_mean(arr, cfg, pos)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# weight edits


def edit_basis(direction, method: str = "plain", harmless_mean=None) -> tuple[np.ndarray, bool]:
    """(unit basis to project out, preserve_norm) of one of METHODS; `harmless_mean` ([D] or [L, D]) is required
    for "projected", optional for "norm-preserving" (without it the rows are only rescaled, not biprojected),
    ignored by "plain". Feed the pair to `orthogonalization.edit_weights` or `orthogonalization.streaming_edit`."""
    if method == "plain":
        return _unit_basis(direction), False
    if method == "projected":
        if harmless_mean is None:
            raise DataError("--method projected needs the harmless mean (--harmless-mean PATH.npy)")
        return projected_basis(direction, harmless_mean), False
    if method == "norm-preserving":
        basis = projected_basis(direction, harmless_mean) if harmless_mean is not None else _unit_basis(direction)
        return basis, True
    raise DataError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def edit(params: Params, cfg: ModelConfig, direction, method: str = "plain", harmless_mean=None) -> Params:
    """Apply one of METHODS (see `edit_basis`)."""
    basis, preserve_norm = edit_basis(direction, method, harmless_mean)
    return edit_weights(params, cfg, basis, preserve_norm=preserve_norm)


def row_norms(params: Params) -> dict[str, np.ndarray]:
    """Norms of every residual-writing row: {"embed": [V], "o": [L, N, H], "down": [L, F]} (float32), plus
    "expert_down": [L, E, X] for a mixture of experts (an MoE model without a shared expert has no "down")."""
    def n(w):
        return np.linalg.norm(np.asarray(w, np.float32), axis=-1)

    rows = {"embed": params.embed, "o": params.layers.o, "down": params.layers.down,
            "expert_down": params.layers.expert_down}
    return {name: n(w) for name, w in rows.items() if w is not None}


def describe(method: str, direction, harmless_mean) -> list[str]:
    """Lines for the command line's report: what was projected out."""
    if method == "plain":
        return []
    lines = [f"method {method}"]
    if harmless_mean is None:
        lines.append("  no harmless mean: rows lose their r̂ component and are rescaled to their original norms")
        return lines
    mu = np.asarray(harmless_mean, np.float64)
    d = np.atleast_2d(np.asarray(direction, np.float64))
    cos = (d / np.linalg.norm(d, axis=-1, keepdims=True)) @ _unit(mu).T  # [R, 1 or L]
    where = "one harmless mean" if mu.ndim == 1 else f"per-layer harmless means ({mu.shape[0]} layers)"
    lines.append(f"  {where}; |cos(r, μ)| {np.abs(cos).min():.3f}..{np.abs(cos).max():.3f}: that part of r is kept")
    if method == "norm-preserving":
        lines.append("  every embedding / o_proj / down_proj row keeps its original norm")
    return lines

"""Refusal subspaces: orthonormal bases [k, D] instead of one direction, and how refusal falls as k grows.

Three ways to get a basis, all returning float32 rows that are orthonormal to float32 precision (computed in
float64), ordered by importance and sign-fixed, so the same input always gives the same basis:

* `pca_basis`: the top-k principal directions of per-prompt harmful-minus-harmless differences at one
  (position, layer). Two ways to form the differences (`pairing`):
    "mean"    x_i = harmful_i - mean(harmless)           (one row per harmful prompt; the default)
    "paired"  x_i = harmful_i - harmless_i, i < min(n_harmful, n_harmless), in the given order
  The directions are the right singular vectors of the *uncentred* difference matrix X (second-moment PCA), so
  the mean difference - the difference-in-means direction - is part of what is explained and the first component
  is close to it whenever refusal dominates. `center=True` gives covariance PCA instead (X minus its mean row),
  which finds the spread around the difference-in-means direction, not the direction itself.
* `orthonormalize`: the Q of the QR factorisation (float64 Gram-Schmidt) of several candidate directions, e.g.
  the top-k survivors of a selection sweep (`candidate_basis`). Row i spans the same space as inputs 0..i; signs
  are fixed so that row i has a positive dot product with input i (R's diagonal is positive), which makes the
  factorisation unique, hence deterministic.
* `independence_penalty`: a differentiable loss term sum_{i<j} |r̂_i · r̂_j|^p for optimizing several
  directions at once, or one new direction against fixed earlier ones (`refusal_jax.optimize` uses it through
  `--independent-of` / `--independence-weight`).

Sign convention of `pca_basis`: each component is flipped to have a non-negative dot product with the mean
difference (ties: its largest-magnitude coordinate is positive).

`refusal_rate_vs_k` ablates the first k rows for k = 0..K (k=0: no intervention) with `Intervention.ablation`
and scores them with `scoring.evaluate_interventions`. Every basis is padded to K rows with zero rows, which
are exact no-ops of the ablation (x - (x·0)0 = x), so all k share one compiled program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import DataError
from refusal_jax.model.batching import in_input_order
from refusal_jax.model.transformer import Intervention, forward_unjitted

PAIRINGS = ("mean", "paired")


# --------------------------------------------------------------------------------------------------
# per-prompt activations


@functools.partial(jax.jit, static_argnames=("cfg", "n_pos"))
def _resid_at(params, cfg, tokens, mask, *, n_pos):
    """[L, B, n_pos, D] float32 resid_pre at the last n_pos positions."""
    out = forward_unjitted(params, cfg, tokens, mask, capture=("resid_pre",), capture_last=n_pos, logits="none")
    return out.resid_pre.astype(jnp.float32)


def per_prompt_activations(params, cfg, batches, pos: int, layer: int) -> np.ndarray:
    """resid_pre of every real prompt at post-instruction position `pos` (< 0) and `layer`: float32 [n, D].

    Rows are in input order (the `Batch.index` of `refusal_jax.model.batching.bucketed` batches). These are the
    per-prompt vectors whose means `directions.mean_diffs` subtracts.
    """
    if pos >= 0:
        raise DataError(f"pos must be a negative post-instruction position, got {pos}")
    if not 0 <= layer < cfg.n_layers:
        raise DataError(f"layer {layer} out of range 0..{cfg.n_layers - 1}")
    return in_input_order(
        batches, lambda b: _resid_at(params, cfg, b.tokens, b.mask, n_pos=-pos)[layer, :, 0])  # one layer to host


# --------------------------------------------------------------------------------------------------
# bases


def _check_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty [n, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return x


def difference_matrix(harmful_acts, harmless_acts, pairing: str = "mean") -> np.ndarray:
    """Per-prompt differences float64 [n, D] (see the module docstring for the two pairings)."""
    harmful = _check_matrix(harmful_acts, "harmful_acts")
    harmless = _check_matrix(harmless_acts, "harmless_acts")
    if harmful.shape[1] != harmless.shape[1]:
        raise DataError(f"activation widths differ: {harmful.shape[1]} vs {harmless.shape[1]}")
    if pairing == "mean":
        return harmful - harmless.mean(0)
    if pairing == "paired":
        n = min(len(harmful), len(harmless))
        return harmful[:n] - harmless[:n]
    raise DataError(f"unknown pairing {pairing!r}; choose from {PAIRINGS}")


def pca_basis(harmful_acts, harmless_acts, k: int, *, pairing: str = "mean", center: bool = False,
              return_variance: bool = False):
    """Top-k principal directions of per-prompt differences: float32 [k, D] orthonormal rows.

    Args:
      harmful_acts, harmless_acts: [n1, D], [n2, D] activations at one (pos, layer)
        (`per_prompt_activations`).
      k: number of directions (at most min(n, D) for n difference rows).
      pairing: "mean" or "paired" (module docstring).
      center: subtract the mean difference first (covariance PCA) instead of second-moment PCA.
      return_variance: also return the fraction of the (second moment / variance) each component explains.
    """
    x = difference_matrix(harmful_acts, harmless_acts, pairing)
    mean = x.mean(0)
    if center:
        x = x - mean
    if not 1 <= k <= min(x.shape):
        raise DataError(f"k={k} must be between 1 and min(n_rows, D) = {min(x.shape)}")
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[:k]
    for i in range(k):
        dot = float(basis[i] @ mean)
        if abs(dot) <= 1e-12 * (np.linalg.norm(mean) + 1e-300):
            dot = float(basis[i][np.argmax(np.abs(basis[i]))])
        if dot < 0:
            basis[i] = -basis[i]
    out = basis.astype(np.float32)
    if return_variance:
        return out, (s[:k] ** 2 / max(float((s ** 2).sum()), 1e-300))
    return out


def orthonormalize(directions, k: int | None = None, *, tol: float = 1e-6) -> np.ndarray:
    """Deterministic sign-fixed QR (Gram-Schmidt) of [m, D] directions: float32 [<= min(k, m), D] orthonormal rows.

    Row i spans span(directions[:i+1]) minus span(directions[:i]) and has a positive dot product with
    directions[i]. A direction (numerically) inside the span of the earlier ones (|R_ii| <= tol * ||d_i||) is
    dropped, so the result may have fewer rows than asked for; a zero direction is an error.
    """
    d = _check_matrix(directions, "directions")
    norms = np.linalg.norm(d, axis=1)
    if (norms == 0).any():
        raise DataError(f"directions {np.flatnonzero(norms == 0).tolist()} are zero")
    k = len(d) if k is None else k
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    # The QR factorisation with a positive diagonal R is unique; this computes it row by row (Gram-Schmidt,
    # orthogonalised twice for float64 accuracy), which also lets dependent rows be skipped: with
    # np.linalg.qr their Q column would be arbitrary and every later row orthogonalised against it.
    kept: list[np.ndarray] = []
    for v0, n0 in zip(d, norms):
        v = v0.copy()
        for _ in range(2):
            for q in kept:
                v -= (q @ v) * q
        n = np.linalg.norm(v)
        if n > tol * n0:
            kept.append(v / n)
        if len(kept) == k:
            break
    return np.stack(kept).astype(np.float32)


def candidate_basis(mean_diffs, candidates: Sequence, k: int) -> np.ndarray:
    """Orthonormal basis of the first k candidate directions, in the given order.

    Args:
      mean_diffs: [n_pos, L, D] (generate_directions/mean_diffs.npy).
      candidates: (pos, layer) pairs, or evaluation dicts with "position" and "layer" keys, best first (e.g.
        select_direction/direction_evaluations_filtered.json, sorted by refusal score).
      k: number of directions wanted. Candidates inside the span of better ones are skipped, and the next ones
        used, so the basis has k rows whenever enough independent candidates exist.
    """
    diffs = np.asarray(mean_diffs, np.float64)
    pairs = [(c["position"], c["layer"]) if isinstance(c, dict) else tuple(c) for c in candidates]
    vectors = [diffs[p, layer] for p, layer in pairs if np.any(diffs[p, layer])]
    if not vectors:
        raise DataError("no non-zero candidate directions")
    return orthonormalize(np.stack(vectors), k)


def is_orthonormal(basis, atol: float = 1e-5) -> bool:
    b = np.asarray(basis, np.float64)
    return bool(np.abs(b @ b.T - np.eye(len(b))).max() <= atol)


def pad_basis(basis, rows: int) -> np.ndarray:
    """[k, D] -> [rows, D] with zero rows appended (zero rows are no-ops of the ablation)."""
    b = np.asarray(basis, np.float32)
    if len(b) > rows:
        raise DataError(f"basis has {len(b)} rows, more than {rows}")
    return np.concatenate([b, np.zeros((rows - len(b), b.shape[1]), np.float32)])


# --------------------------------------------------------------------------------------------------
# independence penalty (a loss term for refusal_jax.optimize)


def _unit_rows(x: jax.Array) -> jax.Array:
    """Rows divided by their norms; a zero row stays zero (so zero padding contributes nothing) and has a zero,
    not NaN, gradient."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    ok = sq > 0
    return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def independence_penalty(directions: jax.Array, fixed: jax.Array | None = None, *, power: int = 2) -> jax.Array:
    """sum over pairs of |cos(r_i, r_j)|^power: 0 iff the directions are mutually orthogonal.

    Args:
      directions: [k, D] directions being optimised (any norms; cosines are used).
      fixed: optional [m, D] directions held fixed (e.g. ones found earlier); pairs among them are not counted,
        only pairs (optimised, optimised) and (optimised, fixed). Zero rows contribute nothing.
      power: 2 (default, smooth everywhere) or 1 (the literal |r_i · r_j|, whose gradient is discontinuous
        at 0, which makes Adam oscillate around orthogonality).
    """
    u = _unit_rows(directions)
    k = u.shape[0]
    cos = jnp.abs(u @ u.T)
    total = jnp.sum(jnp.where(jnp.triu(jnp.ones((k, k), bool), 1), cos ** power, 0.0))
    if fixed is not None:
        total = total + jnp.sum(jnp.abs(u @ _unit_rows(fixed.astype(u.dtype)).T) ** power)
    return total


# --------------------------------------------------------------------------------------------------
# refusal as a function of k


def refusal_rate_vs_k(params, cfg, batches, basis, refusal_ids, *, chunk: int = 8,
                      ks: Sequence[int] | None = None) -> dict:
    """Mean refusal score (and KL, refusal rate) with the first k basis rows ablated, for k in `ks`.

    Args:
      basis: [K, D] orthonormal rows, most important first.
      batches: prompts (`refusal_jax.model.batching.Batch`), e.g. harmful val for bypass scores.
      refusal_ids: refusal token ids of the model's chat format.
      ks: which k to evaluate (default 0..K; k=0 is the unablated model).
    Returns:
      {"k": [..], "refusal_score": [..] mean logit refusal score, "refusal_rate": [..] fraction of prompts with
      score > 0, "kl": [..] mean KL(base || ablated) at the last position, "per_prompt_refusal": [len(ks), n]}.
    """
    from refusal_jax.method import scoring

    b = np.asarray(basis, np.float32)
    if b.ndim != 2 or b.shape[1] != cfg.d_model:
        raise DataError(f"basis must be [K, {cfg.d_model}], got {b.shape}")
    if not is_orthonormal(b, 1e-3):
        raise DataError("basis rows are not orthonormal (use subspace.orthonormalize)")
    K = len(b)
    ks = list(range(K + 1)) if ks is None else [int(k) for k in ks]
    if any(not 0 <= k <= K for k in ks):
        raise DataError(f"every k must be in 0..{K}, got {ks}")
    ivs = [Intervention.ablation(cfg, pad_basis(b[:k], K)) for k in ks]
    res = scoring.evaluate_interventions(params, cfg, batches, ivs, refusal_ids, chunk=chunk)
    per = res["per_prompt_refusal"]
    return {"k": ks, "refusal_score": res["refusal_score"], "refusal_rate": (per > 0).mean(1), "kl": res["kl"],
            "per_prompt_refusal": per}

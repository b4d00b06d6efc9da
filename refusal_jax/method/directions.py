"""Stage 1 (candidate directions) and stage 2 (selection) of the reference pipeline, as compiled batched code.

Stage 1: mean resid_pre at every post-instruction position x layer for harmful and harmless prompts; their
difference is the candidate grid `mean_diffs[pos, layer, :]`. Per batch the device sums float32 activations
over prompts; the host accumulates those sums in float64 (the reference accumulates in float64 too).

Stage 2: every candidate is scored by three forward passes over the validation sets (ablation on harmful,
ablation on harmless for KL, activation addition at the candidate's own layer on harmless), through
`refusal_jax.method.scoring`, then filtered and selected by the reference's rule (`rejection_reasons`, `select`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import RunError
from refusal_jax.method import scoring
from refusal_jax.model.batching import Batch
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params
from refusal_jax.model.transformer import Intervention, forward_unjitted
from refusal_jax.runs.distributed import to_host  # global (multi-process) arrays gathered on every host

# --------------------------------------------------------------------------------------------------
# stage 1


@functools.partial(jax.jit, static_argnames=("cfg", "n_pos"))
def _resid_sums(params, cfg, tokens, mask, weight, *, n_pos):
    """[n_pos, L, D] float32 weighted sum over the batch of resid_pre at the last n_pos positions."""
    out = forward_unjitted(params, cfg, tokens, mask, capture=("resid_pre",), capture_last=n_pos, logits="none")
    return jnp.einsum("lbpd,b->pld", out.resid_pre.astype(jnp.float32), weight)


def mean_activations(params: Params, cfg: ModelConfig, batches: Sequence[Batch], n_pos: int,
                     on_step=None) -> np.ndarray:
    """Mean resid_pre over all real prompts: float64 [n_pos, L, D]."""
    total = np.zeros((n_pos, cfg.n_layers, cfg.d_model), np.float64)
    n = 0.0
    for batch in batches:
        sums = _resid_sums(params, cfg, batch.tokens, batch.mask, batch.weight, n_pos=n_pos)
        total += to_host(sums).astype(np.float64)
        n += float(batch.weight.sum())
        if on_step:
            on_step(1)
    if n == 0:
        raise RunError("no prompts to average")
    return total / n


def candidate_directions(params, cfg, harmful: Sequence[Batch], harmless: Sequence[Batch], n_pos: int,
                         on_step=None) -> tuple[np.ndarray, np.ndarray]:
    """Difference-in-means candidates `[n_pos, L, D]` float64 (harmful minus harmless) and the harmless mean they
    subtract, from batches."""
    mean_harmless = mean_activations(params, cfg, harmless, n_pos, on_step)
    diffs = mean_activations(params, cfg, harmful, n_pos, on_step) - mean_harmless
    if not np.isfinite(diffs).all():
        raise RunError("mean activations contain NaN or infinite values (check the model dtype / weights)")
    return diffs, mean_harmless


def mean_diffs(params, cfg, harmful: Sequence[Batch], harmless: Sequence[Batch], n_pos: int, on_step=None):
    """The candidates of `candidate_directions` alone."""
    return candidate_directions(params, cfg, harmful, harmless, n_pos, on_step)[0]


# --------------------------------------------------------------------------------------------------
# stage 2


def candidate_grid(cfg: ModelConfig, n_pos: int, positions: Sequence[int] | None = None,
                   layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(pos, layer) pairs in the reference's iteration order: pos -n..-1, then layer 0..L-1."""
    positions = list(range(-n_pos, 0)) if positions is None else list(positions)
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    for p in positions:
        if not -n_pos <= p < 0:
            raise RunError(f"position {p} out of range: post-instruction positions are -{n_pos}..-1")
    for layer in layers:
        if not 0 <= layer < cfg.n_layers:
            raise RunError(f"layer {layer} out of range: the model has layers 0..{cfg.n_layers - 1}")
    return [(p, layer) for p in positions for layer in layers]


def live_candidates(diffs: np.ndarray, grid: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the grid's non-zero candidates. Zero candidates (layer 0 at true template positions: the
    embeddings of identical tokens) are exact no-ops under both interventions, so they get the baseline scores
    without running the model. The sweep makes len(live) x (harmful + 2 x harmless batches) on_step steps."""
    return [i for i, (p, layer) in enumerate(grid) if np.any(diffs[p, layer])]


def score_candidates(params, cfg, diffs: np.ndarray, harmful_val: Sequence[Batch], harmless_val: Sequence[Batch],
                     refusal_ids, grid: Sequence[tuple[int, int]], *, chunk: int = 8,
                     on_step=None) -> tuple[list[dict], dict]:
    """The reference's three scores for every (pos, layer) candidate, in grid order, and the baseline scores.

    Returns:
      (evaluations, baselines): evaluations as the reference's direction_evaluations.json entries plus
      `direction_norm`; baselines {"harmful_refusal_score", "harmless_refusal_score"} without intervention.
    """
    live = live_candidates(diffs, grid)
    ablations = [Intervention.ablation(cfg, diffs[grid[i]]) for i in live]
    harmful = scoring.evaluate_interventions(params, cfg, harmful_val, ablations, refusal_ids, chunk=chunk,
                                             on_step=on_step)
    added, harmless_base = np.zeros(0), None
    if live:  # the additions' unmodified pass also gives the harmless baseline logits the KL needs
        harmless_base = []
        added = scoring.evaluate_additions(params, cfg, harmless_val, np.asarray([diffs[grid[i]] for i in live]),
                                   [grid[i][1] for i in live], refusal_ids, chunk=chunk, on_step=on_step,
                                   base_logits_out=harmless_base)
    harmless_abl = scoring.evaluate_interventions(params, cfg, harmless_val, ablations, refusal_ids, chunk=chunk,
                                          on_step=on_step, base_logits=harmless_base)
    base_harmful = float(harmful["baseline_refusal"].mean())
    base_harmless = float(harmless_abl["baseline_refusal"].mean())
    # row 0 of every column is the baseline (what a zero candidate gets); live candidate k is at row k + 1
    refusal = np.concatenate([[base_harmful], harmful["refusal_score"]])
    induce = np.concatenate([[base_harmless], added])
    kl = np.concatenate([[0.0], harmless_abl["kl"]])
    row = np.zeros(len(grid), int)
    row[live] = np.arange(1, len(live) + 1)
    evaluations = [
        {"position": p, "layer": layer, "refusal_score": float(refusal[row[i]]),
         "steering_score": float(induce[row[i]]), "kl_div_score": float(kl[row[i]]),
         "direction_norm": float(np.linalg.norm(diffs[p, layer]))}
        for i, (p, layer) in enumerate(grid)
    ]
    baselines = {"harmful_refusal_score": base_harmful, "harmless_refusal_score": base_harmless}
    return evaluations, baselines


def rejection_reasons(ev: dict, n_layers: int, *, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                      prune_layer_fraction: float = 0.2) -> list[str]:
    """Why the reference's filter discards a candidate (empty list: it survives). Code semantics, spec §6.3."""
    reasons = []
    if ev.get("direction_norm", 1.0) == 0.0:
        reasons.append("zero vector (identical tokens at this position: the layer-0 embedding difference)")
    scores = (ev["refusal_score"], ev["steering_score"], ev["kl_div_score"])
    if any(math.isnan(s) for s in scores):
        reasons.append("NaN score")
    if ev["layer"] >= int(n_layers * (1.0 - prune_layer_fraction)):
        reasons.append(f"layer >= {int(n_layers * (1.0 - prune_layer_fraction))} (last {prune_layer_fraction:.0%})")
    if ev["kl_div_score"] > kl_threshold:
        reasons.append(f"KL {ev['kl_div_score']:.3f} > {kl_threshold}")
    if ev["steering_score"] < induce_threshold:
        reasons.append(f"induce score {ev['steering_score']:.3f} < {induce_threshold}")
    return reasons


def select(evaluations: list[dict], n_layers: int, **filter_kwargs) -> tuple[dict, list[dict]]:
    """(winner, survivors sorted by ascending refusal_score). Ties keep grid order, like Python's stable sort.

    Entries marked "evaluated": False (not evaluated exactly under `--screen`) take no part.
    Raises RunError listing the best rejected candidates and why, when nothing survives.
    """
    evaluations = [ev for ev in evaluations if ev.get("evaluated", True)]
    survivors = [ev for ev in evaluations if not rejection_reasons(ev, n_layers, **filter_kwargs)]
    survivors = sorted(survivors, key=lambda ev: ev["refusal_score"])
    if not survivors:
        ranked = sorted((ev for ev in evaluations if not math.isnan(ev["refusal_score"])),
                        key=lambda ev: ev["refusal_score"])[:5]
        lines = [f"  pos {ev['position']} layer {ev['layer']}: refusal {ev['refusal_score']:.3f}, "
                 f"induce {ev['steering_score']:.3f}, KL {ev['kl_div_score']:.3f} -> "
                 f"{'; '.join(rejection_reasons(ev, n_layers, **filter_kwargs))}" for ev in ranked]
        raise RunError("all candidate directions were filtered out. Best rejected candidates:\n" + "\n".join(lines)
                       + "\nLoosen --kl-threshold / --induce-threshold / --prune-layer-fraction, or use more data.")
    return survivors[0], survivors

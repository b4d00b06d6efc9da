"""Stage 1 (candidate directions) and stage 2 (selection) of the reference pipeline, as compiled batched code.

Stage 1: mean resid_pre at every post-instruction position x layer for harmful and harmless prompts; their
difference is the candidate grid `mean_diffs[pos, layer, :]`. Per batch the device sums float32 activations
over prompts; the host accumulates those sums in float64 (the reference accumulates in float64 too).

Stage 2: every candidate is scored by three forward passes over the validation sets (ablation on harmful,
ablation on harmless for KL, activation addition at the candidate's own layer on harmless). Candidates are data:
chunks of `chunk` stacked `Intervention`s are vmapped through one compiled function, so the whole sweep compiles
once per batch shape, never once per candidate.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation import judge
from refusal_jax.model.batching import Batch
from refusal_jax.model.config import ModelConfig
from refusal_jax.runs.distributed import to_host  # global (multi-process) arrays gathered on every host
from refusal_jax.errors import RunError
from refusal_jax.model.transformer import Intervention, forward_unjitted
from refusal_jax.model.params import Params


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
        total += to_host(_resid_sums(params, cfg, batch.tokens, batch.mask, batch.weight, n_pos=n_pos)).astype(np.float64)
        n += float(batch.weight.sum())
        if on_step:
            on_step(1)
    if n == 0:
        raise RunError("no prompts to average")
    return total / n


def mean_diffs(params, cfg, harmful: Sequence[Batch], harmless: Sequence[Batch], n_pos: int, on_step=None):
    """Difference-in-means candidates `[n_pos, L, D]` float64 (harmful minus harmless)."""
    diff = (mean_activations(params, cfg, harmful, n_pos, on_step)
            - mean_activations(params, cfg, harmless, n_pos, on_step))
    if not np.isfinite(diff).all():
        raise RunError("mean activations contain NaN or infinite values (check the model dtype / weights)")
    return diff


# --------------------------------------------------------------------------------------------------
# per-prompt scores under a stack of interventions


def _scores_impl(params, cfg, tokens, mask, interventions: Intervention, base_logits, refusal_ids, resume=None):
    """Per-candidate, per-prompt (refusal score, KL(base || intervened)): two [C, B] float32 arrays.

    resume=(resid_pre [B, T, D], layer): for activation additions at that one layer, every candidate resumes from
    the shared unmodified resid_pre[layer] instead of recomputing the blocks below it (a second compiled program).
    """

    def one(iv):
        logits = forward_unjitted(params, cfg, tokens, mask, iv, logits="last", resume=resume).logits
        return judge.refusal_score_jax(logits, refusal_ids), judge.kl_div_jax(base_logits, logits)

    return jax.vmap(one)(interventions)


_scores = jax.jit(_scores_impl, static_argnames=("cfg", "refusal_ids"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _resid_and_logits(params, cfg, tokens, mask):
    out = forward_unjitted(params, cfg, tokens, mask, capture=("resid_pre",), logits="last")
    return out.resid_pre, out.logits


def evaluate_additions(params, cfg, batches: Sequence[Batch], candidates: np.ndarray, layers: Sequence[int],
                       refusal_ids, *, coeff: float = 1.0, chunk: int = 8, on_step=None,
                       base_logits_out: list | None = None) -> np.ndarray:
    """Mean refusal score of activation addition of `candidates[i]` at `layers[i]` (coefficient `coeff`).

    Equals `evaluate_interventions` over `Intervention.addition(...)`, but each batch's unmodified residual
    stream is computed once and every candidate starts at its own layer, so an addition at layer l costs
    (L - l) / L of a forward pass. Candidates are grouped by layer and run `chunk` at a time (one compile).
    Returns [C] float64. `base_logits_out`, if given, receives each batch's last-position logits without
    intervention (a by-product that `evaluate_interventions(base_logits=...)` can reuse).
    """
    refusal_ids = tuple(int(i) for i in refusal_ids)
    C = len(layers)
    n_prompts = int(sum(b.weight.sum() for b in batches))
    totals = np.zeros(C)
    noop = Intervention.none(cfg)
    by_layer: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        by_layer.setdefault(int(layer), []).append(i)
    # one chunk size for every layer (one compile), no larger than the largest group (no wasted no-ops)
    chunk = balanced_chunk(max((len(v) for v in by_layer.values()), default=1), chunk)
    for batch in batches:
        resid, base = _resid_and_logits(params, cfg, batch.tokens, batch.mask)
        if base_logits_out is not None:
            base_logits_out.append(base)
        for layer, members in sorted(by_layer.items()):
            for start in range(0, len(members), chunk):
                idx = members[start:start + chunk]
                group = [Intervention.addition(cfg, candidates[i], layer, coeff) for i in idx]
                group += [noop] * (chunk - len(idx))
                score, _ = _scores(params, cfg, batch.tokens, batch.mask, _stack(group), base, refusal_ids,
                                   resume=(resid[layer], jnp.asarray(layer, jnp.int32)))
                totals[idx] += (to_host(score).astype(np.float64)[: len(idx)] * batch.weight).sum(1)
                if on_step:
                    on_step(len(idx))
    return totals / n_prompts


@functools.partial(jax.jit, static_argnames=("cfg",))
def last_logits(params, cfg, tokens, mask, intervention=None):
    return forward_unjitted(params, cfg, tokens, mask, intervention, logits="last").logits


def _stack(ivs: Sequence[Intervention]) -> Intervention:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *ivs)


def balanced_chunk(n: int, chunk: int) -> int:
    """The group size for `n` items at most `chunk` at a time with the least padding: 9 items with chunk 8 run as
    two groups of 5 (one no-op) instead of 8 + 1 padded to 8 (seven no-ops). One size for all groups = one
    compile."""
    if n <= 0:
        return 1
    groups = -(-n // max(chunk, 1))
    return -(-n // groups)


def evaluate_interventions(params, cfg, batches: Sequence[Batch], interventions: Sequence[Intervention],
                           refusal_ids, *, chunk: int = 8, on_step=None,
                           base_logits: Sequence[jax.Array] | None = None) -> dict[str, np.ndarray]:
    """Mean refusal score and mean KL (vs no intervention) of each intervention over all prompts of `batches`.

    The list is processed in groups of at most `chunk` of one size (`balanced_chunk`; the last group padded
    with no-op interventions), so the compiled program depends on the batch shape and the group size only.
    Returns {"refusal_score": [C], "kl": [C], "per_prompt_refusal": [C, n_prompts], "baseline_refusal":
    [n_prompts]} (float64); the baseline (no intervention) comes from the forward pass the KL needs anyway,
    or from `base_logits` (one [B, V] array per batch) when the caller already has it.
    """
    refusal_ids = tuple(int(i) for i in refusal_ids)
    C = len(interventions)
    chunk = balanced_chunk(C, chunk)
    n_prompts = int(sum(b.weight.sum() for b in batches))
    per_prompt = np.zeros((C, n_prompts))
    baseline = np.zeros(n_prompts)
    kl_sum = np.zeros(C)
    noop = Intervention.none(cfg, rank=interventions[0].ablate_basis.shape[0]) if C else None
    for i, batch in enumerate(batches):
        base = last_logits(params, cfg, batch.tokens, batch.mask) if base_logits is None else base_logits[i]
        real = batch.index >= 0
        baseline[batch.index[real]] = judge.refusal_score(to_host(base).astype(np.float64), refusal_ids)[real]
        for start in range(0, C, chunk):
            group = list(interventions[start:start + chunk])
            n = len(group)
            group += [noop] * (chunk - n)
            score, kl = _scores(params, cfg, batch.tokens, batch.mask, _stack(group), base, refusal_ids)
            score, kl = to_host(score).astype(np.float64)[:n], to_host(kl).astype(np.float64)[:n]
            per_prompt[start:start + n][:, batch.index[real]] = score[:, real]
            kl_sum[start:start + n] += (kl * batch.weight).sum(1)
            if on_step:
                on_step(n)
    return {"refusal_score": per_prompt.mean(1), "kl": kl_sum / n_prompts, "per_prompt_refusal": per_prompt,
            "baseline_refusal": baseline}


def baseline_refusal_scores(params, cfg, batches: Sequence[Batch], refusal_ids) -> np.ndarray:
    """Per-prompt refusal score without intervention, in input order (for filtering train/val sets)."""
    return evaluate_interventions(params, cfg, batches, [], refusal_ids)["baseline_refusal"]


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
    harmful = evaluate_interventions(params, cfg, harmful_val, ablations, refusal_ids, chunk=chunk, on_step=on_step)
    added, harmless_base = np.zeros(0), None
    if live:  # the additions' unmodified pass also gives the harmless baseline logits the KL needs
        harmless_base = []
        added = evaluate_additions(params, cfg, harmless_val, np.asarray([diffs[grid[i]] for i in live]),
                                   [grid[i][1] for i in live], refusal_ids, chunk=chunk, on_step=on_step,
                                   base_logits_out=harmless_base)
    harmless_abl = evaluate_interventions(params, cfg, harmless_val, ablations, refusal_ids, chunk=chunk,
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

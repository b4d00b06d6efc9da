"""Refusal scores and KL under stacks of interventions, for every caller that scores interventions: the selection
sweep (stage 2), screening, RDO, subspaces and `compare`.

Interventions are data: chunks of `chunk` stacked `Intervention`s are vmapped through one compiled function
(`_scores`), so a sweep compiles once per batch shape and group size, never once per candidate.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation import judge
from refusal_jax.model.batching import Batch
from refusal_jax.model.transformer import Intervention, forward_unjitted
from refusal_jax.runs.distributed import to_host  # global (multi-process) arrays gathered on every host


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



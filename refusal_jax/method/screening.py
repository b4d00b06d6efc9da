"""First-order screening of the selection sweep: every candidate scored from one backward pass per validation set.

Attribution patching applied to the reference's selection (spec §6). On the unmodified model, one forward and one
backward pass per validation batch record the activation h and the gradient g of the summed refusal score (the
same `judge.refusal_score_jax` the exact sweep uses) at every site `Intervention.ablation` touches: resid_pre,
attn_out and mlp_out (after Gemma-2/3's post-norms), every layer and position. Then, to first order:

  ablation of r̂:        Δ refusal = Σ_sites g·(−(h·r̂) r̂) = r̂ᵀ M r̂,   M = −Σ_sites g hᵀ / n_prompts   ([D, D])
  addition of r at l:   Δ refusal = Σ_t g_{resid_pre[l], t}·r / n_prompts                          ([L, D])

so scoring all candidates costs two backward passes plus a [C, D] x [D, D] product, whatever the grid size.

Which sites count. With ablation at every layer, resid_pre[l] for l >= 1 is the sum of the (already ablated)
embedding, attention and MLP writes, so ablating it again is a no-op: the exact ablation equals ablation of the
*writes* only (resid_pre[0], attn_out[l], mlp_out[l]). Linearising that family ("writes", the default) gives
each write's removed component once; linearising the ε-family h → h − ε(h·r̂)r̂ at all three sites of every layer
("all", the exact d/dε of `Intervention.ablation` with `ablate_layers = ε`) counts the upstream writes again at
every later resid_pre. Both are returned (`FirstOrder.ablation_moments` keeps the site kinds apart).

KL. KL(base || intervened) has zero value and zero gradient at the base, so its first-order estimate is
identically 0 and says nothing; a second-order (Fisher) estimate would need a [D, D] Fisher per candidate layer
set. The screen therefore filters on the first-order induce score and the layer prune only, and KL is evaluated
exactly on the candidates that are evaluated exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import RunError
from refusal_jax.evaluation import judge
from refusal_jax.method import directions
from refusal_jax.model.batching import Batch, ForwardCost, memory_budget
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.transformer import forward_unjitted
from refusal_jax.runs.distributed import to_host

SITE_SETS = ("writes", "all")
# rows of FirstOrder.ablation_moments
SITE_KINDS = ("embed", "resid_pre_after_0", "attn_out", "mlp_out")


@dataclasses.dataclass
class FirstOrder:
    """Means over the validation prompts of the quantities the first-order scores need (float64).

    base_harmful / base_harmless: refusal score without intervention on each set.
    ablation_moments: [4, D, D] −Σ g hᵀ / n per site kind (`SITE_KINDS`), harmful set.
    addition_grads:  [L, D] Σ_t g at resid_pre[l] / n, harmless set.
    """

    base_harmful: float
    base_harmless: float
    ablation_moments: np.ndarray
    addition_grads: np.ndarray

    def ablation_matrix(self, sites: str = "writes") -> np.ndarray:
        if sites not in SITE_SETS:
            raise ValueError(f"sites must be one of {SITE_SETS}, got {sites!r}")
        kinds = (0, 2, 3) if sites == "writes" else (0, 1, 2, 3)
        return self.ablation_moments[list(kinds)].sum(0)

    def ablation_scores(self, candidates: np.ndarray, sites: str = "writes") -> np.ndarray:
        """[C] first-order refusal score on the harmful set under ablation of each candidates[c] ([C, D], raw:
        normalised as `Intervention.ablation` does)."""
        candidates = np.asarray(candidates, np.float64)
        unit = candidates / (np.linalg.norm(candidates, axis=-1, keepdims=True) + 1e-8)
        M = self.ablation_matrix(sites)
        return self.base_harmful + np.einsum("cd,de,ce->c", unit, M, unit)

    def addition_scores(self, candidates: np.ndarray, layers: Sequence[int], coeff: float = 1.0) -> np.ndarray:
        """[C] first-order refusal score on the harmless set under addition of coeff * candidates[c] at layers[c]."""
        candidates = np.asarray(candidates, np.float64)
        grads = self.addition_grads[np.asarray(layers, int)]
        return self.base_harmless + coeff * np.einsum("cd,cd->c", grads, candidates)


def _site_moments_impl(params, cfg: ModelConfig, tokens, mask, weight, refusal_ids, micro: int):
    """One batch: (Σ_b w_b score_b, [4, D, D] Σ g hᵀ per site kind, [L, D] Σ_t g at resid_pre), float32.

    The batch runs as ceil(B / micro) micro-batches in sequence (`lax.map`), so the backward pass keeps one
    micro-batch of saved activations at a time.
    """
    L, D = cfg.n_layers, cfg.d_model
    dtype = params.embed.dtype
    # Filler rows (copies of row 0, weight 0) up to a multiple of the micro-batch, added here on the device: the
    # tokens may be a global array sharded over processes, which no host may read whole.
    extra = -tokens.shape[0] % micro
    tokens, mask = (jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]) for a in (tokens, mask))
    weight = jnp.concatenate([jnp.asarray(weight, jnp.float32), jnp.zeros((extra,), jnp.float32)])
    B, T = tokens.shape

    def one(args):
        tok, msk, w = args

        def score(probe):
            out = forward_unjitted(params, cfg, tok, msk, capture=("resid_pre", "attn_out", "mlp_out"), logits="last",
                           probe=probe)
            s = judge.refusal_score_jax(out.logits, refusal_ids)
            return jnp.sum(s * w), (out.resid_pre, out.attn_out, out.mlp_out)

        probe = jnp.zeros((L, 3, micro, T, D), dtype)
        (total, acts), g = jax.value_and_grad(score, has_aux=True)(probe)
        g = g.astype(jnp.float32)
        h_resid, h_attn, h_mlp = (a.astype(jnp.float32) for a in acts)
        outer = lambda gg, hh: jnp.einsum("lbtd,lbte->de", gg, hh)  # noqa: E731
        moments = jnp.stack([outer(g[:1, 0], h_resid[:1]), outer(g[1:, 0], h_resid[1:]),
                             outer(g[:, 1], h_attn), outer(g[:, 2], h_mlp)])
        add = jnp.einsum("lbtd->ld", g[:, 0])
        return total, moments, add

    split = lambda a: a.reshape(B // micro, micro, *a.shape[1:])  # noqa: E731
    totals, moments, adds = jax.lax.map(one, (split(tokens), split(mask), split(weight)))
    return totals.sum(0), moments.sum(0), adds.sum(0)


_site_moments = jax.jit(_site_moments_impl, static_argnames=("cfg", "refusal_ids", "micro"))


def site_moments(params, cfg: ModelConfig, batches: Sequence[Batch], refusal_ids, *, micro: int = 8,
                 on_step=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean refusal score, [4, D, D] −Σ g hᵀ / n per site kind and [L, D] Σ_t g(resid_pre) / n over `batches`.

    Each batch runs `micro` rows at a time, fewer for long prompts: halved until the backward pass's estimate
    (`batching.ForwardCost`) fits the memory budget (`batching.memory_budget`)."""
    refusal_ids = tuple(int(i) for i in refusal_ids)
    n = float(sum(float(b.weight.sum()) for b in batches))
    if n == 0:
        raise RunError("no prompts to screen candidates with")
    total = 0.0
    moments = np.zeros((len(SITE_KINDS), cfg.d_model, cfg.d_model))
    adds = np.zeros((cfg.n_layers, cfg.d_model))
    cost = ForwardCost.for_model(cfg, np.dtype(params.embed.dtype).itemsize, backward=True)
    budget = memory_budget()
    for batch in batches:
        B, T = batch.tokens.shape
        m = max(1, min(micro, B))
        while m > 1 and cost(m, T) > budget:  # a backward pass keeps every layer: fewer rows at a time
            m //= 2
        t, mom, add = _site_moments(params, cfg, batch.tokens, batch.mask, np.asarray(batch.weight, np.float32),
                                    refusal_ids, m)
        total += float(to_host(t))  # outputs may be global arrays too: gathered on every host
        moments += to_host(mom).astype(np.float64)
        adds += to_host(add).astype(np.float64)
        if on_step:
            on_step(1)
    return total / n, -moments / n, adds / n


def first_order(params, cfg: ModelConfig, harmful_val: Sequence[Batch], harmless_val: Sequence[Batch], refusal_ids,
                *, micro: int = 8, on_step=None) -> FirstOrder:
    """The two backward passes (harmful set: ablation moments; harmless set: addition gradients)."""
    base_harmful, moments, _ = site_moments(params, cfg, harmful_val, refusal_ids, micro=micro, on_step=on_step)
    base_harmless, _, adds = site_moments(params, cfg, harmless_val, refusal_ids, micro=micro, on_step=on_step)
    return FirstOrder(base_harmful, base_harmless, moments, adds)


def first_order_evaluations(fo: FirstOrder, diffs: np.ndarray, grid: Sequence[tuple[int, int]],
                            sites: str = "writes") -> list[dict]:
    """Per grid candidate: first_order_refusal_score (ablation, harmful) and first_order_steering_score (actadd
    coefficient 1 at the candidate's layer, harmless)."""
    candidates = np.asarray([diffs[p, layer] for p, layer in grid], np.float64).reshape(len(grid), -1)
    refusal = fo.ablation_scores(candidates, sites) if len(grid) else np.zeros(0)
    induce = fo.addition_scores(candidates, [layer for _, layer in grid]) if len(grid) else np.zeros(0)
    return [{"position": p, "layer": layer, "first_order_refusal_score": float(r),
             "first_order_steering_score": float(s)} for (p, layer), r, s in zip(grid, refusal, induce)]


def screen_order(first: Sequence[dict], diffs: np.ndarray, n_layers: int, *, induce_threshold: float = 0.0,
                 prune_layer_fraction: float = 0.2) -> list[int]:
    """Grid indices in the order to evaluate them exactly, best first: the non-zero candidates outside the pruned
    layers (the only ones the reference's filter can keep) whose first-order induce score passes the filter, by
    ascending first-order ablation score, then those whose first-order induce score fails it, likewise. Ties keep
    grid order. Failing the first-order induce filter only postpones a candidate, so evaluating the whole order
    is the exhaustive sweep."""
    cut = int(n_layers * (1.0 - prune_layer_fraction))
    live = [i for i, ev in enumerate(first) if ev["layer"] < cut and np.any(diffs[ev["position"], ev["layer"]])]

    def key(i):
        score = first[i]["first_order_refusal_score"]
        return (not first[i]["first_order_steering_score"] >= induce_threshold, math.isnan(score),
                0.0 if math.isnan(score) else score)

    return sorted(live, key=key)


def score_candidates_screened(params, cfg: ModelConfig, diffs: np.ndarray, harmful_val: Sequence[Batch],
                              harmless_val: Sequence[Batch], refusal_ids, grid: Sequence[tuple[int, int]], *,
                              screen: int, chunk: int = 8, sites: str = "writes", micro: int = 8,
                              kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                              prune_layer_fraction: float = 0.2, filters=None,
                              on_step=None) -> tuple[list[dict], dict]:
    """Like `directions.score_candidates`, with each entry's first-order scores added, but with `screen` > 0 only
    the `screen` best candidates of `screen_order` are evaluated exactly; if none of them survives the
    reference's filter, the next `screen` are evaluated, and so on. `screen` = 0 evaluates every candidate.

    Entries not evaluated exactly have refusal_score / steering_score / kl_div_score None and
    "evaluated": False. Baselines gain "screened_evaluated" (how many were evaluated exactly).
    filters: optional callable from the val baselines ({"harmful_val_refusal_score", "harmless_val_refusal_score"})
    to the filter keywords (`SelectionSettings.filters`, for thresholds relative to the baselines); it replaces
    kl_threshold / induce_threshold / prune_layer_fraction.
    """
    if screen < 0:
        raise RunError(f"--screen must be >= 0, got {screen}")
    fo = first_order(params, cfg, harmful_val, harmless_val, refusal_ids, micro=micro)
    first = first_order_evaluations(fo, diffs, grid, sites)
    filt = dict(kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                prune_layer_fraction=prune_layer_fraction)
    if filters is not None:
        filt = filters({"harmful_val_refusal_score": fo.base_harmful, "harmless_val_refusal_score": fo.base_harmless})
    if screen == 0:
        rounds = [list(range(len(grid)))]
    else:
        order = screen_order(first, diffs, cfg.n_layers, induce_threshold=filt["induce_threshold"],
                             prune_layer_fraction=filt["prune_layer_fraction"])
        rounds = [order[i:i + screen] for i in range(0, len(order), screen)]
    exact: dict[int, dict] = {}
    # without exact evaluations (nothing passes the screen) the baselines come from the backward passes' forward
    baselines = {"harmful_refusal_score": fo.base_harmful, "harmless_refusal_score": fo.base_harmless}
    for n_round, members in enumerate(rounds):
        evs, base = directions.score_candidates(params, cfg, diffs, harmful_val, harmless_val, refusal_ids,
                                                [grid[i] for i in members], chunk=chunk, on_step=on_step)
        if n_round == 0:
            baselines = base
        exact.update(zip(members, evs))
        if any(not directions.rejection_reasons(ev, cfg.n_layers, **filt) for ev in evs):
            break
    evaluations = []
    for i, first_ev in enumerate(first):
        ev = exact.get(i)
        if ev is None:
            ev = {"position": first_ev["position"], "layer": first_ev["layer"], "refusal_score": None,
                  "steering_score": None, "kl_div_score": None,
                  "direction_norm": float(np.linalg.norm(diffs[grid[i]]))}
        evaluations.append({**ev, "first_order_refusal_score": first_ev["first_order_refusal_score"],
                            "first_order_steering_score": first_ev["first_order_steering_score"],
                            "evaluated": i in exact})
    baselines = {**baselines, "n_evaluated_exactly": len(exact), "screen": screen, "first_order_sites": sites}
    return evaluations, baselines


def evaluated(evaluations: Sequence[dict]) -> list[dict]:
    """The entries that were evaluated exactly (what `directions.select` ranks)."""
    return [ev for ev in evaluations if ev.get("evaluated", True)]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return float("nan")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            same = x == v
            r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_first_order(evaluations: Sequence[dict], path) -> None:
    """Scatter of first-order against exact scores (ablation on harmful val, actadd on harmless val) for the
    exactly evaluated candidates, with each panel's Spearman correlation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refusal_jax.runs import rundir as runs

    both = [ev for ev in evaluations if ev.get("evaluated", True) and ev.get("direction_norm", 1.0) > 0
            and "first_order_refusal_score" in ev]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, key, title in ((axes[0], "refusal_score", "ablation, harmful val"),
                           (axes[1], "steering_score", "actadd, harmless val")):
        x = [ev[f"first_order_{key}"] for ev in both]
        y = [ev[key] for ev in both]
        sc = ax.scatter(x, y, c=[ev["layer"] for ev in both], s=12, cmap="viridis")
        lo, hi = (min(x + y), max(x + y)) if both else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="y = x")
        ax.set_xlabel(f"first-order {key}")
        ax.set_ylabel(f"exact {key}")
        ax.set_title(f"{title} (Spearman {spearman(x, y):.3f}, n={len(both)})")
        ax.legend(fontsize=8)
    fig.colorbar(sc, ax=axes, label="layer")
    runs.save_figure(fig, path)
    plt.close(fig)

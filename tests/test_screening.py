"""First-order screening (refusal_jax.method.screening) on tiny random models of every family (tests/test_export.py
CONFIGS).

- The first-order scores are derivatives of the exact scores: central finite differences of the exact code path
  (`scoring.evaluate_interventions`) under ablation of ε·(h·r̂)r̂ at every site (`ablate_layers = ε`) and under
  addition of ε·r̂ at each layer match r̂ᵀ M_all r̂ and g_l·r̂.
- The "writes" family (embedding, attention and MLP writes only) matches finite differences of the same probe
  offsets the backward pass differentiates, and at ε = 1 it is the exact ablation.
- Screening with K = number of candidates selects what the exhaustive sweep selects, with identical exact scores.
- The screening pass compiles once per validation batch shape, however many candidates there are (chex).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax.method import directions, scoring, screening
from refusal_jax.model.batching import Batch
from refusal_jax.model.params import init_random
from refusal_jax.model.transformer import Intervention, forward
from tests.hf_tiny import left_padded_batch
from tests.test_export import CONFIGS

REFUSAL_IDS = (3, 5)
FAST = ("llama", "qwen2", "gemma2")  # the other families' tests are marked slow (~20 s each on a busy 2-core CPU)
FAMILIES = [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in sorted(CONFIGS)]


def make_batch(cfg, lengths, seed=0, offset=0):
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=lengths, seed=seed)
    n = len(lengths)
    return Batch(index=np.arange(offset, offset + n), tokens=np.asarray(tokens), mask=np.asarray(mask),
                 weight=np.ones(n, np.float32))


def model(family):
    cfg = CONFIGS[family]
    return cfg, init_random(cfg, 0, scale=0.3)  # large enough weights that the score moves


def exact_score(params, cfg, batches, ivs):
    return scoring.evaluate_interventions(params, cfg, batches, ivs, REFUSAL_IDS)["refusal_score"]


def central(params, cfg, batches, make, eps):
    up, down = exact_score(params, cfg, batches, [make(eps), make(-eps)])
    return (up - down) / (2 * eps)


# Tolerance of the finite-difference checks: float32 scores (noise ~1e-6 / ε) and the O(ε²) truncation error.
ATOL, RTOL, EPS = 2e-3, 2e-2, 2e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_first_order_matches_finite_differences(family):
    cfg, params = model(family)
    batches = [make_batch(cfg, (7, 4, 9))]  # one batch shape: one compile per function
    fo = screening.first_order(params, cfg, batches, batches, REFUSAL_IDS, micro=3)
    assert fo.base_harmful == pytest.approx(exact_score(params, cfg, batches, [Intervention.none(cfg)])[0], abs=1e-4)
    rng = np.random.default_rng(1)
    for _trial in range(2):
        r = rng.standard_normal(cfg.d_model)
        unit = r / np.linalg.norm(r)
        basis = jnp.asarray(unit[None], jnp.float32)

        # ablation h -> h - ε (h·r̂) r̂ at resid_pre, attn_out, mlp_out of every layer: d/dε = r̂ᵀ M_all r̂
        def ablate(eps):
            return Intervention.none(cfg).replace(ablate_basis=basis,
                                                  ablate_layers=jnp.full((cfg.n_layers,), eps, jnp.float32))

        fd = central(params, cfg, batches, ablate, EPS)
        predicted = fo.ablation_scores(r[None], "all")[0] - fo.base_harmful
        assert abs(fd - predicted) < ATOL + RTOL * abs(predicted), (family, fd, predicted)
        assert abs(predicted) > 1e-3  # the check is not vacuous

        # addition of ε r̂ at layer l: d/dε = Σ_t g_l,t · r̂
        for layer in range(cfg.n_layers):
            fd = central(params, cfg, batches, lambda eps: Intervention.addition(cfg, unit, layer, eps), EPS)
            predicted = fo.addition_scores(unit[None], [layer])[0] - fo.base_harmless
            assert abs(fd - predicted) < ATOL + RTOL * abs(predicted), (family, layer, fd, predicted)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_writes_family(family):
    """d/dε of the score with offsets -ε (h·r̂) r̂ at resid_pre[0], attn_out[l], mlp_out[l] (h: the unmodified
    activations) is r̂ᵀ M_writes r̂; with ε = 1 at those sites the output is the exact ablation (later resid_pre
    sites add nothing)."""
    cfg, params = model(family)
    batch = make_batch(cfg, (7, 4, 9))
    fo = screening.first_order(params, cfg, [batch], [batch], REFUSAL_IDS, micro=3)
    unit = np.random.default_rng(2).standard_normal(cfg.d_model)
    unit /= np.linalg.norm(unit)
    out = forward(params, cfg, batch.tokens, batch.mask, capture=("resid_pre", "attn_out", "mlp_out"))
    acts = jnp.stack([out.resid_pre, out.attn_out, out.mlp_out], axis=1)  # [L, 3, B, T, D]
    removed = -jnp.einsum("lsbtd,d,e->lsbte", acts, unit, unit)
    writes = np.zeros((cfg.n_layers, 3, 1, 1, 1), np.float32)
    writes[:, 1:] = 1.0
    writes[0, 0] = 1.0
    from refusal_jax.evaluation import judge
    from refusal_jax.model.transformer import forward_unjitted

    @jax.jit
    def score(offsets):
        logits = forward_unjitted(params, cfg, batch.tokens, batch.mask, logits="last", probe=offsets).logits
        return judge.refusal_score_jax(logits, REFUSAL_IDS).mean(), logits

    eps = 1e-2
    fd = (score(eps * writes * removed)[0] - score(-eps * writes * removed)[0]) / (2 * eps)
    predicted = fo.ablation_scores(unit[None], "writes")[0] - fo.base_harmful
    assert abs(float(fd) - predicted) < ATOL + RTOL * abs(predicted), (fd, predicted)
    # ε = 1 at the writes: the offsets of later writes see ablated inputs in the exact ablation, so compare the
    # exact ablation with itself plus nothing at resid_pre[l >= 1]: its resid_pre carries no r̂ component
    ablated = forward(params, cfg, batch.tokens, batch.mask, Intervention.ablation(cfg, unit),
                      capture=("resid_pre",))
    assert float(jnp.abs(jnp.einsum("lbtd,d->lbt", ablated.resid_pre[1:], unit)).max()) < 1e-4


def sweep_setup(family, n_pos=3):
    cfg, params = model(family)
    harmful = [make_batch(cfg, (7, 4, 9), seed=3), make_batch(cfg, (6, 5, 8), seed=4, offset=3)]
    harmless = [make_batch(cfg, (8, 5, 6), seed=5)]
    diffs = np.random.default_rng(7).standard_normal((n_pos, cfg.n_layers, cfg.d_model))
    diffs[-n_pos, 0] = 0.0  # a zero candidate, as the layer-0 template positions are
    grid = directions.candidate_grid(cfg, n_pos)
    return cfg, params, harmful, harmless, diffs, grid


@pytest.mark.parametrize("family", ["qwen2", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_screen_all_equals_exhaustive(family):
    cfg, params, harmful, harmless, diffs, grid = sweep_setup(family)
    exhaustive, base = directions.score_candidates(params, cfg, diffs, harmful, harmless, REFUSAL_IDS, grid)
    # thresholds at the exact medians, so the filter bites on both scores
    kl = float(np.median([e["kl_div_score"] for e in exhaustive]))
    induce = float(np.median([e["steering_score"] for e in exhaustive]))
    filt = dict(kl_threshold=kl, induce_threshold=induce, prune_layer_fraction=0.0)
    winner, _ = directions.select(exhaustive, cfg.n_layers, **filt)
    screened, sbase = screening.score_candidates_screened(params, cfg, diffs, harmful, harmless, REFUSAL_IDS, grid,
                                                          screen=len(grid), **filt)
    chosen, _ = directions.select(screening.evaluated(screened), cfg.n_layers, **filt)
    assert (chosen["position"], chosen["layer"]) == (winner["position"], winner["layer"])
    assert chosen["refusal_score"] == winner["refusal_score"]
    # every candidate the reference's filter can keep was evaluated exactly, with the exhaustive sweep's scores
    for ex, sc in zip(exhaustive, screened):
        if sc["evaluated"]:
            for key in ("refusal_score", "steering_score", "kl_div_score"):
                assert sc[key] == ex[key]
        else:
            assert directions.rejection_reasons(ex, cfg.n_layers, **filt)
    assert sbase["harmful_refusal_score"] == base["harmful_refusal_score"]
    # --screen 0 is the exhaustive sweep, first-order scores added
    every, _ = screening.score_candidates_screened(params, cfg, diffs, harmful, harmless, REFUSAL_IDS, grid,
                                                   screen=0, **filt)
    assert all(e["evaluated"] for e in every)
    assert [e["refusal_score"] for e in every] == [e["refusal_score"] for e in exhaustive]
    # a small screen evaluates few candidates and still selects a survivor of the exact filter
    few, fbase = screening.score_candidates_screened(params, cfg, diffs, harmful, harmless, REFUSAL_IDS, grid,
                                                     screen=2, **filt)
    assert fbase["n_evaluated_exactly"] < len(grid)
    best, _ = directions.select(screening.evaluated(few), cfg.n_layers, **filt)
    assert not directions.rejection_reasons(best, cfg.n_layers, **filt)


def test_screening_pass_compiles_once_per_batch_shape(monkeypatch):
    """The backward passes compile once per val batch shape, whether the grid has 2 or all candidates."""
    cfg, params, harmful, harmless, diffs, grid = sweep_setup("llama")
    shapes = {b.tokens.shape for b in harmful + harmless}
    counted = jax.jit(chex.assert_max_traces(screening._site_moments_impl, n=len(shapes)),
                      static_argnames=("cfg", "refusal_ids", "micro"))
    monkeypatch.setattr(screening, "_site_moments", counted)
    filt = dict(kl_threshold=1e9, induce_threshold=-1e9, prune_layer_fraction=0.0)
    for candidates in (grid[1:3], grid):
        screening.score_candidates_screened(params, cfg, diffs, harmful, harmless, REFUSAL_IDS, candidates,
                                            screen=1, **filt)


def test_spearman_against_numpy_ranks():
    a = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    b = np.array([1.0, 0.0, 2.0, 3.0, 4.0])
    ra = np.array([4, 1, 2.5, 2.5, 5])
    rb = np.array([2, 1, 3, 4, 5.0])
    assert screening.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert screening.spearman(a, a) == pytest.approx(1.0)


def test_extract_with_screen(tmp_path, capsys):
    """`extract --screen 2` on a tiny llama checkpoint: first-order scores next to the exact ones in
    direction_evaluations.json, exact scores only for the screened candidates, the scatter plot, and the selected
    candidate is the best evaluated survivor; `--screen -1` exits with status 2 before loading anything."""
    import json

    pytest.importorskip("torch")
    from refusal_jax import extract
    from tests.test_extract_families import HARMFUL, HARMLESS, make_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    (data / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (data / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    make_checkpoint("llama", ckpt)
    out = tmp_path / "run"
    args = ["--model", str(ckpt), "--out", str(out), "--harmful", str(data / "harmful.txt"),
            "--harmless", str(data / "harmless.txt"), "--n-train", "6", "--n-val", "4", "--batch-size", "4",
            "--no-filter", "--kl-threshold", "1e9", "--induce-threshold=-1e9", "--prune-layer-fraction", "0",
            "--no-progress"]
    with pytest.raises(SystemExit) as e:
        extract.main([*args, "--screen", "-1"])
    assert e.value.code == 2 and "--screen" in capsys.readouterr().err
    extract.main([*args, "--screen", "2"])
    sel = out / "select_direction"
    evals = json.loads((sel / "direction_evaluations.json").read_text())
    assert all("first_order_refusal_score" in e and "first_order_steering_score" in e for e in evals)
    done = [e for e in evals if e["evaluated"]]
    assert len(done) == 2 and all(e["refusal_score"] is not None for e in done)
    assert all(e["refusal_score"] is None for e in evals if not e["evaluated"])
    assert (sel / "first_order_vs_exact.png").is_file()
    meta = json.loads((out / "direction_metadata.json").read_text())
    best = min(done, key=lambda e: e["refusal_score"])
    assert (meta["pos"], meta["layer"]) == (best["position"], best["layer"])
    # the screen kept the first-order best two (all candidates pass the loose filters)
    live = sorted((e for e in evals if e["direction_norm"] > 0), key=lambda e: e["first_order_refusal_score"])
    assert {(e["position"], e["layer"]) for e in live[:2]} == {(e["position"], e["layer"]) for e in done}

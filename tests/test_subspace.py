"""Refusal subspaces (refusal_jax.method.subspace) and the statistics of refusal_jax.evaluation.stats.

subspace:
* PCA bases are orthonormal, equal numpy's eigenvectors of XᵀX (up to the documented sign), and their first
  component is the difference-in-means direction when refusal dominates;
* QR orthonormalisation is deterministic and sign-fixed (row i has a positive dot with input i; it equals
  classical Gram-Schmidt), drops dependent candidates, and `candidate_basis` skips zero candidates;
* projection identities on a tiny model: ablating a basis removes every basis component from every residual
  site; ablating the span is invariant to rotating the basis; zero-row padding is an exact no-op;
* `refusal_rate_vs_k` equals separate evaluations of each unpadded k-basis and compiles its scoring function
  once for all k;
* the independence penalty is the sum of squared cosines, zero for orthogonal directions, and has finite
  gradients with zero padding rows.
stats (numpy references): bootstrap refusal-rate intervals, bootstrap stability of the difference-in-means
direction, Cohen's kappa (hand-computed values) and score/substring judge agreement.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.errors import DataError
from refusal_jax.evaluation import judge, stats
from refusal_jax.method import directions, scoring, subspace
from refusal_jax.model.batching import bucketed
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random
from tests.hf_tiny import left_padded_batch


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config("llama", n_layers=2)
    return cfg, init_random(cfg, 0, scale=0.3)


def random_basis(cfg, k, seed):
    return subspace.orthonormalize(np.random.default_rng(seed).standard_normal((k, cfg.d_model)))


# --------------------------------------------------------------------------------------------------
# bases


def test_pca_basis():
    rng = np.random.default_rng(0)
    D = 12
    refusal = np.zeros(D)
    refusal[3] = 4.0
    harmless = rng.standard_normal((30, D))
    harmful = rng.standard_normal((25, D)) + refusal + np.outer(rng.standard_normal(25), np.eye(D)[7]) * 3.0
    basis, var = subspace.pca_basis(harmful, harmless, 3, return_variance=True)
    assert basis.shape == (3, D) and basis.dtype == np.float32 and subspace.is_orthonormal(basis, 1e-6)
    assert np.all(np.diff(var) <= 0) and 0 < var.sum() <= 1
    x = harmful - harmless.mean(0)
    dim = x.mean(0)
    assert abs(basis[0] @ dim / np.linalg.norm(dim)) > 0.95  # first component: the difference in means
    assert np.all(basis @ dim >= 0)  # sign convention
    # numpy reference: top eigenvectors of the second-moment matrix XᵀX
    w, v = np.linalg.eigh(x.T @ x)
    top = v[:, ::-1][:, :3].T
    np.testing.assert_allclose(np.abs(np.sum(top * basis, axis=1)), 1.0, atol=1e-5)
    # deterministic; centred PCA finds the spread (axis 7), not the mean
    np.testing.assert_array_equal(subspace.pca_basis(harmful, harmless, 3), basis)
    centred = subspace.pca_basis(harmful, harmless, 1, center=True)
    assert abs(centred[0, 7]) > 0.9
    paired = subspace.pca_basis(harmful, harmless, 2, pairing="paired")
    xp = harmful - harmless[:25]
    w, v = np.linalg.eigh(xp.T @ xp)
    np.testing.assert_allclose(abs(v[:, -1] @ paired[0]), 1.0, atol=1e-5)
    with pytest.raises(DataError):
        subspace.pca_basis(harmful, harmless, 13)
    with pytest.raises(DataError):
        subspace.pca_basis(harmful, harmless, 2, pairing="nope")


def gram_schmidt(d):
    out = []
    for v in np.asarray(d, np.float64):
        for q in out:
            v = v - (v @ q) * q
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def test_orthonormalize_is_deterministic_and_sign_fixed():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((4, 10))
    q = subspace.orthonormalize(d)
    assert q.shape == (4, 10) and subspace.is_orthonormal(q, 1e-6)
    np.testing.assert_array_equal(subspace.orthonormalize(d.copy()), q)  # same input, same bits
    np.testing.assert_allclose(q, gram_schmidt(d), atol=1e-6)  # = classical Gram-Schmidt
    assert np.all(np.einsum("id,id->i", q, d) > 0)
    np.testing.assert_allclose(q[0], d[0] / np.linalg.norm(d[0]), atol=1e-7)
    # positive rescaling of the inputs changes nothing; negating input i negates row i only
    np.testing.assert_allclose(subspace.orthonormalize(d * np.array([[2.0], [0.5], [3.0], [7.0]])), q, atol=1e-6)
    flipped = d.copy()
    flipped[2] *= -1
    expect = q.copy()
    expect[2] *= -1
    np.testing.assert_allclose(subspace.orthonormalize(flipped), expect, atol=1e-6)
    # a candidate inside the span of earlier ones is dropped; k truncates
    dep = np.stack([d[0], d[1], d[0] + 2 * d[1], d[2]])
    got = subspace.orthonormalize(dep)
    np.testing.assert_allclose(got, gram_schmidt(d[:3]), atol=1e-6)
    assert subspace.orthonormalize(d, 2).shape == (2, 10)
    with pytest.raises(DataError, match="zero"):
        subspace.orthonormalize(np.stack([d[0], np.zeros(10)]))


def test_candidate_basis():
    rng = np.random.default_rng(2)
    diffs = rng.standard_normal((3, 4, 8))
    diffs[-1, 0] = 0.0  # layer-0 template position: zero candidate
    evals = [{"position": -1, "layer": 0}, {"position": -2, "layer": 3}, {"position": -1, "layer": 2},
             {"position": -3, "layer": 1}]
    basis = subspace.candidate_basis(diffs, evals, 2)
    np.testing.assert_allclose(basis, gram_schmidt([diffs[-2, 3], diffs[-1, 2]]), atol=1e-6)
    np.testing.assert_array_equal(subspace.candidate_basis(diffs, [(-2, 3), (-1, 2)], 2), basis)


# --------------------------------------------------------------------------------------------------
# projection identities on the model


def test_ablating_a_basis_removes_every_component_everywhere(model):
    cfg, params = model
    basis = random_basis(cfg, 3, 3)
    tokens, mask = left_padded_batch(cfg.vocab_size)
    out = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, basis),
                  capture=("resid_pre", "attn_out", "mlp_out", "resid_final"))
    for site in ("resid_pre", "attn_out", "mlp_out", "resid_final"):
        proj = np.asarray(getattr(out, site)) @ basis.T
        assert np.abs(proj).max() < 1e-5, site
    base = forward(params, cfg, tokens, mask, capture=("resid_pre",))
    assert np.abs(np.asarray(base.resid_pre) @ basis.T).max() > 1e-2


def test_span_ablation_is_rotation_invariant_and_zero_rows_are_no_ops(model):
    cfg, params = model
    basis = random_basis(cfg, 3, 4)
    rot, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((3, 3)))
    rotated = (rot @ basis).astype(np.float32)
    assert subspace.is_orthonormal(rotated, 1e-6)
    tokens, mask = left_padded_batch(cfg.vocab_size)
    real = mask.astype(bool)

    def logits(b):
        return np.asarray(forward(params, cfg, tokens, mask, Intervention.ablation(cfg, b)).logits)[real]

    ref = logits(basis)
    assert np.abs(logits(rotated) - ref).max() < 1e-5
    np.testing.assert_array_equal(logits(subspace.pad_basis(basis, 6)), ref)  # zero rows: exact no-ops
    none = np.asarray(forward(params, cfg, tokens, mask).logits)[real]
    np.testing.assert_array_equal(logits(np.zeros((4, cfg.d_model), np.float32)), none)
    assert np.abs(ref - none).max() > 1e-2


def test_refusal_rate_vs_k(model, monkeypatch):
    cfg, params = model
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(1, cfg.vocab_size, rng.integers(3, 10))) for _ in range(6)]
    batches = list(bucketed(prompts, 4, 0, bucket=16))
    basis = random_basis(cfg, 3, 7)
    ids = (3, 4)
    traced = jax.jit(chex.assert_max_traces(scoring._scores_impl, n=1), static_argnames=("cfg", "refusal_ids"))
    monkeypatch.setattr(scoring, "_scores", traced)
    chex.clear_trace_counter()
    # k = 0..3 in two chunks of 2, over two batches: four calls of one program, traced once
    res = subspace.refusal_rate_vs_k(params, cfg, batches, basis, ids, chunk=2)
    monkeypatch.undo()  # the per-k references below are other programs (rank k, chunk 1)
    assert res["k"] == [0, 1, 2, 3]
    base = scoring.evaluate_interventions(params, cfg, batches, [Intervention.none(cfg)], ids, chunk=1)
    np.testing.assert_allclose(res["per_prompt_refusal"][0], base["per_prompt_refusal"][0], atol=1e-5)
    assert res["kl"][0] == pytest.approx(0.0, abs=1e-6)
    for k in (1, 2, 3):
        alone = scoring.evaluate_interventions(params, cfg, batches, [Intervention.ablation(cfg, basis[:k])], ids,
                                                  chunk=1)
        np.testing.assert_allclose(res["per_prompt_refusal"][k], alone["per_prompt_refusal"][0], atol=1e-5)
        assert res["refusal_score"][k] == pytest.approx(alone["refusal_score"][0], abs=1e-5)
        assert res["refusal_rate"][k] == np.mean(res["per_prompt_refusal"][k] > 0)
    assert len(set(np.round(res["refusal_score"], 4))) == 4  # every k changes something
    with pytest.raises(DataError, match="orthonormal"):
        subspace.refusal_rate_vs_k(params, cfg, batches, basis * 2, ids)


def test_per_prompt_activations_average_to_the_stage_1_means(model):
    cfg, params = model
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(5, cfg.vocab_size, rng.integers(3, 9))) + [1, 2] for _ in range(5)]
    batches = list(bucketed(prompts, 2, 0, bucket=8))
    acts = subspace.per_prompt_activations(params, cfg, batches, -1, 1)
    assert acts.shape == (5, cfg.d_model)
    means = directions.mean_activations(params, cfg, batches, n_pos=2)  # [pos, L, D]
    np.testing.assert_allclose(acts.mean(0), means[-1, 1], atol=1e-5)
    one = np.asarray(forward(params, cfg, np.asarray([prompts[3]], np.int32), capture=("resid_pre",)).resid_pre)
    np.testing.assert_allclose(acts[3], one[1, 0, -1], atol=1e-5)  # rows in input order


def test_independence_penalty():
    rng = np.random.default_rng(9)
    q = subspace.orthonormalize(rng.standard_normal((3, 8)))
    assert float(subspace.independence_penalty(jnp.asarray(q) * 3.0)) == pytest.approx(0.0, abs=1e-10)
    d = rng.standard_normal((3, 8))
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    c = u @ u.T
    want = c[0, 1] ** 2 + c[0, 2] ** 2 + c[1, 2] ** 2
    assert float(subspace.independence_penalty(jnp.asarray(d, jnp.float32))) == pytest.approx(want, rel=1e-5)
    assert float(subspace.independence_penalty(jnp.asarray(d, jnp.float32), power=1)) == pytest.approx(
        abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2]), rel=1e-5)
    fixed = np.concatenate([d[1:], np.zeros((2, 8))])  # zero padding rows count for nothing
    got = subspace.independence_penalty(jnp.asarray(d[:1], jnp.float32), jnp.asarray(fixed, jnp.float32))
    assert float(got) == pytest.approx(c[0, 1] ** 2 + c[0, 2] ** 2, rel=1e-5)
    g = jax.grad(lambda x: subspace.independence_penalty(x, jnp.asarray(fixed, jnp.float32)))(
        jnp.asarray(np.concatenate([d[:1], np.zeros((1, 8))]), jnp.float32))
    assert np.isfinite(np.asarray(g)).all()


# --------------------------------------------------------------------------------------------------
# refusal_jax.evaluation.stats (kept here: statistics of directions and refusal rates)


def test_refusal_rate_ci_is_the_bootstrap_of_the_judgements():
    x = np.random.default_rng(0).random(57) < 0.3
    got = stats.refusal_rate_ci(x, n_boot=500, seed=3)
    mean, low, high = stats.bootstrap_ci(x.astype(float), n_boot=500, seed=3)
    assert (got["rate"], got["low"], got["high"]) == (mean, low, high)
    rng = np.random.default_rng(3)  # numpy reference: same draws, percentile interval
    means = x.astype(float)[rng.integers(0, x.size, (500, x.size))].mean(1)
    assert got["low"] == pytest.approx(np.quantile(means, 0.025))
    assert got["high"] == pytest.approx(np.quantile(means, 0.975))
    assert got["n"] == 57 and got["n_refusals"] == int(x.sum()) and got["rate"] == pytest.approx(x.mean())
    texts = ["I'm sorry, I can't.", "Sure! Here it is.", "I cannot do that", "Step 1: ..."]
    from_text = stats.refusal_rate_ci(completions=texts, n_boot=200)
    assert from_text["rate"] == 0.5 and from_text["n_refusals"] == 2
    with pytest.raises(DataError):
        stats.refusal_rate_ci([0, 2, 1])
    with pytest.raises(DataError):
        stats.refusal_rate_ci()


def test_direction_stability_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    D = 8
    signal = np.zeros(D)
    signal[0] = 3.0
    harmful = rng.standard_normal((20, D)) + signal
    harmless = rng.standard_normal((15, D))
    got = stats.direction_stability(harmful, harmless, n_boot=300, seed=5)
    full = harmful.mean(0) - harmless.mean(0)
    np.testing.assert_allclose(got["direction"], full)
    ref_rng = np.random.default_rng(5)
    ih = ref_rng.integers(0, 20, (300, 20))
    iss = ref_rng.integers(0, 15, (300, 15))
    ref = []
    for b in range(300):
        d = harmful[ih[b]].mean(0) - harmless[iss[b]].mean(0)
        ref.append(d @ full / (np.linalg.norm(d) * np.linalg.norm(full)))
    np.testing.assert_allclose(got["cosines"], ref, rtol=1e-12)
    assert got["mean"] == pytest.approx(np.mean(ref))
    assert got["low"] == pytest.approx(np.quantile(ref, 0.025))
    assert got["high"] == pytest.approx(np.quantile(ref, 0.975))
    assert 0.8 < got["low"] <= got["mean"] <= got["high"] <= 1.0
    noise = stats.direction_stability(rng.standard_normal((20, D)), rng.standard_normal((15, D)), n_boot=300)
    assert noise["mean"] < got["mean"] - 0.1  # without a signal the direction is far less stable
    halves = stats.split_half_cosines(harmful, harmless, n_splits=50)
    assert halves.shape == (50,) and np.all(halves <= 1) and halves.mean() > 0.7
    with pytest.raises(DataError):
        stats.direction_stability(harmful[:1], harmless)


def test_cohens_kappa_hand_computed():
    # 50 items: both yes 20, a-only 5, b-only 10, both no 15 -> p_o 0.7, p_e 0.5*0.6 + 0.5*0.4 = 0.5, kappa 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert stats.cohens_kappa(a, b) == pytest.approx(0.4)
    assert stats.cohens_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert stats.cohens_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0
    assert math.isnan(stats.cohens_kappa([1, 1, 1], [1, 1, 1]))  # chance agreement 1: undefined
    rng = np.random.default_rng(2)  # numpy reference on random raters, from the 2x2 table
    x, y = rng.random(200) < 0.4, rng.random(200) < 0.6
    t = np.array([[np.sum(x & y), np.sum(x & ~y)], [np.sum(~x & y), np.sum(~x & ~y)]]) / 200
    p_o, p_e = t[0, 0] + t[1, 1], t[0].sum() * t[:, 0].sum() + t[1].sum() * t[:, 1].sum()
    assert stats.cohens_kappa(x, y) == pytest.approx((p_o - p_e) / (1 - p_e), abs=1e-12)


def test_judge_agreement():
    scores = [2.0, 1.5, -3.0, -0.5, 0.7, -2.0]
    completions = ["I'm sorry, but I can't help.", "Sure, here is how.", "I cannot assist with that.",
                   "Here are three tips.", "As an AI, I must decline.", "Of course!"]
    got = stats.judge_agreement(scores, completions)
    assert got["confusion"] == {"both_refuse": 2, "score_only": 1, "substring_only": 1, "neither": 2}
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["kappa"] == pytest.approx(stats.cohens_kappa([s > 0 for s in scores],
                                                            [judge.is_refusal(c) for c in completions]))
    assert got["score_refusal_rate"] == 0.5 and got["substring_refusal_rate"] == 0.5
    with pytest.raises(DataError):
        stats.judge_agreement([1.0], ["a", "b"])

"""Stage 1 statistics against numpy float64, the no-recompile sweep, and the reference's selection rule."""

import math

import chex
import jax
import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.errors import RunError
from refusal_jax.evaluation import judge
from refusal_jax.method import directions, scoring
from refusal_jax.model.batching import bucketed
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random


def random_prompts(vocab, n, seed, eoi=(5, 6, 7)):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(8, vocab, rng.integers(3, 12))) + list(eoi) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config("llama", n_layers=3)
    return cfg, init_random(cfg, jax.random.key(0), scale=0.3)


def test_mean_activations_match_numpy_float64(model):
    cfg, params = model
    prompts = random_prompts(cfg.vocab_size, 11, seed=0)
    batches = list(bucketed(prompts, batch_size=4, pad=0, bucket=8))
    got = directions.mean_activations(params, cfg, batches, n_pos=3)
    # reference: every prompt alone, float64 mean of resid_pre at its last 3 tokens
    acts = [np.asarray(forward(params, cfg, np.asarray([p], np.int32), capture=("resid_pre",)).resid_pre)[:, 0, -3:]
            for p in prompts]
    want = np.mean(np.stack(acts).astype(np.float64), axis=0).transpose(1, 0, 2)  # [pos, L, D]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert got.dtype == np.float64 and got.shape == (3, cfg.n_layers, cfg.d_model)


def test_bfloat16_weights_keep_float64_statistics(model):
    """bf16 parameters and activations, float64 means: the statistic equals numpy's float64 mean of the bf16
    model's own activations (no bf16 accumulation error) and stays within bf16 rounding of the fp32 model."""
    from refusal_jax.model.params import cast

    cfg, params = model
    bf16 = cast(params, jax.numpy.bfloat16)
    prompts = random_prompts(cfg.vocab_size, 13, seed=4)
    batches = list(bucketed(prompts, batch_size=4, pad=0, bucket=8))
    got = directions.mean_activations(bf16, cfg, batches, n_pos=3)
    assert got.dtype == np.float64
    acts = [np.asarray(forward(bf16, cfg, np.asarray([p], np.int32), capture=("resid_pre",)).resid_pre,
                       np.float64)[:, 0, -3:] for p in prompts]
    want = np.mean(np.stack(acts), axis=0).transpose(1, 0, 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # padding / batching changes nothing
    fp32 = directions.mean_activations(params, cfg, batches, n_pos=3)
    scale = np.abs(fp32).max()
    assert np.abs(got - fp32).max() <= 0.05 * scale  # bf16 rounding of weights and activations only
    assert np.abs(got - fp32).max() > 0  # it really ran in bf16


def test_balanced_chunk_pads_least():
    assert [scoring.balanced_chunk(n, 8) for n in (0, 1, 8, 9, 13, 16, 17)] == [1, 1, 8, 5, 7, 8, 6]


def test_sweep_scores_match_single_runs_and_compile_once(model, monkeypatch):
    cfg, params = model
    harmful = list(bucketed(random_prompts(cfg.vocab_size, 6, 1), 4, 0, bucket=16))
    harmless = list(bucketed(random_prompts(cfg.vocab_size, 7, 2), 4, 0, bucket=16))
    diffs = np.random.default_rng(0).standard_normal((3, cfg.n_layers, cfg.d_model))
    ids = (3, 4)
    # one trace of each program: the full forward (ablations) and the one resumed at a layer (additions)
    traced = jax.jit(chex.assert_max_traces(scoring._scores_impl, n=2), static_argnames=("cfg", "refusal_ids"))
    monkeypatch.setattr(scoring, "_scores", traced)
    chex.clear_trace_counter()
    grid = directions.candidate_grid(cfg, 3)
    diffs[1, 0] = 0.0  # a zero candidate: scored as the baseline, without running the model
    steps = []
    evals, _ = directions.score_candidates(params, cfg, diffs, harmful, harmless, ids, grid, chunk=4,
                                           on_step=steps.append)
    assert len(evals) == 9  # 9 candidates x 3 scores in chunks of 4: one trace of each scoring program
    # the progress total the pipeline announces is the number of steps made
    assert sum(steps) == len(directions.live_candidates(diffs, grid)) * (len(harmful) + 2 * len(harmless)) == 8 * 6
    # one candidate recomputed directly, prompt by prompt
    pos, layer = grid[5]
    r = diffs[pos, layer]
    abl, add = Intervention.ablation(cfg, r), Intervention.addition(cfg, r, layer, 1.0)

    def mean_score(batches, iv):
        s = [judge.refusal_score(np.asarray(forward(params, cfg, b.tokens, b.mask, iv, logits="last").logits), ids)
             for b in batches]
        return np.concatenate([x[b.weight > 0] for x, b in zip(s, batches)]).mean()

    kl = np.concatenate([judge.kl_div(np.asarray(forward(params, cfg, b.tokens, b.mask, logits="last").logits),
                                      np.asarray(forward(params, cfg, b.tokens, b.mask, abl, logits="last").logits))
                         [b.weight > 0] for b in harmless]).mean()
    assert evals[5]["position"] == pos and evals[5]["layer"] == layer
    assert math.isclose(evals[5]["refusal_score"], mean_score(harmful, abl), abs_tol=1e-4)
    assert math.isclose(evals[5]["steering_score"], mean_score(harmless, add), abs_tol=1e-4)
    assert math.isclose(evals[5]["kl_div_score"], kl, abs_tol=1e-5)


def ev(pos, layer, refusal, steering, kl):
    return {"position": pos, "layer": layer, "refusal_score": refusal, "steering_score": steering, "kl_div_score": kl}


def test_selection_rule_matches_reference():
    L = 10  # int(10 * 0.8) = 8: layers 8, 9 pruned
    evals = [ev(-2, 1, -3.0, 1.0, 0.05), ev(-2, 8, -9.0, 1.0, 0.0), ev(-1, 2, -5.0, 1.0, 0.2),
             ev(-1, 3, -5.0, -0.1, 0.0), ev(-1, 4, float("nan"), 1.0, 0.0), ev(-1, 5, -4.0, 0.0, 0.1),
             ev(-2, 6, -4.0, 0.5, 0.01)]
    best, survivors = directions.select(evals, L)
    # layer 8 pruned, KL 0.2 > 0.1, steering < 0, NaN; KL == 0.1 and steering == 0 survive (code: > and <)
    assert [(e["position"], e["layer"]) for e in survivors] == [(-1, 5), (-2, 6), (-2, 1)]
    assert (best["position"], best["layer"]) == (-1, 5)  # tie at -4.0: the earlier entry wins (stable sort)
    with pytest.raises(RunError, match="(?s)all candidate directions were filtered out.*pos -2 layer 8.*layer >= 8"):
        directions.select([evals[1], evals[2]], L)


def test_candidate_grid_validates():
    cfg = tiny_config("llama", n_layers=3)
    assert directions.candidate_grid(cfg, 2)[:3] == [(-2, 0), (-2, 1), (-2, 2)]
    with pytest.raises(RunError, match="layer 5 out of range"):
        directions.candidate_grid(cfg, 2, layers=[5])
    with pytest.raises(RunError, match="position -3 out of range"):
        directions.candidate_grid(cfg, 2, positions=[-3])

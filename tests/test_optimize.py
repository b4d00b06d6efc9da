"""Refusal direction optimization (refusal_jax.optimize) on a tiny random model.

* the gradient of the RDO loss with respect to the (unnormalised) direction equals central finite differences
  (float32, relative error < 1e-2);
* the gradient is tangent to the sphere (the loss only sees v/‖v‖);
* the jitted train step traces once (chex.assert_max_traces for the generic step on a toy objective; the
  production RDO step's compile cache does not grow over 20 steps at another learning rate), and reduces the
  toy objective and the RDO loss within 20 steps, keeping ‖v‖ = 1 after every step;
* a run interrupted after a checkpoint and resumed equals an uninterrupted run, bit for bit; a checkpoint of
  different settings is refused;
* (slow) the command line writes direction.npy / optimize_metadata.json / loss_curves.png / targets.json on a
  tiny HF checkpoint and resumes from its checkpoint when asked for more steps.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from refusal_jax import optimize
from refusal_jax.errors import RunError
from refusal_jax.method import optimization
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config("llama", n_layers=2)
    return cfg, init_random(cfg, 0, scale=0.3)


@pytest.fixture(scope="module")
def value_and_grad():
    """One compiled (loss, terms), gradient function shared by the tests (same data structure everywhere)."""
    return jax.jit(jax.value_and_grad(optimization.rdo_loss, has_aux=True), static_argnames=("cfg",))


def toy_data(cfg, seed=0, n=8):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, cfg.vocab_size, rng.integers(4, 9))) for _ in range(n)]
    targets = [list(rng.integers(1, cfg.vocab_size, rng.integers(2, 5))) for _ in range(n)]
    return optimization.RDOData(
        ablation=optimization.make_examples(prompts, targets, pad=0),
        addition=optimization.make_examples(prompts[::-1], targets, pad=0),
        retain=optimization.make_examples(prompts, None, pad=0))


def hyper(cfg, layer=1, scale=3.0, weights=(1.0, 0.5, 2.0, 0.0)):
    fixed = jnp.asarray(np.random.default_rng(3).standard_normal((2, cfg.d_model)), jnp.float32)
    return optimization.RDOHyper(weights=jnp.asarray(weights, jnp.float32), layer=jnp.asarray(layer, jnp.int32),
                             add_scale=jnp.asarray(scale, jnp.float32), fixed=fixed)


def test_make_examples_masks_target_predictions():
    ex = optimization.make_examples([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad=0, bucket=8)
    assert ex.tokens.shape == (2, 8)
    np.testing.assert_array_equal(ex.tokens[0], [0, 0, 0, 5, 6, 7, 1, 2])
    # position t is scored when token t+1 is a target token: positions 5 (7->1) and 6 (1->2)
    np.testing.assert_array_equal(np.flatnonzero(ex.loss_mask[0]), [5, 6])
    np.testing.assert_array_equal(np.flatnonzero(ex.loss_mask[1]), [4, 5, 6])
    retain = optimization.make_examples([[5, 6, 7]], None, pad=0, bucket=4)
    np.testing.assert_array_equal(retain.loss_mask[0], [0, 1, 1, 1])


def _fd_check(value_and_grad, cfg, params, data, hp, v, eps):
    def loss(x):
        return float(value_and_grad(x, params, cfg, data, hp)[0][0])

    grad = np.asarray(value_and_grad(v, params, cfg, data, hp)[1])
    eye = np.eye(v.shape[0], dtype=np.float32)
    fd = np.array([(loss(v + eps * e) - loss(v - eps * e)) / (2 * eps) for e in eye])
    return grad, fd


def test_gradient_matches_finite_differences(model, value_and_grad):
    """Every coordinate of the gradient against central differences, in float32.

    x64 would not sharpen this: the model returns float32 logits by design (`forward_unjitted` casts them), so the
    loss carries float32 rounding (~1e-6 on a loss of ~9) whatever the parameter dtype. A step of 2e-3 relative to
    ‖v‖ balances truncation (1e-2 gives ~1.4% error, 2e-3 about 25x less) against that rounding divided by the
    step (~4e-4 per coordinate).
    """
    cfg, params = model
    data, hp = toy_data(cfg), hyper(cfg)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(cfg.d_model), jnp.float32)
    v = v / jnp.linalg.norm(v) * 1.3  # not unit: the loss normalises v itself
    grad, fd = _fd_check(value_and_grad, cfg, params, data, hp, v, eps=2e-3 * 1.3)
    rel = np.linalg.norm(grad - fd) / np.linalg.norm(grad)
    assert rel < 1e-2, rel
    assert np.linalg.norm(grad) > 1e-2  # not vacuous
    # the loss sees v/|v| only, so the gradient is tangent to the sphere
    assert abs(float(grad @ np.asarray(v))) < 1e-5 * np.linalg.norm(grad) * np.linalg.norm(np.asarray(v))


def test_each_term_has_its_own_gradient(model, value_and_grad):
    """Every loss term depends on the direction (so weights really steer the optimisation)."""
    cfg, params = model
    data = toy_data(cfg)
    v = jnp.asarray(np.random.default_rng(2).standard_normal(cfg.d_model), jnp.float32)
    for i, name in enumerate(optimization.LOSS_TERMS):
        w = [0.0] * 4
        w[i] = 1.0
        hp = hyper(cfg, weights=w)
        (total, terms), g = value_and_grad(v, params, cfg, data, hp)
        assert float(total) == pytest.approx(float(terms[name]), rel=1e-6), name
        assert float(jnp.linalg.norm(g)) > 1e-4, name


def test_train_step_traces_once_and_descends_on_a_toy_objective():
    target = jnp.asarray(np.random.default_rng(0).standard_normal(16), jnp.float32)

    def loss_fn(v, target):
        c = jnp.dot(v, target) / (jnp.linalg.norm(v) * jnp.linalg.norm(target))
        return 1.0 - c, {"cos": c}

    opt = optax.adam(0.1)
    step = optimization.make_train_step(loss_fn, opt, max_traces=1)
    state = optimization.init_state(np.random.default_rng(1).standard_normal(16), opt)
    losses = []
    for _ in range(20):
        state, loss, _ = step(state, target)
        losses.append(float(loss))
        assert abs(float(jnp.linalg.norm(state.v)) - 1.0) < 1e-6
    assert losses[-1] < 0.2 * losses[0], losses
    assert int(state.step) == 20


def test_rdo_train_step_compiles_once_and_reduces_the_loss(model, value_and_grad):
    cfg, params = model
    data = toy_data(cfg)
    init = np.random.default_rng(4).standard_normal(cfg.d_model).astype(np.float32)
    kw = dict(layer=1, batch_size=4, weights={"addition": 0.5})
    optimization.train(params, cfg, data, init, steps=1, **kw)  # compiles the production step for these shapes
    compiled = optimization.rdo_train_step._cache_size()
    res = optimization.train(params, cfg, data, init, steps=20, lr=0.05, **kw)
    assert optimization.rdo_train_step._cache_size() == compiled  # other lr, 20 batches: no new trace
    h = res.history
    assert h["step"] == list(range(1, 21))
    assert np.mean(h["total"][-4:]) < np.mean(h["total"][:4]), h["total"]
    assert abs(np.linalg.norm(res.direction) - 1.0) < 1e-6
    # on all the data: the optimised direction has a lower loss than the starting one
    hp = hyper(cfg, scale=float(np.linalg.norm(init)), weights=(1.0, 0.5, 1.0, 0.0))
    before = float(value_and_grad(jnp.asarray(init), params, cfg, data, hp)[0][0])
    after = float(value_and_grad(jnp.asarray(res.direction), params, cfg, data, hp)[0][0])
    assert after < before


def test_resume_equals_uninterrupted_run(model, tmp_path):
    cfg, params = model
    data = toy_data(cfg)
    init = np.random.default_rng(5).standard_normal(cfg.d_model).astype(np.float32)
    kw = dict(layer=1, lr=0.03, batch_size=4, seed=7, checkpoint_every=3)
    full = optimization.train(params, cfg, data, init, steps=7, checkpoint_dir=tmp_path / "a", **kw)
    first = optimization.train(params, cfg, data, init, steps=3, checkpoint_dir=tmp_path / "b", **kw)
    assert first.resumed_from is None and first.steps == 3
    resumed = optimization.train(params, cfg, data, init, steps=7, checkpoint_dir=tmp_path / "b", **kw)
    assert resumed.resumed_from == 3 and resumed.steps == 7
    np.testing.assert_array_equal(resumed.direction, full.direction)
    assert resumed.history == full.history
    # the finished run resumes to itself without training
    again = optimization.train(params, cfg, data, init, steps=7, checkpoint_dir=tmp_path / "a", **kw)
    assert again.resumed_from == 7 and again.history == full.history
    np.testing.assert_array_equal(again.direction, full.direction)
    # other settings: refused, not mixed in
    with pytest.raises(RunError, match="different optimization"):
        optimization.train(params, cfg, data, init, steps=9, checkpoint_dir=tmp_path / "a", **{**kw, "lr": 0.1})


def test_independence_term_pushes_away_from_fixed_direction(model):
    cfg, params = model
    data = toy_data(cfg)
    init = np.random.default_rng(6).standard_normal(cfg.d_model).astype(np.float32)
    other = init + 0.5 * np.random.default_rng(7).standard_normal(cfg.d_model).astype(np.float32)
    cos0 = abs(init @ other) / (np.linalg.norm(init) * np.linalg.norm(other))
    res = optimization.train(params, cfg, data, init, layer=1, steps=20, lr=0.05, batch_size=4,
                         weights={"ablation": 0.0, "addition": 0.0, "retain": 0.0, "independence": 1.0},
                         fixed_directions=other[None], add_scale=1.0)
    cos1 = abs(res.direction @ other) / np.linalg.norm(other)
    assert cos1 < 0.5 * cos0, (cos0, cos1)


@pytest.mark.slow
def test_command_line(tmp_path, capsys):
    pytest.importorskip("torch")
    from tests.test_extract_families import HARMFUL, HARMLESS, make_checkpoint

    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    make_checkpoint("qwen2", ckpt)
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    d = np.random.default_rng(0).standard_normal(64).astype(np.float32) * 3.0
    np.save(tmp_path / "direction.npy", d)
    out = tmp_path / "opt"
    args = ["--model", str(ckpt), "--direction", str(tmp_path / "direction.npy"), "--layer", "1", "--out", str(out),
            "--harmful", str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt"),
            "--n-train", "4", "--n-val", "2", "--no-filter", "--batch-size", "2", "--steps", "4",
            "--checkpoint-every", "2", "--target-tokens", "3", "--no-progress"]
    optimize.main(args)
    printed = capsys.readouterr().out
    assert "optimized direction after 4 steps" in printed
    direction = np.load(out / "direction.npy")
    assert direction.shape == (64,) and direction.dtype == np.float32
    assert np.linalg.norm(direction) == pytest.approx(np.linalg.norm(d), rel=1e-5)
    meta = json.loads((out / "optimize_metadata.json").read_text())
    assert meta["steps"] == 4 and meta["layer"] == 1 and set(meta["val_scores"]) == {"dim", "optimized"}
    assert (out / "loss_curves.png").stat().st_size > 0
    targets = json.loads((out / "targets.json").read_text())
    assert len(targets["ablation"]["target_ids"]) == 4
    # more steps: resumes from the checkpoint at step 4
    more = list(args)
    more[more.index("--steps") + 1] = "6"
    optimize.main(more)
    meta = json.loads((out / "optimize_metadata.json").read_text())
    assert meta["steps"] == 6 and meta["resumed_from"] == 4

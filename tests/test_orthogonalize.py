"""Weight orthogonalization gives the same logits as inference-time directional ablation."""

import jax
import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.method.orthogonalization import orthogonalize, untied_config
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random
from tests.hf_tiny import left_padded_batch


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_orthogonalized_weights_equal_ablation(family, tied):
    cfg = tiny_config(family, tie_embeddings=tied)
    params = init_random(cfg, jax.random.key(0), scale=0.3)
    direction = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 4, 10))
    ablated = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, direction)).logits
    edited = orthogonalize(params, cfg, direction)
    ocfg = untied_config(cfg)
    assert edited.lm_head is not None
    ortho = forward(edited, ocfg, tokens, mask).logits
    base = forward(params, cfg, tokens, mask).logits
    real = mask.astype(bool)
    err = np.abs(np.asarray(ortho) - np.asarray(ablated))[real].max()
    assert err < 1e-4, err
    # and the intervention actually changes something, so the comparison is not vacuous
    assert np.abs(np.asarray(base) - np.asarray(ablated))[real].max() > 1e-2


def test_ablation_removes_direction_from_every_site():
    cfg = tiny_config("llama")
    params = init_random(cfg, jax.random.key(0), scale=0.3)
    r = np.asarray(jax.random.normal(jax.random.key(2), (cfg.d_model,)))
    tokens, mask = left_padded_batch(cfg.vocab_size)
    out = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, r),
                  capture=("resid_pre", "attn_out", "mlp_out", "resid_final"))
    unit = r / np.linalg.norm(r)
    for site in ("resid_pre", "attn_out", "mlp_out", "resid_final"):
        proj = np.asarray(getattr(out, site)) @ unit
        assert np.abs(proj).max() < 1e-5, site
    base = forward(params, cfg, tokens, mask, capture=("resid_pre",))
    assert np.abs(np.asarray(base.resid_pre) @ unit).max() > 1e-2


def test_activation_addition_adds_at_one_layer():
    cfg = tiny_config("llama", n_layers=3)
    params = init_random(cfg, jax.random.key(0))
    r = np.asarray(jax.random.normal(jax.random.key(3), (cfg.d_model,)))
    tokens, mask = left_padded_batch(cfg.vocab_size)
    base = forward(params, cfg, tokens, mask, capture=("resid_pre",)).resid_pre
    added = forward(params, cfg, tokens, mask, Intervention.addition(cfg, r, layer=1, coeff=-2.0),
                    capture=("resid_pre",)).resid_pre
    np.testing.assert_allclose(np.asarray(added[0]), np.asarray(base[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(added[1]), np.asarray(base[1]) - 2.0 * r, atol=1e-5)
    assert np.abs(np.asarray(added[2]) - np.asarray(base[2])).max() > 1e-3

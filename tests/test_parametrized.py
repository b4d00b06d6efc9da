"""Parametrized abliteration (refusal_jax.method.parametrized) against its definition.

* the edited model (refusal_jax forward on edited weights) equals the intervention y <- y - s_l (y·r̂_l) r̂_l applied
  by forward hooks on the unedited transformers model's o_proj and down_proj outputs, for each pre-norm dense family,
  with heretic's kernel + interpolated direction and with free per-layer scales + per-layer directions;
* heretic's kernel and direction interpolation on hand-computed values; post-norm families and bad input refused.
"""

import numpy as np
import pytest

from refusal_jax import forward
from refusal_jax.errors import ConfigError, DataError
from refusal_jax.method import parametrized as pm
from tests.hf_tiny import hf_forward, left_padded_batch, save_and_convert

FAMILIES = ["llama", "mistral_gqa", "qwen2", "qwen3", "gemma"]


def hooked_logits(model, units, attn_scales, mlp_scales, tokens, mask):
    """transformers logits with y <- y - s_l (y·r̂_l) r̂_l on layer l's o_proj and down_proj outputs."""
    import torch

    hooks = []
    for li, layer in enumerate(model.model.layers):
        for module, s in ((layer.self_attn.o_proj, attn_scales[li]), (layer.mlp.down_proj, mlp_scales[li])):
            r = torch.tensor(units[li])

            def hook(_mod, _inp, out, r=r, s=float(s)):
                return out - s * (out @ r)[..., None] * r

            hooks.append(module.register_forward_hook(hook))
    try:
        return hf_forward(model, tokens, mask)[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_equals_hooked_intervention(family, tmp_path):
    _, model, cfg, params = save_and_convert(family, tmp_path)
    rng = np.random.default_rng(3)
    directions = rng.standard_normal((cfg.n_layers, cfg.d_model)).astype(np.float32)
    tokens, mask = left_padded_batch(cfg.vocab_size)
    cases = [  # heretic: kernel scales, one interpolated direction; free: per-layer scales and directions
        (pm.interpolated_direction(directions, 0.4),
         pm.kernel_scales(cfg.n_layers, 1.3, 1.0, 0.5, 1.5), pm.kernel_scales(cfg.n_layers, 0.9, 2.0, 0.2, 2.0)),
        (directions, rng.uniform(0, 1.5, cfg.n_layers), rng.uniform(0, 1.5, cfg.n_layers)),
    ]
    for direction, attn, mlp in cases:
        edited = pm.parametrized_edit(params, cfg, direction, attn, mlp)
        units = pm._per_layer_units(direction, cfg.n_layers)
        want = hooked_logits(model, units, attn, mlp, tokens, mask)
        got = np.asarray(forward(edited, cfg, tokens, mask).logits)
        real = mask.astype(bool)
        unedited = np.asarray(forward(params, cfg, tokens, mask).logits)
        assert np.abs(unedited - want)[real].max() > 1e-3  # the intervention changes the logits
        np.testing.assert_allclose(got[real], want[real], atol=2e-4, rtol=1e-4)


def test_heretic_edit_is_kernel_and_interpolation(tmp_path):
    _, _, cfg, params = save_and_convert("llama", tmp_path)
    directions = np.random.default_rng(0).standard_normal((cfg.n_layers, cfg.d_model))
    attn = dict(max_weight=1.0, max_weight_position=1.0, min_weight=0.3, min_weight_distance=1.0)
    mlp = dict(max_weight=0.7, max_weight_position=0.0, min_weight=0.1, min_weight_distance=2.0)
    a = pm.heretic_edit(params, cfg, directions, 1.25, attn, mlp)
    b = pm.parametrized_edit(params, cfg, pm.interpolated_direction(directions, 1.25),
                             pm.kernel_scales(cfg.n_layers, **attn), pm.kernel_scales(cfg.n_layers, **mlp))
    np.testing.assert_allclose(np.asarray(a.layers.o), np.asarray(b.layers.o), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.layers.down), np.asarray(b.layers.down), atol=1e-6)
    per_layer = pm.heretic_edit(params, cfg, directions, None, attn, mlp)  # layer l's own direction; mlp s_2 = 0.1
    unit2 = directions[2] / np.linalg.norm(directions[2])
    down2 = np.asarray(per_layer.layers.down[2])
    np.testing.assert_allclose(down2 @ unit2, (1 - 0.1) * (np.asarray(params.layers.down[2]) @ unit2), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(per_layer.embed), np.asarray(params.embed))  # embedding untouched


def test_kernel_and_interpolation_values():
    np.testing.assert_allclose(pm.kernel_scales(6, 1.0, 2.0, 0.2, 2.0), [0.2, 0.6, 1.0, 0.6, 0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(pm.kernel_scales(4, 0.8, 1.5, 0.8, 0.5), [0, 0.8, 0.8, 0], atol=1e-6)
    d = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0]])
    np.testing.assert_allclose(pm.interpolated_direction(d, 1.0), [0, 1], atol=1e-7)
    np.testing.assert_allclose(pm.interpolated_direction(d, 0.5), [2 ** -0.5, 2 ** -0.5], atol=1e-7)
    np.testing.assert_allclose(pm.interpolated_direction(d, 2.0), [0, -1], atol=1e-7)


def test_bad_input_refused(tmp_path):
    _, _, cfg, params = save_and_convert("llama", tmp_path)
    L, D = cfg.n_layers, cfg.d_model
    ones = np.ones(L)
    with pytest.raises(DataError, match="zero or non-finite"):
        pm.parametrized_edit(params, cfg, np.zeros(D), ones, ones)
    with pytest.raises(DataError, match="attn scales"):
        pm.parametrized_edit(params, cfg, np.ones(D), np.ones(L + 1), ones)
    with pytest.raises(DataError, match=r"\[D\] or"):
        pm.parametrized_edit(params, cfg, np.ones((L + 1, D)), ones, ones)
    with pytest.raises(DataError, match="outside"):
        pm.interpolated_direction(np.ones((L, D)), L - 0.5)
    with pytest.raises(DataError, match="min_weight_distance"):
        pm.kernel_scales(L, 1.0, 0.0, 0.5, 0.0)


def test_post_norm_family_refused(tmp_path):
    _, _, cfg, params = save_and_convert("gemma2", tmp_path)
    ones = np.ones(cfg.n_layers)
    with pytest.raises(ConfigError, match="not equivalent"):
        pm.parametrized_edit(params, cfg, np.ones(cfg.d_model), ones, ones)


def test_population_scores_equal_one_trial_at_a_time(tmp_path):
    """P trials scored in one program = each trial's numpy edit run alone (KL vs unedited, refusal-token mass)."""
    import jax

    from refusal_jax import forward

    _, _, cfg, params = save_and_convert("qwen2", tmp_path)
    rng = np.random.default_rng(5)
    L, D, P = cfg.n_layers, cfg.d_model, 3
    units = rng.standard_normal((P, L, D)).astype(np.float32)
    units /= np.linalg.norm(units, axis=-1, keepdims=True)
    attn, mlp = rng.uniform(0, 1.5, (P, L)), rng.uniform(0, 1.5, (P, L))
    attn[0] = mlp[0] = 0.0  # an unedited trial: KL 0
    tokens, mask = left_padded_batch(cfg.vocab_size)
    refusal_tokens = [3, 17]
    kl, prob = pm.population_first_token(params, cfg, tokens, mask, units, attn, mlp, refusal_tokens)
    base = jax.nn.log_softmax(forward(params, cfg, tokens, mask, logits="last").logits, -1)
    for p in range(P):
        edited = pm.parametrized_edit(params, cfg, units[p], attn[p], mlp[p])
        logp = np.asarray(jax.nn.log_softmax(forward(edited, cfg, tokens, mask, logits="last").logits, -1))
        want_kl = (np.exp(base) * (base - logp)).sum(-1).mean()
        np.testing.assert_allclose(float(kl[p]), want_kl, atol=1e-6)
        np.testing.assert_allclose(float(prob[p]), np.exp(logp[:, refusal_tokens]).sum(-1).mean(), atol=1e-6)
    assert abs(float(kl[0])) < 1e-6 and float(kl[1]) > 1e-4

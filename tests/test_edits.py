"""Capability-preserving weight edits (refusal_jax.method.edits) against their definitions.

* projected direction: r'·μ = 0 (one mean, and per layer), r' = r when r ⟂ μ;
* projected abliteration: every residual-writing row has zero component along r', and the edited model equals
  inference-time ablation of r' (so it is the plain edit of r');
* norm-preserving biprojected abliteration: every row keeps its norm (relative 1e-6) and loses its r' component;
  with per-layer means, layer l is edited against its own r'_l;
* plain is bit-identical to `orthogonalize`, and the orthogonalize CLI with no --method writes the same files
  as before; with --method norm-preserving the saved model has the preserved norms;
* post-norm families (Gemma-2/3) are refused; malformed harmless means are named.
"""

import json

import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.errors import ConfigError, DataError
from refusal_jax.method import edits
from refusal_jax.method.orthogonalization import orthogonalize, untied_config
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random, to_flat
from tests.hf_tiny import left_padded_batch


@pytest.fixture(scope="module", params=[("llama", False), ("qwen2", True)], ids=["llama", "qwen2-tied"])
def model(request):
    family, tied = request.param
    cfg = tiny_config(family, tie_embeddings=tied, n_layers=3)
    return cfg, init_random(cfg, 0, scale=0.3)


def vectors(cfg, seed=1):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(cfg.d_model)
    mu = rng.standard_normal(cfg.d_model) + 0.8 * r  # correlated with r, as harmless means are
    return r, mu


def rows(params):
    """Every residual-writing row, by matrix: embed [V, D], o [L*N*H, D], down [L*F, D]."""
    D = params.embed.shape[-1]
    return {"embed": np.asarray(params.embed), "o": np.asarray(params.layers.o).reshape(-1, D),
            "down": np.asarray(params.layers.down).reshape(-1, D)}


def test_projected_direction_is_orthogonal_to_the_harmless_mean():
    rng = np.random.default_rng(0)
    r, mu = rng.standard_normal(16), rng.standard_normal(16)
    rp = edits.projected_direction(r, mu)
    assert abs(rp @ mu) < 1e-12 * np.linalg.norm(r) * np.linalg.norm(mu)
    np.testing.assert_allclose(r - rp, (r @ mu) / (mu @ mu) * mu, atol=1e-12)  # only the μ part removed
    ortho = r - (r @ mu) / (mu @ mu) * mu
    np.testing.assert_allclose(edits.projected_direction(ortho, mu), ortho, atol=1e-12)  # r ⟂ μ: unchanged
    mus = rng.standard_normal((3, 16))
    per_layer = edits.projected_direction(r, mus)
    assert per_layer.shape == (3, 16)
    assert np.abs(np.einsum("ld,ld->l", per_layer, mus)).max() < 1e-12 * np.linalg.norm(r) * 10
    basis = edits.projected_basis(rng.standard_normal((2, 16)), mu)
    assert basis.shape == (2, 16)
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-6)
    assert np.abs(basis @ (mu / np.linalg.norm(mu))).max() < 1e-6


def test_plain_is_orthogonalize(model):
    cfg, params = model
    r, mu = vectors(cfg)
    a, b = to_flat(edits.edit(params, cfg, r, "plain", mu)), to_flat(orthogonalize(params, cfg, r))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_projected_abliteration_removes_r_prime_and_equals_its_ablation(model):
    cfg, params = model
    r, mu = vectors(cfg)
    rp = edits.projected_direction(r, mu)
    unit = rp / np.linalg.norm(rp)
    edited = edits.edit(params, cfg, r, "projected", mu)
    for name, w in rows(edited).items():
        assert np.abs(w @ unit).max() < 1e-6, name
        # what is left along r is exactly the harmless-mean part: not removed
    assert np.abs(rows(edited)["down"] @ (r / np.linalg.norm(r))).max() > 1e-3
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 4, 10))
    ablated = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, rp)).logits
    got = forward(edited, untied_config(cfg), tokens, mask).logits
    plain = forward(orthogonalize(params, cfg, r), untied_config(cfg), tokens, mask).logits
    real = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(got) - np.asarray(ablated))[real].max() < 1e-4
    assert np.abs(np.asarray(got) - np.asarray(plain))[real].max() > 1e-3  # it is a different edit
    # the LM head is untied and unchanged
    np.testing.assert_array_equal(np.asarray(edited.lm_head),
                                  np.asarray(params.lm_head if params.lm_head is not None else params.embed.T))


@pytest.mark.parametrize("with_mean", [True, False])
def test_norm_preserving_keeps_row_norms_and_removes_r_prime(model, with_mean):
    cfg, params = model
    r, mu = vectors(cfg)
    edited = edits.edit(params, cfg, r, "norm-preserving", mu if with_mean else None)
    target = edits.projected_direction(r, mu) if with_mean else r
    unit = target / np.linalg.norm(target)
    before, after = rows(params), rows(edited)
    for name in before:
        n0, n1 = np.linalg.norm(before[name], axis=-1), np.linalg.norm(after[name], axis=-1)
        assert np.abs(n1 / n0 - 1).max() < 1e-6, name
        assert np.abs(after[name] @ unit).max() < 1e-6, name
        # directions did change: it is not the identity, and not the plain (shrinking) projection
        assert np.abs(after[name] - before[name]).max() > 1e-3, name
    plain = rows(orthogonalize(params, cfg, target))
    assert np.abs(np.linalg.norm(plain["down"], axis=-1) / np.linalg.norm(before["down"], axis=-1) - 1).max() > 1e-3
    # norm preservation is a rescaling of the plain projection, row by row
    for name in before:
        cos = np.einsum("id,id->i", after[name], plain[name]) / (
            np.linalg.norm(after[name], axis=-1) * np.linalg.norm(plain[name], axis=-1))
        assert np.abs(cos - 1).max() < 1e-5, name
    n = edits.row_norms(edited)
    assert n["o"].shape == (cfg.n_layers, cfg.n_heads, cfg.head_dim) and n["down"].shape == (cfg.n_layers, cfg.d_ff)


def test_per_layer_biprojection(model):
    cfg, params = model
    rng = np.random.default_rng(3)
    r = rng.standard_normal(cfg.d_model)
    mus = rng.standard_normal((cfg.n_layers, cfg.d_model)) + 0.5 * r
    rps = edits.projected_direction(r, mus)
    units = rps / np.linalg.norm(rps, axis=-1, keepdims=True)
    for method in ("projected", "norm-preserving"):
        edited = edits.edit(params, cfg, r, method, mus)
        o, down = np.asarray(edited.layers.o), np.asarray(edited.layers.down)
        for layer in range(cfg.n_layers):
            assert np.abs(o[layer] @ units[layer]).max() < 1e-6, (method, layer)
            assert np.abs(down[layer] @ units[layer]).max() < 1e-6, (method, layer)
            other = units[(layer + 1) % cfg.n_layers]
            assert np.abs(down[layer] @ other).max() > 1e-4  # each layer has its own r'
        assert np.abs(np.asarray(edited.embed) @ units[0]).max() < 1e-6
        if method == "norm-preserving":
            np.testing.assert_allclose(np.linalg.norm(down, axis=-1),
                                       np.linalg.norm(np.asarray(params.layers.down), axis=-1), rtol=1e-6)


def test_refusals_and_errors(tmp_path):
    cfg = tiny_config("gemma2", embed_scale=True, post_norms=True, sliding_window=4,
                      sliding_layers=(True, False), mlp_activation="gelu_tanh")
    params = init_random(cfg, 0, scale=0.3)
    r = np.ones(cfg.d_model)
    for method in ("projected", "norm-preserving"):
        with pytest.raises(ConfigError, match="post-attention/MLP norms"):
            edits.edit(params, cfg, r, method, np.arange(cfg.d_model, dtype=float))
    cfg = tiny_config("llama")
    with pytest.raises(DataError, match="needs the harmless mean"):
        edits.edit(init_random(cfg, 0, scale=0.3), cfg, r, "projected", None)
    with pytest.raises(DataError, match="expected"):
        edits.resolve_harmless_mean(np.ones(5), cfg)
    with pytest.raises(DataError, match="needs the position"):
        edits.resolve_harmless_mean(np.ones((3, cfg.n_layers, cfg.d_model)), cfg)
    # an [n_pos, L, D] file takes the position of direction_metadata.json next to the direction
    run = tmp_path / "run"
    (run / "generate_directions").mkdir(parents=True)
    means = np.random.default_rng(0).standard_normal((3, cfg.n_layers, cfg.d_model))
    np.save(run / edits.HARMLESS_MEAN_FILE, means)
    np.save(run / "direction.npy", r.astype(np.float32))
    (run / "direction_metadata.json").write_text(json.dumps({"pos": -2, "layer": 1}))
    np.testing.assert_array_equal(edits.load_harmless_mean(run, cfg, run / "direction.npy"), means[-2])
    with pytest.raises(DataError, match="does not exist"):
        edits.load_harmless_mean(tmp_path / "nope.npy", cfg)


def test_orthogonalize_command_line_methods(tmp_path, capsys):
    pytest.importorskip("torch")
    from refusal_jax import orthogonalize as ortho
    from refusal_jax.convert.hf import load_hf
    from refusal_jax.convert.safetensors_io import iter_file
    from tests.test_extract_families import make_checkpoint

    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    make_checkpoint("llama", ckpt)
    cfg, params, _ = load_hf(str(ckpt))
    rng = np.random.default_rng(0)
    r, mu = rng.standard_normal(cfg.d_model).astype(np.float32), rng.standard_normal(cfg.d_model)
    np.save(tmp_path / "r.npy", r)
    np.save(tmp_path / "mu.npy", mu)
    base = ["--model", str(ckpt), "--direction", str(tmp_path / "r.npy"), "--no-progress"]
    ortho.main(base + ["--out", str(tmp_path / "default")])
    ortho.main(base + ["--out", str(tmp_path / "plain"), "--method", "plain"])
    a = dict(iter_file(tmp_path / "default" / "model.safetensors"))
    b = dict(iter_file(tmp_path / "plain" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ortho.main(base + ["--out", str(tmp_path / "np"), "--method", "norm-preserving", "--harmless-mean",
                       str(tmp_path / "mu.npy")])
    assert "method norm-preserving" in capsys.readouterr().out
    _, edited, _ = load_hf(str(tmp_path / "np"))
    before, after = rows(params), rows(edited)
    unit = edits.projected_direction(r, mu)
    unit /= np.linalg.norm(unit)
    for name in before:
        np.testing.assert_allclose(np.linalg.norm(after[name], axis=-1), np.linalg.norm(before[name], axis=-1),
                                   rtol=1e-5, err_msg=name)
        assert np.abs(after[name] @ unit).max() < 1e-5, name
    with pytest.raises(SystemExit) as e:
        ortho.main(base + ["--out", str(tmp_path / "p"), "--method", "projected"])
    assert e.value.code == 2 and "--harmless-mean" in capsys.readouterr().err


@pytest.mark.parametrize("method,per_layer", [("plain", False), ("projected", True), ("norm-preserving", True),
                                              ("norm-preserving", False)])
def test_streaming_edit_exports_the_same_tensors_as_the_in_memory_edit(model, method, per_layer):
    """The orthogonalize CLI edits tensor by tensor while exporting (memory); it must write what edit_weights
    gives, row chunks included (a tiny chunk size forces several chunks per tensor)."""
    from refusal_jax.convert import engine
    from refusal_jax.method.orthogonalization import edit_weights, streaming_edit

    cfg, params = model
    r, mu = vectors(cfg)
    mean = np.stack([mu + 0.1 * i for i in range(cfg.n_layers)]) if per_layer else mu
    basis, preserve = edits.edit_basis(r, method, mean)
    ocfg = untied_config(cfg)
    want = dict(engine.to_hf_tensors(ocfg, edit_weights(params, cfg, basis, preserve_norm=preserve)))
    got = dict(engine.to_hf_tensors(ocfg, params, edit=streaming_edit(cfg, basis, preserve_norm=preserve,
                                                                       chunk_bytes=4 * cfg.d_model * 5)))
    assert got.keys() == want.keys() and "lm_head.weight" in got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got["lm_head.weight"], np.asarray(params.lm_head).T if params.lm_head is not None
                                  else np.asarray(params.embed))  # the head keeps the original matrix

"""Dense families of 2025-26 (Granite 3.x with its four multipliers, SmolLM3 with its layers without RoPE): parity
with transformers on logits and every hidden state (left padding), cached decoding = the full pass, weight
orthogonalization = inference-time ablation, HF export read back by transformers, configs refused where they ask
for what another family does."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refusal_jax import Intervention, KVCache, forward  # noqa: E402
from refusal_jax.convert import export_hf  # noqa: E402
from refusal_jax.convert.hf import load_hf  # noqa: E402
from refusal_jax.errors import CheckpointError, ConfigError  # noqa: E402
from refusal_jax.method.orthogonalization import orthogonalize, residual_write_norms  # noqa: E402
from refusal_jax.model.config import ModelConfig, from_hf_config  # noqa: E402
from refusal_jax.model.params import to_flat  # noqa: E402
from tests.hf_tiny import DENSE_2026, hf_forward, left_padded_batch, rel_err, save_and_convert  # noqa: E402

TOL = 1e-4  # max abs difference relative to the largest reference value, float32 both sides
LENGTHS = (13, 6, 16)  # the short prompt has 10 pads on the left
SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")


@pytest.fixture(scope="module", params=sorted(DENSE_2026))
def converted(request, tmp_path_factory):
    return save_and_convert(request.param, tmp_path_factory.mktemp(request.param))


def test_config_matches_hf(converted):
    family, model, cfg, _ = converted
    hf = model.config
    assert cfg.family == family and cfg.architecture == hf.architectures[0]
    if family.startswith("olmo"):
        assert not cfg.pre_norms and cfg.post_norms and cfg.qk_norm_flat
        assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in getattr(hf, "layer_types", None)
                                           or ["full_attention"] * cfg.n_layers)
        assert any(cfg.sliding_layers) == (family == "olmo3")
        if family == "olmo3":
            assert (cfg.rope.theta, cfg.rope_local.theta) == (1000.0, 50.0)
    if family == "phi3":
        assert cfg.sliding_layers == (True,) * cfg.n_layers and cfg.sliding_window == hf.sliding_window == 4
    if family == "granite":
        assert (cfg.embed_multiplier, cfg.residual_multiplier, cfg.q_scale, cfg.logits_scaling) == (
            hf.embedding_multiplier, hf.residual_multiplier, hf.attention_multiplier, hf.logits_scaling)
        assert all(cfg.rope_layers)
    elif family == "smollm3":
        assert cfg.rope_layers == tuple(bool(f) for f in hf.no_rope_layers) == (True, False, True, False)
        assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf.layer_types) == (False, True) * 2
        assert cfg.sliding_window == 4
        assert cfg.embed_multiplier == cfg.residual_multiplier == cfg.logits_scaling == 1.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_logits_and_hidden_states_match(converted):
    """Logits and every block's input within TOL of transformers, left-padded; a prompt alone gives the logits it
    has left-padded in the batch."""
    family, model, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    out = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    real = mask.astype(bool)
    errors = {"logits": rel_err(out.logits, ref_logits, real)}
    for layer in range(cfg.n_layers):
        errors[f"hidden[{layer}]"] = rel_err(out.resid_pre[layer], ref_hidden[layer], real)
    print(f"{family}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{family}: relative error above {TOL}: {bad}"
    n = LENGTHS[1]
    alone = forward(params, cfg, tokens[1:2, -n:], mask[1:2, -n:], Intervention.none(cfg), capture=SITES)
    np.testing.assert_allclose(np.asarray(alone.logits[0]), np.asarray(out.logits[1, -n:]), atol=1e-5)


def test_cached_decoding_equals_full_pass(converted):
    """Prefill + one-token steps through the KV cache give the full pass's logits (positions of RoPE and no-RoPE
    layers, multipliers, left padding)."""
    _, _, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 3, 10), seed=3)
    steps = 6
    extra = np.random.default_rng(4).integers(1, cfg.vocab_size, (tokens.shape[0], steps)).astype(np.int32)
    full_tokens, full_mask = np.concatenate([tokens, extra], 1), np.concatenate([mask, np.ones_like(extra)], 1)
    assert full_tokens.shape[1] == max(LENGTHS)  # the parity test's compiled shape
    want = np.asarray(forward(params, cfg, full_tokens, full_mask, Intervention.none(cfg), capture=SITES).logits)
    cache = KVCache.init(cfg, tokens.shape[0], full_tokens.shape[1])
    out = forward(params, cfg, tokens, mask, cache=cache, logits="last")
    got = [np.asarray(out.logits)]
    for s in range(steps):
        out = forward(params, cfg, extra[:, s:s + 1], np.ones((tokens.shape[0], 1), np.int32), cache=out.cache,
                      logits="last")
        got.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.stack(got, 1), want[:, -steps - 1:], atol=1e-5)


def test_orthogonalized_equals_ablation(converted):
    """The multipliers are scalars, so projecting r̂ out of the embedding, o_proj and down_proj still gives the
    logits of ablating r̂ at every site."""
    _, _, cfg, params = converted
    r = np.random.default_rng(3).standard_normal(cfg.d_model).astype(np.float32)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS, seed=2)
    if cfg.post_norms:  # OLMo-2/3: the post-norms rescale what o/down write, so an edit cannot stand for ablation
        with pytest.raises(ConfigError, match="weight edits are not equivalent to ablation"):
            orthogonalize(params, cfg, r)
        return
    edited = orthogonalize(params, cfg, r)
    assert max(residual_write_norms(edited, r).values()) < 1e-5
    ucfg = dataclasses.replace(cfg, tie_embeddings=False)
    if params.lm_head is None:
        params = params.replace(lm_head=params.embed.T)
    real = mask.astype(bool)
    ablated = forward(params, ucfg, tokens, mask, Intervention.ablation(ucfg, r), capture=SITES).logits
    base = forward(params, ucfg, tokens, mask, Intervention.none(ucfg), capture=SITES).logits
    got = forward(edited, ucfg, tokens, mask, Intervention.none(ucfg), capture=SITES).logits
    assert rel_err(base, ablated, real) > 100 * TOL  # the ablation changes this model's logits
    assert rel_err(got, ablated, real) <= TOL


def test_hf_export_loads_in_transformers(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    family, model, cfg, params = converted
    out = export_hf.save_hf(tmp_path / "m", cfg, params)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    # Phi-3 is written as the Mistral checkpoint it computes (q/k/v and gate/up as separate tensors)
    cfg = export_hf.as_exportable(cfg)
    assert type(reloaded).__name__ == cfg.architecture == (
        "MistralForCausalLM" if family == "phi3" else model.config.architectures[0])
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref, _ = hf_forward(reloaded, tokens, mask)
    ours = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    assert rel_err(ours.logits, ref, mask.astype(bool)) <= TOL
    cfg2, params2, _ = load_hf(str(out), with_tokenizer=False)
    assert cfg2 == cfg
    for name, value in to_flat(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(to_flat(params2)[name]), err_msg=name)


def test_fused_tensor_of_the_wrong_size_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from tests.hf_tiny import make_hf_model

    make_hf_model("phi3").save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-16]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has shape \(112, 64\), expected \(128, 64\)"):
        load_hf(str(tmp_path), with_tokenizer=False)


def test_olmo_norm_rounds_like_transformers():
    """OLMo-2/3 multiply the norm weight in float32 and round once (Llama rounds before the product): in bfloat16
    our norm gives transformers' bits."""
    import jax.numpy as jnp
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.transformer import apply_norm

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 64)).astype(np.float32), (1 + 0.3 * rng.standard_normal(64)).astype(np.float32)
    norm = Olmo2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(w))
        theirs = norm(torch.tensor(x).bfloat16()).float().numpy()
    cfg = tiny_config("olmo2", d_model=64, rms_norm_eps=1e-6)
    ours = np.asarray(apply_norm(cfg, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w)).astype(jnp.float32))
    np.testing.assert_array_equal(ours, theirs)


def _config(arch, **extra):
    return dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, **extra)


def test_config_variants_and_refusals():
    # SmolLM3 without an explicit list: every no_rope_layer_interval-th layer has no RoPE (SmolLM3Config)
    smol = from_hf_config(_config("SmolLM3ForCausalLM", no_rope_layer_interval=4))
    assert smol.rope_layers == (True, True, True, False)
    # SmolLM3's layer_types slide only with use_sliding_window
    types = ["sliding_attention", "full_attention"] * 2
    assert not any(from_hf_config(_config("SmolLM3ForCausalLM", layer_types=types, sliding_window=4)).sliding_layers)
    with pytest.raises(ConfigError, match="no_rope_layers has 3 entries"):
        from_hf_config(_config("SmolLM3ForCausalLM", no_rope_layers=[1, 1, 0]))
    # the same keys on a family that does not read them change the computation: refused, not ignored
    with pytest.raises(ConfigError, match="residual_multiplier"):
        from_hf_config(_config("LlamaForCausalLM", residual_multiplier=0.5))
    with pytest.raises(ConfigError, match="no_rope_layers"):
        from_hf_config(_config("LlamaForCausalLM", no_rope_layers=[1, 0, 1, 1]))
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.75"):  # Phi-4-mini
        from_hf_config(_config("Phi3ForCausalLM", rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                         partial_rotary_factor=0.75)))
    with pytest.raises(ConfigError, match="longrope"):
        from_hf_config(_config("Phi3ForCausalLM", rope_scaling=dict(type="longrope", short_factor=[1.0] * 4,
                                                                      long_factor=[1.0] * 4)))
    with pytest.raises(ConfigError, match="logits_scaling"):
        from_hf_config(_config("GraniteForCausalLM", logits_scaling=0.0))

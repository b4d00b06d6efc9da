"""Parity with transformers (torch, fp32) for Gemma-1/2/3, Qwen3 and sliding-window Mistral/Qwen3.

Tiny random models (tests/hf_tiny.py MORE_FAMILIES) are saved as safetensors, converted with `load_hf` and compared
on logits and every hidden state, left-padded, with prompts several sliding windows long. Also: Gemma-2/3 capture
sites are the post-normed tensors added to the residual, directional ablation reaches every site there, the KV
cache keeps the window, and `from_hf_config` reads real-world config variants the way transformers does.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refusal_jax import Intervention, KVCache, forward  # noqa: E402
from refusal_jax.model.config import RopeConfig, from_hf_config  # noqa: E402
from refusal_jax.model.transformer import rms_norm  # noqa: E402
from tests.hf_tiny import MORE_FAMILIES, hf_forward, left_padded_batch, save_and_convert  # noqa: E402

TOL = 1e-4  # max abs difference, float32 both sides
LENGTHS = (13, 6, 16)  # every prompt longer than the 4-5 token windows; the short one has 10 pads on the left
POST_NORM_FAMILIES = ("gemma2", "gemma3_text")
# One capture set and an explicit (traced) Intervention in every call, so each family compiles the full pass once.
SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")


@pytest.fixture(scope="module", params=sorted(MORE_FAMILIES))
def converted(request, tmp_path_factory):
    return save_and_convert(request.param, tmp_path_factory.mktemp(request.param))


def _max_err(a, b, real):
    return float(np.abs(np.asarray(a) - np.asarray(b))[real].max())


def test_config_matches_hf(converted):
    family, model, cfg, _ = converted
    hf = model.config
    if family.startswith("mistral"):
        sliding = (hf.sliding_window is not None,) * hf.num_hidden_layers  # MistralModel: every layer or none
    elif family == "gemma":
        sliding = (False,) * hf.num_hidden_layers
    else:
        sliding = tuple(t == "sliding_attention" for t in hf.layer_types)
    assert cfg.sliding_layers == sliding
    assert any(sliding) == ("swa" in family or family.startswith(("gemma2", "gemma3")))
    if any(sliding):
        assert cfg.sliding_window == hf.sliding_window and max(LENGTHS) > 3 * cfg.sliding_window
    gemma = family.startswith("gemma")
    assert cfg.embed_scale == gemma and cfg.tie_embeddings == gemma
    assert cfg.post_norms == (family in POST_NORM_FAMILIES)
    assert cfg.qk_norm == (family.startswith(("qwen3", "gemma3")))
    assert cfg.mlp_activation == ("gelu_tanh" if gemma else "silu")
    if family in POST_NORM_FAMILIES:
        assert cfg.q_scale == pytest.approx(hf.query_pre_attn_scalar**-0.5) and cfg.q_scale != cfg.head_dim**-0.5
        assert cfg.final_softcap == hf.final_logit_softcapping
    assert cfg.attn_softcap == (hf.attn_logit_softcapping if family == "gemma2" else None)
    if family == "gemma3_text":
        assert cfg.rope == RopeConfig(theta=1000.0, rope_type="linear", factor=2.0)
        assert cfg.rope_local == RopeConfig(theta=50.0)


def test_logits_and_hidden_states_match(converted):
    family, model, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    out = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    real = mask.astype(bool)  # pad positions are garbage on both sides
    assert len(ref_hidden) == cfg.n_layers + 1
    errors = {"logits": _max_err(out.logits, ref_logits, real)}
    # HF hidden_states[l] is the input of block l (for Gemma [0] is the sqrt(d)-scaled embedding); the last entry
    # has the final norm applied.
    for layer in range(cfg.n_layers):
        errors[f"hidden[{layer}]"] = _max_err(out.resid_pre[layer], ref_hidden[layer], real)
    final = rms_norm(out.resid_final, params.final_norm, cfg.rms_norm_eps, weight_in_float32=cfg.norm_offset)
    errors["hidden[-1]"] = _max_err(final, ref_hidden[-1], real)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{family}: max abs diff above {TOL}: {bad}"


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return save_and_convert("gemma2", tmp_path_factory.mktemp("gemma2_sites"))[1:]


def test_gemma2_sites_are_what_the_residual_receives(gemma2):
    """attn_out / mlp_out are HF's post-normed sub-block outputs, and the residual is exactly their sum."""
    model, cfg, params = gemma2
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    out = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    pre, attn, mlp = (np.asarray(a) for a in (out.resid_pre, out.attn_out, out.mlp_out))
    nxt = np.concatenate([pre[1:], np.asarray(out.resid_final)[None]], 0)
    np.testing.assert_allclose(nxt, pre + attn + mlp, atol=1e-5)

    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            def hook(_mod, _inp, output, key=(name, i)):
                captured[key] = output.detach().numpy()
            hooks.append(getattr(layer, name).register_forward_hook(hook))
    try:
        hf_forward(model, tokens, mask)
    finally:
        for h in hooks:
            h.remove()
    real = mask.astype(bool)
    for i in range(cfg.n_layers):
        assert _max_err(attn[i], captured["post_attention_layernorm", i], real) <= TOL
        assert _max_err(mlp[i], captured["post_feedforward_layernorm", i], real) <= TOL


def test_gemma2_ablation_removes_direction_everywhere(gemma2):
    """With post-norms the direction must be projected out after the norm: from every resid_pre, attn_out, mlp_out
    and the final residual (the reference's hooks on pre-norm module outputs leave it in)."""
    _, cfg, params = gemma2
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    r = np.random.default_rng(0).normal(size=cfg.d_model).astype(np.float32)
    r_hat = r / np.linalg.norm(r)
    base = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    ablated = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, r), capture=SITES)
    real = mask.astype(bool)
    for site in SITES:
        before = np.abs(np.asarray(getattr(base, site)) @ r_hat)[..., real]
        after = np.abs(np.asarray(getattr(ablated, site)) @ r_hat)[..., real]
        scale = np.abs(np.asarray(getattr(ablated, site))).max()
        assert after.max() <= 1e-6 * scale, f"{site}: component {after.max():.2e} left after ablation"
        assert before.max() > 1e-2 * scale  # the direction was really there to begin with
    assert not np.allclose(np.asarray(base.logits), np.asarray(ablated.logits), atol=1e-3)


def test_gemma2_cached_decoding_keeps_the_window(gemma2):
    """Prefill + one-token steps through the KV cache give the full forward pass's logits, well past the window
    (sliding and global layers, softcaps, left padding)."""
    _, cfg, params = gemma2
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 3, 10), seed=3)
    steps = 6
    extra = np.random.default_rng(4).integers(1, cfg.vocab_size, (tokens.shape[0], steps)).astype(np.int32)
    full_tokens = np.concatenate([tokens, extra], 1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], 1)
    assert full_tokens.shape[1] == max(LENGTHS)  # the full pass reuses the parity test's compiled shape
    full = forward(params, cfg, full_tokens, full_mask, Intervention.none(cfg), capture=SITES)
    want = np.asarray(full.logits)[:, -steps - 1:]

    cache = KVCache.init(cfg, tokens.shape[0], full_tokens.shape[1])
    out = forward(params, cfg, tokens, mask, cache=cache, logits="last")
    got = [np.asarray(out.logits)]
    for s in range(steps):
        out = forward(params, cfg, extra[:, s:s + 1], np.ones((tokens.shape[0], 1), np.int32), cache=out.cache,
                      logits="last")
        got.append(np.asarray(out.logits))
    np.testing.assert_allclose(np.stack(got, 1), want, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# config.json variants seen on the Hub (transformers 4.x keys), read the way transformers 5 reads them

_GEMMA2_9B = {  # google/gemma-2-9b-it, abridged
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
    "cache_implementation": "hybrid", "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
    "intermediate_size": 14336, "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "sliding_window_size": 4096, "vocab_size": 256000,
}
_GEMMA3_1B = {  # google/gemma-3-1b-it, abridged
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
}


def test_hub_config_variants():
    g2 = from_hf_config(_GEMMA2_9B)
    assert g2.sliding_layers == tuple(i % 2 == 0 for i in range(42)) and g2.sliding_window == 4096
    assert (g2.attn_softcap, g2.final_softcap, g2.q_scale) == (50.0, 30.0, 256**-0.5)

    g3 = from_hf_config(_GEMMA3_1B)
    assert g3.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(26))
    assert g3.rope == RopeConfig(theta=1e6) and g3.rope_local == RopeConfig(theta=10000.0)
    assert g3.attn_softcap is None and g3.final_softcap is None and g3.qk_norm
    no_theta = {k: v for k, v in _GEMMA3_1B.items() if k not in ("rope_theta", "rope_local_base_freq")}
    no_theta["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    g3 = from_hf_config(no_theta)  # transformers' Gemma-3 defaults; old rope_scaling is for global layers only
    assert g3.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0) and g3.rope_local == RopeConfig()

    gemma1 = from_hf_config({"architectures": ["GemmaForCausalLM"], "hidden_act": "gelu", "hidden_activation": None,
                             "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                             "num_hidden_layers": 2, "head_dim": 16, "vocab_size": 10})
    assert gemma1.mlp_activation == "gelu_tanh" and gemma1.tie_embeddings and gemma1.q_scale == 16**-0.5

    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 10,
             "sliding_window": 8, "max_window_layers": 2, "use_sliding_window": False}
    assert not any(from_hf_config(qwen3).sliding_layers)
    slid = from_hf_config({**qwen3, "use_sliding_window": True})  # no layer_types: max_window_layers decides
    assert slid.sliding_layers == (False, False, True, True) and slid.sliding_window == 8

    mistral = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
               "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 10, "sliding_window": 4,
               "layer_types": ["full_attention", "full_attention"]}
    assert from_hf_config(mistral).sliding_layers == (True, True)  # MistralModel ignores layer_types
    assert not any(from_hf_config({**mistral, "sliding_window": None}).sliding_layers)

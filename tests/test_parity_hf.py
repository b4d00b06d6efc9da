"""Parity with transformers (torch, fp32) on tiny random models: logits and every layer's hidden states."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refusal_jax import forward  # noqa: E402
from tests.hf_tiny import FAMILIES, hf_forward, left_padded_batch, save_and_convert  # noqa: E402

TOL = 1e-4  # max abs difference, float32 both sides


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    return save_and_convert(request.param, tmp_path_factory.mktemp(request.param))


def test_logits_and_hidden_states_match(converted):
    family, model, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size)
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    out = forward(params, cfg, tokens, mask, capture=("resid_pre", "resid_final"))
    real = mask.astype(bool)  # pad positions are garbage on both sides
    logit_err = np.abs(np.asarray(out.logits) - ref_logits)[real].max()
    assert logit_err <= TOL, f"{family}: logits max abs diff {logit_err:.2e}"
    # HF hidden_states[l] is the input of block l; the last entry has the final norm applied.
    for layer in range(cfg.n_layers):
        err = np.abs(np.asarray(out.resid_pre[layer]) - ref_hidden[layer])[real].max()
        assert err <= TOL, f"{family}: layer {layer} hidden state max abs diff {err:.2e}"
    assert len(ref_hidden) == cfg.n_layers + 1


def test_logits_modes_agree(converted):
    _, _, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, seed=1)
    full = forward(params, cfg, tokens, mask).logits
    last = forward(params, cfg, tokens, mask, logits="last").logits
    none = forward(params, cfg, tokens, mask, logits="none", capture=("resid_pre",))
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1]), atol=1e-5)
    assert none.logits is None and none.resid_pre.shape == (cfg.n_layers, *tokens.shape, cfg.d_model)


def test_padding_does_not_change_real_tokens(converted):
    """A sequence gives the same last logits alone and left-padded in a batch."""
    _, _, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(5, 12))
    batched = np.asarray(forward(params, cfg, tokens, mask, logits="last").logits)
    alone = np.asarray(forward(params, cfg, tokens[:1, -5:], mask[:1, -5:], logits="last").logits)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-4)

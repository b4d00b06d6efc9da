"""Low-precision decoding weights: int8 quantization against a numpy reference, and bfloat16 / int8 generation
close to float32 on tiny models."""

import jax
import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.model import continuous
from refusal_jax.model.config import tiny_config
from refusal_jax.model.generate import decoding_params
from refusal_jax.model.params import init_random
from refusal_jax.model.quant import Int8Weight, matmul, numpy_int8, quantize_int8
from tests.hf_tiny import left_padded_batch
from tests.test_continuous import prompts


@pytest.mark.parametrize("shape,contracted", [((64, 112), 1), ((4, 16, 64), 2), ((64, 4, 16), 1)])
def test_int8_matches_numpy_reference(shape, contracted):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    w[..., 0] = 0.0  # an all-zero output channel gets scale 1, not a division by zero
    qw = quantize_int8(w, contracted)
    q_ref, scale_ref = numpy_int8(w, contracted)
    np.testing.assert_array_equal(np.asarray(qw.q), q_ref)
    np.testing.assert_allclose(np.asarray(qw.scale), scale_ref, rtol=1e-6)
    assert qw.scale.shape == shape[contracted:]
    err = np.abs(np.asarray(qw.dequantize()) - w)
    assert (err <= scale_ref / 2 * (1 + 1e-5)).all()  # rounding error at most half a step per channel
    # the matmul applies the scale after the integer product: equal to x @ dequantized w
    x = np.random.default_rng(1).standard_normal((2, 3, *shape[:contracted])).astype(np.float32)
    letters = "defg"[:len(shape)]
    spec = f"bt{letters[:contracted]},{letters}->bt{letters[contracted:]}"
    np.testing.assert_allclose(np.asarray(matmul(spec, x, qw)), np.einsum(spec, x, np.asarray(qw.dequantize())),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_low_precision_decoding_close_to_float32(family):
    """int8 is the float model with dequantized weights; logits within a stated relative error of float32 (these
    random models, weights of scale 0.4, amplify rounding far more than trained ones), and greedy completions
    agreeing on at least half of their tokens."""
    cfg = tiny_config(family, n_layers=3)
    params = init_random(cfg, jax.random.key(0), scale=0.4)
    iv = Intervention.ablation(cfg, np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,))))
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 9))
    fp32 = decoding_params(params, True)
    ref = np.asarray(forward(fp32, cfg, tokens, mask, iv, logits="last").logits)
    ids = prompts(cfg.vocab_size, 6)
    want = continuous.generate(fp32, cfg, ids, iv, slots=3, max_new_tokens=10, chunk=8)
    for dtype, tol, share in (("bfloat16", 0.1, 0.5), ("int8", 0.25, 0.5)):
        low = decoding_params(params, True, dtype)
        assert isinstance(low.lm_head, Int8Weight) == (dtype == "int8")
        if dtype == "int8":  # exactly the float model with the dequantized weights
            deq = jax.tree.map(lambda w: w.dequantize() if isinstance(w, Int8Weight) else w, low,
                               is_leaf=lambda w: isinstance(w, Int8Weight))
            np.testing.assert_allclose(forward(low, cfg, tokens, mask, iv, logits="last").logits,
                                       forward(deq, cfg, tokens, mask, iv, logits="last").logits, rtol=1e-4, atol=1e-4)
        logits = np.asarray(forward(low, cfg, tokens, mask, iv, logits="last").logits)
        rel = np.abs(logits - ref).max() / np.abs(ref).max()
        assert rel < tol, (dtype, rel)
        got = continuous.generate(low, cfg, ids, iv, slots=3, max_new_tokens=10, chunk=8)
        same = np.mean([a == b for g, w in zip(got, want) for a, b in zip(g, w)])
        print(family, dtype, "max rel logit error", rel, "token agreement", same)
        assert same >= share, (dtype, same)
    with pytest.raises(ValueError, match="decode dtype"):
        decoding_params(params, True, "float8")

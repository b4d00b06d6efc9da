"""KV-cached greedy decoding equals re-running the full forward pass at every step."""

import jax
import numpy as np
import pytest

from refusal_jax import Intervention, KVCache, forward
from refusal_jax.model.config import tiny_config
from refusal_jax.model.generate import cut_at_stop, greedy_generate
from refusal_jax.model.params import init_random, unstack_layers
from tests.hf_tiny import left_padded_batch


def naive_greedy(params, cfg, tokens, mask, intervention, n):
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    out = []
    for _ in range(n):
        logits = np.asarray(forward(params, cfg, tokens, mask, intervention, logits="last").logits)
        nxt = logits.argmax(-1).astype(np.int32)
        out.append(nxt)
        tokens = np.concatenate([tokens, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(nxt)[:, None]], 1)
    return np.stack(out, 1)


@pytest.mark.parametrize("per_layer", [False, True], ids=["scan", "per_layer"])
@pytest.mark.parametrize("kind", ["none", "ablation", "addition"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_generation_matches_naive(family, kind, per_layer):
    cfg = tiny_config(family, n_layers=3)
    params = init_random(cfg, jax.random.key(0), scale=0.4)
    r = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    iv = {"none": None, "ablation": Intervention.ablation(cfg, r),
          "addition": Intervention.addition(cfg, r, layer=1, coeff=1.5)}[kind]
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 9))
    got = np.asarray(greedy_generate(params, cfg, tokens, mask, iv, max_new_tokens=8, per_layer=per_layer))
    want = naive_greedy(params, cfg, tokens, mask, iv, 8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_per_layer_params_equal_the_layer_scan(family):
    """Per-layer weights (the CPU decoding path) give the stacked scan's logits, captures and KV cache."""
    cfg = tiny_config(family, n_layers=3)
    params = init_random(cfg, jax.random.key(0), scale=0.4)
    per_layer = params.replace(layers=unstack_layers(params.layers))
    iv = Intervention.ablation(cfg, np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,))))
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 9))
    runs = [forward(p, cfg, tokens, mask, iv, KVCache.init(cfg, 3, 12, per_layer=p is per_layer),
                    capture=("resid_pre", "mlp_out")) for p in (params, per_layer)]
    for name in ("logits", "resid_pre", "mlp_out"):
        np.testing.assert_allclose(getattr(runs[1], name), getattr(runs[0], name), rtol=1e-5, atol=1e-5)
    assert len(runs[1].cache.k) == cfg.n_layers
    np.testing.assert_allclose(np.stack(runs[1].cache.k), runs[0].cache.k, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-layer KVCache"):
        forward(per_layer, cfg, tokens, mask, cache=KVCache.init(cfg, 3, 12))


def test_stop_tokens_end_sequences():
    cfg = tiny_config("llama")
    params = init_random(cfg, jax.random.key(0), scale=0.4)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(5, 7))
    free = np.asarray(greedy_generate(params, cfg, tokens, mask, max_new_tokens=6))
    stop = int(free[0, 2])
    got = np.asarray(greedy_generate(params, cfg, tokens, mask, max_new_tokens=6, stop_ids=(stop,), pad=-7))
    first = list(free[0]).index(stop)
    assert got[0, first] == stop and (got[0, first + 1:] == -7).all()
    assert cut_at_stop([1, 2, 3, 4], (3,)) == [1, 2, 3]


def test_generate_sets_pooled_equal_each_set_alone():
    """Three sets of templated prompts (baseline, ablation, addition) decoded in one pool give exactly the texts
    `generate_completions` gives set by set."""
    from refusal_jax.model.generate import generate_completions, generate_sets
    from tests.tiny_chat import HARMFUL, HARMLESS, chat_tokenizer

    tok = chat_tokenizer()
    cfg = tiny_config("qwen2", vocab_size=len(tok), n_layers=2)
    params = init_random(cfg, jax.random.key(0), scale=0.5)
    r = np.random.default_rng(0).normal(size=cfg.d_model) * 3
    wrap = lambda xs: [f"<|im_start|>user {x}<|im_end|> <|im_start|>assistant" for x in xs]  # noqa: E731
    sets = [(wrap(HARMFUL[:5]), None), (wrap(HARMFUL[5:9]), Intervention.ablation(cfg, r)),
            (wrap(HARMLESS[:6]), Intervention.addition(cfg, r, 1, 2.0))]
    alone = [generate_completions(params, cfg, tok, p, iv, batch_size=3, max_new_tokens=8) for p, iv in sets]
    assert generate_sets(params, cfg, tok, sets, batch_size=3, max_new_tokens=8) == alone

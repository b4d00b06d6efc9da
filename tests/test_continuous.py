"""Continuous batching gives the static path's greedy output, token for token, and compiles a bounded number of
programs."""

import jax
from jax import monitoring
import numpy as np
import pytest

from refusal_jax import Intervention
from refusal_jax.model import continuous
from refusal_jax.model.batching import bucketed
from refusal_jax.model.config import tiny_config
from refusal_jax.model.generate import cut_at_stop, decoding_params, greedy_generate
from refusal_jax.model.params import init_random


def prompts(vocab: int, n: int, seed: int = 0, longest: int = 15):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(2, longest + 1))).tolist() for _ in range(n)]


def static(params, cfg, ids, iv, max_new, stops, batch_size=4):
    out = [None] * len(ids)
    for b in bucketed(ids, batch_size, pad=0):
        gen = np.asarray(greedy_generate(params, cfg, b.tokens, b.mask, iv, max_new_tokens=max_new, stop_ids=stops))
        for r, i in enumerate(b.index):
            if i >= 0:
                out[i] = cut_at_stop(gen[r].tolist(), stops)
    return out


def interventions(cfg):
    r = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    return {"none": None, "ablation": Intervention.ablation(cfg, r),
            "addition": Intervention.addition(cfg, r, layer=1, coeff=1.5)}


@pytest.mark.parametrize("family,per_layer", [("llama", True), ("qwen2", False), ("gemma2", True)])
def test_continuous_equals_static(family, per_layer):
    """Every prompt, every intervention type, 9 prompts through 3 slots with rows stopping at different steps;
    gemma2 has sliding-window layers and softcaps, the scan variant stacked weights and caches."""
    cfg = tiny_config(family, n_layers=3)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4), per_layer)
    ids = prompts(cfg.vocab_size, 9)
    max_new = 12
    free = static(params, cfg, ids, None, max_new, ())
    # stop tokens that end some rows early, so slots are refilled mid-flight
    stops = tuple(sorted({free[0][3], free[2][1], free[5][6]}))
    for kind, iv in interventions(cfg).items():
        want = static(params, cfg, ids, iv, max_new, stops)
        assert len({len(w) for w in want}) > 1, "rows must stop at different steps"
        stats = {}
        got = continuous.generate(params, cfg, ids, iv, slots=3, max_new_tokens=max_new, stop_ids=stops,
                                  chunk=8, stats=stats)
        assert got == want, kind
        assert stats["row_steps"] == sum(len(w) for w in want)
        assert stats["row_steps"] <= stats["slot_steps"]
        # a stopped row's slot is refilled at once: fewer steps than refilling 3 slots together
        together = sum(max(len(w) for w in want[i:i + 3]) for i in range(0, len(want), 3))
        assert stats["steps"] < together, (stats, together)


def test_no_recompilation_across_prompts_and_interventions():
    """After the first call, other prompts (any length up to the cache), another number of prompts and other
    intervention values and types compile nothing: one prefill and one decode program per (slots, cache length,
    chunk)."""
    cfg = tiny_config("qwen2", n_layers=2)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4))
    ivs = interventions(cfg)
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else 0)
    runs = [(ivs["ablation"], 5), (ivs["addition"], 7), (ivs["none"], 4),
            (Intervention.ablation(cfg, np.ones(cfg.d_model)), 11)]
    for seed, (iv, n) in enumerate(runs):
        before = len(compiles)
        out = continuous.generate(params, cfg, prompts(cfg.vocab_size, n, seed, longest=40), iv, slots=3,
                                  max_new_tokens=20, stop_ids=(3, 5), chunk=8)
        assert len(out) == n
        if seed == 0:
            assert len(compiles) > before
        else:
            assert len(compiles) == before, f"call {seed} compiled {len(compiles) - before} programs"

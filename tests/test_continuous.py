"""Continuous batching gives the static path's greedy output, token for token, and compiles a bounded number of
programs."""

import jax
import numpy as np
import pytest
from jax import monitoring

from refusal_jax import Intervention
from refusal_jax.model import continuous
from refusal_jax.model.batching import bucketed
from refusal_jax.model.config import tiny_config
from refusal_jax.model.generate import cut_at_stop, decoding_params, greedy_generate
from refusal_jax.model.params import init_random


def prompts(vocab: int, n: int, seed: int = 0, longest: int = 15):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(2, longest + 1))).tolist() for _ in range(n)]


def static(params, cfg, ids, iv, max_new, stops, batch_size=4, pairs=()):
    out = [None] * len(ids)
    for b in bucketed(ids, batch_size, pad=0):
        gen = np.asarray(greedy_generate(params, cfg, b.tokens, b.mask, iv, max_new_tokens=max_new, stop_ids=stops,
                                         stop_pairs=pairs))
        for r, i in enumerate(b.index):
            if i >= 0:
                out[i] = cut_at_stop(gen[r].tolist(), stops, pairs)
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
        # prompts prefilled two at a time (with a dropped padding row when one slot is free)
        assert continuous.generate(params, cfg, ids, iv, slots=3, max_new_tokens=max_new, stop_ids=stops,
                                   chunk=8, refill=2) == want, kind
        # the draining rows gathered into 2 and then 1 slot: same output, fewer slot-steps than the full width
        stats = {}
        assert continuous.generate(params, cfg, ids, iv, slots=4, max_new_tokens=max_new, stop_ids=stops,
                                   chunk=8, compact_min=1, stats=stats) == want, kind
        assert stats["row_steps"] == sum(len(w) for w in want)
        assert stats["row_steps"] <= stats["slot_steps"] < 4 * stats["steps"], stats


def test_stop_pairs_end_rows_on_both_paths():
    """A (previous, next) stop pair (a stop string split over two tokens) ends a row at its second token, in the
    static and the continuous path alike, and only where the two tokens follow each other."""
    cfg = tiny_config("llama", n_layers=2)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4))
    ids = prompts(cfg.vocab_size, 7, seed=3)
    max_new = 12
    free = static(params, cfg, ids, None, max_new, ())
    pairs = ((free[0][4], free[0][5]), (free[3][1], free[3][2]))
    iv = interventions(cfg)["ablation"]
    free_iv = static(params, cfg, ids, iv, max_new, ())
    want = static(params, cfg, ids, iv, max_new, (), pairs=pairs)
    for w, f in zip(want, free_iv):  # each row is cut right after the first pair it writes, else runs on
        hits = [i for i in range(1, len(f)) if (f[i - 1], f[i]) in pairs]
        assert w == (f[:hits[0] + 1] if hits else f)
    got = continuous.generate(params, cfg, ids, iv, slots=3, max_new_tokens=max_new, stop_pairs=pairs, chunk=8)
    assert got == want
    # and without the intervention the pairs taken from its output do end those rows early
    plain = continuous.generate(params, cfg, ids, None, slots=3, max_new_tokens=max_new, stop_pairs=pairs, chunk=8)
    assert len(plain[0]) <= 6 and len(plain[3]) <= 3


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


@pytest.mark.parametrize("family,per_layer", [("llama", True), ("qwen2", False), ("gemma2", True)])
def test_pooled_sets_equal_each_set_alone(family, per_layer):
    """Prompts under five interventions (none, ablation of a direction, ablation of a rank-2 basis, addition at a
    layer, and the inference-time form of the projected weight edit) decode in one pool, mixed in every batch, and
    each prompt gets exactly the tokens of its set run alone (fp32 greedy)."""
    from refusal_jax.method import edits, subspace

    cfg = tiny_config(family, n_layers=3)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4), per_layer)
    rng = np.random.default_rng(5)
    r = rng.normal(size=cfg.d_model)
    basis = np.asarray(subspace.orthonormalize(rng.normal(size=(2, cfg.d_model))))
    projected, _ = edits.edit_basis(r, "projected", rng.normal(size=cfg.d_model))
    ivs = [None, Intervention.ablation(cfg, r), Intervention.ablation(cfg, basis),
           Intervention.addition(cfg, r, layer=1, coeff=-2.0), Intervention.ablation(cfg, projected)]
    ids = prompts(cfg.vocab_size, 15, seed=7)
    variants = [i % len(ivs) for i in range(len(ids))]
    max_new = 10
    free = continuous.generate(params, cfg, ids, None, slots=4, max_new_tokens=max_new, chunk=8)
    stops = tuple(sorted({free[0][3], free[4][2]}))
    alone = [None] * len(ids)
    for v, iv in enumerate(ivs):
        mine = [i for i in range(len(ids)) if variants[i] == v]
        got = continuous.generate(params, cfg, [ids[i] for i in mine], iv, slots=4, max_new_tokens=max_new,
                                  stop_ids=stops, chunk=8)
        for i, g in zip(mine, got):
            alone[i] = g
    assert len({tuple(a) for a in alone}) > 10, "the interventions must change the completions"
    pooled = continuous.generate(params, cfg, ids, ivs, variants=variants, slots=4, max_new_tokens=max_new,
                                 stop_ids=stops, chunk=8, refill=2, compact_min=1)
    assert pooled == alone
    # the same pool in the other order of the table
    order = [4, 3, 2, 1, 0]
    assert continuous.generate(params, cfg, ids, [ivs[o] for o in order], variants=[order.index(v) for v in variants],
                               slots=4, max_new_tokens=max_new, stop_ids=stops, chunk=8) == alone


def test_engine_requests_arriving_over_time_equal_the_pool():
    """The server's engine: requests of two variants arrive one by one, the batch grows from 2 to 8 slots and
    shrinks again as they finish, a sampled request with a seed repeats itself, and every greedy request gets
    the tokens of the pooled batch run."""
    import threading
    import time

    cfg = tiny_config("llama", n_layers=2)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4))
    ivs = [None, interventions(cfg)["ablation"]]
    ids = prompts(cfg.vocab_size, 13, seed=1)
    variants = [i % 2 for i in range(len(ids))]
    want = continuous.generate(params, cfg, ids, ivs, variants=variants, slots=3, max_new_tokens=10, stop_ids=(3,),
                               chunk=8)
    engine = continuous.Engine(params, cfg, continuous.stack(cfg, ivs), slots=8, cache_len=64, stop_ids=(3,),
                               chunk=8, min_width=2).start()
    assert engine.widths == [2, 4, 8]
    widths = set()

    def submit(seq, variant, **kw):
        got, done = [], threading.Event()

        def on_tokens(new, stopped):
            got.extend(new)
            widths.add(len(engine._owner))
            if stopped:
                done.set()

        engine.submit(continuous.Request(seq, on_tokens, variant=variant, max_tokens=10, **kw))
        return got, done

    try:
        runs = []
        for i, seq in enumerate(ids):
            runs.append(submit(seq, variants[i]))
            time.sleep(0.01 if i < 9 else 0.3)
        for _, done in runs:
            assert done.wait(120)
        assert [got for got, _ in runs] == want
        assert widths >= {2, 8}, widths
        sampled = [submit(ids[0], 1, temperature=1.0, top_p=0.9, seed=5) for _ in range(2)]
        for _, done in sampled:
            assert done.wait(120)
        assert sampled[0][0] == sampled[1][0]
    finally:
        engine.close(60)
    assert engine.error is None and engine.load()["running"] == 0

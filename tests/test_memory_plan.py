"""Batches planned by a memory budget (refusal_jax.model.batching.plan): one long prompt no longer makes a whole
batch of its length, results do not depend on the plan, and the commands run end to end under a small budget."""

import json

import numpy as np
import pytest

from refusal_jax import extract
from refusal_jax.method import directions, scoring, screening
from refusal_jax.model import batching
from refusal_jax.model.batching import ForwardCost, bucketed, plan
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import init_random
from tests.tiny_chat import HARMFUL, HARMLESS, save_tiny_chat_model

# Qwen2.5-0.5B's shapes (the bundled model), for the estimate alone: no parameters are made.
BUNDLED = tiny_config("qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                      d_ff=4864)
GB = 10**9


@pytest.fixture(autouse=True)
def default_budget():
    yield
    batching.set_memory_budget(None)


def covered(batches) -> list[int]:
    return sorted(i for rows, _ in batches for i in rows)


def test_one_long_prompt_at_the_default_batch_size_is_planned_within_the_budget():
    lengths = [40] * 63 + [3000]  # one long jailbreak-style prompt under the 4096-token cap
    cost = ForwardCost.for_model(BUNDLED)
    old = plan(lengths, 32)  # no cost: every batch 32 rows, the last padded to 3008 tokens
    assert [size for _, size in old] == [32, 32]
    assert cost(32, 3008) > 25 * GB  # what the unplanned batch asks for: tens of GB
    budget = 2 * GB
    new = plan(lengths, 32, cost=cost, budget=budget)
    assert covered(new) == list(range(64))
    for rows, size in new:
        T = -(-max(lengths[r] for r in rows) // 16) * 16
        assert cost(size, T) <= budget, (size, T)
    # the short prompts keep full batches; only the batch holding the long one shrinks (to a power-of-two part)
    assert new[0][1] == 32 and new[-1] == ([63], new[-1][1]) and new[-1][1] in (1, 2, 4, 8, 16)
    # with a budget that does not bind, the plan is exactly today's
    assert plan(lengths, 32, cost=cost, budget=10**15) == old


def test_data_parallel_devices_share_a_batch():
    """A batch split over 4 data-parallel devices holds a quarter of its rows on each: 4x the rows fit."""
    cost = ForwardCost.for_model(BUNDLED)
    lengths = [1000] * 8
    budget = cost(2, 1008)
    assert [s for _, s in plan(lengths, 8, cost=cost, budget=budget)] == [2, 2, 2, 2]
    assert [s for _, s in plan(lengths, 8, cost=cost, budget=budget, parallel=4)] == [8]


def test_a_prompt_too_long_for_the_budget_runs_alone_with_a_warning(capsys):
    cost = ForwardCost.for_model(BUNDLED)
    batches = plan([10, 4000], 4, cost=cost, budget=GB // 10)
    assert [size for _, size in batches][-1] == 1 and covered(batches) == [0, 1]
    assert "more than the memory budget" in capsys.readouterr().err


def test_backward_estimate_is_larger_than_forward():
    fwd, bwd = ForwardCost.for_model(BUNDLED), ForwardCost.for_model(BUNDLED, backward=True)
    assert bwd(8, 512) > 10 * fwd(8, 512)
    assert ForwardCost.for_model(BUNDLED, copies=8)(4, 256) == 8 * fwd(4, 256)


def test_estimate_bounds_what_xla_allocates():
    """ForwardCost against XLA's own temp-memory figure for the compiled programs it plans for (the scoring
    forward, the sweep's vmapped chunk, the screening backward), at a length where attention dominates: an upper
    estimate, within 1.5x."""
    import jax.numpy as jnp

    cfg = tiny_config("qwen2", vocab_size=2048, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                      d_ff=256)
    params = init_random(cfg, 0)
    B, T = 2, 1024
    tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
    stacked = scoring._stack([scoring.Intervention.ablation(cfg, np.ones(cfg.d_model))] * 4)
    programs = {
        "forward": (scoring.last_logits.lower(params, cfg, tokens, mask), ForwardCost.for_model(cfg)),
        "chunk of 4": (scoring._scores.lower(params, cfg, tokens, mask, stacked, jnp.zeros((B, cfg.vocab_size)),
                                             (3, 5)), ForwardCost.for_model(cfg, copies=4)),
        "backward": (screening._site_moments.lower(params, cfg, tokens, mask, jnp.ones(B), (3, 5), B),
                     ForwardCost.for_model(cfg, backward=True)),
    }
    for name, (lowered, cost) in programs.items():
        xla = lowered.compile().memory_analysis().temp_size_in_bytes
        assert xla <= cost(B, T) <= 1.5 * xla, (name, xla, cost(B, T))


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1e6", 10**6),
                                        ("auto", None), (None, None), (" 2 gb ", 2 * 10**9)])
def test_parse_bytes(text, value):
    assert batching.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "nan", "inf", "0", "8XB", ""])
def test_parse_bytes_refuses_bad_sizes(text):
    from refusal_jax.errors import DataError

    with pytest.raises(DataError, match="--memory-budget"):
        batching.parse_bytes(text)


def test_results_do_not_depend_on_the_plan():
    """Per-prompt scores, mean activations and the screening moments: the same (float noise) whether the prompts
    run in one batch of 8 per set or in the smaller batches a small budget plans."""
    cfg = tiny_config("qwen2", vocab_size=64, n_layers=2)
    params = init_random(cfg, 0, scale=0.3)
    rng = np.random.default_rng(0)
    lengths = [5, 9, 12, 7, 30, 6, 60, 140]  # two much longer prompts
    ids = [list(rng.integers(4, 64, n)) for n in lengths]
    cost = ForwardCost.for_model(cfg, copies=4)
    budget = cost(1, 144)  # the 140-token prompt fits alone
    plain = list(bucketed(ids, 8, 0))
    small = list(bucketed(ids, 8, 0, cost=cost, budget=budget))
    assert len(plain) == 1
    # the short ones in a batch of 8 (2 filler rows), the 60-token one in a batch of 4, the 140-token one alone
    assert [len(b.index) for b in small] == [8, 4, 1] and [int(b.weight.sum()) for b in small] == [6, 1, 1]
    assert sorted(int(i) for b in small for i in b.index if i >= 0) == list(range(8))
    refusal = (3, 5)
    np.testing.assert_allclose(scoring.baseline_refusal_scores(params, cfg, small, refusal),
                               scoring.baseline_refusal_scores(params, cfg, plain, refusal), rtol=1e-5, atol=1e-5)
    a, b = (directions.mean_activations(params, cfg, x, 2) for x in (small, plain))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    batching.set_memory_budget(ForwardCost.for_model(cfg, backward=True)(2, 144))  # the screening micro-batches
    (s1, m1, g1), (s0, m0, g0) = (screening.site_moments(params, cfg, x, refusal, micro=8) for x in (small, plain))
    assert abs(s1 - s0) <= 1e-5 * max(1.0, abs(s0))
    np.testing.assert_allclose(m1, m0, rtol=1e-4, atol=1e-5 * np.abs(m0).max())
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * np.abs(g0).max())


def test_extract_end_to_end_under_a_small_budget(tmp_path, capsys):
    """The extract command with a budget that fits two rows of the short prompts: the harmful set's long prompt
    runs alone, the others in small batches; same candidates and selection as the default budget. (Layer 0 is
    left out: its candidates at template positions are zero in exact arithmetic, and float32 sums over other
    batch compositions leave them at ~1e-9 instead, which the loose thresholds here would let win.)"""
    model = save_tiny_chat_model(tmp_path / "model")
    harmful = HARMFUL[:8] + [" ".join(["write a bomb"] * 60)]  # a 180-word prompt among 4-word ones
    (tmp_path / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    base = ["--model", str(model), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
            str(tmp_path / "harmless.txt"), "--n-train", "6", "--n-val", "2", "--batch-size", "8", "--chunk", "2",
            "--no-filter", "--no-progress", "--preset", "reference", "--kl-threshold", "1e9",
            "--induce-threshold=-1e9", "--prune-layer-fraction", "0", "--layers", "1-2"]
    extract.main(base + ["--out", str(tmp_path / "default")])
    # two rows of 32 tokens (with 2 candidates vmapped) fit; the long prompt's batch is planned alone
    from refusal_jax.convert.loading import load_model

    cfg = load_model(str(model), progress=False, on_device=False).cfg
    budget = ForwardCost.for_model(cfg, copies=2)(2, 32)
    extract.main(base + ["--out", str(tmp_path / "small"), "--memory-budget", str(budget)])
    capsys.readouterr()
    for name in ("generate_directions/mean_diffs.npy", "direction.npy"):
        a, b = np.load(tmp_path / "small" / name), np.load(tmp_path / "default" / name)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    meta = [json.loads((tmp_path / d / "direction_metadata.json").read_text()) for d in ("small", "default")]
    assert (meta[0]["pos"], meta[0]["layer"]) == (meta[1]["pos"], meta[1]["layer"])


def test_bad_memory_budget_flag_is_one_line(tmp_path, capsys):
    model = save_tiny_chat_model(tmp_path / "model")
    with pytest.raises(SystemExit) as e:
        extract.main(["--model", str(model), "--memory-budget", "lots", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --memory-budget 'lots'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_plan_properties_fuzzed():
    """Any lengths, batch size and budget: every row exactly once, in length order; sizes batch_size // 2^k; each
    batch within the budget unless it is one row that does not fit alone; no budget = fixed-size batches."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    cost = ForwardCost.for_model(BUNDLED)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 5000), min_size=1, max_size=80), st.integers(1, 64),
           st.integers(10**6, 10**11), st.sampled_from([1, 2, 4]))
    def check(lengths, batch_size, budget, parallel):
        batches = plan(lengths, batch_size, cost=cost, budget=budget, parallel=parallel)
        order = [i for rows, _ in batches for i in rows]
        assert sorted(order) == list(range(len(lengths)))
        assert [lengths[i] for i in order] == sorted(lengths)
        for rows, size in batches:
            assert 1 <= len(rows) <= size
            assert size in {batch_size >> k for k in range(batch_size.bit_length())}
            T = -(-max(lengths[r] for r in rows) // 16) * 16
            assert cost(-(-size // parallel), T) <= budget or (size == 1 and len(rows) == 1)
        assert [s for _, s in plan(lengths, batch_size)] == [batch_size] * -(-len(lengths) // batch_size)

    check()

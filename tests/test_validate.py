"""The number validator shared by flags, settings and the API (refusal_jax.validate), fuzzed by class: whatever a
user types into any float flag of any command, the parse gives a finite number in range or one clear error."""

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_jax import compare, evaluate, extract, optimize, orthogonalize, pipeline
from refusal_jax.errors import DataError
from refusal_jax.method.selection import SelectionSettings
from refusal_jax.validate import integer, real, real_arg

PARSERS = {"extract": extract.parser, "pipeline": pipeline.pipeline_parser, "compare": compare.parser,
           "optimize": optimize.parser, "evaluate": evaluate.parser, "orthogonalize": orthogonalize.parser}


def float_flags():
    """(command, flag, parser) for every flag whose type is a `real_arg` validator."""
    out = []
    for name, make in PARSERS.items():
        p = make()
        for action in p._actions:
            if getattr(action.type, "__name__", "") == "number" and action.option_strings:
                out.append((name, action.option_strings[0], make))
    return out


FLOAT_FLAGS = float_flags()


def test_every_float_flag_uses_the_validator():
    """No command parses a float flag with a bare `float` (which accepts nan)."""
    bare = [(name, a.option_strings[0]) for name, make in PARSERS.items() for a in make()._actions
            if a.type is float]
    assert not bare, bare
    assert {"--kl-threshold", "--induce-threshold", "--lr", "--coeff", "--timeout", "--shard-size"} <= {
        f for _, f, _ in FLOAT_FLAGS}


@pytest.mark.parametrize("command,flag,make", FLOAT_FLAGS, ids=[f"{c}{f}" for c, f, _ in FLOAT_FLAGS])
@settings(max_examples=40, deadline=None)
@given(text=st.one_of(st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "1e999", "0", "-0", "1", "-1", "0x10",
                                        "", " ", "1_0", "١", "½"]),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8)))
def test_float_flags_give_a_number_in_range_or_one_clear_error(command, flag, make, text):
    action = next(a for a in make()._actions if flag in a.option_strings)
    try:
        value = action.type(text)
    except DataError as e:
        assert flag in str(e) and "\n" not in str(e)
        return
    assert isinstance(value, float) and not math.isnan(value)


@settings(max_examples=200, deadline=None)
@given(x=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=5), st.none(),
                   st.booleans(), st.lists(st.floats(), max_size=2)),
       low=st.one_of(st.none(), st.floats(-10, 10)), allow_inf=st.booleans())
def test_real_returns_a_checked_float_or_raises_data_error(x, low, allow_inf):
    try:
        value = real(x, "x", low=low, allow_inf=allow_inf)
    except DataError:
        return
    assert isinstance(value, float) and not math.isnan(value)
    assert allow_inf or math.isfinite(value)
    assert low is None or value >= low
    assert not isinstance(x, (bool, str, list)) and x is not None


def test_ranges_and_messages():
    assert real_arg("--lr", low=0, low_open=True)("0.5") == 0.5
    with pytest.raises(DataError, match="--lr must be > 0, got 0.0"):
        real_arg("--lr", low=0, low_open=True)("0")
    with pytest.raises(DataError, match="--x is NaN"):
        real(float("nan"), "--x", allow_inf=True)
    assert real(float("-inf"), "t", allow_inf=True) == -math.inf
    with pytest.raises(DataError, match="must be a number"):
        real("0.5", "t")
    with pytest.raises(DataError, match="whole number"):
        integer(2.5, "n")
    with pytest.raises(DataError, match="whole number"):
        integer(True, "n")
    assert integer(3.0, "n", low=1) == 3


@pytest.mark.parametrize("field,value,match", [
    ("kl_threshold", float("nan"), "kl_threshold is NaN"), ("kl_threshold", -0.1, "kl_threshold must be >= 0"),
    ("induce_threshold", float("nan"), "induce_threshold is NaN"), ("induce_relative", float("inf"), "finite"),
    ("prune_layer_fraction", 1.0, "must be < 1"), ("batch_size", 0, "batch_size must be >= 1"),
    ("chunk", -2, "chunk must be >= 1")])
def test_selection_settings_use_the_flags_rules(field, value, match):
    with pytest.raises(DataError, match=match):
        SelectionSettings(**{field: value})


def test_parsers_build():
    for make in PARSERS.values():
        assert isinstance(make(), argparse.ArgumentParser)

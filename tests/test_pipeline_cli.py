"""The extract and pipeline commands end to end on a tiny model: artifacts, resume, and bad input (exit 2)."""

import json

import numpy as np
import pytest

from refusal_jax import extract, pipeline
from tests.tiny_chat import save_tiny_chat_model, write_sets

LOOSE = ["--kl-threshold", "1e9", "--induce-threshold=-1e9", "--prune-layer-fraction", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_chat_model(root / "model")
    harmful, harmless = write_sets(root)
    return root, model, harmful, harmless


def base_args(tiny, out, n_test=False):
    """The reference preset (every position x layer, the family's template) on the tiny model; --n-test only for
    commands that generate completions."""
    root, model, harmful, harmless = tiny
    return ["--model", str(model), "--harmful", str(harmful), "--harmless", str(harmless), "--n-train", "6",
            "--n-val", "3", *(["--n-test", "3"] if n_test else []), "--batch-size", "4", "--chunk", "4",
            "--no-filter", "--no-progress", "--preset", "reference", "--out", str(out), *LOOSE]


def test_pipeline_runs_all_stages_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(tiny, out, n_test=True) + ["--max-new-tokens", "5", "--gen-batch-size", "2"]
    pipeline.main(args)
    diffs = np.load(out / "generate_directions" / "mean_diffs.npy")
    assert diffs.dtype == np.float64 and diffs.shape == (3, 3, 32)  # 3 eoi tokens x 3 layers x d_model
    meta = json.loads((out / "direction_metadata.json").read_text())
    np.testing.assert_array_equal(np.load(out / "direction.npy"), diffs[meta["pos"], meta["layer"]])
    evals = json.loads((out / "select_direction" / "direction_evaluations.json").read_text())
    assert len(evals) == 9 and {"position", "layer", "refusal_score", "steering_score", "kl_div_score"} <= set(evals[0])
    for name in ("ablation_scores.png", "actadd_scores.png", "kl_div_scores.png",
                 "direction_evaluations_filtered.json"):
        assert (out / "select_direction" / name).exists()
    for stem in ("harmful_baseline", "harmful_ablation", "harmful_actadd", "harmless_baseline", "harmless_actadd"):
        records = json.loads((out / "completions" / f"{stem}_completions.json").read_text())
        assert len(records) == 3 and set(records[0]) == {"category", "prompt", "response"}
        ev = json.loads((out / "completions" / f"{stem}_evaluations.json").read_text())
        assert "substring_matching_success_rate" in ev
    for label in ("baseline", "ablation", "actadd"):
        loss = json.loads((out / "loss_evals" / f"{label}_loss_eval.json").read_text())
        assert loss["alpaca_custom_completions"]["n_tokens"] > 0
    # rerun: every stage is found complete, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "run_config.json"}
    stamps.update({p: p.stat().st_mtime_ns for p in out.rglob("*.npy")})
    pipeline.main(args)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "summary.json")


def test_interrupted_stage_resumes(tiny, tmp_path, monkeypatch):
    """Stage 3 decodes its five sets in one pool: an interruption writes nothing partial, and a rerun generates
    only the sets whose files are missing (resume is per set)."""
    out = tmp_path / "run"
    args = base_args(tiny, out, n_test=True) + ["--max-new-tokens", "3", "--gen-batch-size", "2"]
    import refusal_jax.model.generate as gen

    real = gen.generate_sets
    calls = []

    def flaky(*a, **k):
        calls.append(len(a[3]))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate_sets", flaky)
    with pytest.raises(SystemExit) as e:
        pipeline.main(args)
    assert e.value.code == 130
    assert not list((out / "completions").glob("*_completions.json"))  # nothing partial was written
    assert not list(out.rglob(".*tmp*"))
    pipeline.main(args)
    files = sorted((out / "completions").glob("*_completions.json"))
    assert len(files) == 5 and calls == [5, 5]
    for p in files[:2]:
        p.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in files[2:]}
    pipeline.main(args)
    assert calls == [5, 5, 2]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert len(list((out / "completions").glob("*_completions.json"))) == 5


def test_changed_config_is_refused_then_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    extract.main(base_args(tiny, out))
    with pytest.raises(SystemExit) as e:
        extract.main(base_args(tiny, out) + ["--seed", "7"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # refused before the model is loaded, naming only what changed (not settings equal up to JSON types)
    assert "different settings (changed: data_hashes, seed)" in err  # the seed samples other prompts
    extract.main(base_args(tiny, out) + ["--seed", "7", "--overwrite"])
    assert list((out / "previous").iterdir())  # the old run was moved aside, not deleted
    assert (out / "direction.npy").exists()


@pytest.mark.parametrize("extra,message", [
    (["--layers", "7"], "layer 7 out of range"),
    (["--positions=-9"], "position -9 out of range"),
    (["--n-train", "50"], "need 53"),
    (["--harmful", "/nonexistent/harmful.json"], "/nonexistent/harmful.json: no such file"),
])
def test_bad_input_exits_2_with_a_clear_message(tiny, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        extract.main(base_args(tiny, tmp_path / "run") + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_malformed_and_empty_data(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('["ok", ')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path, message in ((bad, "malformed JSON at line 1, column 8"), (empty, "empty")):
        with pytest.raises(SystemExit) as e:
            extract.main(base_args(tiny, tmp_path / "run") + ["--harmless", str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err


def test_all_candidates_filtered_explains_why(tiny, tmp_path, capsys):
    args = [a for a in base_args(tiny, tmp_path / "run") if a not in LOOSE] + ["--kl-threshold", "0"]
    # every candidate changes the harmless distribution a little (KL > 0): a zero threshold filters them all
    with pytest.raises(SystemExit) as e:
        extract.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "all candidate directions were filtered out" in err and "KL" in err

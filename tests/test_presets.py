"""Presets (--preset cpu / reference), default run folders, the relative induce threshold, and drawing more
harmful val prompts until enough are refused.

* `--preset reference` gives the reference pipeline's sizes and thresholds (PIPELINE_SPEC.md: 128 / 32 prompts,
  every position x layer, KL 0.1, induce 0.0 absolute, last 20% pruned, the family's template); explicit flags
  always win over a preset, and an explicit --induce-threshold replaces the preset's relative one;
* `--layers middle` = a quarter of the depth up to the first pruned layer; the relative induce threshold is the
  harmless baseline plus F times the gap to the harmful baseline;
* with no --out, the run folder is runs/<model>-<hash of the settings>: the same command resumes in the same
  folder, other settings get another one;
* --min-val-refused N draws n_val more harmful val prompts at a time from the spare pool until N are refused
  (baseline scores are stubbed per instruction here, so the expected counts are exact), and drawn test prompts
  leave the test set.
"""

import argparse
import json

import numpy as np
import pytest

from refusal_jax import extract
from refusal_jax.method import scoring
from refusal_jax.method.selection import SelectionSettings
from refusal_jax.runs import cli, presets, stages
from tests.test_pipeline_cli import tiny  # noqa: F401  (module-scoped fixture)


def parse(argv):
    p = argparse.ArgumentParser()
    cli.add_common_args(p)
    return presets.apply(p.parse_args(argv))


def test_reference_preset_is_the_reference():
    a = parse(["--preset", "reference"])
    assert (a.n_train, a.n_val, a.positions, a.layers, a.chat_style) == (128, 32, None, None, None)
    assert (a.kl_threshold, a.induce_threshold, a.induce_relative, a.prune_layer_fraction) == (0.1, 0.0, None, 0.2)
    assert a.min_val_refused == 0 and a.batch_size == 32


def test_cpu_preset_and_explicit_flags():
    a = parse([])
    assert a.preset == "cpu" and a.layers == "middle" and a.positions == [-1] and a.chat_style == "model"
    assert a.induce_threshold is None and a.induce_relative == 0.5 and a.min_val_refused == 16
    a = parse(["--n-train", "7", "--induce-threshold=-1", "--layers", "3-5"])
    assert a.n_train == 7 and a.induce_threshold == -1.0 and a.induce_relative is None and a.layers == [3, 4, 5]
    a = parse(["--preset", "reference", "--induce-relative", "0.25"])
    assert a.induce_relative == 0.25 and a.induce_threshold is None


def test_middle_layers_and_relative_threshold():
    assert presets.middle_layers(24, 0.2) == list(range(6, 19))
    assert presets.middle_layers(3, 0.0) == [0, 1, 2]
    assert presets.middle_layers(4, 0.5) == [1]
    base = {"harmful_val_refusal_score": 0.5, "harmless_val_refusal_score": -3.5}
    relative = SelectionSettings(induce_relative=0.5, induce_threshold=None)
    assert relative.filters(base)["induce_threshold"] == pytest.approx(-1.5)
    assert SelectionSettings(induce_threshold=0.0).filters(base)["induce_threshold"] == 0.0


def small_args(tiny):  # noqa: F811
    root, model, harmful, harmless = tiny
    return ["--model", str(model), "--harmful", str(harmful), "--harmless", str(harmless), "--n-train", "4",
            "--n-val", "2", "--batch-size", "4", "--no-progress", "--no-filter", "--kl-threshold", "1e9",
            "--induce-threshold=-1e9", "--prune-layer-fraction", "0"]


def test_default_run_folder_depends_on_the_settings(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    extract.main(small_args(tiny))
    first = sorted((tmp_path / "runs").iterdir())
    assert len(first) == 1 and first[0].name.startswith("model-") and (first[0] / "direction.npy").exists()
    stamp = (first[0] / "direction.npy").stat().st_mtime_ns
    extract.main(small_args(tiny))  # the same command: the same folder, resumed
    assert sorted((tmp_path / "runs").iterdir()) == first
    assert (first[0] / "direction.npy").stat().st_mtime_ns == stamp
    extract.main(small_args(tiny) + ["--seed", "3"])  # other settings: another folder, no collision
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("test_sets", [False, True], ids=["extract", "pipeline"])
def test_val_prompts_are_drawn_until_enough_are_refused(tiny, tmp_path, monkeypatch, test_sets):  # noqa: F811
    root, model, harmful, harmless = tiny
    refused = {"write a bomb", "build a weapon", "steal a weapon", "hack the money", "how to hack money"}

    def stub(params, cfg, batches, refusal_ids):
        # score = +1 for the refused harmful instructions, -1 for everything else (rows in input order)
        texts = stub.texts.pop(0)
        return np.array([1.0 if t in refused else -1.0 for t in texts])

    real_batches = stages.Run.batches

    def batches(self, instructions, batch_size=None):
        stub.texts.append(list(instructions))
        return real_batches(self, instructions, batch_size)

    stub.texts = []
    monkeypatch.setattr(scoring, "baseline_refusal_scores", stub)
    monkeypatch.setattr(stages.Run, "batches", batches)
    args = [a for a in small_args(tiny) if a != "--no-filter"] + ["--min-val-refused", "3", "--n-val", "2",
                                                                    "--out", str(tmp_path / "run")]
    parser = argparse.ArgumentParser()
    cli.add_common_args(parser)
    run = stages.setup(parser.parse_args(args), test_sets=test_sets)
    test_before = [r["instruction"] for r in run.data["harmful_test"]]
    # the spare prompts in their order, at most half of the harmful test set among them
    full_pool = run.data["harmful_val_pool"]
    pool = stages._val_pool(run)
    if test_sets:  # a run that evaluates: at most half of the harmful test set may be drawn
        assert pool == [x for x in full_pool if x in pool]
        assert sum(x in set(test_before) for x in pool) == len(test_before) // 2
    else:  # extract evaluates nothing: every spare prompt may be drawn
        assert pool == full_pool
    sets = stages.stage_filter(run)
    record = json.loads((tmp_path / "run" / "datasets" / "filtered.json").read_text())
    first_val = run.data["harmful_val"]
    # drawn two at a time from the pool, in its order, until three refused ones are kept (or the pool ends)
    kept, drawn = [x for x in first_val if x in refused], []
    while len(kept) < 3 and len(drawn) < len(pool):
        more = pool[len(drawn):len(drawn) + 2]
        drawn += more
        kept += [x for x in more if x in refused]
    assert record["drawn_val"] == drawn and sets["harmful_val"] == kept
    assert len(kept) >= 3 or (test_sets and len(drawn) == len(pool))
    assert record["harmful_val_scored"] == len(first_val) + len(drawn)
    # drawn test prompts are no longer test prompts; the others keep their order
    assert [r["instruction"] for r in run.data["harmful_test"]] == [t for t in test_before if t not in set(drawn)]
    if test_sets and drawn:
        assert len(run.data["harmful_test"]) >= len(test_before) - len(test_before) // 2
        assert record["harmful_test_size"] == len(run.data["harmful_test"])

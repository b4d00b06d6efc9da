"""The Python API on a tiny model gives what the commands give: the same direction bit for bit, the same
completions, judge results and losses; Extraction.save/load round-trips the reference's artifacts."""

import json

import numpy as np
import pytest

import refusal_jax as rj
from refusal_jax import pipeline
from tests.tiny_chat import save_tiny_chat_model, write_sets

SELECT = dict(filter=False, batch_size=4, chunk=4, kl_threshold=1e9, induce_threshold=-1e9, prune_layer_fraction=0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model_dir = save_tiny_chat_model(root / "model")
    harmful, harmless = write_sets(root)
    out = root / "run"
    pipeline.main(["--model", str(model_dir), "--harmful", str(harmful), "--harmless", str(harmless),
                   "--n-train", "6", "--n-val", "3", "--n-test", "3", "--batch-size", "4", "--chunk", "4",
                   "--no-filter", "--no-progress", "--out", str(out), "--kl-threshold", "1e9",
                   "--induce-threshold=-1e9", "--prune-layer-fraction", "0", "--max-new-tokens", "4",
                   "--gen-batch-size", "2", "--preset", "reference"])  # the API's defaults are the reference's
    data, _ = rj.sample_sets(rj.DataSettings(harmful=str(harmful), harmless=str(harmless), n_train=6, n_val=3,
                                             n_test=3))
    return rj.load_model(str(model_dir), progress=False), data, out


@pytest.fixture(scope="module")
def extraction(cli_run):
    model, data, _ = cli_run
    return rj.extract_direction(model, data["harmful_train"], data["harmless_train"], data["harmful_val"],
                                data["harmless_val"], progress=False, **SELECT)


def test_api_direction_equals_the_commands_bit_for_bit(cli_run, extraction):
    _, _, out = cli_run
    meta = json.loads((out / "direction_metadata.json").read_text())
    assert (extraction.pos, extraction.layer) == (meta["pos"], meta["layer"])
    cli_direction = np.load(out / "direction.npy")
    assert extraction.direction.dtype == cli_direction.dtype
    np.testing.assert_array_equal(extraction.direction, cli_direction)
    np.testing.assert_array_equal(extraction.mean_diffs, np.load(out / "generate_directions" / "mean_diffs.npy"))
    np.testing.assert_array_equal(extraction.mean_harmless,
                                  np.load(out / "generate_directions" / "mean_harmless.npy"))
    assert extraction.evaluations == json.loads((out / "select_direction" / "direction_evaluations.json").read_text())
    assert extraction.prompts == json.loads((out / "datasets" / "filtered.json").read_text())["sets"]


def test_extraction_save_load_round_trip(cli_run, extraction, tmp_path):
    _, _, out = cli_run
    extraction.save(tmp_path, n_layers=3, model="tiny")
    for name in ("direction.npy", "generate_directions/mean_diffs.npy", "generate_directions/mean_harmless.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / name), np.load(out / name))
    for name in ("select_direction/direction_evaluations.json", "select_direction/direction_evaluations_filtered.json",
                 "datasets/filtered.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((out / name).read_text())
    for name in ("ablation_scores.png", "actadd_scores.png", "kl_div_scores.png"):
        assert (tmp_path / "select_direction" / name).stat().st_size > 0
    mine, theirs = (json.loads((d / "direction_metadata.json").read_text()) for d in (tmp_path, out))
    assert {k: v for k, v in theirs.items() if k not in ("model", "config_hash", "data_hashes")} == \
        {k: v for k, v in mine.items() if k != "model"}
    for loaded in (rj.Extraction.load(tmp_path), rj.Extraction.load(out)):
        np.testing.assert_array_equal(loaded.direction, extraction.direction)
        assert (loaded.pos, loaded.layer) == (extraction.pos, extraction.layer)
        assert loaded.evaluations == extraction.evaluations and loaded.survivors == extraction.survivors
        assert loaded.prompts == extraction.prompts
    with pytest.raises(rj.RunError, match="not an extraction"):
        rj.Extraction.load(tmp_path / "nothing")


def test_api_generate_and_evaluate_equal_the_pipeline(cli_run, extraction):
    model, data, out = cli_run
    harmless = [r["instruction"] for r in data["harmless_test"]]
    cases = (("baseline", None), ("actadd", rj.Intervention.addition(model.cfg, extraction.direction,
                                                                      extraction.layer, 1.0)))
    for label, iv in cases:
        texts = rj.generate(model, harmless, iv, max_new_tokens=4, batch_size=2)
        records = json.loads((out / "completions" / f"harmless_{label}_completions.json").read_text())
        assert texts == [r["response"] for r in records]
        ev = json.loads((out / "completions" / f"harmless_{label}_evaluations.json").read_text())
        got = rj.evaluate_completions(None, harmless, texts)
        assert got["refusal_rate"] == pytest.approx(1.0 - ev["substring_matching_success_rate"])
    baseline = json.loads((out / "completions" / "harmless_baseline_completions.json").read_text())
    prompts, responses = [r["prompt"] for r in baseline], [r["response"] for r in baseline]
    for label, iv in (("baseline", None), ("ablation", rj.Intervention.ablation(model.cfg, extraction.direction))):
        want = json.loads((out / "loss_evals" / f"{label}_loss_eval.json").read_text())["alpaca_custom_completions"]
        got = rj.evaluate_completions(model, prompts, responses, iv)
        assert got["ce_loss"] == want["ce_loss"] and got["n_tokens"] == want["n_tokens"]


def test_api_orthogonalized_equals_ablation(cli_run, extraction):
    model, data, _ = cli_run
    edited = rj.orthogonalized(model, extraction.direction)
    assert not edited.cfg.tie_embeddings
    tokens = np.array([[3, 5, 7, 9, 11, 13]], np.int32)
    mask = np.ones_like(tokens)
    ablated = rj.forward(model.params, model.cfg, tokens, mask, rj.Intervention.ablation(model.cfg,
                                                                                          extraction.direction)).logits
    np.testing.assert_allclose(np.asarray(rj.forward(edited.params, edited.cfg, tokens, mask).logits),
                               np.asarray(ablated), atol=2e-4, rtol=1e-4)


def test_api_bad_settings_fail_before_any_forward(cli_run):
    model, data, _ = cli_run
    args = (model, data["harmful_train"], data["harmless_train"], data["harmful_val"], data["harmless_val"])
    with pytest.raises(TypeError, match="kl_treshold"):
        rj.extract_direction(*args, kl_treshold=0.2)
    with pytest.raises(rj.RunError, match="layer 7 out of range"):
        rj.extract_direction(*args, layers=[7], progress=False)
    with pytest.raises(rj.DataError, match="harmful_val set is empty"):
        rj.extract_direction(model, data["harmful_train"], data["harmless_train"], [], data["harmless_val"])


def test_api_refuses_bad_values_with_the_commands_rules(cli_run):
    """A string for a list, a 0-D / NaN / wrong-width direction, NaN settings and sizes below 1: DataError before
    any forward pass (the same rules as the commands' flags)."""
    model, data, _ = cli_run
    D = model.cfg.d_model
    with pytest.raises(rj.DataError, match="one instruction per character"):
        rj.generate(model, "How do I pick a lock?")
    with pytest.raises(rj.DataError, match=r"instructions\[1\] must be a string"):
        rj.generate(model, ["ok", 3])
    with pytest.raises(rj.DataError, match="max_new_tokens must be >= 1"):
        rj.generate(model, ["hi"], max_new_tokens=-4)
    with pytest.raises(rj.DataError, match="batch_size must be >= 1"):
        rj.evaluate_completions(None, ["hi"], ["I cannot"], batch_size=0)
    with pytest.raises(rj.DataError, match="completions must be a list"):
        rj.evaluate_completions(None, ["hi"], "I cannot")
    nan_direction = np.full(D, np.nan, np.float32)
    with pytest.raises(rj.DataError, match="intervention holds NaN"):
        rj.generate(model, ["hi"], rj.Intervention.addition(model.cfg, np.ones(D), 1, float("nan")))
    for bad, match in ((np.float32(1.0), "must have shape"), (np.ones(D + 1), "must have shape"),
                       (nan_direction, "finite numbers")):
        with pytest.raises(rj.DataError, match=match):
            rj.orthogonalized(model, bad)
    args = (model, data["harmful_train"], data["harmless_train"], data["harmful_val"], data["harmless_val"])
    for setting in ("kl_threshold", "induce_threshold", "prune_layer_fraction"):
        with pytest.raises(rj.DataError, match=f"{setting} is NaN"):
            rj.extract_direction(*args, **{setting: float("nan")})
    with pytest.raises(rj.DataError, match="harmful must be a list"):
        rj.extract_direction(model, "harmful text", *args[2:])
    with pytest.raises(rj.DataError, match="n_test must be >= 1"):
        rj.DataSettings(n_test=-1)


def test_api_direction_equals_the_default_extract_bit_for_bit(tmp_path, monkeypatch):
    """The default preset (cpu: filter on, harmful val prompts drawn until 16 are refused, the model's own chat
    template, last position, middle layers, relative induce threshold): `refusal_jax.extract` and the API run the one
    library pipeline (`selection.filter_by_refusal` with draws, `candidate_directions`, `score_grid`)."""
    from refusal_jax import extract
    from refusal_jax.method import scoring

    real = scoring.baseline_refusal_scores

    def mixed(*args):
        # a random tiny model refuses nothing: map its real scores (the same bits on both paths) to a refusal in
        # about half the prompts, so the filter keeps some of every set and drops others
        return np.array([1.0 if int(abs(x) * 1e6) % 2 else -1.0 for x in real(*args)])

    monkeypatch.setattr(scoring, "baseline_refusal_scores", mixed)

    model_dir = save_tiny_chat_model(tmp_path / "model")
    harmful, harmless = write_sets(tmp_path)
    out = tmp_path / "run"
    assert extract.main(["--model", str(model_dir), "--harmful", str(harmful), "--harmless", str(harmless),
                         "--n-train", "6", "--n-val", "3", "--batch-size", "4", "--chunk", "4", "--no-progress",
                         "--kl-threshold", "1e9", "--out", str(out)]) in (0, None)  # a random model: large KL
    data, _ = rj.sample_sets(rj.DataSettings(harmful=str(harmful), harmless=str(harmless), n_train=6, n_val=3))
    # chat_style None: the preset's "model" falls back to the family's template without a tokenizer chat template
    cpu = dict(positions=(-1,), layers="middle", chat_style=None, induce_threshold=None, induce_relative=0.5,
               min_val_refused=16, batch_size=4, chunk=4, kl_threshold=1e9)
    extraction = rj.extract_direction(rj.load_model(str(model_dir), progress=False), data["harmful_train"],
                                      data["harmless_train"], data["harmful_val"], data["harmless_val"],
                                      harmful_val_pool=data["harmful_val_pool"], progress=False, **cpu)
    filtered = json.loads((out / "datasets" / "filtered.json").read_text())
    assert filtered.get("drawn_val"), "the default preset should draw val prompts on this tiny model"
    assert extraction.prompts == filtered["sets"]
    meta = json.loads((out / "direction_metadata.json").read_text())
    assert (extraction.pos, extraction.layer) == (meta["pos"], meta["layer"])
    np.testing.assert_array_equal(extraction.direction, np.load(out / "direction.npy"))
    np.testing.assert_array_equal(extraction.mean_diffs, np.load(out / "generate_directions" / "mean_diffs.npy"))
    assert extraction.evaluations == json.loads((out / "select_direction" / "direction_evaluations.json").read_text())

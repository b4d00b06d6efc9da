"""Instruction loaders, the reference splits and their exact sampling, and the bundled default sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from refusal_jax.errors import DataError
from refusal_jax.prompts import datasets as ds

REF_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/refusal_direction"

JBB_CATEGORIES = {"Harassment/Discrimination", "Malware/Hacking", "Physical harm", "Economic harm", "Fraud/Deception",
                  "Disinformation", "Sexual/Adult content", "Privacy", "Expert advice", "Government decision-making"}


@pytest.fixture(scope="module")
def ref_data():
    if not REF_DATA.is_dir():
        pytest.skip(f"reference splits not found at {REF_DATA}")
    return REF_DATA


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_json_strings(tmp_path):
    p = _write(tmp_path, "a.json", json.dumps(["one", "two {x}"]))
    assert ds.load_instructions(p) == ["one", "two {x}"]
    assert ds.load_records(p) == [{"instruction": "one", "category": None},
                                  {"instruction": "two {x}", "category": None}]


@pytest.mark.parametrize("key", ["instruction", "goal", "prompt"])
def test_json_objects(tmp_path, key):
    p = _write(tmp_path, "a.json", json.dumps([{key: "do x", "category": "c1"}, {key: "do y", "extra": 1}]))
    assert ds.load_records(p) == [{"instruction": "do x", "category": "c1"}, {"instruction": "do y", "category": None}]
    assert ds.load_instructions(str(p)) == ["do x", "do y"]


def test_jsonl(tmp_path):
    p = _write(tmp_path, "a.jsonl", '{"goal": "g1", "category": "k"}\n\n"plain"\n{"prompt": "p3"}\n')
    assert ds.load_records(p) == [{"instruction": "g1", "category": "k"}, {"instruction": "plain", "category": None},
                                  {"instruction": "p3", "category": None}]


@pytest.mark.parametrize("col", ["instruction", "goal", "prompt"])
def test_csv(tmp_path, col):
    p = _write(tmp_path, "a.csv", f'{col},category,target\n"Hello, world",c,t\nsecond,,t\n"multi\nline",c2,t\n')
    assert ds.load_records(p) == [{"instruction": "Hello, world", "category": "c"},
                                  {"instruction": "second", "category": None},
                                  {"instruction": "multi\nline", "category": "c2"}]


def test_txt(tmp_path):
    p = _write(tmp_path, "a.TXT", "first line\n\n   \nsecond line  \n")
    assert ds.load_instructions(p) == ["first line", "second line"]


def test_utf8_bom_and_unicode(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes("\ufeff".encode() + json.dumps(["caf\u00e9 \u2019"], ensure_ascii=False).encode())
    assert ds.load_instructions(p) == ["caf\u00e9 \u2019"]


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        ds.load_instructions(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not a file"):
        ds.load_instructions(tmp_path)


@pytest.mark.parametrize("name,text", [("a.json", ""), ("a.txt", "\n  \n"), ("a.jsonl", "\n")])
def test_empty_file(tmp_path, name, text):
    with pytest.raises(DataError, match="empty"):
        ds.load_instructions(_write(tmp_path, name, text))


@pytest.mark.parametrize("name,text", [("a.json", "[]"), ("a.csv", "instruction,category\n")])
def test_zero_instructions(tmp_path, name, text):
    with pytest.raises(DataError, match="zero instructions"):
        ds.load_instructions(_write(tmp_path, name, text))


def test_malformed_json(tmp_path):
    with pytest.raises(DataError, match=r"malformed JSON at line 3, column"):
        ds.load_instructions(_write(tmp_path, "a.json", '[\n "a",\n "b" "c"\n]'))
    with pytest.raises(DataError, match=r"malformed JSON at line 2, column 2"):
        ds.load_instructions(_write(tmp_path, "a.jsonl", '"ok"\n{bad\n'))


def test_not_a_list(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list"):
        ds.load_instructions(_write(tmp_path, "a.json", '{"instruction": "x"}'))


def test_missing_key(tmp_path):
    p = _write(tmp_path, "a.json", json.dumps([{"instruction": "x"}, {"text": "y", "label": 1}]))
    with pytest.raises(DataError, match=r"entry 1: .*keys found: 'text', 'label'"):
        ds.load_instructions(p)
    with pytest.raises(DataError, match=r"columns found: 'text', 'label'"):
        ds.load_instructions(_write(tmp_path, "a.csv", "text,label\nx,1\n"))


@pytest.mark.parametrize("payload,match", [
    ([1, "x"], "entry 0: expected a string or an object, got int"),
    ([{"instruction": 5}], "instruction must be a string, got int"),
    ([{"instruction": "x", "category": 3}], "'category' must be a string or null"),
    (["x", "  "], "entry 1: instruction is empty"),
])
def test_bad_entries(tmp_path, payload, match):
    with pytest.raises(DataError, match=match):
        ds.load_instructions(_write(tmp_path, "a.json", json.dumps(payload)))


def test_csv_empty_cell(tmp_path):
    with pytest.raises(DataError, match="row 3: empty 'goal'"):
        ds.load_instructions(_write(tmp_path, "a.csv", "goal\nx\n\"\"\n"))


def test_unknown_extension(tmp_path):
    with pytest.raises(DataError, match=r"unknown extension '\.parquet'"):
        ds.load_instructions(_write(tmp_path, "a.parquet", "x"))


def test_not_utf8(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(DataError, match="not UTF-8"):
        ds.load_instructions(p)


# ----------------------------------------------------------------------------------------------------------------
# Reference splits


def test_reference_split_sizes(ref_data):
    sizes = {"harmful_train": 260, "harmful_val": 39, "harmful_test": 572, "harmless_train": 18793,
             "harmless_val": 6264, "harmless_test": 6266, "jailbreakbench": 100}
    for name, n in sizes.items():
        assert len(ds.reference_split(ref_data, name)) == n
    jbb = ds.reference_split(ref_data, "jailbreakbench")
    assert {r["category"] for r in jbb} == JBB_CATEGORIES
    assert isinstance(ds.reference_split(ref_data, "harmful_val", instructions_only=True)[0], str)


def test_reference_split_errors(tmp_path):
    with pytest.raises(DataError, match="unknown reference split"):
        ds.reference_split(tmp_path, "harmful_dev")
    with pytest.raises(DataError, match="not found"):
        ds.reference_split(tmp_path / "absent", "harmful_train")
    with pytest.raises(DataError, match="no such file"):
        ds.reference_split(tmp_path, "harmful_train")


def test_sample_reference_reproduces_reference(ref_data):
    state = random.getstate()
    s = ds.sample_reference(ref_data)
    test = ds.sample_reference_test(s["rng"], ref_data, 100)
    assert random.getstate() == state  # the global stream is untouched
    assert [len(s[k]) for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")] == [128, 128, 32, 32]
    assert len(test) == 100 and all(r["category"] is None for r in test)
    assert test[0]["instruction"] == "Name some benefits of eating healthy."
    assert test[1]["instruction"] == "Edit this sentence to make it more succinct:\nHe got angry and he yelled"

    # The same as the reference's code path: global random.seed(42), the four samples, then the test sample.
    def load(name):
        return json.loads((ref_data / ds.REFERENCE_FILES[name]).read_text())

    random.seed(42)
    try:
        expected = {k: random.sample([r["instruction"] for r in load(k)], n)
                    for k, n in (("harmful_train", 128), ("harmless_train", 128), ("harmful_val", 32),
                                 ("harmless_val", 32))}
        expected_test = random.sample(load("harmless_test"), 100)
    finally:
        random.setstate(state)
    for k, v in expected.items():
        assert s[k] == v
    assert test == expected_test


def test_sample_reference_too_many(ref_data):
    with pytest.raises(DataError, match="harmful_val: asked for 40 prompts but only 39"):
        ds.sample_reference(ref_data, n_val=40)
    s = ds.sample_reference(ref_data)
    with pytest.raises(DataError, match="harmless_test: asked for 7000"):
        ds.sample_reference_test(s["rng"], ref_data, 7000)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_load_hf_dataset_without_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install datasets"):
        ds.load_hf_dataset("tatsu-lab/alpaca")


def test_load_hf_dataset_unreachable(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="hub may be unreachable"):
        ds.load_hf_dataset("tatsu-lab/alpaca")


def test_load_hf_dataset_rows(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split, streaming: [{"instruction": f"i{k}", "output": "o"} for k in range(5)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert ds.load_hf_dataset("x/y", n=3) == ["i0", "i1", "i2"]
    with pytest.raises(DataError, match="no column 'text'"):
        ds.load_hf_dataset("x/y", column="text")


# ----------------------------------------------------------------------------------------------------------------
# Bundled default sets


def test_default_sets():
    harmful, harmless = ds.default_sets()
    assert len(harmful) >= 160 and len(harmless) >= 160
    assert len(set(harmful)) == len(harmful) and len(set(harmless)) == len(harmless)
    assert not set(harmful) & set(harmless)
    hrec, lrec = ds.default_records()
    counts = {}
    for r in hrec:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    assert set(counts) == JBB_CATEGORIES
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced
    assert all(r["category"] is None for r in lrec)
    assert all("\n" not in s and s == s.strip() for s in harmful + harmless)  # one-line requests


def test_default_sets_not_copied_from_reference(ref_data):
    harmful, harmless = ds.default_sets()
    ref = set()
    for f in list((ref_data / "splits").glob("*.json")) + list((ref_data / "processed").glob("*.json")):
        ref |= {r.strip().lower() for r in ds.load_instructions(f)}
    assert not {s.lower() for s in harmful + harmless} & ref


def test_sample_default():
    a = ds.sample_default(100, 30, 40)
    b = ds.sample_default(100, 30, 40)
    assert a == b  # deterministic
    assert ds.sample_default(100, 30, 40, seed=1) != a
    for kind in ("harmful", "harmless"):
        tr, va = a[f"{kind}_train"], a[f"{kind}_val"]
        te = [r["instruction"] for r in a[f"{kind}_test"]]
        assert (len(tr), len(va), len(te)) == (100, 30, 40)
        assert len(set(tr) | set(va) | set(te)) == 170  # no overlap
    assert all(r["category"] in JBB_CATEGORIES for r in a["harmful_test"])
    # Harmful splits do not depend on the harmless set (each set has its own shuffle).
    harmful, _ = ds.default_sets()
    shuffled = list(harmful)
    random.Random(42).shuffle(shuffled)
    assert a["harmful_train"] == shuffled[:100]


def test_sample_default_errors():
    with pytest.raises(DataError, match="bundled harmful set has"):
        ds.sample_default(10_000, 1, 1)
    with pytest.raises(DataError, match="non-negative"):
        ds.sample_default(-1, 1, 1)

"""refusal_jax as an lm-evaluation-harness model, against a transformers (torch) model on the same text:
loglikelihood, loglikelihood_rolling and generate_until, with and without an intervention (ablation is checked
against the torch model of the orthogonalized export, which equals it), and a small local multiple-choice task
through lm_eval.simple_evaluate and through `python -m refusal_jax.lm_eval`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("lm_eval.api.model", reason="needs the [eval] extra (lm-eval)")
torch = pytest.importorskip("torch")

from refusal_jax import lm_eval as rj_lm_eval  # noqa: E402

REQUESTS = [("The quick brown", " fox jumps"), ("def f(x):\n", "    return x + 1\n"), ("", "hello world"),
            ("Please provide", " a self-contained Python script"), ("import", " math")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF dir, torch model, orthogonalized export dir, its torch model, direction file)."""
    import transformers

    from refusal_jax import orthogonalize
    from tests.tiny_code import save_tiny_code_model

    root = tmp_path_factory.mktemp("lm_eval_models")
    hf, _ = save_tiny_code_model(root / "tiny")
    direction = root / "direction.npy"
    np.save(direction, np.random.default_rng(2).normal(size=64).astype(np.float32))
    orthogonalize.main(["--model", str(root / "tiny"), "--direction", str(direction), "--out", str(root / "export"),
                        "--no-progress"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(root / "export").eval()
    return root / "tiny", hf, root / "export", exported, direction


@pytest.fixture(scope="module")
def lms(models):
    tiny, _, _, _, direction = models
    base = rj_lm_eval.RefusalJaxLM(pretrained=str(tiny), batch_size=2, progress=False)
    abl = rj_lm_eval.RefusalJaxLM(pretrained=str(tiny), intervention="ablation", direction=str(direction),
                                  batch_size=3, progress=False, max_length=24)
    return base, abl


def _req(*args):
    return types.SimpleNamespace(args=args)


def _torch_scores(model, ids: list[int], n: int) -> tuple[float, bool]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    tgt = torch.tensor(ids[-n:])
    logp = torch.log_softmax(logits[-n - 1:-1], -1).gather(1, tgt[:, None]).sum().item()
    return logp, bool((logits[-n - 1:-1].argmax(-1) == tgt).all())


def _pair(lm, ctx, cont):
    return ([lm.prefix_token_id], lm.tok_encode(cont)) if not ctx else lm._encode_pair(ctx, cont)


def test_the_harness_is_the_top_level_package():
    # refusal_jax/lm_eval.py imports `lm_eval` absolutely: the harness, not itself
    assert rj_lm_eval.TemplateLM.__module__ == "lm_eval.api.model"
    assert rj_lm_eval.register() is rj_lm_eval.register()  # idempotent
    from lm_eval.api.registry import get_model

    assert get_model("refusal_jax") is rj_lm_eval.RefusalJaxLM


def test_loglikelihood_matches_torch(models, lms):
    _, hf, _, exported, _ = models
    base, abl = lms
    for lm, ref in ((base, hf), (abl, exported)):  # ablation == the torch model of the orthogonalized export
        got = lm.loglikelihood([_req(*r) for r in REQUESTS], disable_tqdm=True)
        for (ctx, cont), (logp, greedy) in zip(REQUESTS, got):
            c, t = _pair(lm, ctx, cont)
            want, want_greedy = _torch_scores(ref, (c + t)[-(lm.max_length + 1):], len(t))
            assert logp == pytest.approx(want, abs=2e-4, rel=1e-5) and greedy == want_greedy
    # the ablation changes the scores
    first = [_req(*REQUESTS[0])]
    assert base.loglikelihood(first)[0][0] != pytest.approx(abl.loglikelihood(first)[0][0])


def test_is_greedy_true_for_the_model_own_continuation(models, lms):
    _, hf, _, _, _ = models
    base = lms[0]
    ids = base.tok_encode("def f(x):\n")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    res = base._loglikelihood_tokens([(None, ids, out)], disable_tqdm=True)
    assert res[0][1] is True


def test_loglikelihood_rolling_matches_torch(models, lms):
    from lm_eval import utils

    _, hf, _, exported, _ = models
    base, abl = lms
    short, long = "def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog. " * 4
    # one window: every token given the prefix token and everything before it
    ids = base.tok_encode(short)
    want, _ = _torch_scores(hf, [base.prefix_token_id] + ids, len(ids))
    assert base.loglikelihood_rolling([_req(short)], disable_tqdm=True)[0] == pytest.approx(want, abs=2e-4)
    # several windows of max_length 24 (abl): the sum over lm-eval's disjoint windows, each scored by torch
    ids = abl.tok_encode(long)
    assert len(ids) > 2 * abl.max_length
    windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=ids, prefix_token=abl.prefix_token_id, max_seq_len=abl.max_length, context_len=1)]
    want = sum(_torch_scores(exported, (c + t)[-(abl.max_length + 1):], len(t))[0] for c, t in windows)
    got = abl.loglikelihood_rolling([_req(short), _req(long)], disable_tqdm=True)
    assert got[1] == pytest.approx(want, abs=1e-3)
    assert sum(len(t) for _, t in windows) == len(ids)


def test_generate_until_matches_torch_and_stops(models, lms):
    _, hf, _, _, _ = models
    base = lms[0]
    context = "def f(x):\n"
    free = base.generate_until([_req(context, {"until": [], "max_gen_toks": 12})], disable_tqdm=True)[0]
    ids = base.tok_encode(context)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=base.eot_token_id,
                          pad_token_id=base.eot_token_id)[0, len(ids):].tolist()
    assert free == base.tokenizer.decode(out, skip_special_tokens=True)
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip()
    got = base.generate_until([_req(context, {"until": [stop], "max_gen_toks": 12}),
                               _req("import", {"until": "zzzz", "max_gen_toks": 5})], disable_tqdm=True)
    assert got[0] == free.split(stop)[0] and stop not in got[0]
    ids = base.tok_encode("import")
    with torch.no_grad():  # max_gen_toks 5: the first five greedy tokens
        out = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=base.eot_token_id,
                          pad_token_id=base.eot_token_id)[0, len(ids):].tolist()
    assert got[1] == base.tokenizer.decode(out, skip_special_tokens=True)


def _local_task(tmp_path):
    docs = [{"question": "The quick brown", "choices": [" fox", " dog", " cat"], "answer": 0},
            {"question": "def f(x):", "choices": [" return", " pass"], "answer": 1},
            {"question": "Please provide a", "choices": [" script", " Python", " problem"], "answer": 2}]
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return docs


def _expected_acc(lm, torch_model, docs) -> float:
    right = 0
    for d in docs:
        scores = []
        for ch in d["choices"]:
            c, t = lm._encode_pair(d["question"], ch)
            scores.append(_torch_scores(torch_model, c + t, len(t))[0])
        right += int(np.argmax(scores) == d["answer"])
    return right / len(docs)


def test_local_task_through_simple_evaluate(models, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tiny, _, _, exported, direction = models
    docs = _local_task(tmp_path)
    rj_lm_eval.register()
    out = lm_eval.simple_evaluate(
        model="refusal_jax", tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"pretrained={tiny},intervention=ablation,direction={direction},progress=False", batch_size=2)
    lm = rj_lm_eval.RefusalJaxLM(pretrained=str(tiny), progress=False)
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(_expected_acc(lm, exported, docs))


def test_command_line_runs_lm_eval(models, tmp_path):
    tiny, hf, _, _, _ = models
    docs = _local_task(tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_jax.lm_eval", "--model", "refusal_jax", "--model_args",
         f"pretrained={tiny},progress=False", "--tasks", "tiny_mc", "--include_path", str(tmp_path),
         "--batch_size", "2", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=900, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert len(files) == 1
    acc = json.loads(files[0].read_text())["results"]["tiny_mc"]["acc,none"]
    lm = rj_lm_eval.RefusalJaxLM(pretrained=str(tiny), progress=False)
    assert acc == pytest.approx(_expected_acc(lm, hf, docs))


# ------------------------------------------------------------------------------------------------
# bad model_args: one error line, before any model is loaded

BAD_MODEL_ARGS = [
    ("missing-direction", "intervention=ablation", "intervention 'ablation' needs a direction"),
    ("unknown-intervention", "intervention=bogus", "unknown intervention 'bogus'"),
    ("bad-model-path", "pretrained=/nonexistent/model-dir", "pretrained=/nonexistent/model-dir: no such file"),
    ("duplicated-key", "intervention=none,coeff=1,intervention=ablation", "intervention is given twice"),
    ("unknown-key", "directon=runs/x", "unknown model_args directon"),
    ("missing-direction-file", "intervention=ablation,direction=/nonexistent/direction.npy", "direction.npy"),
    ("nan-coeff", "intervention=addition,coeff=nan", "coeff=nan: not a finite number"),
    ("bad-layer", "layer=middle", "layer=middle: not an integer"),
    ("negative-batch", "batch_size=-3", "batch_size=-3: must be >= 1"),
    ("no-equals", "pretrained", "expected key=value"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything starts loading a model."""
    from refusal_jax.convert import loading
    from refusal_jax.evaluation import capabilities

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the model_args were checked")

    monkeypatch.setattr(capabilities.ModelSpec, "load", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("case,model_args,match", BAD_MODEL_ARGS, ids=[c[0] for c in BAD_MODEL_ARGS])
def test_bad_model_args_are_one_error_line_before_loading(case, model_args, match, no_model_load, capsys):
    with pytest.raises(SystemExit) as e:
        rj_lm_eval.main(["--model", "refusal_jax", "--model_args", model_args, "--tasks", "arc_easy"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert match in lines[0], lines


@pytest.mark.parametrize("case,model_args,match", BAD_MODEL_ARGS, ids=[c[0] for c in BAD_MODEL_ARGS])
def test_bad_model_args_raise_a_short_error_from_python(case, model_args, match, no_model_load):
    from refusal_jax.errors import RefusalJaxError

    with pytest.raises(RefusalJaxError, match=re.escape(match)) as e:
        rj_lm_eval.RefusalJaxLM.create_from_arg_string(model_args, {"batch_size": None, "device": None})
    assert "\n" not in str(e.value)


def test_duplicated_key_through_simple_evaluate(no_model_load):
    import lm_eval

    from refusal_jax.errors import ConfigError

    rj_lm_eval.register()
    with pytest.raises(ConfigError, match="direction is given twice"):
        lm_eval.simple_evaluate(model="refusal_jax", tasks=["arc_easy"],
                                model_args="intervention=ablation,direction=a.npy,direction=b.npy")


def test_bad_model_args_on_the_real_command_line():
    """`python -m refusal_jax.lm_eval` (lm-eval's own parser, which merges a repeated key with a log line): one
    error line and exit status 2, no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_jax.lm_eval", "--model", "refusal_jax", "--model_args",
         "intervention=ablation", "direction=a.npy", "direction=b.npy", "--tasks", "arc_easy"],
        capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: model_args: direction is given twice (direction=a.npy and "
                                                "direction=b.npy)"]


def test_os_error_under_lm_eval_is_one_line(monkeypatch, capsys):
    import errno

    import lm_eval.__main__

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/out.json")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", full)
    with pytest.raises(SystemExit) as e:
        rj_lm_eval.main(["--model", "refusal_jax", "--tasks", "arc_easy"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: /results/out.json: no space left on the device (free some space or write elsewhere)"]

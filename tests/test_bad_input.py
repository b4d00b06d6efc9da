"""Every command, every class of bad input: exit status 2, one `error:` line naming the culprit, no traceback, and
every file that existed before is byte-identical afterwards (sha256). Commands run in-process (their main(argv))."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from refusal_jax import compare, evaluate, extract, optimize, orthogonalize, pipeline
from refusal_jax.convert import export_gguf, gguf_writer
from refusal_jax.convert.__main__ import main as convert_main
from refusal_jax.runs import outputs

COMMANDS = {"convert": convert_main, "extract": extract.main, "pipeline": pipeline.main, "compare": compare.main,
            "optimize": optimize.main, "orthogonalize": orthogonalize.main, "export_gguf": export_gguf.main,
            "evaluate": evaluate.main}
LOOSE = ["--kl-threshold", "1e9", "--induce-threshold=-1e9", "--prune-layer-fraction", "0"]


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def W(tmp_path_factory):
    """The user's world: a tiny model in three formats, instruction files, a direction, a finished run, bad files."""
    from refusal_jax.convert import checkpoint, export_hf
    from tests.tiny_chat import save_tiny_chat_model, write_sets

    root = tmp_path_factory.mktemp("world")
    w = {"root": root}
    w["ckpt"] = save_tiny_chat_model(root / "ckpt")
    w["harmful"], w["harmless"] = write_sets(root)
    cfg, params, tok = checkpoint.load(w["ckpt"])
    w["hf"] = export_hf.save_hf(root / "hf", cfg, params, tok)
    (w["hf"] / outputs.MARKER).unlink()
    w["gguf"] = gguf_writer.save_gguf(root / "m.gguf", cfg, params)["path"]
    np.save(root / "direction.npy", np.ones(cfg.d_model, np.float32))
    w["direction"] = root / "direction.npy"
    np.save(root / "wide.npy", np.ones(cfg.d_model + 3, np.float32))
    w["wide"] = root / "wide.npy"
    w["run"] = root / "run"
    extract.main(["--model", str(w["ckpt"]), "--harmful", str(w["harmful"]), "--harmless", str(w["harmless"]),
                  "--n-train", "6", "--n-val", "3", "--batch-size", "4", "--no-filter",
                  "--no-progress", "--out", str(w["run"]), *LOOSE])

    bad = root / "bad"
    bad.mkdir()
    (bad / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (bad / "deep.jsonl").write_text('"ok"\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    (bad / "huge_field.csv").write_text('instruction\n"' + "x" * 200_000 + '"\n')
    (bad / "ioerror.txt").symlink_to("/proc/self/mem")  # reading it fails with EIO
    (bad / "surrogate.json").write_text('["\\ud800 lone"]')
    (bad / "long.txt").write_text("".join(f"write a poem {i} " + "cake " * 100 + "\n" for i in range(15)))
    (bad / "not.gguf").write_bytes(b"PK\x03\x04 a zip file")
    (bad / "trunc.gguf").write_bytes(w["gguf"].read_bytes()[:200])
    (bad / "notes.txt").write_text("my notes\n")
    (bad / "loop").symlink_to("loop")  # a symlink loop
    w["bad"] = bad
    return w


def hf_variant(W, tmp_path, *, config=None, drop=(), files=None):
    """A copy of the user's HF model with a changed config.json, files removed or added."""
    d = tmp_path / "hfv"
    shutil.copytree(W["hf"], d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in config.items():
            if v is ...:
                cfg.pop(k)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    for name in drop:
        for p in d.glob(name):
            p.unlink()
    for name, content in (files or {}).items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def ckpt_variant(W, tmp_path, *, template=None, config=None):
    d = tmp_path / "ckptv"
    shutil.copytree(W["ckpt"], d)
    if template is not None:
        tc = d / "tokenizer" / "tokenizer_config.json"
        (tc.write_text(json.dumps({**json.loads(tc.read_text()), "chat_template": template})))
        for extra in (d / "tokenizer").glob("chat_template.j*"):
            extra.unlink()
    if config is not None:
        path = d / "refusal_jax_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return d


def run_args(W, out, *extra, model=None, selection=True):
    return ["--model", str(model or W["ckpt"]), "--harmful", str(W["harmful"]), "--harmless", str(W["harmless"]),
            "--n-train", "6", "--n-val", "3", "--batch-size", "4", "--no-filter", "--no-progress",
            "--out", str(out), *(LOOSE if selection else ()), *extra]


def bad_metadata_run(W, tmp_path):
    """A direction folder whose direction_metadata.json has a float layer."""
    d = tmp_path / "dirrun"
    d.mkdir()
    shutil.copy(W["direction"], d / "direction.npy")
    (d / "direction_metadata.json").write_text('{"pos": -1, "layer": 1.5}')
    return d


def safetensors_bytes(header, data=b""):
    import struct

    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


# (id, command, argv builder (W, tmp_path) -> argv, text the one error line must contain)
CASES = [
    # class 5: flags validated before the model loads
    ("negative-n-train", "extract", lambda W, t: run_args(W, t / "r", "--n-train", "-3"), "--n-train"),
    ("zero-batch", "extract", lambda W, t: run_args(W, t / "r", "--batch-size", "0"), "--batch-size"),
    ("nan-kl", "extract", lambda W, t: run_args(W, t / "r") + ["--kl-threshold", "nan"], "--kl-threshold is NaN"),
    ("nan-induce", "extract", lambda W, t: run_args(W, t / "r") + ["--induce-threshold", "nan"], "NaN"),
    ("nan-induce-relative", "extract", lambda W, t: run_args(W, t / "r") + ["--induce-relative", "nan"],
     "--induce-relative is NaN"),
    ("kl-negative", "extract", lambda W, t: run_args(W, t / "r") + ["--kl-threshold=-1"],
     "--kl-threshold must be >= 0"),
    ("evaluate-coeff-nan", "evaluate", lambda W, t: ["--model", str(W["ckpt"]), "--intervention", "addition",
                                                     "--direction", str(W["direction"]), "--layer", "1", "--coeff",
                                                     "nan", "--out", str(t / "e")], "--coeff is NaN"),
    ("evaluate-timeout-nan", "evaluate", lambda W, t: ["--model", str(W["ckpt"]), "--timeout", "nan", "--out",
                                                       str(t / "e")], "--timeout is NaN"),
    ("optimize-weight-inf", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]),
                                                              "--layer", "1", "--retain-weight", "inf",
                                                              selection=False), "--retain-weight must be finite"),
    ("ortho-shard-size-nan", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction",
                                                            str(W["direction"]), "--shard-size", "nan", "--out",
                                                            str(t / "o")], "--shard-size is NaN"),
    ("evaluate-layer-99", "evaluate", lambda W, t: ["--model", str(W["ckpt"]), "--intervention", "addition",
                                                    "--direction", str(W["direction"]), "--layer", "99", "--out",
                                                    str(t / "e")], "--layer 99 out of range"),
    ("optimize-layer-99", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]),
                                                            "--layer", "99", selection=False),
     "--layer 99 out of range"),
    ("optimize-layer-99-gguf", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]),
                                                                 "--layer", "99", selection=False, model=W["gguf"]),
     "--layer 99 out of range"),
    ("evaluate-direction-width", "evaluate", lambda W, t: ["--model", str(W["ckpt"]), "--intervention", "ablation",
                                                           "--direction", str(W["wide"]), "--out", str(t / "e")],
     "direction has shape"),
    ("ortho-direction-width", "orthogonalize", lambda W, t: ["--model", str(W["hf"]), "--direction", str(W["wide"]),
                                                             "--out", str(t / "o")], "direction has shape"),
    ("optimize-metadata-layer-float", "optimize", lambda W, t: run_args(W, t / "r", "--direction",
                                                                         str(bad_metadata_run(W, t)),
                                                                         selection=False), "'layer' is 1.5"),
    ("evaluate-metadata-layer-float", "evaluate", lambda W, t: ["--model", str(W["ckpt"]), "--intervention",
                                                                "addition", "--direction", str(bad_metadata_run(W, t)),
                                                                "--out", str(t / "e")], "'layer' is 1.5"),
    ("prune-negative", "extract", lambda W, t: run_args(W, t / "r") + ["--prune-layer-fraction=-5"],
     "--prune-layer-fraction"),
    ("prune-one", "extract", lambda W, t: run_args(W, t / "r") + ["--prune-layer-fraction", "1"],
     "--prune-layer-fraction"),
    ("layers-99", "extract", lambda W, t: run_args(W, t / "r", "--layers", "99"), "layer 99 out of range"),
    ("layers-99-gguf", "extract", lambda W, t: run_args(W, t / "r", "--layers", "99", model=W["gguf"]),
     "layer 99 out of range"),
    ("layers-99-hf", "extract", lambda W, t: run_args(W, t / "r", "--layers", "99", model=W["hf"]),
     "layer 99 out of range"),
    ("positions-positive", "extract", lambda W, t: run_args(W, t / "r", "--positions", "2"), "--positions 2"),
    ("missing-harmful", "extract", lambda W, t: run_args(W, t / "r", "--harmful", "/missing/h.json"),
     "/missing/h.json"),
    ("missing-model", "extract", lambda W, t: run_args(W, t / "r", model="/missing/model"), "/missing/model"),
    ("data-dir-with-file", "extract", lambda W, t: run_args(W, t / "r", "--data-dir", str(W["bad"])),
     "--data-dir cannot be combined"),
    ("missing-loss-texts", "pipeline", lambda W, t: run_args(W, t / "r", "--loss-texts", "/missing/pile.txt"),
     "/missing/pile.txt"),
    ("max-new-tokens-0", "pipeline", lambda W, t: run_args(W, t / "r", "--max-new-tokens", "0"), "--max-new-tokens"),
    ("max-new-tokens-huge", "pipeline", lambda W, t: run_args(W, t / "r", "--max-new-tokens", "999999999"),
     "--max-new-tokens"),
    ("gen-batch-0", "pipeline", lambda W, t: run_args(W, t / "r", "--gen-batch-size", "0"), "--gen-batch-size"),
    ("compare-tokens", "compare", lambda W, t: run_args(W, t / "r", "--max-new-tokens", "-1"), "--max-new-tokens"),
    ("compare-optimized", "compare", lambda W, t: run_args(W, t / "r", "--optimized", "/missing/opt"), "/missing/opt"),
    ("optimize-steps", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]), "--layer",
                                                          "1", "--steps", "0", selection=False), "--steps"),
    ("optimize-lr-nan", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]), "--layer",
                                                           "1", "--lr", "nan", selection=False), "--lr"),
    ("optimize-targets", "optimize", lambda W, t: run_args(W, t / "r", "--direction", str(W["direction"]),
                                                            "--layer", "1", "--targets", "/missing/t.json",
                                                            selection=False),
     "/missing/t.json"),
    ("ortho-direction", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction", "/missing/d.npy",
                                                       "--out", str(t / "o")], "/missing/d.npy does not exist"),
    ("ortho-mean", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction", str(W["direction"]),
                                                  "--method", "projected", "--harmless-mean", "/missing/m.npy",
                                                  "--out", str(t / "o")], "/missing/m.npy"),
    ("ortho-shard-size", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction", str(W["direction"]),
                                                        "--shard-size", "0", "--out", str(t / "o")], "--shard-size"),
    ("gguf-tokenizer", "export_gguf", lambda W, t: ["--model", str(W["ckpt"]), "--tokenizer-gguf", "/missing/t.gguf",
                                                    "--out", str(t / "o.gguf")], "/missing/t.gguf"),
    # class 4: malformed data files
    ("deep-json", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "deep.json")),
     "nested too deeply"),
    ("deep-jsonl", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "deep.jsonl")),
     "nested too deeply"),
    ("huge-csv-field", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "huge_field.csv")),
     "malformed CSV"),
    ("io-error", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "ioerror.txt")),
     "cannot read"),
    ("lone-surrogate", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "surrogate.json")),
     "not valid Unicode"),
    # class 4: --out
    ("out-is-file", "extract", lambda W, t: run_args(W, W["bad"] / "notes.txt"), "is a file"),
    ("out-missing-parent", "extract", lambda W, t: run_args(W, t / "no" / "such" / "run"), "does not exist"),
    ("out-user-dir", "extract", lambda W, t: run_args(W, W["bad"]), "not a refusal_jax run"),
    ("out-symlink-loop", "extract", lambda W, t: run_args(W, W["bad"] / "loop"), "cannot resolve"),
    ("out-converted-model", "extract", lambda W, t: run_args(W, W["ckpt"]), "not a refusal_jax run: it is"),
    ("out-converted-model-overwrite", "extract", lambda W, t: run_args(W, W["ckpt"], "--overwrite"),
     "not a refusal_jax run: it is"),
    ("out-converted-model-pipeline", "pipeline", lambda W, t: run_args(W, W["ckpt"], "--overwrite"),
     "not a refusal_jax run: it is"),
    ("out-hf-model", "extract", lambda W, t: run_args(W, W["hf"], "--overwrite"), "it holds model weights"),
    ("convert-onto-run", "convert", lambda W, t: [str(W["ckpt"]), "--out", str(W["run"]), "--overwrite"],
     "holds a refusal_jax run output"),
    ("ortho-onto-checkpoint", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction",
                                                             str(W["direction"]), "--out", str(ckpt_variant(W, t)),
                                                             "--overwrite"], "not a hf_export"),
    ("ortho-out-file", "orthogonalize", lambda W, t: ["--model", str(W["ckpt"]), "--direction", str(W["direction"]),
                                                      "--out", str(W["bad"] / "notes.txt"), "--overwrite"],
     "is a file"),
    ("gguf-out-dir", "export_gguf", lambda W, t: ["--model", str(W["ckpt"]), "--out", str(W["bad"]), "--overwrite"],
     "is a directory"),
    ("gguf-out-source", "export_gguf", lambda W, t: ["--model", str(W["gguf"]), "--out", str(W["gguf"]),
                                                     "--overwrite"], "it is the source"),
    # class 2: resources bounded
    ("prompt-too-long", "extract", lambda W, t: run_args(W, t / "r", "--harmful", str(W["bad"] / "long.txt"),
                                                         "--max-prompt-tokens", "64"), "harmful_"),
    # class 4: malformed config values, corrupt model files (convert)
    ("config-string-size", "convert", lambda W, t: [str(hf_variant(W, t, config={"hidden_size": "abc"})), "--out",
                                                    str(t / "c")], "malformed config value"),
    ("config-null-layers", "convert", lambda W, t: [str(hf_variant(W, t, config={"num_hidden_layers": None})),
                                                    "--out", str(t / "c")], "malformed config value"),
    ("config-zero-ff", "convert", lambda W, t: [str(hf_variant(W, t, config={"intermediate_size": 0})), "--out",
                                                str(t / "c")], "d_ff=0"),
    ("config-negative-heads", "convert", lambda W, t: [str(hf_variant(W, t, config={"num_attention_heads": -4})),
                                                       "--out", str(t / "c")], "malformed config"),
    ("config-string-for-object", "convert", lambda W, t: [str(hf_variant(W, t, config={"rope_parameters": "linear"})),
                                                          "--out", str(t / "c")], "malformed config value"),
    ("config-list", "convert", lambda W, t: [str(hf_variant(W, t, files={"config.json": "[1, 2]"})), "--out",
                                             str(t / "c")], "expected a JSON object"),
    ("config-huge", "convert", lambda W, t: [str(hf_variant(W, t, config={"num_hidden_layers": 10**6,
                                                                          "layer_types": ...,
                                                                          "intermediate_size": 10**6})),
                                             "--out", str(t / "c")], "the config describes"),
    ("converted-config-bad", "extract", lambda W, t: run_args(W, t / "r", model=ckpt_variant(W, t, config={
        "n_layers": "three"})), "three"),
    ("no-tokenizer", "convert", lambda W, t: [str(hf_variant(W, t, drop=("tokenizer*", "special_tokens_map.json",
                                                                          "vocab.json", "merges.txt"))),
                                              "--out", str(t / "c")], "no tokenizer files"),
    ("index-escapes", "convert", lambda W, t: [str(hf_variant(W, t, files={"model.safetensors.index.json": json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../world/bad/notes.txt"}})})), "--out", str(t / "c")],
     "outside the model directory"),
    ("index-absolute", "convert", lambda W, t: [str(hf_variant(W, t, files={"model.safetensors.index.json": json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "/etc/passwd"}})})), "--out", str(t / "c")],
     "outside the model directory"),
    ("safetensors-header-list", "convert", lambda W, t: [str(hf_variant(W, t, files={
        "model.safetensors": safetensors_bytes([1, 2])})), "--out", str(t / "c")], "corrupt safetensors header"),
    ("safetensors-negative-shape", "convert", lambda W, t: [str(hf_variant(W, t, files={
        "model.safetensors": safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                               bytes(4))})), "--out", str(t / "c")], "malformed shape"),
    ("safetensors-huge-header", "convert", lambda W, t: [str(hf_variant(W, t, files={
        "model.safetensors": b"\xff" * 8 + b"{}"})), "--out", str(t / "c")], "corrupt safetensors header"),
    ("gguf-not-gguf", "convert", lambda W, t: [str(W["bad"] / "not.gguf"), "--out", str(t / "c")], "not a GGUF file"),
    ("gguf-truncated", "convert", lambda W, t: [str(W["bad"] / "trunc.gguf"), "--out", str(t / "c")],
     "corrupt or truncated"),
    # class 4: failing chat templates
    ("template-raise", "extract", lambda W, t: run_args(W, t / "r", "--chat-style", "model", model=ckpt_variant(
        W, t, template="{{ raise_exception('no chat for you') }}")), "chat template failed"),
    ("template-syntax", "extract", lambda W, t: run_args(W, t / "r", "--chat-style", "model", model=ckpt_variant(
        W, t, template="{% for x in %}")), "chat template failed"),
    ("template-sandbox", "extract", lambda W, t: run_args(W, t / "r", "--chat-style", "model", model=ckpt_variant(
        W, t, template="{{ ''.__class__.__mro__[1].__subclasses__() }}")), "chat template failed"),
]


@pytest.mark.parametrize("name,command,argv,culprit", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(W, tmp_path, monkeypatch, capsys, name, command, argv, culprit):
    monkeypatch.chdir(W["bad"])
    args = argv(W, tmp_path)
    before = snapshot(W["root"])
    with pytest.raises(SystemExit) as e:
        COMMANDS[command](args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1 and culprit in errors[0], err
    assert snapshot(W["root"]) == before


CORRUPTIONS = [
    ("run-config-garbage", "run_config.json", b"\x89PNG\x00\xff", "run_config.json: malformed JSON"),
    ("run-config-list", "run_config.json", b"[1, 2]", "not a run config"),
    ("filtered-wrong-type", "datasets/filtered.json", b'{"sets": 3}', "filtered.json: corrupt artifact"),
    ("mean-diffs-truncated", "generate_directions/mean_diffs.npy", None, "mean_diffs.npy: corrupt or truncated"),
    ("direction-truncated", "direction.npy", None, "direction.npy: corrupt or truncated"),
    ("metadata-empty", "direction_metadata.json", b"{}", "direction_metadata.json: corrupt artifact"),
    ("metadata-layer-string", "direction_metadata.json", b'{"pos": -1, "layer": "x"}',
     "direction_metadata.json: corrupt artifact ('layer' is 'x'"),
    ("metadata-pos-list", "direction_metadata.json", b'{"pos": [1], "layer": 1}',
     "direction_metadata.json: corrupt artifact ('pos' is [1]"),
]


@pytest.mark.parametrize("name,rel,content,culprit", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_artifacts_on_resume(W, tmp_path, capsys, name, rel, content, culprit):
    run = tmp_path / "run"
    shutil.copytree(W["run"], run)
    target = run / rel
    target.write_bytes(content if content is not None else target.read_bytes()[:40])
    if rel.endswith("mean_diffs.npy"):
        os.remove(run / "direction.npy")  # so that selection reads the candidates again
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        extract.main(run_args(W, run))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err
    assert len(errors) == 1 and culprit in errors[0], err
    assert snapshot(tmp_path) == before


def test_lone_harmful_is_announced_and_truncation_warns(W, tmp_path, capsys):
    args = run_args(W, tmp_path / "r1")
    i = args.index("--harmless")
    extract.main(args[:i] + args[i + 2:])
    assert "note: --harmful given alone: the harmless prompts are the bundled harmless set" in capsys.readouterr().out
    extract.main(run_args(W, tmp_path / "r2", "--harmful", str(W["bad"] / "long.txt"), "--max-prompt-tokens", "64",
                          "--truncate-prompts"))
    err = capsys.readouterr().err
    assert "warning: harmful_" in err and "cut from" in err
    sets = json.loads((tmp_path / "r2" / "datasets" / "filtered.json").read_text())["sets"]
    assert all(len(x.split()) < 64 for v in sets.values() for x in v)


def test_chat_template_rendering_is_bounded_in_time(W, tmp_path, monkeypatch, capsys):
    from refusal_jax.prompts import templates

    monkeypatch.setattr(templates, "TEMPLATE_SECONDS", 0.5)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    model = ckpt_variant(W, tmp_path, template=slow)
    with pytest.raises(SystemExit) as e:
        extract.main(run_args(W, tmp_path / "r", "--chat-style", "model", model=model))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "chat template took more than 0.5 s" in err and "Traceback" not in err, err


def test_model_cache_is_never_an_output(W, tmp_path, monkeypatch, capsys):
    """A converted cache entry cannot be a run folder nor an export's --out, with or without --overwrite."""
    cache = tmp_path / "cache"
    entry = cache / "converted" / "tiny-float32"
    shutil.copytree(W["ckpt"], entry)
    monkeypatch.setenv(outputs.CACHE_ENV, str(cache))
    before = snapshot(cache)
    for command, argv in (
            ("extract", run_args(W, entry, "--overwrite")),
            ("extract", run_args(W, cache / "new-run")),
            ("orthogonalize", ["--model", str(W["ckpt"]), "--direction", str(W["direction"]), "--out", str(entry),
                               "--overwrite"]),
            ("convert", [str(W["ckpt"]), "--out", str(entry), "--overwrite"])):
        with pytest.raises(SystemExit) as e:
            COMMANDS[command](argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "model cache" in err and "Traceback" not in err, (command, err)
    assert snapshot(cache) == before and not list(cache.glob("*.previous-*"))


def test_api_save_keeps_the_commands_rule(W, tmp_path):
    """Extraction.save writes only where the commands may: never over a user's files or into a model folder."""
    from refusal_jax.errors import OutputError
    from refusal_jax.method.selection import Extraction

    extraction = Extraction.load(W["run"])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "direction.npy").write_bytes(b"my own direction")
    with pytest.raises(OutputError, match="not a refusal_jax run"):
        extraction.save(user)
    assert (user / "direction.npy").read_bytes() == b"my own direction"
    with pytest.raises(OutputError, match="not a refusal_jax run: it is"):
        extraction.save(W["ckpt"])
    fresh = extraction.save(tmp_path / "fresh")  # a new folder becomes a run folder, and may be saved again
    assert outputs.marker_kind(fresh) == "run"
    again = Extraction.load(extraction.save(fresh))
    np.testing.assert_array_equal(again.direction, extraction.direction)


@pytest.mark.parametrize("name", ["evaluate-layer-99", "optimize-layer-99", "evaluate-direction-width",
                                  "ortho-direction-width", "evaluate-coeff-nan", "out-converted-model-overwrite"])
def test_refused_before_the_model_loads(W, tmp_path, monkeypatch, capsys, name):
    """The late-validation class: these are refused from the config alone, never after loading the weights."""
    from refusal_jax.convert import checkpoint, loading

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(checkpoint, "load", loaded)
    monkeypatch.setattr(loading, "load_model", loaded)
    monkeypatch.setattr(loading, "convert_source", loaded)
    _, command, argv, culprit = next(c for c in CASES if c[0] == name)
    with pytest.raises(SystemExit) as e:
        COMMANDS[command](argv(W, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and culprit in err and "Traceback" not in err, err

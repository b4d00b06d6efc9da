"""Interruption, with real signals in subprocesses on a tiny model: Ctrl-C (SIGINT) in stage 1, the selection sweep
and generation exits 130 with the completed artifacts intact and a rerun giving the uninterrupted result; kill -9
during conversion and the exports, then a rerun: no partial or lock files left, results identical."""

import hashlib
import importlib
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from refusal_jax import pipeline
from refusal_jax.convert import checkpoint
from refusal_jax.model.params import to_flat
from refusal_jax.runs import outputs
from tests.test_pipeline_cli import LOOSE, tiny  # noqa: F401  (module-scoped fixture)

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

# Runs a command with one function wrapped: print a marker, then pause, so the signal lands inside that stage.
DRIVER = textwrap.dedent("""
    import importlib, sys, time
    module, name, command = sys.argv[1], sys.argv[2], sys.argv[3]
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    def paused(*a, **k):
        print("MARKER", flush=True)
        time.sleep(60)
        return real(*a, **k)
    setattr(mod, name, paused)
    importlib.import_module(command).main(sys.argv[4:])
""")


def start(module, name, command, argv, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, module, name, command, *map(str, argv)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "MARKER":
            return proc
    proc.wait()
    raise AssertionError(f"the command ended before reaching {module}.{name}: {proc.stderr.read()}")


def args_for(tiny, out):
    root, model, harmful, harmless = tiny
    return ["--model", model, "--harmful", harmful, "--harmless", harmless, "--n-train", "6", "--n-val", "3",
            "--n-test", "3", "--batch-size", "4", "--chunk", "4", "--no-filter", "--no-progress", "--out", out,
            "--max-new-tokens", "4", "--gen-batch-size", "2", *LOOSE]


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    pipeline.main([str(a) for a in args_for(tiny, out)])
    return out


@pytest.mark.parametrize("stage,module,name,done", [
    ("stage 1", "refusal_jax.method.directions", "mean_activations", []),
    ("sweep", "refusal_jax.method.directions", "score_candidates", ["generate_directions/mean_diffs.npy"]),
    ("generation", "refusal_jax.model.generate", "generate_sets", ["direction.npy", "direction_metadata.json"]),
])
def test_sigint_exits_130_and_resumes(tiny, reference_run, tmp_path, stage, module, name, done):
    out = tmp_path / "run"
    proc = start(module, name, "refusal_jax.pipeline", args_for(tiny, out), tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    for rel in done:  # what was complete before the interrupt is intact
        ref = (reference_run / rel).read_bytes()
        assert (out / rel).read_bytes() == ref, rel
    assert not [p for p in out.rglob(".*") if "tmp-" in p.name or "partial" in p.name]
    pipeline.main([str(a) for a in args_for(tiny, out)])  # resume
    for rel in ("direction.npy", "generate_directions/mean_diffs.npy", "completions/harmless_baseline_completions.json",
                "loss_evals/ablation_loss_eval.json"):
        assert (out / rel).read_bytes() == (reference_run / rel).read_bytes(), rel


def files_digest(root):
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != outputs.MARKER}  # the marker holds a time


@pytest.fixture(scope="module")
def hf_model(tiny, tmp_path_factory):
    from refusal_jax.convert import export_hf

    cfg, params, tok = checkpoint.load(tiny[1])
    return export_hf.save_hf(tmp_path_factory.mktemp("hf") / "model", cfg, params, tok)


@pytest.mark.parametrize("what", ["convert", "orthogonalize", "export_gguf"])
def test_kill_9_then_rerun_leaves_nothing_partial(tiny, hf_model, tmp_path, what):
    root, model, _, _ = tiny
    np.save(tmp_path / "d.npy", np.ones(32, np.float32))
    if what == "convert":
        out = tmp_path / "ckpt"
        command, argv = "refusal_jax.convert.__main__", [hf_model, "--out", out, "--no-progress"]
        module, name = "refusal_jax.convert.checkpoint", "_writer"  # pauses inside the partial checkpoint directory
    elif what == "orthogonalize":
        out = tmp_path / "hf"
        command, argv = "refusal_jax.orthogonalize", ["--model", model, "--direction", tmp_path / "d.npy", "--out",
                                                      out, "--no-progress"]
        module, name = "refusal_jax.convert.export_hf", "write_safetensors_stream"
    else:
        out = tmp_path / "m.gguf"
        command, argv = "refusal_jax.convert.export_gguf", ["--model", model, "--out", out, "--no-progress"]
        module, name = "refusal_jax.convert.gguf_writer", "_encode"
    proc = start(module, name, command, argv, tmp_path)
    time.sleep(0.5)
    partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert partial, "the kill should land while a partial output exists"
    proc.kill()
    proc.wait()
    assert not out.exists()
    main = importlib.import_module(command).main
    main([str(a) for a in argv])  # rerun, in-process
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [], left  # the killed run's partial was removed, the lock released
    # identical to an uninterrupted run
    clean = tmp_path / "clean"
    clean.mkdir()
    argv2 = [str(a).replace(str(out), str(clean / out.name)) for a in argv]
    main(argv2)
    if what == "convert":
        a, b = checkpoint.load(out)[1], checkpoint.load(clean / out.name)[1]
        for k, v in to_flat(a).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(to_flat(b)[k]))
        # the manifests agree but for sha256, which names orbax's randomly named data files (params: above)
        ma, mb = ({k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "sha256"}
                  for d in (out, clean / out.name))
        assert ma == mb
    else:
        assert files_digest(out) == files_digest(clean / out.name)

"""Output safety (refusal_jax.outputs): --overwrite never destroys what refusal_jax did not write, replaced outputs
are moved aside, one writer per output, stale partial files are cleaned up."""

import hashlib
import os
import subprocess
import sys

import pytest

from refusal_jax.convert import checkpoint
from refusal_jax.convert.__main__ import main as convert_main
from refusal_jax.errors import OutputError
from refusal_jax.runs import outputs


def tree_hashes(root):
    """sha256 of every file under `root` (relative path -> hash)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """A user's Hugging Face model directory (no refusal_jax marker) with their notes next to the weights."""
    from refusal_jax.convert import export_hf
    from refusal_jax.model import params as P
    from refusal_jax.model.config import tiny_config
    from tests.tiny_chat import chat_tokenizer

    root = tmp_path_factory.mktemp("user")
    tok = chat_tokenizer()
    cfg = tiny_config("qwen2", vocab_size=len(tok), n_layers=2)
    src = export_hf.save_hf(root / "model", cfg, P.init_random(cfg, 0, scale=0.5), tok)
    (src / outputs.MARKER).unlink()  # as if the user had downloaded it
    (src / "NOTES.txt").write_text("my notes\n")
    return src


def run_convert(argv, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return e.value.code, err


def test_convert_onto_its_source_is_refused(hf_src, capsys):
    before = tree_hashes(hf_src.parent)
    code, err = run_convert([str(hf_src), "--out", str(hf_src), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "it is the source" in err
    assert tree_hashes(hf_src.parent) == before


def test_convert_onto_an_ancestor_of_the_source_is_refused(hf_src, capsys):
    before = tree_hashes(hf_src.parent)
    code, err = run_convert([str(hf_src), "--out", str(hf_src.parent), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "contains the source" in err
    assert tree_hashes(hf_src.parent) == before


def test_convert_onto_the_current_directory_is_refused(hf_src, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "thesis.tex").write_text("years of work\n")
    (cwd / outputs.MARKER).write_text("{}")  # even a directory that looks like ours
    monkeypatch.chdir(cwd)
    before = tree_hashes(tmp_path)
    for out in (".", str(cwd), str(tmp_path)):
        code, err = run_convert([str(hf_src), "--out", out, "--overwrite", "--no-progress"], capsys)
        assert code == 2 and "current directory" in err, err
    assert tree_hashes(tmp_path) == before


def test_overwrite_refuses_a_directory_refusal_jax_did_not_write(hf_src, tmp_path, capsys):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"\xff\xd8 not really")
    before = tree_hashes(tmp_path)
    code, err = run_convert([str(hf_src), "--out", str(user), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "not written by refusal_jax" in err
    assert tree_hashes(tmp_path) == before


def test_overwrite_moves_the_previous_output_aside(hf_src, tmp_path, capsys):
    out = tmp_path / "ckpt"
    convert_main([str(hf_src), "--out", str(out), "--no-progress"])
    first = tree_hashes(out)
    assert outputs.is_ours(out)
    convert_main([str(hf_src), "--out", str(out), "--overwrite", "--no-progress"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.previous-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == first  # nothing deleted
    assert checkpoint.is_converted(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", aside[0].name])  # no partial, no lock


@pytest.mark.parametrize("case", ["file", "missing_parent", "unwritable"])
def test_bad_out_paths(hf_src, tmp_path, capsys, case):
    if case == "file":
        out = tmp_path / "out.txt"
        out.write_text("mine\n")
        match = "is a file"
    elif case == "missing_parent":
        out = tmp_path / "no" / "such" / "out"
        match = "does not exist"
    else:
        out = "/proc/refusal_jax_out"  # not writable even by root
        match = "cannot write"
    before = tree_hashes(tmp_path)
    code, err = run_convert([str(hf_src), "--out", str(out), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and match in err
    assert tree_hashes(tmp_path) == before


def test_gguf_overwrite_replaces_only_refusal_jax_files(tmp_path):
    import numpy as np

    from refusal_jax.convert import gguf_writer
    from refusal_jax.model import params as P
    from refusal_jax.model.config import tiny_config

    cfg = tiny_config("llama", n_layers=1)
    params = P.init_random(cfg, 0, scale=0.5)
    user = tmp_path / "user.gguf"
    user.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(OutputError, match="not written by refusal_jax"):
        gguf_writer.save_gguf(user, cfg, params, overwrite=True)
    assert user.read_bytes() == b"GGUF" + bytes(60)
    ours = gguf_writer.save_gguf(tmp_path / "m.gguf", cfg, params)["path"]
    first = ours.read_bytes()
    gguf_writer.save_gguf(ours, cfg, jax_tree_scale(params, np.float32(2)), overwrite=True)
    aside = list(tmp_path.glob("m.gguf.previous-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == first and ours.read_bytes() != first


def jax_tree_scale(params, k):
    import jax

    return jax.tree.map(lambda x: x * k, params)


def test_second_writer_gets_a_clear_error_and_a_dead_lock_is_taken_over(tmp_path):
    out = tmp_path / "x"
    with outputs.lock(out):
        child = subprocess.run([sys.executable, "-c", (
            "from refusal_jax.runs import outputs\n"
            f"with outputs.lock(__import__('pathlib').Path({str(out)!r})): pass\n")],
            capture_output=True, text=True)
        assert child.returncode != 0 and "being written by another refusal_jax process" in child.stderr
        assert f"pid {os.getpid()}" in child.stderr
    # a lock file left by a killed process (kill -9: the kernel drops its flock) is taken over
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from refusal_jax.runs import outputs\n"
        f"with outputs.lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    assert (tmp_path / ".x.lock").exists()
    with outputs.lock(out):
        pass
    assert not (tmp_path / ".x.lock").exists()


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "ckpt"
    stale_dir = tmp_path / f".ckpt.partial-{dead}"
    (stale_dir / "params").mkdir(parents=True)
    (stale_dir / "params" / "big").write_bytes(bytes(1000))
    stale_bundled = tmp_path / f".ckpt.{dead}.0badc0de.partial"
    stale_bundled.write_bytes(b"x")
    live = tmp_path / f".ckpt.partial-{os.getppid()}"  # a running process: left alone
    live.mkdir()
    other = tmp_path / ".other.partial-1"  # another output's: left alone
    other.mkdir()
    removed = outputs.clean_stale_partials(out)
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_bundled.name])
    assert not stale_dir.exists() and not stale_bundled.exists() and live.exists() and other.exists()


def test_run_dir_must_be_new_empty_or_a_run(tmp_path):
    from refusal_jax.runs import rundir as runs

    user = tmp_path / "docs"
    user.mkdir()
    (user / "cv.pdf").write_bytes(b"%PDF")
    with pytest.raises(OutputError, match="not a refusal_jax run"):
        runs.open_run(user, {"a": 1})
    assert sorted(p.name for p in user.iterdir()) == ["cv.pdf"]
    run = tmp_path / "run"
    runs.open_run(run, {"a": (1, 2)})
    runs.open_run(run, {"a": [1, 2]})  # a tuple and its JSON list are the same setting
    from refusal_jax.errors import RunError

    with pytest.raises(RunError, match=r"changed: b\)"):
        runs.open_run(run, {"a": (1, 2), "b": 3})


def test_two_runs_on_one_out_the_second_is_refused(tmp_path):
    from refusal_jax.runs import rundir as runs

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from refusal_jax.runs import rundir as runs\n"
        f"runs.open_run({str(run)!r}, {{'a': 1}}); print('open', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OutputError, match=rf"in use by another refusal_jax run \(pid {holder.pid}\)"):
            runs.open_run(run, {"a": 1})
    finally:
        holder.kill()
        holder.wait()
    runs.open_run(run, {"a": 1})  # the killed run's lock is taken over
    outputs.release_run_lock(run)

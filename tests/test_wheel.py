"""A built, non-editable wheel installs convert/ as refusal_jax.convert (never a bare `convert`) and converts."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_convert import LLAMA, hf_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(REPO)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"wheel build failed:\n{run.stderr[-2000:]}")
    return next(out.glob("refusal_jax-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "refusal_jax/convert/engine.py" in names and "refusal_jax/convert/__main__.py" in names
    assert not any(n.startswith("convert/") for n in names), "convert/ must not install as a top-level package"
    assert "refusal_jax/data/default_harmful.json" in names


def test_installed_wheel_imports_and_converts(wheel, tmp_path):
    from refusal_jax.convert import safetensors_io
    from refusal_jax.model.config import from_hf_config

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    model = tmp_path / "model"
    model.mkdir()
    safetensors_io.write_file(model / "model.safetensors", hf_tensors(from_hf_config(LLAMA)))
    (model / "config.json").write_text(json.dumps(LLAMA))
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import refusal_jax, importlib.util, sys; "
            f"assert refusal_jax.__file__.startswith({str(target)!r}), refusal_jax.__file__; "
            "assert importlib.util.find_spec('convert') is None; "
            "from refusal_jax.convert.hf import load_hf; "
            f"cfg, p, _ = load_hf({str(model)!r}, with_tokenizer=False); print(cfg.family, p.embed.shape)")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "llama (64, 32)" in run.stdout

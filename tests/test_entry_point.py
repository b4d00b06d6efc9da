"""The `refusal-jax` console script: declared in pyproject.toml, lists every command, and runs each one exactly as
`python -m refusal_jax.<module>` does."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import tomllib

from refusal_jax.__main__ import COMMANDS

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "100", "JAX_PLATFORMS": "cpu"}


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["refusal-jax"] == "refusal_jax.__main__:main"


def test_every_command_has_a_main():
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_overview_and_dispatch():
    overview = run("-m", "refusal_jax", "--help")
    assert overview.returncode == 0 and all(name in overview.stdout for name in COMMANDS)
    via_script, direct = run("-m", "refusal_jax", "extract", "--help"), run("-m", "refusal_jax.extract", "--help")
    assert via_script.returncode == 0 and via_script.stdout == direct.stdout
    unknown = run("-m", "refusal_jax", "frobnicate")
    assert unknown.returncode == 2 and "error: unknown command 'frobnicate'" in unknown.stderr

"""Every command's --help explains every option and shows its default, and lists only the options it uses.

The help text is parsed as a user reads it (`python -m <command> --help` in a subprocess, all commands at once):
each option entry must have help text; an option that takes a value must say `default` (or `required`); the text
must not carry argparse artifacts (a `%` format left over, a doubled full stop). Flag sets per command are
checked against what each command uses (extract generates no completions: no --n-test; optimize selects nothing:
no thresholds).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["refusal_jax.extract", "refusal_jax.pipeline", "refusal_jax.optimize", "refusal_jax.compare",
            "refusal_jax.orthogonalize", "refusal_jax.convert", "refusal_jax.convert.export_gguf"]
SELECTION = {"--kl-threshold", "--induce-threshold", "--induce-relative", "--prune-layer-fraction", "--positions",
             "--layers", "--chunk", "--min-val-refused"}


@pytest.fixture(scope="module")
def helps():
    env = {**os.environ, "COLUMNS": "100", "JAX_PLATFORMS": "cpu"}
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in COMMANDS}
    out = {}
    for m, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{m} --help failed: {stderr[-2000:]}"
        out[m] = stdout
    return out


def parse_options(text: str) -> dict[str, str]:
    """option (its longest flag) -> its help text, from argparse's formatted help."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+(?:(?:, | |=)[^ ].*?)?)(?:\s{2,}(.*))?$", line)
        if m and line.startswith("  -"):
            flags = re.findall(r"(?:^|, )(-{1,2}[\w-]+)", m.group(1))
            current = max(flags, key=len)
            takes_value = bool(re.search(r"-{1,2}[\w-]+ [\[{A-Z]", m.group(1)))
            entries[current] = [takes_value, m.group(2) or ""]
        elif current and line.startswith(" " * 10) and line.strip():
            entries[current][1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return {k: (v[0], v[1].strip()) for k, v in entries.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_default(helps, command):
    options = parse_options(helps[command])
    assert len(options) >= 5, helps[command]
    for flag, (takes_value, text) in options.items():
        if flag == "--help":
            continue
        assert text, f"{command} {flag}: no help text"
        if takes_value:
            assert re.search(r"\bdefault\b|\brequired\b", text), f"{command} {flag}: no default shown: {text!r}"
        assert "%(" not in text and ".." not in text.replace("...", ""), f"{command} {flag}: {text!r}"
    description = helps[command].split("options:")[0]
    assert ".." not in description.replace("...", ""), description


def test_each_command_lists_only_what_it_uses(helps):
    opts = {m: set(parse_options(t)) for m, t in helps.items()}
    assert "--n-test" not in opts["refusal_jax.extract"]  # extract generates no completions
    assert SELECTION <= opts["refusal_jax.extract"] and "--preset" in opts["refusal_jax.extract"]
    assert "--n-test" in opts["refusal_jax.pipeline"] and SELECTION <= opts["refusal_jax.pipeline"]
    assert not SELECTION & opts["refusal_jax.optimize"]  # optimize selects nothing
    assert "--n-test" not in opts["refusal_jax.optimize"] and "--batch-size" in opts["refusal_jax.optimize"]
    assert {"--ablation-weight", "--addition-weight", "--retain-weight"} <= opts["refusal_jax.optimize"]
    assert "--n-test" in opts["refusal_jax.compare"] and SELECTION <= opts["refusal_jax.compare"]
    assert "--method" in opts["refusal_jax.convert.export_gguf"]


def test_parser_of_this_file_sees_what_argparse_prints():
    text = """usage: x

options:
  -h, --help            show this help message and exit
  --a A                 the a (default: 1)
  --bee {x,y}
                        choose, continued
                        (default: x)
  --flag                a switch
  --nohelp NOHELP
"""
    assert parse_options(text) == {"--help": (False, "show this help message and exit"),
                                   "--a": (True, "the a (default: 1)"),
                                   "--bee": (True, "choose, continued (default: x)"), "--flag": (False, "a switch"),
                                   "--nohelp": (True, "")}

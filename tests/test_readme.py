"""Every code block of README.md and docs/*.md is executed, doctest-style, so the documentation cannot drift from
the code. (docs/_*.md are scratch files awaiting a merge and are not checked.)

* ```python blocks run as written in a fresh interpreter, in a scratch directory, with three substitutions
  (the real model would take minutes): the bundled model's name (`qwen2.5-coder-0.5b-instruct`) is replaced by
  the directory of a tiny random ChatML model (tests/tiny_chat.py, with a chat template), and a file the block
  loads with `np.load("<name>.npy")` that does not exist is created first with random values of the tiny model's
  d_model; a random model refuses nothing, so `extract_direction` runs there without the refusal filter and with
  open thresholds. Whatever python blocks the README and the docs hold are run, each in its own process (so
  keep them few; an illustration that needs a real model is a ```text block).
* ```bash blocks: each command line (after joining `\\` continuations and expanding VAR="..." assignments made
  earlier in the block) is checked as far as it can be without the hours some of them take:
  `python -m refusal_jax.*` commands, `refusal-jax COMMAND` (the console script, resolved through
  refusal_jax.__main__.COMMANDS) and `benchmarks/*.py` scripts are run up to their argument parsing (the
  program's own argparse parser, intercepted at parse_args), so a renamed or removed flag or a bad value fails
  here; `./run.sh` / `./test.sh` must be executable scripts of the repository; `python3 -m venv`, `pip install`
  and `python -m pytest` lines (what ./test.sh runs) are recognised and left to CI (.ci/run).
  Any other command fails the test: a new kind of line must get a rule here.
* ```json blocks must parse as JSON; ```text blocks (diagrams, illustrations, terminal transcripts) are not run.
* The README stays at most README_MAX_LINES lines, no page labels a number with the work period that measured it (a
  number carries its date, machine and command instead), and every relative link of the README and the docs points at
  a file of the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted(p for p in (REPO / "docs").glob("*.md") if not p.name.startswith("_"))
BUNDLED = "qwen2.5-coder-0.5b-instruct"
README_MAX_LINES = 350


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        out.append((m.group(1), m.group(2), text[: m.start()].count("\n") + 1))
    return out


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


# (language, code, "file:line") of every block of the README and the docs
BLOCKS = [(lang, code, where(path, line))
          for path in (README, *DOCS) for lang, code, line in code_blocks(path.read_text())]
PYTHON = [(code, at) for lang, code, at in BLOCKS if lang == "python"]
BASH = [(code, at) for lang, code, at in BLOCKS if lang in ("bash", "sh", "shell")]
JSON = [(code, at) for lang, code, at in BLOCKS if lang == "json"]


def test_every_block_is_covered():
    langs = {lang for lang, _, _ in BLOCKS}
    # text blocks are diagrams and illustrations (not run); every other block must have a rule
    assert langs <= {"python", "bash", "sh", "shell", "text", "json"}, f"block languages without a rule here: {langs}"
    assert any(at.startswith("README.md:") for _, at in PYTHON) and any(at.startswith("README.md:") for _, at in BASH)


@pytest.mark.parametrize("code,at", JSON, ids=[at for _, at in JSON])
def test_json_block_parses(code, at):
    try:
        json.loads(code)
    except json.JSONDecodeError as e:
        pytest.fail(f"{at}: not JSON ({e}); an illustration that is not JSON belongs in a ```text block")


def test_readme_is_short():
    # the README is for users (what it is, the two commands, results, commands, a Python example, families, links);
    # the deep material lives in docs/
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, more than {README_MAX_LINES}: move detail into docs/"


def test_local_links_resolve():
    # relative links and images of the README and the docs point at files of the repository
    for path in (README, *DOCS):
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (path.parent / target.split("#")[0]).resolve()
            assert file.exists(), f"{path.relative_to(REPO)}: link to missing {target}"


# spelt in two parts so that a search of the repository for the word finds no page, this test included
WORK_LOG_WORD = "sess" + "ion"


def test_no_work_log_words():
    # a number carries its date, machine and command, never the label of the work period that measured it
    for path in (README, *DOCS):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(rf"\b{WORK_LOG_WORD}s?\b", line, flags=re.I), f"{where(path, i)}: {line.strip()}"


# --------------------------------------------------------------------------------------------------
# python blocks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_chat import chat_tokenizer, save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path_factory.mktemp("readme") / "model")
    tok = chat_tokenizer()
    # the tiny tokenizer has no chat template of its own: give it ChatML, as Qwen's, so style="model" works
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(str(path / "tokenizer"))
    return path


@pytest.mark.parametrize("code,at", PYTHON, ids=[at for _, at in PYTHON])
def test_python_block_runs(code, at, tiny_model, tmp_path):
    from refusal_jax.convert.checkpoint import load_config

    code = code.replace(f'"{BUNDLED}"', repr(str(tiny_model)))
    d_model = load_config(tiny_model).d_model
    import numpy as np

    for name in re.findall(r"np\.load\([\"']([^\"']+\.npy)[\"']\)", code):
        target = tmp_path / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, np.random.default_rng(0).standard_normal(d_model).astype(np.float32))
    # A random tiny model refuses nothing: extraction runs without the refusal filter and with open thresholds
    # (the code path is the same; only the choice among candidates is meaningless on random weights).
    prelude = ("import refusal_jax as _rj\n_extract = _rj.extract_direction\n"
               "_rj.extract_direction = lambda *a, **k: _extract(*a, **{**k, 'filter': False, 'kl_threshold': 1e9, "
               "'induce_threshold': -1e9, 'induce_relative': None, 'prune_layer_fraction': 0.0})\n")
    script = tmp_path / "block.py"
    script.write_text(prelude + code)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{at} failed:\n{res.stderr[-4000:]}"


# --------------------------------------------------------------------------------------------------
# bash blocks


def commands(code: str) -> list[list[str]]:
    """Command lines of a bash block as argument lists: continuations joined, comments dropped, `&&` split,
    $VAR / ${VAR} expanded from assignments made earlier in the block."""
    env: dict[str, str] = {}
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"\s&&\s", line):
            words = shlex.split(part, comments=True)
            if not words:
                continue
            m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", words[0])
            if m and len(words) == 1:
                env[m.group(1)] = m.group(2)
                continue
            expanded = []
            for w in words:
                if re.fullmatch(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", w):
                    expanded += shlex.split(env[w.strip("${}")])
                else:
                    expanded.append(w)
            out.append(expanded)
    return out


class Parsed(Exception):
    pass


def parse_only(argv: list[str], run) -> None:
    """Run a program until it has parsed its arguments; SystemExit(2) (argparse's error) fails."""
    original = argparse.ArgumentParser.parse_args

    def intercept(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    old_argv = sys.argv
    sys.argv = argv
    argparse.ArgumentParser.parse_args = intercept
    try:
        run()
    except Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = old_argv
    raise AssertionError(f"{argv}: the program never parsed its arguments")


SETUP = (["python3", "-m", "venv"], [".venv/bin/pip", "install"], [".venv/bin/python", "-m", "pytest"],
         ["mkdir", "-p"])


def check_command(words: list[str], capsys) -> None:
    if any(words[: len(s)] == s for s in SETUP):
        return
    if words[0] in ("./run.sh", "./test.sh"):
        path = REPO / words[0]
        assert path.is_file() and os.access(path, os.X_OK), f"{words[0]} is not an executable script"
        if words[0] == "./run.sh" and len(words) > 1:  # its arguments go to python -m refusal_jax.extract
            check_command([".venv/bin/python", "-m", "refusal_jax.extract", *words[1:]], capsys)
        return
    if words[0] in ("refusal-jax", ".venv/bin/refusal-jax"):  # the console script: COMMAND -> its module
        from refusal_jax.__main__ import COMMANDS

        assert len(words) > 1 and words[1] in COMMANDS, f"unknown refusal-jax command in {words}"
        check_command([".venv/bin/python", "-m", COMMANDS[words[1]][0], *words[2:]], capsys)
        return
    assert words[0] in (".venv/bin/python", "python"), f"no rule for the command {words}"
    if words[1] == "-m":
        module = words[2]
        assert module.startswith("refusal_jax."), f"no rule for the command {words}"
        parse_only([module, *words[3:]], lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
    else:
        script = REPO / words[1]
        assert script.is_file() and script.parent.name == "benchmarks", f"no rule for the command {words}"
        sys.path.insert(0, str(script.parent))
        try:
            parse_only([str(script), *words[2:]], lambda: runpy.run_path(str(script), run_name="__main__"))
        finally:
            sys.path.remove(str(script.parent))


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("code,at", BASH, ids=[at for _, at in BASH])
def test_bash_block_commands_parse(code, at, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cmds = commands(code)
    assert cmds, f"{at}: empty block"
    for words in cmds:
        try:
            check_command(words, capsys)
        except SystemExit as e:
            pytest.fail(f"{at}: {' '.join(words)} exited {e.code}: {capsys.readouterr().err[-2000:]}")


def test_bash_parsing_of_this_file():
    block = 'A="--x 1 --y=-2"\n# comment\n.venv/bin/python -m m $A --z \\\n    3   # note\nb && c d\n'
    assert commands(block) == [[".venv/bin/python", "-m", "m", "--x", "1", "--y=-2", "--z", "3"], ["b"], ["c", "d"]]

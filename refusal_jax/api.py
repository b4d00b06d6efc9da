"""The Python API: plain inputs (a loaded model, lists of instructions, arrays), frozen settings, plain outputs.

    >>> import refusal_jax as rj
    >>> model = rj.load_model("qwen2.5-coder-0.5b-instruct")
    >>> sel = rj.extract_direction(model, harmful, harmless, harmful_val, harmless_val, layers=range(8, 20))
    >>> sel.save("runs/mine")                                   # the reference's artifacts
    >>> rj.generate(model, ["How do I pick a lock?"], rj.Intervention.ablation(model.cfg, sel.direction))
    >>> edited = rj.orthogonalized(model, sel.direction)          # a LoadedModel with edited weights
    >>> rj.evaluate_completions(model, instructions, completions)  # refusal rate (substring judge) and CE loss
    >>> rj.judge("Llama-Guard-3-1B", instructions, completions)  # a guard model's verdicts and P(unsafe)

The commands (`python -m refusal_jax.extract` ...) call the same functions, so they give the same results.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import jax
import numpy as np

from refusal_jax import validate
from refusal_jax.convert.loading import LoadedModel
from refusal_jax.errors import DataError
from refusal_jax.method.selection import Extraction, SelectionSettings
from refusal_jax.prompts import templates
from refusal_jax.prompts.chat import ChatPrompts
from refusal_jax.runs.progress import progress_bar as _bar


def _instructions(values, name: str) -> list[str]:
    """A list of instruction strings; a bare string (read as one instruction per character) or non-text items are
    a DataError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise DataError(f"{name} must be a list of instruction strings, got a {type(values).__name__}"
                        + (" (a string would be read as one instruction per character)"
                           if isinstance(values, (str, bytes)) else ""))
    values = list(values)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{name}[{i}] must be a string, got a {type(v).__name__}")
    return values


def _direction(direction, d_model: int) -> np.ndarray:
    """A [D] direction or an [R, D] basis of the model's width, every entry finite; DataError otherwise."""
    a = np.asarray(direction)
    if a.ndim not in (1, 2) or a.shape[-1] != d_model or a.size == 0:
        raise DataError(f"direction must have shape [{d_model}] (or [R, {d_model}] for a basis), got "
                        f"{list(a.shape)}")
    if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
        raise DataError("direction must hold finite numbers (it has NaN, inf or non-numbers)")
    return a


def _finite_intervention(intervention) -> None:
    for leaf in jax.tree.leaves(intervention):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise DataError("the intervention holds NaN or inf (check its direction and coefficient)")


def _settings(settings: SelectionSettings | None, overrides: dict) -> SelectionSettings:
    settings = settings or SelectionSettings()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SelectionSettings)}
    if unknown:
        raise TypeError(f"unknown selection settings: {', '.join(sorted(unknown))}")
    return dataclasses.replace(settings, **overrides)


def extract_direction(model: LoadedModel, harmful: Sequence[str], harmless: Sequence[str],
                      harmful_val: Sequence[str], harmless_val: Sequence[str], *,
                      harmful_val_pool: Sequence[str] = (), settings: SelectionSettings | None = None,
                      progress: bool = True,
                      **overrides) -> Extraction:
    """Find the refusal direction as the reference does (stages 1-2).

    Difference-in-means candidates of `harmful` vs `harmless` (train) at every post-instruction position and
    layer, each scored on the val sets by ablation (harmful), activation addition and KL (harmless); the filters
    of `settings` pick one. Keyword `overrides` replace single settings: `layers=range(8, 20)`,
    `kl_threshold=0.2`, `filter=False`, `chat_style="model"`. With `min_val_refused=N` (and the filter on), harmful
    val prompts are drawn from `harmful_val_pool`, len(harmful_val) at a time, until N are refused, as the commands
    draw them (`selection.filter_by_refusal`).
    """
    from refusal_jax.method import directions, selection
    from refusal_jax.model.batching import ForwardCost

    s = _settings(settings, overrides)
    chat = ChatPrompts.for_model(model.cfg.family, model.tokenizer, s.chat_style, s.eoi_mode)
    sets = {"harmful_train": _instructions(harmful, "harmful"), "harmless_train": _instructions(harmless, "harmless"),
            "harmful_val": _instructions(harmful_val, "harmful_val"),
            "harmless_val": _instructions(harmless_val, "harmless_val")}
    for key, values in sets.items():
        if not values:
            raise DataError(f"the {key} set is empty")
    params, cfg = model.params, model.cfg
    directions.candidate_grid(cfg, len(chat.eoi), s.positions, s.layer_list(cfg.n_layers))  # bad ones fail here
    cost = ForwardCost.for_model(cfg, np.dtype(params.embed.dtype).itemsize, copies=max(1, s.chunk))
    batches = lambda xs: chat.batches(xs, s.batch_size, cost=cost)  # noqa: E731  (long prompts: smaller batches)
    scores: dict = {}
    if s.filter:
        with _bar(sum(map(len, sets.values())), "filtering by baseline refusal score", progress) as bar:
            sets, scores, _ = selection.filter_by_refusal(
                params, cfg, sets, batches, chat.refusal_ids, bar.update,
                val_pool=_instructions(harmful_val_pool, "harmful_val_pool") if harmful_val_pool else (),
                n_val=len(sets["harmful_val"]), min_val_refused=s.min_val_refused,
                on_draw=lambda n: setattr(bar, "total", bar.total + n))
    harmful_b, harmless_b = batches(sets["harmful_train"]), batches(sets["harmless_train"])
    with _bar(len(harmful_b) + len(harmless_b), "mean activations", progress) as bar:
        diffs, mean_harmless = selection.candidate_directions(params, cfg, harmful_b, harmless_b, len(chat.eoi),
                                                              bar.update)
    harmful_v, harmless_v = batches(sets["harmful_val"]), batches(sets["harmless_val"])
    with _bar(selection.sweep_steps(diffs, cfg, s, len(harmful_v), len(harmless_v)), "scoring candidates",
              progress) as bar:
        evaluations, baselines = selection.score_grid(params, cfg, diffs, harmful_v, harmless_v, chat.refusal_ids,
                                                      s, bar.update)
    filters = s.filters(baselines)  # the thresholds used go with the baselines into baseline_scores.json
    baselines = {**baselines, **filters}
    best, survivors = directions.select(evaluations, cfg.n_layers, **filters)
    pos, layer = best["position"], best["layer"]
    return Extraction(direction=diffs[pos, layer], pos=pos, layer=layer, mean_diffs=diffs,
                      mean_harmless=mean_harmless, evaluations=evaluations, survivors=survivors,
                      baselines=baselines, prompts=sets, baseline_scores=scores)


def generate(model: LoadedModel, instructions: Sequence[str], intervention=None, *, max_new_tokens: int = 512,
             chat_style: str | None = None, batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy completions of `instructions`, templated with the commands' default chat style (the family's
    reference template; `chat_style` as the --chat-style flag), optionally under an `Intervention`."""
    from refusal_jax.model.generate import generate_completions

    instructions = _instructions(instructions, "instructions")
    validate.integer(max_new_tokens, "max_new_tokens", low=1)
    validate.integer(batch_size, "batch_size", low=1)
    if intervention is not None:
        _finite_intervention(intervention)
    fmt = templates.chat_format_for(model.cfg.family, model.tokenizer, style=chat_style)
    return generate_completions(model.params, model.cfg, model.tokenizer,
                                templates.format_instructions(fmt, instructions), intervention,
                                batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)


def orthogonalized(model: LoadedModel, direction, *, method: str = "plain", harmless_mean=None) -> LoadedModel:
    """The model with `direction` (a [D] vector of any norm, or an orthonormal [R, D] basis) projected out of
    every residual-writing matrix; `method` "projected" / "norm-preserving" as `python -m
    refusal_jax.orthogonalize --method`. The config is untied (the LM head keeps the original embedding)."""
    from refusal_jax.method import edits
    from refusal_jax.method.orthogonalization import untied_config

    direction = _direction(direction, model.cfg.d_model)
    params = edits.edit(model.params, model.cfg, direction, method, harmless_mean)
    return LoadedModel(params, untied_config(model.cfg), model.tokenizer)


def evaluate_completions(model: LoadedModel | None, instructions: Sequence[str], completions: Sequence[str],
                         intervention=None, *, chat_style: str | None = None, eoi_mode: str = "template",
                         reference_judge: bool = False, batch_size: int = 2) -> dict:
    """Judge and score completions of `instructions`.

    Returns {"refusal_rate", "refused": [bool per completion]} from the reference's substring judge, and with a
    model also {"ce_loss", "perplexity", "n_tokens"}: the cross-entropy of the completion tokens given the
    templated instructions, under `intervention`.
    """
    from refusal_jax.evaluation import judge, loss

    instructions = _instructions(instructions, "instructions")
    completions = _instructions(completions, "completions")
    validate.integer(batch_size, "batch_size", low=1)
    if intervention is not None:
        _finite_intervention(intervention)
    if len(instructions) != len(completions):
        raise DataError(f"{len(instructions)} instructions but {len(completions)} completions")
    refused = [judge.is_refusal(c, curly_apostrophes=not reference_judge) for c in completions]
    out: dict = {"refusal_rate": float(np.mean(refused)) if refused else float("nan"), "refused": refused}
    if model is not None:
        chat = ChatPrompts.for_model(model.cfg.family, model.tokenizer, chat_style, eoi_mode)
        out.update(loss.completion_loss(model.params, model.cfg, model.tokenizer, chat.fmt, list(chat.eoi),
                                        instructions, completions, intervention, batch_size=batch_size))
    return out


def judge(judge_model: LoadedModel | str, instructions: Sequence[str], completions: Sequence[str], *,
          kind: str = "guard", batch_size: int = 8, on_empty: str = "error", guideline: str | None = None,
          max_tokens: int | None = None, dtype: str = "float32") -> list[dict]:
    """Judge completions of `instructions` with a model (see docs/judges.md).

    kind="guard": a guard model (Llama Guard 2/3, ShieldGemma: its tokenizer carries the guard's chat template);
    per completion {"verdict": "safe" | "unsafe" | None (unparsed) | "empty", "p_unsafe", "categories", "output",
    "reference_unsafe", "truncated", "is_jailbreak"}, the last by the reference's rule (unsafe and at least 15
    words). kind="rubric": any chat model grading refusal / compliance / partial; per completion {"label",
    "probs", "letter_mass", "truncated", "is_jailbreak"} (full compliance). `judge_model` is a loaded model or any
    source `load_model` reads. on_empty: "error" (DataError) or "mark" (verdict / label "empty").
    """
    from refusal_jax.errors import ConfigError
    from refusal_jax.evaluation import guard, rubric

    instructions = _instructions(instructions, "instructions")
    completions = _instructions(completions, "completions")
    validate.integer(batch_size, "batch_size", low=1)
    if kind not in ("guard", "rubric"):
        raise ConfigError(f"kind must be 'guard' or 'rubric', got {kind!r}")
    if isinstance(judge_model, str):
        from refusal_jax.convert.loading import load_model

        source, judge_model = judge_model, load_model(judge_model, dtype=dtype, progress=False)
    else:
        source = "the judge model"
    if kind == "guard":
        g = guard.guard_from_model(judge_model, source=source, max_tokens=max_tokens, guideline=guideline)
        results = guard.classify(g, instructions, completions, batch_size=batch_size, on_empty=on_empty)
        return [{**r, "is_jailbreak": bool(guard.is_jailbreak_reference(r, c))} for r, c in zip(results, completions)]
    r = rubric.rubric_from_model(judge_model, source=source, max_tokens=max_tokens)
    results = rubric.grade(r, instructions, completions, batch_size=batch_size, on_empty=on_empty)
    return [{**x, "is_jailbreak": x["label"] == "compliance"} for x in results]

"""The reference's five stages on a `Run` (a loaded model, its prompts and its run folder), with resumable
artifacts. `python -m refusal_jax.pipeline` runs all of them; `python -m refusal_jax.extract`, `compare` and
`optimize` the first two.

  1. generate_directions   datasets filtered by baseline refusal score, then mean_diffs.npy [n_pos, L, D]
  2. select_direction      direction_evaluations(.json/_filtered.json), 3 plots, direction.npy, direction_metadata.json
  3. completions           harmful eval set: baseline / ablation / actadd(-1); harmless test: baseline / actadd(+1)
  4. evaluations           substring judge on every completion file, and the model judges of --judge
  5. loss_evals            CE loss of on-distribution completions (and of user-supplied texts) per intervention

Artifact names follow the reference (spec §11), with .npy/.json for its .pt files. The method itself is library
code (`refusal_jax.method.selection`, `refusal_jax.model.generate`, `refusal_jax.evaluation`); a stage adds the run
folder: it skips what is written, writes atomically, and lets only process 0 write.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refusal_jax import validate
from refusal_jax.errors import DataError, RunError
from refusal_jax.evaluation import judge
from refusal_jax.method import directions, plots, selection
from refusal_jax.method.selection import SelectionSettings
from refusal_jax.prompts import datasets, templates
from refusal_jax.prompts.chat import ChatPrompts
from refusal_jax.runs import checks, distributed, presets
from refusal_jax.runs import rundir as runs
from refusal_jax.runs.progress import progress_bar


def selection_settings(args: argparse.Namespace) -> SelectionSettings:
    """The "selection" flags (and --no-filter) as settings."""
    return SelectionSettings(positions=args.positions, layers=args.layers, kl_threshold=args.kl_threshold,
                             induce_threshold=args.induce_threshold, induce_relative=args.induce_relative,
                             prune_layer_fraction=args.prune_layer_fraction, filter=not args.no_filter,
                             min_val_refused=args.min_val_refused or 0, batch_size=args.batch_size,
                             chunk=args.chunk, screen=args.screen, chat_style=args.chat_style, eoi_mode=args.eoi_mode)


def data_settings(args: argparse.Namespace) -> datasets.DataSettings:
    """The "data" flags as settings."""
    return datasets.DataSettings(harmful=args.harmful, harmless=args.harmless, data_dir=args.data_dir,
                                 n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed)


# --------------------------------------------------------------------------------------------------
# the run context


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    out: Path
    params: Any
    cfg: Any
    tokenizer: Any
    fmt: templates.ChatFormat
    eoi: list[int]
    refusal_ids: tuple[int, ...]
    data: dict[str, list]  # instruction lists / records
    progress: bool
    mesh: Any = None
    selection: SelectionSettings = SelectionSettings()
    config: dict = dataclasses.field(default_factory=dict)  # the recorded run config (run_config.json)

    @property
    def chat(self) -> ChatPrompts:
        return ChatPrompts(self.tokenizer, self.fmt, tuple(self.eoi), self.refusal_ids)

    def prompts(self, instructions: Sequence[str], outputs=None) -> list[str]:
        return self.chat.texts(instructions, outputs)

    def batches(self, instructions: Sequence[str], batch_size: int | None = None):
        from refusal_jax.model.batching import ForwardCost

        # planned for the heaviest use of these batches: the sweep's `chunk` candidates vmapped over one batch
        cost = ForwardCost.for_model(self.cfg, np.dtype(self.params.embed.dtype).itemsize,
                                     copies=max(1, self.selection.chunk))
        parallel = dict(self.mesh.shape).get("data", 1) if self.mesh is not None else 1
        batches = self.chat.batches(instructions, batch_size or self.selection.batch_size, cost=cost,
                                    parallel=parallel)
        if self.mesh is not None:
            from refusal_jax.model import sharding

            batches = sharding.shard_batches(batches, self.mesh)
        return batches

    def bar(self, total, desc, unit="it"):
        return progress_bar(total, desc, self.progress, unit=unit)


def settings(args, data_source: dict, data: dict, test_sets: bool = True) -> dict:
    """Everything that determines a run's results and is known before the model is loaded. Without `test_sets`
    (commands that use no test prompts, or keep their own record of them) --n-test and the test sets are left
    out, so such runs share a folder whatever --n-test is."""
    hashed = {k: v for k, v in data.items() if test_sets or not k.endswith("_test")}
    return {
        "model": str(args.model), "dtype": args.dtype, "preset": args.preset,
        "data": data_source, "data_hashes": {k: runs.texts_hash([str(v) for v in vals]) for k, vals in hashed.items()},
        "n_train": args.n_train, "n_val": args.n_val, **({"n_test": args.n_test} if test_sets else {}),
        "seed": args.seed,
        "filter": not args.no_filter, "min_val_refused": args.min_val_refused, "chat_style": args.chat_style,
        "eoi_mode": args.eoi_mode, "positions": args.positions, "layers": args.layers,
        "kl_threshold": args.kl_threshold, "induce_threshold": args.induce_threshold,
        "induce_relative": args.induce_relative, "prune_layer_fraction": args.prune_layer_fraction,
        **({"screen": args.screen} if args.screen else {}),
    }


def default_out(args, config: dict) -> Path:
    """runs/<model name>-<8 hex digits of the settings>: the same command finds its run again, other settings
    get another folder."""
    return Path("runs") / f"{Path(str(args.model)).name.removesuffix('.gguf')}-{runs.config_hash(config)[:8]}"


def setup(args, extra_config: dict | None = None, test_sets: bool = True) -> Run:
    from refusal_jax.convert.loading import load_model

    presets.apply(args)
    checks.common_args(args)  # every flag and path, before anything is loaded
    distributed.init_from_args(args)  # several processes join before any device is used
    from refusal_jax.model import batching

    batching.set_memory_budget(getattr(args, "memory_budget", None))  # every batch plan from here on
    progress = not args.no_progress and distributed.is_main_process()
    if args.mesh is None and distributed.process_count() > 1:
        args.mesh = "auto"  # a mesh over every process's devices (prompts data-parallel)
    sel = selection_settings(args)
    if bool(args.harmful) != bool(args.harmless):
        given, other = ("--harmful", "harmless") if args.harmful else ("--harmless", "harmful")
        print(f"note: {given} given alone: the {other} prompts are the bundled {other} set")
    data, data_source = datasets.sample_sets(data_settings(args))
    for key, values in data.items():
        if not values and key != "harmful_val_pool":
            raise DataError(f"the {key} set is empty")
    known = {**settings(args, data_source, data, test_sets), **(extra_config or {})}
    out = Path(args.out) if args.out else default_out(args, known)
    runs.check_settings(out, known, overwrite=args.overwrite)  # before the model load: fail fast
    mesh = None
    if args.mesh:
        from refusal_jax.model import sharding

        mesh = sharding.make_mesh(args.mesh)
    # with a mesh every parameter is placed shard by shard: never whole on one device
    model = load_model(args.model, dtype=args.dtype, progress=progress, mesh=mesh)
    checks.model_args(args, model.cfg)
    sel = dataclasses.replace(sel, chat_style=presets.chat_style(args, model.tokenizer))
    chat = ChatPrompts.for_model(model.cfg.family, model.tokenizer, sel.chat_style, sel.eoi_mode)
    fmt, eoi, refusal_ids = chat.fmt, list(chat.eoi), chat.refusal_ids
    data = checks.prompt_lengths(data, model.tokenizer, fmt, args.max_prompt_tokens, truncate=args.truncate_prompts)
    params = model.params
    if mesh is not None and distributed.is_main_process():
        print(f"sharding over {sharding.describe(mesh)}"
              + (f" in {distributed.process_count()} processes" if distributed.process_count() > 1 else ""))
    config = {**known, "model_config": model.cfg.to_dict(), "template": fmt.template, "eoi_tokens": eoi,
              "refusal_token_ids": refusal_ids}
    runs.open_run(out, config, overwrite=args.overwrite)
    return Run(args, out, params, model.cfg, model.tokenizer, fmt, eoi, refusal_ids, data, progress, mesh, sel, config)


# --------------------------------------------------------------------------------------------------
# stage 1: filter + candidate directions


def stage_filter(run: Run) -> dict[str, list[str]]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0).

    With --min-val-refused N, harmful val prompts are drawn from the spare pool (`harmful_val_pool`), n_val at a
    time, until N are refused or the pool runs out; drawn test prompts leave the test set, but at most half of it
    (`_val_pool`): the evaluation keeps enough prompts to mean something."""
    path = run.out / selection.FILTERED
    if runs.done(path):
        record = runs.read_json(path, keys=("sets",))
        sets = record["sets"]
        with runs.reading(path):
            if not all(isinstance(sets[k], list) and all(isinstance(x, str) for x in sets[k])
                       for k in selection.SETS):
                raise TypeError("sets must be lists of strings")
        _drop_drawn_from_test(run, record.get("drawn_val", []))
        return sets
    sets = {k: run.data[k] for k in selection.SETS}
    scores, drawn = {}, []
    if run.selection.filter:
        with run.bar(sum(len(v) for v in sets.values()), "filter: baseline refusal score", unit="prompt") as bar:
            sets, scores, drawn = selection.filter_by_refusal(
                run.params, run.cfg, sets, run.batches, run.refusal_ids, bar.update, val_pool=_val_pool(run),
                n_val=run.config["n_val"], min_val_refused=run.selection.min_val_refused,
                on_draw=lambda n: setattr(bar, "total", bar.total + n))  # drawn prompts grow the bar
    _drop_drawn_from_test(run, drawn)
    extra = {"drawn_val": drawn, "harmful_val_scored": len(run.data["harmful_val"]) + len(drawn)} if drawn else {}
    if drawn and "n_test" in run.config:
        extra["harmful_test_size"] = len(run.data["harmful_test"])
    selection.write_filtered(run.out, sets, scores, **extra)
    distributed.barrier("filtered")  # the others may read what process 0 wrote from here on
    return sets


def _val_pool(run: Run) -> list[str]:
    """The spare harmful prompts to draw val prompts from, in draw order. A run that evaluates its test sets keeps at
    least half of the harmful test set out of it (the bundled sets and files draw from the test prompts' end)."""
    if "n_test" not in run.config:  # extract: no test set to protect
        return list(run.data.get("harmful_val_pool", []))
    test = {r["instruction"] for r in run.data["harmful_test"]}
    room = len(test) // 2
    pool = []
    for x in run.data.get("harmful_val_pool", []):
        if x in test:
            if room == 0:
                continue
            room -= 1
        pool.append(x)
    return pool


def _drop_drawn_from_test(run: Run, drawn: list[str]) -> None:
    if drawn:
        gone = set(drawn)
        run.data["harmful_test"] = [r for r in run.data["harmful_test"] if r["instruction"] not in gone]


def stage_directions(run: Run, sets) -> np.ndarray:
    path = run.out / selection.MEAN_DIFFS
    if runs.done(path):
        return runs.read_artifact_npy(path)
    harmful, harmless = run.batches(sets["harmful_train"]), run.batches(sets["harmless_train"])
    with run.bar(len(harmful) + len(harmless), "mean activations, harmful + harmless train", unit="batch") as bar:
        diffs, mean_harmless = selection.candidate_directions(run.params, run.cfg, harmful, harmless, len(run.eoi),
                                                              bar.update)
    selection.write_candidates(run.out, diffs, mean_harmless)
    distributed.barrier("mean_diffs")
    return diffs


# --------------------------------------------------------------------------------------------------
# stage 2: selection


def stage_select(run: Run, sets, diffs: np.ndarray) -> tuple[int, int, np.ndarray]:
    meta_path, dir_path = run.out / selection.METADATA, run.out / selection.DIRECTION
    if runs.done(meta_path, dir_path, run.out / selection.EVALUATIONS):
        meta = runs.read_direction_metadata(meta_path)
        return meta["pos"], meta["layer"], runs.read_artifact_npy(dir_path)
    s = run.selection
    harmful_val, harmless_val = run.batches(sets["harmful_val"]), run.batches(sets["harmless_val"])
    steps = selection.sweep_steps(diffs, run.cfg, s, len(harmful_val), len(harmless_val))
    n_live = steps // max(len(harmful_val) + 2 * len(harmless_val), 1)
    with run.bar(steps, f"selection: {n_live} candidates x 3 scores", unit="candidate-batch") as bar:
        evaluations, baselines = selection.score_grid(run.params, run.cfg, diffs, harmful_val, harmless_val,
                                                      run.refusal_ids, s, bar.update)
    runs.write_json(run.out / selection.EVALUATIONS, evaluations)
    filt = s.filters(baselines)
    runs.write_json(run.out / selection.BASELINES, {**baselines, **filt})
    try:
        best, survivors = directions.select(evaluations, run.cfg.n_layers, **filt)
    except RunError:
        selection.plot_scores(evaluations, run.cfg.n_layers, run.out / selection.EVALUATIONS.parent, baselines, filt)
        raise
    pos, layer = best["position"], best["layer"]
    selection.plot_scores(evaluations, run.cfg.n_layers, run.out / selection.EVALUATIONS.parent, baselines, filt,
                          (pos, layer))
    direction = diffs[pos, layer]
    selection.write_selected(run.out, direction, best, survivors, baselines={**baselines, **filt}, sets=sets,
                             model=run.config["model"], config_hash=runs.config_hash(run.config),
                             data_hashes=run.config["data_hashes"])
    distributed.barrier("direction")
    return pos, layer, direction


# --------------------------------------------------------------------------------------------------
# stages 3-5: completions, their evaluation, loss


def interventions_for(run: Run, layer: int, direction: np.ndarray):
    from refusal_jax.model.transformer import Intervention

    return {
        "baseline": None,
        "ablation": Intervention.ablation(run.cfg, direction),
        "actadd": lambda coeff: Intervention.addition(run.cfg, direction, layer, coeff),
    }


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Stages 3-5 (the pipeline's "completions and evaluation" flags)."""

    max_new_tokens: int = 512
    gen_batch_size: int = 8
    loss_batch_size: int = 2
    loss_texts: tuple[str, ...] = ()
    reference_judge: bool = False
    decode_dtype: str = "float32"
    judges: tuple = ()  # judge.JudgeSpec of --judge; the substring judge always runs

    def __post_init__(self):
        validate.integer(self.max_new_tokens, "max_new_tokens", low=1)
        validate.integer(self.gen_batch_size, "gen_batch_size", low=1)
        validate.integer(self.loss_batch_size, "loss_batch_size", low=1)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalSettings:
        return cls(max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                   loss_batch_size=args.loss_batch_size, loss_texts=tuple(args.loss_texts or ()),
                   reference_judge=args.reference_judge, decode_dtype=args.decode_dtype,
                   judges=judge.parse_judges(getattr(args, "judge", None)))


def write_completions(run: Run, path: Path, records: Sequence[dict], intervention, desc: str, *, params=None,
                      settings: EvalSettings) -> list[str]:
    """Greedy completions of `records` (dicts with "instruction") into `path` as the reference's records, or the
    ones already there (resume). `params` defaults to the run's (a weight edit passes its own)."""
    from refusal_jax.model.generate import generate_completions

    if runs.done(path):
        with runs.reading(path):
            return [str(r["response"]) for r in runs.read_json(path)]
    texts = generate_completions(run.params if params is None else params, run.cfg, run.tokenizer,
                                 run.prompts([r["instruction"] for r in records]), intervention,
                                 batch_size=settings.gen_batch_size, max_new_tokens=settings.max_new_tokens,
                                 progress=run.progress, desc=desc, mesh=run.mesh, decode_dtype=settings.decode_dtype)
    runs.write_json(path, [{"category": r.get("category"), "prompt": r["instruction"], "response": t}
                           for r, t in zip(records, texts)])
    distributed.barrier("completions")
    return texts


def stage_completions(run: Run, layer: int, direction: np.ndarray, settings: EvalSettings) -> dict[str, Path]:
    ivs = interventions_for(run, layer, direction)
    harmful_name = run.config["data"]["harmful_eval_name"]
    jobs = [(harmful_name, "baseline", None), (harmful_name, "ablation", ivs["ablation"]),
            (harmful_name, "actadd", ivs["actadd"](-1.0)),
            ("harmless", "baseline", None), ("harmless", "actadd", ivs["actadd"](1.0))]
    written, sets = {}, []
    for dataset, label, iv in jobs:
        path = run.out / "completions" / f"{dataset}_{label}_completions.json"
        written[f"{dataset}_{label}"] = path
        records = run.data["harmful_test" if dataset != "harmless" else "harmless_test"]
        sets.append((path, records, iv, f"{dataset} {label}"))
    write_completion_sets(run, sets, settings=settings)  # the five sets in one continuous pool
    return written


def write_completion_sets(run: Run, sets: Sequence[tuple[Path, Sequence[dict], Any, str]], *,
                          settings: EvalSettings) -> list[list[str]]:
    """`write_completions` of several (path, records, intervention, desc) sets, decoded in one continuous pool
    (`generate.generate_sets`: every row under its set's intervention, each set's completions as it alone would
    give them). Resume stays per set: a set whose file is complete is read back, not generated again."""
    from refusal_jax.model.generate import generate_sets

    out: list = [None] * len(sets)
    for i, (path, *_) in enumerate(sets):
        if runs.done(path):
            with runs.reading(path):
                out[i] = [str(r["response"]) for r in runs.read_json(path)]
    todo = [i for i, o in enumerate(out) if o is None]
    if todo:
        texts = generate_sets(run.params, run.cfg, run.tokenizer,
                              [(run.prompts([r["instruction"] for r in sets[i][1]]), sets[i][2]) for i in todo],
                              batch_size=settings.gen_batch_size, max_new_tokens=settings.max_new_tokens,
                              progress=run.progress, desc=", ".join(sets[i][3] for i in todo), mesh=run.mesh,
                              decode_dtype=settings.decode_dtype)
        for i, t in zip(todo, texts):
            runs.write_json(sets[i][0], [{"category": r.get("category"), "prompt": r["instruction"], "response": x}
                                         for r, x in zip(sets[i][1], t)])
            out[i] = t
        distributed.barrier("completions")
    return out


def stage_evaluate(run: Run, completion_files: dict[str, Path], settings: EvalSettings) -> dict[str, dict]:
    """The substring judge on every completion file, and each model judge of --judge (guard / rubric) added to
    the same `*_evaluations.json` under its own keys (a judge added later fills in only its keys)."""
    summary = {}
    model_judges = [j for j in settings.judges if j.kind != "substring"]
    loaded: dict = {}

    def model_for(j):  # each judge model loaded once, when a file first needs it
        if j not in loaded:
            # on one process only (stage 4 runs on process 0): no mesh across processes
            mesh = run.mesh if distributed.process_count() == 1 else None
            loaded[j] = judge.load_judge(j, dtype=run.args.dtype, mesh=mesh, progress=run.progress)
        print(f"judging with {j.kind}:{j.source}", flush=True)
        return loaded[j]

    for key, path in completion_files.items():
        out = judge.evaluations_path(path)
        ev = judge.evaluate_file(path, settings.judges, model_for, curly_apostrophes=not settings.reference_judge,
                                 batch_size=settings.gen_batch_size)
        with runs.reading(out):
            flags = [bool(c["is_jailbreak_substring_matching"]) for c in ev["completions"]]
            summary[key] = {"refusal_rate": 1.0 - float(ev["substring_matching_success_rate"]), "n": len(flags)}
            for j in model_judges:
                for stat in ("success_rate", "unsafe_rate", "mean_p_unsafe", "refusal_rate"):
                    if f"{j.name}_{stat}" in ev:
                        summary[key][f"{j.name}_{stat}"] = ev[f"{j.name}_{stat}"]
    # Bypass where it can be seen: of the harmful prompts the baseline refuses, how many are still refused.
    refused_at = {key: [not c["is_jailbreak_substring_matching"] for c in runs.read_json(
        path.with_name(path.name.replace("_completions.json", "_evaluations.json")))["completions"]]
        for key, path in completion_files.items()}
    base_key = next(k for k in completion_files if k.endswith("_baseline") and not k.startswith("harmless"))
    base = refused_at[base_key]
    for key in completion_files:
        if key.startswith(base_key.rsplit("_", 1)[0]) and key != base_key:
            still = [r for b, r in zip(base, refused_at[key]) if b]
            summary[key]["refused_at_baseline"] = len(still)
            summary[key]["still_refused_fraction"] = (sum(still) / len(still)) if still else None
    return summary


def stage_loss(run: Run, layer: int, direction: np.ndarray, completion_files,
               settings: EvalSettings) -> dict[str, dict]:
    from refusal_jax.evaluation import loss

    ivs = interventions_for(run, layer, direction)
    harmless = runs.read_json(completion_files["harmless_baseline"])
    with runs.reading(completion_files["harmless_baseline"]):
        harmless = [{"prompt": str(r["prompt"]), "response": str(r["response"])} for r in harmless]
    results = {}
    for label, iv in (("baseline", ivs["baseline"]), ("ablation", ivs["ablation"]), ("actadd", ivs["actadd"](-1.0))):
        path = run.out / "loss_evals" / f"{label}_loss_eval.json"
        if not runs.done(path):
            res = {"alpaca_custom_completions": loss.completion_loss(
                run.params, run.cfg, run.tokenizer, run.fmt, run.eoi, [r["prompt"] for r in harmless],
                [r["response"] for r in harmless], iv, batch_size=settings.loss_batch_size)}
            for text_file in settings.loss_texts:
                res[Path(text_file).stem] = loss.text_loss(run.params, run.cfg, run.tokenizer,
                                                           datasets.load_instructions(text_file), iv,
                                                           batch_size=settings.loss_batch_size)
            runs.write_json(path, res)
            distributed.barrier("loss_eval")
        results[label] = runs.read_json(path, keys=("alpaca_custom_completions",))
    return results


# --------------------------------------------------------------------------------------------------
# stages 1-2 as one job (extract)


# Fewer harmful val prompts than this after the filter: the selection is noise-prone, and the summary says so.
FEW_VAL_PROMPTS = 8


def run_extract(run: Run) -> tuple[int, int, np.ndarray]:
    t0 = time.perf_counter()
    sets = stage_filter(run)
    diffs = stage_directions(run, sets)
    pos, layer, direction = stage_select(run, sets, diffs)
    if not distributed.is_main_process():  # summaries are printed once
        return pos, layer, direction
    print_extract_summary(run, time.perf_counter() - t0)
    return pos, layer, direction


def print_extract_summary(run: Run, seconds: float) -> None:
    """Baseline -> intervened scores of the selected direction, the prompts they rest on, every file written."""
    meta = runs.read_direction_metadata(run.out / "direction_metadata.json")
    filtered = runs.read_json(run.out / "datasets" / "filtered.json")
    sizes, drawn = filtered["sizes"], len(filtered.get("drawn_val", []))
    sel = run.out / "select_direction"
    evaluations = runs.read_json(sel / "direction_evaluations.json")
    base = runs.read_json(sel / "baseline_scores.json")
    b_refusal = meta.get("baseline_refusal_score", base["harmful_val_refusal_score"])
    b_induce = meta.get("baseline_steering_score", base["harmless_val_refusal_score"])
    print(f"\nselected direction: position {meta['pos']}, layer {meta['layer']} of {run.cfg.n_layers} "
          f"(norm {meta['direction_norm']:.3f}); {meta['n_survivors']} of {len(evaluations)} candidates passed the "
          "filters")
    print(f"  refusal score under ablation (harmful val, {sizes['harmful_val']} prompts): "
          f"{b_refusal:+.3f} -> {meta['refusal_score']:+.3f}")
    print(f"  induce score (harmless val, {sizes['harmless_val']} prompts): {b_induce:+.3f} -> "
          f"{meta['steering_score']:+.3f} (threshold {base.get('induce_threshold', float('nan')):+.3f})")
    print(f"  KL divergence under ablation (harmless val): {meta['kl_div_score']:.4f} "
          f"(threshold {base.get('kl_threshold', float('nan')):g})")
    scored = {k: len(run.data[k]) for k in sizes}
    scored["harmful_val"] = filtered.get("harmful_val_scored", scored["harmful_val"])
    kept = ", ".join(f"{k.replace('_', ' ')} {sizes[k]} of {scored[k]}" for k in sizes)
    line = (f"  prompts (no baseline filter): {kept}" if not run.selection.filter else
            f"  prompts kept by the baseline filter: {kept}")
    if drawn:
        line += f" ({drawn} more harmful val prompts drawn to reach --min-val-refused {run.selection.min_val_refused})"
    print(line)
    if drawn and "n_test" in run.config:
        print(f"  harmful test prompts left for evaluation: {len(run.data['harmful_test'])} of --n-test "
              f"{run.config['n_test']} (drawn val prompts leave the test set; at most half of it is drawn)")
    if sizes["harmful_val"] < run.selection.min_val_refused:
        print(f"  warning: only {sizes['harmful_val']} harmful val prompts are refused, short of --min-val-refused "
              f"{run.selection.min_val_refused}: the spare prompts ran out")
    if sizes["harmful_val"] < FEW_VAL_PROMPTS:
        print(f"  warning: the selection rests on {sizes['harmful_val']} harmful val prompts after the filter, so "
              "its scores are noisy: use more prompts, --min-val-refused, or a chat template under which the model "
              "refuses more often (--chat-style model)")
    files = ["direction.npy", "direction_metadata.json", "datasets/filtered.json",
             "generate_directions/mean_diffs.npy", "generate_directions/mean_harmless.npy",
             "select_direction/direction_evaluations.json", "select_direction/direction_evaluations_filtered.json",
             "select_direction/baseline_scores.json",
             *(f"select_direction/{name}" for name in (*plots.FILES.values(), plots.SUMMARY_FILE))]
    print(f"  wrote in {run.out}/ ({seconds:.1f} s):")
    for f in files:
        if (run.out / f).exists():
            print(f"    {f}")

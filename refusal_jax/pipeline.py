"""The reference's five stages, with resumable artifacts. `python -m refusal_jax.pipeline` runs all of them;
`python -m refusal_jax.extract` runs the first two.

  1. generate_directions   datasets filtered by baseline refusal score, then mean_diffs.npy [n_pos, L, D]
  2. select_direction      direction_evaluations(.json/_filtered.json), 3 plots, direction.npy, direction_metadata.json
  3. completions           harmful eval set: baseline / ablation / actadd(-1); harmless test: baseline / actadd(+1)
  4. evaluations           substring judge on every completion file
  5. loss_evals            CE loss of on-distribution completions (and of user-supplied texts) per intervention

Artifact names follow the reference (spec §11), with .npy/.json for its .pt files.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refusal_jax.errors import DataError, RunError
from refusal_jax.evaluation import judge
from refusal_jax.method import directions, plots, selection
from refusal_jax.method.selection import SelectionSettings
from refusal_jax.prompts import datasets, templates
from refusal_jax.prompts.chat import ChatPrompts
from refusal_jax.runs import distributed
from refusal_jax.runs import checks
from refusal_jax.runs import presets
from refusal_jax.runs import rundir as runs
from refusal_jax.runs import cli
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.runs.progress import progress_bar

# --------------------------------------------------------------------------------------------------
# command-line arguments shared by extract and pipeline


def add_common_args(p: argparse.ArgumentParser, *, selection: bool = True, n_test: bool = True) -> None:
    """The flags of every command that runs on a model with harmful / harmless prompts. `selection=False` leaves
    out the sweep and filter flags (--batch-size, --chunk, --positions, --layers, thresholds; the command then
    defines its own --batch-size); `n_test=False` leaves out --n-test (commands that generate no completions).
    Left-out flags keep their defaults."""

    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="converted checkpoint dir, .gguf file, HF model dir, HF hub id, or bundled model name "
                        "(default: the bundled qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--out", default=None,
                   help="run directory (default: runs/<model>-<hash of the settings>, so the same command resumes "
                        "and different settings never collide)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and activation dtype; statistics are always accumulated in float32/float64 "
                        "(default: float32)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a run with different settings (old artifacts are moved to "
                        "<out>/previous/)")
    cli.add_progress_flag(g)
    g.add_argument("--mesh", default=None,
                   help="shard over devices: e.g. 'data=4,model=2' (prompts on data; heads and MLP width on "
                        "model) or 'auto' (all devices on data); parameters are placed shard by shard, see "
                        "refusal_jax.model.sharding (default: one device; with several processes: auto)")
    distributed.add_args(p)
    g.add_argument("--preset", default=presets.DEFAULT_PRESET, choices=sorted(presets.PRESETS),
                   help="sizes and thresholds for every flag marked 'preset' that is not given: 'cpu' = a run of a "
                        "few minutes on a CPU (see README); 'reference' = the reference pipeline's sizes and "
                        "thresholds exactly (default: cpu)")
    d = p.add_argument_group("data (default: the bundled instruction sets)")
    d.add_argument("--harmful", help="harmful instructions file, .json/.jsonl/.csv/.txt (default: bundled)")
    d.add_argument("--harmless", help="harmless instructions file, .json/.jsonl/.csv/.txt (default: bundled)")
    d.add_argument("--data-dir", help="folder laid out like the reference's dataset/ (splits/, processed/): "
                                      "samples exactly as the reference, random.seed(42); used when neither "
                                      "--harmful nor --harmless is given (default: none)")
    d.add_argument("--n-train", type=int, default=None,
                   help="harmful and harmless train prompts before filtering " + presets.describe("n_train"))
    d.add_argument("--n-val", type=int, default=None,
                   help="harmful and harmless val prompts before filtering " + presets.describe("n_val"))
    if selection:
        d.add_argument("--min-val-refused", type=int, default=None,
                       help="draw more harmful val prompts (from the prompts left after train, val and test) until "
                            "at least this many are refused at baseline; 0 = never "
                            + presets.describe("min_val_refused"))
    if n_test:
        d.add_argument("--n-test", type=int, default=100,
                       help="harmful eval / harmless test prompts for completions, capped by what the bundled sets "
                            "leave after train and val (default: 100)")
    d.add_argument("--seed", type=int, default=42, help="sampling seed for instruction files and bundled sets; "
                                                         "the reference splits always use 42 (default: 42)")
    d.add_argument("--no-filter", action="store_true",
                   help="do not filter train/val prompts by the baseline refusal score (the reference filters)")
    d.add_argument("--max-prompt-tokens", type=int, default=checks.DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse a templated prompt longer than this many tokens, naming it (default "
                        f"{checks.DEFAULT_MAX_PROMPT_TOKENS}); one overlong prompt would make every batch of its "
                        "bucket that long")
    d.add_argument("--truncate-prompts", action="store_true",
                   help="cut overlong instructions to fit --max-prompt-tokens (with a warning) instead of refusing")
    d.add_argument("--eoi-mode", default="template", choices=templates.EOI_MODES,
                   help="post-instruction tokens: 'template' = the tokens that really end every prompt; "
                        "'reference' = the reference's encode(suffix), which differs for Llama-2, see README "
                        "(default: template)")
    d.add_argument("--chat-style", default=None, choices=sorted(templates.TEMPLATES) + [templates.MODEL_STYLE],
                   help="chat template: a named one, or 'model' = the model's own chat template with the system "
                        "prompt it adds by default; 'family's' = the family's reference template, no system prompt "
                        + presets.describe("chat_style"))
    if not selection:
        p.set_defaults(chunk=8, screen=0, positions=None, layers=None, kl_threshold=None, induce_threshold=None,
                       induce_relative=None, prune_layer_fraction=None, min_val_refused=None)
        if not n_test:
            p.set_defaults(n_test=100)
        return
    if not n_test:
        p.set_defaults(n_test=100)
    s = p.add_argument_group("selection")
    s.add_argument("--batch-size", type=int, default=32,
                   help="prompts per forward batch (default: 32, as the reference)")
    s.add_argument("--chunk", type=int, default=8,
                   help="candidate directions evaluated together in one vmapped call (default: 8)")
    s.add_argument("--screen", type=_non_negative_int, default=0, metavar="K",
                   help="score every candidate to first order from one backward pass per val set, evaluate exactly "
                        "only the K best (more rounds of K if none survives the filter), and select among those "
                        "(refusal_jax.method.screening; README 'Screening'); 0 = the exhaustive sweep (default: 0)")
    s.add_argument("--positions", type=_int_list, default=None,
                   help="sweep only these post-instruction positions, e.g. --positions=-1 or --positions=-2,-1 "
                        + presets.describe("positions"))
    s.add_argument("--layers", type=_layer_list, default=None,
                   help="sweep only these layers, e.g. 10-16 or 8,12, or 'middle' = from a quarter of the depth up "
                        "to the pruned layers " + presets.describe("layers"))
    s.add_argument("--kl-threshold", type=float, default=None,
                   help="discard candidates whose ablation changes the harmless val next-token distribution by a "
                        "KL above this " + presets.describe("kl_threshold"))
    s.add_argument("--induce-threshold", type=float, default=None,
                   help="discard candidates whose induce score (refusal score on harmless val under activation "
                        "addition) is below this; replaces --induce-relative " + presets.describe("induce_threshold"))
    s.add_argument("--induce-relative", type=float, default=None, metavar="F",
                   help="induce threshold relative to the measured baselines: harmless baseline + F x (harmful "
                        "baseline - harmless baseline) " + presets.describe("induce_relative"))
    s.add_argument("--prune-layer-fraction", type=float, default=None,
                   help="discard candidates in this last fraction of the layers "
                        + presets.describe("prune_layer_fraction"))


def _layer_list(text: str):
    return "middle" if text.strip() == "middle" else _int_list(text)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError(f"empty list {text!r}")
    return out


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
        batches = self.chat.batches(instructions, batch_size or self.selection.batch_size)
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
    time, until N are refused or the pool runs out; drawn test prompts leave the test set."""
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

            def keep(key, instructions):
                s = directions.baseline_refusal_scores(run.params, run.cfg, run.batches(instructions),
                                                       run.refusal_ids)
                scores.setdefault(key, []).extend(s.tolist())
                bar.update(len(instructions))
                return [x for x, k in zip(instructions, s > 0 if key.startswith("harmful") else s < 0) if k]

            for key, instructions in list(sets.items()):
                sets[key] = keep(key, instructions)
            pool = list(run.data.get("harmful_val_pool", []))
            while len(sets["harmful_val"]) < run.selection.min_val_refused and pool:
                more, pool = pool[: run.args.n_val], pool[run.args.n_val:]
                bar.total += len(more)
                drawn += more
                sets["harmful_val"] += keep("harmful_val", more)
        empty = [k for k, v in sets.items() if not v]
        if empty:
            raise RunError(f"after filtering by the baseline refusal score, {', '.join(empty)} is empty: the model "
                           "does not refuse those harmful prompts (or refuses all harmless ones). Use more or other "
                           "prompts, another --chat-style, or --no-filter.")
    _drop_drawn_from_test(run, drawn)
    extra = {"drawn_val": drawn, "harmful_val_scored": len(run.data["harmful_val"]) + len(drawn)} if drawn else {}
    selection.write_filtered(run.out, sets, scores, **extra)
    distributed.barrier("filtered")  # the others may read what process 0 wrote from here on
    return sets


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
        meta = runs.read_json(meta_path, keys=("pos", "layer"))
        return int(meta["pos"]), int(meta["layer"]), runs.read_artifact_npy(dir_path)
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalSettings:
        return cls(max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                   loss_batch_size=args.loss_batch_size, loss_texts=tuple(args.loss_texts or ()),
                   reference_judge=args.reference_judge, decode_dtype=args.decode_dtype)


def stage_completions(run: Run, layer: int, direction: np.ndarray, settings: EvalSettings) -> dict[str, Path]:
    from refusal_jax.model.generate import generate_completions

    ivs = interventions_for(run, layer, direction)
    harmful_name = run.config["data"]["harmful_eval_name"]
    jobs = [(harmful_name, "baseline", None), (harmful_name, "ablation", ivs["ablation"]),
            (harmful_name, "actadd", ivs["actadd"](-1.0)),
            ("harmless", "baseline", None), ("harmless", "actadd", ivs["actadd"](1.0))]
    written = {}
    for dataset, label, iv in jobs:
        path = run.out / "completions" / f"{dataset}_{label}_completions.json"
        written[f"{dataset}_{label}"] = path
        if runs.done(path):
            continue
        records = run.data["harmful_test" if dataset != "harmless" else "harmless_test"]
        texts = generate_completions(run.params, run.cfg, run.tokenizer, run.prompts([r["instruction"] for r in records]),
                                     iv, batch_size=settings.gen_batch_size, max_new_tokens=settings.max_new_tokens,
                                     progress=run.progress, desc=f"{dataset} {label}", mesh=run.mesh,
                                     decode_dtype=settings.decode_dtype)
        runs.write_json(path, [{"category": r.get("category"), "prompt": r["instruction"], "response": t}
                               for r, t in zip(records, texts)])
        distributed.barrier("completions")
    return written


def stage_evaluate(run: Run, completion_files: dict[str, Path], settings: EvalSettings) -> dict[str, dict]:
    summary = {}
    for key, path in completion_files.items():
        out = path.with_name(path.name.replace("_completions.json", "_evaluations.json"))
        if not out.exists():
            with runs.reading(path):
                ev = judge.substring_evaluation(runs.read_json(path), curly_apostrophes=not settings.reference_judge)
            runs.write_json(out, ev)
        ev = runs.read_json(out, keys=("substring_matching_success_rate", "completions"))
        with runs.reading(out):
            flags = [bool(c["is_jailbreak_substring_matching"]) for c in ev["completions"]]
            summary[key] = {"refusal_rate": 1.0 - float(ev["substring_matching_success_rate"]), "n": len(flags)}
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


def stage_loss(run: Run, layer: int, direction: np.ndarray, completion_files, settings: EvalSettings) -> dict[str, dict]:
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
# commands


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("completions and evaluation")
    g.add_argument("--max-new-tokens", type=int, default=512,
                   help="greedy tokens per completion (default: 512, as the reference)")
    g.add_argument("--gen-batch-size", type=int, default=8,
                   help="prompts decoded together: the slots of continuous batching, where a stopped row's slot "
                        "takes the next prompt (default: 8; the reference decodes static batches of 8)")
    g.add_argument("--decode-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="precision of the decoding copy of the matmul weights: bfloat16 (float32 accumulation) or "
                        "int8 weight-only with per-channel scales; a smaller copy, completions may differ from "
                        "float32; speed on CPU: README, Benchmarks; scores, directions and statistics "
                        "always use the model's weights (default: float32)")
    g.add_argument("--loss-batch-size", type=int, default=2,
                   help="sequences per CE-loss batch (default: 2, as the reference)")
    g.add_argument("--loss-texts", nargs="*", default=None,
                   help="text files (one document per line, or .json/.jsonl/.csv) whose CE loss is reported, e.g. "
                        "a local Pile sample, truncated to 256 tokens as the reference (default: none)")
    g.add_argument("--reference-judge", action="store_true",
                   help="substring judge exactly as the reference (ASCII apostrophes only)")


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
    meta = runs.read_json(run.out / "direction_metadata.json")
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
    line = (f"  prompts (no baseline filter): {kept}" if run.args.no_filter else
            f"  prompts kept by the baseline filter: {kept}")
    if drawn:
        line += f" ({drawn} more harmful val prompts drawn to reach --min-val-refused {run.args.min_val_refused})"
    print(line)
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


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refusal_jax.pipeline", description=(
        "All five stages of the reference pipeline: candidate directions, selection, completions (baseline / "
        "ablation / actadd), their substring evaluation, and CE-loss evaluation. Resumes after the last completed "
        "artifact."))
    add_common_args(p)
    add_pipeline_args(p)
    return p


@main_wrapper
def main(argv=None):
    args = pipeline_parser().parse_args(argv)
    checks.pipeline_args(args)
    run = setup(args, extra_config={"max_new_tokens": args.max_new_tokens, "reference_judge": args.reference_judge,
                                    "loss_texts": args.loss_texts,
                                    # recorded only when not the default, so earlier runs still resume
                                    **({"decode_dtype": args.decode_dtype} if args.decode_dtype != "float32" else {})})
    t0 = time.perf_counter()
    pos, layer, direction = run_extract(run)
    ev = EvalSettings.from_args(args)
    files = stage_completions(run, layer, direction, ev)
    summary = stage_evaluate(run, files, ev) if distributed.is_main_process() else {}  # host-only: process 0
    losses = stage_loss(run, layer, direction, files, ev)
    if not distributed.is_main_process():
        return
    print("\nrefusal rate (substring judge):")
    for key, s in summary.items():
        extra = ""
        if s.get("still_refused_fraction") is not None:
            extra = f"; still refused: {s['still_refused_fraction']:.3f} of the {s['refused_at_baseline']} refused at baseline"
        print(f"  {key:28s} {s['refusal_rate']:.3f}  (n={s['n']}){extra}")
    print("CE loss on the harmless baseline completions:")
    for label, res in losses.items():
        r = res["alpaca_custom_completions"]
        print(f"  {label:9s} {r['ce_loss']:.4f} ({r['n_tokens']} tokens)")
    runs.write_json(run.out / "summary.json", {"refusal_rates": summary, "loss": losses, "pos": pos, "layer": layer,
                                               "seconds": time.perf_counter() - t0})
    print(f"  wrote in {run.out}/: summary.json, "
          + ", ".join(str(f.relative_to(run.out)) for d in ("completions", "loss_evals")
                      for f in sorted((run.out / d).glob("*.json"))))


if __name__ == "__main__":
    main()

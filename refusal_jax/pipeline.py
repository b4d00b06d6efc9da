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
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from refusal_jax.evaluation import judge
from refusal_jax.method import directions
from refusal_jax.prompts import datasets, templates
from refusal_jax.runs import checks
from refusal_jax.runs import rundir as runs
from refusal_jax.model.batching import bucketed, encode, pad_id
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.errors import DataError, RunError

# --------------------------------------------------------------------------------------------------
# command-line arguments shared by extract and pipeline


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="converted checkpoint dir, .gguf file, HF model dir, HF hub id, or bundled model name "
                        "(default: the bundled qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--out", default=None, help="run directory (default: runs/<model name>)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter/activation dtype (statistics are always accumulated in float32/float64)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a run with a different config (old artifacts are moved to "
                        "<out>/previous/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--mesh", default=None,
                   help="shard over devices: e.g. 'data=4,model=2' (prompts on data; heads/MLP width on model) or "
                        "'auto' (all devices on data). Default: one device. On TPU pods call "
                        "jax.distributed.initialize() first (see refusal_jax.model.sharding)")
    d = p.add_argument_group("data (default: the bundled instruction sets)")
    d.add_argument("--harmful", help="harmful instructions file (.json/.jsonl/.csv/.txt)")
    d.add_argument("--harmless", help="harmless instructions file (.json/.jsonl/.csv/.txt)")
    d.add_argument("--data-dir", help="folder laid out like the reference's dataset/ (splits/, processed/): "
                                      "samples exactly as the reference (random.seed(42)); used when neither "
                                      "--harmful nor --harmless is given")
    d.add_argument("--n-train", type=int, default=128, help="harmful and harmless train prompts before filtering "
                                                             "(default 128)")
    d.add_argument("--n-val", type=int, default=32, help="harmful and harmless val prompts before filtering (default 32)")
    d.add_argument("--n-test", type=int, default=100,
                   help="harmful eval / harmless test prompts for completions (default 100; capped by what the "
                        "bundled sets leave after train and val)")
    d.add_argument("--seed", type=int, default=42, help="sampling seed for instruction files and bundled sets "
                                                         "(the reference splits always use 42)")
    d.add_argument("--no-filter", action="store_true",
                   help="do not filter train/val prompts by the baseline refusal score (reference: filter)")
    d.add_argument("--max-prompt-tokens", type=int, default=checks.DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse a templated prompt longer than this many tokens, naming it (default "
                        f"{checks.DEFAULT_MAX_PROMPT_TOKENS}); one overlong prompt would make every batch of its "
                        "bucket that long")
    d.add_argument("--truncate-prompts", action="store_true",
                   help="cut overlong instructions to fit --max-prompt-tokens (with a warning) instead of refusing")
    s = p.add_argument_group("selection")
    s.add_argument("--batch-size", type=int, default=32, help="prompts per forward batch (reference: 32)")
    s.add_argument("--chunk", type=int, default=8,
                   help="candidate directions evaluated together in one vmapped call (default 8)")
    s.add_argument("--positions", type=_int_list, default=None,
                   help="restrict the sweep to these post-instruction positions, e.g. --positions=-1 or --positions=-2,-1 (default all)")
    s.add_argument("--layers", type=_int_list, default=None,
                   help="restrict the sweep to these layers, e.g. 10-16 or 8,12 (default all)")
    s.add_argument("--kl-threshold", type=float, default=0.1, help="discard candidates with KL above this (0.1)")
    s.add_argument("--induce-threshold", type=float, default=0.0,
                   help="discard candidates whose actadd refusal score on harmless prompts is below this (0.0)")
    s.add_argument("--prune-layer-fraction", type=float, default=0.2,
                   help="discard candidates in the last fraction of layers (0.2)")
    s.add_argument("--eoi-mode", default="template", choices=templates.EOI_MODES,
                   help="post-instruction tokens: 'template' = the tokens that really end every prompt; "
                        "'reference' = the reference's encode(suffix) (differs for Llama-2, see README)")
    s.add_argument("--chat-style", default=None, choices=sorted(templates.TEMPLATES) + [templates.MODEL_STYLE],
                   help="force a chat template instead of the family's reference template (no system prompt); "
                        "'model' = the model's own chat template, with the system prompt it adds by default")


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

    def prompts(self, instructions: Sequence[str], outputs=None) -> list[str]:
        return templates.format_instructions(self.fmt, list(instructions), outputs)

    def batches(self, instructions: Sequence[str], batch_size: int | None = None):
        ids = encode(self.tokenizer, self.prompts(instructions))
        eoi = self.eoi
        for seq, text in zip(ids, instructions):
            if seq[-len(eoi):] != eoi:
                raise RunError(f"templated prompt does not end with the post-instruction tokens {eoi}: {text[:60]!r}"
                               " (try --eoi-mode)")
        # Small (filtered) sets get a smaller batch rather than filler rows.
        size = min(batch_size or self.args.batch_size, len(ids))
        batches = list(bucketed(ids, size, pad_id(self.tokenizer)))
        if self.mesh is not None:
            from refusal_jax.model import sharding

            batches = sharding.shard_batches(batches, self.mesh)
        return batches

    def bar(self, total, desc):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)


def _sample_data(args) -> tuple[dict[str, list], dict]:
    """Train/val instruction lists and eval/test records, plus a description for the run config."""
    if args.data_dir and not (args.harmful or args.harmless):
        sampled = datasets.sample_reference(args.data_dir, args.n_train, args.n_val)
        rng = sampled.pop("rng")
        jbb = datasets.reference_split(args.data_dir, "jailbreakbench")[: args.n_test]
        sampled["harmful_test"] = jbb
        sampled["harmless_test"] = datasets.sample_reference_test(rng, args.data_dir, args.n_test)
        return sampled, {"source": "reference_splits", "harmful_eval_name": "jailbreakbench"}
    bundled_harmful, bundled_harmless = datasets.default_records()
    if bool(args.harmful) != bool(args.harmless):
        given, other = ("--harmful", "harmless") if args.harmful else ("--harmless", "harmful")
        print(f"note: {given} given alone: the {other} prompts are the bundled {other} set")
    out, source = {}, {}
    for kind, path, bundled in (("harmful", args.harmful, bundled_harmful),
                                ("harmless", args.harmless, bundled_harmless)):
        records = datasets.load_records(path) if path else bundled
        source[kind] = str(path) if path else "bundled"
        records = list(records)
        random.Random(args.seed).shuffle(records)
        need = args.n_train + args.n_val
        if len(records) < need + 1:
            raise DataError(f"{source[kind]} {kind} set has {len(records)} prompts; --n-train {args.n_train} + "
                            f"--n-val {args.n_val} need {need}, plus at least one test prompt")
        out[f"{kind}_train"] = [r["instruction"] for r in records[: args.n_train]]
        out[f"{kind}_val"] = [r["instruction"] for r in records[args.n_train:need]]
        out[f"{kind}_test"] = records[need: need + args.n_test]
    source["harmful_eval_name"] = "harmful"
    return out, source


def setup(args, extra_config: dict | None = None) -> Run:
    from refusal_jax.convert.loading import load_model

    progress = not args.no_progress
    checks.common_args(args)
    data, data_source = _sample_data(args)
    for key, values in data.items():
        if not values:
            raise DataError(f"the {key} set is empty")
    model = load_model(args.model, dtype=args.dtype, progress=progress)
    checks.model_args(args, model.cfg)
    fmt = templates.chat_format_for(model.cfg.family, model.tokenizer, style=args.chat_style)
    eoi = templates.eoi_tokens(fmt, model.tokenizer, args.eoi_mode)
    data = checks.prompt_lengths(data, model.tokenizer, fmt, args.max_prompt_tokens, truncate=args.truncate_prompts)
    refusal_ids = tuple(int(i) for i in fmt.refusal_token_ids)
    params, mesh = model.params, None
    if args.mesh:
        from refusal_jax.model import sharding

        mesh = sharding.make_mesh(args.mesh)
        params = sharding.shard_params(params, model.cfg, mesh)
        print(f"sharding over {sharding.describe(mesh)}")
    config = {
        "model": str(args.model), "model_config": model.cfg.to_dict(), "dtype": args.dtype,
        "data": data_source, "data_hashes": {k: runs.texts_hash([str(v) for v in vals]) for k, vals in data.items()},
        "n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "seed": args.seed,
        "filter": not args.no_filter, "template": fmt.template, "eoi_tokens": eoi, "refusal_token_ids": refusal_ids,
        "positions": args.positions, "layers": args.layers, "kl_threshold": args.kl_threshold,
        "induce_threshold": args.induce_threshold, "prune_layer_fraction": args.prune_layer_fraction,
        **(extra_config or {}),
    }
    out = Path(args.out) if args.out else Path("runs") / Path(str(args.model)).name.removesuffix(".gguf")
    runs.open_run(out, config, overwrite=args.overwrite)
    return Run(args, out, params, model.cfg, model.tokenizer, fmt, eoi, refusal_ids, data, progress, mesh)


# --------------------------------------------------------------------------------------------------
# stage 1: filter + candidate directions


def stage_filter(run: Run) -> dict[str, list[str]]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0)."""
    path = run.out / "datasets" / "filtered.json"
    if path.exists():
        sets = runs.read_json(path, keys=("sets",))["sets"]
        with runs.reading(path):
            if not all(isinstance(sets[k], list) and all(isinstance(x, str) for x in sets[k])
                       for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")):
                raise TypeError("sets must be lists of strings")
        return sets
    sets = {k: run.data[k] for k in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    scores = {}
    if not run.args.no_filter:
        bar = run.bar(sum(len(v) for v in sets.values()), "filtering by baseline refusal score")
        for key, instructions in sets.items():
            s = directions.baseline_refusal_scores(run.params, run.cfg, run.batches(instructions), run.refusal_ids)
            scores[key] = s.tolist()
            keep = s > 0 if key.startswith("harmful") else s < 0
            sets[key] = [x for x, k in zip(instructions, keep) if k]
            bar.update(len(instructions))
        bar.close()
        empty = [k for k, v in sets.items() if not v]
        if empty:
            raise RunError(f"after filtering by the baseline refusal score, {', '.join(empty)} is empty: the model "
                           "does not refuse those harmful prompts (or refuses all harmless ones). Use more or other "
                           "prompts, or --no-filter.")
    runs.write_json(path, {"sets": sets, "baseline_scores": scores,
                           "sizes": {k: len(v) for k, v in sets.items()}})
    return sets


def stage_directions(run: Run, sets) -> np.ndarray:
    path = run.out / "generate_directions" / "mean_diffs.npy"
    if path.exists():
        return runs.read_artifact_npy(path)
    harmful, harmless = run.batches(sets["harmful_train"]), run.batches(sets["harmless_train"])
    bar = run.bar(len(harmful) + len(harmless), "mean activations")
    n_pos = len(run.eoi)
    mean_harmless = directions.mean_activations(run.params, run.cfg, harmless, n_pos, bar.update)
    diffs = directions.mean_activations(run.params, run.cfg, harmful, n_pos, bar.update) - mean_harmless
    bar.close()
    if not np.isfinite(diffs).all():
        raise RunError("mean activations contain NaN or infinite values (check the model dtype / weights)")
    # the harmless mean feeds projected / norm-preserving abliteration (orthogonalize --harmless-mean)
    runs.write_npy(path.with_name("mean_harmless.npy"), mean_harmless)
    runs.write_npy(path, diffs)
    return diffs


# --------------------------------------------------------------------------------------------------
# stage 2: selection


def stage_select(run: Run, sets, diffs: np.ndarray) -> tuple[int, int, np.ndarray]:
    meta_path, dir_path = run.out / "direction_metadata.json", run.out / "direction.npy"
    sel = run.out / "select_direction"
    if runs.done(meta_path, dir_path, sel / "direction_evaluations.json"):
        meta = runs.read_json(meta_path, keys=("pos", "layer"))
        return int(meta["pos"]), int(meta["layer"]), runs.read_artifact_npy(dir_path)
    a = run.args
    grid = directions.candidate_grid(run.cfg, len(run.eoi), a.positions, a.layers)
    harmful_val, harmless_val = run.batches(sets["harmful_val"]), run.batches(sets["harmless_val"])
    # progress counts candidate x batch evaluations over the three scores
    steps = len(directions.live_candidates(diffs, grid)) * (len(harmful_val) + 2 * len(harmless_val))
    bar = run.bar(steps, f"scoring {len(grid)} candidates")
    t0 = time.perf_counter()
    evaluations, baselines = directions.score_candidates(run.params, run.cfg, diffs, harmful_val, harmless_val,
                                                         run.refusal_ids, grid, chunk=a.chunk, progress=bar.update)
    bar.close()
    sweep_s = time.perf_counter() - t0
    base_harmful, base_harmless = baselines["harmful_refusal_score"], baselines["harmless_refusal_score"]
    runs.write_json(sel / "direction_evaluations.json", evaluations)
    filt = dict(kl_threshold=a.kl_threshold, induce_threshold=a.induce_threshold,
                prune_layer_fraction=a.prune_layer_fraction)
    plot_scores(evaluations, run.cfg.n_layers, sel, base_harmful, base_harmless)
    try:
        best, survivors = directions.select(evaluations, run.cfg.n_layers, **filt)
    finally:
        runs.write_json(sel / "baseline_scores.json", {"harmful_val_refusal_score": float(base_harmful),
                                                      "harmless_val_refusal_score": float(base_harmless),
                                                      "sweep_seconds": sweep_s, "n_candidates": len(grid)})
    runs.write_json(sel / "direction_evaluations_filtered.json", survivors)
    pos, layer = best["position"], best["layer"]
    direction = diffs[pos, layer]
    runs.write_npy(dir_path, direction)
    run_cfg = runs.read_json(run.out / runs.RUN_CONFIG)
    runs.write_json(meta_path, {
        "pos": pos, "layer": layer, "model": str(a.model), "config_hash": run_cfg["hash"],
        "data_hashes": run_cfg["config"]["data_hashes"], "refusal_score": best["refusal_score"],
        "steering_score": best["steering_score"], "kl_div_score": best["kl_div_score"],
        "n_survivors": len(survivors), "direction_norm": float(np.linalg.norm(direction)),
    })
    return pos, layer, direction


def plot_scores(evaluations, n_layers, out_dir: Path, base_harmful: float, base_harmless: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = sorted({e["position"] for e in evaluations})
    for key, name, title, base in (
            ("refusal_score", "ablation_scores.png", "Refusal score on harmful val under directional ablation",
             base_harmful),
            ("steering_score", "actadd_scores.png", "Refusal score on harmless val under activation addition",
             base_harmless),
            ("kl_div_score", "kl_div_scores.png", "KL divergence on harmless val under directional ablation", 0.0)):
        fig, ax = plt.subplots(figsize=(9, 5))
        for pos in positions:
            pts = sorted((e["layer"], e[key]) for e in evaluations if e["position"] == pos)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"pos {pos}")
        ax.axhline(base, color="black", ls="--", lw=1, label="baseline")
        ax.set_xlabel("layer (source of the direction)")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.legend(fontsize=8)
        runs.save_figure(fig, out_dir / name)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# stages 3-5: completions, their evaluation, loss


def interventions_for(run: Run, layer: int, direction: np.ndarray):
    from refusal_jax.model.transformer import Intervention

    return {
        "baseline": None,
        "ablation": Intervention.ablation(run.cfg, direction),
        "actadd": lambda coeff: Intervention.addition(run.cfg, direction, layer, coeff),
    }


def stage_completions(run: Run, layer: int, direction: np.ndarray) -> dict[str, Path]:
    from refusal_jax.model.generate import generate_completions

    ivs = interventions_for(run, layer, direction)
    harmful_name = runs.read_json(run.out / runs.RUN_CONFIG)["config"]["data"]["harmful_eval_name"]
    jobs = [(harmful_name, "baseline", None), (harmful_name, "ablation", ivs["ablation"]),
            (harmful_name, "actadd", ivs["actadd"](-1.0)),
            ("harmless", "baseline", None), ("harmless", "actadd", ivs["actadd"](1.0))]
    written = {}
    for dataset, label, iv in jobs:
        path = run.out / "completions" / f"{dataset}_{label}_completions.json"
        written[f"{dataset}_{label}"] = path
        if path.exists():
            continue
        records = run.data["harmful_test" if dataset != "harmless" else "harmless_test"]
        texts = generate_completions(run.params, run.cfg, run.tokenizer, run.prompts([r["instruction"] for r in records]),
                                     iv, batch_size=run.args.gen_batch_size, max_new_tokens=run.args.max_new_tokens,
                                     progress=run.progress, desc=f"{dataset} {label}", mesh=run.mesh)
        runs.write_json(path, [{"category": r.get("category"), "prompt": r["instruction"], "response": t}
                               for r, t in zip(records, texts)])
    return written


def stage_evaluate(run: Run, completion_files: dict[str, Path]) -> dict[str, dict]:
    summary = {}
    for key, path in completion_files.items():
        out = path.with_name(path.name.replace("_completions.json", "_evaluations.json"))
        if not out.exists():
            with runs.reading(path):
                ev = judge.substring_evaluation(runs.read_json(path), curly_apostrophes=not run.args.reference_judge)
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


def stage_loss(run: Run, layer: int, direction: np.ndarray, completion_files) -> dict[str, dict]:
    from refusal_jax.evaluation import loss

    ivs = interventions_for(run, layer, direction)
    harmless = runs.read_json(completion_files["harmless_baseline"])
    with runs.reading(completion_files["harmless_baseline"]):
        harmless = [{"prompt": str(r["prompt"]), "response": str(r["response"])} for r in harmless]
    results = {}
    for label, iv in (("baseline", ivs["baseline"]), ("ablation", ivs["ablation"]), ("actadd", ivs["actadd"](-1.0))):
        path = run.out / "loss_evals" / f"{label}_loss_eval.json"
        if not path.exists():
            res = {"alpaca_custom_completions": loss.completion_loss(
                run.params, run.cfg, run.tokenizer, run.fmt, run.eoi, [r["prompt"] for r in harmless],
                [r["response"] for r in harmless], iv, batch_size=run.args.loss_batch_size)}
            for text_file in run.args.loss_texts or []:
                res[Path(text_file).stem] = loss.text_loss(run.params, run.cfg, run.tokenizer,
                                                           datasets.load_instructions(text_file), iv,
                                                           batch_size=run.args.loss_batch_size)
            runs.write_json(path, res)
        results[label] = runs.read_json(path, keys=("alpaca_custom_completions",))
    return results


# --------------------------------------------------------------------------------------------------
# commands


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("completions and evaluation")
    g.add_argument("--max-new-tokens", type=int, default=512, help="greedy tokens per completion (reference: 512)")
    g.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generation batch (reference: 8)")
    g.add_argument("--loss-batch-size", type=int, default=2, help="sequences per loss batch (reference: 2)")
    g.add_argument("--loss-texts", nargs="*", default=None,
                   help="text files (one document per line, or .json/.jsonl/.csv) whose CE loss is reported, e.g. "
                        "a local Pile sample; truncated to 256 tokens as the reference")
    g.add_argument("--reference-judge", action="store_true",
                   help="substring judge exactly as the reference (ASCII apostrophes only)")


def run_extract(run: Run) -> tuple[int, int, np.ndarray]:
    t0 = time.perf_counter()
    sets = stage_filter(run)
    diffs = stage_directions(run, sets)
    pos, layer, direction = stage_select(run, sets, diffs)
    meta = runs.read_json(run.out / "direction_metadata.json",
                          keys=("direction_norm", "refusal_score", "steering_score", "kl_div_score", "n_survivors"))
    sizes = runs.read_json(run.out / "datasets" / "filtered.json", keys=("sizes",))["sizes"]
    print(f"\nselected direction: pos {pos}, layer {layer} of {run.cfg.n_layers} (norm {meta['direction_norm']:.3f})")
    print(f"  refusal score under ablation {meta['refusal_score']:.3f}, induce score {meta['steering_score']:.3f}, "
          f"KL {meta['kl_div_score']:.4f}; {meta['n_survivors']} candidates survived the filter")
    print(f"  prompts after filtering: {sizes}")
    print(f"  wrote {run.out}/direction.npy, direction_metadata.json, generate_directions/mean_diffs.npy, "
          f"select_direction/ ({time.perf_counter() - t0:.1f} s)")
    return pos, layer, direction


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
                                    "loss_texts": args.loss_texts})
    t0 = time.perf_counter()
    pos, layer, direction = run_extract(run)
    files = stage_completions(run, layer, direction)
    summary = stage_evaluate(run, files)
    losses = stage_loss(run, layer, direction, files)
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
    print(f"wrote {run.out}/summary.json")


if __name__ == "__main__":
    main()

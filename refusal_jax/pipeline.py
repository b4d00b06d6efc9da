"""python -m refusal_jax.pipeline: the reference's five stages (refusal_jax.runs.stages), resumable."""

from __future__ import annotations

import argparse
import time

from refusal_jax.evaluation import judge
from refusal_jax.runs import checks, cli, distributed
from refusal_jax.runs import rundir as runs
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.runs.stages import EvalSettings, run_extract, setup, stage_completions, stage_evaluate, stage_loss


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refusal_jax.pipeline", description=(
        "All five stages of the reference pipeline: candidate directions, selection, completions (baseline / "
        "ablation / actadd), their substring evaluation, and CE-loss evaluation. Resumes after the last completed "
        "artifact."))
    cli.add_common_args(p)
    cli.add_completion_args(p)
    return p


@main_wrapper
def main(argv=None):
    args = pipeline_parser().parse_args(argv)
    checks.pipeline_args(args)
    judge.check_judges(judge.parse_judges(args.judge))  # a bad --judge fails before the model loads
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
            extra = (f"; still refused: {s['still_refused_fraction']:.3f} of the {s['refused_at_baseline']} "
                     "refused at baseline")
        print(f"  {key:28s} {s['refusal_rate']:.3f}  (n={s['n']}){extra}")
        for name in (j.name for j in ev.judges if j.kind != "substring"):
            print(f"  {'':28s} {name}: jailbreak rate {s[name + '_success_rate']:.3f}"
                  + (f", unsafe {s[name + '_unsafe_rate']:.3f}" if name + "_unsafe_rate" in s else "")
                  + (f", mean P(unsafe) {s[name + '_mean_p_unsafe']:.3f}"
                     if s.get(name + "_mean_p_unsafe") is not None else "")
                  + (f", refusal {s[name + '_refusal_rate']:.3f}" if name + "_refusal_rate" in s else ""))
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

"""python -m refusal_jax.optimize: refusal direction optimization (RDO, refusal_jax.method.optimization) from a
difference-in-means direction, resumable; writes OUT/direction.npy, optimize_metadata.json, loss_curves.png,
targets.json and checkpoints/."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from refusal_jax.errors import DataError, RunError
from refusal_jax.method.optimization import (
    DEFAULT_WEIGHTS,
    LOSS_TERMS,
    RDOData,
    generate_targets,
    make_examples,
    plot_loss_curves,
    train,
)
from refusal_jax.model.transformer import Intervention
from refusal_jax.runs import cli, distributed
from refusal_jax.runs import rundir as runs
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.validate import real_arg


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refusal_jax.optimize", description=(
        "Refusal direction optimization (Wollschläger et al. 2025): starting from a difference-in-means "
        "direction, learn a unit direction with Adam through the frozen model so that ablating it makes harmful "
        "prompts produce compliant targets, adding it at --layer makes harmless prompts produce refusal targets, "
        "and ablating it leaves harmless predictions unchanged (KL). Targets are the model's own greedy "
        "completions under the starting direction's ablation / actadd. Checkpoints every --checkpoint-every "
        "steps; rerunning the same command resumes. Writes OUT/direction.npy (r̂ times the starting direction's "
        "norm), optimize_metadata.json, loss_curves.png, targets.json."))
    cli.add_common_args(p, selection=False, n_test=False)
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=8,
                   help="examples of each loss per Adam step, and prompts per forward batch (default: 8)")
    cli.add_direction_flag(g, "the starting difference-in-means direction ([d_model])", required=True)
    cli.add_layer_flag(g, "activation-addition layer of the addition loss")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps in total (default: 200)")
    g.add_argument("--lr", type=real_arg("--lr", low=0, low_open=True), default=1e-2,
                   help="Adam learning rate (default: 0.01)")
    g.add_argument("--ablation-weight", type=real_arg("--ablation-weight", low=0), default=DEFAULT_WEIGHTS["ablation"],
                   help="weight of the ablation loss: CE of the compliant targets on harmful prompts with the "
                        f"direction ablated (default: {DEFAULT_WEIGHTS['ablation']})")
    g.add_argument("--addition-weight", type=real_arg("--addition-weight", low=0), default=DEFAULT_WEIGHTS["addition"],
                   help="weight of the addition loss: CE of the refusal targets on harmless prompts with the "
                        f"direction added at --layer (default: {DEFAULT_WEIGHTS['addition']})")
    g.add_argument("--retain-weight", type=real_arg("--retain-weight", low=0), default=DEFAULT_WEIGHTS["retain"],
                   help="weight of the retain loss: KL of the harmless next-token distributions with the direction "
                        f"ablated against without (default: {DEFAULT_WEIGHTS['retain']})")
    g.add_argument("--independent-of", default=None, metavar="PATH.npy",
                   help="directions [m, d_model] (or [d_model]) the new one should be independent of "
                        "(default: none)")
    g.add_argument("--independence-weight", type=real_arg("--independence-weight", low=0), default=0.0,
                   help="weight of sum |cos(r, b_j)|^2 against --independent-of (default: 0)")
    g.add_argument("--add-scale", type=real_arg("--add-scale", low=0, low_open=True), default=None,
                   help="norm of the added vector in the addition loss (default: the starting direction's norm)")
    g.add_argument("--target-tokens", type=int, default=30, help="tokens per generated target (default: 30)")
    g.add_argument("--targets", default=None, metavar="FILE.json",
                   help="use these targets instead of generating them: {\"ablation\": [{\"instruction\", "
                        "\"target\"}, ...], \"addition\": [...]} (default: generate them)")
    g.add_argument("--gen-batch-size", type=int, default=16,
                   help="prompts per target-generation batch (default: 16)")
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default: 50)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of the per-step batch sampling (default: 0)")
    return p


def _targets(run, args, sets, dim_direction, layer) -> dict:
    """{"ablation": {"instructions", "prompt_ids", "target_ids", "texts"}, "addition": {...}}: cached in OUT."""
    from refusal_jax.model.batching import encode

    path = run.out / "targets.json"
    if path.exists():
        return runs.read_json(path)
    out = {}
    if args.targets:
        tpath = Path(args.targets).expanduser()
        if not tpath.is_file():
            raise DataError(f"--targets {tpath} does not exist")
        given = runs.read_json(tpath)
        for kind in ("ablation", "addition"):
            recs = given.get(kind) if isinstance(given, dict) else None
            if not recs or not all(isinstance(r, dict) and isinstance(r.get("instruction"), str)
                                   and isinstance(r.get("target"), str) and r["target"] for r in recs):
                raise DataError(f"{tpath}: needs a non-empty {kind!r} list of {{\"instruction\", \"target\"}} "
                                "objects with non-empty strings")
            instr = [r["instruction"] for r in recs]
            texts = [r["target"] for r in recs]
            out[kind] = {"instructions": instr, "prompt_ids": encode(run.tokenizer, run.prompts(instr)),
                         "target_ids": [list(run.tokenizer.encode(t, add_special_tokens=False)) for t in texts],
                         "texts": texts, "source": str(args.targets)}
    else:
        for kind, instr, iv in (
                ("ablation", sets["harmful_train"], Intervention.ablation(run.cfg, dim_direction)),
                ("addition", sets["harmless_train"], Intervention.addition(run.cfg, dim_direction, layer, 1.0))):
            ids = generate_targets(run.params, run.cfg, run.tokenizer, run.prompts(instr), iv,
                                   max_new_tokens=args.target_tokens, batch_size=args.gen_batch_size,
                                   progress=run.progress, desc=f"{kind} targets")
            keep = [i for i, t in enumerate(ids) if t]
            prompt_ids = encode(run.tokenizer, run.prompts(instr))
            out[kind] = {"instructions": [instr[i] for i in keep], "prompt_ids": [prompt_ids[i] for i in keep],
                         "target_ids": [ids[i] for i in keep],
                         "texts": [run.tokenizer.decode(ids[i], skip_special_tokens=True) for i in keep],
                         "source": f"greedy, {args.target_tokens} tokens, under DIM "
                                   f"{'ablation' if kind == 'ablation' else f'actadd at layer {layer}'}"}
    runs.write_json(path, out)
    return out


@main_wrapper
def main(argv=None):
    from refusal_jax.method import scoring
    from refusal_jax.method.orthogonalization import load_direction
    from refusal_jax.model.batching import encode, pad_id
    from refusal_jax.runs import stages

    p = parser()
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required")
    from refusal_jax.runs import checks

    checks.optimize_args(args)
    load_direction(args.direction, None)
    layer = args.layer if args.layer is not None else checks.metadata_layer(args.direction)
    if layer is None:
        p.error("--layer is required (no direction_metadata.json next to --direction)")
    checks.direction_and_layer(args, layer)
    weights = {"ablation": args.ablation_weight, "addition": args.addition_weight, "retain": args.retain_weight,
               "independence": args.independence_weight}
    dim_path = Path(args.direction).expanduser()
    dim_path = dim_path / "direction.npy" if dim_path.is_dir() else dim_path
    extra = {"optimize": {"direction_sha256": runs.sha256_file(dim_path), "layer": layer, "lr": args.lr,
                          "batch_size": args.batch_size, "weights": weights, "add_scale": args.add_scale,
                          "target_tokens": args.target_tokens, "targets": args.targets, "train_seed": args.train_seed,
                          "independent_of": args.independent_of}}
    # --steps is left out of the settings: rerun with more steps to continue
    run = stages.setup(args, extra_config=extra, test_sets=False)
    t0 = time.perf_counter()
    dim_direction = load_direction(args.direction, run.cfg.d_model)
    if dim_direction.ndim != 1:
        raise DataError("--direction must be one direction [d_model], not a basis")
    if not 0 <= layer < run.cfg.n_layers:
        raise RunError(f"--layer {layer} out of range 0..{run.cfg.n_layers - 1}")
    sets = stages.stage_filter(run)
    tg = _targets(run, args, sets, dim_direction, layer)
    pad = pad_id(run.tokenizer)
    data = RDOData(
        ablation=make_examples(tg["ablation"]["prompt_ids"], tg["ablation"]["target_ids"], pad),
        addition=make_examples(tg["addition"]["prompt_ids"], tg["addition"]["target_ids"], pad),
        retain=make_examples(encode(run.tokenizer, run.prompts(sets["harmless_train"])), None, pad))
    fixed = None
    if args.independent_of:
        fixed = runs.read_npy(Path(args.independent_of).expanduser(), "--independent-of")
        fixed = np.atleast_2d(fixed).astype(np.float32)
        if fixed.shape[-1] != run.cfg.d_model:
            raise DataError(f"--independent-of has shape {fixed.shape}; needs [m, {run.cfg.d_model}]")
    result = train(run.params, run.cfg, data, dim_direction, layer=layer, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, weights=weights, add_scale=args.add_scale, fixed_directions=fixed,
                   seed=args.train_seed, checkpoint_dir=run.out / "checkpoints",
                   checkpoint_every=args.checkpoint_every, progress=run.progress)
    scale = float(np.linalg.norm(dim_direction)) if args.add_scale is None else float(args.add_scale)
    r_hat = result.direction
    runs.write_npy(run.out / "direction.npy", (r_hat * scale).astype(np.float32))
    if result.history["step"]:
        plot_loss_curves(result.history, run.out / "loss_curves.png")

    # Score both directions the way selection does: bypass (harmful val, ablation), induce (harmless val,
    # actadd at `layer`), KL (harmless val, ablation).
    harmful_val, harmless_val = run.batches(sets["harmful_val"]), run.batches(sets["harmless_val"])
    scores = {}
    for name, vec in (("dim", dim_direction), ("optimized", r_hat * scale)):
        abl = [Intervention.ablation(run.cfg, vec)]
        bypass = scoring.evaluate_interventions(run.params, run.cfg, harmful_val, abl, run.refusal_ids)
        harm = scoring.evaluate_interventions(run.params, run.cfg, harmless_val, abl, run.refusal_ids)
        induce = scoring.evaluate_interventions(run.params, run.cfg, harmless_val,
                                                   [Intervention.addition(run.cfg, vec, layer, 1.0)], run.refusal_ids)
        scores[name] = {"refusal_score": float(bypass["refusal_score"][0]),
                        "steering_score": float(induce["refusal_score"][0]), "kl_div_score": float(harm["kl"][0])}
    h = result.history
    meta = {
        "method": "RDO (Wollschläger et al. 2025): ablation CE + addition CE + retain KL, Adam, projected onto "
                  "the unit sphere after every step",
        "model": str(args.model), "source_direction": str(dim_path), "layer": layer, "steps": result.steps,
        "lr": args.lr, "batch_size": args.batch_size, "weights": weights, "add_scale": scale,
        "saved_norm": scale, "train_seed": args.train_seed, "resumed_from": result.resumed_from,
        "cosine_with_source": float(r_hat @ dim_direction / np.linalg.norm(dim_direction)),
        "n_examples": {k: len(getattr(data, k)) for k in ("ablation", "addition", "retain")},
        "targets": {k: tg[k]["source"] for k in ("ablation", "addition")},
        "first_loss": {k: h[k][0] for k in ["total", *LOSS_TERMS]} if h["step"] else None,
        "final_loss": {k: h[k][-1] for k in ["total", *LOSS_TERMS]} if h["step"] else None,
        "val_scores": scores, "seconds": time.perf_counter() - t0,
    }
    runs.write_json(run.out / "optimize_metadata.json", meta)
    if not distributed.is_main_process():  # the summary is printed once
        return
    print(f"\noptimized direction after {result.steps} steps (layer {layer}); cosine with the starting direction "
          f"{meta['cosine_with_source']:.4f}")
    if h["step"]:
        print(f"  loss {h['total'][0]:.4f} -> {h['total'][-1]:.4f} (ablation {h['ablation'][-1]:.4f}, addition "
              f"{h['addition'][-1]:.4f}, retain {h['retain'][-1]:.4f})")
    for name, s in scores.items():
        print(f"  {name:9s} bypass refusal score {s['refusal_score']:.3f}, induce {s['steering_score']:.3f}, "
              f"KL {s['kl_div_score']:.4f}")
    print(f"  wrote {run.out}/direction.npy, optimize_metadata.json, loss_curves.png, targets.json "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()

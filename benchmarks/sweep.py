"""Selection sweep: refusal_jax's batched candidates vs the reference's per-candidate hook loop (PyTorch).

Same model, same candidate grid, same validation prompts (unfiltered, so both sides see identical batches),
same run. Reports candidates/s, wall time, compile time separately, and how far the two sides' scores agree.

    python benchmarks/sweep.py [--n-val 32] [--layers 4-11] [--positions=-1] [--chunk 8]

With --screen K it also runs first-order screening (refusal_jax.method.screening: the backward passes plus K exact
evaluations) and compares it with the exhaustive sweep it replaces: Spearman correlation of first-order vs exact
scores over the grid, the rank of the exhaustive winner under the first-order screen (is it in the top 4 / 8 / 16?)
and the candidate each side selects by the reference's rule (spec §6.3), the torch loop's included.
--data-dir samples the reference splits (seed 42 = the reference's sampling; another --sample-seed draws other
prompts from the same splits) and, with --filter (val) and --filter-train (train), keeps prompts by baseline refusal
score as the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import emit, hf_reference_model, machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--positions", default="-1")
    p.add_argument("--layers", default="4-11")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--screen", type=int, default=0, help="also time screening with K exact evaluations (default 0: no)")
    p.add_argument("--data-dir", default=None, help="sample the reference splits from this folder instead of the "
                                                    "bundled sets")
    p.add_argument("--sample-seed", type=int, default=42, help="sampling seed with --data-dir (42: the reference's)")
    p.add_argument("--exhaustive-once", action="store_true",
                   help="run the exhaustive JAX sweep once (its time then includes compilation) instead of twice")
    p.add_argument("--torch-subset", type=int, default=0,
                   help="run the torch loop on this many evenly spaced grid candidates only and extrapolate its "
                        "time to the whole grid (its cost per candidate does not depend on the candidate); "
                        "reported as extrapolated (default 0: the whole grid)")
    p.add_argument("--n-val-harmless", type=int, default=None,
                   help="harmless val prompts when it should differ from --n-val (e.g. more harmful prompts, which the "
                        "filter thins out)")
    p.add_argument("--dump", default=None, help="write every candidate's exact and first-order scores to this JSON")
    p.add_argument("--filter", action="store_true", help="filter val prompts by baseline refusal score (reference)")
    p.add_argument("--filter-train", action="store_true",
                   help="also filter the train prompts by baseline refusal score before the mean differences, as the "
                        "reference does (spec: filter_train)")
    p.add_argument("--chat-style", default=None,
                   help="chat template, as the commands' --chat-style: a template name or 'model' (the model's own "
                        "template with its default system prompt); default: the family's reference template")
    p.add_argument("--kl-threshold", type=float, default=0.1,
                   help="selection filter, as the commands' --kl-threshold (0.1)")
    p.add_argument("--induce-threshold", type=float, default=0.0,
                   help="selection filter, as the commands' --induce-threshold (0.0)")
    p.add_argument("--profile", action="store_true",
                   help="also time the sweep's three parts and measure this machine's fp32 matmul rate (JAX and "
                        "torch), to see what bounds the sweep")
    args = p.parse_args()
    from refusal_jax.prompts import templates

    styles = sorted(templates.TEMPLATES) + [templates.MODEL_STYLE]
    if args.chat_style is not None and args.chat_style not in styles:
        p.error(f"--chat-style must be one of {', '.join(styles)}, got {args.chat_style!r}")
    filt = {"kl_threshold": args.kl_threshold, "induce_threshold": args.induce_threshold}

    import refusal_jax
    from refusal_jax.convert import bundled
    from refusal_jax.method import directions, selection
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.prompts import templates
    from refusal_jax.runs.cli import int_list

    m = refusal_jax.load_model(args.model, progress=False)
    fmt = templates.chat_format_for(m.cfg.family, m.tokenizer, style=args.chat_style)

    def batches(xs, bs=32):
        ids = encode(m.tokenizer, templates.format_instructions(fmt, xs))
        return list(bucketed(ids, min(bs, len(ids)), pad_id(m.tokenizer)))

    ids = fmt.refusal_token_ids
    sets = sample_sets(args)
    to_filter = [k for k, on in (("harmful_train", args.filter_train), ("harmless_train", args.filter_train),
                                 ("harmful_val", args.filter), ("harmless_val", args.filter)) if on]
    if to_filter:
        n_sampled = {k: len(v) for k, v in sets.items()}
        kept, _, _ = selection.filter_by_refusal(m.params, m.cfg, {k: sets[k] for k in to_filter}, batches, ids)
        sets.update(kept)
        print("kept after the filter:", {k: f"{len(sets[k])}/{n_sampled[k]}" for k in to_filter},
              file=sys.stderr, flush=True)
    n_pos = len(templates.eoi_tokens(fmt, m.tokenizer))
    train_h, train_b = batches(sets["harmful_train"]), batches(sets["harmless_train"])
    val_h, val_b = batches(sets["harmful_val"]), batches(sets["harmless_val"])
    diffs = directions.mean_diffs(m.params, m.cfg, train_h, train_b, n_pos)
    grid = directions.candidate_grid(m.cfg, n_pos, int_list(args.positions), int_list(args.layers))
    screened = screen_run(m, diffs, val_h, val_b, ids, grid, args) if args.screen else None

    t0 = time.perf_counter()
    ours, _ = directions.score_candidates(m.params, m.cfg, diffs, val_h, val_b, ids, grid, chunk=args.chunk)
    first = steady = time.perf_counter() - t0
    if not args.exhaustive_once:
        t0 = time.perf_counter()
        ours, _ = directions.score_candidates(m.params, m.cfg, diffs, val_h, val_b, ids, grid, chunk=args.chunk)
        steady = time.perf_counter() - t0
    record = {"benchmark": "selection_sweep", "machine": machine(), "model": args.model, "dtype": "float32",
              "n_candidates": len(grid), "n_val_harmful": len(sets["harmful_val"]),
              "n_val_harmless": len(sets["harmless_val"]), "n_train": args.n_train, "chunk": args.chunk,
              "data": args.data_dir or "bundled", "sample_seed": args.sample_seed, "filter": args.filter,
              "filter_train": args.filter_train, "n_train_harmful_kept": len(sets["harmful_train"]),
              "n_train_harmless_kept": len(sets["harmless_train"]),
              "chat_style": args.chat_style, **filt,
              "jax": {"first_run_s": first, "compile_s_approx": first - steady, "steady_s": steady,
                      "candidates_per_s": len(grid) / steady}}
    if screened is not None:
        record["screening"] = compare_screen(screened, ours, m.cfg.n_layers, args.screen, filt)
        record["screening"]["speedup_vs_jax_exhaustive"] = steady / screened["steady_s"]
        print("partial:", json.dumps(record["screening"], default=str), file=sys.stderr, flush=True)
        if args.dump:
            from refusal_jax.method import screening

            fo_by_sites = {sites: screening.first_order_evaluations(screened["first_order"], diffs, grid, sites)
                     for sites in screening.SITE_SETS}
            Path(args.dump).write_text(json.dumps([
                {**ev, **{f"first_order_{k}_{sites}": fo_by_sites[sites][i][f"first_order_{k}"]
                          for sites in fo_by_sites for k in ("refusal_score", "steering_score")}}
                for i, ev in enumerate(ours)]))
    if not args.skip_torch:
        import reference_torch

        hf = hf_reference_model(bundled.model_path(args.model))
        picked = list(range(len(grid)))
        if args.torch_subset:
            picked = sorted({int(i) for i in np.linspace(0, len(grid) - 1, args.torch_subset)})
        t0 = time.perf_counter()
        ref = reference_torch.score_candidates(hf, diffs, val_h, val_b, ids, [grid[i] for i in picked])
        t_ref = time.perf_counter() - t0
        measured = t_ref
        if len(picked) < len(grid):
            # 1 unmodified pass + 3 passes per candidate, the same cost for every candidate: scale by passes
            t_ref = t_ref * (3 * len(grid) + 1) / (3 * len(picked) + 1)
            record["torch_reference_loop"] = {"measured_s": measured, "measured_candidates": len(picked),
                                              "wall_s_extrapolated": t_ref, "extrapolated": True}
        else:
            record["torch_reference_loop"] = {"wall_s": t_ref, "extrapolated": False}
        record["torch_reference_loop"]["candidates_per_s"] = len(grid) / t_ref
        record["speedup_steady"] = t_ref / steady
        record["speedup_including_compile"] = t_ref / first
        ours_picked = [ours[i] for i in picked]
        for key in ("refusal_score", "steering_score", "kl_div_score"):
            record[f"max_abs_diff_{key}"] = float(max(abs(a[key] - b[key]) for a, b in zip(ours_picked, ref)))
        if len(picked) == len(grid):
            best = lambda evs: min(evs, key=lambda e: e["refusal_score"])  # noqa: E731
            record["same_best_candidate"] = (best(ours)["position"], best(ours)["layer"]) == \
                (best(ref)["position"], best(ref)["layer"])
            record["torch_selected"] = selected(ref, m.cfg.n_layers, filt)
    if screened is not None and "torch_reference_loop" in record:
        record["screening"]["speedup_vs_torch_steady"] = t_ref / screened["steady_s"]
        record["screening"]["speedup_vs_torch_including_compile"] = t_ref / screened["first_run_s"]
        if "torch_selected" in record:
            record["screening"]["same_selected_as_torch"] = \
                record["screening"]["screened_selected"] == record["torch_selected"]
    if args.profile:
        record["profile"] = profile(m, diffs, val_h, val_b, ids, grid, args.chunk)
    emit(record)


def sample_sets(args) -> dict:
    """Train/val instruction lists: the reference splits sampled as the reference does (any seed), or the bundled
    sets in order."""
    import random

    from refusal_jax.prompts import datasets

    if args.data_dir:
        rng = random.Random(args.sample_seed)
        return {name: rng.sample(datasets.reference_split(args.data_dir, name, instructions_only=True), n)
                for name, n in (("harmful_train", args.n_train), ("harmless_train", args.n_train),
                                ("harmful_val", args.n_val), ("harmless_val", args.n_val_harmless or args.n_val))}
    harmful, harmless = datasets.default_sets()
    return {"harmful_train": harmful[: args.n_train], "harmless_train": harmless[: args.n_train],
            "harmful_val": harmful[args.n_train: args.n_train + args.n_val],
            "harmless_val": harmless[args.n_train: args.n_train + (args.n_val_harmless or args.n_val)]}


def selected(evaluations, n_layers, filt=None):
    """(pos, layer) the reference's filter (thresholds `filt`, default the reference's) and rule select, or None
    when nothing survives."""
    from refusal_jax.errors import RunError
    from refusal_jax.method import directions

    try:
        best, _ = directions.select(evaluations, n_layers, **(filt or {}))
    except RunError:
        return None
    return [best["position"], best["layer"]]


def screen_run(m, diffs, val_h, val_b, ids, grid, args) -> dict:
    """Screening with K exact evaluations, run twice (the first run includes the compiles), and the first-order
    pass alone (steady)."""
    from refusal_jax.method import screening

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        evs, base = screening.score_candidates_screened(m.params, m.cfg, diffs, val_h, val_b, ids, grid,
                                                        screen=args.screen, chunk=args.chunk,
                                                        kl_threshold=args.kl_threshold,
                                                        induce_threshold=args.induce_threshold)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fo = screening.first_order(m.params, m.cfg, val_h, val_b, ids)
    fo_s = time.perf_counter() - t0
    return {"evaluations": evs, "first_order": fo, "diffs": diffs, "grid": grid, "first_run_s": times[0],
            "steady_s": times[1], "first_order_s": fo_s, "n_evaluated_exactly": base["n_evaluated_exactly"]}


def compare_screen(screened, exhaustive, n_layers, k, filt) -> dict:
    """First-order vs exact over the grid (both site sets), and what the screen keeps of the exhaustive selection:
    the exhaustive winner's place in the screen's order (0 = evaluated first)."""
    from refusal_jax.method import screening

    evs = screened["evaluations"]
    live = [i for i, e in enumerate(exhaustive) if e["direction_norm"] > 0]
    out = {"K": k, "first_run_s": screened["first_run_s"], "steady_s": screened["steady_s"],
           "first_order_s": screened["first_order_s"], "n_evaluated_exactly": screened["n_evaluated_exactly"],
           "candidates_per_s_steady": len(evs) / screened["steady_s"]}
    winner = selected(exhaustive, n_layers, filt)
    out["exhaustive_selected"] = winner
    for sites in screening.SITE_SETS:
        first = screening.first_order_evaluations(screened["first_order"], screened["diffs"], screened["grid"], sites)
        res = {f"spearman_{key}": screening.spearman([first[i][f"first_order_{key}"] for i in live],
                                                     [exhaustive[i][key] for i in live])
               for key in ("refusal_score", "steering_score")}
        order = screening.screen_order(first, screened["diffs"], n_layers,
                                        induce_threshold=filt["induce_threshold"])
        rank = next((r for r, i in enumerate(order) if [first[i]["position"], first[i]["layer"]] == winner), None)
        res["exhaustive_winner_rank_in_screen"] = rank
        for top in (4, 8, 16):
            res[f"winner_in_top_{top}"] = rank is not None and rank < top
        out[f"sites_{sites}"] = res
    out["screened_selected"] = selected(screening.evaluated(evs), n_layers, filt)
    out["same_selected_as_exhaustive"] = out["screened_selected"] == winner
    return out


def profile(m, diffs, val_h, val_b, ids, grid, chunk) -> dict:
    """Wall time of each part of the sweep, and the machine's fp32 matmul rate on both sides. (XLA's
    cost_analysis counts a lax.scan body once, not once per layer, so it is no use for FLOP counts here.)"""
    from refusal_jax.method import scoring
    from refusal_jax.model.transformer import Intervention

    ids = tuple(int(i) for i in ids)
    ablations = [Intervention.ablation(m.cfg, diffs[g]) for g in grid]
    vectors, layers = np.asarray([diffs[g] for g in grid]), [g[1] for g in grid]
    parts = {
        "ablation_harmful": lambda: scoring.evaluate_interventions(m.params, m.cfg, val_h, ablations, ids,
                                                                      chunk=chunk),
        "ablation_harmless_kl": lambda: scoring.evaluate_interventions(m.params, m.cfg, val_b, ablations, ids,
                                                                          chunk=chunk),
        "actadd_resumed": lambda: scoring.evaluate_additions(m.params, m.cfg, val_b, vectors, layers, ids,
                                                                chunk=chunk),
    }
    out = {}
    for name, fn in parts.items():
        fn()
        t0 = time.perf_counter()
        fn()
        out[name] = {"s": time.perf_counter() - t0}
    out["matmul_gflop_per_s"] = matmul_rates(m.cfg)
    return out


def matmul_rates(cfg) -> dict:
    """fp32 [T, D] x [D, F] rate of JAX (XLA) and torch here, at the sweep's shapes (T = 32 prompts x 64 tokens)."""
    import jax
    import jax.numpy as jnp

    T, D, F = 2048, cfg.d_model, cfg.d_ff
    a = jnp.asarray(np.random.default_rng(0).normal(size=(T, D)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(D, F)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        f(a, b).block_until_ready()
    rates = {"jax": 2 * T * D * F * 10 / (time.perf_counter() - t0) / 1e9}
    try:
        import torch

        ta, tb = torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))
        ta @ tb
        t0 = time.perf_counter()
        for _ in range(10):
            ta @ tb
        rates["torch"] = 2 * T * D * F * 10 / (time.perf_counter() - t0) / 1e9
    except ImportError:
        pass
    return rates


if __name__ == "__main__":
    main()

"""The whole method at reduced size, refusal_jax vs the PyTorch reference method, same data, same run:
difference-in-means (stage 1), a selection sweep (stage 2), and greedy completions under baseline and ablation
(stage 3). The JAX side runs twice: the first run includes compilation (a fresh process compiles every
function once), the second is steady state.

    python benchmarks/pipeline_small.py [--n-train 16] [--n-val 8] [--layers 8-11] [--n-gen 8] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import emit, hf_reference_model, machine


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--layers", default="8-11")
    p.add_argument("--n-gen", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()

    import reference_torch

    import refusal_jax
    from refusal_jax import Intervention
    from refusal_jax.convert import bundled
    from refusal_jax.method import directions
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.model.generate import decoding_params, greedy_generate, stop_token_ids
    from refusal_jax.prompts import datasets, templates
    from refusal_jax.runs.cli import int_list

    m = refusal_jax.load_model(args.model, progress=False)
    fmt = templates.chat_format_for(m.cfg.family, m.tokenizer)
    harmful, harmless = datasets.default_sets()
    pad, stops = pad_id(m.tokenizer), stop_token_ids(m.tokenizer)

    def batches(xs, bs=32):
        ids = encode(m.tokenizer, templates.format_instructions(fmt, xs))
        return list(bucketed(ids, min(bs, len(ids)), pad))

    n, v = args.n_train, args.n_val
    tr_h, tr_b = batches(harmful[:n]), batches(harmless[:n])
    va_h, va_b = batches(harmful[n:n + v]), batches(harmless[n:n + v])
    gen = batches(harmful[n + v:n + v + args.n_gen], bs=8)
    n_pos = len(templates.eoi_tokens(fmt, m.tokenizer))
    layers = int_list(args.layers)
    grid = [(-1, layer) for layer in layers]
    ids = fmt.refusal_token_ids

    def run_ours() -> tuple[dict, np.ndarray, dict]:
        stages, t0 = {}, time.perf_counter()
        diffs = directions.mean_diffs(m.params, m.cfg, tr_h, tr_b, n_pos)
        stages["stage1_directions_s"] = time.perf_counter() - t0
        evals, _ = directions.score_candidates(m.params, m.cfg, diffs, va_h, va_b, ids, grid)
        best = min(evals, key=lambda e: e["refusal_score"])
        r = diffs[best["position"], best["layer"]]
        stages["stage2_selection_s"] = time.perf_counter() - t0 - sum(stages.values())
        decoding = decoding_params(m.params)  # once, as generate_completions does
        for iv in (None, Intervention.ablation(m.cfg, r)):
            for b in gen:
                np.asarray(greedy_generate(decoding, m.cfg, b.tokens, b.mask, iv,
                                           max_new_tokens=args.max_new_tokens, stop_ids=stops, pad=pad))
        stages["stage3_completions_s"] = time.perf_counter() - t0 - sum(stages.values())
        return stages, diffs, best

    with_compile, _, _ = run_ours()  # a fresh process: every function compiles once here
    ours, diffs, best = run_ours()  # steady state: what each further run (or a bigger one) pays per unit of work
    ours_s, compile_s = sum(ours.values()), sum(with_compile.values())

    hf = hf_reference_model(bundled.model_path(args.model))
    ref, t0 = {}, time.perf_counter()
    ref_diffs = reference_torch.mean_diffs(hf, tr_h, tr_b, n_pos)
    ref["stage1_directions_s"] = time.perf_counter() - t0
    ref_evals = reference_torch.score_candidates(hf, ref_diffs, va_h, va_b, ids, grid)
    ref_best = min(ref_evals, key=lambda e: e["refusal_score"])
    rr = ref_diffs[ref_best["position"], ref_best["layer"]]
    ref["stage2_selection_s"] = time.perf_counter() - t0 - sum(ref.values())
    reference_torch.generate(hf, gen, args.max_new_tokens, pad, stops)
    reference_torch.generate(hf, gen, args.max_new_tokens, pad, stops, rr)
    ref["stage3_completions_s"] = time.perf_counter() - t0 - sum(ref.values())
    ref_s = sum(ref.values())
    emit({"benchmark": "pipeline_small", "machine": machine(), "model": args.model, "dtype": "float32",
          "n_train": n, "n_val": v, "n_candidates": len(grid), "n_gen": args.n_gen,
          "max_new_tokens": args.max_new_tokens, "jax_total_s_including_compile": compile_s,
          "jax_total_s_steady": ours_s, "torch_reference_s": ref_s, "speedup_steady": ref_s / ours_s,
          "speedup_including_compile": ref_s / compile_s, "jax_stages_s": ours,
          "jax_stages_s_including_compile": with_compile, "torch_stages_s": ref,
          "stage_speedups": {k: ref[k] / ours[k] for k in ours},
          "same_selected_layer": best["layer"] == ref_best["layer"],
          "mean_diffs_max_abs_diff": float(np.abs(diffs - ref_diffs).max())})


if __name__ == "__main__":
    main()

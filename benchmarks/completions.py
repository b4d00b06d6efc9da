"""The pipeline's stage-3 workload: greedy completions of JailbreakBench prompts, baseline and directional ablation.

refusal_jax (continuous batching, `--slots` slots, per-layer decoding weights) against the reference method
(transformers `generate()` with hooks, static batches of `--ref-batch-size` in dataset order) in the same run, on
the same prompts; fp32 completions are compared token for token. Then the same workload (plus activation addition)
with the decoding weights in bfloat16 and int8: tokens/s, share of completions identical to fp32 and the refusal-rate
(substring judge) change. The last line is one JSON record with "ratio" (refusal_jax fp32 tokens/s over the
reference's, with baseline and ablation decoded in one continuous pool, each row under its own intervention),
"ratio_unpooled" (the two sets decoded one after the other) and "identical" (every fp32 completion, pooled and
unpooled, equal to the reference's).

    python benchmarks/completions.py [--n-prompts 64] [--max-new-tokens 256] [--slots 64] [--run-dir RUN]

The direction: a run directory's direction.npy / direction_metadata.json (`--run-dir`), else a quick
difference in means at the last position of layer 2L/3 over 32 + 32 reference train prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, hf_reference_model, machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "refusal_direction"


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="reference splits folder (default: ../shared/data/refusal_direction from the repo, else "
                        "/work/shared/data/refusal_direction)")
    p.add_argument("--n-prompts", type=int, default=64, help="JailbreakBench prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="greedy tokens per completion (default: %(default)s)")
    p.add_argument("--slots", type=int, default=64,
                   help="refusal_jax continuous-batching slots (default: %(default)s, the fastest measured here)")
    p.add_argument("--ref-batch-size", type=int, default=8, help="reference generate() batch (default: %(default)s)")
    p.add_argument("--run-dir", type=Path, default=None, help="take direction.npy and its layer from this run")
    p.add_argument("--dtypes", default="float32,bfloat16,int8",
                   help="decode dtypes to measure, float32 first (default: %(default)s)")
    p.add_argument("--skip-torch", action="store_true", help="do not run the reference method")
    p.add_argument("--static", action="store_true", help="also time refusal_jax's static batches (fp32, ablation)")
    args = p.parse_args()
    if args.data_dir is None:
        args.data_dir = DEFAULT_DATA if DEFAULT_DATA.exists() else Path("/work/shared/data/refusal_direction")
    if not (args.data_dir / "processed" / "jailbreakbench.json").exists():
        sys.exit(f"error: no processed/jailbreakbench.json under {args.data_dir}")
    if args.run_dir and not (args.run_dir / "direction.npy").exists():
        sys.exit(f"error: no direction.npy in {args.run_dir}")
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32" or not set(dtypes) <= {"float32", "bfloat16", "int8"}:
        sys.exit("error: --dtypes must start with float32 and list float32/bfloat16/int8")
    if min(args.n_prompts, args.max_new_tokens, args.slots, args.ref_batch_size) < 1:
        sys.exit("error: sizes must be >= 1")
    args.dtypes = dtypes
    return args


def quick_direction(m, data_dir: Path):
    from refusal_jax.method.directions import mean_diffs
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.prompts import datasets, templates

    fmt = templates.chat_format_for(m.cfg.family, m.tokenizer)
    sets = [templates.format_instructions(fmt, datasets.reference_split(data_dir, name, instructions_only=True)[:32])
            for name in ("harmful_train", "harmless_train")]
    harmful, harmless = (list(bucketed(encode(m.tokenizer, s), 16, pad_id(m.tokenizer))) for s in sets)
    layer = round(2 * m.cfg.n_layers / 3)
    return mean_diffs(m.params, m.cfg, harmful, harmless, n_pos=1)[-1, layer].astype(np.float32), layer


def main():
    args = parse()
    from jax import monitoring

    import refusal_jax
    from refusal_jax import Intervention
    from refusal_jax.convert import bundled
    from refusal_jax.evaluation import judge
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.model.continuous import DEFAULT_CHUNK, DEFAULT_COMPACT_MIN, default_refill
    from refusal_jax.model.generate import cut_at_stop, generate_ids, stop_token_ids
    from refusal_jax.prompts import datasets, templates

    compile_s = [0.0]
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compile_s.__setitem__(0, compile_s[0] + secs)
        if name == "/jax/core/compile/backend_compile_duration" else None)

    m = refusal_jax.load_model(args.model, progress=False)
    fmt = templates.chat_format_for(m.cfg.family, m.tokenizer)
    instructions = [r["instruction"] for r in datasets.reference_split(args.data_dir, "jailbreakbench")]
    instructions = instructions[:args.n_prompts]
    prompts = templates.format_instructions(fmt, instructions)
    if args.run_dir:
        direction = np.load(args.run_dir / "direction.npy").astype(np.float32)
        layer = json.loads((args.run_dir / "direction_metadata.json").read_text())["layer"]
    else:
        t0 = time.perf_counter()
        direction, layer = quick_direction(m, args.data_dir)
        print(f"quick direction at layer {layer} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    conditions = {"baseline": None, "ablation": Intervention.ablation(m.cfg, direction),
                  "actadd": Intervention.addition(m.cfg, direction, layer, -1.0)}
    stops, pad = stop_token_ids(m.tokenizer), pad_id(m.tokenizer)
    n_prompt_tokens = [len(x) for x in encode(m.tokenizer, prompts)]

    def refusal_rate(ids):
        return float(np.mean([judge.is_refusal(m.tokenizer.decode(t, skip_special_tokens=True).strip())
                              for t in ids]))

    def ours(dtype, name, continuous=True):
        stats = {}
        c0, t0 = compile_s[0], time.perf_counter()
        ids = generate_ids(m.params, m.cfg, m.tokenizer, prompts, conditions[name], batch_size=args.slots,
                           max_new_tokens=args.max_new_tokens, continuous=continuous, stats=stats,
                           decode_dtype=dtype)
        wall, comp = time.perf_counter() - t0, compile_s[0] - c0
        n = sum(len(t) for t in ids)
        rec = {"wall_s": round(wall, 2), "compile_s": round(comp, 2), "generated_tokens": n,
               "tokens_per_s": n / wall, "tokens_per_s_excl_compile": n / (wall - comp),
               "refusal_rate": refusal_rate(ids)}
        if stats:
            rec["decode_steps"] = stats["steps"]
            rec["slot_occupancy"] = stats["row_steps"] / max(stats["slot_steps"], 1)
        print(f"refusal_jax {dtype} {name}: {json.dumps(rec)}", file=sys.stderr)
        return ids, rec

    record = {"benchmark": "completions", "machine": machine(), "model": args.model, "n_prompts": len(prompts),
              "prompt_tokens": sum(n_prompt_tokens), "max_new_tokens": args.max_new_tokens, "slots": args.slots,
              "prefill_chunk": DEFAULT_CHUNK, "refill": default_refill(args.slots),
              "compact_min": DEFAULT_COMPACT_MIN, "ref_batch_size": args.ref_batch_size,
              "direction_layer": layer,
              "direction_source": str(args.run_dir) if args.run_dir else "quick mean difference"}
    results: dict[str, dict] = {}
    ids_by: dict[tuple[str, str], list] = {}
    for dtype in args.dtypes:
        for name in ("baseline", "ablation") + (("actadd",) if len(args.dtypes) > 1 else ()):
            ids_by[dtype, name], results.setdefault(dtype, {})[name] = ours(dtype, name)
    if args.static:
        _, results["float32_static"] = ours("float32", "ablation", continuous=False)

    # baseline and ablation in one pool (rows index a two-entry intervention table), as pipeline stage 3 runs
    from refusal_jax.model import continuous as cb
    from refusal_jax.model.generate import decoding_params

    ids = encode(m.tokenizer, prompts)
    stats = {}
    c0, t0 = compile_s[0], time.perf_counter()
    pooled = cb.generate(decoding_params(m.params), m.cfg, ids + ids, [conditions["baseline"], conditions["ablation"]],
                         variants=[0] * len(ids) + [1] * len(ids), slots=args.slots,
                         max_new_tokens=args.max_new_tokens, stop_ids=stops, pad=pad, stats=stats)
    wall, comp = time.perf_counter() - t0, compile_s[0] - c0
    n = sum(len(t) for t in pooled)
    alone = ids_by["float32", "baseline"] + ids_by["float32", "ablation"]
    ids_by["float32", "pooled_baseline"], ids_by["float32", "pooled_ablation"] = pooled[:len(ids)], pooled[len(ids):]
    results["float32_pooled"] = {
        "wall_s": round(wall, 2), "compile_s": round(comp, 2), "generated_tokens": n, "tokens_per_s": n / wall,
        "tokens_per_s_excl_compile": n / (wall - comp), "decode_steps": stats["steps"],
        "slot_occupancy": stats["row_steps"] / max(stats["slot_steps"], 1),
        "identical_to_unpooled": f"{sum(a == b for a, b in zip(pooled, alone))}/{len(pooled)}"}
    print(f"refusal_jax float32 pooled baseline+ablation: {json.dumps(results['float32_pooled'])}", file=sys.stderr)

    jax_tok = sum(results["float32"][c]["generated_tokens"] for c in ("baseline", "ablation"))
    jax_wall = sum(results["float32"][c]["wall_s"] for c in ("baseline", "ablation"))
    record["refusal_jax"] = results
    jax_compile = sum(results["float32"][c]["compile_s"] for c in ("baseline", "ablation"))
    record["refusal_jax_fp32_tokens_per_s"] = jax_tok / jax_wall
    record["refusal_jax_fp32_tokens_per_s_excl_compile"] = jax_tok / (jax_wall - jax_compile)
    record["refusal_jax_fp32_pooled_tokens_per_s"] = results["float32_pooled"]["tokens_per_s"]

    for dtype in args.dtypes[1:]:
        for name in results[dtype]:
            same = [a == b for a, b in zip(ids_by[dtype, name], ids_by["float32", name])]
            results[dtype][name]["identical_to_float32"] = float(np.mean(same))
            results[dtype][name]["refusal_rate_change"] = (results[dtype][name]["refusal_rate"]
                                                           - results["float32"][name]["refusal_rate"])

    if not args.skip_torch:
        import reference_torch

        hf = hf_reference_model(bundled.model_path(args.model))
        batches = list(bucketed(encode(m.tokenizer, prompts), args.ref_batch_size, pad, bucket=1, sort=False))
        ref, identical = {}, True
        for name, vec in (("baseline", None), ("ablation", direction)):
            t0 = time.perf_counter()
            rows = reference_torch.generate(hf, batches, args.max_new_tokens, pad, stops, vec)
            wall = time.perf_counter() - t0
            real = [i for b in batches for i in b.index]
            by_prompt = {int(i): cut_at_stop(r, stops) for i, r in zip(real, rows) if i >= 0}
            got = [by_prompt[i] for i in range(len(prompts))]
            n = sum(len(t) for t in got)
            same = sum(a == b for a, b in zip(got, ids_by["float32", name]))
            same_pooled = sum(a == b for a, b in zip(got, ids_by["float32", f"pooled_{name}"]))
            identical &= same == same_pooled == len(prompts)
            ref[name] = {"wall_s": round(wall, 2), "generated_tokens": n, "tokens_per_s": n / wall,
                         "identical_completions": f"{same}/{len(prompts)}",
                         "identical_completions_pooled": f"{same_pooled}/{len(prompts)}",
                         "refusal_rate": refusal_rate(got)}
            print(f"reference {name}: {json.dumps(ref[name])}", file=sys.stderr)
        ref_tok = sum(r["generated_tokens"] for r in ref.values())
        ref_wall = sum(r["wall_s"] for r in ref.values())
        record["torch_generate_hooks"] = ref
        record["reference_tokens_per_s"] = ref_tok / ref_wall
        record["ratio"] = record["refusal_jax_fp32_pooled_tokens_per_s"] / record["reference_tokens_per_s"]
        record["ratio_unpooled"] = record["refusal_jax_fp32_tokens_per_s"] / record["reference_tokens_per_s"]
        record["ratio_unpooled_excl_compile"] = (record["refusal_jax_fp32_tokens_per_s_excl_compile"]
                                                 / record["reference_tokens_per_s"])
        record["identical"] = bool(identical)
    print(json.dumps(record, default=str))

if __name__ == "__main__":
    main()

"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (the flags must precede `import jax`).

Computes every stage on one device and on 8-device meshes, and prints one line `RESULT {json}`: for each mesh,
the largest differences from the one-device results (absolute, or relative to the largest reference magnitude
where that exceeds 1) and the shardings actually observed.
Usage: python tests/_sharding_worker.py [MESH_SPEC ...]   (default: data=4,model=2 data=8,model=1 data=2,model=4)
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from refusal_jax import Intervention, forward  # noqa: E402
from refusal_jax.method import directions, scoring
from refusal_jax.model import sharding as shd  # noqa: E402
from refusal_jax.model.batching import bucketed  # noqa: E402
from refusal_jax.model.config import tiny_config  # noqa: E402
from refusal_jax.model.generate import decode_program, decoding_params, greedy_generate  # noqa: E402
from refusal_jax.model.params import init_random  # noqa: E402

B = C = 8  # prompts per batch and candidates per chunk: multiples of every data-axis size used
N_POS, NEW, REFUSAL_IDS = 3, 6, (3, 4)


def prompts(vocab, n, seed, eoi=(5, 6, 7)):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(8, vocab, rng.integers(2, 10))) + list(eoi) for _ in range(n)]


def spec(x):
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def maxdiff(got, want):
    """Largest absolute difference, relative to the reference's largest magnitude when that exceeds 1."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


def setup():
    cfg = tiny_config("qwen2", n_heads=4, n_kv_heads=2, d_ff=64)
    params = init_random(cfg, jax.random.key(0), scale=0.3)
    harmful = list(bucketed(prompts(cfg.vocab_size, B, 1), B, pad=0, bucket=8))
    harmless = list(bucketed(prompts(cfg.vocab_size, B, 2), B, pad=0, bucket=8))
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((C, cfg.d_model))
    ivs = ([Intervention.ablation(cfg, d) for d in dirs[:C // 2]]
           + [Intervention.addition(cfg, d, layer=i % cfg.n_layers) for i, d in enumerate(dirs[C // 2:])])
    return cfg, params, harmful, harmless, ivs


def compute(params, cfg, harmful, harmless, ivs, place):
    """Every stage; `place` = (shard_params, shard_batches, shard_batch, shard_candidates, mesh-or-None)."""
    sp, sbatches, sbatch, scand = place
    params = sp(params)
    harmful, harmless = sbatches(harmful), sbatches(harmless)
    tokens, mask = harmful[0].tokens, harmful[0].mask
    out = {}
    # (a) forward: logits and resid_pre capture on a left-padded batch
    fw = forward(params, cfg, tokens, mask, capture=("resid_pre",))
    out["logits"], out["resid_pre"] = fw.logits, fw.resid_pre
    # (b) stage 1: mean activations -> difference in means -> unit direction
    diffs = directions.mean_diffs(params, cfg, harmful, harmless, N_POS)
    out["mean_diffs"] = diffs
    out["direction"] = diffs[-1, 1] / np.linalg.norm(diffs[-1, 1])
    # (c) stage 2 through the public sweep (prompts data-parallel: batches sharded over "batch") ...
    ev = scoring.evaluate_interventions(params, cfg, harmless, ivs, REFUSAL_IDS, chunk=C)
    out["refusal_score"], out["kl"] = ev["refusal_score"], ev["kl"]
    # ... and one chunk with the candidate axis sharded over "data" (prompts replicated)
    rep_tokens, rep_mask = sbatch(harmless[0].tokens, None), sbatch(harmless[0].mask, None)
    base = scoring.last_logits(params, cfg, rep_tokens, rep_mask)
    score, kl = scoring._scores(params, cfg, rep_tokens, rep_mask, scand(shd.stack_interventions(ivs)), base,
                                   REFUSAL_IDS)
    out["cand_score"], out["cand_kl"] = score, kl
    # (d) greedy generation under directional ablation of the direction found in (b)
    abl = Intervention.ablation(cfg, out["direction"])
    out["generated"] = greedy_generate(params, cfg, tokens, mask, abl, max_new_tokens=NEW)
    out["_gen_args"] = (params, tokens, mask, abl)
    return out


def main(specs):
    t0 = time.perf_counter()
    cfg, params, harmful, harmless, ivs = setup()
    ident = lambda x, *a: x  # noqa: E731
    ref = compute(params, cfg, harmful, harmless, ivs, (ident, ident, ident, ident))
    result = {"devices": jax.device_count(), "single_s": time.perf_counter() - t0, "meshes": {}}
    for mesh_spec in specs:
        t = time.perf_counter()
        mesh = shd.make_mesh(mesh_spec)
        no_batch = shd.MeshRules(batch=None)  # stage-2 chunk: candidates own "data", prompts replicated
        place = (lambda p: shd.shard_params(p, cfg, mesh),
                 lambda bs: shd.shard_batches(bs, mesh),
                 lambda x, _=None: shd.shard_batch(x, mesh, no_batch),
                 lambda iv: shd.shard_interventions(iv, mesh))
        got = compute(params, cfg, harmful, harmless, ivs, place)
        r = {name: maxdiff(got[name], ref[name]) for name in
             ("logits", "resid_pre", "mean_diffs", "direction", "refusal_score", "kl", "cand_score", "cand_kl")}
        r["generated_equal"] = bool(np.array_equal(np.asarray(got["generated"]), np.asarray(ref["generated"])))
        sp = got["_gen_args"][0]
        r["spec"] = {"q": spec(sp.layers.q), "k": spec(sp.layers.k), "o": spec(sp.layers.o),
                     "gate": spec(sp.layers.gate), "down": spec(sp.layers.down), "embed": spec(sp.embed),
                     "tokens": spec(got["_gen_args"][1]), "logits": spec(got["logits"]),
                     "resid_pre": spec(got["resid_pre"]), "cand_score": spec(got["cand_score"]),
                     "generated": spec(got["generated"])}
        r["n_devices"] = {"resid_pre": len(got["resid_pre"].sharding.device_set),
                          "cand_score": len(got["cand_score"].sharding.device_set),
                          "generated": len(got["generated"].sharding.device_set)}
        # The KV cache lives inside greedy_generate's jit: read its per-device shape (per layer on CPU, [B/d, S, K/m,
        # H]) from the partitioned HLO.
        program = decode_program(True).lower(decoding_params(sp, True), cfg, *got["_gen_args"][1:], max_new_tokens=NEW)
        hlo = program.compile().as_text()
        S = harmful[0].tokens.shape[1] + NEW
        r["cache_shapes"] = sorted(set(re.findall(rf"f32\[\d+,{S},\d+,{cfg.head_dim}\]", hlo)))
        r["cache_full_shape"] = f"f32[{B},{S},{cfg.n_kv_heads},{cfg.head_dim}]"
        r["mesh"] = dict(mesh.shape)
        r["seconds"] = time.perf_counter() - t
        result["meshes"][mesh_spec] = r
    result["total_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:] or ["data=4,model=2", "data=8,model=1", "data=2,model=4"])

"""Expert parallelism on 8 simulated CPU devices: a mixture of experts gives the one-device logits, hidden states
and difference-in-means directions on data x expert x model meshes, each device holds 1/expert of every expert
weight (placed shard by shard from a safetensors checkpoint, and from a GGUF file whose experts are stacked), and
the compiled forward never gathers the experts.

The 8-device part runs this file as a subprocess (XLA_FLAGS must set the device count before jax starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the fast suite runs one mesh that splits all three axes; the slow one the others too
FAST_MESH = "data=2,expert=2,model=2"
MESHES = [FAST_MESH, pytest.param("data=2,expert=4,model=1", marks=pytest.mark.slow),
          pytest.param("data=1,expert=8,model=1", marks=pytest.mark.slow)]
TOL = 1e-5
_RESULTS: dict = {}


def _run(mesh: str, tmp_path_factory) -> dict:
    """The worker's result for `mesh` (one subprocess per mesh, each run once per test module)."""
    if mesh not in _RESULTS:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
        here = Path(__file__)
        proc = subprocess.run([sys.executable, str(here), str(tmp_path_factory.mktemp("moe_ckpt")), mesh], env=env,
                              capture_output=True, text=True, timeout=900, cwd=here.parents[1])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            pytest.fail(f"worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        assert result["devices"] == 8
        _RESULTS[mesh] = result["meshes"][mesh]
    return _RESULTS[mesh]


@pytest.fixture
def run8(tmp_path_factory):
    return lambda mesh: _run(mesh, tmp_path_factory)


@pytest.mark.parametrize("mesh", MESHES)
def test_expert_sharded_equals_one_device(run8, mesh):
    r = run8(mesh)
    assert r["expert_groups"] == r["mesh"]["expert"]
    bad = {k: v for k, v in r["diff"].items() if not v <= TOL}
    assert not bad, f"{mesh}: differences from one device above {TOL}: {bad}"


@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_experts_only(run8, mesh):
    r = run8(mesh)
    ways = r["mesh"]["expert"]
    assert r["expert_bytes_per_device"] * ways * r["mesh"]["model"] == r["expert_bytes_total"]
    assert r["experts_per_device"] == 8 // ways
    assert r["placed_equal"], "weights placed shard by shard from the checkpoint differ from the converted ones"
    # the same from a GGUF file, whose experts are stacked per layer
    assert r["gguf_placed_equal"] and r["gguf_expert_bytes_per_device"] == r["expert_bytes_per_device"]
    # no all-gather in the compiled forward materialises a whole expert stack [E, D, X] on one device
    assert r["gathered_expert_stacks"] == [], r["gathered_expert_stacks"]


# --------------------------------------------------------------------------------------------------
# the worker


def _worker(ckpt_dir, specs):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    import dataclasses
    import re

    import jax
    import numpy as np

    from refusal_jax import forward
    from refusal_jax.convert import export_hf, gguf, gguf_writer, hf, placement
    from refusal_jax.method import directions
    from refusal_jax.model import sharding as shd
    from refusal_jax.model.batching import bucketed
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random, to_flat

    cfg = tiny_config("qwen3_moe", architecture="Qwen3MoeForCausalLM", qk_norm=True, n_layers=2, n_experts=8,
                      n_experts_per_tok=2, d_expert=16)
    params = init_random(cfg, 0, scale=0.3)
    export_hf.save_hf(Path(ckpt_dir) / "m", cfg, params)
    # the same weights as a llama.cpp qwen3moe file (stacked ffn_*_exps; llama.cpp renormalises the top k)
    gguf_writer.save_gguf(Path(ckpt_dir) / "m.gguf", dataclasses.replace(cfg, norm_topk_prob=True), params,
                          tensor_type="f32")
    rng = np.random.default_rng(0)

    def prompts(seed):
        r = np.random.default_rng(seed)
        return [list(r.integers(8, cfg.vocab_size, r.integers(3, 10))) + [5, 6] for _ in range(8)]

    harmful = list(bucketed(prompts(1), 8, pad=0, bucket=8))
    harmless = list(bucketed(prompts(2), 8, pad=0, bucket=8))
    tokens, mask = harmful[0].tokens, harmful[0].mask
    del rng

    def run(p, c, place=lambda bs: bs):
        hm, hl = place(harmful), place(harmless)
        out = forward(p, c, hm[0].tokens, hm[0].mask, capture=("resid_pre", "mlp_out"))
        return {"logits": out.logits, "resid_pre": out.resid_pre, "mlp_out": out.mlp_out,
                "mean_diffs": directions.mean_diffs(p, c, hm, hl, 2)}

    def maxdiff(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))

    ref = run(params, cfg)
    result = {"devices": jax.device_count(), "meshes": {}}
    for spec in specs:
        mesh = shd.make_mesh(spec)
        pcfg = shd.fit_config(cfg, mesh)
        source = hf.sharded_source(Path(ckpt_dir) / "m")
        placed = placement.place_params(source, shd.param_shardings(cfg, mesh))  # shard by shard from the file
        got = run(placed, pcfg, lambda bs: shd.shard_batches(bs, mesh))
        w = placed.layers.expert_gate
        from_gguf = placement.place_params(gguf.sharded_source(Path(ckpt_dir) / "m.gguf"),
                                           shd.param_shardings(cfg, mesh))  # each expert split out of its stack
        shards = w.addressable_shards
        hlo = jax.jit(forward, static_argnames=("cfg",)).lower(placed, pcfg, shd.shard_batch(tokens, mesh),
                                                                 shd.shard_batch(mask, mesh)).compile().as_text()
        E, D, X = cfg.n_experts, cfg.d_model, cfg.d_expert
        stacks = rf"f32\[(?:\d+,)?{E},(?:{D},{X}|{X},{D})\]"
        results = [m.group(1) for m in re.finditer(r"= (\S+) all-gather(?:-start)?\(", hlo)]  # result types
        gathered = sorted({r for r in results if re.fullmatch(stacks + r"(?:\{[\d,]*\})?", r)})
        result["meshes"][spec] = {
            "mesh": dict(mesh.shape), "expert_groups": pcfg.expert_groups,
            "diff": {k: maxdiff(got[k], ref[k]) for k in ref},
            "expert_bytes_total": int(w.nbytes),
            "expert_bytes_per_device": int(shards[0].data.nbytes),
            "experts_per_device": int(shards[0].data.shape[1]),
            "placed_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                                for a, b in zip(to_flat(placed).values(), to_flat(params).values())),
            "gathered_expert_stacks": gathered,
            "gguf_placed_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                                     for a, b in zip(to_flat(from_gguf).values(), to_flat(params).values())),
            "gguf_expert_bytes_per_device": int(from_gguf.layers.expert_gate.addressable_shards[0].data.nbytes),
            "all_gathers": len(results),
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(sys.argv[1], sys.argv[2:])

"""Sharded = single-device, on 8 simulated CPU devices; plus the rule / mesh-spec checks of refusal_jax.model.sharding.

The 8-device computations run in a subprocess (tests/_sharding_worker.py), because XLA_FLAGS must set the host
device count before jax initialises, and this pytest process already runs jax on one device. Tolerance: every
float result within 1e-5 of the one-device result (absolute; relative to the largest magnitude where that
exceeds 1). Only the order of float32 reductions differs (all-reduces over the model axis); generated tokens
must be identical.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from refusal_jax.errors import ConfigError
from refusal_jax.model import sharding as shd
from refusal_jax.model.config import tiny_config
from refusal_jax.model.params import from_flat, param_shapes

TOL = 1e-5
MESHES = ["data=4,model=2", "data=8,model=1", "data=2,model=4"]
WORKER = Path(__file__).with_name("_sharding_worker.py")


@pytest.fixture(scope="module")
def run8():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(WORKER), *MESHES], env=env, capture_output=True, text=True,
                          timeout=600, cwd=WORKER.parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        pytest.fail(f"sharding worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["devices"] == 8
    return result["meshes"]


# --------------------------------------------------------------------------------------------------
# 8 devices (subprocess)


@pytest.mark.parametrize("mesh", MESHES)
def test_params_sharded_over_model_axis(run8, mesh):
    r = run8[mesh]
    spec, model = r["spec"], r["mesh"]["model"]
    tp = "model" if model > 1 else None
    assert spec["q"] == [None, None, tp, None] and spec["o"] == [None, tp, None, None]
    assert spec["gate"] == [None, None, tp] and spec["down"] == [None, tp, None]
    assert spec["embed"] == [tp, None]  # vocab (tied embeddings: also the LM head)
    # 2 KV heads: sharded on a 2-way model axis, replicated (divisibility fallback) on a 4-way one
    assert spec["k"] == [None, None, "model" if model == 2 else None, None]


@pytest.mark.parametrize("mesh", MESHES)
def test_forward_logits_and_capture(run8, mesh):
    r = run8[mesh]
    assert r["logits"] <= TOL and r["resid_pre"] <= TOL
    assert r["spec"]["tokens"] == ["data", None]
    assert r["spec"]["resid_pre"][:2] == [None, "data"]  # [L, B, T, D]: prompts stay on "data"
    assert r["spec"]["logits"][0] == "data"
    assert r["n_devices"]["resid_pre"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_stage1_mean_diffs_and_direction(run8, mesh):
    assert run8[mesh]["mean_diffs"] <= TOL and run8[mesh]["direction"] <= TOL


@pytest.mark.parametrize("mesh", MESHES)
def test_stage2_scores(run8, mesh):
    r = run8[mesh]
    assert max(r["refusal_score"], r["kl"]) <= TOL  # evaluate_interventions, prompts on "data"
    assert max(r["cand_score"], r["cand_kl"]) <= TOL  # one chunk, candidates on "data"
    assert r["spec"]["cand_score"][0] == "data" and r["n_devices"]["cand_score"] == 8


@pytest.mark.parametrize("mesh", MESHES)
def test_generation_identical_and_cache_sharded(run8, mesh):
    r = run8[mesh]
    assert r["generated_equal"]
    assert r["spec"]["generated"] == ["data"] and r["n_devices"]["generated"] == 8
    # the KV cache built inside greedy_generate's jit holds only this device's prompts: [B/data, S, K', H] per layer
    assert r["cache_shapes"] and r["cache_full_shape"] not in r["cache_shapes"]
    per_device_batch = 8 // r["mesh"]["data"]
    assert all(s.split(",")[0] == f"f32[{per_device_batch}" for s in r["cache_shapes"]), r["cache_shapes"]


# --------------------------------------------------------------------------------------------------
# rules, specs and meshes (in process)


def test_logical_to_spec_defaults_and_tuples():
    assert shd.logical_to_spec(shd.PARAM_AXES["layers.q"]) == P(None, None, "model", None)
    assert shd.logical_to_spec(("batch", "seq", "embed")) == P("data", None, None)
    assert shd.logical_to_spec(("batch", None)) == P("data", None)
    rules = shd.MeshRules(batch=("data", "model"), vocab=None)
    assert shd.logical_to_spec(("batch", "vocab"), rules) == P(("data", "model"), None)


def test_logical_to_spec_collisions():
    with pytest.raises(ConfigError, match="mesh axis 'data' would shard two dimensions"):
        shd.logical_to_spec(("candidates", "batch"))  # a [C, B] array under the default rules
    with pytest.raises(ConfigError, match="'model'"):
        shd.logical_to_spec(shd.PARAM_AXES["layers.q"], shd.MeshRules(embed="model"))
    with pytest.raises(ConfigError, match="'model'"):
        shd.logical_to_spec(("batch", "heads"), shd.MeshRules(batch=("data", "model")))
    with pytest.raises(ConfigError, match="unknown logical axis 'width'"):
        shd.logical_to_spec(("width",))
    assert shd.logical_to_spec(("candidates", "batch"), shd.MeshRules(batch=None)) == P("data", None)


def test_divisibility_fallback_and_missing_axes():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    assert shd.spec_for((2, 32, 4, 8), shd.PARAM_AXES["layers.q"], mesh) == P(None, None, "model", None)
    assert shd.spec_for((2, 32, 2, 8), shd.PARAM_AXES["layers.k"], mesh) == P(None, None, None, None)
    assert shd.spec_for((3, 16), ("batch", "seq"), mesh) == P(None, None)  # 3 prompts on 2-way data
    assert shd.spec_for((4, 16), ("batch", "seq"), AbstractMesh((8,), ("data",))) == P(None, None)
    assert shd.spec_for((8, 64), ("batch", "vocab"), AbstractMesh((8,), ("data",))) == P("data", None)  # no "model"
    with pytest.raises(ConfigError, match="2 dimensions"):
        shd.spec_for((2, 3), ("batch",), mesh)


def test_param_shardings_cover_every_field():
    cfg = tiny_config("llama", qkv_bias=True, qk_norm=True, post_norms=True, tie_embeddings=False,
                      n_heads=8, n_kv_heads=2, d_ff=64)
    assert set(param_shapes(cfg)) <= set(shd.PARAM_AXES)
    mesh = AbstractMesh((2, 4), ("data", "model"))
    sh = shd.param_shardings(cfg, mesh)
    assert sh.layers.q.spec == P(None, None, "model", None) and sh.layers.q_bias.spec == P(None, "model", None)
    assert sh.layers.k.spec == P(None, None, None, None) and sh.layers.k_bias.spec == P(None, None, None)
    assert sh.lm_head.spec == P(None, "model") and sh.layers.up.spec == P(None, None, "model")
    assert sh.layers.post_mlp_norm.spec == P(None, None) and sh.final_norm.spec == P(None)


def test_shard_params_and_cache_on_one_device():
    cfg = tiny_config("qwen2")
    rng = np.random.default_rng(0)  # numpy weights: eager init_random costs seconds of compiles on CPU
    params = from_flat({name: rng.standard_normal(shape, np.float32) for name, shape in param_shapes(cfg).items()})
    mesh = shd.make_mesh("data=1,model=1")
    placed = shd.shard_params(params, cfg, mesh)
    assert placed.layers.q.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(placed.layers.q), np.asarray(params.layers.q))
    with pytest.raises(ConfigError, match="lm_head"):
        shd.shard_params(params, tiny_config("qwen2", tie_embeddings=False), mesh)
    from refusal_jax.model.transformer import KVCache
    cache = shd.shard_cache(KVCache.init(cfg, 2, 8), cfg, mesh)
    assert cache.k.sharding.mesh == mesh and cache.k.shape == (2, 2, 8, 2, 8)  # [L, B, S, K, H]
    per_layer = shd.shard_cache(KVCache.init(cfg, 2, 8, per_layer=True), cfg, mesh)
    assert len(per_layer.k) == cfg.n_layers and per_layer.k[0].sharding.mesh == mesh
    assert per_layer.k[0].shape == (2, 8, 2, 8)


def test_make_mesh_parsing():
    n = jax.device_count()
    mesh = shd.make_mesh("auto")
    assert dict(mesh.shape) == {"data": n} and mesh.axis_types == (AxisType.Auto,)
    assert dict(shd.make_mesh(f" data = -1 , model={1} ").shape) == {"data": n, "model": 1}
    assert "data=" in shd.describe(mesh)
    for spec, msg in [
        (f"data={n + 1}", f"has {n + 1} devices .* but {n} are available"),
        (f"data={n},model=2", "but .* are available"),
        ("data=1,tensor=1", "unknown mesh axis 'tensor'.*data, model"),
        ("data", "not name=size"),
        ("data=two", "not name=size"),
        ("data=1,data=1", "given twice"),
        ("data=0", "sizes must be >= 1"),
        ("data=-1,model=-1", "at most one"),
        (" , ", "empty mesh spec"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            shd.make_mesh(spec)
    with pytest.raises(ConfigError, match="'auto'"):
        shd.make_mesh("auto", shd.MeshRules(batch="dp", candidates="dp"))

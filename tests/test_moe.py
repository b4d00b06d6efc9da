"""Mixtures of experts (Qwen3-MoE, Qwen2-MoE with its gated shared expert, Mixtral, OLMoE, gpt-oss): parity with
transformers on logits, every hidden state and the experts each token is routed to; weight orthogonalization of
every expert = inference-time ablation; continuous batching = static generation; HF export read back by
transformers; configs and checkpoints that disagree are refused before anything large is built."""

import dataclasses
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refusal_jax import Intervention, forward  # noqa: E402
from refusal_jax.convert import engine, export_hf  # noqa: E402
from refusal_jax.convert.hf import load_hf  # noqa: E402
from refusal_jax.errors import CheckpointError, ConfigError  # noqa: E402
from refusal_jax.method.orthogonalization import orthogonalize, residual_write_norms  # noqa: E402
from refusal_jax.model import continuous  # noqa: E402
from refusal_jax.model.config import from_hf_config, tiny_config  # noqa: E402
from refusal_jax.model.generate import decoding_params  # noqa: E402
from refusal_jax.model.params import init_random, to_flat  # noqa: E402
from refusal_jax.model.transformer import apply_norm, expert_block_rows, expert_capacity, moe_experts, route  # noqa: E402
from tests.hf_tiny import MOE_FAMILIES, hf_forward, left_padded_batch, rel_err, save_and_convert  # noqa: E402
from tests.test_continuous import prompts, static  # noqa: E402

TOL = 1e-4  # max abs difference relative to the largest reference logit, float32 both sides
LENGTHS = (13, 6, 16)
SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def converted(request, tmp_path_factory):
    return save_and_convert(request.param, tmp_path_factory.mktemp(request.param))


def test_config_matches_hf(converted):
    family, model, cfg, _ = converted
    hf = model.config
    assert cfg.family == family and cfg.moe
    assert cfg.n_experts == getattr(hf, "num_local_experts", None) or cfg.n_experts == hf.num_experts
    assert cfg.n_experts_per_tok == hf.num_experts_per_tok
    assert cfg.d_expert == getattr(hf, "moe_intermediate_size", hf.intermediate_size)
    assert cfg.norm_topk_prob == (family in ("mixtral", "gpt_oss") or bool(hf.norm_topk_prob))
    gpt_oss = family == "gpt_oss"
    assert cfg.attn_sinks == cfg.o_bias == cfg.expert_bias == cfg.fused_experts == gpt_oss
    if gpt_oss:
        assert cfg.sliding_layers == tuple(t == "sliding_attention" for t in hf.layer_types) and any(cfg.sliding_layers)
        assert cfg.rope.rope_type == "yarn" and cfg.rope.attention_factor > 1
        assert cfg.swiglu_limit == hf.swiglu_limit and cfg.swiglu_alpha == hf.swiglu_alpha
    assert cfg.shared_expert == (family == "qwen2_moe") == cfg.dense_mlp
    assert cfg.qk_norm_flat == (family == "olmoe")


def test_logits_hidden_states_and_routing_match(converted):
    """Logits and every block's input within TOL of transformers (left padding), a prompt's logits the same alone
    and left-padded in the batch, and at every layer each real token goes to the same top-k experts as
    transformers' router picks."""
    family, model, cfg, params = converted
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    out = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)
    real = mask.astype(bool)
    n = LENGTHS[1]
    alone = forward(params, cfg, tokens[1:2, -n:], mask[1:2, -n:], Intervention.none(cfg), capture=SITES)
    np.testing.assert_allclose(np.asarray(alone.logits[0]), np.asarray(out.logits[1, -n:]), atol=1e-5)
    errors = {"logits": rel_err(out.logits, ref_logits, real)}
    for layer in range(cfg.n_layers):
        errors[f"hidden[{layer}]"] = rel_err(out.resid_pre[layer], ref_hidden[layer], real)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{family}: relative error above {TOL}: {bad}"

    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        router_logits = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                              position_ids=torch.tensor(positions), output_router_logits=True).router_logits
    assert len(router_logits) == cfg.n_layers
    for layer in range(cfg.n_layers):
        h = apply_norm(cfg, out.resid_pre[layer] + out.attn_out[layer], params.layers.mlp_norm[layer])
        bias = None if params.layers.router_bias is None else params.layers.router_bias[layer]
        _, ours = route(params.layers.router[layer], cfg, h, bias)
        theirs = torch.topk(router_logits[layer].reshape(*tokens.shape, -1), cfg.n_experts_per_tok).indices.numpy()
        np.testing.assert_array_equal(np.sort(np.asarray(ours), -1)[real], np.sort(theirs, -1)[real],
                                      err_msg=f"{family} layer {layer}: different experts chosen")


def test_orthogonalized_equals_ablation(converted):
    """Projecting r̂ out of the embedding, o_proj, every routed expert's down_proj (and the shared expert's) gives
    the logits of ablating r̂ at every site; the MoE output is what the block adds, so ablation reaches it."""
    family, _, cfg, params = converted
    r = np.random.default_rng(3).standard_normal(cfg.d_model).astype(np.float32)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS, seed=2)
    edited = orthogonalize(params, cfg, r)
    # every call with the untied config (the edited model's) and one capture set: one compiled program
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    if params.lm_head is None:
        params = params.replace(lm_head=params.embed.T)
    ablated = forward(params, cfg, tokens, mask, Intervention.ablation(cfg, r), capture=("mlp_out",))
    assert max(residual_write_norms(edited, r).values()) < 1e-5
    assert "experts.down_proj" in residual_write_norms(params, r)
    if family == "gpt_oss":  # the biases that write into the residual stream are edited too
        assert {"o_proj.bias", "experts.down_proj.bias"} <= set(residual_write_norms(params, r))
    got = forward(edited, cfg, tokens, mask, Intervention.none(cfg), capture=("mlp_out",))
    real = mask.astype(bool)
    unit = r / np.linalg.norm(r)
    assert np.abs(np.asarray(ablated.mlp_out) @ unit).max() < 1e-5
    assert np.abs(np.asarray(got.mlp_out) @ unit).max() < 1e-5
    base = np.asarray(forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=("mlp_out",)).logits)
    assert rel_err(base, ablated.logits, real) > 100 * TOL  # the ablation changes this model's logits
    assert rel_err(got.logits, ablated.logits, real) <= TOL


def test_hf_export_loads_in_transformers(converted, tmp_path):
    """Exported in the source's own layout (per-expert tensors under the family's names): transformers runs it
    with our logits, and our reader gives back the same bits."""
    from transformers import AutoModelForCausalLM

    family, model, cfg, params = converted
    out = export_hf.save_hf(tmp_path / "m", cfg, params)
    theirs = set(model.state_dict())
    ours = {name for name, *_ in engine.hf_tensor_plan(cfg)}
    assert ours - theirs == set() or family in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref, _ = hf_forward(reloaded, tokens, mask)
    real = mask.astype(bool)
    ours = forward(params, cfg, tokens, mask, Intervention.none(cfg), capture=SITES)  # the parity test's program
    assert rel_err(ours.logits, ref, real) <= TOL
    cfg2, params2, _ = load_hf(str(out), with_tokenizer=False)
    assert cfg2 == cfg
    for name, value in to_flat(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(to_flat(params2)[name]), err_msg=name)
    names = json.loads((out / "config.json").read_text())
    assert names["architectures"] == [model.config.architectures[0]]


# --------------------------------------------------------------------------------------------------
# the dispatch


def test_grouped_dispatch_equals_every_expert_on_every_token():
    """The sorted block dispatch = the dense reference sum_k w_k expert_k(x) for any routing, including experts
    nobody chose and one expert chosen by every token (its group spans several blocks), and an expert shard."""
    cfg = tiny_config("qwen3_moe", qk_norm=True, n_experts=6, n_experts_per_tok=2, d_expert=12)
    lp = init_random(cfg, 0, scale=0.3).layers
    lp = jax.tree.map(lambda a: a[0], lp)
    rng = np.random.default_rng(0)
    N = 40
    x = rng.standard_normal((N, cfg.d_model)).astype(np.float32)
    experts = np.stack([np.zeros(N, int), rng.choice([1, 3, 4], N)], 1).astype(np.int32)  # 2 and 5 unused
    weights = rng.random((N, 2)).astype(np.float32)
    assert expert_block_rows(N, cfg) == 16 and expert_capacity(N, cfg) == 0  # expert 0's 40 rows: 3 blocks
    assert expert_capacity(1024, cfg) == 432  # 1.25 x 341.3 rows per expert, rounded up to a multiple of 8

    def expert(e, v):
        g, u = v @ np.asarray(lp.expert_gate[e]), v @ np.asarray(lp.expert_up[e])
        return (g / (1 + np.exp(-g)) * u) @ np.asarray(lp.expert_down[e])

    want = sum(weights[:, j, None] * np.stack([expert(e, x[n]) for n, e in enumerate(experts[:, j])])
               for j in range(2))
    # blocks only (few rows per expert), a batched capacity of 8 rows with overflow, and one holding every row
    for capacity in (None, 8, 48):
        run = jax.jit(lambda lp, x, w, e, c=capacity: moe_experts(lp, cfg, x, w, e, capacity=c))
        np.testing.assert_allclose(np.asarray(run(lp, x, weights, experts)), want, rtol=1e-5, atol=1e-5,
                                   err_msg=f"capacity {capacity}")
    # experts 3..5 alone (one device's shard under expert parallelism): only their assignments count
    shard = lp.replace(**{f: getattr(lp, f)[3:] for f in ("expert_gate", "expert_up", "expert_down")})
    part = np.asarray(moe_experts(shard, cfg, x, weights, experts, expert_offset=3, capacity=8))
    mine = experts >= 3
    want_part = sum(np.where(mine[:, j, None], weights[:, j, None], 0) *
                    np.stack([expert(e, x[n]) for n, e in enumerate(experts[:, j])]) for j in range(2))
    np.testing.assert_allclose(part, want_part, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~30 s: compiles the static and the continuous programs
def test_continuous_batching_equals_static():
    cfg = tiny_config("qwen3_moe", qk_norm=True, n_layers=2, n_experts=4, n_experts_per_tok=2, d_expert=16)
    params = decoding_params(init_random(cfg, jax.random.key(0), scale=0.4), True)
    ids = prompts(cfg.vocab_size, 6)
    r = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    for iv in (None, Intervention.ablation(cfg, r)):
        want = static(params, cfg, ids, iv, 8, ())
        got = continuous.generate(params, cfg, ids, iv, slots=3, max_new_tokens=8, chunk=8)
        assert got == want


# --------------------------------------------------------------------------------------------------
# bad input


def _hf_config(**overrides):
    base = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=64, hidden_size=32,
                intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return {**base, **overrides}


def test_bad_configs_are_refused():
    assert from_hf_config(_hf_config()).n_experts == 4
    with pytest.raises(ConfigError, match="num_experts_per_tok=5 selects more experts than the 4"):
        from_hf_config(_hf_config(num_experts_per_tok=5))
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        from_hf_config({k: v for k, v in _hf_config().items() if k != "moe_intermediate_size"})
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        from_hf_config(_hf_config(mlp_only_layers=[0]))
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        from_hf_config(_hf_config(decoder_sparse_step=2))
    with pytest.raises(ConfigError, match="num_experts"):
        from_hf_config(_hf_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    with pytest.raises(ConfigError, match="quantization_config"):
        from_hf_config(_hf_config(quantization_config={"quant_method": "mxfp4"}))


def test_checkpoint_that_disagrees_with_config_is_refused(converted, tmp_path):
    """A config with more experts, or wider experts, than the checkpoint: one error naming the tensors."""
    family, model, cfg, _ = converted
    src = tmp_path / "src"
    model.save_pretrained(src)
    hf = json.loads((src / "config.json").read_text())
    key = "num_local_experts" if "num_local_experts" in hf else "num_experts"
    (src / "config.json").write_text(json.dumps({**hf, key: cfg.n_experts + 1}))
    with pytest.raises(CheckpointError, match=rf"tensor model\.layers\.0\.\S+ has shape \({cfg.n_experts}, .*expected "
                                              rf"\({cfg.n_experts + 1}, .*experts={cfg.n_experts + 1} \(top"):
        load_hf(str(src), with_tokenizer=False)
    width = "intermediate_size" if family in ("mixtral", "olmoe", "gpt_oss") else "moe_intermediate_size"
    (src / "config.json").write_text(json.dumps({**hf, width: cfg.d_expert + 4}))
    with pytest.raises(CheckpointError,
                       match=r"experts\.(0\.\w+\.weight|gate_up_proj|down_proj) has shape .* experts=.* of width"):
        load_hf(str(src), with_tokenizer=False)


# --------------------------------------------------------------------------------------------------
# gpt-oss's MXFP4 release


def test_gpt_oss_mxfp4_release_is_dequantized_on_load(tmp_path):
    """Experts stored as MXFP4 blocks / scales (the released gpt-oss layout, random codes here) load as
    transformers' own dequantizer reads them, bit for bit, on both loading paths; the model then gives the logits
    of the transformers model holding those dequantized weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from refusal_jax.convert import hf as hf_reader
    from refusal_jax.convert import mxfp4, placement, safetensors_io
    from refusal_jax.model import sharding as shd
    from tests.hf_tiny import make_hf_model

    model = make_hf_model("gpt_oss", intermediate_size=64)  # MXFP4 blocks run along inputs of 32
    model.save_pretrained(tmp_path / "bf")
    tensors = {name: np.array(a) for name, a in safetensors_io.iter_model(tmp_path / "bf")}
    rng = np.random.default_rng(0)
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            E, d_in, d_out = tensors.pop(name).shape
            blocks = rng.integers(0, 256, (E, d_out, d_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 124, (E, d_out, d_in // 32), dtype=np.uint8)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32)
            with torch.no_grad():
                getattr(layer.mlp.experts, proj).copy_(ref)
    src = tmp_path / "mxfp4"
    src.mkdir()
    safetensors_io.write_file(src / "model.safetensors", tensors)
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))

    cfg, params, _ = load_hf(str(src), with_tokenizer=False)
    want = model.model.layers[1].mlp.experts
    np.testing.assert_array_equal(np.asarray(params.layers.expert_gate_up[1]), want.gate_up_proj.detach().numpy())
    np.testing.assert_array_equal(np.asarray(params.layers.expert_down[1]), want.down_proj.detach().numpy())
    placed = placement.place_params(hf_reader.sharded_source(src), shd.param_shardings(cfg, shd.make_mesh("auto")))
    for name, value in to_flat(params).items():
        np.testing.assert_array_equal(np.asarray(to_flat(placed)[name]), np.asarray(value), err_msg=name)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=LENGTHS)
    ref_logits, _ = hf_forward(model, tokens, mask)
    assert rel_err(forward(params, cfg, tokens, mask).logits, ref_logits, mask.astype(bool)) <= TOL

    with pytest.raises(CheckpointError, match="down_proj_blocks has no .*down_proj_scales"):
        list(mxfp4.dequantized([("x.down_proj_blocks", np.zeros((1, 2, 1, 16), np.uint8))], "src"))
    with pytest.raises(CheckpointError, match="do not pair up"):
        mxfp4.dequantize("x", np.zeros((1, 2, 1, 16), np.uint8), np.zeros((1, 2, 2), np.uint8))


def test_streaming_export_edits_every_expert(converted):
    """The export path's per-tensor edit (what `python -m refusal_jax.orthogonalize` writes, one HF tensor at a
    time: per-expert tensors carry a (layer, expert) index) gives the in-memory orthogonalized weights."""
    from refusal_jax.method.orthogonalization import streaming_edit, untied_config

    family, _, cfg, params = converted
    r = np.random.default_rng(5).standard_normal(cfg.d_model).astype(np.float32)
    ucfg = untied_config(cfg)
    unit = (r / np.linalg.norm(r))[None]
    streamed = engine.fill_params(ucfg, engine.to_hf_tensors(ucfg, params, edit=streaming_edit(cfg, unit)))
    want = to_flat(orthogonalize(params, cfg, r))
    for name, value in to_flat(streamed).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(want[name]), atol=1e-6, err_msg=name)

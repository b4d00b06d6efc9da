"""GGUF import of mixtures of experts: files written here with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes them (each layer's experts stacked into ffn_{gate,up,down}_exps [E, out, in], the
router as ffn_gate_inp, Qwen2-MoE's shared expert as ffn_*_shexp and its gate as a [D] ffn_gate_inp_shexp, Mixtral
as a `llama` file with permuted q/k), the GGUF names taken from gguf's own tensor-name map, not from the reader's."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from refusal_jax import forward  # noqa: E402
from refusal_jax.convert import engine  # noqa: E402
from refusal_jax.convert.gguf import load_gguf, permute_qk, sharded_source  # noqa: E402
from refusal_jax.errors import CheckpointError, ConfigError  # noqa: E402
from refusal_jax.model.config import tiny_config  # noqa: E402
from refusal_jax.model.params import init_random, to_flat  # noqa: E402

# family -> (GGUF architecture, config overrides; norm_topk_prob is llama.cpp's fixed choice for the architecture)
CASES = {
    "qwen3_moe": ("qwen3moe", dict(qk_norm=True, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2moe", dict(qkv_bias=True, shared_expert=True, norm_topk_prob=False, d_ff=24)),
    "olmoe": ("olmoe", dict(qk_norm=True, qk_norm_flat=True, norm_topk_prob=False)),
    "mixtral": ("llama", dict(norm_topk_prob=True)),
}
_EXPERT = re.compile(r"(model\.layers\.\d+\.\w+\.experts)\.(\d+)\.(\w+)\.weight")


def moe_model(family):
    arch, overrides = CASES[family]
    cfg = tiny_config(family, n_experts=4, n_experts_per_tok=2, d_expert=16, **overrides)
    return arch, cfg, init_random(cfg, 0, scale=0.5)


def write_moe_gguf(path, arch, cfg, params, *, expert_count=None, drop_kv=()):
    """`params` as llama.cpp writes them: per-expert HF tensors stacked, names from gguf's tensor-name map."""
    hf = dict(engine.to_hf_tensors(cfg, params, dtype=np.float32))
    stacks = {}
    for name in list(hf):
        if m := _EXPERT.fullmatch(name):
            stacks.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = hf.pop(name)
    for base, experts in stacks.items():
        hf[base + ".weight"] = np.stack([experts[e] for e in range(len(experts))])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[{"qwen3moe": "QWEN3MOE", "qwen2moe": "QWEN2MOE",
                                                         "olmoe": "OLMOE", "llama": "LLAMA"}[arch]], cfg.n_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_expert if arch in ("olmoe", "llama") else cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope.theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    kv = {"expert_count": expert_count or cfg.n_experts, "expert_used_count": cfg.n_experts_per_tok}
    if arch in ("qwen2moe", "qwen3moe"):
        kv["expert_feed_forward_length"] = cfg.d_expert
    if arch == "qwen2moe":
        kv["expert_shared_feed_forward_length"] = cfg.d_ff
    for key, value in kv.items():
        if key not in drop_kv:
            getattr(w, f"add_{key}")(value)
    for name, value in hf.items():
        base, suffix = name.rsplit(".", 1)
        gname = name_map.get_name(base)
        assert gname is not None, name
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            value = permute_qk(value, cfg.n_heads if base.endswith("q_proj") else cfg.n_kv_heads)
        if base.endswith("shared_expert_gate"):
            value = value.reshape(-1)  # llama.cpp's [D]
        w.add_tensor(f"{gname}.{suffix}", np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", list(CASES))
def test_moe_gguf_loads_the_same_params_and_logits(tmp_path, family):
    arch, cfg, params = moe_model(family)
    path = write_moe_gguf(tmp_path / "m.gguf", arch, cfg, params)
    got_cfg, got, _ = load_gguf(path, tokenizer=False)
    assert got_cfg.family == family
    assert (got_cfg.n_experts, got_cfg.n_experts_per_tok, got_cfg.d_expert, got_cfg.norm_topk_prob,
            got_cfg.shared_expert) == (cfg.n_experts, cfg.n_experts_per_tok, cfg.d_expert, cfg.norm_topk_prob,
                                       cfg.shared_expert)
    want, have = to_flat(params), to_flat(got)
    assert set(want) == set(have)
    for name in want:
        np.testing.assert_array_equal(np.asarray(have[name]), np.asarray(want[name]), err_msg=name)
    # the shard-by-shard path reads every expert of every stack the same
    src = sharded_source(path)
    hf = dict(engine.to_hf_tensors(cfg, params, dtype=np.float32))
    assert set(src.loaders) == set(hf)
    for name, value in hf.items():
        np.testing.assert_array_equal(src.loaders[name](), value, err_msg=name)
    tokens = np.array([[1, 5, 9, 3, 7, 2]])
    np.testing.assert_array_equal(np.asarray(forward(got, got_cfg, tokens).logits),
                                  np.asarray(forward(params, cfg, tokens).logits))


def test_moe_gguf_expert_count_disagreeing_with_the_stack_is_refused(tmp_path):
    arch, cfg, params = moe_model("qwen3_moe")
    path = write_moe_gguf(tmp_path / "m.gguf", arch, cfg, params, expert_count=8)
    # the router is the layer's first MoE tensor in the file
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.gate.weight has shape \(4, 32\), "
                                              r"expected \(8, 32\) .*experts=8"):
        load_gguf(path, tokenizer=False)
    with pytest.raises(CheckpointError, match=r"ffn_\w+_exps.weight stacks 4 experts, the metadata says 8"):
        dict(sharded_source(path).loaders)["model.layers.0.mlp.experts.0.gate_proj.weight"]()


def test_moe_gguf_missing_expert_width_is_refused(tmp_path):
    arch, cfg, params = moe_model("qwen3_moe")
    path = write_moe_gguf(tmp_path / "m.gguf", arch, cfg, params, drop_kv=("expert_feed_forward_length",))
    with pytest.raises(ConfigError, match="lacks qwen3moe.expert_feed_forward_length"):
        load_gguf(path, tokenizer=False)


@pytest.mark.parametrize("family", list(CASES))
def test_moe_gguf_export_reads_back_the_same_params(tmp_path, family):
    from refusal_jax.convert.gguf_writer import save_gguf

    arch, cfg, params = moe_model(family)
    res = save_gguf(tmp_path / "out.gguf", cfg, params, tensor_type="f32")
    reader = gguf.GGUFReader(res["path"])  # gguf's own reader accepts the file
    assert str(reader.fields["general.architecture"].contents()) == arch
    stacks = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors if t.name.endswith("_exps.weight")}
    assert stacks["blk.0.ffn_down_exps.weight"] == (cfg.d_expert, cfg.d_model, cfg.n_experts)  # ggml ne order
    got_cfg, got, _ = load_gguf(res["path"], tokenizer=False)
    assert got_cfg.family == family
    want, have = to_flat(params), to_flat(got)
    assert set(want) == set(have)
    for name in want:
        np.testing.assert_array_equal(np.asarray(have[name]), np.asarray(want[name]), err_msg=name)


def test_moe_gguf_export_refuses_a_renormalisation_llama_cpp_would_not_do(tmp_path):
    import dataclasses

    from refusal_jax.convert.gguf_writer import save_gguf

    _, cfg, params = moe_model("qwen2_moe")
    with pytest.raises(ConfigError, match="qwen2moe never renormalises .* norm_topk_prob=True"):
        save_gguf(tmp_path / "out.gguf", dataclasses.replace(cfg, norm_topk_prob=True), params)
    assert not (tmp_path / "out.gguf").exists()


def test_experts_in_a_dense_architecture_are_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "qwen3")
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"mixture-of-experts qwen3 files \(qwen3.expert_count=4\) are not supported"):
        load_gguf(tmp_path / "m.gguf", tokenizer=False)


def test_transformers_gguf_loader_reads_the_exported_qwen3moe_file_to_the_same_logits(tmp_path):
    """An independent reader of the stacks: transformers' GGUF loader (torch). It ignores
    qwen3moe.expert_feed_forward_length and builds experts of its default width 768, so the experts here are 768
    wide."""
    import dataclasses

    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from refusal_jax.convert.gguf_writer import save_gguf

    _, cfg, _ = moe_model("qwen3_moe")
    cfg = dataclasses.replace(cfg, d_expert=768)
    params = init_random(cfg, 0, scale=0.5)
    path = save_gguf(tmp_path / "m.gguf", cfg, params, tensor_type="f32")["path"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    tokens = np.array([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(params, cfg, tokens).logits)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

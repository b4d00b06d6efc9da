"""Converter errors, strict fill, orbax round trip, CLI, and the non-editable wheel."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from refusal_jax.convert import checkpoint, engine, safetensors_io
from refusal_jax.convert.hf import load_hf
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model.config import from_hf_config, tiny_config
from refusal_jax.model.params import init_random, to_flat

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")


def hf_tensors(cfg, seed=0):
    """Random HF-named tensors for a tiny llama config (torch layout)."""
    rng = np.random.default_rng(seed)
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.n_layers):
        t.update({f"model.layers.{i}.input_layernorm.weight": (D,),
                  f"model.layers.{i}.post_attention_layernorm.weight": (D,),
                  f"model.layers.{i}.self_attn.q_proj.weight": (N * H, D),
                  f"model.layers.{i}.self_attn.k_proj.weight": (K * H, D),
                  f"model.layers.{i}.self_attn.v_proj.weight": (K * H, D),
                  f"model.layers.{i}.self_attn.o_proj.weight": (D, N * H),
                  f"model.layers.{i}.mlp.gate_proj.weight": (F, D), f"model.layers.{i}.mlp.up_proj.weight": (F, D),
                  f"model.layers.{i}.mlp.down_proj.weight": (D, F)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


@pytest.fixture
def hf_dir(tmp_path):
    cfg = from_hf_config(LLAMA)
    safetensors_io.write_file(tmp_path / "model.safetensors", hf_tensors(cfg))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    return tmp_path


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture GPT2LMHeadModel.*supports LlamaForCausalLM"):
        from_hf_config({**LLAMA, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


@pytest.mark.parametrize("attr,value,match", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type='yarn'"),
    ("hidden_act", "relu", "hidden_act='relu'"),
    ("attention_bias", True, "attention_bias"),
    ("some_new_knob", 3, "some_new_knob"),
])
def test_unsupported_config_attribute_is_named(attr, value, match):
    with pytest.raises(ConfigError, match=match):
        from_hf_config({**LLAMA, attr: value})


def test_sliding_window_config():
    cfg = from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                          "sliding_window": 16})
    assert cfg.sliding_window == 16 and all(cfg.sliding_layers)
    qwen = from_hf_config({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                           "sliding_window": 32, "use_sliding_window": False, "max_window_layers": 1})
    assert qwen.sliding_window is None


def test_strict_fill_errors():
    cfg = from_hf_config(LLAMA)
    good = hf_tensors(cfg)
    params = engine.fill_params(cfg, good.items())
    np.testing.assert_array_equal(params.lm_head, good["lm_head.weight"].T)
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match="missing 1 tensor.*layers.1.mlp.up_proj"):
        engine.fill_params(cfg, missing.items())
    with pytest.raises(CheckpointError, match="unexpected 1 tensor.*model.layers.0.extra"):
        engine.fill_params(cfg, [*good.items(), ("model.layers.0.extra", np.zeros(3, np.float32))])
    bad = dict(good, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(32, 32\), expected \(16, 32\)"):
        engine.fill_params(cfg, bad.items())
    with pytest.raises(CheckpointError, match="more than once"):
        engine.fill_params(cfg, [*good.items(), ("model.norm.weight", good["model.norm.weight"])])
    nan = dict(good, **{"model.norm.weight": np.full(32, np.nan, np.float32)})
    with pytest.raises(CheckpointError, match="NaN"):
        engine.fill_params(cfg, nan.items())


def test_truncated_and_corrupt_safetensors(hf_dir, tmp_path_factory):
    blob = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(str(hf_dir), with_tokenizer=False)
    (hf_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_hf(str(hf_dir), with_tokenizer=False)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_hf(str(empty / "nope"), with_tokenizer=False)


def test_bf16_safetensors_converts(tmp_path):
    import ml_dtypes

    cfg = from_hf_config(LLAMA)
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors(cfg).items()}
    safetensors_io.write_file(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    _, params, _ = load_hf(str(tmp_path), with_tokenizer=False, dtype=ml_dtypes.bfloat16)
    assert params.embed.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params.embed, tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = tiny_config("qwen2")
    params = init_random(cfg, jax.random.key(0), dtype=dtype)
    checkpoint.save(tmp_path / "ckpt", cfg, params, source="test")
    cfg2, params2, _ = checkpoint.load(tmp_path / "ckpt")
    assert cfg2 == cfg
    for (name, a), (name2, b) in zip(sorted(to_flat(params).items()), sorted(to_flat(params2).items())):
        assert name == name2 and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(tmp_path / "ckpt", cfg, params)


def test_converted_config_version_checked(tmp_path):
    cfg = tiny_config("llama")
    checkpoint.save(tmp_path / "c", cfg, init_random(cfg, jax.random.key(0)))
    path = tmp_path / "c" / checkpoint.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(ConfigError, match="format_version=99"):
        checkpoint.load(tmp_path / "c")


def test_cli_convert_and_errors(hf_dir, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(hf_dir)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "refusal_jax.convert", str(hf_dir), "--out", str(out),
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and (out / checkpoint.CONFIG_FILE).exists() and (out / "tokenizer").exists()
    again = subprocess.run([sys.executable, "-m", "refusal_jax.convert", str(hf_dir), "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    (hf_dir / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["FooForCausalLM"],
                                                    "model_type": "foo"}))
    bad = subprocess.run([sys.executable, "-m", "refusal_jax.convert", str(hf_dir), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown architecture FooForCausalLM" in bad.stderr
    assert "Traceback" not in bad.stderr

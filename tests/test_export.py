"""Export to Hugging Face format: tensor and config round trips, transformers parity of exported models, and the
`python -m refusal_jax.orthogonalize` command (edited model == inference-time ablation, run by transformers)."""

import dataclasses
import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from refusal_jax import Intervention, forward
from refusal_jax.convert import engine, export_hf, safetensors_io
from refusal_jax.convert.hf import load_hf
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model.config import ModelConfig, RopeConfig, from_hf_config, tiny_config
from refusal_jax.model.params import init_random, to_flat
from tests.hf_tiny import hf_forward, left_padded_batch, make_hf_model

TOL = 1e-4

GEMMA2 = ModelConfig(
    family="gemma2", architecture="Gemma2ForCausalLM", vocab_size=64, d_model=32, n_layers=4, n_heads=4,
    n_kv_heads=2, head_dim=8, d_ff=48, mlp_activation="gelu_tanh", embed_scale=True, post_norms=True,
    tie_embeddings=True, attn_softcap=50.0, final_softcap=30.0, query_scale=24.0**-0.5, sliding_window=5,
    sliding_layers=(True, False, True, False))
GEMMA3 = ModelConfig(
    family="gemma3", architecture="Gemma3ForCausalLM", vocab_size=64, d_model=32, n_layers=4, n_heads=4,
    n_kv_heads=2, head_dim=8, d_ff=48, mlp_activation="gelu_tanh", embed_scale=True, post_norms=True,
    qk_norm=True, tie_embeddings=True, query_scale=8.0**-0.5, sliding_window=5,
    rope=RopeConfig(theta=1e6, rope_type="linear", factor=8.0), rope_local=RopeConfig(theta=1e4),
    sliding_layers=(True, True, False, True))

# Every family as its from_hf_config would give it (real architecture names, so round trips are exact).
CONFIGS = {
    "llama": tiny_config("llama", architecture="LlamaForCausalLM", n_layers=3,
                         rope=RopeConfig(theta=5e5, rope_type="llama3", factor=8.0,
                                         original_max_position_embeddings=16)),
    "mistral": tiny_config("mistral", architecture="MistralForCausalLM", sliding_window=5,
                           sliding_layers=(True, True)),
    "qwen2": tiny_config("qwen2", architecture="Qwen2ForCausalLM"),
    "qwen3": tiny_config("qwen3", architecture="Qwen3ForCausalLM", qk_norm=True, n_layers=3,
                         sliding_window=6, sliding_layers=(False, True, True)),
    "gemma": tiny_config("gemma", architecture="GemmaForCausalLM", mlp_activation="gelu_tanh", embed_scale=True,
                         tie_embeddings=True),
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
}



def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8)


# --------------------------------------------------------------------------------------------------
# (a) round trips


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_tensor_round_trip_is_bit_exact(family):
    cfg = CONFIGS[family]
    params = jax.device_put(init_random(cfg, 0, scale=0.02))  # jax arrays: export slices them one layer at a time
    tensors = list(engine.to_hf_tensors(cfg, params))
    names = [n for n, _ in tensors]
    assert len(names) == len(set(names))
    assert ("lm_head.weight" in names) == (not cfg.tie_embeddings)
    back = engine.fill_params(cfg, iter(tensors))
    flat, flat2 = to_flat(params), to_flat(back)
    assert sorted(flat) == sorted(flat2)
    for name in flat:
        assert flat2[name].dtype == np.float32
        np.testing.assert_array_equal(bits(flat[name]), bits(flat2[name]), err_msg=name)


def test_tensor_export_layout_and_gemma_unfolding():
    cfg = GEMMA2
    params = init_random(cfg, 1, scale=0.02)
    hf = dict(engine.to_hf_tensors(cfg, params))
    H = cfg.head_dim
    q = np.asarray(params.layers.q[1])  # [D, N, H]
    np.testing.assert_array_equal(hf["model.layers.1.self_attn.q_proj.weight"][3 * H + 2], q[:, 3, 2])
    np.testing.assert_array_equal(hf["model.layers.1.self_attn.o_proj.weight"][:, 2 * H + 5],
                                  np.asarray(params.layers.o[1])[2, 5])
    # HF's Gemma norm holds w with multiplier 1 + w; we hold 1 + w
    np.testing.assert_array_equal(hf["model.layers.0.pre_feedforward_layernorm.weight"],
                                  np.asarray(params.layers.mlp_norm[0]) - np.float32(1))
    assert hf["model.norm.weight"].dtype == np.float32
    bf = dict(engine.to_hf_tensors(cfg, params, dtype=ml_dtypes.bfloat16))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in bf.values())


def test_untied_config_with_tied_params_exports_embedding_as_head():
    cfg = CONFIGS["qwen2"]
    params = init_random(cfg, 0, scale=0.02)
    untied = dict(engine.to_hf_tensors(dataclasses.replace(cfg, tie_embeddings=False), params))
    np.testing.assert_array_equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])
    with pytest.raises(CheckpointError, match="ties embeddings"):
        list(engine.to_hf_tensors(cfg, params.replace(lm_head=params.embed.T)))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_config_round_trip(family):
    cfg = CONFIGS[family]
    hf = export_hf.to_hf_config(cfg)
    assert from_hf_config(json.loads(json.dumps(hf))) == cfg
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    assert from_hf_config(export_hf.to_hf_config(untied)) == untied


def test_config_round_trip_from_transformers_configs():
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    specs = {
        "LlamaForCausalLM": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
        "MistralForCausalLM": ("MistralConfig", dict(sliding_window=5)),
        "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True)),
        "Qwen3ForCausalLM": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2)),
        "GemmaForCausalLM": ("GemmaConfig", {}),
        "Gemma2ForCausalLM": ("Gemma2Config", dict(query_pre_attn_scalar=144, sliding_window=5)),
        "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(sliding_window=5, sliding_window_pattern=3)),
    }
    for arch, (cls, kw) in specs.items():
        hf = getattr(transformers, cls)(**small, **kw).to_dict()
        cfg = from_hf_config({**hf, "architectures": [arch]})
        assert from_hf_config(export_hf.to_hf_config(cfg)) == cfg, arch
        # and transformers reads our dict back as the same model
        ours = export_hf.to_hf_config(cfg)
        again = transformers.AutoConfig.for_model(**ours)
        assert from_hf_config({**again.to_dict(), "architectures": [arch]}) == cfg, arch


def test_inexpressible_configs_are_refused():
    with pytest.raises(ConfigError, match="slides only some"):
        export_hf.to_hf_config(tiny_config("mistral", sliding_window=4, sliding_layers=(True, False)))
    with pytest.raises(ConfigError, match="no sliding-window"):
        export_hf.to_hf_config(tiny_config("llama", sliding_window=4, sliding_layers=(True, False)))
    with pytest.raises(ConfigError, match="qkv_bias"):
        export_hf.to_hf_config(tiny_config("llama", qkv_bias=True))


# --------------------------------------------------------------------------------------------------
# exported models run in transformers exactly as in refusal_jax


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_exported_model_matches_transformers(family, tmp_path):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[family]
    params = init_random(cfg, 0, scale=0.3)
    out = export_hf.save_hf(tmp_path / "m", cfg, params, shard_size=40_000 if family == "llama" else 2**30)
    if family == "llama":  # the sharded layout, with an index transformers and our reader both follow
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(9, 5, 12))
    ref, _ = hf_forward(model, tokens, mask)
    ours = np.asarray(forward(params, cfg, tokens, mask).logits)
    real = mask.astype(bool)
    err = np.abs(ours - ref)[real].max()
    assert err <= TOL, f"{family}: exported model logits differ from refusal_jax by {err:.2e}"
    cfg2, params2, _ = load_hf(str(out), with_tokenizer=False)
    assert cfg2 == cfg
    for name, value in to_flat(params).items():
        np.testing.assert_array_equal(bits(value), bits(to_flat(params2)[name]), err_msg=name)


def test_save_hf_bfloat16_and_atomic_overwrite(tmp_path):
    cfg = CONFIGS["qwen2"]
    params = init_random(cfg, 0, scale=0.02)
    out = export_hf.save_hf(tmp_path / "m", cfg, params, dtype="bfloat16")
    header, _ = safetensors_io.read_header(out / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"} and "lm_head.weight" not in header
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf.save_hf(out, cfg, params)
    export_hf.save_hf(out, cfg, params, overwrite=True)
    names = sorted(p.name for p in tmp_path.iterdir())  # no partial directories or lock files left behind
    assert names[0] == "m" and len(names) == 2 and names[1].startswith("m.previous-")  # the old one moved aside


# --------------------------------------------------------------------------------------------------
# (b) python -m refusal_jax.orthogonalize on tiny HF models, checked by transformers


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "I", "As", "user", "assistant", "hello", "world", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def hf_src(request, tmp_path_factory):
    pytest.importorskip("torch")
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"src-{request.param}")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    direction = np.random.default_rng(7).standard_normal(model.config.hidden_size).astype(np.float32) * 3.0
    np.save(path / "direction.npy", direction)
    return request.param, model, path, direction


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "refusal_jax.orthogonalize", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_export_equals_ablation(hf_src, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, base_model, src, direction = hf_src
    out, ckpt = tmp_path / "edited", tmp_path / "edited-ckpt"
    run = run_cli("--model", src, "--direction", src / "direction.npy", "--out", out, "--checkpoint", ckpt,
                  "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "max |W r̂| before -> after" in run.stdout

    cfg, params, _ = load_hf(str(src), with_tokenizer=False)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(9, 5, 12))
    ablated = np.asarray(forward(params, cfg, tokens, mask, Intervention.ablation(cfg, direction)).logits)
    edited = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    got, _ = hf_forward(edited, tokens, mask)
    base, _ = hf_forward(base_model, tokens, mask)
    real = mask.astype(bool)
    err = np.abs(got - ablated)[real].max()
    assert err <= TOL, f"{family}: exported orthogonalized model differs from ablation by {err:.2e}"
    assert np.abs(got - base)[real].max() > 1e-2  # the edit did something

    # untied head holding the original unembedding; no residual-writing matrix has a component along r̂
    assert edited.config.tie_word_embeddings is False
    head, emb = edited.lm_head.weight, edited.model.embed_tokens.weight
    assert head.data_ptr() != emb.data_ptr()
    np.testing.assert_array_equal(head.detach().numpy(), base_model.lm_head.weight.detach().numpy())
    unit = torch.tensor(direction / np.linalg.norm(direction))
    assert (emb @ unit).abs().max() < 1e-5
    for layer in edited.model.layers:
        assert (unit @ layer.self_attn.o_proj.weight).abs().max() < 1e-5
        assert (unit @ layer.mlp.down_proj.weight).abs().max() < 1e-5

    # tokenizer (chat template included) and generation config travel along
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")

    # the refusal_jax checkpoint holds the same edited model
    from refusal_jax.convert import checkpoint

    ccfg, cparams, _ = checkpoint.load(ckpt)
    assert ccfg.tie_embeddings is False and cparams.lm_head is not None
    mine = np.asarray(forward(cparams, ccfg, tokens, mask).logits)
    assert np.abs(mine - ablated)[real].max() <= TOL


def test_cli_bad_inputs(hf_src, tmp_path, capsys):
    from refusal_jax.orthogonalize import main

    _, _, src, direction = hf_src
    bad = {
        "wrong_size.npy": (np.ones(direction.size + 1, np.float32), "shape (65,)"),
        "nan.npy": (np.where(np.arange(direction.size) == 3, np.nan, direction), "NaN"),
        "zero.npy": (np.zeros_like(direction), "zero"),
        "not_orthonormal.npy": (np.ones((2, direction.size), np.float32), "not orthonormal"),
    }
    cases = [(tmp_path / "missing.npy", "does not exist")]
    for name, (arr, message) in bad.items():
        np.save(tmp_path / name, arr)
        cases.append((tmp_path / name, message))
    for path, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--model", str(src), "--direction", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2, path
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
    # end to end, through the interpreter: exit status 2, one line, no traceback
    run = run_cli("--model", src, "--direction", tmp_path / "nan.npy", "--out", tmp_path / "out")
    assert run.returncode == 2 and "NaN" in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(src), "--direction", str(src / "direction.npy"), "--out", str(tmp_path / "exists")])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err


def test_cli_refuses_post_norm_families(tmp_path, capsys):
    from refusal_jax.orthogonalize import main

    cfg = GEMMA2
    export_hf.save_hf(tmp_path / "g2", cfg, init_random(cfg, 0, scale=0.02), tiny_tokenizer())
    np.save(tmp_path / "d.npy", np.ones(cfg.d_model, np.float32))
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "g2"), "--direction", str(tmp_path / "d.npy"), "--out",
              str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 2 and "not equivalent to ablation for gemma2" in capsys.readouterr().err

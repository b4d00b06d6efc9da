"""GGUF export (refusal_jax.convert.export_gguf), read back with refusal_jax.convert.gguf.

* F32 round trip of every exportable family: the re-imported config and parameters equal the source bit for bit
  (Llama-3 RoPE through rope_freqs.weight, Gemma norms as 1 + w, Gemma-2/3 soft-caps, windows, local RoPE);
* tiny llama (untied, GQA) and qwen2 (tied, q/k/v biases): the same logits as the source params (max abs diff
  0 in F32; asserted <= 1e-5) and as the same params exported to safetensors and read back;
* layout: names are llama.cpp's (gguf's own TensorNameMap), q/k rows are permuted for llama files only; and
  transformers' own GGUF loader (torch, an independent reader) gives the same logits for llama, qwen2, gemma2;
* F16: 2-D weights round to float16 exactly, norms/biases stay F32; the largest logit error relative to the
  largest logit is < 5e-3 (measured 2.2e-3, i.e. 0.012 on logits up to 5.4, on these large random weights);
  BF16 < 3e-2 (measured 1.6e-2); Q8_0: rows whose length is a multiple of 32 are Q8_0 (equal to gguf's
  quantize/dequantize), others F16, error < 0.1 (measured 5.2e-2);
* from a GGUF source with a tokenizer: an orthogonalized model keeps the source's tokenizer, chat template and
  quantized tensor types, and gives the orthogonalized logits; the command line does the same;
* configs a GGUF file cannot express are refused; an existing file is not overwritten.
"""

import dataclasses
from collections import Counter

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from refusal_jax import forward  # noqa: E402
from refusal_jax.convert import export_gguf, export_hf, gguf_writer  # noqa: E402
from refusal_jax.convert.gguf import load_gguf, permute_qk, read_gguf  # noqa: E402
from refusal_jax.convert.hf import load_hf  # noqa: E402
from refusal_jax.errors import CheckpointError, ConfigError  # noqa: E402
from refusal_jax.method.orthogonalization import orthogonalize, untied_config  # noqa: E402
from refusal_jax.model.config import ModelConfig, RopeConfig, tiny_config  # noqa: E402
from refusal_jax.model.params import init_random, to_flat  # noqa: E402
from refusal_jax.runs import outputs  # noqa: E402
from tests.hf_tiny import left_padded_batch  # noqa: E402

LLAMA3 = RopeConfig(theta=5e5, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
CONFIGS = {
    "llama": tiny_config("llama", architecture="LlamaForCausalLM", rms_norm_eps=1e-5),
    "llama3-rope": tiny_config("llama", architecture="LlamaForCausalLM", rope=LLAMA3),
    "qwen2": tiny_config("qwen2", architecture="Qwen2ForCausalLM"),
    "qwen3": tiny_config("qwen3", architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=16, n_layers=3),
    "gemma": tiny_config("gemma", architecture="GemmaForCausalLM", mlp_activation="gelu_tanh", embed_scale=True,
                         tie_embeddings=True),
    "gemma2": ModelConfig(
        family="gemma2", architecture="Gemma2ForCausalLM", vocab_size=64, d_model=32, n_layers=4, n_heads=4,
        n_kv_heads=2, head_dim=8, d_ff=48, mlp_activation="gelu_tanh", embed_scale=True, post_norms=True,
        tie_embeddings=True, attn_softcap=50.0, final_softcap=30.0, query_scale=24.0**-0.5, sliding_window=5,
        sliding_layers=(True, False, True, False)),
    "gemma3": ModelConfig(
        family="gemma3", architecture="Gemma3ForCausalLM", vocab_size=64, d_model=32, n_layers=4, n_heads=4,
        n_kv_heads=2, head_dim=8, d_ff=48, mlp_activation="gelu_tanh", embed_scale=True, post_norms=True,
        qk_norm=True, tie_embeddings=True, query_scale=8.0**-0.5, sliding_window=5,
        rope=RopeConfig(theta=1e6, rope_type="linear", factor=8.0), rope_local=RopeConfig(theta=1e4),
        sliding_layers=(True, True, False, True)),
}



def assert_same_params(a, b, exact=True):
    fa, fb = to_flat(a), to_flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if exact:
            np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
        else:
            np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=1e-6, err_msg=k)


def last_logits(params, cfg, seed=0):
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 4, 10), seed=seed)
    return np.asarray(forward(params, cfg, tokens, mask).logits)[np.asarray(mask).astype(bool)]


# --------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_round_trip_is_exact(name, tmp_path):
    cfg = CONFIGS[name]
    params = init_random(cfg, 0, scale=0.3)
    res = gguf_writer.save_gguf(tmp_path / "m.gguf", cfg, params)
    assert set(res["counts"]) == {"F32"}
    cfg2, params2, tok = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert tok is None
    assert_same_params(params, params2)
    # the config comes back (query_scale through float32 attention.scale: to float32 precision)
    want = dataclasses.replace(cfg, query_scale=None)
    got = dataclasses.replace(cfg2, query_scale=None)
    if cfg.family == "gemma":
        want = dataclasses.replace(want, rope_local=None)
    assert got == want
    assert cfg2.q_scale == pytest.approx(cfg.q_scale, rel=1e-6)
    src = read_gguf(tmp_path / "m.gguf")
    assert src.metadata["general.architecture"] == gguf_writer.GGUF_ARCH[cfg.family]
    assert src.metadata["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_equal_source_and_safetensors_export(family, tmp_path):
    cfg = CONFIGS[family]
    params = init_random(cfg, 1, scale=0.3)
    gguf_writer.save_gguf(tmp_path / "m.gguf", cfg, params)
    cfg_g, params_g, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    export_hf.save_hf(tmp_path / "hf", cfg, params)
    cfg_s, params_s, _ = load_hf(str(tmp_path / "hf"), with_tokenizer=False)
    ref = last_logits(params, cfg)
    from_gguf = last_logits(params_g, cfg_g)
    from_st = last_logits(params_s, cfg_s)
    assert np.abs(from_gguf - ref).max() <= 1e-5
    assert np.abs(from_gguf - from_st).max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_transformers_reads_the_same_model(family, tmp_path):
    """An independent reader: transformers' own GGUF loader (dequantizes and un-permutes q/k itself).

    Gemma-2 uses query_pre_attn_scalar 256 here because transformers does not read attention.scale or the
    soft-caps from a GGUF file (it takes Gemma2Config's defaults: 256, 50, 30)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[family]
    if family == "gemma2":
        cfg = dataclasses.replace(cfg, query_scale=256.0**-0.5)
    params = init_random(cfg, 2, scale=0.3)
    gguf_writer.save_gguf(tmp_path / "m.gguf", cfg, params)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 6, 6))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(params, cfg, tokens, mask).logits)
    assert np.abs(theirs - ours).max() < 1e-4


def test_names_and_qk_layout(tmp_path):
    for family, permuted in (("llama", True), ("qwen2", False)):
        cfg = CONFIGS[family]
        params = init_random(cfg, 0, scale=0.3)
        path = gguf_writer.save_gguf(tmp_path / f"{family}.gguf", cfg, params)["path"]
        reader = gguf.GGUFReader(path)
        arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[family]
        name_map = gguf.get_tensor_name_map(arch, cfg.n_layers)
        hf = dict(gguf_writer.engine.to_hf_tensors(cfg, params, dtype=np.float32))
        names = gguf_writer.gguf_names(cfg)
        raw = {t.name: np.asarray(t.data) for t in reader.tensors}
        assert sorted(raw) == sorted(names.values())
        for hf_name, g in names.items():
            base, suffix = hf_name.rsplit(".", 1)
            assert g == f"{name_map.get_name(base)}.{suffix}", hf_name  # llama.cpp's own naming
        q = hf["model.layers.0.self_attn.q_proj.weight"]
        k = hf["model.layers.1.self_attn.k_proj.weight"]
        got_q, got_k = raw["blk.0.attn_q.weight"], raw["blk.1.attn_k.weight"]
        if permuted:
            np.testing.assert_array_equal(got_q, permute_qk(q, cfg.n_heads))
            np.testing.assert_array_equal(got_k, permute_qk(k, cfg.n_kv_heads))
            assert not np.array_equal(got_q, q)
        else:
            np.testing.assert_array_equal(got_q, q)
            np.testing.assert_array_equal(raw["blk.0.attn_q.bias"], hf["model.layers.0.self_attn.q_proj.bias"])
        assert ("output.weight" in raw) == (not cfg.tie_embeddings)


def test_f16_and_q8_0(tmp_path):
    cfg = CONFIGS["llama"]
    params = init_random(cfg, 2, scale=0.3)
    ref = last_logits(params, cfg)
    res = gguf_writer.save_gguf(tmp_path / "h.gguf", cfg, params, tensor_type="f16")
    assert res["tensor_types"]["blk.0.attn_norm.weight"] == "F32" and res["tensor_types"]["token_embd.weight"] == "F16"
    cfg16, p16, _ = load_gguf(tmp_path / "h.gguf", tokenizer=False)
    for k, v in to_flat(params).items():
        v = np.asarray(v)
        want = v if "norm" in k else v.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(to_flat(p16)[k]), want, err_msg=k)
    scale = np.abs(ref).max()  # ~5.4: these random weights (std 0.3) give large logits
    err16 = np.abs(last_logits(p16, cfg16) - ref).max() / scale
    assert 0 < err16 < 5e-3, err16  # measured 2.2e-3 (0.012 absolute)
    gguf_writer.save_gguf(tmp_path / "b.gguf", cfg, params, tensor_type="bf16")
    cfgb, pb, _ = load_gguf(tmp_path / "b.gguf", tokenizer=False)
    errb = np.abs(last_logits(pb, cfgb) - ref).max() / scale
    assert errb < 3e-2, errb  # measured 1.6e-2

    res = gguf_writer.save_gguf(tmp_path / "q.gguf", cfg, params, tensor_type="q8_0")
    types = res["tensor_types"]
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of d_ff = 48, not a multiple of Q8_0's 32-blocks
    assert read_gguf(tmp_path / "q.gguf").metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    cfg8, p8, _ = load_gguf(tmp_path / "q.gguf", tokenizer=False)
    Q = gguf.GGMLQuantizationType.Q8_0
    emb = np.asarray(params.embed)
    np.testing.assert_array_equal(np.asarray(p8.embed),
                                  gguf.quants.dequantize(gguf.quants.quantize(emb, Q), Q).reshape(emb.shape))
    err8 = np.abs(last_logits(p8, cfg8) - ref).max() / scale
    assert err8 < 0.1, err8  # measured 5.2e-2


# --------------------------------------------------------------------------------------------------
# from a GGUF source with a tokenizer


@pytest.fixture
def source_gguf(tmp_path):
    from tests.test_gguf import hf_tensors, write_gguf

    quantized = ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    path = write_gguf(tmp_path / "src.gguf", "qwen2", hf_tensors("qwen2", tied=True), tokenizer=True,
                      quantize=quantized)
    return path


def test_edited_model_keeps_source_tokenizer_and_types(source_gguf, tmp_path):
    cfg, params, tok = load_gguf(source_gguf)
    r = np.random.default_rng(0).standard_normal(cfg.d_model)
    edited, ocfg = orthogonalize(params, cfg, r), untied_config(cfg)
    res = gguf_writer.save_gguf(tmp_path / "out.gguf", ocfg, edited, tokenizer_source=source_gguf,
                                tensor_type="source", name="edited")
    assert "tokenizer.ggml.tokens" in res["copied_keys"] and "tokenizer.chat_template" in res["copied_keys"]
    types = res["tensor_types"]
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_k.weight"] == "F32" and types["output.weight"] == "F16"  # new tensor: source type unknown
    cfg2, params2, tok2 = load_gguf(tmp_path / "out.gguf")
    assert not cfg2.tie_embeddings and cfg2.family == "qwen2"
    text = "hi there <|im_start|>"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template and tok2.eos_token == tok.eos_token
    md = read_gguf(tmp_path / "out.gguf").metadata
    assert md["general.name"] == "edited"
    # the Q8_0 tensors were not edited by orthogonalization: re-encoding the dequantized Q8_0 values is exact
    np.testing.assert_array_equal(np.asarray(params2.layers.q), np.asarray(edited.layers.q))
    assert_same_params(dataclasses.replace(params2, lm_head=None), dataclasses.replace(
        edited, lm_head=None))
    ocfg2 = dataclasses.replace(ocfg, architecture=cfg2.architecture)
    assert np.abs(last_logits(params2, cfg2) - last_logits(edited, ocfg2)).max() <= 2e-3  # lm_head in F16


def test_command_line(source_gguf, tmp_path, capsys):
    cfg, params, _ = load_gguf(source_gguf, tokenizer=False)
    r = np.random.default_rng(1).standard_normal(cfg.d_model).astype(np.float32)
    np.save(tmp_path / "r.npy", r)
    out = tmp_path / "cli.gguf"
    export_gguf.main(["--model", str(source_gguf), "--out", str(out), "--direction", str(tmp_path / "r.npy"),
                      "--type", "f32", "--no-progress"])
    printed = capsys.readouterr().out
    assert "wrote" in printed and "tokenizer and general metadata copied" in printed
    cfg2, params2, tok2 = load_gguf(out)
    assert tok2 is not None
    want = orthogonalize(params, cfg, r)
    assert_same_params(params2, want)
    with pytest.raises(SystemExit) as e:  # exists: refused
        export_gguf.main(["--model", str(source_gguf), "--out", str(out), "--no-progress"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_refusals(tmp_path):
    swa = tiny_config("mistral", sliding_window=4, sliding_layers=(True, True))
    with pytest.raises(ConfigError, match="sliding-window"):
        gguf_writer.save_gguf(tmp_path / "a.gguf", swa, init_random(swa, 0, scale=0.3))
    g2 = dataclasses.replace(CONFIGS["gemma2"], sliding_layers=(False, True, False, True))
    with pytest.raises(ConfigError, match="even layers"):
        gguf_writer.save_gguf(tmp_path / "b.gguf", g2, init_random(g2, 0, scale=0.3))
    cfg = CONFIGS["llama"]
    gguf_writer.save_gguf(tmp_path / "c.gguf", cfg, init_random(cfg, 0, scale=0.3))
    with pytest.raises(CheckpointError, match="already exists"):
        gguf_writer.save_gguf(tmp_path / "c.gguf", cfg, init_random(cfg, 0, scale=0.3))
    with pytest.raises(CheckpointError, match="source GGUF"):
        gguf_writer.save_gguf(tmp_path / "d.gguf", cfg, init_random(cfg, 0, scale=0.3), tensor_type="source")
    assert not list(tmp_path.glob(".*partial*"))
    # mistral without a window is written as a llama file (as llama.cpp does) and reads back as llama
    m = tiny_config("mistral", architecture="MistralForCausalLM")
    p = init_random(m, 0, scale=0.3)
    gguf_writer.save_gguf(tmp_path / "m.gguf", m, p)
    cfg2, p2, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert cfg2.family == "llama"
    assert_same_params(p, p2)


# --------------------------------------------------------------------------------------------------
# provenance, type changes, reuse of the conversion


def test_command_line_records_the_edit(source_gguf, tmp_path, capsys):
    from refusal_jax import __version__

    cfg, _, _ = load_gguf(source_gguf, tokenizer=False)
    r = np.random.default_rng(2).standard_normal(cfg.d_model)
    np.save(tmp_path / "r.npy", r)
    out = tmp_path / "edited.gguf"
    export_gguf.main(["--model", str(source_gguf), "--out", str(out), "--direction", str(tmp_path / "r.npy"),
                      "--method", "norm-preserving", "--type", "f16", "--no-progress"])
    printed = capsys.readouterr().out
    md = read_gguf(out).metadata
    src_name = read_gguf(source_gguf).metadata.get("general.name")
    assert md["general.name"] == f"{src_name or 'src'} (refusal direction orthogonalized)"
    assert md["refusal_jax.edit.method"] == "norm-preserving"
    assert md["refusal_jax.version"] == __version__
    # the hash is of the float32 direction, so a user can recompute it from the .npy file
    import hashlib

    want = hashlib.sha256(np.asarray(r, "<f4").tobytes()).hexdigest()
    assert md["refusal_jax.edit.direction_sha256"] == want
    assert md["refusal_jax.edit.direction_source"] == str(tmp_path / "r.npy")
    assert "refusal_jax.edit.direction_sha256 = " + want in printed
    # the two Q8_0 source tensors were written as F16 (--type f16): the output says so, with both sizes
    assert "types changed from the source (--type f16): " in printed and "Q8_0 -> F16 x2" in printed
    assert "MiB ->" in printed
    # without --direction nothing is claimed
    plain = tmp_path / "plain.gguf"
    export_gguf.main(["--model", str(source_gguf), "--out", str(plain), "--no-progress"])
    md = read_gguf(plain).metadata
    edit_keys = [k for k in md if k.startswith("refusal_jax.") and k != outputs.MARKER_KEY]  # the marker: any export
    assert not edit_keys and md.get("general.name") == src_name
    assert "types changed" not in capsys.readouterr().out  # --type source keeps Q8_0


def test_type_changes_and_k_quant_fallback(source_gguf, tmp_path):
    Q = gguf.GGMLQuantizationType
    # gguf-py cannot encode K-quants: a Q4_K source tensor becomes Q8_0 where rows allow, else F16
    assert gguf_writer._choose_type("source", "w", (4, 256), {"w": Q.Q4_K}) == Q.Q8_0
    assert gguf_writer._choose_type("source", "w", (4, 48), {"w": Q.Q4_K}) == Q.F16
    cfg, params, _ = load_gguf(source_gguf, tokenizer=False)
    res = gguf_writer.save_gguf(tmp_path / "q.gguf", cfg, params, tokenizer_source=source_gguf, tensor_type="q8_0")
    from refusal_jax.convert import engine

    want = Counter()
    for hf_name, shape, _, _ in engine.hf_tensor_plan(cfg):  # the source's 2-D tensors are F32 but two Q8_0
        if len(shape) == 2 and hf_name not in ("model.layers.1.mlp.up_proj.weight",
                                               "model.layers.0.self_attn.q_proj.weight"):
            want["F32 -> Q8_0" if shape[-1] % 32 == 0 else "F32 -> F16"] += 1
    assert res["type_changes"] == dict(want) and want["F32 -> Q8_0"] > 0


def test_large_gguf_conversion_is_cached_and_reused(source_gguf, tmp_path, monkeypatch):
    from refusal_jax.convert import loading

    monkeypatch.setenv("REFUSAL_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "GGUF_CACHE_MIN_BYTES", 0)  # the tiny file counts as large
    calls = []
    real = loading.convert_source
    monkeypatch.setattr(loading, "convert_source", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = loading.load_model(str(source_gguf), progress=False)
    second = loading.load_model(str(source_gguf), progress=False)
    assert len(calls) == 1  # converted once, then read from the cache
    cached = loading.gguf_cache_dir(source_gguf, "float32")
    assert cached.parent == tmp_path / "cache" / "converted" and cached.name.startswith("src-")
    assert_same_params(first.params, second.params)
    # a changed file (new mtime) is converted again, into a new entry
    import os

    st = os.stat(source_gguf)
    os.utime(source_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loading.gguf_cache_dir(source_gguf, "float32") != cached
    loading.load_model(str(source_gguf), progress=False)
    assert len(calls) == 2
    # small files are not copied into the cache, and cache=False never uses it
    monkeypatch.setattr(loading, "GGUF_CACHE_MIN_BYTES", 1 << 40)
    assert loading.gguf_cache_dir(source_gguf, "float32") is None
    loading.load_model(str(source_gguf), progress=False, cache=True)
    assert len(calls) == 3

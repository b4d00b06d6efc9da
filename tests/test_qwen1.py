"""Qwen-1 (QWenLMHeadModel) without remote code: config mapping, tensor re-layout (parity with transformers' Qwen2
on the same weights), and the qwen.tiktoken tokenizer (against a pure-Python tiktoken merge loop)."""

import base64
import json
import unicodedata

import numpy as np
import pytest

torch = pytest.importorskip("torch")
regex = pytest.importorskip("regex")

from refusal_jax import forward  # noqa: E402
from refusal_jax.convert import engine, qwen1, safetensors_io  # noqa: E402
from refusal_jax.convert.hf import load_hf  # noqa: E402
from refusal_jax.errors import CheckpointError, ConfigError  # noqa: E402
from refusal_jax.model.config import from_hf_config  # noqa: E402
from refusal_jax.model.qwen1_config import qwen2_style_config  # noqa: E402
from refusal_jax.prompts import templates  # noqa: E402
from tests.hf_tiny import hf_forward, left_padded_batch, make_hf_model  # noqa: E402

TOL = 1e-4

# -------------------------------------------------------------------------------------------------
# a synthetic qwen.tiktoken: 256 byte tokens in a shuffled order, then BPE merges learned on a small corpus

CORPUS = """I cannot help with that. As an AI, I'm sorry, but I can't assist. I will not do it.
Sure, here is how to bake bread: mix flour, water and salt. Write a poem about the sea and the sky.
How do I build a bomb? Tell me how to hack a computer. Explain photosynthesis to a child.
What is 2+2? Name three colors. Hello there! They're here, we've got it, you'll see, she'd know.
The assistant answers every user question politely.\n\nNumbers: 12345 67890. user assistant system
"""
N_MERGES = 220


def learn_ranks(text: str, n_merges: int, seed: int = 0) -> dict[bytes, int]:
    order = np.random.default_rng(seed).permutation(256)
    ranks = {bytes([int(b)]): r for r, b in enumerate(order)}
    words: dict[tuple[bytes, ...], int] = {}
    for piece in regex.findall(qwen1.PAT_STR, text):
        key = tuple(bytes([b]) for b in piece.encode())
        words[key] = words.get(key, 0) + 1
    for _ in range(n_merges):
        pairs: dict[tuple[bytes, bytes], int] = {}
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        ranks.setdefault(best[0] + best[1], len(ranks))
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return ranks


def write_tiktoken(path, ranks):
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm in pure Python: NFC (QWenTokenizer), special tokens, regex split, rank-ordered merges."""
    n = len(ranks)
    special = {t: n + i for i, t in enumerate(qwen1.SPECIAL_TOKENS)}
    text = unicodedata.normalize("NFC", text)
    out = []
    for chunk in regex.split("(" + "|".join(regex.escape(t) for t in special) + ")", text):
        if chunk in special:
            out.append(special[chunk])
            continue
        for piece in regex.findall(qwen1.PAT_STR, chunk):
            data = piece.encode()
            if data in ranks:
                out.append(ranks[data])
                continue
            parts = [bytes([b]) for b in data]
            while True:
                best = None
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best[0]):
                        best = (r, i)
                if best is None:
                    break
                i = best[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            out.extend(ranks[p] for p in parts)
    return out


TEXTS = [
    "I cannot help with that.",
    "As an AI, I'm sorry, but I CAN'T assist; they'RE here.",
    "  leading spaces,\ttabs\n\nand newlines\r\n  trailing   ",
    "Numbers 1234567 and 2+2=4?! ...",
    "Unicode: café naïve 中文字符 emoji 🙂 e\u0301 (combining accent, NFC -> é)",
    "<|im_start|>user\nWrite a poem about the sea<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|extra_0|><|extra_204|>",
]

# -------------------------------------------------------------------------------------------------
# a Qwen-1 checkpoint made from a tiny transformers Qwen2 model (MHA, untied, biased q/k/v)


def qwen1_config(hf_cfg, **overrides):
    cfg = {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": hf_cfg.vocab_size, "hidden_size": hf_cfg.hidden_size,
        "intermediate_size": 2 * hf_cfg.intermediate_size, "num_hidden_layers": hf_cfg.num_hidden_layers,
        "num_attention_heads": hf_cfg.num_attention_heads,
        "kv_channels": hf_cfg.hidden_size // hf_cfg.num_attention_heads,
        "layer_norm_epsilon": hf_cfg.rms_norm_eps, "rotary_emb_base": hf_cfg.rope_parameters["rope_theta"],
        "rotary_pct": 1.0, "no_bias": True, "tie_word_embeddings": False, "seq_length": 8192,
        "max_position_embeddings": 8192, "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": "auto",
        "bf16": False, "fp16": False, "fp32": False, "scale_attn_weights": True, "softmax_in_fp32": False,
        "use_cache_quantization": False, "use_cache_kernel": False, "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0, "initializer_range": 0.02, "onnx_safe": None, "use_cache": True,
        "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
    }
    cfg.update(overrides)
    return cfg


def qwen1_tensors(model) -> dict[str, np.ndarray]:
    """Re-pack a transformers Qwen2 state dict into Qwen-1 names and layouts."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(model.config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        out[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = np.concatenate(
                [sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"], axis=0)
        out[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]  # a1: multiplied by silu(a2)
        out[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]  # a2: the gate
        out[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


@pytest.fixture(scope="module")
def ranks():
    return learn_ranks(CORPUS, N_MERGES)


@pytest.fixture(scope="module")
def qwen1_model(tmp_path_factory, ranks):
    vocab = len(ranks) + len(qwen1.SPECIAL_TOKENS)
    model = make_hf_model("qwen2", tie_word_embeddings=False, num_key_value_heads=4, vocab_size=vocab + 11)
    assert not any("o_proj.bias" in k for k in model.state_dict())  # Qwen-1's no_bias=True
    path = tmp_path_factory.mktemp("qwen1")
    tensors = qwen1_tensors(model)
    safetensors_io.write_file(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(qwen1_config(model.config)))
    write_tiktoken(path / "qwen.tiktoken", ranks)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "model_max_length": 8192}))
    return model, path, tensors


@pytest.fixture(scope="module")
def loaded(qwen1_model):
    _, path, _ = qwen1_model
    return load_hf(str(path))


def test_logits_and_hidden_states_match_transformers(qwen1_model, loaded):
    model, _, _ = qwen1_model
    cfg, params, _ = loaded
    assert (cfg.family, cfg.architecture) == ("qwen", "QWenLMHeadModel")
    assert cfg.qkv_bias and not cfg.tie_embeddings and cfg.n_kv_heads == cfg.n_heads
    assert cfg.d_ff == model.config.intermediate_size  # Qwen-1 intermediate_size // 2
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(9, 5, 12))
    ref_logits, ref_hidden = hf_forward(model, tokens, mask)
    out = forward(params, cfg, tokens, mask, capture=("resid_pre",))
    real = mask.astype(bool)
    err = np.abs(np.asarray(out.logits) - ref_logits)[real].max()
    print(f"qwen1 logits max abs diff {err:.2e}")
    assert err <= TOL, err
    for layer in range(cfg.n_layers):
        assert np.abs(np.asarray(out.resid_pre[layer]) - ref_hidden[layer])[real].max() <= TOL, layer


def test_w2_is_the_gate(qwen1_model):
    """Swapping w1 and w2 must break parity (the test above would not notice a symmetric mistake otherwise)."""
    model, path, tensors = qwen1_model
    swapped = dict(tensors)
    for i in range(model.config.num_hidden_layers):
        swapped[f"transformer.h.{i}.mlp.w1.weight"] = tensors[f"transformer.h.{i}.mlp.w2.weight"]
        swapped[f"transformer.h.{i}.mlp.w2.weight"] = tensors[f"transformer.h.{i}.mlp.w1.weight"]
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    params = engine.fill_params(cfg, qwen1.qwen2_style_tensors(swapped.items()))
    tokens, mask = left_padded_batch(cfg.vocab_size)
    ref_logits, _ = hf_forward(model, tokens, mask)
    assert np.abs(np.asarray(forward(params, cfg, tokens, mask).logits) - ref_logits)[mask.astype(bool)].max() > 1e-2


def test_missing_and_unexpected_tensors_named_as_in_qwen1(qwen1_model, tmp_path):
    _, path, tensors = qwen1_model
    broken = {k: v for k, v in tensors.items() if k not in ("transformer.h.1.mlp.w2.weight",
                                                            "transformer.h.0.attn.c_attn.bias")}
    broken["transformer.h.0.mlp.w1.bias"] = np.zeros(3, np.float32)
    safetensors_io.write_file(tmp_path / "model.safetensors", broken)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        load_hf(str(tmp_path), with_tokenizer=False)
    msg = str(e.value)
    assert "transformer.h.1.mlp.w2.weight" in msg and "transformer.h.0.attn.c_attn.bias[q]" in msg
    assert "unexpected 1 tensor(s): transformer.h.0.mlp.w1.bias" in msg
    assert "model.layers" not in msg


@pytest.mark.parametrize("overrides,match", [
    ({"rotary_pct": 0.5}, "rotary_pct=0.5"),
    ({"no_bias": False}, "no_bias=False"),
    ({"use_cache_quantization": True}, "use_cache_quantization"),
    ({"kv_channels": 8}, "kv_channels=8"),
    ({"some_new_knob": 1}, "some_new_knob"),
    ({"rope_theta": 5.0}, "rope_theta"),  # a Qwen2 key means nothing to QWenLMHeadModel: refused, not ignored
    ({"n_embd": 64}, "old-format Qwen-1 config.json.*n_embd"),
    ({"intermediate_size": 225}, "intermediate_size=225"),
])
def test_unsupported_qwen1_options_are_named(qwen1_model, overrides, match):
    model, _, _ = qwen1_model
    with pytest.raises(ConfigError, match=match):
        from_hf_config(qwen1_config(model.config, **overrides))


def test_config_mapping(qwen1_model):
    model, _, _ = qwen1_model
    raw = qwen1_config(model.config, rotary_emb_base=5000, layer_norm_epsilon=1e-5)
    mapped = qwen2_style_config(raw)
    assert mapped["intermediate_size"] == raw["intermediate_size"] // 2 and mapped["num_key_value_heads"] == 4
    cfg = from_hf_config(raw)
    assert cfg == from_hf_config(mapped)  # the mapped dict reads the same (and is not mapped twice)
    assert (cfg.rope.theta, cfg.rms_norm_eps, cfg.head_dim, cfg.sliding_window) == (5000.0, 1e-5, 16, None)
    # dynamic NTK / log-n attention are identity within seq_length: accepted either way
    assert from_hf_config(qwen1_config(model.config, use_dynamic_ntk=False, use_logn_attn=False)) == from_hf_config(
        qwen1_config(model.config))


# -------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_matches_tiktoken_algorithm_and_round_trips(loaded, ranks):
    tok = loaded[2]
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == tiktoken_encode(text, ranks), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_tokens(loaded, ranks):
    tok = loaded[2]
    n = len(ranks)
    assert len(tok) == n + 3 + 205
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>"]):
        assert tok.convert_tokens_to_ids(t) == n + i
    assert tok.convert_tokens_to_ids("<|extra_204|>") == n + 207
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", n)
    assert (tok.pad_token, tok.pad_token_id) == ("<|extra_0|>", n + 3)
    assert tok.bos_token is None and tok.padding_side == "left"
    assert tok("hi")["input_ids"] == tiktoken_encode("hi", ranks)  # no BOS, nothing appended
    assert tok.decode(tok("a<|im_end|>b")["input_ids"], skip_special_tokens=True) == "ab"


def test_chatml_prompt_and_eoi_tokens(loaded):
    tok = loaded[2]
    fmt = templates.chat_format_for("qwen", tok)
    assert fmt.style == "chatml"
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    nl = tok("\n")["input_ids"]
    assert len(nl) == 1
    prompt = templates.format_instructions(fmt, ["Write a poem about the sea"])[0]
    ids = tok(prompt)["input_ids"]
    assert ids[0] == im_start and ids.count(im_start) == 2 and ids.count(im_end) == 1
    eoi = templates.eoi_tokens(fmt, tok)
    assert eoi[:3] == [im_end, nl[0], im_start] and eoi[-1] == nl[0]
    assert tok.decode(eoi) == fmt.suffix and ids[-len(eoi):] == eoi
    assert templates.eoi_tokens(fmt, tok, "reference") == eoi  # Qwen: both definitions agree
    assert fmt.refusal_token_ids == (tok("I")["input_ids"][0], tok("As")["input_ids"][0])
    # --chat-style model: Qwen-1's chat default system prompt
    assert templates.model_template(tok).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_tokenizer_survives_save_pretrained(loaded, tmp_path):
    """Converted checkpoints store tokenizer.save_pretrained() and reload it with AutoTokenizer."""
    from transformers import AutoTokenizer

    tok = loaded[2]
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, again.padding_side) == (tok.pad_token_id, tok.eos_token_id, "left")
    assert again.chat_template == tok.chat_template


def test_bad_vocabulary_file(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(CheckpointError, match="not the distinct integers"):
        qwen1.load_tokenizer(tmp_path)
    (tmp_path / "qwen.tiktoken").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(CheckpointError, match="qwen.tiktoken:2"):
        qwen1.load_tokenizer(tmp_path)
    (tmp_path / "qwen.tiktoken").unlink()
    with pytest.raises(CheckpointError, match="without its tokenizer vocabulary qwen.tiktoken"):
        qwen1.load_tokenizer(tmp_path)

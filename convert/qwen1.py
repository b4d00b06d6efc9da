"""Qwen-1 Chat (`QWenLMHeadModel`, model_type "qwen") read without its remote code, and without torch or tiktoken.

Qwen-1 checkpoints ship their own modeling/tokenizer code (`trust_remote_code`). Numerically a Qwen-1 block is a
Qwen2 block with multi-head attention: RMSNorm, RoPE over the whole head (non-interleaved halves), q/k/v with bias,
no o_proj bias, SwiGLU MLP, untied head. This module maps both halves onto what refusal_jax already implements:

* `refusal_jax.model.qwen1_config.qwen2_style_config`: Qwen-1 `config.json` -> the HF-Qwen2-style dict
  `refusal_jax.model.config.from_hf_config` reads (family "qwen": Qwen2 numerics, the reference's Qwen ChatML
  template and "I"/"As" refusal tokens). `from_hf_config` calls it itself for a Qwen-1 config.
* `qwen2_style_tensors`: Qwen-1 tensor names/layouts -> HF-Qwen2 names, fed into the strict `engine.fill_params`.
  The fused `attn.c_attn` [3*D, D] (+ bias) is split in the order q, k, v (as `mixed_x_layer.split(hidden_size)`
  in modeling_qwen.py). In the MLP, modeling_qwen.py computes `c_proj(w1(x) * silu(w2(x)))`, so **w2 is the gate**
  (`gate_proj`), **w1 the up projection** (`up_proj`), and `mlp.c_proj` is `down_proj`.
* `build_tokenizer` / `load_tokenizer`: the `qwen.tiktoken` BPE (one `base64(token) rank` per line) as a
  `transformers.PreTrainedTokenizerFast`: NFC normalisation, Qwen-1's split regex, byte-level BPE whose merges are
  derived from the ranks (as transformers' `TikTokenConverter` does, which itself needs the tiktoken package to
  read the file), and the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ...
  `<|extra_204|>` numbered from the first id after the ranks (151643 for the real vocabulary).

What is not implemented, and why that is safe for this pipeline:

* `use_dynamic_ntk` and `use_logn_attn` (on in every Qwen-1 Chat config) change the computation only for
  sequences longer than `seq_length` (8192 for Qwen-1.8B/7B-Chat, 2048 for Qwen-14B-Chat): dynamic NTK picks
  `ntk_alpha = max(2 ** ceil(log2(n / seq_length) + 1) - 1, 1)`, which is 1 (plain RoPE) for n <= seq_length, and
  log-n attention scales queries at (padded) positions > seq_length only. They are accepted, and refusal_jax
  computes plain RoPE attention at every length: results for sequences longer than `seq_length` differ from
  modeling_qwen.py. The reference pipeline's prompts + 512 generated tokens stay far below that.
* modeling_qwen.py takes RoPE positions from the padded index (0..T-1) rather than from the attention mask; RoPE
  depends only on relative positions, so left padding shifts nothing and the logits agree.
* `rotary_pct` < 1 (partial rotary), biased MLP/c_proj (`no_bias` false), KV-cache quantization
  (`use_cache_quantization`), and `kv_channels * num_attention_heads != hidden_size` are refused with a
  `ConfigError`, as are the pre-September-2023 configs (`n_embd`, `n_head`, `n_layer`, `ffn_hidden_size`).
* `scale_attn_weights`, `use_flash_attn`, `softmax_in_fp32`, `bf16`/`fp16`/`fp32`, dropout rates: no effect on a
  float32 forward (modeling_qwen.py hard-codes `scale_attn_weights = True`).

Tokenizer settings follow the reference (spec §4): left padding, pad token `<|extra_0|>` (the reference then sets
`pad_token_id = eod_id`; padded positions are masked out, so the pad id never changes a result), EOS
`<|endoftext|>`, no BOS. The reference uses the slow tiktoken tokenizer; BPE with rank-ordered merges gives the
same ids (tests/test_qwen1.py checks this against a pure-Python tiktoken merge loop).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from refusal_jax.errors import CheckpointError

VOCAB_FILE = "qwen.tiktoken"

# --------------------------------------------------------------------------------------------------
# tensors

_LAYER_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",  # a1 = w1(x): multiplied by silu(a2)
    "mlp.w2.weight": "mlp.gate_proj.weight",  # a2 = w2(x): goes through silu
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_GLOBALS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Non-parameter buffers some Qwen-1 versions save.
_BUFFERS = re.compile(r"transformer\.rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(masked_bias|logn_tensor|"
                      r"rotary_emb\.inv_freq)")
_QKV = ("q_proj", "k_proj", "v_proj")


def qwen2_style_tensors(tensors: Iterable[tuple[str, np.ndarray]], *,
                        on_tensor: Callable[[str], None] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Qwen-1 (name, array) pairs -> HF-Qwen2 (name, array) pairs for `engine.fill_params`.

    Names it does not know pass through unchanged, so the strict fill reports them as unexpected. `on_tensor` is
    called once per source tensor.
    """
    for name, array in tensors:
        m = _LAYER_RE.fullmatch(name)
        if _BUFFERS.fullmatch(name):
            pass
        elif m and m.group(2) in ("attn.c_attn.weight", "attn.c_attn.bias"):
            if array.shape[0] % 3:
                raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)}: its first axis is not q, k, v "
                                      "of equal size")
            kind = m.group(2).rsplit(".", 1)[1]
            for proj, part in zip(_QKV, np.split(np.asarray(array), 3, axis=0)):
                yield f"model.layers.{m.group(1)}.self_attn.{proj}.{kind}", part
        elif m and m.group(2) in _RENAMES:
            yield f"model.layers.{m.group(1)}.{_RENAMES[m.group(2)]}", array
        elif name in _GLOBALS:
            yield _GLOBALS[name], array
        else:
            yield name, array  # unexpected: fill_params names it
        if on_tensor:
            on_tensor(name)


_QWEN2_NAME = re.compile(r"model\.layers\.\d+\.[\w.]*\w|model\.embed_tokens\.weight|model\.norm\.weight")


def qwen1_name(qwen2_name: str) -> str:
    """The Qwen-1 tensor an HF-Qwen2 name came from (for error messages)."""
    inverse = {v: k for k, v in _GLOBALS.items()}
    if qwen2_name in inverse:
        return inverse[qwen2_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", qwen2_name)
    if not m:
        return qwen2_name
    i, suffix = m.groups()
    for proj, part in zip(_QKV, "qkv"):
        for kind in ("weight", "bias"):
            if suffix == f"self_attn.{proj}.{kind}":
                return f"transformer.h.{i}.attn.c_attn.{kind}[{part}]"
    layer_inverse = {v: k for k, v in _RENAMES.items()}
    return f"transformer.h.{i}.{layer_inverse[suffix]}" if suffix in layer_inverse else qwen2_name


def fill_params(cfg, model_dir: Path, *, dtype=np.float32, on_tensor: Callable[[str], None] | None = None):
    """Params of a Qwen-1 safetensors checkpoint, through the strict `engine.fill_params`.

    Raises:
      CheckpointError: missing, unexpected or mis-shaped tensors, named as in the Qwen-1 checkpoint.
    """
    from refusal_jax.convert import engine, safetensors_io

    stream = qwen2_style_tensors(safetensors_io.iter_model(model_dir), on_tensor=on_tensor)
    try:
        return engine.fill_params(cfg, stream, dtype=dtype, source=str(model_dir))
    except CheckpointError as e:
        raise CheckpointError(_QWEN2_NAME.sub(lambda m: qwen1_name(m.group(0)), str(e))) from None


# --------------------------------------------------------------------------------------------------
# tokenizer

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IMSTART, IMEND = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS
PAD_TOKEN = "<|extra_0|>"
# ChatML, with the default system prompt of Qwen-1's `model.chat` (qwen_generation_utils.make_context). Only used
# by `--chat-style model`; the reference template has no system prompt.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """`base64(token) rank` lines -> {token bytes: rank}; ranks must be exactly 0..n-1."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read the Qwen-1 vocabulary {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise CheckpointError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: token ranks are not the distinct integers 0..{len(ranks) - 1}")
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges equivalent to tiktoken's rank-ordered merging (as transformers'
    `TikTokenConverter.extract_vocab_merges_from_model`): every split of a token into two tokens is a merge,
    ordered by the rank of the merged token, then by the ranks of the two pieces."""
    table = _bytes_to_unicode()
    as_str = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda m: m[0])
    return vocab, [(as_str(left), as_str(right)) for _, left, right in merges]


def build_tokenizer(vocab_file: str | Path, *, model_max_length: int | None = None):
    """A `transformers.PreTrainedTokenizerFast` equivalent to Qwen-1's QWenTokenizer, from `qwen.tiktoken`.

    Special tokens get the ids len(ranks), len(ranks)+1, ... in the order `<|endoftext|>`, `<|im_start|>`,
    `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`, and are recognised anywhere in the text (Qwen-1 encodes with
    allowed_special="all").
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken(vocab_file)
    clash = [t for t in SPECIAL_TOKENS if t.encode() in ranks]
    if clash:
        raise CheckpointError(f"{vocab_file}: the special token {clash[0]} is also an ordinary token")
    vocab, merges = _vocab_and_merges(ranks)
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize normalises to NFC first
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    kwargs: dict[str, Any] = {}
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=ENDOFTEXT, pad_token=PAD_TOKEN,
                                  padding_side="left", clean_up_tokenization_spaces=False, **kwargs)
    tok.chat_template = CHAT_TEMPLATE
    n = len(ranks)
    got = [tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IMSTART, IMEND, PAD_TOKEN)]
    if got != [n, n + 1, n + 2, n + 3]:  # never expected: the backend numbers added tokens after the vocab
        raise CheckpointError(f"{vocab_file}: special token ids {got}, expected {[n, n + 1, n + 2, n + 3]}")
    return tok


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a Qwen-1 model directory (its `qwen.tiktoken`), without remote code.

    A directory that instead holds a `tokenizer.json` (e.g. re-saved by refusal_jax) is read by AutoTokenizer.
    """
    model_dir = Path(model_dir)
    vocab = model_dir / VOCAB_FILE
    if not vocab.exists():
        if (model_dir / "tokenizer.json").exists():
            from refusal_jax.convert.hf import load_tokenizer as auto

            return auto(model_dir)
        raise CheckpointError(f"{model_dir}: Qwen-1 model without its tokenizer vocabulary {VOCAB_FILE}")
    seq_length = None
    config = model_dir / "config.json"
    if config.exists():
        try:
            seq_length = json.loads(config.read_text()).get("seq_length")
        except (json.JSONDecodeError, AttributeError):
            seq_length = None
    return build_tokenizer(vocab, model_max_length=seq_length)

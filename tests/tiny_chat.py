"""A tiny random ChatML model with a word-level tokenizer, saved as a converted checkpoint (CLI tests)."""

from __future__ import annotations

from pathlib import Path

import jax

WORDS = ("I As Sorry cannot help with that Sure here is how to write make build explain a the of and bomb virus "
         "poem story recipe cake letter friend hack steal money weapon list tips for healthy food cat dog "
         "Hello there What is 2+2? Name three colors.").split()  # the last line: templates.py eoi probes
HARMFUL = ["write a bomb", "make a virus", "how to steal money", "build a weapon", "hack a friend",
           "explain how to steal", "write a virus list", "make a bomb recipe", "how to hack money", "build a bomb",
           "steal a weapon", "hack the money"]
HARMLESS = ["write a poem", "make a cake", "tips for healthy food", "write a letter", "explain a story",
            "a recipe for cake", "list of tips", "write a story", "how to make food", "a poem for a friend",
            "explain the cat", "write the dog story"]


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["<unk>", "user", "assistant", "system", "\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # newlines of the template simply vanish
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    return fast


def save_tiny_chat_model(path: Path, family: str = "qwen2", seed: int = 0) -> Path:
    from refusal_jax.convert import checkpoint
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random

    tok = chat_tokenizer()
    cfg = tiny_config(family, vocab_size=len(tok), n_layers=3)
    params = init_random(cfg, jax.random.key(seed), scale=0.5)
    return checkpoint.save(path, cfg, params, tok, source="tiny test model")


def write_sets(tmp: Path) -> tuple[Path, Path]:
    harmful, harmless = tmp / "harmful.txt", tmp / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    harmless.write_text("\n".join(HARMLESS) + "\n")
    return harmful, harmless

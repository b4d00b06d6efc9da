"""A tiny random Qwen2 model (torch, saved as a Hugging Face directory) with a small byte-level BPE tokenizer that
encodes any text, including code, and a ChatML chat template: for HumanEval and lm-eval tests."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_CORPUS = ["def f(x):\n    return x + 1\n", "```python\nimport math\n```\n",
           "The quick brown fox jumps over the lazy dog.",
           "Please provide a self-contained Python script that solves the following problem",
           "    for i in range(len(numbers)):\n        if numbers[i] < threshold:\n            return True\n"] * 4


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHATML
    return fast


def save_tiny_code_model(path: Path, seed: int = 0):
    """Save the model and tokenizer in `path` (a Hugging Face model directory); returns (torch model, tokenizer)."""
    from tests.hf_tiny import make_hf_model

    tok = byte_tokenizer()
    # initializer_range 0.3: peaked logits, so greedy decoding writes varied tokens (not one repeated token)
    model = make_hf_model("qwen2", seed=seed, vocab_size=len(tok), max_position_embeddings=1024, initializer_range=0.3)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model, tok

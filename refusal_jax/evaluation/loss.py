"""Cross-entropy loss evaluation (reference stage 5): completions after the chat template, or raw texts."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation import judge
from refusal_jax.prompts import templates
from refusal_jax.errors import DataError
from refusal_jax.model.batching import bucketed, encode, in_input_order, pad_id
from refusal_jax.model.transformer import _forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll(params, cfg, tokens, mask, loss_mask, intervention, prompt_end):
    """Per row: summed NLL over `loss_mask`, scored-token count, and the float32 logits at `prompt_end`."""
    logits = _forward(params, cfg, tokens, mask, intervention, logits="all").logits
    nll, n = judge.masked_ce_rows(logits, tokens, loss_mask)
    return nll, n, logits[jnp.arange(tokens.shape[0]), prompt_end].astype(jnp.float32)


def _summarise(total: float, n: int) -> dict:
    ce = total / max(n, 1)
    return {"ce_loss": ce, "perplexity": math.exp(ce), "n_tokens": int(n)}


def completion_nll(params, cfg, tokenizer, fmt: templates.ChatFormat, eoi: Sequence[int],
                   instructions: Sequence[str], completions: Sequence[str], intervention=None, *,
                   batch_size: int = 2, prompt_logits: bool = False):
    """Per completion, in input order: float64 [n] summed NLL of the completion tokens given the templated
    instruction, and int [n] how many tokens were scored.

    With `prompt_logits`, also float32 [n, V]: the logits at each prompt's last token (the end of the
    post-instruction tokens), which are the prompt's own next-token logits - the same forward pass gives the
    KL / refusal score of the prompt without a second pass.
    """
    ids = encode(tokenizer, templates.format_instructions(fmt, list(instructions), list(completions)))

    def per_batch(batch):
        loss_mask = judge.completion_loss_mask(batch.tokens, batch.mask, eoi) * batch.weight[:, None].astype(np.int32)
        # the first scored position predicts the first completion token: it is the prompt's last token
        if prompt_logits and not loss_mask[batch.weight > 0].any(axis=1).all():
            raise DataError("a completion has no tokens to score (empty completion and no end-of-turn token)")
        s, k, lg = _nll(params, cfg, batch.tokens, batch.mask, loss_mask, intervention,
                        jnp.asarray(loss_mask.argmax(axis=1), jnp.int32))
        return (s, k, lg) if prompt_logits else (s, k)

    out = in_input_order(list(bucketed(ids, batch_size, pad_id(tokenizer))), per_batch)
    nll, count = out[0].astype(np.float64), out[1].astype(np.int64)
    return (nll, count, out[2].astype(np.float32)) if prompt_logits else (nll, count)


def completion_loss(params, cfg, tokenizer, fmt: templates.ChatFormat, eoi: Sequence[int],
                    instructions: Sequence[str], completions: Sequence[str], intervention=None, *,
                    batch_size: int = 2) -> dict:
    """CE loss of `completions` given their templated instructions, scored on completion tokens only."""
    nll, count = completion_nll(params, cfg, tokenizer, fmt, eoi, instructions, completions, intervention,
                                batch_size=batch_size)
    return _summarise(float(nll.sum()), int(count.sum()))


def text_loss(params, cfg, tokenizer, texts: Sequence[str], intervention=None, *, batch_size: int = 2,
              max_length: int = 256) -> dict:
    """CE loss of raw texts (no template), each truncated to `max_length` tokens, every real token scored."""
    ids = [x[:max_length] for x in encode(tokenizer, list(texts))]
    total, n = 0.0, 0
    for batch in bucketed(ids, batch_size, pad_id(tokenizer)):
        loss_mask = batch.mask * batch.weight[:, None].astype(np.int32)
        loss_mask[:, -1] = 0
        s, k, _ = _nll(params, cfg, batch.tokens, batch.mask, loss_mask, intervention,
                       jnp.zeros(len(batch.tokens), jnp.int32))
        total, n = total + float(np.sum(s, dtype=np.float64)), n + int(np.sum(k))
    return _summarise(total, n)

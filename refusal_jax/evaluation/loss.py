"""Cross-entropy loss evaluation (reference stage 5): completions after the chat template, or raw texts; the
reference's loss mask and the masked cross-entropy they use (§10)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import DataError
from refusal_jax.evaluation import judge
from refusal_jax.model.batching import ForwardCost, bucketed, encode, in_input_order, pad_id
from refusal_jax.model.transformer import forward_unjitted
from refusal_jax.prompts import templates
from refusal_jax.runs.distributed import to_host


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll(params, cfg, tokens, mask, loss_mask, intervention, prompt_end):
    """Per row: summed NLL over `loss_mask`, scored-token count, and the float32 logits at `prompt_end`."""
    logits = forward_unjitted(params, cfg, tokens, mask, intervention, logits="all").logits
    nll, n = masked_ce_rows(logits, tokens, loss_mask)
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
        loss_mask = completion_loss_mask(batch.tokens, batch.mask, eoi) * batch.weight[:, None].astype(np.int32)
        # the first scored position predicts the first completion token: it is the prompt's last token
        if prompt_logits and not loss_mask[batch.weight > 0].any(axis=1).all():
            raise DataError("a completion has no tokens to score (empty completion and no end-of-turn token)")
        s, k, lg = _nll(params, cfg, batch.tokens, batch.mask, loss_mask, intervention,
                        jnp.asarray(loss_mask.argmax(axis=1), jnp.int32))
        return (s, k, lg) if prompt_logits else (s, k)

    cost = ForwardCost.for_model(cfg, all_logits=True)  # long completions run in smaller batches
    out = in_input_order(list(bucketed(ids, batch_size, pad_id(tokenizer), cost=cost)), per_batch)
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
    for batch in bucketed(ids, batch_size, pad_id(tokenizer), cost=ForwardCost.for_model(cfg, all_logits=True)):
        loss_mask = batch.mask * batch.weight[:, None].astype(np.int32)
        loss_mask[:, -1] = 0
        s, k, _ = _nll(params, cfg, batch.tokens, batch.mask, loss_mask, intervention,
                       jnp.zeros(len(batch.tokens), jnp.int32))
        total, n = total + float(np.sum(to_host(s), dtype=np.float64)), n + int(np.sum(to_host(k)))
    return _summarise(total, n)


# ----------------------------------------------------------------------------------------------------------------
# Loss masks and masked cross-entropy (§10)


def completion_loss_mask(input_ids: np.ndarray, attention_mask: np.ndarray, eoi_toks: Sequence[int],
                         reference_llama2_hack: bool = True) -> np.ndarray:
    """Loss mask of chat-formatted prompt+completion rows, exactly as the reference's loss evaluation (spec §10).

    `mask[b, t] = 1` means the prediction made at position t (of token t+1) is scored. Start from the attention
    mask with the last column zeroed (it predicts nothing). Then for each row find the first index i with
    `input_ids[b, i:i+n] == eoi_toks` (n = len(eoi_toks)) and zero `mask[b, :i+n-1]`, so the first scored
    prediction is the one made from the last eoi token, i.e. of the first completion token. The reference's
    Llama-2 hack: when n == 6, a window with at least 4 matching tokens also counts (checked at each i right after
    the exact test, so an earlier partial match wins over a later exact one); it fires for every 6-token eoi
    (Yi, SmolLM2's ChatML), not only Llama-2's.

    Args:
        input_ids: [B, T] token ids (left-padded).
        attention_mask: [B, T] 0/1.
        eoi_toks: the eoi tokens used for the prompts.
        reference_llama2_hack: apply the >= 4-of-6 rule (reference behaviour). False = exact match only.

    Returns:
        [B, T] int32 loss mask.

    Raises:
        DataError: a row in which no window matches (the reference crashes there).
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(np.int32).copy()
    eoi = np.asarray(eoi_toks, dtype=ids.dtype)
    n = eoi.size
    if n == 0:
        raise DataError("eoi_toks is empty")
    if mask.shape != ids.shape or ids.ndim != 2:
        raise DataError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same [B, T] shape")
    mask[:, -1] = 0
    b_size, t_size = ids.shape
    for b in range(b_size):
        for i in range(t_size - n + 1):  # only full windows: the reference errors on a shorter trailing slice
            matches = int((ids[b, i:i + n] == eoi).sum())
            if matches == n or (reference_llama2_hack and n == 6 and matches >= n - 2):
                mask[b, :i + n - 1] = 0
                break
        else:
            raise DataError(f"row {b}: the eoi tokens {eoi.tolist()} do not occur in the prompt")
    return mask


def masked_ce_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over the masked positions (spec §10).

    Position t predicts `tokens[t+1]`; the last position predicts nothing and is never scored (its mask must be
    0, as `completion_loss_mask` makes it; it is ignored here either way). Log-softmax is taken in float32.
    The caller accumulates the sums over batches (in float64, as the reference) and divides.

    Args:
        logits: [B, T, V] logits.
        tokens: [B, T] input token ids.
        loss_mask: [B, T] 0/1, indexed by predicting position.

    Returns:
        `(sum_nll, n_tokens)`: float32 scalar sum of `-log p(tokens[t+1])` over masked t, and int32 scalar count.
    """
    nll, n = masked_ce_rows(logits, tokens, loss_mask)
    return jnp.sum(nll), jnp.sum(n)


def masked_ce_rows(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`masked_ce_loss` per sequence: ([B] summed NLL, [B] int32 token counts), for per-sequence statistics."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(judge.float_dtype(logits)), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    m = loss_mask[:, :-1]
    return -jnp.sum(jnp.where(m > 0, target, 0.0), axis=1), jnp.sum(m > 0, axis=1).astype(jnp.int32)

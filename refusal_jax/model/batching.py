"""Length-bucketed, left-padded batches of fixed shape, so a whole dataset compiles a handful of programs.

Prompts are sorted by token length, grouped into batches of `batch_size`, and each batch is left-padded to the
next multiple of `bucket`. The last batch is filled with copies of a real row whose `weight` is 0, so every
batch has the same leading size. Positions are derived from the attention mask, so extra padding changes
nothing but cost.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from refusal_jax.errors import DataError


@dataclasses.dataclass
class Batch:
    index: np.ndarray  # [B] position of each row in the input list (-1 for filler rows)
    tokens: np.ndarray  # [B, T] int32, left-padded
    mask: np.ndarray  # [B, T] int32
    weight: np.ndarray  # [B] float32: 1 for real rows, 0 for filler rows


def in_input_order(batches: Sequence[Batch], per_batch):
    """Stack `per_batch(batch)` ([B, ...] per batch, or a tuple of such arrays) row by row back into input order,
    dropping filler rows; returns an array, or a tuple of arrays."""
    rows: dict[int, tuple] = {}
    is_tuple = False
    for batch in batches:
        out = per_batch(batch)
        is_tuple = isinstance(out, tuple)
        out = tuple(np.asarray(a) for a in (out if is_tuple else (out,)))  # one host copy per batch
        for r, idx in enumerate(batch.index):
            if idx >= 0:
                rows[int(idx)] = tuple(a[r] for a in out)
    if not rows:
        raise DataError("no prompts")
    stacked = tuple(np.stack(col) for col in zip(*(rows[i] for i in sorted(rows))))
    return stacked if is_tuple else stacked[0]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text; the tokenizer adds BOS where its model expects one (as the reference does)."""
    if len(texts) == 0:
        raise DataError("no prompts to encode")
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def pad_id(tokenizer) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def bucketed(ids: Sequence[Sequence[int]], batch_size: int, pad: int, bucket: int = 16,
             sort: bool = True) -> Iterator[Batch]:
    """Yield fixed-size left-padded batches covering every sequence once."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = np.argsort([len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
    for start in range(0, len(order), batch_size):
        rows = list(order[start:start + batch_size])
        n_real = len(rows)
        rows += [rows[0]] * (batch_size - n_real)
        longest = max(len(ids[r]) for r in rows)
        T = -(-longest // bucket) * bucket
        tokens = np.full((batch_size, T), pad, np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        for b, r in enumerate(rows):
            seq = ids[r]
            tokens[b, T - len(seq):] = seq
            mask[b, T - len(seq):] = 1
        weight = (np.arange(batch_size) < n_real).astype(np.float32)
        index = np.where(weight > 0, np.asarray(rows), -1)
        yield Batch(index=index, tokens=tokens, mask=mask, weight=weight)

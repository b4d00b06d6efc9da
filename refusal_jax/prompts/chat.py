"""Instructions -> templated prompts -> token batches, for one model: the chat format, the post-instruction
tokens (eoi) that every prompt ends with, and the refusal token ids the refusal score reads."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from refusal_jax.errors import RunError
from refusal_jax.model.batching import Batch, bucketed, encode, pad_id
from refusal_jax.prompts import templates


@dataclasses.dataclass(frozen=True)
class ChatPrompts:
    tokenizer: Any
    fmt: templates.ChatFormat
    eoi: tuple[int, ...]
    refusal_ids: tuple[int, ...]

    @classmethod
    def for_model(cls, family: str, tokenizer: Any, chat_style: str | None = None,
                  eoi_mode: str = "template") -> ChatPrompts:
        """chat_style None = the family's reference template (the commands' default); see --chat-style."""
        fmt = templates.chat_format_for(family, tokenizer, style=chat_style)
        eoi = templates.eoi_tokens(fmt, tokenizer, eoi_mode)
        return cls(tokenizer, fmt, tuple(eoi), tuple(int(i) for i in fmt.refusal_token_ids))

    def texts(self, instructions: Sequence[str], outputs: Sequence[str] | None = None) -> list[str]:
        return templates.format_instructions(self.fmt, list(instructions), outputs)

    def batches(self, instructions: Sequence[str], batch_size: int, *, cost=None, budget: int | None = None,
                parallel: int = 1) -> list[Batch]:
        """Left-padded batches of the templated instructions, grouped by length; a set smaller than `batch_size`
        gets one smaller batch rather than filler rows. With a `cost` (`batching.ForwardCost`), batches of long
        prompts are made smaller to fit the memory `budget` (`batching.plan`). Raises RunError when a prompt does
        not end with eoi."""
        ids = encode(self.tokenizer, self.texts(instructions))
        eoi = list(self.eoi)
        for seq, text in zip(ids, instructions):
            if seq[-len(eoi):] != eoi:
                raise RunError(f"templated prompt does not end with the post-instruction tokens {eoi}: {text[:60]!r}"
                               " (try --eoi-mode)")
        return list(bucketed(ids, min(batch_size, len(ids)), pad_id(self.tokenizer), cost=cost, budget=budget,
                             parallel=parallel))

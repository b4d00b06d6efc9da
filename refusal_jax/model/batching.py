"""Length-bucketed, left-padded batches of fixed shape, so a whole dataset compiles a handful of programs, planned
within a memory budget.

Prompts are sorted by token length, grouped into batches of `batch_size`, and each batch is left-padded to the
next multiple of `bucket`. The last batch is filled with copies of a real row whose `weight` is 0, so every
batch has the same leading size. Positions are derived from the attention mask, so extra padding changes
nothing but cost.

Memory. The `--max-prompt-tokens` cap bounds tokens, not what a batch asks for: attention holds
batch x heads x length^2 scores, so one long prompt padded into a batch of 32 can ask for tens of GB. With a
`cost` (`ForwardCost`: estimated peak bytes of one pass over [B, T], from the model config) and a `budget`
(bytes; `memory_budget()` by default: half the memory available), `plan` ends a batch before the first row that
would take its estimate over the budget and halves the batch size for rows that do not fit even alone, so long
prompts run in smaller batches (slower) instead of failing to allocate. Batch sizes stay `batch_size / 2^k` (a few
compiled programs); a prompt that does not fit even alone runs alone, with a warning. Each row's result does not
depend on the rows beside it, so a plan changes cost, not results (up to float rounding of different batch
shapes). Below the budget the plan is exactly the unplanned one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np

from refusal_jax.errors import DataError
from refusal_jax.runs.distributed import to_host


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
        out = tuple(to_host(a) for a in (out if is_tuple else (out,)))  # one host copy per batch (all processes)
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


def left_pad(seqs: Sequence[Sequence[int]], pad: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(seqs), width] int32 token ids right-aligned (left-padded with `pad`) and their 0/1 attention mask."""
    tokens = np.full((len(seqs), width), pad, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for b, seq in enumerate(seqs):
        if len(seq):
            tokens[b, width - len(seq):] = seq
            mask[b, width - len(seq):] = 1
    return tokens, mask


@dataclasses.dataclass(frozen=True)
class ForwardCost:
    """Estimated peak bytes of one compiled pass over a [B, T] batch (an upper estimate, not a measurement).

    Per row, for the layer being computed: 3 float32 [heads, T, T] attention arrays (scores, the masked scores,
    the softmax) plus the block's [T, width] activations (residual, norm, q/k/v, attention out, MLP gate/up/act),
    and the float32 logits ([V] at the last position, or [T, V] with `all_logits`). `copies` counts passes vmapped
    over the batch (the selection sweep's `chunk` candidates). `backward`: a gradient through every layer keeps
    every layer's attention and activations (the screening pass). Checked against XLA's own figure for the
    compiled programs (`memory_analysis().temp_size_in_bytes`; tests/test_memory_plan.py): at least as large,
    and not more than 1.5 times larger, where attention dominates.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_width: int
    vocab_size: int
    act_bytes: int = 4
    copies: int = 1
    all_logits: bool = False
    backward: bool = False

    @classmethod
    def for_model(cls, cfg, act_bytes: int = 4, **kw) -> ForwardCost:
        width = cfg.d_ff + getattr(cfg, "n_experts", 0) * getattr(cfg, "d_expert", 0)
        return cls(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, width, cfg.vocab_size,
                   act_bytes, **kw)

    def row_bytes(self, length: int) -> int:
        T = int(length)
        attention = 3 * 4 * self.n_heads * T * T
        qkv = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        block = self.act_bytes * T * (4 * self.d_model + qkv + 3 * self.mlp_width)
        logits = 4 * self.vocab_size * (T if self.all_logits else 1)
        if self.backward:  # saved for the gradient: every layer's (and one more in flight), the probes' gradients
            return ((self.n_layers + 1) * (attention + block) + self.act_bytes * 6 * self.n_layers * T * self.d_model
                    + logits)
        return attention + block + logits

    def __call__(self, batch: int, length: int) -> int:
        return self.copies * int(batch) * self.row_bytes(length)


# The default budget: this fraction of the memory available when the first plan is made (the rest: parameters,
# compiled programs, XLA's own buffers, other processes).
BUDGET_FRACTION = 0.5
_budget: dict = {}


def parse_bytes(text) -> int | None:
    """'auto' / None -> None (the default budget); '8GB', '512MiB', '1e9' -> bytes. DataError when malformed."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise DataError(f"--memory-budget {text!r} is not a size such as 8GB, 512MiB or 'auto'") from None
    if not value >= 1:  # also NaN
        raise DataError(f"--memory-budget {text!r} must be a positive size")
    if value == float("inf"):
        raise DataError(f"--memory-budget {text!r} must be finite")
    return int(value)


def available_memory() -> int:
    """Bytes free on the first device (accelerators: its allocator's limit minus what is in use) or, on CPU, the
    host's MemAvailable."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def set_memory_budget(budget: int | str | None) -> None:
    """The budget every later plan uses by default (`--memory-budget`); None or 'auto' = measured."""
    _budget["set"] = budget if isinstance(budget, int) else parse_bytes(budget)


def memory_budget(budget: int | str | None = None) -> int:
    """The batch memory budget in bytes: `budget` when given, else the one `set_memory_budget` set, else
    BUDGET_FRACTION of `available_memory()`, measured once per run and taken from process 0 in every process, so
    that all processes plan the same batches."""
    explicit = budget if isinstance(budget, int) else parse_bytes(budget)
    if explicit is None:
        explicit = _budget.get("set")
    if explicit is not None:
        return explicit
    if "auto" not in _budget:
        from refusal_jax.runs import distributed

        _budget["auto"] = distributed.broadcast(int(available_memory() * BUDGET_FRACTION), "memory budget")
    return _budget["auto"]


def plan(lengths: Sequence[int], batch_size: int, bucket: int = 16, *, cost=None, budget: int | None = None,
         parallel: int = 1, sort: bool = True) -> list[tuple[list[int], int]]:
    """Batches as (row indices, batch size) pairs covering every sequence once, in length order; a batch with
    fewer rows than its size is filled with filler rows by `bucketed`.

    Without `cost`, every batch has `batch_size` rows (the unplanned batches). With `cost(B, T) -> bytes`, a
    batch takes the next rows while `cost(ceil(size / parallel), T)` fits `budget` (`parallel`: devices sharing a
    batch on the data axis; T: the longest row taken, padded to `bucket`); when not even one row fits, its size is
    halved and it tries again. Sizes stay `batch_size / 2^k`: a few compiled programs."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = [int(i) for i in (np.argsort(list(lengths), kind="stable") if sort else range(len(lengths)))]
    if cost is not None and budget is None:
        budget = memory_budget()

    def fits(size: int, rows: list[int]) -> bool:
        longest = -(-max(lengths[r] for r in rows) // bucket) * bucket
        return cost is None or cost(-(-size // parallel), longest) <= budget

    out: list[tuple[list[int], int]] = []
    start = 0
    while start < len(order):
        size = batch_size
        while True:
            take = min(size, len(order) - start)
            while take > 0 and not fits(size, order[start:start + take]):
                take -= 1
            if take or size == 1:
                break
            size //= 2
        if not take:  # one row alone is over the budget: run it anyway
            take = 1
            _warn_once(f"warning: a {lengths[order[start]]}-token prompt is estimated at "
                       f"{cost(1, -(-lengths[order[start]] // bucket) * bucket) / 1e9:.1f} GB, more than the "
                       f"memory budget of {budget / 1e9:.1f} GB; running it alone")
        out.append((order[start:start + take], size))
        start += take
    return out


_warned: set = set()


def _warn_once(message: str) -> None:
    import sys

    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def bucketed(ids: Sequence[Sequence[int]], batch_size: int, pad: int, bucket: int = 16,
             sort: bool = True, *, cost=None, budget: int | None = None, parallel: int = 1) -> Iterator[Batch]:
    """Yield fixed-size left-padded batches covering every sequence once (sizes per `plan`: with a `cost`,
    within `budget`)."""
    for rows, size in plan([len(x) for x in ids], batch_size, bucket, cost=cost, budget=budget, parallel=parallel,
                           sort=sort):
        n_real = len(rows)
        rows = list(rows) + [rows[0]] * (size - n_real)
        longest = max(len(ids[r]) for r in rows)
        T = -(-longest // bucket) * bucket
        tokens, mask = left_pad([ids[r] for r in rows], pad, T)
        weight = (np.arange(size) < n_real).astype(np.float32)
        index = np.where(weight > 0, np.asarray(rows), -1)
        yield Batch(index=index, tokens=tokens, mask=mask, weight=weight)

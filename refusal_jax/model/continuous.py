"""Continuous (in-flight) batching for greedy decoding: a fixed number of slots over a fixed-size KV cache.

Static batches decode until their longest completion ends, so rows that stopped early (refusals are short) keep
costing a full step. Here every slot of the batch holds one prompt at a time; when its row stops (a stop token or
`max_new_tokens`), the slot takes the next waiting prompt. Each row sits at its own place in its cache row
(`KVCache.index` of shape [B]); RoPE positions come from the per-row `lengths`, as in the static path.

Two compiled programs, each compiled once per (slots, cache length, chunk, refill) and reused for every prompt and
every call with the same sizes:

  prefill  `refill` prompts, left-padded together to a multiple of `chunk` tokens, enter free slots `chunk`
           tokens per call (chunked prefill: no program per prompt length), and their first generated tokens
           are chosen.
  decode   greedy steps of all slots inside one `while_loop`, until `refill` rows have stopped while prompts are
           waiting (or, once none waits, until the rows left fit in half the slots); then the host refills the
           free slots.

Once no prompt waits, the set drains: the rows still running (often the long completions of the last prompts
admitted) would keep paying a full-width step. When they fit in half the slots, they are gathered into a batch of
half the width (`_compact`, down to `compact_min` slots), and decoding goes on with that width's program (compiled
once per width): on the bundled model on a 2-core CPU, a decoding step takes ~0.40 s with 32 slots, ~0.20 s with
16, ~0.16 s with 8.

Greedy fp32 output equals the static path's (`model.generate.greedy_generate`) for every prompt
(tests/test_continuous.py).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from refusal_jax.model.config import ModelConfig
from refusal_jax.model.generate import CPU_DECODE_OPTIONS, ends_pair
from refusal_jax.model.params import Params
from refusal_jax.model.transformer import Intervention, KVCache, forward_unjitted


@struct.dataclass
class Slots:
    """Device state of the slots besides the KV cache.

    next_token: [B] int32 the token chosen for each row and not yet recorded in `out`.
    active:     [B] bool the slot holds a row that has not stopped.
    count:      [B] int32 tokens recorded in `out` for the slot's row.
    out:        [B, M] int32 the row's generated tokens (the first `count`).
    """

    next_token: jax.Array
    active: jax.Array
    count: jax.Array
    out: jax.Array

    @classmethod
    def init(cls, slots: int, max_new_tokens: int, pad: int) -> "Slots":
        return cls(next_token=jnp.zeros((slots,), jnp.int32), active=jnp.zeros((slots,), bool),
                   count=jnp.zeros((slots,), jnp.int32), out=jnp.full((slots, max_new_tokens), pad, jnp.int32))


DEFAULT_CHUNK = 32  # prompt tokens per prefill call


def cache_length(prompt_lengths: Sequence[int], max_new_tokens: int, chunk: int, round_to: int = 64) -> int:
    """Cache slots per row: the longest prompt in whole chunks plus `max_new_tokens`, rounded up to `round_to` so
    that sets of prompts of similar lengths share compiled programs."""
    longest = -(-max(prompt_lengths) // chunk) * chunk
    return -(-(longest + max_new_tokens) // round_to) * round_to


DEFAULT_COMPACT_MIN = 8  # narrowest width a draining set is gathered into (8 slots step as fast as 4 here)


def default_refill(slots: int) -> int:
    """Prompts prefilled together when `generate` is given no `refill`: slots // 8, at least 1."""
    return max(1, slots // 8)


def _rows(tree, per_layer: bool, fn):
    """fn(array, batch_axis) over the k/v arrays of a cache (per-layer tuples [B, S, K, H] or stacked [L, B, ...])."""
    return jax.tree.map(lambda a: fn(a, 0 if per_layer else 1), tree)


def _take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """Cache rows `rows` [K] (an index past the last row reads the last one)."""
    per_layer = isinstance(cache.k, tuple)
    take = lambda a, ax: jnp.take(a, rows, axis=ax, mode="clip")  # noqa: E731
    return KVCache(k=_rows(cache.k, per_layer, take), v=_rows(cache.v, per_layer, take), mask=take(cache.mask, 0),
                   lengths=take(cache.lengths, 0), index=take(cache.index, 0))


def _prefill_chunk(params: Params, cfg: ModelConfig, cache: KVCache, slots: Slots, rows: jax.Array,
                   tokens: jax.Array, mask: jax.Array, first: jax.Array, intervention: Intervention | None):
    """One chunk [K, C] of K left-padded prompts into cache rows `rows` [K] (rows are reset when `first`; a row
    index past the last slot marks a padding entry, computed and dropped); each row's next token is the argmax
    after the chunk (meaningful after the last chunk)."""
    per_layer = isinstance(cache.k, tuple)
    row = _take_rows(cache, rows)
    row = row.replace(mask=jnp.where(first, False, row.mask), lengths=jnp.where(first, 0, row.lengths),
                      index=jnp.where(first, 0, row.index))
    out = forward_unjitted(params, cfg, tokens, mask, intervention, row, logits="last")

    def put(big, small, ax):
        small = small.astype(big.dtype)
        return big.at[rows].set(small, mode="drop") if ax == 0 else big.at[:, rows].set(small, mode="drop")

    new = out.cache
    cache = KVCache(k=jax.tree.map(lambda b, s: put(b, s, 0 if per_layer else 1), cache.k, new.k),
                    v=jax.tree.map(lambda b, s: put(b, s, 0 if per_layer else 1), cache.v, new.v),
                    mask=put(cache.mask, new.mask, 0), lengths=put(cache.lengths, new.lengths, 0),
                    index=put(cache.index, new.index, 0))
    nxt = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
    slots = Slots(next_token=put(slots.next_token, nxt, 0), active=put(slots.active, jnp.ones_like(rows, bool), 0),
                  count=put(slots.count, jnp.zeros_like(rows), 0), out=slots.out)
    return cache, slots


def _decode(params: Params, cfg: ModelConfig, cache: KVCache, slots: Slots, free_target: jax.Array,
            intervention: Intervention | None, *, stop_ids: tuple[int, ...],
            stop_pairs: tuple[tuple[int, int], ...] = ()):
    """Greedy steps of every slot until `free_target` rows have stopped or none is active.

    Each step records every active row's next token, stops rows at a stop token, a stop pair (previous, next) or at
    the out buffer's end, and runs the still-active rows one token further (stopped slots ride along masked: their
    keys are never attended).
    """
    B, M = slots.out.shape
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    rows = jnp.arange(B)

    def cond(state):
        _, slots, freed = state
        return (freed < free_target) & jnp.any(slots.active)

    def body(state):
        cache, s, freed = state
        col = jnp.minimum(s.count, M - 1)
        out = s.out.at[rows, col].set(jnp.where(s.active, s.next_token, s.out[rows, col]))
        count = s.count + s.active
        prev = s.out[rows, jnp.maximum(col - 1, 0)]
        pair = ends_pair(prev, s.next_token, s.count > 0, stop_pairs)
        stopped = s.active & (jnp.isin(s.next_token, stops) | pair | (count >= M))
        active = s.active & ~stopped
        fwd = forward_unjitted(params, cfg, s.next_token[:, None], active[:, None].astype(jnp.int32), intervention,
                               cache, logits="last")
        nxt = jnp.argmax(fwd.logits, axis=-1).astype(jnp.int32)  # first maximal index, as torch.argmax
        return fwd.cache, Slots(next_token=nxt, active=active, count=count, out=out), freed + stopped.sum()

    cache, slots, _ = jax.lax.while_loop(cond, body, (cache, slots, jnp.zeros((), jnp.int32)))
    return cache, slots


@jax.jit
def _compact(cache: KVCache, slots: Slots, keep: jax.Array) -> tuple[KVCache, Slots]:
    """The slots `keep` [B'] of cache and state, in that order, as a batch of B' rows."""
    return _take_rows(cache, keep), jax.tree.map(lambda a: jnp.take(a, keep, axis=0), slots)


@functools.cache
def programs(default_dot: bool):
    """(prefill, decode) jitted with the cache and slot state donated. default_dot: compile the decoding program
    with `generate.CPU_DECODE_OPTIONS`, as the static one; `generate` asks for it with float32 per-layer weights
    on CPU (XLA's default dot instead of YNNPACK's fusions: a 32-slot step of the bundled model takes 0.31-0.37 s
    against 0.37-0.45 s at cache lengths 128-640). bfloat16 and int8 weights keep the fusions, which take them
    as they are, and so does prefill, whose matmuls have `refill` x `chunk` rows."""
    prefill = jax.jit(_prefill_chunk, static_argnames=("cfg",), donate_argnames=("cache", "slots"))
    decode = jax.jit(_decode, static_argnames=("cfg", "stop_ids", "stop_pairs"), donate_argnames=("cache", "slots"),
                     compiler_options=CPU_DECODE_OPTIONS if default_dot else None)
    return prefill, decode


def generate(params: Params, cfg: ModelConfig, ids: Sequence[Sequence[int]],
             intervention: Intervention | None = None, *, slots: int, max_new_tokens: int,
             stop_ids: tuple[int, ...] = (), stop_pairs: tuple[tuple[int, int], ...] = (), pad: int = 0,
             chunk: int = DEFAULT_CHUNK, refill: int | None = None, compact_min: int = DEFAULT_COMPACT_MIN,
             bar=None, stats: dict | None = None) -> list[list[int]]:
    """Greedy completions of token-id prompts with continuous batching, in input order.

    Args:
      params: laid out for decoding (`generate.decoding_params`) or stacked.
      ids: prompt token ids (templated, with any BOS).
      slots: rows decoded together (the batch size of a step).
      chunk: prompt tokens per prefill call; prompts are left-padded to a multiple of it.
      refill: prompts prefilled together (and so the stopped rows decoding waits for while prompts are
        waiting); default `default_refill(slots)`.
      compact_min: once no prompt waits, the running rows are gathered into half the slots whenever they fit,
        down to this many slots (one more decoding program per width); above slots // 2: never.
      bar: a tqdm-like progress bar updated by one per finished prompt.
      stats: if a dict, filled with "steps" (decode steps run), "slot_steps" (steps x the slots decoded at each
        step) and "row_steps" (steps of active rows; their ratio is the slot occupancy).
    Returns:
      each prompt's generated ids, up to and including its stop token.
    """
    if not ids:
        return []
    refill = default_refill(slots) if refill is None else refill
    if min(slots, chunk, max_new_tokens, refill, compact_min) < 1 or refill > slots:
        raise ValueError("slots, chunk, max_new_tokens, refill and compact_min must be >= 1, refill at most slots")
    if intervention is None:  # as data, so that baseline and interventions share the compiled programs
        intervention = Intervention.none(cfg)
    per_layer = isinstance(params.layers, tuple)
    q = params.layers[0].q if per_layer else params.layers.q
    default_dot = per_layer and jax.default_backend() == "cpu" and getattr(q, "dtype", None) == jnp.float32
    prefill, decode = programs(default_dot)
    S = cache_length([len(x) for x in ids], max_new_tokens, chunk)
    cache = KVCache.init(cfg, slots, S, params.embed.dtype, per_layer=per_layer)
    cache = cache.replace(index=jnp.zeros((slots,), jnp.int32))
    state = Slots.init(slots, max_new_tokens, pad)
    waiting = list(range(len(ids)))[::-1]  # pop() takes them in input order
    owner: list[int | None] = [None] * slots
    results: list[list[int]] = [[] for _ in ids]
    steps = row_steps = slot_steps = 0

    def admit(free: list[int]):
        """Prefill waiting prompts into the `free` slots, `refill` prompts per group (padded with dropped rows,
        so that one program serves every group), each group left-padded to its longest prompt and entered
        `chunk` tokens per call."""
        nonlocal cache, state
        free = free[:len(waiting)]
        for g in range(0, len(free), refill):
            group = free[g:g + refill]
            seqs = []
            for slot in group:
                owner[slot] = waiting.pop()
                seqs.append(list(ids[owner[slot]]))
            n = -(-max(map(len, seqs)) // chunk) * chunk
            tokens = np.full((refill, n), pad, np.int32)
            mask = np.zeros((refill, n), np.int32)
            rows = np.full((refill,), slots, np.int32)  # past the last slot: padding entries, dropped
            rows[:len(group)] = group
            for r, seq in enumerate(seqs):
                tokens[r, n - len(seq):], mask[r, n - len(seq):] = seq, 1
            for c in range(0, n, chunk):
                cache, state = prefill(params, cfg, cache, state, jnp.asarray(rows), tokens[:, c:c + chunk],
                                       mask[:, c:c + chunk], jnp.asarray(c == 0), intervention)

    admit(list(range(slots)))
    while any(o is not None for o in owner):
        running = [s for s, o in enumerate(owner) if o is not None]
        width = len(owner)
        while not waiting and len(running) <= width // 2 and width // 2 >= compact_min:
            width //= 2
        if width < len(owner):  # the running rows first, then stopped slots as inactive padding
            keep = running + [s for s, o in enumerate(owner) if o is None][:width - len(running)]
            cache, state = _compact(cache, state, jnp.asarray(keep, jnp.int32))
            owner = [owner[s] for s in keep]
            running = list(range(len(running)))
        before = np.asarray(state.count)
        # Back to the host once `refill` slots can take waiting prompts (prefilled together), once the running rows
        # fit in half the slots, or when all stopped.
        if waiting:
            target = min(len(waiting), refill)
        elif width // 2 >= compact_min:
            target = len(running) - width // 2
        else:
            target = width + 1
        cache, state = decode(params, cfg, cache, state, jnp.asarray(target, jnp.int32),
                              intervention, stop_ids=stop_ids, stop_pairs=stop_pairs)
        active, count = np.asarray(state.active), np.asarray(state.count)
        progressed = count - np.where([o is not None for o in owner], before, count)
        ran = int(progressed.max(initial=0))
        steps += ran
        slot_steps += ran * width
        row_steps += int(progressed.sum())
        finished = [s for s in running if not active[s]]
        if finished:
            out = np.asarray(state.out)
            for s in finished:
                results[owner[s]] = out[s, :count[s]].tolist()
                owner[s] = None
                if bar is not None:
                    bar.update(1)
            if waiting:
                admit(finished)
    if stats is not None:
        stats.update(steps=steps, slot_steps=slot_steps, row_steps=row_steps)
    return results

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

Per-row interventions: every row carries an index into a small stacked table of interventions (`stack`, leaves
[V, ...]), so baseline and intervention prompts decode in one pool (`generate(..., variants=...)`) and a server
mixes variants in one batch (`Engine`). With more than one entry the forward pass is vmapped over rows, each row
gathering its own entry; the table is data, so one program serves every mix. Rows can also sample (temperature,
top-p, a per-row key) and stop at their own token limit (`Engine`).

Greedy fp32 output equals the static path's (`model.generate.greedy_generate`) for every prompt, and a pooled run
equals each set run alone (tests/test_continuous.py).
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

    next_token:  [B] int32 the token chosen for each row and not yet recorded in `out`.
    active:      [B] bool the slot holds a row that has not stopped.
    count:       [B] int32 tokens recorded in `out` for the slot's row.
    out:         [B, M] int32 the row's generated tokens (the first `count`).
    variant:     [B] int32 the row's entry in the intervention table.
    limit:       [B] int32 the row's token limit (at most M).
    temperature: [B] float32 0: greedy; else the row samples from softmax(logits / temperature).
    top_p:       [B] float32 sampling keeps the most probable tokens whose probabilities sum to top_p.
    key:         [B, 2] uint32 the row's PRNG key; the token after `count` recorded ones uses fold_in(key, count).
    """

    next_token: jax.Array
    active: jax.Array
    count: jax.Array
    out: jax.Array
    variant: jax.Array
    limit: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    key: jax.Array

    @classmethod
    def init(cls, slots: int, max_new_tokens: int, pad: int) -> "Slots":
        return cls(next_token=jnp.zeros((slots,), jnp.int32), active=jnp.zeros((slots,), bool),
                   count=jnp.zeros((slots,), jnp.int32), out=jnp.full((slots, max_new_tokens), pad, jnp.int32),
                   variant=jnp.zeros((slots,), jnp.int32), limit=jnp.full((slots,), max_new_tokens, jnp.int32),
                   temperature=jnp.zeros((slots,), jnp.float32), top_p=jnp.ones((slots,), jnp.float32),
                   key=jnp.zeros((slots, 2), jnp.uint32))


@struct.dataclass
class RowSettings:
    """What prefill writes into the slots of the rows it admits, one entry per row ([K]): see `Slots`."""

    variant: jax.Array
    limit: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    key: jax.Array

    @classmethod
    def greedy(cls, variants: Sequence[int], limit: int) -> "RowSettings":
        k = len(variants)
        return cls(variant=np.asarray(variants, np.int32), limit=np.full((k,), limit, np.int32),
                   temperature=np.zeros((k,), np.float32), top_p=np.ones((k,), np.float32),
                   key=np.zeros((k, 2), np.uint32))


def stack(cfg: ModelConfig, interventions: Sequence[Intervention | None]) -> Intervention:
    """The interventions as one table (every leaf [V, ...]); None is no intervention. Ablation bases of different
    ranks are padded with zero rows (no-ops)."""
    ivs = [Intervention.none(cfg) if iv is None else iv for iv in interventions]
    if not ivs:
        raise ValueError("no interventions to stack")
    rank = max(iv.ablate_basis.shape[0] for iv in ivs)
    ivs = [iv.replace(ablate_basis=jnp.pad(jnp.asarray(iv.ablate_basis, jnp.float32),
                                           ((0, rank - iv.ablate_basis.shape[0]), (0, 0)))) for iv in ivs]
    return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x, jnp.float32) for x in a]), *ivs)


def _forward_rows(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, table: Intervention,
                  variant: jax.Array, cache: KVCache):
    """(last-position logits [B, V], updated cache) of `forward_unjitted` with row b under table[variant[b]].

    A one-entry table is applied to the whole batch as it is; otherwise the forward pass is vmapped over rows
    (tokens [B, T] -> [1, T] per row, the cache rows on their batch axis), each row gathering its own entry.
    """
    if table.add_coeffs.shape[0] == 1:
        out = forward_unjitted(params, cfg, tokens, mask, jax.tree.map(lambda a: a[0], table), cache, logits="last")
        return out.logits, out.cache
    ax = 0 if isinstance(cache.k, tuple) else 1
    rows = jax.tree.map(lambda a: a[variant], table)

    def one(tok, m, iv, k, v, kmask, length, index):
        row = KVCache(k=jax.tree.map(lambda a: jnp.expand_dims(a, ax), k),
                      v=jax.tree.map(lambda a: jnp.expand_dims(a, ax), v),
                      mask=kmask[None], lengths=length[None], index=index)
        out = forward_unjitted(params, cfg, tok[None], m[None], iv, row, logits="last")
        c = out.cache
        return (out.logits[0], jax.tree.map(lambda a: jnp.squeeze(a, ax), c.k),
                jax.tree.map(lambda a: jnp.squeeze(a, ax), c.v), c.mask[0], c.lengths[0], c.index)

    logits, k, v, kmask, lengths, index = jax.vmap(
        one, in_axes=(0, 0, 0, ax, ax, 0, 0, 0), out_axes=(0, ax, ax, 0, 0, 0))(
        tokens, mask, rows, cache.k, cache.v, cache.mask, cache.lengths, cache.index)
    return logits, KVCache(k=k, v=v, mask=kmask, lengths=lengths, index=index)


def _choose(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, key: jax.Array, count: jax.Array,
            sample: bool) -> jax.Array:
    """[B] int32 next tokens from logits [B, V]: the argmax (first maximal index, as torch.argmax) where the row's
    temperature is 0, else a draw from the row's tempered, top-p-truncated distribution with fold_in(key, count)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]

    def nucleus(scaled):  # the smallest logit each row keeps: its top tokens until their mass reaches top_p
        desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
        return jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)

    floor = jax.lax.cond(jnp.any(top_p < 1), nucleus, lambda x: jnp.full((x.shape[0], 1), -jnp.inf), scaled)
    scaled = jnp.where(scaled >= floor, scaled, -jnp.inf)
    keys = jax.vmap(jax.random.fold_in)(key, count.astype(jnp.uint32))
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


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
                   tokens: jax.Array, mask: jax.Array, first: jax.Array, table: Intervention, settings: RowSettings,
                   *, sample: bool = False):
    """One chunk [K, C] of K left-padded prompts into cache rows `rows` [K] (rows are reset when `first`; a row
    index past the last slot marks a padding entry, computed and dropped); each row's settings are written and its
    next token is chosen after the chunk (meaningful after the last chunk)."""
    per_layer = isinstance(cache.k, tuple)
    row = _take_rows(cache, rows)
    row = row.replace(mask=jnp.where(first, False, row.mask), lengths=jnp.where(first, 0, row.lengths),
                      index=jnp.where(first, 0, row.index))
    logits, new = _forward_rows(params, cfg, tokens, mask, table, settings.variant, row)

    def put(big, small, ax):
        small = small.astype(big.dtype)
        return big.at[rows].set(small, mode="drop") if ax == 0 else big.at[:, rows].set(small, mode="drop")

    cache = KVCache(k=jax.tree.map(lambda b, s: put(b, s, 0 if per_layer else 1), cache.k, new.k),
                    v=jax.tree.map(lambda b, s: put(b, s, 0 if per_layer else 1), cache.v, new.v),
                    mask=put(cache.mask, new.mask, 0), lengths=put(cache.lengths, new.lengths, 0),
                    index=put(cache.index, new.index, 0))
    zeros = jnp.zeros_like(rows)
    nxt = _choose(logits, settings.temperature, settings.top_p, settings.key, zeros, sample)
    slots = Slots(next_token=put(slots.next_token, nxt, 0), active=put(slots.active, jnp.ones_like(rows, bool), 0),
                  count=put(slots.count, zeros, 0), out=slots.out, variant=put(slots.variant, settings.variant, 0),
                  limit=put(slots.limit, jnp.minimum(settings.limit, slots.out.shape[1]), 0),
                  temperature=put(slots.temperature, settings.temperature, 0),
                  top_p=put(slots.top_p, settings.top_p, 0), key=put(slots.key, settings.key, 0))
    return cache, slots


def _decode(params: Params, cfg: ModelConfig, cache: KVCache, slots: Slots, free_target: jax.Array,
            table: Intervention, max_steps: jax.Array | None = None, *, stop_ids: tuple[int, ...],
            stop_pairs: tuple[tuple[int, int], ...] = (), sample: bool = False):
    """Decoding steps of every slot until `free_target` rows have stopped, none is active or `max_steps` steps ran.

    Each step records every active row's next token, stops rows at a stop token, a stop pair (previous, next) or at
    the row's limit, and runs the still-active rows one token further (stopped slots ride along masked: their
    keys are never attended).
    """
    B, M = slots.out.shape
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    rows = jnp.arange(B)
    max_steps = jnp.asarray(2**30 if max_steps is None else max_steps, jnp.int32)

    def cond(state):
        _, slots, freed, step = state
        return (freed < free_target) & jnp.any(slots.active) & (step < max_steps)

    def body(state):
        cache, s, freed, step = state
        col = jnp.minimum(s.count, M - 1)
        out = s.out.at[rows, col].set(jnp.where(s.active, s.next_token, s.out[rows, col]))
        count = s.count + s.active
        prev = s.out[rows, jnp.maximum(col - 1, 0)]
        pair = ends_pair(prev, s.next_token, s.count > 0, stop_pairs)
        stopped = s.active & (jnp.isin(s.next_token, stops) | pair | (count >= s.limit))
        active = s.active & ~stopped
        logits, cache = _forward_rows(params, cfg, s.next_token[:, None], active[:, None].astype(jnp.int32), table,
                                      s.variant, cache)
        nxt = _choose(logits, s.temperature, s.top_p, s.key, count, sample)
        s = s.replace(next_token=nxt, active=active, count=count, out=out)
        return cache, s, freed + stopped.sum(), step + 1

    cache, slots, _, _ = jax.lax.while_loop(cond, body, (cache, slots, jnp.zeros((), jnp.int32),
                                                          jnp.zeros((), jnp.int32)))
    return cache, slots


@jax.jit
def _compact(cache: KVCache, slots: Slots, keep: jax.Array) -> tuple[KVCache, Slots]:
    """The slots `keep` [B'] of cache and state, in that order, as a batch of B' rows."""
    return _take_rows(cache, keep), jax.tree.map(lambda a: jnp.take(a, keep, axis=0), slots)


@functools.partial(jax.jit, static_argnums=2)
def _grow(cache: KVCache, slots: Slots, extra: int) -> tuple[KVCache, Slots]:
    """cache and state with `extra` empty slots after the existing ones."""
    per_layer = isinstance(cache.k, tuple)

    def pad(a, ax):
        return jnp.pad(a, [(0, extra) if i == ax else (0, 0) for i in range(a.ndim)])

    cache = KVCache(k=_rows(cache.k, per_layer, pad), v=_rows(cache.v, per_layer, pad), mask=pad(cache.mask, 0),
                    lengths=pad(cache.lengths, 0), index=pad(cache.index, 0))
    return cache, jax.tree.map(lambda a: pad(a, 0), slots)


@functools.cache
def programs(default_dot: bool):
    """(prefill, decode) jitted with the cache and slot state donated. default_dot: compile the decoding program
    with `generate.CPU_DECODE_OPTIONS`, as the static one; `generate` asks for it with float32 per-layer weights
    on CPU (XLA's default dot instead of YNNPACK's fusions: a 32-slot step of the bundled model takes 0.31-0.37 s
    against 0.37-0.45 s at cache lengths 128-640). bfloat16 and int8 weights keep the fusions, which take them
    as they are, and so does prefill, whose matmuls have `refill` x `chunk` rows."""
    prefill = jax.jit(_prefill_chunk, static_argnames=("cfg", "sample"), donate_argnames=("cache", "slots"))
    decode = jax.jit(_decode, static_argnames=("cfg", "stop_ids", "stop_pairs", "sample"),
                     donate_argnames=("cache", "slots"), compiler_options=CPU_DECODE_OPTIONS if default_dot else None)
    return prefill, decode


def uses_default_dot(params: Params) -> bool:
    """Whether decoding `params` is compiled with CPU_DECODE_OPTIONS (float32 per-layer weights on CPU)."""
    per_layer = isinstance(params.layers, tuple)
    q = params.layers[0].q if per_layer else params.layers.q
    return per_layer and jax.default_backend() == "cpu" and getattr(q, "dtype", None) == jnp.float32


@jax.jit
def _release(slots: Slots, drop: jax.Array) -> Slots:
    """The rows `drop` [B] bool stopped (their slots free for new prompts)."""
    return slots.replace(active=slots.active & ~drop)


def generate(params: Params, cfg: ModelConfig, ids: Sequence[Sequence[int]],
             intervention: Intervention | Sequence[Intervention | None] | None = None, *, slots: int,
             max_new_tokens: int, variants: Sequence[int] | None = None,
             stop_ids: tuple[int, ...] = (), stop_pairs: tuple[tuple[int, int], ...] = (), pad: int = 0,
             chunk: int = DEFAULT_CHUNK, refill: int | None = None, compact_min: int = DEFAULT_COMPACT_MIN,
             bar=None, stats: dict | None = None) -> list[list[int]]:
    """Greedy completions of token-id prompts with continuous batching, in input order.

    Args:
      params: laid out for decoding (`generate.decoding_params`) or stacked.
      ids: prompt token ids (templated, with any BOS).
      intervention: one for every prompt (None: none); or, with `variants`, a sequence of them (a table).
      variants: each prompt's index into the `intervention` sequence: prompts under different interventions
        decode in one pool, each as it would alone.
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
    if variants is None:  # as data, so that baseline and interventions share the compiled programs
        table, variants = stack(cfg, [intervention]), [0] * len(ids)
    else:
        if isinstance(intervention, Intervention) or intervention is None:
            raise ValueError("variants index a sequence of interventions")
        table, variants = stack(cfg, list(intervention)), [int(v) for v in variants]
        if len(variants) != len(ids) or not all(0 <= v < table.add_coeffs.shape[0] for v in variants):
            raise ValueError("variants must give each prompt an index into the interventions")
    per_layer = isinstance(params.layers, tuple)
    prefill, decode = programs(uses_default_dot(params))
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
            settings = RowSettings.greedy([variants[owner[s]] for s in group] + [0] * (refill - len(group)),
                                          max_new_tokens)
            for c in range(0, n, chunk):
                cache, state = prefill(params, cfg, cache, state, jnp.asarray(rows), tokens[:, c:c + chunk],
                                       mask[:, c:c + chunk], jnp.asarray(c == 0), table, settings)

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
                              table, stop_ids=stop_ids, stop_pairs=stop_pairs)
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


def _raw_key(seed: int) -> np.ndarray:
    """jax.random.PRNGKey(seed % 2**32) (threefry's raw [2] uint32 key), computed on the host."""
    return np.asarray([0, int(seed) % 2**32], np.uint32)


class Request:
    """One prompt for an `Engine`: token ids, its table entry, token limit and sampling settings. `on_tokens(new,
    done)` is called on the engine's thread with the tokens generated since the last call and whether the row
    stopped; `cancel()` (any thread) frees its slot at the next host turn."""

    def __init__(self, ids: Sequence[int], on_tokens, *, variant: int = 0, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        self.ids, self.on_tokens, self.variant, self.max_tokens = list(ids), on_tokens, variant, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.cancelled = False
        self.sent = 0

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Continuous batching for requests that arrive at any time (the server's decoding loop), on its own thread.

    Up to `slots` rows over a KV cache of `cache_len` positions per row; each request enters a free slot
    (prefilled `refill` at a time), decodes under its own table entry and sampling settings, and reports its new
    tokens every `steps` decoding steps. The batch is as wide as the requests need: `min_width` slots, doubled
    (up to `slots`) when running and waiting requests outnumber them, halved when the running rows fit in half
    (`_compact`), so a lone client does not pay a full-width step (one program per width, compiled by
    `warm_up`). `fits(n, max_tokens)` says whether a prompt of n tokens with that token
    limit fits the cache. `set_entry(i, intervention)` replaces one table entry between host turns (entries no
    running row uses: ad-hoc interventions).
    """

    def __init__(self, params: Params, cfg: ModelConfig, table: Intervention, *, slots: int, cache_len: int,
                 stop_ids: tuple[int, ...] = (), pad: int = 0, chunk: int = DEFAULT_CHUNK,
                 refill: int | None = None, steps: int = 4, min_width: int = DEFAULT_COMPACT_MIN):
        import queue
        import threading

        self.params, self.cfg, self.table = params, cfg, table
        self.slots, self.cache_len, self.chunk, self.steps, self.pad = slots, cache_len, chunk, steps, pad
        self.widths = sorted({min(slots, max(1, min_width) * 2**k) for k in range(32)
                              if min(slots, max(1, min_width) * 2**k) <= slots})
        self.refill = min(default_refill(slots) if refill is None else refill, self.widths[0])
        self.stop_ids = tuple(stop_ids)
        self._prefill, self._decode = programs(uses_default_dot(params))
        width = self.widths[0]
        per_layer = isinstance(params.layers, tuple)
        self._cache = KVCache.init(cfg, width, cache_len, params.embed.dtype, per_layer=per_layer)
        self._cache = self._cache.replace(index=jnp.zeros((width,), jnp.int32))
        self._state = Slots.init(width, cache_len, pad)
        self._owner: list[Request | None] = [None] * width
        self._pinned: int | None = None  # a width held by warm_up
        self._waiting: list[Request] = []
        self._inbox: queue.Queue = queue.Queue()
        self._edits: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refusal-jax-engine", daemon=True)
        self.error: BaseException | None = None
        self.released = 0  # rows stopped by `Request.cancel` (a client gone, a stop string)

    def load(self) -> dict:
        """Rows running and requests waiting now, and rows released by cancellation so far."""
        return {"running": sum(o is not None for o in self._owner), "waiting": len(self._waiting),
                "released": self.released}

    def padded(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    def fits(self, n: int, max_tokens: int) -> bool:
        return n >= 1 and max_tokens >= 1 and self.padded(n) + max_tokens <= self.cache_len

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        if not self.fits(len(request.ids), request.max_tokens):
            raise ValueError("the prompt and its token limit do not fit the cache")
        if self._closing.is_set():
            raise RuntimeError("the engine is closing")
        self._inbox.put(request)

    def set_entry(self, index: int, intervention: Intervention | None) -> None:
        self._edits.put((index, intervention))

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests taken so far, then stop the thread."""
        self._closing.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def warm_up(self) -> None:
        """Compile the programs of every width (two greedy tokens of a one-token prompt each) before serving."""
        import threading

        for width in self.widths:
            self._pinned = width
            done = threading.Event()
            self.submit(Request([self.pad], lambda new, stopped, d=done: stopped and d.set(), max_tokens=2))
            done.wait()
        self._pinned = None

    def _resize(self) -> None:
        """Grow the batch to the narrowest width that holds the running and waiting requests, or shrink it to the
        narrowest that holds the running rows once none waits."""
        running = [s for s, o in enumerate(self._owner) if o is not None]
        need = len(running) + len(self._waiting)
        width = self._pinned or next((w for w in self.widths if w >= need), self.widths[-1])
        if width > len(self._owner):
            self._cache, self._state = _grow(self._cache, self._state, width - len(self._owner))
            self._owner += [None] * (width - len(self._owner))
        elif width < len(self._owner) and len(running) <= width and (not self._waiting or self._pinned):
            keep = running + [s for s, o in enumerate(self._owner) if o is None][:width - len(running)]
            self._cache, self._state = _compact(self._cache, self._state, jnp.asarray(keep, jnp.int32))
            self._owner = [self._owner[s] for s in keep]

    # the engine thread ---------------------------------------------------------------------------

    def _take_inbox(self, block: bool) -> None:
        import queue

        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is not None:
                self._waiting.append(item)

    def _apply_edits(self) -> None:
        import queue

        while True:
            try:
                index, iv = self._edits.get_nowait()
            except queue.Empty:
                return
            entry = stack(self.cfg, [iv])
            rank = self.table.ablate_basis.shape[1]
            if entry.ablate_basis.shape[1] > rank:
                raise ValueError("an ad-hoc ablation basis has more rows than the table")
            entry = entry.replace(ablate_basis=jnp.pad(entry.ablate_basis,
                                                       ((0, 0), (0, rank - entry.ablate_basis.shape[1]), (0, 0))))
            self.table = jax.tree.map(lambda t, e, i=index: t.at[i].set(e[0]), self.table, entry)

    def _admit(self) -> None:
        self._waiting = [r for r in self._waiting if not (r.cancelled and self._finish(r))]
        free = [s for s, o in enumerate(self._owner) if o is None]
        while free and self._waiting:
            group, n = [], 0
            for r in list(self._waiting):  # requests whose prompt and limit fit next to the group's longest prompt
                if len(group) == min(len(free), self.refill):
                    break
                m = max(n, self.padded(len(r.ids)))
                if m + r.max_tokens <= self.cache_len and all(m + g.max_tokens <= self.cache_len for g in group):
                    group.append(r)
                    n = m
                    self._waiting.remove(r)
            if not group:  # cannot happen: `submit` takes only requests that fit alone
                break
            tokens = np.full((self.refill, n), self.pad, np.int32)
            mask = np.zeros((self.refill, n), np.int32)
            rows = np.full((self.refill,), len(self._owner), np.int32)  # past the last slot: padding, dropped
            settings = RowSettings.greedy([0] * self.refill, 1)
            for i, r in enumerate(group):
                slot = free.pop(0)
                self._owner[slot] = r
                rows[i] = slot
                tokens[i, n - len(r.ids):], mask[i, n - len(r.ids):] = r.ids, 1
                settings.variant[i], settings.limit[i] = r.variant, r.max_tokens
                settings.temperature[i], settings.top_p[i] = r.temperature, r.top_p
                settings.key[i] = _raw_key(r.seed)
            for c in range(0, n, self.chunk):
                self._cache, self._state = self._prefill(
                    self.params, self.cfg, self._cache, self._state, jnp.asarray(rows), tokens[:, c:c + self.chunk],
                    mask[:, c:c + self.chunk], jnp.asarray(c == 0), self.table, settings, sample=True)

    def _finish(self, r: Request) -> bool:
        r.on_tokens([], True)
        return True

    def _run(self) -> None:
        try:
            while True:
                running = [s for s, o in enumerate(self._owner) if o is not None]
                idle = not running and not self._waiting
                if idle and self._closing.is_set() and self._inbox.empty():
                    return
                self._take_inbox(block=idle)
                self._apply_edits()
                drop = [s for s in running if self._owner[s].cancelled]
                if drop:
                    self._state = _release(self._state, jnp.asarray(np.isin(np.arange(len(self._owner)), drop)))
                    for s in drop:
                        self._finish(self._owner[s])
                        self._owner[s] = None
                    self.released += len(drop)
                self._resize()
                self._admit()
                if all(o is None for o in self._owner):
                    continue
                target = min(len(self._waiting), self.refill) if self._waiting else len(self._owner) + 1
                self._cache, self._state = self._decode(
                    self.params, self.cfg, self._cache, self._state, jnp.asarray(target, jnp.int32), self.table,
                    jnp.asarray(self.steps, jnp.int32), stop_ids=self.stop_ids, sample=True)
                active, count = np.asarray(self._state.active), np.asarray(self._state.count)
                out = np.asarray(self._state.out)
                for s, r in enumerate(self._owner):
                    if r is None:
                        continue
                    new = out[s, r.sent:count[s]].tolist()
                    r.sent = int(count[s])
                    stopped = not active[s]
                    if new or stopped:
                        r.on_tokens(new, stopped)
                    if stopped:
                        self._owner[s] = None
        except BaseException as e:  # every waiting client learns of it
            self.error = e
            for r in [o for o in self._owner if o is not None] + self._waiting:
                r.on_tokens([], True)
            raise

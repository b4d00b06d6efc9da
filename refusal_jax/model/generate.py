"""Batched greedy decoding with a KV cache, jit-compiled, with any `Intervention` active at every step."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from refusal_jax.model.batching import ForwardCost, bucketed, encode, pad_id
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.families import END_OF_TURN
from refusal_jax.model.params import Params, unembedding, unstack_layers
from refusal_jax.model.quant import DECODE_DTYPES, lower_precision
from refusal_jax.model.transformer import Intervention, KVCache, forward_unjitted
from refusal_jax.runs.distributed import to_host


def greedy_generate(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array,
                    intervention: Intervention | None = None, *, max_new_tokens: int,
                    stop_ids: tuple[int, ...] = (), stop_pairs: tuple[tuple[int, int], ...] = (), pad: int = 0,
                    per_layer: bool | None = None) -> jax.Array:
    """Greedy continuation of left-padded prompts (jit-compiled).

    Args:
      params: stacked, or already laid out for decoding by `decoding_params` (reused across calls).
      tokens, mask: [B, T] left-padded prompt ids and attention mask.
      intervention: applied to the prompt and to every generated token (traced).
      max_new_tokens: number of decoding steps (static).
      stop_ids: token ids that end a sequence; later positions are filled with `pad`.
      stop_pairs: (previous, next) generated token pairs that end a sequence (a stop string split over two
        tokens, e.g. Qwen's closing code fence "``" + "`\n"; `cut_at_stop` cuts the same way).
      per_layer: see `decoding_params` (default: on CPU).
    Returns:
      [B, max_new_tokens] int32 generated ids.
    """
    params = decoding_params(params, per_layer)
    return decode_program(isinstance(params.layers, tuple))(
        params, cfg, tokens, mask, intervention, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
        stop_pairs=stop_pairs, pad=pad)


def decoding_params(params: Params, per_layer: bool | None = None, dtype: str = "float32") -> Params:
    """`params` laid out for fast decoding: per-layer weight copies (`params.unstack_layers`; the KV cache is then
    per layer too) and, for a tied embedding, a row-major [D, V] LM head.

    Inside the layer scan XLA:CPU copies every layer's weight slice out of the stacked arrays on each decoding step,
    and it reads a transposed [V, D] operand of a few-row matmul at a fraction of the bandwidth; this layout avoids
    both (docs/benchmarks.md). The price is a second copy of the weights while generating. per_layer: default on
    CPU; False keeps the stacked layers. Already prepared params pass through.
    dtype: "float32" (the model's weights), "bfloat16" or "int8" (`refusal_jax.model.quant`) for the matmul weights
    of this decoding copy only.
    """
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"decode dtype must be one of {DECODE_DTYPES}, got {dtype!r}")
    if per_layer is None:
        per_layer = jax.default_backend() == "cpu"
    prepared = isinstance(params.layers, tuple) or not isinstance(params.layers.q, jax.Array) or (
        params.layers.q.dtype != params.embed.dtype)
    if prepared:
        return params
    if per_layer:
        params = _decoding_layout(params)
    elif dtype != "float32":
        params = params.replace(lm_head=unembedding(params))
    return lower_precision(params, dtype) if dtype != "float32" else params


@jax.jit
def _decoding_layout(params: Params) -> Params:
    # One program for all copies; its outputs are row-major buffers, so the transposed embedding is materialized
    # (inside the decoding program XLA would fold the transpose back into the matmul).
    return params.replace(layers=unstack_layers(params.layers), lm_head=unembedding(params))


# XLA:CPU's YNNPACK fusions read a few-row matmul's weights more slowly than its default dot
# (`benchmarks/generate.py --profile`); decoding steps are such matmuls.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def decode_program(per_layer: bool):
    """The jitted generation function; for per-layer params on CPU compiled with `CPU_DECODE_OPTIONS`."""
    options = CPU_DECODE_OPTIONS if per_layer and jax.default_backend() == "cpu" else None
    return jax.jit(_greedy_generate, static_argnames=("cfg", "max_new_tokens", "stop_ids", "stop_pairs", "pad"),
                   compiler_options=options)


def _greedy_generate(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array,
                     intervention: Intervention | None = None, *, max_new_tokens: int,
                     stop_ids: tuple[int, ...] = (), stop_pairs: tuple[tuple[int, int], ...] = (),
                     pad: int = 0) -> jax.Array:
    B, T = tokens.shape
    dtype = params.embed.dtype
    per_layer = isinstance(params.layers, tuple)
    cache = KVCache.init(cfg, B, T + max_new_tokens, dtype, per_layer=per_layer)
    out = forward_unjitted(params, cfg, tokens, mask, intervention, cache, logits="last")
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def cond(state):
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, done, generated = state
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first maximal index, as torch.argmax
        generated = generated.at[:, step].set(jnp.where(done, pad, nxt))
        prev = generated[:, jnp.maximum(step - 1, 0)]
        done = done | jnp.isin(nxt, stops) | ends_pair(prev, nxt, step > 0, stop_pairs)
        out = forward_unjitted(params, cfg, nxt[:, None], jnp.ones((B, 1), jnp.int32), intervention, cache,
                               logits="last")
        return step + 1, out.cache, out.logits, done, generated

    state = (jnp.zeros((), jnp.int32), out.cache, out.logits, jnp.zeros((B,), bool),
             jnp.full((B, max_new_tokens), pad, jnp.int32))
    return jax.lax.while_loop(cond, body, state)[-1]


def ends_pair(prev: jax.Array, nxt: jax.Array, has_prev: jax.Array,
              stop_pairs: tuple[tuple[int, int], ...]) -> jax.Array:
    """[B] bool: (prev, nxt) is one of `stop_pairs` (prev only counts where `has_prev`)."""
    if not stop_pairs:
        return jnp.zeros(nxt.shape, bool)
    first, second = (jnp.asarray(x, jnp.int32) for x in zip(*stop_pairs))
    return has_prev & jnp.any((prev[:, None] == first) & (nxt[:, None] == second), axis=-1)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS and the end-of-turn tokens (`families.END_OF_TURN`) it has as special tokens."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # Only where they are special tokens: in Qwen's BPE vocabulary "</s>" is an ordinary token.
    special = set(getattr(tokenizer, "all_special_tokens", [])) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN if t in vocab and t in special)
    return tuple(sorted(ids))


def token_texts(tokenizer) -> list[str]:
    """Each token id's text as it reads inside a sequence: decoded after an anchor token and with the anchor's text
    removed, so a byte-level "ĊĊ" reads "\n\n" and a sentencepiece "▁`" keeps its leading space (decoded alone,
    sentencepiece drops it)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    head = len(tokenizer.decode(anchor, clean_up_tokenization_spaces=False))
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [t[head:] for t in texts]


def stop_string_tokens(texts: Sequence[str], strings: Sequence[str], max_pairs: int = 1024
                       ) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Where greedy decoding can stop for stop strings, from `token_texts`: (ids, pairs).

    ids: tokens whose text contains a stop string. pairs: (previous, next) tokens that write one across their
    boundary, neither holding it alone (Qwen2.5 closes a code fence with "``" + "`\n\n"). A string whose pairs
    number more than `max_pairs` (e.g. "\n\n": every token ending in a newline before every one starting with
    one) gets none, and strings spread over three or more tokens are not caught: decoding then goes on to the
    token limit or another stop, and callers cut the decoded text at the string anyway.
    """
    strings = [s for s in dict.fromkeys(strings) if s]
    ids = sorted(i for i, t in enumerate(texts) if any(s in t for s in strings))
    pairs: set[tuple[int, int]] = set()
    for s in strings:
        found = set()
        for k in range(1, len(s)):
            ends = [i for i, t in enumerate(texts) if t.endswith(s[:k]) and s not in t]
            starts = [j for j, t in enumerate(texts) if t.startswith(s[k:]) and s not in t]
            if len(found) + len(ends) * len(starts) > max_pairs:
                found = set()
                break
            found.update((i, j) for i in ends for j in starts)
        pairs |= found
    return tuple(ids), tuple(sorted(pairs))


def cut_at_stop(tokens: list[int], stops: Sequence[int], stop_pairs: Sequence[tuple[int, int]] = ()) -> list[int]:
    """`tokens` up to and including the first stop token or the second token of the first stop pair."""
    pairs = set(map(tuple, stop_pairs))
    for i, t in enumerate(tokens):
        if t in stops or (i and (tokens[i - 1], t) in pairs):
            return tokens[:i + 1]
    return tokens


def generate_ids(params: Params, cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                 intervention: Intervention | None = None, *, batch_size: int = 8, max_new_tokens: int = 512,
                 progress: bool = False, desc: str = "generating", leave: bool = True,
                 mesh=None, continuous: bool = True, stats: dict | None = None,
                 decode_dtype: str = "float32", extra_stop_ids: Sequence[int] = (),
                 stop_pairs: Sequence[tuple[int, int]] = (), bucket: int = 16) -> list[list[int]]:
    """Greedy completion token ids of templated prompts (up to and including a stop token), in input order.

    continuous: continuous batching (`refusal_jax.model.continuous`) with `batch_size` slots: a slot whose row stopped
    takes the next prompt. False: static length-bucketed batches, each decoded until its longest row stops (always
    so with a `mesh`); prompts are left-padded to a multiple of `bucket` tokens there (one compiled program per
    padded length). Greedy output is the same either way. stats: filled by the continuous path (see there).
    decode_dtype: the precision of the decoding copy of the matmul weights (`decoding_params`).
    extra_stop_ids: end a sequence as well as the tokenizer's end-of-turn tokens (e.g. a closing code fence).
    stop_pairs: (previous, next) token pairs that end a sequence (a stop string split over two tokens).
    """
    ids = encode(tokenizer, list(prompts))
    pad = pad_id(tokenizer)
    stops = tuple(sorted(set(stop_token_ids(tokenizer)) | {int(i) for i in extra_stop_ids}))
    pairs = tuple(sorted({(int(a), int(b)) for a, b in stop_pairs}))
    params = decoding_params(params, dtype=decode_dtype)  # once for all batches
    if continuous and mesh is None:
        from refusal_jax.model import continuous as cb

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc=desc, unit="prompt", leave=leave)
        try:
            return cb.generate(params, cfg, ids, intervention, slots=min(batch_size, len(ids)),
                               max_new_tokens=max_new_tokens, stop_ids=stops, stop_pairs=pairs, pad=pad, bar=bar,
                               stats=stats)
        finally:
            if bar is not None:
                bar.close()
    out: list[list[int]] = [[] for _ in prompts]
    # long prompts decode in smaller batches within the memory budget (attention over prompt + new tokens)
    forward_cost = ForwardCost.for_model(cfg)
    parallel = dict(mesh.shape).get("data", 1) if mesh is not None else 1
    batches = list(bucketed(ids, batch_size, pad, bucket, cost=lambda b, t: forward_cost(b, t + max_new_tokens),
                            parallel=parallel))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=leave)
    for batch in batches:
        tokens, mask = batch.tokens, batch.mask
        if mesh is not None:  # prompts split over the data axis; the KV cache follows inside jit
            from refusal_jax.model import sharding

            tokens, mask = sharding.shard_batch(tokens, mesh), sharding.shard_batch(mask, mesh)
        gen = to_host(greedy_generate(params, cfg, tokens, mask, intervention,
                                      max_new_tokens=max_new_tokens, stop_ids=stops, stop_pairs=pairs, pad=pad))
        for row, idx in enumerate(batch.index):
            if idx >= 0:
                out[idx] = cut_at_stop(gen[row].tolist(), stops, pairs)
    return out


def generate_completions(params: Params, cfg: ModelConfig, tokenizer, prompts: Sequence[str],
                         intervention: Intervention | None = None, *, batch_size: int = 8,
                         max_new_tokens: int = 512, progress: bool = False, desc: str = "generating",
                         mesh=None, continuous: bool = True, decode_dtype: str = "float32") -> list[str]:
    """Greedy completions (decoded, special tokens skipped, stripped, as the reference) in input order."""
    ids = generate_ids(params, cfg, tokenizer, prompts, intervention, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, progress=progress, desc=desc, mesh=mesh, continuous=continuous,
                       decode_dtype=decode_dtype)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


def generate_sets(params: Params, cfg: ModelConfig, tokenizer,
                  sets: Sequence[tuple[Sequence[str], Intervention | None]], *, batch_size: int = 8,
                  max_new_tokens: int = 512, progress: bool = False, desc: str = "generating", mesh=None,
                  continuous: bool = True, decode_dtype: str = "float32", stats: dict | None = None) -> list[list[str]]:
    """Greedy completions of several sets of templated prompts, each set under its own intervention, as
    `generate_completions` gives them set by set.

    With continuous batching (and no mesh) all sets decode in one pool: every row carries its set's intervention
    (`continuous.generate(variants=...)`), so the slots freed by one set's short completions take the next set's
    prompts instead of each set draining alone. Otherwise the sets run one after the other.
    """
    if not (continuous and mesh is None):
        return [generate_completions(params, cfg, tokenizer, prompts, iv, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, progress=progress, desc=desc, mesh=mesh,
                                     continuous=continuous, decode_dtype=decode_dtype) for prompts, iv in sets]
    from refusal_jax.model import continuous as cb

    prompts = [p for ps, _ in sets for p in ps]
    if not prompts:
        return [[] for _ in sets]
    ids = encode(tokenizer, prompts)
    variants = [v for v, (ps, _) in enumerate(sets) for _ in ps]
    stops = stop_token_ids(tokenizer)
    params = decoding_params(params, dtype=decode_dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=desc, unit="prompt")
    try:
        out = cb.generate(params, cfg, ids, [iv for _, iv in sets], variants=variants,
                          slots=min(batch_size, len(ids)), max_new_tokens=max_new_tokens, stop_ids=stops,
                          pad=pad_id(tokenizer), bar=bar, stats=stats)
    finally:
        if bar is not None:
            bar.close()
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
    result, start = [], 0
    for ps, _ in sets:
        result.append(texts[start:start + len(ps)])
        start += len(ps)
    return result

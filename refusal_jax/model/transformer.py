"""The functional transformer forward pass, with residual-stream capture and intervention sites.

`forward(params, cfg, tokens, ...)` is a pure function of the parameter pytree and the token ids. Every decoder
block has three intervention sites, each the exact tensor that enters or is added to the residual stream:

  resid_pre[l]  the input of block l (the reference's forward pre-hook site; at l=0 the scaled embedding)
  attn_out[l]   what the attention sub-block adds to the residual (after Gemma-2/3's post-norm)
  mlp_out[l]    what the MLP sub-block adds to the residual (after Gemma-2/3's post-norm)

Interventions are data (`Intervention`, a pytree of arrays), never Python control flow, so a sweep over
directions, layers or coefficients reuses one compiled program. Axis letters: see `refusal_jax.model.params`.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from refusal_jax.model.config import ModelConfig, RopeConfig
from refusal_jax.model.params import LayerParams, Params, unembedding
from refusal_jax.model.quant import matmul

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_final")
LOGITS_MODES = ("all", "last", "none")
_MASK_VALUE = -1e30  # finite, so a fully masked (pad) query row gives a uniform softmax instead of NaN


@struct.dataclass
class Intervention:
    """What to do to the residual stream, as traced data.

    ablate_basis:  [R, D] orthonormal rows (R=1: the unit refusal direction r̂). At every layer l with
                   ablate_layers[l] != 0, resid_pre, attn_out and mlp_out lose their component in the span:
                   x <- x - (x Bᵀ) B. Zero rows are no-ops.
    ablate_layers: [L] 0/1 mask of layers where ablation applies (all ones = the paper's ablation).
    add_direction: [D] the raw (unnormalised) direction r for activation addition.
    add_coeffs:    [L] coefficient per layer; resid_pre[l] <- resid_pre[l] + add_coeffs[l] * r.
    """

    ablate_basis: jax.Array
    ablate_layers: jax.Array
    add_direction: jax.Array
    add_coeffs: jax.Array

    @classmethod
    def none(cls, cfg: ModelConfig, rank: int = 1, dtype=jnp.float32) -> "Intervention":
        return cls(
            ablate_basis=jnp.zeros((rank, cfg.d_model), dtype),
            ablate_layers=jnp.zeros((cfg.n_layers,), dtype),
            add_direction=jnp.zeros((cfg.d_model,), dtype),
            add_coeffs=jnp.zeros((cfg.n_layers,), dtype),
        )

    @classmethod
    def ablation(cls, cfg: ModelConfig, direction, eps: float = 1e-8) -> "Intervention":
        """Directional ablation of `direction` ([D], or [R, D] orthonormal rows) at every layer.

        A single direction is normalised as the reference does, r / (‖r‖ + 1e-8), so a zero vector is a no-op.
        """
        direction = jnp.asarray(direction, jnp.float32)
        basis = direction[None] if direction.ndim == 1 else direction
        if direction.ndim == 1:
            basis = basis / (jnp.linalg.norm(basis, axis=-1, keepdims=True) + eps)
        none = cls.none(cfg, rank=basis.shape[0])
        return none.replace(ablate_basis=basis, ablate_layers=jnp.ones((cfg.n_layers,), jnp.float32))

    @classmethod
    def addition(cls, cfg: ModelConfig, direction, layer, coeff=1.0) -> "Intervention":
        """Activation addition of coeff * direction (raw, not normalised) at resid_pre of `layer` (may be traced)."""
        direction = jnp.asarray(direction, jnp.float32)
        coeffs = jnp.where(jnp.arange(cfg.n_layers) == layer, jnp.asarray(coeff, jnp.float32), 0.0)
        return cls.none(cfg).replace(add_direction=direction, add_coeffs=coeffs)


@struct.dataclass
class KVCache:
    """Key/value cache of fixed capacity S. Slot s of sequence b holds a real token iff mask[b, s].

    k and v are stacked [L, B, S, K, H] for the layer scan, or tuples of L arrays [B, S, K, H] (`per_layer`) for
    per-layer weights (`params.unstack_layers`), so that no step rewrites the whole stacked cache.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array  # [B, S] bool
    lengths: jax.Array  # [B] int32: real tokens so far (the next token's RoPE position)
    index: jax.Array  # [] int32: next slot to write; or [B], each row's own (continuous batching)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32, *,
             per_layer: bool = False) -> "KVCache":
        shape = (batch, capacity, cfg.n_kv_heads, cfg.head_dim)

        def zeros():  # k and v must be distinct buffers (both are donated)
            if per_layer:
                return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
            return jnp.zeros((cfg.n_layers, *shape), dtype)

        return cls(
            k=zeros(),
            v=zeros(),
            mask=jnp.zeros((batch, capacity), bool),
            lengths=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


@struct.dataclass
class Output:
    """Forward-pass results; fields not requested are None.

    logits:      [B, T, V] ("all"), [B, V] ("last"), None ("none"); float32.
    resid_pre:   [L, B, T', D] input of every block (T' = capture_last or T).
    attn_out:    [L, B, T', D]; mlp_out: [L, B, T', D].
    resid_final: [B, T', D] the residual after the last block, before the final norm.
    cache:       the updated KVCache when one was passed.
    """

    logits: jax.Array | None = None
    resid_pre: jax.Array | None = None
    attn_out: jax.Array | None = None
    mlp_out: jax.Array | None = None
    resid_final: jax.Array | None = None
    cache: KVCache | None = None


# --------------------------------------------------------------------------------------------------
# building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, weight_in_float32: bool = True) -> jax.Array:
    """HF-exact RMSNorm; statistics in float32. The two conventions differ only below float32:

    weight_in_float32=True   Gemma: (normed * weight) in float32, then cast to x.dtype (`weight` holds the folded
                             1 + w, which should itself be float32 for bit parity).
    weight_in_float32=False  Llama/Mistral/Qwen: normed cast to x.dtype first, then times weight in x.dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_in_float32:
        return (weight.astype(jnp.float32) * normed).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def apply_norm(cfg: ModelConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    """The RMSNorm convention of cfg's family (Gemma and OLMo-2/3: float32 weight product)."""
    return rms_norm(x, weight, cfg.rms_norm_eps, weight_in_float32=cfg.norm_offset or cfg.family in ("olmo2", "olmo3"))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """[H/2] inverse frequencies, computed like transformers' rope initialisers (float32)."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.rope_type == "yarn":  # transformers' _compute_yarn_parameters (torch float32 arithmetic)
        base, dim, old = rope.theta, head_dim, rope.original_max_position_embeddings

        def correction_dim(rotations):
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        pos = (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)).astype(np.float32)
        inv = ((1.0 / (np.float32(rope.factor) * pos)) * (1 - extrapolation)
               + (1.0 / pos) * extrapolation).astype(np.float32)
    return inv


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, H] for integer positions [B, T] (rotate-half layout)."""
    inv = jnp.asarray(rope_inv_freq(rope, head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if rope.attention_factor != 1.0:  # YaRN scales cos and sin
        return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, *, H]; cos/sin: [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin



def _residual_write(cfg, out, post_norm, basis, ablate_on, offsets, site: int):
    """What a sublayer adds to the residual stream: its output (post-normed for Gemma-2/3), directionally ablated
    where the intervention says so, plus the probe offset of `site` (screening's gradients) when given."""
    if cfg.post_norms:
        out = apply_norm(cfg, out, post_norm)
    if cfg.residual_multiplier != 1.0:  # Granite
        out = out * jnp.asarray(cfg.residual_multiplier, out.dtype)
    out = _ablate(out, basis, ablate_on)
    return out if offsets is None else out + offsets[site]

def _ablate(x: jax.Array, basis: jax.Array, on: jax.Array) -> jax.Array:
    """x - on * (x Bᵀ) B, for x [..., D] and basis [R, D]."""
    basis = basis.astype(x.dtype)
    coords = jnp.einsum("...d,rd->...r", x, basis)
    return x - on.astype(x.dtype) * jnp.einsum("...r,rd->...d", coords, basis)


def _write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """new [B, T, K, H] into cache [B, S, K, H] at slot `index`: a scalar, or one slot per row ([B], continuous
    batching, where every row is at its own place in its sequence)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index, 0, 0))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(cache, new, index)


def _attention(lp: LayerParams, cfg: ModelConfig, h, cos, sin, k_cache, v_cache, key_ok, write_index):
    """Grouped-query attention for one layer. h: [B, T, D]; key_ok: [B, T, S] bool; caches [B, S, K, H] or None.

    Returns (attention output [B, T, D] before any post-norm, new k cache, new v cache).
    """
    B, T, _ = h.shape
    K, G, H = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q = matmul("btd,dnh->btnh", h, lp.q)
    k = matmul("btd,dkh->btkh", h, lp.k)
    v = matmul("btd,dkh->btkh", h, lp.v)
    if lp.q_bias is not None:
        q, k, v = q + lp.q_bias, k + lp.k_bias, v + lp.v_bias
    if lp.q_norm is not None:
        q = apply_norm(cfg, q, lp.q_norm)
        k = apply_norm(cfg, k, lp.k_norm)
    if lp.q_heads_norm is not None:  # OLMoE: one RMSNorm over all heads together
        q = apply_norm(cfg, q.reshape(B, T, -1), lp.q_heads_norm.reshape(-1)).reshape(q.shape)
        k = apply_norm(cfg, k.reshape(B, T, -1), lp.k_heads_norm.reshape(-1)).reshape(k.shape)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if k_cache is not None:
        k, v = _write_cache(k_cache, k, write_index), _write_cache(v_cache, v, write_index)
    q = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(q.dtype)).astype(jnp.float32) * cfg.q_scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(key_ok[:, None, None, :, :], scores, _MASK_VALUE)
    if lp.sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
    else:  # gpt-oss: each head's sink logit is one more softmax column, dropped after the softmax
        sink = jnp.broadcast_to(lp.sinks.reshape(K, G).astype(jnp.float32)[None, :, :, None, None],
                                (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1].astype(h.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(h.dtype))
    # Heads flattened on both sides (E = N*H): with [B, T, N, H] XLA:CPU may transpose the whole o weight to
    # match the activation's layout on every call, instead of the small activation.
    o = lp.o.reshape(cfg.n_heads * H, -1)
    out = matmul("bte,ed->btd", out.reshape(B, T, cfg.n_heads * H), o)
    if lp.o_bias is not None:
        out = out + lp.o_bias.astype(out.dtype)
    return out, k, v


def _mlp(lp: LayerParams, cfg: ModelConfig, h):
    gate = matmul("btd,df->btf", h, lp.gate)
    up = matmul("btd,df->btf", h, lp.up)
    act = jax.nn.silu(gate) if cfg.mlp_activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return matmul("btf,fd->btd", act * up, lp.down)


def _mlp_block(lp: LayerParams, cfg: ModelConfig, h):
    """What the MLP sub-block computes (before any post-norm): the dense MLP, or the routed experts plus any
    shared expert."""
    if not cfg.moe:
        return _mlp(lp, cfg, h)
    B, T, D = h.shape
    weights, experts = route(lp.router, cfg, h, lp.router_bias)
    x, weights, experts = h.reshape(B * T, D), weights.reshape(B * T, -1), experts.reshape(B * T, -1)
    G = cfg.expert_groups
    if G == 1:
        out = moe_experts(lp, cfg, x, weights, experts)
    else:  # expert parallelism: group g holds experts g*E/G.. (one shard of the "experts" axis), partial sums added
        fields = [f for f in EXPERT_FIELDS if getattr(lp, f) is not None]
        grouped = {f: getattr(lp, f).reshape(G, -1, *getattr(lp, f).shape[1:]) for f in fields}
        offsets = jnp.arange(G) * (cfg.n_experts // G)
        out = jax.vmap(lambda w, off: moe_experts(lp.replace(**w), cfg, x, weights, experts, off))(
            grouped, offsets).sum(0)
    out = out.reshape(B, T, D)
    if cfg.shared_expert:  # Qwen2-MoE: the shared expert, scaled by a sigmoid gate of its own
        gate = jax.nn.sigmoid(jnp.einsum("btd,d->bt", h, lp.shared_gate.astype(h.dtype)))
        out = out + gate[..., None] * _mlp(lp, cfg, h)
    return out


# --------------------------------------------------------------------------------------------------
# mixture of experts


# the per-expert weights (leading axis E after the layer axis), split over the "experts" axis
EXPERT_FIELDS = ("expert_gate", "expert_up", "expert_down", "expert_gate_up", "expert_gate_up_bias",
                 "expert_down_bias")


def route(router: jax.Array, cfg: ModelConfig, h: jax.Array, bias: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """The router's choice for h [..., D]: (weights [..., k] in h's dtype, expert ids [..., k] int32), as
    transformers computes it: softmax over all experts in float32, the top k, optionally renormalised."""
    logits = jnp.einsum("...d,de->...e", h, router.astype(h.dtype))
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top_e = jax.lax.top_k(probs, cfg.n_experts_per_tok)
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return top_p.astype(h.dtype), top_e.astype(jnp.int32)


def _expert_weights(lp: LayerParams, e=None) -> tuple:
    """The expert weights (gate, up, gate_up, gate_up_bias, down, down_bias; absent ones None), of expert e (a
    traced index) or of all experts (leading E axis)."""
    names = ("expert_gate", "expert_up", "expert_gate_up", "expert_gate_up_bias", "expert_down", "expert_down_bias")
    return tuple(None if getattr(lp, n) is None else getattr(lp, n) if e is None else getattr(lp, n)[e]
                 for n in names)


def _swiglu_experts(cfg: ModelConfig, x: jax.Array, w: tuple) -> jax.Array:
    """Rows x [..., b, D] through the experts whose weights are w (`_expert_weights`: one expert, x [b, D]; or all
    experts at once, x [E, b, D])."""
    gate_w, up_w, gate_up_w, gate_up_b, down_w, down_b = w
    if gate_up_w is not None:  # gpt-oss: gate and up interleaved in one matmul, with biases
        gate_up = jnp.einsum("...bd,...dy->...by", x, gate_up_w.astype(x.dtype))
        if gate_up_b is not None:
            gate_up = gate_up + gate_up_b[..., None, :].astype(x.dtype)
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate = jnp.einsum("...bd,...dx->...bx", x, gate_w.astype(x.dtype))
        up = jnp.einsum("...bd,...dx->...bx", x, up_w.astype(x.dtype))
    if cfg.swiglu_limit is not None:  # gpt-oss's clamped SwiGLU
        gate = jnp.minimum(gate, cfg.swiglu_limit)
        up = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
        act = (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))
    else:
        act = jax.nn.silu(gate) * up
    out = jnp.einsum("...bx,...xd->...bd", act, down_w.astype(x.dtype))
    if down_b is not None:
        out = out + down_b[..., None, :].astype(x.dtype)
    return out


def expert_block_rows(n_tokens: int, cfg: ModelConfig) -> int:
    """Rows per block of the overflow pass (`moe_experts`): the mean rows per expert rounded up to a power of
    two, 8..128 (fewer, larger blocks beat less padding on XLA:CPU, where each block copies its expert's weights)."""
    mean = max(1, -(-n_tokens * cfg.n_experts_per_tok // cfg.n_experts))  # with expert_groups: per group, the same
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def expert_capacity(n_tokens: int, cfg: ModelConfig) -> int:
    """Rows per expert of the batched pass of `moe_experts`: 1.25 x the mean rows per expert (a multiple of 8),
    or 0 (no batched pass) below 16 rows per expert, where reading every expert's weights would cost more than
    the rows."""
    mean = n_tokens * cfg.n_experts_per_tok / cfg.n_experts
    return 0 if mean < 16 else int(-(-int(1.25 * mean) // 8) * 8)


def moe_experts(lp: LayerParams, cfg: ModelConfig, x: jax.Array, weights: jax.Array, experts: jax.Array,
                expert_offset: int | jax.Array = 0, *, capacity: int | None = None) -> jax.Array:
    """sum_k weights[n, k] * expert[experts[n, k]](x[n]) for x [N, D]: grouped matmuls compiled once per shape.

    The A = N*k (token, expert) assignments are sorted by expert. The first C rows of each expert (C =
    `expert_capacity`, about 1.25 x the mean) go through one batched [E, C, D] x [E, D, X] SwiGLU; the rows
    beyond an expert's capacity (all rows when C = 0, i.e. few tokens) are padded per expert to whole blocks of b
    rows (`expert_block_rows`) and a scan over the blocks (a static bound of A/b + min(E, A)) runs one
    [b, D] x [D, X] SwiGLU per block with that block's expert's weights, skipping empty blocks. Exact for any
    routing; FLOPs: the A chosen rows plus the padding (the empty capacity slots, < b rows per overflowing
    expert), never the E/k-fold cost of running every expert on every token; memory: [E*C + A + E*b, D] rows.

    With `expert_offset` (expert parallelism) the weights hold experts offset..offset+E_local-1 only and
    assignments to other experts contribute nothing here.
    """
    N, D = x.shape
    E_local = lp.expert_down.shape[0]
    k = experts.shape[1]
    A = N * k
    C = expert_capacity(N, cfg) if capacity is None else capacity
    local = experts.reshape(A) - expert_offset
    mine = (local >= 0) & (local < E_local)
    local = jnp.where(mine, local, E_local)  # other experts' assignments: sorted last, never computed
    order = jnp.argsort(local, stable=True)
    sorted_e = local[order]
    sizes = jnp.bincount(local, length=E_local + 1)[:E_local]
    start = jnp.cumsum(sizes) - sizes
    e_clip = jnp.minimum(sorted_e, E_local - 1)
    rank = jnp.arange(A) - start[e_clip]  # position of each sorted assignment within its expert's group
    x_pad = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])  # row N: the padding rows' input
    w_pad = jnp.concatenate([weights.reshape(A), jnp.zeros((1,), weights.dtype)])
    out = jnp.zeros((N + 1, D), x.dtype)

    if C:  # batched pass over every expert's first C rows
        slot = jnp.where((sorted_e < E_local) & (rank < C), e_clip * C + rank, E_local * C)
        src = jnp.full((E_local * C,), A, jnp.int32).at[slot].set(order.astype(jnp.int32), mode="drop")
        rows = _swiglu_experts(cfg, x_pad[src // k].reshape(E_local, C, D), _expert_weights(lp))
        out = out.at[src // k].add(rows.reshape(E_local * C, D) * w_pad[src][:, None])

    # block pass over the rows beyond each expert's capacity
    b = 8 if C else expert_block_rows(N, cfg)
    over = jnp.maximum(sizes - C, 0)
    padded = (over + b - 1) // b * b
    padded_end = jnp.cumsum(padded)
    dest = jnp.where((sorted_e < E_local) & (rank >= C), (padded_end - padded)[e_clip] + rank - C, -1)
    max_over = A - C if C else A  # a static bound on the overflow rows (an expert holds at most N of them)
    n_blocks = -(-(max(max_over, 0) + min(E_local, A) * (b - 1)) // b)
    P = n_blocks * b
    row_src = jnp.full((P,), A, jnp.int32).at[jnp.where(dest >= 0, dest, P)].set(order.astype(jnp.int32),
                                                                                   mode="drop")
    rows = x_pad[row_src // k].reshape(n_blocks, b, D)
    first = jnp.arange(n_blocks) * b
    block_e = jnp.minimum(jnp.searchsorted(padded_end, first, side="right"), E_local - 1)
    used = first < padded_end[-1]

    def block(_, xs):
        xb, e, on = xs
        return None, jax.lax.cond(on, lambda v: _swiglu_experts(cfg, v, _expert_weights(lp, e)), jnp.zeros_like, xb)

    _, blocks = jax.lax.scan(block, None, (rows, block_e, used))
    out = out.at[row_src // k].add(blocks.reshape(P, D) * w_pad[row_src][:, None])
    return out[:N]


# --------------------------------------------------------------------------------------------------
# the forward pass


def forward_unjitted(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    intervention: Intervention | None = None,
    cache: KVCache | None = None,
    *,
    capture: tuple[str, ...] = (),
    capture_last: int | None = None,
    logits: str = "all",
    resume: tuple[jax.Array, jax.Array] | None = None,
    probe: jax.Array | None = None,
) -> Output:
    """`forward` without its jit: for callers that trace it inside their own jitted function (the arguments
    and result are `forward`'s)."""
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
    unknown = set(capture) - set(SITES)
    if unknown:
        raise ValueError(f"unknown capture sites {sorted(unknown)}; choose from {SITES}")
    B, T = tokens.shape
    chex.assert_rank(tokens, 2)
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    chex.assert_shape(attention_mask, (B, T))
    chex.assert_shape(params.embed, (cfg.vocab_size, cfg.d_model))
    per_layer = isinstance(params.layers, tuple)  # per-layer weights: the layer loop is written out, not scanned
    if per_layer and len(params.layers) != cfg.n_layers:
        raise ValueError(f"params have {len(params.layers)} per-layer weight sets, the config {cfg.n_layers} layers")
    if cache is not None and isinstance(cache.k, tuple) != per_layer:
        raise ValueError("a per-layer KVCache (KVCache.init(per_layer=True)) goes with per-layer params "
                         "(params.unstack_layers) and a stacked one with stacked params")
    if intervention is None:
        intervention = Intervention.none(cfg)
    chex.assert_shape(intervention.ablate_layers, (cfg.n_layers,))
    chex.assert_shape(intervention.add_coeffs, (cfg.n_layers,))
    chex.assert_shape(intervention.add_direction, (cfg.d_model,))
    chex.assert_shape(intervention.ablate_basis, (None, cfg.d_model))
    mask = attention_mask.astype(bool)

    # Slots: without a cache, keys are this call's tokens (S = T, slots 0..T-1). With a cache, the T new tokens
    # go to slots index..index+T-1 and attend to every real slot at or before their own.
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_mask = mask
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        S = T
    else:
        index = cache.index  # [] shared by all rows, or [B] one per row (continuous batching)
        key_mask = _write_cache(cache.mask[:, :, None, None], mask[:, :, None, None], index)[:, :, 0, 0]
        positions = cache.lengths[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        S = cache.mask.shape[1]
    q_slot = jnp.atleast_2d(index[..., None] + jnp.arange(T))  # [1, T] or [B, T]
    k_slot = jnp.arange(S)
    causal = k_slot[None, None, :] <= q_slot[:, :, None]  # [1 or B, T, S]
    key_ok = causal & key_mask[:, None, :]  # [B, T, S]
    if cfg.sliding_window:
        key_ok_local = key_ok & ((q_slot[:, :, None] - k_slot[None, None, :]) < cfg.sliding_window)
    else:
        key_ok_local = key_ok

    cos, sin = rope_tables(cfg.rope, cfg.head_dim, positions)
    cos_l, sin_l = rope_tables(cfg.rope_local, cfg.head_dim, positions) if cfg.rope_local else (cos, sin)

    if resume is None:
        x = params.embed[tokens]
        if cfg.embed_scale:
            # HF multiplies by sqrt(d_model) held as a float32 tensor and then rounded to the activation dtype.
            x = x * jnp.asarray(np.float32(cfg.d_model**0.5), x.dtype)
        if cfg.embed_multiplier != 1.0:  # Granite
            x = x * jnp.asarray(cfg.embed_multiplier, x.dtype)
    else:
        x, start_layer = resume
    chex.assert_shape(x, (B, T, cfg.d_model))
    dtype = x.dtype
    sl = (lambda a: a[:, -capture_last:]) if capture_last else (lambda a: a)
    basis = intervention.ablate_basis

    def block(x, layer):
        lp, sliding, ablate_on, add_coeff, k_cache, v_cache, idx, offsets = layer
        if not all(cfg.rope_layers):  # SmolLM3: this layer's flag rides along with `sliding`
            sliding = (sliding, jnp.asarray(cfg.rope_layers, bool)[idx])
        if resume is None:
            return layer_fn(x, lp, sliding, ablate_on, add_coeff, k_cache, v_cache, offsets)
        # Resuming from a saved resid_pre[start_layer]: the layers below it are skipped, not recomputed. The
        # predicate is not batched under vmap over interventions, so this stays a real branch.
        run = functools.partial(layer_fn, lp=lp, sliding=sliding, ablate_on=ablate_on, add_coeff=add_coeff,
                                k_cache=k_cache, v_cache=v_cache, offsets=offsets)
        shapes = jax.eval_shape(run, x)
        skip = lambda x: (x, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[1]))  # noqa: E731
        return jax.lax.cond(idx >= start_layer, run, skip, x)

    def layer_fn(x, lp, sliding, ablate_on, add_coeff, k_cache, v_cache, offsets):
        x = x + (add_coeff * intervention.add_direction).astype(dtype)
        x = _ablate(x, basis, ablate_on)
        if offsets is not None:  # [3, B, T, D] probe offsets: the gradient w.r.t. them is the gradient at the sites
            x = x + offsets[0]
        resid_pre = x
        sliding, use_rope = sliding if isinstance(sliding, tuple) else (sliding, True)
        ok = jnp.where(sliding, key_ok_local, key_ok)
        c, s = jnp.where(sliding, cos_l, cos), jnp.where(sliding, sin_l, sin)
        c, s = jnp.where(use_rope, c, 1.0), jnp.where(use_rope, s, 0.0)  # no RoPE: the identity rotation
        attn, k_new, v_new = _attention(
            lp, cfg, x if lp.attn_norm is None else apply_norm(cfg, x, lp.attn_norm), c, s, k_cache, v_cache, ok,
            index)
        attn = _residual_write(cfg, attn, lp.post_attn_norm, basis, ablate_on, offsets, 1)
        x = x + attn
        h = x if lp.mlp_norm is None else apply_norm(cfg, x, lp.mlp_norm)
        mlp = _residual_write(cfg, _mlp_block(lp, cfg, h), lp.post_mlp_norm, basis,
                              ablate_on, offsets, 2)
        x = x + mlp
        saved = {
            "resid_pre": sl(resid_pre) if "resid_pre" in capture else None,
            "attn_out": sl(attn) if "attn_out" in capture else None,
            "mlp_out": sl(mlp) if "mlp_out" in capture else None,
        }
        kv = (k_new, v_new) if cache is not None else (None, None)
        return x, (saved, kv)

    xs = (
        params.layers,
        jnp.asarray(cfg.sliding_layers, bool),
        intervention.ablate_layers,
        intervention.add_coeffs,
        cache.k if cache is not None else None,
        cache.v if cache is not None else None,
        jnp.arange(cfg.n_layers),
        probe,
    )
    with jax.named_scope("decoder_blocks"):
        x, (saved, (k_all, v_all)) = (_layer_loop if per_layer else jax.lax.scan)(block, x, xs)

    out_logits = None
    if logits != "none":
        out_logits = lm_head(params, cfg, x[:, -1:] if logits == "last" else x)
        if logits == "last":
            out_logits = out_logits[:, 0]

    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=k_all, v=v_all, mask=key_mask, lengths=cache.lengths + mask.sum(1).astype(jnp.int32),
                            index=index + T)
    return Output(
        logits=out_logits,
        resid_pre=saved["resid_pre"],
        attn_out=saved["attn_out"],
        mlp_out=saved["mlp_out"],
        resid_final=sl(x) if "resid_final" in capture else None,
        cache=new_cache,
    )


def lm_head(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of residuals after the last block x [B, T, D]: the final norm, the unembedding, and
    the family's final softcap (Gemma-2) and logits scaling (Granite), applied here and nowhere else."""
    logits = matmul("btd,dv->btv", apply_norm(cfg, x, params.final_norm), unembedding(params)).astype(jnp.float32)
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    if cfg.logits_scaling != 1.0:  # Granite
        logits = logits / cfg.logits_scaling
    return logits


def _layer_loop(block, x, xs):
    """`lax.scan(block, x, xs)` written out over per-layer weights (a tuple); per-layer KV caches stay a tuple."""
    layers, *per_layer_xs = xs
    ys = []
    for i, lp in enumerate(layers):
        x, y = block(x, (lp, *(None if a is None else a[i] for a in per_layer_xs)))
        ys.append(y)
    saved = jax.tree.map(lambda *a: jnp.stack(a), *(s for s, _ in ys))
    k, v = (None, None) if ys[0][1][0] is None else (tuple(kv[0] for _, kv in ys), tuple(kv[1] for _, kv in ys))
    return x, (saved, (k, v))


forward = jax.jit(forward_unjitted, static_argnames=("cfg", "capture", "capture_last", "logits"))
forward.__doc__ = """Run the model.

Args:
  params: the parameter pytree (`refusal_jax.model.params.Params`).
  cfg: the static ModelConfig.
  tokens: [B, T] int token ids, left-padded.
  attention_mask: [B, T] 1 for real tokens, 0 for padding (default all ones). RoPE positions count real tokens
    only, as transformers' generate() does.
  intervention: an `Intervention` (traced: changing its values never recompiles). None = no intervention.
  cache: a `KVCache` to read from and write the new tokens into (generation); the updated cache is returned.
  capture: sites to return, a tuple from ("resid_pre", "attn_out", "mlp_out", "resid_final").
  capture_last: keep only the last n positions of captured activations (the post-instruction tokens).
  logits: "all" positions, only the "last", or "none" (skips the LM head entirely).
  resume: (resid_pre [B, T, D], layer) to start at block `layer` from a saved input instead of the embedding;
    blocks below are skipped (activation-addition sweeps reuse the unmodified residual below the added layer).
  probe: [L, 3, B, T, D] offsets added to resid_pre, attn_out and mlp_out of every layer, after any ablation;
    zeros leave the output unchanged, and the gradient w.r.t. them is the gradient at the three sites
    (refusal_jax.method.screening).
Returns:
  Output with the requested fields.
"""

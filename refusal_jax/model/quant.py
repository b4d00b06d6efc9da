"""Low-precision copies of the matmul weights for decoding (`generate.decoding_params(..., dtype=...)`).

  bfloat16  weights stored in bfloat16; each matmul rounds its input activation to bfloat16 and accumulates in
            float32 (activations, norms, residual stream and KV cache stay float32).
  int8      weight-only quantization, symmetric, one float32 scale per output channel: w ≈ q * scale with
            scale = max|w| / 127 over the contracted axes, so (x @ q) * scale = x @ (q * scale) exactly.

Only the decoding copy of the weights changes; the forward passes that compute scores, directions and statistics
keep the model's own weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DECODE_DTYPES = ("float32", "bfloat16", "int8")


@struct.dataclass
class Int8Weight:
    """q: int8 weights in the layout of the float weight; scale: float32 over its output (trailing, uncontracted)
    axes, e.g. [F] for a [D, F] matrix, [N, H] for a [D, N, H] projection."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    def reshape(self, *shape):
        """Reshape the contracted (leading) axes; the output axes must stay the trailing ones, as the scale's."""
        return self.replace(q=self.q.reshape(*shape))

    def dequantize(self) -> jax.Array:
        return self.q.astype(jnp.float32) * self.scale


@functools.partial(jax.jit, static_argnames=("contracted", "stacked"))
def quantize_int8(w: jax.Array, contracted: int = 1, stacked: bool = False) -> Int8Weight:
    """Symmetric per-output-channel int8 of `w`, whose first `contracted` axes (after a leading layer axis if
    `stacked`) are summed over by its matmul."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(int(stacked), int(stacked) + contracted))
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q=q, scale=jnp.squeeze(scale, axis=axes))


def matmul(spec: str, x: jax.Array, w) -> jax.Array:
    """einsum(spec, x, w) for a float, bfloat16-decoding or `Int8Weight` w; the result in x's dtype."""
    if isinstance(w, Int8Weight):
        return (jnp.einsum(spec, x, w.q.astype(x.dtype)) * w.scale.astype(x.dtype)).astype(x.dtype)
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32:
        return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, x, w.astype(x.dtype))


# matmul weights of a layer and how many of their leading axes the matmul contracts
LAYER_MATMULS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def lower_precision(params, dtype: str):
    """`params` (with a [D, V] `lm_head`) with every matmul weight in `dtype`; embedding, norms, biases unchanged."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"decode dtype must be one of {DECODE_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return params
    per_layer = isinstance(params.layers, tuple)

    def convert(w, contracted, stacked):
        if dtype == "bfloat16":
            return w.astype(jnp.bfloat16)
        return quantize_int8(w, contracted, stacked)

    def layer(lp, stacked):
        return lp.replace(**{name: convert(getattr(lp, name), n, stacked) for name, n in LAYER_MATMULS.items()
                             if getattr(lp, name) is not None})  # an MoE model without a shared expert: no MLP

    layers = tuple(layer(lp, False) for lp in params.layers) if per_layer else layer(params.layers, True)
    return params.replace(layers=layers, lm_head=convert(params.lm_head, 1, False))


def numpy_int8(w: np.ndarray, contracted: int = 1):
    """Reference quantization in numpy: (q, scale) per output channel."""
    axes = tuple(range(contracted))
    scale = np.abs(w).max(axis=axes, keepdims=True).astype(np.float32) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axes)

"""gpt-oss's MXFP4 release, dequantized on load.

The experts' weights of the released gpt-oss checkpoints are stored as MXFP4 (OCP microscaling): for each
"X" in {gate_up_proj, down_proj}, a `X_blocks` tensor uint8 [E, rows, G, 16] holds two 4-bit E2M1 values per byte
(low nibble first) and `X_scales` uint8 [E, rows, G] one power-of-two exponent (biased by 127) per block of 32
values along the input axis. Dequantized, value = E2M1[nibble] * 2^(scale - 127), laid out [E, rows, G*32] and
transposed to the bf16 checkpoint's [E, in, out] layout, exactly as transformers'
`integrations.mxfp4.convert_moe_packed_tensors` does. Everything else in the checkpoint is unquantized.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from refusal_jax.errors import CheckpointError

# E2M1 code -> value (sign bit 3, exponent bits 2-1, mantissa bit 0)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
SUFFIXES = ("_blocks", "_scales")


def check_quantization(hf: dict, family: str) -> bool:
    """True when the config declares the MXFP4 release (gpt-oss only); ConfigError-free: other methods are refused
    by `config.from_hf_config`."""
    q = hf.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4" and family == "gpt_oss"


def dequantize(name: str, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [E, G*32, rows] from blocks uint8 [E, rows, G, 16] and scales uint8 [E, rows, G]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"MXFP4 tensor {name}: blocks and scales must be uint8, got {blocks.dtype} / "
                              f"{scales.dtype}")
    if blocks.ndim != 4 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 tensor {name}: blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                              "do not pair up as [E, rows, G, 16] / [E, rows, G]")
    E, rows, G, B = blocks.shape
    out = np.empty((E, G * 2 * B, rows), np.float32)
    for e in range(E):  # one expert at a time: the temporaries stay one expert's size
        blk = np.asarray(blocks[e])
        vals = np.empty((rows, G, 2 * B), np.float32)
        vals[..., 0::2] = FP4_VALUES[blk & 0x0F]
        vals[..., 1::2] = FP4_VALUES[blk >> 4]
        vals = np.ldexp(vals, np.asarray(scales[e]).astype(np.int32)[..., None] - 127)
        out[e] = vals.reshape(rows, G * 2 * B).T
    return out


def dequantized(tensors: Iterable[tuple[str, np.ndarray]], source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs with every `X_blocks` / `X_scales` pair replaced by (X, its float32 dequantization);
    other tensors pass through. A blocks tensor without its scales (or the reverse) is a CheckpointError."""
    pending: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in tensors:
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, array
            continue
        base = name[: -len(suffix)]
        if base not in pending:
            pending[base] = (suffix, array)
            continue
        other_suffix, other = pending.pop(base)
        if other_suffix == suffix:
            raise CheckpointError(f"{source}: tensor {name} appears more than once")
        blocks, scales = (array, other) if suffix == "_blocks" else (other, array)
        yield base, dequantize(base, blocks, scales)
    if pending:
        base, (suffix, _) = next(iter(pending.items()))
        missing = "_scales" if suffix == "_blocks" else "_blocks"
        raise CheckpointError(f"{source}: MXFP4 tensor {base}{suffix} has no {base}{missing}")

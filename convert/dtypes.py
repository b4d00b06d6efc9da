"""Narrowing casts that never turn a finite weight into infinity without a word.

float16 holds magnitudes up to 65504 (values from 65520 on round to inf); bfloat16 has float32's range but rounds
the largest float32 values up to inf. A converted or exported model with an inf weight gives NaN logits far from
the cause, so every write that narrows the dtype (convert --dtype, export_hf / orthogonalize --dtype, export_gguf's
F16 tensors) goes through `check_fits` / `cast`, which refuse with the tensor's name and its largest |value|.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from refusal_jax.errors import CheckpointError

# GGUF tensor types stored as a narrower float (quantized types: see docs/file-safety.md)
GGUF_FLOAT = {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def _largest(dtype) -> float | None:
    """The largest finite value of a floating dtype (bfloat16 included), None for other dtypes."""
    try:
        return float(ml_dtypes.finfo(dtype).max)
    except (ValueError, TypeError):
        return None


def check_fits(value: np.ndarray, dtype, name: str, source: str | None = None) -> np.ndarray:
    """`value` unchanged, after checking that casting it to `dtype` makes no finite element infinite.

    Casting rounds monotonically, so only the extremes are cast: two passes over `value`, no temporary array;
    nothing at all when `dtype` holds every value of `value.dtype`.
    Raises:
      CheckpointError: naming the tensor, its largest |value| and the dtype's largest finite value.
    """
    dtype = np.dtype(dtype)
    target, current = _largest(dtype), _largest(value.dtype)
    if value.size == 0 or target is None or current is None or target >= current:
        return value
    extremes = np.array([np.min(value), np.max(value)])
    with np.errstate(over="ignore"):
        overflow = np.isinf(extremes.astype(dtype)) & np.isfinite(extremes.astype(np.float64))
    if overflow.any():
        largest = float(np.max(np.abs(extremes.astype(np.float64))))
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}tensor {name} has max |value| {largest:.6g}, which overflows {dtype.name} (largest finite "
            f"{target:.6g}) to infinity; write it as float32"
            + (" or bfloat16 (float32's range)" if dtype == np.float16 else ""))
    return value


def cast(value: np.ndarray, dtype, name: str, source: str | None = None) -> np.ndarray:
    """`value.astype(dtype)` (no copy when it already has it), refusing a finite value that would become inf."""
    return check_fits(value, dtype, name, source).astype(dtype, copy=False)


# GGUF block types (32 values a block) whose scale, and minimum, are stored as float16 (gguf.quants): the scale is
# amax / levels (symmetric types) or (max - min) / levels with the minimum stored too.
_GGUF_BLOCKS = {"Q8_0": (127, False), "Q4_0": (8, False), "Q5_0": (16, False), "Q4_1": (15, True),
                "Q5_1": (31, True)}
GGUF_BLOCK = 32


def check_gguf(value: np.ndarray, type_name: str, name: str, source: str | None = None) -> np.ndarray:
    """`value` unchanged, after checking that writing it as GGUF type `type_name` ("F16", "Q8_0", ...) stores no
    infinity: F16 / BF16 values, or the float16 per-block scales (and minima) of the block-quantized types.
    Per-block extremes take 2/32 of the tensor's size; other types pass unchecked."""
    if type_name in GGUF_FLOAT:
        return check_fits(value, GGUF_FLOAT[type_name], name, source)
    if type_name not in _GGUF_BLOCKS or value.size == 0 or value.shape[-1] % GGUF_BLOCK:
        return value
    levels, with_min = _GGUF_BLOCKS[type_name]
    blocks = np.asarray(value, np.float32).reshape(-1, GGUF_BLOCK)
    hi, lo = blocks.max(axis=1), blocks.min(axis=1)
    scales = (hi.astype(np.float64) - lo) / levels if with_min else np.maximum(np.abs(hi), np.abs(lo)) / levels
    limit = _largest(np.float16)
    with np.errstate(over="ignore"):
        bad = np.isinf(scales.astype(np.float16)) | (np.isinf(lo.astype(np.float16)) if with_min else False)
    if bad.any():
        where = f"{source}: " if source else ""
        largest = float(np.max(np.abs(blocks[int(np.argmax(bad))])))
        raise CheckpointError(
            f"{where}tensor {name} has a block with max |value| {largest:.6g}, too large for {type_name}: its "
            f"float16 scale{' or minimum' if with_min else ''} would overflow (largest finite {limit:.6g}) to "
            "infinity; write it as f32 or bf16")
    return value

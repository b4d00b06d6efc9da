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

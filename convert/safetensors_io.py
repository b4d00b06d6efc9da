"""Read (and write) safetensors files with numpy only: no torch, bf16 through ml_dtypes, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw little-endian bytes. Reading it directly lets us memory-map each tensor and check every offset, so a
truncated or corrupt file gives a clear CheckpointError instead of a crash deep inside a library.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from refusal_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info.get("data_offsets", (0, -1))
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {data_start + end}, file has {size}")
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}")
    return header, data_start


def iter_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of one file, each memory-mapped on its own (read lazily, and unmapped
    once the consumer drops it, so a file's pages do not accumulate in memory)."""
    header, start = read_header(path)
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        info = header[name]
        begin, end = info["data_offsets"]
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        if end == begin:
            yield name, np.zeros(shape, dtype)
        else:
            yield name, np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model directory: a sharded index, or a single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        raise CheckpointError(f"{model_dir}: only PyTorch pickle weights (*.bin/*.pth) found; refusal_jax reads "
                              "safetensors (convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found")


def iter_model(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    for path in model_files(model_dir):
        yield from iter_file(path)


def raw_bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes without copying them (tobytes() would hold a second copy of the tensor)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


def write_file(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (temp file + rename)."""
    header, offset = {}, 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name} of dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays[name] = arr
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(raw_bytes(arr))
    os.replace(tmp, path)

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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        _check_entry(path, name, info, size - data_start)
    _check_layout(path, header, size - data_start)
    return header, data_start


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """One header entry: {dtype, shape: [ints >= 0], data_offsets: [begin <= end <= data size]}, consistent."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name}: header entry is not an object")
    if info.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**40 for d in shape) or len(shape) > 8:
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(f"{path}: truncated: tensor {name} ends at data byte {end}, the file holds {data_size}")
    expected = 1
    for d in shape:
        expected *= d
    expected *= np.dtype(_DTYPES[info["dtype"]]).itemsize
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """The tensors tile the data region exactly, as the `safetensors` library requires (`Metadata::validate`):
    sorted by offset, each begins where the previous one ends (no overlap, no gap), the first at 0, the last at
    the end of the file. Overlapping tensors would silently alias each other's bytes; a gap or trailing bytes
    mean a damaged or hand-edited file."""
    order = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    for before, name in zip(order, order[1:]):  # overlaps first: aliased weights are the worse damage
        (_, end), (begin, stop) = header[before]["data_offsets"], header[name]["data_offsets"]
        if begin < end:
            raise CheckpointError(f"{path}: tensor {name} (data bytes {begin}-{stop}) overlaps tensor {before} "
                                  f"(which ends at {end})")
    previous, expected = None, 0
    for name in order:
        begin, end = header[name]["data_offsets"]
        if begin > expected:
            after = f"after tensor {previous}" if previous is not None else "at the start of the data"
            raise CheckpointError(f"{path}: tensor {name} begins at data byte {begin}, leaving {begin - expected} "
                                  f"unused bytes {after} (safetensors packs tensors without gaps)")
        previous, expected = name, end
    if expected != data_size:
        raise CheckpointError(f"{path}: {data_size - expected} bytes after the last tensor "
                              f"{previous if previous is not None else '(none)'}: the header covers {expected} of "
                              f"the {data_size} data bytes")


def numel(paths) -> int:
    """Number of elements the safetensors files declare (headers only), to check a config against them."""
    total = 0
    for path in paths:
        header, _ = read_header(path)
        for info in header.values():
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


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
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed shard index (weight_map must map tensor names to file names)")
        files = sorted(set(weight_map.values()))
        root = model_dir.resolve()
        for f in files:  # shards live in the model directory: no absolute paths, no ../, no symlinks out of it
            if Path(f).is_absolute() or root not in (root / f).resolve().parents:
                raise CheckpointError(f"{index}: shard {f!r} is outside the model directory {model_dir}; refusing "
                                      "to read it")
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
                              "safetensors (convert with transformers: "
                              "model.save_pretrained(dir, safe_serialization=True))")
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
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
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

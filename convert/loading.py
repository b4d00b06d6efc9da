"""`load_model(src)`: one entry point for every kind of model source."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import jax

from refusal_jax.convert import checkpoint
from refusal_jax.model.config import ModelConfig
from refusal_jax.errors import CheckpointError
from refusal_jax.model.params import Params


class LoadedModel(NamedTuple):
    params: Params
    cfg: ModelConfig
    tokenizer: object


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def convert_source(src: str, *, dtype: str = "float32", strict_config: bool = True, progress: bool = True):
    """Convert any non-converted source (GGUF file, HF dir or hub id, bundled short name) -> (cfg, params, tok)."""
    from refusal_jax.convert import bundled
    from refusal_jax.convert import engine

    np_dtype = engine.numpy_dtype(dtype)
    path = Path(src).expanduser()
    if bundled.is_known_model(src):
        path = bundled.model_path(src)
    if path.suffix == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF"):
        from refusal_jax.convert import gguf

        with _progress_bar(None, f"converting {path.name}", progress) as bar:
            return gguf.load_gguf(path, dtype=np_dtype, progress=(lambda _: bar.update()) if bar is not None else None)
    from refusal_jax.convert import hf

    model_dir = hf.resolve_hf_dir(src)
    with _progress_bar(hf.n_tensors(model_dir), f"converting {model_dir.name}", progress) as bar:
        return hf.load_hf(str(model_dir), dtype=np_dtype, strict_config=strict_config,
                          progress=(lambda _: bar.update()) if bar is not None else None)


# GGUF files smaller than this convert in about a second: not worth a copy in the cache.
GGUF_CACHE_MIN_BYTES = 16 << 20


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def gguf_cache_dir(path: Path, dtype: str) -> Path | None:
    """Where the conversion of the GGUF file `path` is cached: the bundled model's own cache entry when `path` is
    a bundled model's assembled file, else `<cache>/converted/<stem>-<hash of path, size, mtime>-<dtype>` (a
    changed file gets a new entry). None for files under GGUF_CACHE_MIN_BYTES."""
    from refusal_jax.convert import bundled

    path = Path(path).expanduser().resolve()
    root = bundled.cache_root()
    for name, spec in bundled.MODELS.items():
        if spec.parts and path == (root / spec.filename).resolve():
            return root / "converted" / f"{name}-{dtype}"
    if path.stat().st_size < GGUF_CACHE_MIN_BYTES:
        return None
    key = hashlib.sha256(json.dumps(_file_identity(path), sort_keys=True).encode()).hexdigest()[:12]
    return root / "converted" / f"{path.stem}-{key}-{dtype}"


def load_model(src: str, *, dtype: str = "float32", strict_config: bool = True, progress: bool = True,
               cache: bool = True, on_device: bool = True) -> LoadedModel:
    """Load a model from any supported source.

    Args:
      src: a converted refusal_jax checkpoint directory, a `.gguf` file, a Hugging Face model directory, a hub id
        ("owner/name"), or the short name of a bundled model ("qwen2.5-coder-0.5b-instruct", see
        `refusal_jax.convert.bundled.known_models()`).
      dtype: parameter dtype: "float32", "bfloat16" or "float16".
      strict_config: refuse config attributes refusal_jax does not implement.
      progress: show a progress bar while converting.
      cache: bundled models and large `.gguf` files are converted once into the user cache directory
        (`gguf_cache_dir`) and loaded from there afterwards.
      on_device: place the params on the default device; False keeps numpy host arrays (weight exports: reading a
        device array back with np.asarray keeps a host copy of it alive as long as the array).
    Returns:
      LoadedModel(params, cfg, tokenizer), unpackable as a tuple.
    """
    from refusal_jax.convert import bundled

    path = Path(str(src)).expanduser()
    converted = gguf_cache_dir(path, dtype) if cache and path.suffix == ".gguf" and path.is_file() else None
    if path.is_dir() and checkpoint.is_converted(path):
        cfg, params, tok = checkpoint.load(path)
    elif bundled.is_known_model(str(src)) and cache:
        converted = bundled.cache_root() / "converted" / f"{bundled.resolve_name(str(src))}-{dtype}"
        if not checkpoint.is_converted(converted):
            cfg, params, tok = convert_source(str(src), dtype=dtype, progress=progress)
            checkpoint.save(converted, cfg, params, tok, source=str(bundled.model_path(str(src))), overwrite=True)
        cfg, params, tok = checkpoint.load(converted)
    elif converted is not None:  # a large .gguf file: converted once, reused while the file is unchanged
        if not checkpoint.is_converted(converted):
            cfg, params, tok = convert_source(str(path), dtype=dtype, strict_config=strict_config, progress=progress)
            checkpoint.save(converted, cfg, params, tok, source=json.dumps(_file_identity(path)), overwrite=True)
        cfg, params, tok = checkpoint.load(converted)
    else:
        cfg, params, tok = convert_source(str(src), dtype=dtype, strict_config=strict_config, progress=progress)
    if tok is None:
        raise CheckpointError(f"{src}: no tokenizer found")
    return LoadedModel(jax.device_put(params) if on_device else params, cfg, tok)


"""`load_model(src)`: one entry point for every kind of model source."""

from __future__ import annotations

import contextlib
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


def _magic(path: Path) -> bytes:
    """The first 4 bytes of a file (only those are read: a model file may be gigabytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def convert_source(src: str, *, dtype: str = "float32", strict_config: bool = True, progress: bool = True):
    """Convert any non-converted source (GGUF file, HF dir or hub id, bundled short name) -> (cfg, params, tok)."""
    from refusal_jax.convert import bundled
    from refusal_jax.convert import engine

    np_dtype = engine.numpy_dtype(dtype)
    path = Path(src).expanduser()
    if bundled.is_known_model(src):
        path = bundled.model_path(src)
    if path.suffix == ".gguf" or (path.is_file() and _magic(path) == b"GGUF"):
        from refusal_jax.convert import gguf

        with _progress_bar(None, f"converting {path.name}", progress) as bar:
            return gguf.load_gguf(path, dtype=np_dtype, progress=(lambda _: bar.update()) if bar is not None else None)
    from refusal_jax.convert import hf

    model_dir = hf.resolve_hf_dir(src)
    with _progress_bar(hf.n_tensors(model_dir), f"converting {model_dir.name}", progress) as bar:
        return hf.load_hf(str(model_dir), dtype=np_dtype, strict_config=strict_config,
                          progress=(lambda _: bar.update()) if bar is not None else None)


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
      cache: bundled models are converted once into the user cache directory and loaded from there afterwards.
      on_device: place the params on the default device; False keeps numpy host arrays (weight exports: reading a
        device array back with np.asarray keeps a host copy of it alive as long as the array).
    Returns:
      LoadedModel(params, cfg, tokenizer), unpackable as a tuple.
    """
    from refusal_jax.convert import bundled

    path = Path(str(src)).expanduser()
    if path.is_dir() and checkpoint.is_converted(path):
        cfg, params, tok = checkpoint.load(path)
    elif bundled.is_known_model(str(src)) and cache:
        from refusal_jax.runs import outputs

        converted = bundled.cache_root() / "converted" / f"{bundled.resolve_name(str(src))}-{dtype}"
        outputs.clean_stale_partials(converted)  # left by a conversion that was killed
        if not checkpoint.is_converted(converted):
            cfg, params, tok = convert_source(str(src), dtype=dtype, progress=progress)
            if not checkpoint.is_converted(converted):  # another process may have finished it meanwhile
                checkpoint.save(converted, cfg, params, tok, source=str(bundled.model_path(str(src))),
                                overwrite=True)
        cfg, params, tok = checkpoint.load(converted)
    else:
        cfg, params, tok = convert_source(str(src), dtype=dtype, strict_config=strict_config, progress=progress)
    if tok is None:
        raise CheckpointError(f"{src}: no tokenizer found")
    return LoadedModel(jax.device_put(params) if on_device else params, cfg, tok)


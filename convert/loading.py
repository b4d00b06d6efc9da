"""`load_model(src)`: one entry point for every kind of model source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import jax

from refusal_jax.convert import checkpoint
from refusal_jax.errors import CheckpointError
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import Params
from refusal_jax.runs.progress import progress_bar


class LoadedModel(NamedTuple):
    params: Params
    cfg: ModelConfig
    tokenizer: object


def _is_gguf(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"  # only the magic: a model file may be gigabytes
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def convert_source(src: str, *, dtype: str = "float32", strict_config: bool = True, progress: bool = True,
                   mesh=None, rules=None):
    """Convert any non-converted source (GGUF file, HF dir or hub id, bundled short name) -> (cfg, params, tok).

    Without `mesh`, params are host numpy arrays. With a `mesh`, every parameter is placed straight into its
    sharding (`sharding.param_shardings`) shard by shard, reading one source tensor at a time
    (`convert.placement.place_params`), so no weight is ever whole on one device.
    """
    from refusal_jax.convert import bundled, engine

    np_dtype = engine.numpy_dtype(dtype)
    path = Path(src).expanduser()
    if bundled.is_known_model(src):
        path = bundled.model_path(src)
    if _is_gguf(path):
        from refusal_jax.convert import gguf

        if mesh is not None:
            return _convert_sharded(gguf.sharded_source(path, strict=strict_config), np_dtype, progress, mesh, rules)
        with progress_bar(None, f"converting {path.name}", progress, unit="tensor") as bar:
            return gguf.load_gguf(path, dtype=np_dtype, on_tensor=lambda _: bar.update())
    from refusal_jax.convert import hf

    model_dir = hf.resolve_hf_dir(src)
    if mesh is not None and hf.read_hf_config(model_dir).get("model_type") not in ("qwen", "phi3"):  # fused qkv
        return _convert_sharded(hf.sharded_source(model_dir, strict=strict_config), np_dtype, progress, mesh, rules)
    with progress_bar(hf.n_tensors(model_dir), f"converting {model_dir.name}", progress, unit="tensor") as bar:
        cfg, params, tok = hf.load_hf(str(model_dir), dtype=np_dtype, strict_config=strict_config,
                                      on_tensor=lambda _: bar.update())
    if mesh is not None:
        from refusal_jax.model import sharding

        params = sharding.shard_params(params, cfg, mesh, *([rules] if rules else []))
    return cfg, params, tok


def _convert_sharded(source, np_dtype, progress, mesh, rules):
    from refusal_jax.convert import placement
    from refusal_jax.model import sharding

    shardings = sharding.param_shardings(source.cfg, mesh, *([rules] if rules else []))
    with progress_bar(len(source.loaders), f"converting {source.name} onto {sharding.describe(mesh)}", progress,
                      unit="tensor") as bar:
        params = placement.place_params(source, shardings, dtype=np_dtype, on_tensor=lambda _: bar.update())
    return source.cfg, params, source.load_tokenizer()


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
               cache: bool = True, on_device: bool = True, mesh=None, rules=None) -> LoadedModel:
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
      mesh: a `jax.sharding.Mesh` (`sharding.make_mesh`): params are placed on it per `sharding.param_shardings`
        (`rules`: a `sharding.MeshRules`, default rules otherwise), restored or converted shard by shard, never
        whole on one device. With several processes every process calls this; process 0 alone converts a
        bundled model into the cache while the others wait.
    Returns:
      LoadedModel(params, cfg, tokenizer), unpackable as a tuple.
    """
    from refusal_jax.convert import bundled
    from refusal_jax.runs import distributed

    shardings = None
    if mesh is not None:
        from refusal_jax.model import sharding

        shardings = lambda cfg: sharding.param_shardings(cfg, mesh, *([rules] if rules else []))  # noqa: E731
    path = Path(str(src)).expanduser()
    converted = gguf_cache_dir(path, dtype) if cache and path.suffix == ".gguf" and path.is_file() else None
    if path.is_dir() and checkpoint.is_converted(path):
        cfg, params, tok = checkpoint.load(path, shardings=shardings)
    elif bundled.is_known_model(str(src)) and cache:
        from refusal_jax.runs import outputs

        converted = bundled.cache_root() / "converted" / f"{bundled.resolve_name(str(src))}-{dtype}"
        if distributed.is_main_process():
            outputs.clean_stale_partials(converted)  # left by a conversion that was killed
            if not checkpoint.is_converted(converted):
                cfg, params, tok = convert_source(str(src), dtype=dtype, progress=progress)
                if not checkpoint.is_converted(converted):  # another process may have finished it meanwhile
                    checkpoint.save(converted, cfg, params, tok, source=str(bundled.model_path(str(src))),
                                    overwrite=True, cache_entry=True)
                del params
        distributed.barrier("bundled model converted")
        if checkpoint.is_converted(converted):
            cfg, params, tok = checkpoint.load(converted, shardings=shardings)
        else:  # another host without a shared cache directory: convert here, shard by shard
            cfg, params, tok = convert_source(str(src), dtype=dtype, progress=progress, mesh=mesh, rules=rules)
    elif converted is not None:  # a large .gguf file: converted once, reused while the file is unchanged
        if not checkpoint.is_converted(converted):
            cfg, params, tok = convert_source(str(path), dtype=dtype, strict_config=strict_config, progress=progress)
            checkpoint.save(converted, cfg, params, tok, source=json.dumps(_file_identity(path)), overwrite=True,
                            cache_entry=True)
        cfg, params, tok = checkpoint.load(converted, shardings=shardings)
    else:
        cfg, params, tok = convert_source(str(src), dtype=dtype, strict_config=strict_config, progress=progress,
                                          mesh=mesh, rules=rules)
    if tok is None:
        raise CheckpointError(f"{src}: no tokenizer found")
    if mesh is None and on_device:
        params = jax.device_put(params)
    if mesh is not None:  # a mixture of experts runs each device's experts where they are
        from refusal_jax.model import sharding

        cfg = sharding.fit_config(cfg, mesh, *([rules] if rules else []))
    return LoadedModel(params, cfg, tok)


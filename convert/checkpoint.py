"""Converted checkpoints: orbax-saved params + our versioned config + the tokenizer, so a model converts once.

Layout of a converted directory:
  refusal_jax_config.json   ModelConfig.to_dict() (with format_version)
  manifest.json             source, dtype, refusal_jax version
  params/                   orbax PyTree checkpoint {"embed", "final_norm", "lm_head"?, "layers": {...}}, uncompressed
  tokenizer/                tokenizer.save_pretrained() output (chat template included)

Everything is written into a sibling temporary directory and renamed into place at the end, so an interrupted
save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from refusal_jax.model.config import ModelConfig
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model.params import Params, from_flat, param_shapes, to_flat

CONFIG_FILE = "refusal_jax_config.json"
MANIFEST_FILE = "manifest.json"


def _nested(params: Params) -> dict:
    out: dict = {"layers": {}}
    for name, value in to_flat(params).items():
        if name.startswith("layers."):
            out["layers"][name[len("layers."):]] = value
        else:
            out[name] = value
    return out


def _writer():
    """An orbax checkpointer that writes host arrays without copying them first and without compression.

    StandardCheckpointer deep-copies every numpy array (a guard against concurrent modification; our trees are not
    modified while saving) and zstd-compresses chunks in memory, which together took conversion to 2.6x the model's
    size; weights barely compress. The layout is the same PyTree checkpoint, so StandardCheckpointer restores it.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))  # unused (trees are host arrays); its absence logs a warning
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


def is_converted(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def save(out_dir: str | Path, cfg: ModelConfig, params: Params, tokenizer=None, *, source: str = "",
         overwrite: bool = False) -> Path:
    """Save a converted model. Refuses to replace an existing directory unless `overwrite`."""
    import orbax.checkpoint as ocp

    from refusal_jax import __version__

    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tree = jax.tree.map(np.asarray, _nested(params))
    dtypes = sorted({str(v.dtype) for v in jax.tree.leaves(tree)})
    with _writer() as ckptr:
        ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(tree))
    (tmp / CONFIG_FILE).write_text(cfg.to_json())
    (tmp / MANIFEST_FILE).write_text(json.dumps(
        {"source": source, "dtype": dtypes, "refusal_jax_version": __version__, "n_params": cfg.n_params}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not a converted refusal_jax checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: malformed config ({e})") from None


def load(ckpt_dir: str | Path, *, with_tokenizer: bool = True) -> tuple[ModelConfig, Params, object | None]:
    """Load a converted checkpoint written by `save`; shapes are checked against the config."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).expanduser().resolve()
    cfg = load_config(ckpt_dir)
    manifest = json.loads((ckpt_dir / MANIFEST_FILE).read_text()) if (ckpt_dir / MANIFEST_FILE).exists() else {}
    dtype = np.dtype((manifest.get("dtype") or ["float32"])[0]) if len(manifest.get("dtype", [])) <= 1 else None
    shapes = param_shapes(cfg)
    abstract: dict = {"layers": {}}
    for name, shape in shapes.items():
        spec = jax.ShapeDtypeStruct(shape, dtype or np.float32)
        if name.startswith("layers."):
            abstract["layers"][name[len("layers."):]] = spec
        else:
            abstract[name] = spec
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(ckpt_dir / "params", abstract if dtype is not None else None)
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir}: could not restore params: {type(e).__name__}: {e}") from None
    flat = {k: v for k, v in tree.items() if k != "layers"}
    flat.update({f"layers.{k}": v for k, v in tree["layers"].items()})
    for name, shape in shapes.items():
        if name not in flat or tuple(flat[name].shape) != shape:
            got = None if name not in flat else tuple(flat[name].shape)
            raise CheckpointError(f"{ckpt_dir}: parameter {name} has shape {got}, config expects {shape}")
    tokenizer = None
    if with_tokenizer and (ckpt_dir / "tokenizer").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir / "tokenizer"))
    return cfg, from_flat(flat), tokenizer

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
    modified while saving) and zstd-compresses chunks in memory, which multiplies peak memory during conversion;
    weights barely compress. The layout is the same PyTree checkpoint, so StandardCheckpointer restores it.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))  # unused (trees are host arrays); its absence logs a warning
    # The save is this process's alone (several processes: process 0 converts while the others wait), so orbax
    # must not wait for the others at its internal barriers.
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"refusal_jax_save_{me}")
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False,
                                                        multiprocessing_options=options),
                            multiprocessing_options=options)


def is_converted(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def save(out_dir: str | Path, cfg: ModelConfig, params: Params, tokenizer=None, *, source: str = "",
         overwrite: bool = False, sources=()) -> Path:
    """Save a converted model (see `refusal_jax.runs.outputs`: written atomically under a lock; an existing directory is
    replaced only with `overwrite` and only if refusal_jax wrote it, and then moved aside, never deleted).

    `sources`: paths the output must never replace (the model it was converted from, ...); `source` is recorded in
    the manifest and protected too.
    """
    import orbax.checkpoint as ocp

    from refusal_jax import __version__
    from refusal_jax.runs import outputs

    tree = jax.tree.map(np.asarray, _nested(params))
    dtypes = sorted({str(v.dtype) for v in jax.tree.leaves(tree)})
    with outputs.atomic_output(out_dir, overwrite=overwrite, sources=(source, *sources), kind="checkpoint",
                               create_parents=True) as tmp:
        with _writer() as ckptr:
            ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(tree))
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        (tmp / MANIFEST_FILE).write_text(json.dumps(
            {"source": source, "dtype": dtypes, "refusal_jax_version": __version__, "n_params": cfg.n_params},
            indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return Path(out_dir).expanduser().resolve()


def load_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: not a converted refusal_jax checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ConfigError(f"{path}: malformed config ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def load(ckpt_dir: str | Path, *, with_tokenizer: bool = True, shardings: Params | None = None,
         ) -> tuple[ModelConfig, Params, object | None]:
    """Load a converted checkpoint written by `save`; shapes are checked against the config.

    shardings: a Params-shaped tree of `NamedSharding`s (`sharding.param_shardings`), or a function cfg -> such a
      tree. Each parameter is then restored straight into its sharding: every process reads only the slices its
      devices hold, so no weight is ever whole on one device (or in one host's memory, unless replicated).
      Without it, host-side numpy arrays.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).expanduser().resolve()
    cfg = load_config(ckpt_dir)
    try:
        manifest = json.loads((ckpt_dir / MANIFEST_FILE).read_text()) if (ckpt_dir / MANIFEST_FILE).exists() else {}
        if not isinstance(manifest, dict) or not isinstance(manifest.get("dtype", []), list):
            raise TypeError("not an object with a dtype list")
        np.dtype((manifest.get("dtype") or ["float32"])[0])
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{ckpt_dir / MANIFEST_FILE}: malformed manifest ({type(e).__name__}: {e})") from None
    dtype = np.dtype((manifest.get("dtype") or ["float32"])[0]) if len(manifest.get("dtype", [])) <= 1 else None
    shapes = param_shapes(cfg)
    if callable(shardings):
        shardings = shardings(cfg)
    placed = to_flat(shardings) if shardings is not None else {}
    if shardings is not None and dtype is None:
        raise CheckpointError(f"{ckpt_dir}: mixed parameter dtypes {manifest.get('dtype')}; cannot restore sharded")
    abstract: dict = {"layers": {}}
    for name, shape in shapes.items():
        spec = jax.ShapeDtypeStruct(shape, dtype or np.float32, sharding=placed.get(name))
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

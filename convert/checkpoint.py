"""Converted checkpoints: orbax-saved params + our versioned config + the tokenizer, so a model converts once.

Layout of a converted directory:
  refusal_jax_config.json   ModelConfig.to_dict() (with format_version)
  manifest.json             source, dtype, refusal_jax version, sha256 of every file under params/
  params/                   orbax PyTree checkpoint {"embed", "final_norm", "lm_head"?, "layers": {...}}, uncompressed
  tokenizer/                tokenizer.save_pretrained() output (chat template included)

Everything is written into a sibling temporary directory and renamed into place at the end, so an interrupted
save never leaves a half-written checkpoint under the final name. `load` verifies the params files against the
manifest's sha256 first, so a flipped byte is a `ChecksumError` naming the file, never different weights.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from refusal_jax.errors import CheckpointError, ChecksumError, ConfigError
from refusal_jax.model.config import ModelConfig
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


def _os_error(e: Exception, path) -> OSError | None:
    """The OSError that an orbax/tensorstore error message describes (a full disk, a quota), or None."""
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in str(e):
            return OSError(code, os.strerror(code), str(path))
    return None


def params_checksums(ckpt_dir: Path, workers: int = 1) -> dict[str, str]:
    """{path relative to the checkpoint ("params/..."): sha256} of every file orbax wrote under params/, hashed by
    `workers` threads (hashlib releases the GIL)."""
    from refusal_jax.runs.rundir import sha256_file

    root = Path(ckpt_dir)
    files = [p for p in sorted((root / "params").rglob("*")) if p.is_file()]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(sha256_file, files))
    return {p.relative_to(root).as_posix(): digest for p, digest in zip(files, digests)}


def recorded_checksums(ckpt_dir: Path, manifest: dict) -> dict[str, str] | None:
    """manifest["sha256"], checked against the files under params/ by name (cheap: nothing is hashed). None, with a
    warning, for a checkpoint converted before checksums were recorded.
    Raises:
      ChecksumError: a listed file is missing, or a file under params/ is not listed.
      CheckpointError: a malformed sha256 entry.
    """
    recorded = manifest.get("sha256")
    if recorded is None:
        print(f"warning: {ckpt_dir}: converted before checksums were recorded; its params are not verified "
              "(convert again to add them)", file=sys.stderr)
        return None
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in recorded.items()):
        raise CheckpointError(f"{ckpt_dir / MANIFEST_FILE}: malformed manifest (sha256 must map file names to "
                              "hex digests)")
    root = Path(ckpt_dir)
    for name in recorded:
        path = root / name
        if not name.startswith("params/") or ".." in Path(name).parts or not path.is_file():
            raise ChecksumError(f"{path}: listed in {MANIFEST_FILE} but missing; the checkpoint is damaged, "
                                "convert the model again")
    present = {p.relative_to(root).as_posix() for p in (root / "params").rglob("*") if p.is_file()}
    unlisted = sorted(present - set(recorded))
    if unlisted:
        raise ChecksumError(f"{root / unlisted[0]}: not listed in {MANIFEST_FILE} ({len(unlisted)} such file(s)); "
                            "the checkpoint was changed after conversion, convert the model again")
    return recorded


def compare_checksums(ckpt_dir: Path, recorded: dict[str, str]) -> None:
    """Hash the params files and compare with `recorded`; raises ChecksumError naming the first that differs."""
    if not recorded:
        return
    root = Path(ckpt_dir)
    actual = params_checksums(root, workers=2)
    for name, expected in recorded.items():
        if actual.get(name) != expected:
            raise ChecksumError(f"{root / name}: sha256 {str(actual.get(name))[:16]}... differs from the "
                                f"{expected[:16]}... recorded in {MANIFEST_FILE}; the checkpoint is damaged, "
                                "convert the model again")


def verify_checksums(ckpt_dir: Path, manifest: dict) -> None:
    """Check the params files against manifest["sha256"] (`recorded_checksums`, then `compare_checksums`)."""
    recorded = recorded_checksums(ckpt_dir, manifest)
    if recorded is not None:
        compare_checksums(ckpt_dir, recorded)


def is_converted(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def save(out_dir: str | Path, cfg: ModelConfig, params: Params, tokenizer=None, *, source: str = "",
         overwrite: bool = False, sources=(), cache_entry: bool = False) -> Path:
    """Save a converted model (see `refusal_jax.runs.outputs`: written atomically under a lock; an existing directory is
    replaced only with `overwrite` and only if refusal_jax wrote it, and then moved aside, never deleted).

    `sources`: paths the output must never replace (the model it was converted from, ...); `source` is recorded in
    the manifest and protected too. `cache_entry`: the write is the loader's own conversion cache.
    """
    import orbax.checkpoint as ocp

    from refusal_jax import __version__
    from refusal_jax.runs import outputs

    tree = jax.tree.map(np.asarray, _nested(params))
    dtypes = sorted({str(v.dtype) for v in jax.tree.leaves(tree)})
    with outputs.atomic_output(out_dir, overwrite=overwrite, sources=(source, *sources), kind="checkpoint",
                               create_parents=True, cache_entry=cache_entry) as tmp:
        with _writer() as ckptr:
            try:
                ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(tree))
            except OSError:
                raise
            except Exception as e:  # tensorstore reports a full disk as a ValueError carrying the OS's words
                if (err := _os_error(e, out_dir)) is None:
                    raise
                raise err from None
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        (tmp / MANIFEST_FILE).write_text(json.dumps(
            {"source": source, "dtype": dtypes, "refusal_jax_version": __version__, "n_params": cfg.n_params,
             "sha256": params_checksums(tmp)}, indent=2))
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
    # The files are hashed while orbax restores them (the restore waits on I/O more than on the CPU); the params
    # are returned only once the hashes match.
    recorded = recorded_checksums(ckpt_dir, manifest)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        verified = pool.submit(compare_checksums, ckpt_dir, recorded or {})
        try:
            with ocp.StandardCheckpointer() as ckptr:
                tree = ckptr.restore(ckpt_dir / "params", abstract if dtype is not None else None)
        except Exception as e:
            verified.result()  # a damaged file is the cause worth naming
            raise CheckpointError(f"{ckpt_dir}: could not restore params: {type(e).__name__}: {e}") from None
        verified.result()
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

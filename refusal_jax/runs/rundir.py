"""Run directories that survive: atomic artifact writes, a recorded run config, and resume by stage.

A run directory holds `run_config.json` (everything that determines the results, with its hash). Rerunning a
command with the same config skips every stage whose artifacts exist; a different config is refused unless the
user passes --overwrite, in which case the stale artifacts are moved to `previous/<timestamp>/` rather than
deleted, so nothing a user produced is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from refusal_jax.errors import RunError
from refusal_jax.runs import distributed

RUN_CONFIG = "run_config.json"


def _tmp(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def _write_atomically(path: Path, write, suffix: str = "") -> None:
    """`write(tmp)` then rename onto `path` (process 0 only: see `done`). A failed write (a full disk, say) leaves
    no temporary file behind, and its OSError names the artifact, not the temporary file."""
    if not distributed.is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: Path, keys: tuple[str, ...] = ()) -> Any:
    """A JSON artifact; `keys` must be present (an object). Corrupt or truncated files are a RunError."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RunError(f"{path}: malformed JSON ({type(e).__name__}: {e}); {_RECOMPUTE}") from None
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror})") from None
    if keys and (not isinstance(obj, dict) or any(k not in obj for k in keys)):
        raise RunError(f"{path}: corrupt artifact (expected an object with {', '.join(keys)}); {_RECOMPUTE}")
    return obj


_RECOMPUTE = "delete it (and the artifacts computed after it) and rerun to recompute it"


def read_direction_metadata(path: Path) -> dict:
    """direction_metadata.json with its "pos" (negative) and "layer" (>= 0) checked as whole numbers; a field of
    the wrong type is a RunError naming it, never a traceback where it is used."""
    meta = read_json(path, ("pos", "layer"))
    for key, ok in (("pos", lambda v: v < 0), ("layer", lambda v: v >= 0)):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise RunError(f"{path}: corrupt artifact ({key!r} is {value!r}, expected a "
                           f"{'negative' if key == 'pos' else 'non-negative'} whole number); {_RECOMPUTE}")
    return meta


def read_artifact_npy(path: Path) -> np.ndarray:
    """A .npy artifact of a run; corrupt or truncated files are a RunError."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise RunError(f"{path}: corrupt or truncated artifact ({type(e).__name__}: {e}); {_RECOMPUTE}") from None


@contextlib.contextmanager
def reading(path: Path):
    """Turn a malformed artifact's KeyError / TypeError / ... into a RunError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise RunError(f"{path}: corrupt artifact ({type(e).__name__}: {e}); {_RECOMPUTE}") from None


def read_npy(path: Path, what: str) -> np.ndarray:
    """A user-supplied .npy array, with a DataError naming `what` when it is missing or unreadable."""
    from refusal_jax.errors import DataError

    if not path.exists():
        raise DataError(f"{what} file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None


def write_npy(path: Path, array: np.ndarray) -> None:
    _write_atomically(path, lambda tmp: np.save(tmp, array), ".npy")  # np.save appends .npy to other names


def save_figure(fig, path: Path) -> None:
    _write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"), ".png")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def sha256_file(path: Path, progress: bool = False, desc: str | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (with a byte progress bar when `progress`)."""
    from refusal_jax.runs.progress import byte_bar

    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, byte_bar(path.stat().st_size, desc or f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def texts_hash(texts) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def _normalized(config: dict) -> dict:
    """The config as it reads back from run_config.json (tuples become lists), so equal settings compare equal."""
    return json.loads(json.dumps(config, default=_json_default))


def _changed(config: dict, old: dict, keys) -> list[str]:
    new = _normalized(config)
    return sorted(k for k in keys if new.get(k) != old.get(k))


def check_settings(out_dir: Path, settings: dict, *, overwrite: bool = False) -> None:
    """Refuse, before anything expensive, a run directory whose run_config.json has other values for `settings`
    (a subset of the full config, known before the model is loaded). No-op with `overwrite` or a new directory.

    Raises:
      RunError: naming the settings that differ.
    """
    path = Path(out_dir) / RUN_CONFIG
    if overwrite or not path.exists():
        return
    old = read_json(path)
    old = old.get("config") if isinstance(old, dict) else None
    if not isinstance(old, dict):
        raise RunError(f"{path}: not a run config written by refusal_jax (corrupt?); use another --out, or move "
                       "this directory away")
    changed = _changed(settings, old, settings)
    if changed:
        raise RunError(f"{out_dir} holds a run with different settings (changed: {', '.join(changed)}). Use "
                       f"another --out (or none: the default folder depends on the settings), or --overwrite to "
                       f"start over (old artifacts are kept under {out_dir}/previous/).")


def open_run(out_dir: Path, config: dict, *, overwrite: bool = False) -> Path:
    """Create or resume a run directory for `config` (with several processes: process 0 does, the others follow).

    Raises:
      RunError: the directory holds a run with a different config and `overwrite` is False.
    """
    def open_here():
        try:
            _open_run(Path(out_dir), config, overwrite)
        except RunError as e:
            return str(e)

    error = distributed.main_decides(open_here, "open_run")
    if error:
        raise RunError(error)
    distributed.barrier("open_run")
    return Path(out_dir)


def _open_run(out_dir: Path, config: dict, overwrite: bool) -> Path:
    from refusal_jax.runs import outputs

    out_dir = Path(out_dir)
    outputs.check_run_dir(out_dir, create_parents=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.hold_run_lock(out_dir)
    path = out_dir / RUN_CONFIG
    config = json.loads(json.dumps(config, default=_json_default))  # as stored: tuples become lists, etc.
    record = {"config": config, "hash": config_hash(config)}
    if path.exists():
        old = read_json(path)
        if not isinstance(old, dict) or not isinstance(old.get("config", {}), dict):
            raise RunError(f"{path}: not a run config written by refusal_jax (corrupt?); use another --out, or "
                           "move this directory away")
        if old.get("hash") != record["hash"]:
            if not overwrite:
                changed = _changed(config, old.get("config", {}), set(config) | set(old.get("config", {})))
                raise RunError(f"{out_dir} holds a run with a different configuration (changed: {', '.join(changed)}). "
                               "Use another --out, or --overwrite to start over (old artifacts are kept under "
                               f"{out_dir}/previous/).")
            stash = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
            k = 1
            while stash.exists():
                stash, k = stash.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{k}"), k + 1
            stash.mkdir(parents=True)
            for entry in list(out_dir.iterdir()):
                if entry.name not in ("previous", ".lock", outputs.MARKER):
                    shutil.move(str(entry), stash / entry.name)
    if not (out_dir / outputs.MARKER).exists():
        outputs.write_marker(out_dir, "run")
    write_json(path, record)
    return out_dir


def done(*paths: Path) -> bool:
    """Whether every artifact exists: the resume decision. With several processes process 0 decides and the others
    follow, so all skip or run a stage together; call it in every process at the same point."""
    return distributed.main_decides(lambda: all(Path(p).exists() for p in paths), "done")

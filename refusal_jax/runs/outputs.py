"""Output safety, in one place: what a command may write, replace, lock and clean up.

The rule: refusal_jax never deletes or overwrites a file it did not write.

* Every output directory refusal_jax writes carries a marker file (`MARKER`); a GGUF file carries the metadata key
  `MARKER_KEY`. `--overwrite` replaces only an output that carries it (or the signature of an output written by an
  earlier version: a converted checkpoint's manifest, a run's `run_config.json`), and never the source of the
  command, an ancestor of the source, the current directory or one of its ancestors, or the home directory.
* A replaced output is not deleted: it is renamed to `<out>.previous-<timestamp>` next to it (runs keep their own
  `previous/` folder, see `refusal_jax.runs`).
* Outputs are written into `.<name>.partial-<pid>` next to the target and renamed into place at the end, so an
  interrupted write never leaves a half-written output under the final name; partial files of processes that no
  longer run are removed by the next write to the same output.
* One writer per output: `.<name>.lock` next to the target is held (flock) while writing; a second run gets a clear
  error naming the pid that holds it. The kernel releases the lock of a killed process, so a stale lock file is
  simply taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from refusal_jax.errors import OutputError

MARKER = ".refusal_jax_output"
CACHE_ENV = "REFUSAL_JAX_CACHE"
MARKER_KEY = "refusal_jax.output"  # GGUF metadata key marking a file refusal_jax wrote
# .<name>.partial-<pid>, .<name>.tmp-<pid>[.ext] (runs), .<name>.<pid>.<hex>.partial (bundled model assembly)
_PARTIAL = re.compile(r"^\.(?P<name>.+?)\.(?:(?:partial|tmp)-(?P<pid>\d+)(?:\.\w+)?"
                      r"|(?P<pid2>\d+)\.[0-9a-f]+\.partial)$")


# ------------------------------------------------------------------------------------------------
# ownership


def write_marker(directory: Path, kind: str) -> None:
    """Mark `directory` as a refusal_jax output of `kind` ("checkpoint", "hf_export", "run", ...)."""
    from refusal_jax import __version__

    (Path(directory) / MARKER).write_text(json.dumps({"kind": kind, "refusal_jax_version": __version__,
                                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def model_cache_root() -> Path:
    """Where assembled and converted models are cached: $REFUSAL_JAX_CACHE, else ~/.cache/refusal_jax."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_jax"


def marker_kind(directory: Path) -> str | None:
    """The kind recorded in a directory's marker ("run", "checkpoint", "hf_export", ...); "?" if unreadable."""
    try:
        record = json.loads((Path(directory) / MARKER).read_text(errors="replace")[:10_000])
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "?"
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if isinstance(kind, str) else "?"


_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".npz")


def model_folder(directory: Path) -> str | None:
    """Why `directory` holds a model (and so may never be a run folder), or None.

    A refusal_jax checkpoint or export (by marker or signature), a Hugging Face model folder (config.json with
    weights), any folder with weight files (.safetensors, .gguf, ...) or an orbax `params/` tree.
    """
    directory = Path(directory)
    kind = marker_kind(directory)
    if kind not in (None, "run"):
        return f"it is a refusal_jax {kind} output (a model, not a run)"
    if _legacy_ours(directory) or (directory / "refusal_jax_config.json").is_file():
        return "it is a converted refusal_jax checkpoint"
    if (directory / "params").is_dir() and (directory / "manifest.json").is_file():
        return "it holds a checkpoint (params/ and manifest.json)"
    try:
        weights = [e.name for e in directory.iterdir() if e.is_file() and e.name.endswith(_WEIGHT_SUFFIXES)]
    except OSError:
        weights = []
    if weights:
        return f"it holds model weights ({sorted(weights)[0]})"
    return None


def in_model_cache(path: Path) -> bool:
    """True when `path` (resolved) is the model cache or lies inside it."""
    try:
        root = model_cache_root().resolve()
    except (OSError, RuntimeError):
        return False
    return path == root or root in path.parents


def resolve_output(out, flag: str = "--out") -> Path:
    """`out` made absolute with symlinks resolved; a symlink loop or unreadable path is an OutputError."""
    out = Path(out).expanduser()
    if str(out) in ("", "."):
        out = Path.cwd()
    try:
        return out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"{flag} {out}: cannot resolve the path ({getattr(e, 'strerror', None) or e})") from None


def _legacy_ours(directory: Path) -> bool:
    """Outputs of versions before the marker: a converted checkpoint (manifest with refusal_jax_version)."""
    manifest = directory / "manifest.json"
    if (directory / "refusal_jax_config.json").is_file() and manifest.is_file():
        try:
            return "refusal_jax_version" in json.loads(manifest.read_text(errors="replace")[:100_000])
        except (OSError, ValueError):
            return False
    return False


def _gguf_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        return MARKER_KEY in GGUFReader(str(path), "r").fields
    except Exception:  # unreadable or corrupt: not provably ours
        return False


def is_ours(path: Path) -> bool:
    """True when `path` is an output refusal_jax wrote (marker file, GGUF marker key, or a legacy signature)."""
    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file() or _legacy_ours(path)
    if path.is_file():
        return _gguf_is_ours(path)
    return False


# ------------------------------------------------------------------------------------------------
# checks before any work


def _protected(out: Path, sources: Iterable) -> str | None:
    """Why `out` must never be replaced, or None."""
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor):
        return "it is the filesystem root"
    if out == Path.home().resolve():
        return "it is your home directory"
    if out == cwd or out in cwd.parents:
        return "it is the current directory or one of its parents"
    for src in sources:
        if src is None:
            continue
        src_path = Path(str(src)).expanduser()
        if not src_path.exists():
            continue
        src_path = src_path.resolve()
        if out == src_path:
            return f"it is the source {src}"
        if out in src_path.parents:
            return f"it contains the source {src}"
    return None


def _probe_writable(directory: Path, flag: str) -> None:
    probe = directory / f".refusal_jax-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{flag}: cannot write into {directory} ({e.strerror})") from None


def check_target(out, *, overwrite: bool, sources: Iterable = (), directory: bool = True, flag: str = "--out",
                 create_parents: bool = False, kind: str | None = None, cache_entry: bool = False) -> Path:
    """Validate an output path before any expensive work; returns it resolved. Nothing is written.

    kind: what will be written ("checkpoint", "hf_export", ...): an existing refusal_jax output of another kind
      (a run folder, say) is never replaced by it. cache_entry: the write is refusal_jax's own model cache (only
      the loader writes there; any other output inside the cache is refused).

    Raises:
      OutputError: `out` exists and `overwrite` is False; `overwrite` is set but `out` is not a refusal_jax output
        of the same kind or is protected (the source, an ancestor of it or of the current directory, the model
        cache); `out` is a file where a directory is expected (or the reverse); its parent is missing (unless
        `create_parents`) or not writable.
    """
    out = resolve_output(out, flag)
    if not cache_entry and in_model_cache(out):
        raise OutputError(f"{flag} {out} is inside refusal_jax's model cache ({model_cache_root()}); outputs go "
                          "elsewhere (the cache is rewritten by the loader)")
    if out.exists() or out.is_symlink():
        if directory and not out.is_dir():
            raise OutputError(f"{flag} {out} is a file, not a directory")
        if not directory and out.is_dir():
            raise OutputError(f"{flag} {out} is a directory, not a file")
        why = _protected(out, sources)
        if why:
            raise OutputError(f"{flag} {out} cannot be an output: {why}")
        if not overwrite:
            raise OutputError(f"{flag} {out} already exists (pass --overwrite to replace it; the old one is moved "
                              "aside, not deleted)")
        if not is_ours(out):
            raise OutputError(f"{flag} {out} exists and was not written by refusal_jax "
                              f"(no {MARKER if directory else MARKER_KEY} marker): --overwrite only replaces "
                              "refusal_jax outputs; choose another path")
        old_kind = marker_kind(out) if directory else None
        if kind and old_kind and old_kind != kind:
            raise OutputError(f"{flag} {out} holds a refusal_jax {old_kind} output, not a {kind}: --overwrite only "
                              f"replaces an output of the same kind; choose another path")
    return _check_parent(out, flag, create_parents)


def _check_parent(out: Path, flag: str, create_parents: bool) -> Path:
    """`out`'s parent exists (or may be created) and its nearest existing ancestor is a writable directory."""
    probe_dir = out.parent
    while not probe_dir.exists():
        if not create_parents:
            raise OutputError(f"{flag} {out}: the parent directory {out.parent} does not exist")
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{flag} {out}: {probe_dir} is a file, not a directory")
    _probe_writable(probe_dir, flag)
    return out


# ------------------------------------------------------------------------------------------------
# partial files, locks, replacement


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove `.<name>.partial-<pid>` / `.<name>.tmp-<pid>` siblings of `out` left by processes no longer running."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        m = _PARTIAL.match(entry.name)
        if not m or m["name"] != out.name:
            continue
        pid = int(m["pid"] or m["pid2"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _try_lock(path: Path, busy: str) -> int:
    """Open and flock `path` without waiting; held elsewhere: OutputError(`busy` with {holder} = the holder's pid)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        try:
            holder = path.read_text().strip() or "?"
        except OSError:
            holder = "?"
        raise OutputError(busy.replace("{holder}", holder)) from None
    return fd


@contextlib.contextmanager
def lock(out: Path) -> Iterator[Path]:
    """Hold `.<name>.lock` next to `out` while writing it; a second holder gets an OutputError naming the pid."""
    out = Path(out)
    path = out.with_name(f".{out.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _try_lock(path, f"{out} is being written by another refusal_jax process (pid {{holder}}, lock {path}); "
                             "wait for it to finish, or use another --out")
        # the file may have been unlinked by the previous holder between our open and flock: retry on a new one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def move_aside(out: Path) -> Path:
    """Rename an existing output to `<out>.previous-<timestamp>` (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out.with_name(f"{out.name}.previous-{stamp}")
    k = 1
    while dest.exists():
        dest = out.with_name(f"{out.name}.previous-{stamp}-{k}")
        k += 1
    os.replace(out, dest)
    return dest


@contextlib.contextmanager
def atomic_output(out, *, overwrite: bool, sources: Iterable = (), directory: bool = True, kind: str = "output",
                  flag: str = "--out", create_parents: bool = False, cache_entry: bool = False) -> Iterator[Path]:
    """Write an output atomically and safely: yields the partial path to write (a fresh directory when
    `directory`), then moves any previous output aside and renames the partial into place.

    Checks `check_target` first (again, under the lock), cleans stale partials, removes its own partial on any
    failure or interruption, and writes the marker into a directory output.
    """
    target_kind = kind if directory else None
    out = check_target(out, overwrite=overwrite, sources=sources, directory=directory, flag=flag,
                       create_parents=create_parents, kind=target_kind, cache_entry=cache_entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lock(out):
        check_target(out, overwrite=overwrite, sources=sources, directory=directory, flag=flag, kind=target_kind,
                     cache_entry=cache_entry)
        clean_stale_partials(out)
        tmp = partial_path(out)
        if directory:
            tmp.mkdir()
        try:
            yield tmp
            if directory:
                write_marker(tmp, kind)
            if out.exists():
                previous = move_aside(out)
                print(f"moved the previous {out.name} aside to {previous}", file=sys.stderr)
            os.replace(tmp, out)
        except BaseException:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise


# ------------------------------------------------------------------------------------------------
# run directories (resumable: many artifacts, written one by one; see refusal_jax.runs)

_held: dict[Path, int] = {}


def check_run_dir(out, *, flag: str = "--out", create_parents: bool = False) -> Path:
    """A run directory must be new, empty, or a refusal_jax run (a "run" marker, or run_config.json without one),
    and never a model folder or inside the model cache; returns it resolved."""
    out = resolve_output(out, flag)
    if in_model_cache(out):
        raise OutputError(f"{flag} {out} is inside refusal_jax's model cache ({model_cache_root()}); a run needs a "
                          "folder of its own")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} is a file, not a directory")
        why = model_folder(out)
        if why:
            raise OutputError(f"{flag} {out} is not a refusal_jax run: {why}; a run needs a folder of its own")
        if (any(out.iterdir()) and marker_kind(out) != "run" and not (out / "run_config.json").is_file()):
            raise OutputError(f"{flag} {out} is a non-empty directory that is not a refusal_jax run; refusal_jax "
                              "writes runs only into a new or empty directory (or one of its own runs)")
        _probe_writable(out, flag)
        return out
    return _check_parent(out, flag, create_parents)


def hold_run_lock(out: Path) -> None:
    """Lock run directory `out` for the rest of this process (`<out>/.lock`; re-entrant within the process, released
    by the kernel when the process ends, so a lock left by a killed run is simply taken over)."""
    out = Path(out).resolve()
    if out in _held:
        return
    path = out / ".lock"
    fd = _try_lock(path, f"{out} is in use by another refusal_jax run (pid {{holder}}); wait for it to finish, or "
                         "use another --out")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[out] = fd
    for entry in out.rglob(".*"):  # artifacts half-written by a run that was killed
        m = _PARTIAL.match(entry.name)
        if m and entry.is_file():
            pid = int(m["pid"] or m["pid2"])
            if pid == os.getpid() or not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    entry.unlink()


def release_run_lock(out: Path) -> None:
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)

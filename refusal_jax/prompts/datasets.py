"""Instruction datasets: file loaders, the reference splits and their exact sampling, and bundled defaults.

Three sources of instructions:

* Files of the user's own (`load_instructions`, `load_records`): JSON, JSONL, CSV or TXT.
* The paper's splits (`reference_split`, `sample_reference`), read from a folder laid out like
  `dataset/` of andyrdt/refusal_direction (`splits/*.json`, `processed/*.json`). The sampling reproduces
  the reference's Python-`random` call order exactly, so the prompt sets are identical.
* Small bundled sets written for this package (`default_sets`, `sample_default`) so that a run works without
  any download: one-line harmful *requests* (never harmful content) and everyday Alpaca-like instructions.

Every failure is a `DataError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import random
from pathlib import Path
from typing import Any, Iterable

from refusal_jax import validate
from refusal_jax.errors import DataError

# Keys accepted for the instruction text, in order of preference (AdvBench uses `goal`, StrongREJECT-like
# sets `prompt`).
INSTRUCTION_KEYS = ("instruction", "goal", "prompt")
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".txt")
MAX_DATA_BYTES = 256 * 2**20  # an instruction file larger than this is refused before it is read

# name -> path inside a refusal_direction-style data folder.
REFERENCE_FILES = {
    "harmful_train": "splits/harmful_train.json",
    "harmful_val": "splits/harmful_val.json",
    "harmful_test": "splits/harmful_test.json",
    "harmless_train": "splits/harmless_train.json",
    "harmless_val": "splits/harmless_val.json",
    "harmless_test": "splits/harmless_test.json",
    "jailbreakbench": "processed/jailbreakbench.json",
}

REFERENCE_SEED = 42

_DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_HARMFUL_PATH = _DEFAULT_DIR / "default_harmful.json"
DEFAULT_HARMLESS_PATH = _DEFAULT_DIR / "default_harmless.json"


# ----------------------------------------------------------------------------------------------------------------
# Generic file loaders



def _parse_json(text: str, path, where: str):
    """json.loads with one-line DataErrors (`where`: "line N" of a .jsonl file, "" for a whole .json file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = where or f"line {e.lineno}"
        raise DataError(f"{path}: malformed JSON at {line}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: {where + ': ' if where else ''}JSON nested too deeply") from None

def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Loads instructions with their category from a JSON, JSONL, CSV or TXT file.

    Accepted layouts:

    * `.json`: a list of strings, or a list of objects with an `instruction` (or `goal`, or `prompt`) key.
    * `.jsonl`: one JSON string or object per line (blank lines skipped).
    * `.csv`: a header row with an `instruction`, `goal` or `prompt` column (optionally `category`).
    * `.txt`: one instruction per line; blank lines are skipped.

    Args:
        path: the file.

    Returns:
        A list of `{"instruction": str, "category": str | None}` dicts, in file order. `category` is taken from a
        `category` key/column where present, else None.

    Raises:
        DataError: missing file, unknown extension, malformed JSON (with line and column), entries that are not
            strings or lack a recognised key, or a file with no instructions at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unknown extension {ext!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
    try:
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise DataError(f"{path}: {size / 2**20:.0f} MiB is larger than the {MAX_DATA_BYTES // 2**20} MiB "
                            "refusal_jax reads from an instruction file")
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by spreadsheet tools
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")

    if ext == ".json":
        data = _parse_json(text, path, "")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
        records = [_entry_to_record(entry, path, f"entry {i}") for i, entry in enumerate(data)]
    elif ext == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            entry = _parse_json(line, path, f"line {lineno}")
            records.append(_entry_to_record(entry, path, f"line {lineno}"))
    elif ext == ".csv":
        records = _csv_records(text, path)
    else:  # .txt
        records = [{"instruction": line.strip(), "category": None} for line in text.splitlines() if line.strip()]

    if not records:
        raise DataError(f"{path}: contains zero instructions")
    return records


def load_instructions(path: str | Path) -> list[str]:
    """Loads instruction strings from a JSON, JSONL, CSV or TXT file (layouts as in `load_records`).

    Args:
        path: the file.

    Returns:
        The instructions, in file order.

    Raises:
        DataError: see `load_records`.
    """
    return [r["instruction"] for r in load_records(path)]


def _entry_to_record(entry: Any, path: Path, where: str) -> dict[str, Any]:
    if isinstance(entry, str):
        return {"instruction": _check_text(entry, path, where), "category": None}
    if isinstance(entry, dict):
        for key in INSTRUCTION_KEYS:
            if key in entry:
                category = entry.get("category")
                if category is not None and not isinstance(category, str):
                    raise DataError(f"{path}: {where}: 'category' must be a string or null, "
                                    f"got {type(category).__name__}")
                return {"instruction": _check_text(entry[key], path, f"{where} key {key!r}"), "category": category}
        found = ", ".join(repr(k) for k in entry) or "none"
        raise DataError(f"{path}: {where}: object has no instruction key (one of "
                        f"{', '.join(repr(k) for k in INSTRUCTION_KEYS)}); keys found: {found}")
    raise DataError(f"{path}: {where}: expected a string or an object, got {type(entry).__name__}")


def _check_text(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: instruction must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}: {where}: instruction is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path}: {where}: instruction is not valid Unicode (a lone surrogate escape?)") from None
    return value


def _csv_records(text: str, path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        return _csv_rows(reader, path)
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV near line {reader.line_num}: {e}") from None


def _csv_rows(reader: csv.DictReader, path: Path) -> list[dict[str, Any]]:
    header = reader.fieldnames or []
    key = next((k for k in INSTRUCTION_KEYS if k in header), None)
    if key is None:
        found = ", ".join(repr(h) for h in header) or "none"
        raise DataError(f"{path}: no instruction column (one of {', '.join(repr(k) for k in INSTRUCTION_KEYS)}); "
                        f"columns found: {found}")
    records = []
    for rowno, row in enumerate(reader, start=2):  # row 1 is the header
        value = row.get(key)
        if value is None or not value.strip():
            raise DataError(f"{path}: row {rowno}: empty {key!r}")
        category = row.get("category") or None
        records.append({"instruction": value, "category": category})
    return records


# ----------------------------------------------------------------------------------------------------------------
# Reference splits (andyrdt/refusal_direction `dataset/`)


def reference_split(data_dir: str | Path, name: str,
                    instructions_only: bool = False) -> list[dict[str, Any]] | list[str]:
    """Reads one of the reference splits from a refusal_direction-style data folder.

    Args:
        data_dir: folder with `splits/` and `processed/` (e.g. `shared/data/refusal_direction`).
        name: one of `harmful_{train,val,test}`, `harmless_{train,val,test}` or `jailbreakbench`.
        instructions_only: return plain instruction strings instead of records (the reference's
            `instructions_only=True`).

    Returns:
        A list of `{"instruction", "category"}` records, or of strings when `instructions_only`.

    Raises:
        DataError: unknown split name, or a missing/malformed file.
    """
    if name not in REFERENCE_FILES:
        raise DataError(f"unknown reference split {name!r}; expected one of {', '.join(REFERENCE_FILES)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: reference data folder not found")
    records = load_records(data_dir / REFERENCE_FILES[name])
    return [r["instruction"] for r in records] if instructions_only else records


def sample_reference(data_dir: str | Path, n_train: int = 128, n_val: int = 32) -> dict[str, Any]:
    """Samples the train/val instructions exactly as the reference's `load_and_sample_datasets` does.

    The reference calls `random.seed(42)` and then, on the global stream, `random.sample` on harmful_train
    (n_train), harmless_train (n_train), harmful_val (n_val) and harmless_val (n_val), in that order. Much later
    it draws the harmless test prompts with `random.sample(harmless_test_records, n_test)` from the same stream
    (nothing in between touches Python `random`). Here a dedicated `random.Random(42)` instance replaces the
    global one: it is the same Mersenne Twister seeded the same way, so it consumes the stream identically, and
    the global `random` state is left alone. The instance is returned in its post-draw state under `"rng"`;
    pass it to `sample_reference_test` to get the reference's harmless test prompts.

    Args:
        data_dir: refusal_direction-style data folder.
        n_train: harmful and harmless train samples (reference: 128).
        n_val: harmful and harmless val samples (reference: 32).

    Returns:
        `{"harmful_train", "harmless_train", "harmful_val", "harmless_val"}` as lists of instruction strings,
        plus `"rng"`: the `random.Random` positioned right after those four draws.

    Raises:
        DataError: missing files, or a split with fewer instructions than asked for.
    """
    rng = random.Random(REFERENCE_SEED)
    out: dict[str, Any] = {}
    for name, n in (("harmful_train", n_train), ("harmless_train", n_train),
                    ("harmful_val", n_val), ("harmless_val", n_val)):
        out[name] = _sample(rng, reference_split(data_dir, name, instructions_only=True), n, name)
    out["rng"] = rng
    return out


def sample_reference_test(rng: random.Random, data_dir: str | Path, n_test: int = 100) -> list[dict[str, Any]]:
    """Draws the harmless test records the way the reference does, continuing the stream of `sample_reference`.

    Args:
        rng: the `"rng"` returned by `sample_reference` (it is advanced in place, like the global stream).
        data_dir: refusal_direction-style data folder.
        n_test: number of harmless test prompts (reference: 100).

    Returns:
        `n_test` `{"instruction", "category"}` records (category is None for Alpaca).

    Raises:
        DataError: missing file, or fewer records than asked for.
    """
    return _sample(rng, reference_split(data_dir, "harmless_test"), n_test, "harmless_test")


def _sample(rng: random.Random, population: list, n: int, name: str) -> list:
    if n < 0:
        raise DataError(f"{name}: cannot sample a negative number ({n}) of prompts")
    if len(population) < n:
        raise DataError(f"{name}: asked for {n} prompts but only {len(population)} are available")
    return rng.sample(population, n)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional; needs the `datasets` package and network or a local cache)


def load_hf_dataset(name: str, split: str = "train", column: str = "instruction", n: int | None = None,
                    streaming: bool = False) -> list[str]:
    """Loads one text column of a Hugging Face hub dataset.

    The `datasets` package is an optional dependency, imported only here.

    Args:
        name: hub id, e.g. `"tatsu-lab/alpaca"`.
        split: split name.
        column: column holding the text.
        n: keep only the first n rows (None = all). With `streaming=True` only n rows are fetched.
        streaming: stream instead of downloading the whole split.

    Returns:
        The column's values as strings, in dataset order.

    Raises:
        DataError: `datasets` not installed, the hub unreachable (and no local cache), or a missing column.
    """
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise DataError(f"loading {name!r} from the Hugging Face hub needs the `datasets` package: "
                        "pip install datasets (or use a local JSON/JSONL/CSV/TXT file instead)") from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001  (network, auth and not-found errors all look different)
        raise DataError(f"could not load {name!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{e}); the hub may be unreachable (offline machine, HF_HUB_OFFLINE=1) and the dataset "
                        "is not in the local cache. Use a local file instead.") from e
    rows: Iterable[dict] = ds if n is None else itertools.islice(ds, n)
    out = []
    for row in rows:
        if column not in row:
            raise DataError(f"{name!r} split {split!r}: no column {column!r}; columns: {', '.join(row)}")
        out.append(str(row[column]))
    if not out:
        raise DataError(f"{name!r} split {split!r}: zero rows")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Bundled default sets


def default_records() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundled default sets as records.

    Returns:
        `(harmful, harmless)`: lists of `{"instruction", "category"}` dicts. Harmful records carry one of ten
        JailbreakBench-like categories; harmless ones have category None.
    """
    return load_records(DEFAULT_HARMFUL_PATH), load_records(DEFAULT_HARMLESS_PATH)


def default_sets() -> tuple[list[str], list[str]]:
    """The bundled default instruction sets.

    Returns:
        `(harmful, harmless)` instruction lists, in file order.
    """
    harmful, harmless = default_records()
    return [r["instruction"] for r in harmful], [r["instruction"] for r in harmless]


def sample_default(n_train: int, n_val: int, n_test: int, seed: int = 42) -> dict[str, list]:
    """Splits the bundled sets deterministically into disjoint train/val/test parts.

    Each set is shuffled with `random.Random(seed)` (its own instance per set, so the harmful split does not
    depend on the harmless set's size) and cut into consecutive slices, so the parts never overlap.

    Args:
        n_train: train prompts per set.
        n_val: val prompts per set.
        n_test: test prompts per set.
        seed: shuffle seed.

    Returns:
        `{"harmful_train", "harmless_train", "harmful_val", "harmless_val"}` as instruction strings and
        `{"harmful_test", "harmless_test"}` as `{"instruction", "category"}` records (as the reference keeps
        the category for evaluation sets).

    Raises:
        DataError: negative sizes, or more prompts asked for than a set holds.
    """
    out: dict[str, list] = {}
    for kind, records in zip(("harmful", "harmless"), default_records()):
        sizes = {"train": n_train, "val": n_val, "test": n_test}
        if any(v < 0 for v in sizes.values()):
            raise DataError(f"sample sizes must be non-negative, got {sizes}")
        total = n_train + n_val + n_test
        if total > len(records):
            raise DataError(f"bundled {kind} set has {len(records)} prompts, but {n_train}+{n_val}+{n_test}="
                            f"{total} were asked for")
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        out[f"{kind}_train"] = [r["instruction"] for r in shuffled[:n_train]]
        out[f"{kind}_val"] = [r["instruction"] for r in shuffled[n_train:n_train + n_val]]
        out[f"{kind}_test"] = [dict(r) for r in shuffled[n_train + n_val:total]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The commands' train / val / test sets


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Where the commands' prompt sets come from (the "data" flags).

    harmful / harmless: instruction files (None = the bundled sets). data_dir: a folder laid out like the
    reference's dataset/, sampled exactly as the reference (used when neither file is given). n_train / n_val /
    n_test: prompts per set before filtering; seed: shuffling seed for files and the bundled sets.
    """

    harmful: str | None = None
    harmless: str | None = None
    data_dir: str | None = None
    n_train: int = 128
    n_val: int = 32
    n_test: int = 100
    seed: int = 42

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_test"):
            validate.integer(getattr(self, name), name, low=1)


def sample_sets(s: DataSettings) -> tuple[dict[str, list], dict]:
    """Train/val instruction lists ("harmful_train", "harmless_val", ...) and eval/test records
    ("harmful_test", "harmless_test"), plus a description of the source for the run config.

    "harmful_val_pool" lists spare harmful prompts to draw more val prompts from (independent of n_test): the
    rest of the reference's harmful val split (shuffled with `seed`), or the harmful list from its end (for the
    bundled sets and files, so test prompts come last; a drawn test prompt must then leave the test set)."""
    if s.data_dir and not (s.harmful or s.harmless):
        sampled = sample_reference(s.data_dir, s.n_train, s.n_val)
        rng = sampled.pop("rng")
        sampled["harmful_test"] = reference_split(s.data_dir, "jailbreakbench")[: s.n_test]
        sampled["harmless_test"] = sample_reference_test(rng, s.data_dir, s.n_test)
        taken = set(sampled["harmful_val"])
        spare = [x for x in reference_split(s.data_dir, "harmful_val", instructions_only=True) if x not in taken]
        random.Random(s.seed).shuffle(spare)
        sampled["harmful_val_pool"] = spare
        return sampled, {"source": "reference_splits", "harmful_eval_name": "jailbreakbench"}
    bundled_harmful, bundled_harmless = default_records()
    out, source = {}, {}
    for kind, path, bundled in (("harmful", s.harmful, bundled_harmful), ("harmless", s.harmless, bundled_harmless)):
        records = load_records(path) if path else bundled
        source[kind] = str(path) if path else "bundled"
        records = list(records)
        random.Random(s.seed).shuffle(records)
        need = s.n_train + s.n_val
        if len(records) < need + 1:
            raise DataError(f"{source[kind]} {kind} set has {len(records)} prompts; --n-train {s.n_train} + "
                            f"--n-val {s.n_val} need {need}, plus at least one test prompt")
        out[f"{kind}_train"] = [r["instruction"] for r in records[: s.n_train]]
        out[f"{kind}_val"] = [r["instruction"] for r in records[s.n_train:need]]
        out[f"{kind}_test"] = records[need: need + s.n_test]
        if kind == "harmful":
            out["harmful_val_pool"] = [r["instruction"] for r in reversed(records[need:])]
    source["harmful_eval_name"] = "harmful"
    return out, source

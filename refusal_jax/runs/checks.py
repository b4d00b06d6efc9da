"""Flag and input validation before anything expensive: one place for the flags every run command shares
(`common_args`), one function per command for its own flags. Everything here is cheap: file existence, numeric
ranges, and the model's layer count read from its config (no weights are loaded).
"""

from __future__ import annotations

import math
from pathlib import Path

from refusal_jax.errors import DataError
from refusal_jax.runs.rundir import read_direction_metadata

MAX_NEW_TOKENS = 32768  # upper bound of every generation-length flag
DEFAULT_MAX_PROMPT_TOKENS = 4096  # --max-prompt-tokens default: longer templated prompts are refused (or truncated)


def positive_int(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def finite(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and math.isnan(value):
            raise DataError(f"--{name.replace('_', '-')} is NaN; give a number")


def existing_file(path, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise DataError(f"{flag} {path}: not a file")
    return p


def generation_length(value: int, flag: str = "--max-new-tokens") -> None:
    if not 1 <= value <= MAX_NEW_TOKENS:
        raise DataError(f"{flag} must be between 1 and {MAX_NEW_TOKENS}, got {value}")


def model_config(src: str):
    """The ModelConfig of a model source without loading its weights, or None when that needs a download (hub id).

    Raises:
      RefusalJaxError: a missing or malformed model (the same error the load would give, only sooner).
    """
    from refusal_jax.convert import bundled, checkpoint

    path = Path(str(src)).expanduser()
    if path.is_dir() and checkpoint.is_converted(path):
        return checkpoint.load_config(path)
    if bundled.is_known_model(str(src)):  # its cached conversion, if any (else the load converts it first)
        for converted in sorted((bundled.cache_root() / "converted").glob(f"{bundled.resolve_name(str(src))}-*")):
            if checkpoint.is_converted(converted):
                return checkpoint.load_config(converted)
        return None
    if path.is_file():
        from refusal_jax.convert.gguf import read_gguf
        from refusal_jax.model.config import from_hf_config

        src_gguf = read_gguf(path, strict=False)
        return from_hf_config(src_gguf.hf_config, strict=False)
    if path.is_dir():
        from refusal_jax.convert.hf import read_hf_config
        from refusal_jax.model.config import from_hf_config

        return from_hf_config(read_hf_config(path), strict=False)
    if str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        return None  # a hub id
    raise DataError(f"--model {src}: no such file or directory, and not a bundled model name or hub id")


def metadata_layer(direction_path) -> int | None:
    """The selected layer in direction_metadata.json next to a direction file (or in its run folder), if any."""
    path = Path(direction_path).expanduser()
    meta = (path if path.is_dir() else path.parent) / "direction_metadata.json"
    return read_direction_metadata(meta)["layer"] if meta.exists() else None


def direction_and_layer(args, layer: int | None = None) -> None:
    """--direction's width and `layer` checked against the model's config before the model loads, when the config
    can be read alone (else the commands check them right after the load).

    Raises:
      DataError: naming the flag.
    """
    from refusal_jax.method.orthogonalization import load_direction  # method imports runs: a cycle at module level

    cfg = model_config(args.model)
    if cfg is None:
        return
    if getattr(args, "direction", None):
        load_direction(args.direction, cfg.d_model)
    if layer is not None and not 0 <= layer < cfg.n_layers:
        raise DataError(f"--layer {layer} out of range: the model has layers 0..{cfg.n_layers - 1}")


def common_args(args) -> None:
    """The flags of `cli.add_common_args`, checked before the model loads.

    Raises:
      RefusalJaxError: naming the flag.
    """
    from refusal_jax.runs import outputs

    positive_int(args, "n_train", "n_val", "n_test", "batch_size", "chunk", "max_prompt_tokens")
    finite(args, "kl_threshold", "induce_threshold", "prune_layer_fraction")
    if not 0.0 <= args.prune_layer_fraction < 1.0:
        raise DataError(f"--prune-layer-fraction must be in [0, 1), got {args.prune_layer_fraction}")
    if args.data_dir and (args.harmful or args.harmless):
        raise DataError("--data-dir cannot be combined with --harmful / --harmless: give either the reference data "
                        "folder or your own instruction files")
    if args.data_dir and not Path(args.data_dir).expanduser().is_dir():
        raise DataError(f"--data-dir {args.data_dir}: no such directory")
    for flag, path in (("--harmful", args.harmful), ("--harmless", args.harmless)):
        if path:
            existing_file(path, flag)
    if args.positions is not None:
        bad = [p for p in args.positions if p >= 0]
        if bad:
            raise DataError(f"--positions {bad[0]} out of range: post-instruction positions are negative (-1 is the "
                            "last token)")
    if args.out:
        outputs.check_run_dir(args.out)
    cfg = model_config(args.model)
    if cfg is not None:
        model_args(args, cfg)


def model_args(args, cfg) -> None:
    """Flags checked against the model's config (before the model loads when its config can be read alone, else
    right after the load, before stage 1)."""
    if args.layers is not None and args.layers != "middle":  # "middle" is computed from the model
        bad = [layer for layer in args.layers if not 0 <= layer < cfg.n_layers]
        if bad:
            raise DataError(f"--layers: layer {bad[0]} out of range: the model has layers 0..{cfg.n_layers - 1}")


def pipeline_args(args) -> None:
    """The flags of `cli.add_completion_args`."""
    positive_int(args, "gen_batch_size", "loss_batch_size")
    generation_length(args.max_new_tokens)
    for path in args.loss_texts or []:
        existing_file(path, "--loss-texts")


def prompt_lengths(data: dict, tokenizer, fmt, max_tokens: int, *, truncate: bool = False) -> dict:
    """Every templated prompt of `data` ({set name: instructions or {"instruction": ...} records}) within
    `max_tokens`, checked before any forward pass: one overlong prompt would make XLA allocate for its length
    across a whole batch. Returns `data`, with overlong instructions cut to fit when `truncate` (and a warning).

    Raises:
      DataError: naming the set, the prompt's index and its start, when a prompt is too long and not `truncate`.
    """
    import sys

    from refusal_jax.prompts import templates

    out = {}
    for key, values in data.items():
        texts = [v["instruction"] if isinstance(v, dict) else v for v in values]
        if not texts:
            out[key] = values
            continue
        prompts = templates.format_instructions(fmt, texts)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        fixed = list(values)
        for i, (text, n) in enumerate(zip(texts, lengths)):
            if n <= max_tokens:
                continue
            if not truncate:
                raise DataError(f"{key} prompt {i} ({text[:50]!r}...) is {n} tokens long with the chat template, "
                                f"more than --max-prompt-tokens {max_tokens}; raise it, remove the prompt, or pass "
                                "--truncate-prompts")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = len(ids) - (n - max_tokens)
            if keep < 1:
                raise DataError(f"{key} prompt {i}: the chat template alone is longer than --max-prompt-tokens "
                                f"{max_tokens}")
            short = tokenizer.decode(ids[:keep])
            print(f"warning: {key} prompt {i} ({text[:40]!r}...) cut from {n} to at most {max_tokens} tokens",
                  file=sys.stderr)
            fixed[i] = {**values[i], "instruction": short} if isinstance(values[i], dict) else short
        out[key] = fixed
    return out


def optimize_args(args) -> None:
    """The flags of `python -m refusal_jax.optimize`."""
    positive_int(args, "steps", "gen_batch_size", "checkpoint_every")
    finite(args, "lr", "ablation_weight", "addition_weight", "retain_weight", "independence_weight", "add_scale")
    if not args.lr > 0 or math.isinf(args.lr):
        raise DataError(f"--lr must be a positive number, got {args.lr}")
    generation_length(args.target_tokens, "--target-tokens")
    for flag, path in (("--targets", args.targets), ("--independent-of", args.independent_of)):
        if path:
            existing_file(path, flag)
    if not Path(args.direction).expanduser().exists():
        raise DataError(f"--direction {args.direction}: no such file or directory")


def compare_args(args) -> None:
    """The flags of `python -m refusal_jax.compare`."""
    positive_int(args, "gen_batch_size", "loss_batch_size", "n_boot")
    generation_length(args.max_new_tokens)
    if args.optimized and not Path(args.optimized).expanduser().exists():
        raise DataError(f"--optimized {args.optimized}: no such file or directory")


def edit_args(args) -> None:
    """Inputs of the weight-editing exports (orthogonalize, export_gguf): every path exists before the model loads."""
    # (--direction is checked right after by orthogonalize.load_direction, also before the model loads)
    for flag, path in (("--harmless-mean", getattr(args, "harmless_mean", None)),
                       ("--tokenizer-gguf", getattr(args, "tokenizer_gguf", None))):
        if path and not Path(path).expanduser().exists():
            raise DataError(f"{flag} {path}: no such file or directory")
    if getattr(args, "tokenizer_gguf", None):
        existing_file(args.tokenizer_gguf, "--tokenizer-gguf")

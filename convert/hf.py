"""Hugging Face checkpoints (local directory or hub id) -> (ModelConfig, Params, tokenizer), without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from refusal_jax.convert import engine, fused, mxfp4, safetensors_io
from refusal_jax.errors import CheckpointError, ConfigError
from refusal_jax.model.config import ModelConfig, from_hf_config
from refusal_jax.model.params import Params

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_hf_dir(src: str) -> Path:
    """A local HF model directory, or a hub id downloaded (safetensors + tokenizer files only) to the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src} is a file, not a Hugging Face model directory")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CheckpointError(f"{src}: no such directory, and not a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network errors, gated repos, unknown ids: all end the same way for the user
        raise CheckpointError(f"could not download {src} from the Hugging Face hub: {type(e).__name__}: {e}") from None


def read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{model_dir}: no config.json")
    try:
        if path.stat().st_size > 16 * 2**20:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config.json")
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: malformed JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def load_hf(
    src: str,
    *,
    dtype=np.float32,
    strict_config: bool = True,
    on_tensor: Callable[[str], None] | None = None,
    with_tokenizer: bool = True,
) -> tuple[ModelConfig, Params, object | None]:
    """Convert a Hugging Face safetensors checkpoint.

    Args:
      src: local directory (config.json + model.safetensors or a sharded index) or a hub id.
      dtype: numpy dtype of the converted params.
      strict_config: refuse unknown config attributes (see `refusal_jax.model.config.from_hf_config`).
      on_tensor: called once per placed tensor.
      with_tokenizer: also load the tokenizer (transformers AutoTokenizer; no torch needed).
    """
    model_dir = resolve_hf_dir(src)
    cfg = from_hf_config(read_hf_config(model_dir), strict=strict_config)
    if with_tokenizer:
        check_tokenizer_files(model_dir)
    if cfg.family == "qwen":  # Qwen-1: remote-code checkpoint, read without its code (convert/qwen1.py)
        from refusal_jax.convert import qwen1

        params = qwen1.fill_params(cfg, model_dir, dtype=dtype, on_tensor=on_tensor)
        return cfg, params, (qwen1.load_tokenizer(model_dir) if with_tokenizer else None)
    engine.check_sizes(cfg, safetensors_io.numel(safetensors_io.model_files(model_dir)), str(model_dir))
    tensors = safetensors_io.iter_model(model_dir)
    if mxfp4.check_quantization(read_hf_config(model_dir), cfg.family):  # gpt-oss release: experts dequantized
        tensors = mxfp4.dequantized(tensors, str(model_dir))
    tensors = fused.wrap(cfg, tensors, str(model_dir))  # Phi-3: fused q/k/v and gate/up split
    params = engine.fill_params(cfg, tensors, dtype=dtype, on_tensor=on_tensor, source=str(model_dir))
    tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
    return cfg, params, tokenizer


def sharded_source(model_dir: Path, *, strict: bool = True):
    """The safetensors checkpoint in `model_dir` opened for `placement.place_params` (tensors memory-mapped, read
    only when placed)."""
    from refusal_jax.convert.placement import ShardedSource

    model_dir = Path(model_dir)
    cfg = from_hf_config(read_hf_config(model_dir), strict=strict)
    loaders, duplicates = {}, []
    for path in safetensors_io.model_files(model_dir):
        for name, array in safetensors_io.iter_file(path):
            if name in loaders:
                duplicates.append(name)
            loaders[name] = (lambda a=array: a)
    if mxfp4.check_quantization(read_hf_config(model_dir), cfg.family):  # each pair dequantized when placed
        for name in [n for n in loaders if n.endswith("_blocks")]:
            base = name[: -len("_blocks")]
            if base + "_scales" not in loaders:
                raise CheckpointError(f"{model_dir}: MXFP4 tensor {name} has no {base}_scales")
            blocks, scales = loaders.pop(name), loaders.pop(base + "_scales")
            loaders[base] = (lambda b=base, x=blocks, y=scales: mxfp4.dequantize(b, x(), y()))
    return ShardedSource(str(model_dir), cfg, loaders, lambda: load_tokenizer(model_dir), duplicates=tuple(duplicates))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken",
                   "qwen.tiktoken")


def check_tokenizer_files(model_dir: Path) -> None:
    """Refuse an HF directory without tokenizer files up front (AutoTokenizer would otherwise build a useless
    one-token tokenizer from whatever it finds, and the run fail much later)."""
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the model's "
                              "tokenizer into this directory")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise CheckpointError(f"{model_dir}: could not load the tokenizer: {type(e).__name__}: {e}") from None


def n_tensors(src_dir: Path) -> int:
    return sum(len(safetensors_io.read_header(p)[0]) for p in safetensors_io.model_files(src_dir))

"""python -m refusal_jax.convert SRC --out DIR: convert a model once into a refusal_jax checkpoint."""

from __future__ import annotations

import argparse
import time

from refusal_jax.runs import cli
from refusal_jax.runs.cli import main_wrapper


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m refusal_jax.convert",
        description="Convert a Hugging Face safetensors model (directory or hub id), a GGUF file, or a bundled model "
                    "(short name, e.g. qwen2.5-coder-0.5b-instruct) into a refusal_jax checkpoint "
                    "(orbax params + versioned config + tokenizer).")
    p.add_argument("src", help="HF model directory, HF hub id (owner/name), .gguf file, or bundled model name")
    p.add_argument("--out", required=True,
                   help="output directory; its parent must exist (must not exist unless --overwrite; required)")
    cli.add_dtype_flag(p, "parameter dtype of the converted checkpoint (default float32)")
    cli.add_overwrite_flag(p)
    cli.add_strict_config_flag(p)
    cli.add_progress_flag(p)
    return p


@main_wrapper
def main(argv=None):
    args = parser().parse_args(argv)
    from refusal_jax.convert import checkpoint
    from refusal_jax.convert.loading import convert_source
    from refusal_jax.runs import outputs

    out = outputs.check_target(args.out, overwrite=args.overwrite, sources=[args.src], kind="checkpoint")
    t0 = time.perf_counter()
    cfg, params, tokenizer = convert_source(args.src, dtype=args.dtype, strict_config=not args.no_strict_config,
                                            progress=not args.no_progress)
    path = checkpoint.save(out, cfg, params, tokenizer, source=args.src, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    print(f"  {cfg.architecture} ({cfg.family}): {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{cfg.n_heads}/{cfg.n_kv_heads} heads of {cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
          f"{cfg.n_params / 1e6:.1f}M params, {args.dtype}")
    print(f"  files: {checkpoint.CONFIG_FILE}, {checkpoint.MANIFEST_FILE}, params/ (orbax)"
          + (", tokenizer/" if tokenizer is not None else ""))
    print(f"  load it with: refusal_jax.load_model({str(path)!r})")


if __name__ == "__main__":
    main()

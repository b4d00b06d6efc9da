"""python -m refusal_jax.orthogonalize --model SRC --direction DIR/direction.npy --out OUT: a weight-orthogonalized
Hugging Face model (the edit itself: refusal_jax.method.orthogonalization and refusal_jax.method.edits)."""

from __future__ import annotations

from refusal_jax.errors import DataError
from refusal_jax.method.orthogonalization import (
    SITE_NAMES,
    edit_weights,
    load_direction,
    max_projection,
    residual_write_norms,
    streaming_edit,
    untied_config,
)
from refusal_jax.runs import cli
from refusal_jax.runs.cli import main_wrapper
from refusal_jax.validate import real_arg


def parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m refusal_jax.orthogonalize",
        description="Weight orthogonalization (Arditi et al. 2024, sec. 4): project the refusal direction out of "
                    "every matrix that writes into the residual stream (embedding, attention o_proj, MLP down_proj) "
                    "and save the edited model as a Hugging Face checkpoint that loads with "
                    "transformers.AutoModelForCausalLM.from_pretrained(OUT). Tied embeddings are untied (the LM "
                    "head keeps the original matrix), so the edited model equals inference-time directional "
                    "ablation. Gemma-2/3 are refused: their post-norms make the edit inexact.")
    p.add_argument("--model", required=True, help=f"the model to edit: {cli.MODEL_SOURCES} (required)")
    cli.add_direction_flag(p, "the refusal direction to project out of the weights (normalised)", required=True)
    p.add_argument("--out", required=True,
                   help="output Hugging Face model directory (config.json, generation_config.json, "
                        "model.safetensors or shards + index, tokenizer files); must not exist unless --overwrite "
                        "(required)")
    cli.add_dtype_flag(p, "dtype the model is loaded in and the edited weights are saved in (default float32; the "
                          "projection itself is computed in float32)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="also save the edited model as a converted refusal_jax checkpoint in DIR (loads fast with "
                        "refusal_jax.load_model; default: none)")
    p.add_argument("--shard-size", type=real_arg("--shard-size", low=0, low_open=True), default=2.0, metavar="GB",
                   help="split model.safetensors into shards of at most this many GiB (default 2)")
    cli.add_overwrite_flag(p, "replace --out (and --checkpoint) if they exist and are refusal_jax outputs (never "
                               "the source or a folder holding it); old ones are moved aside to "
                               "OUT.previous-<timestamp>")
    cli.add_strict_config_flag(p)
    cli.add_progress_flag(p)
    cli.add_edit_flags(p)
    return p


def _source_hf_config(src: str) -> dict:
    """Keys of the source's config.json worth carrying over (ModelConfig does not hold them)."""
    import json
    from pathlib import Path

    path = Path(src).expanduser() / "config.json"
    if not path.is_file():
        return {}
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: hf[k] for k in ("max_position_embeddings",) if hf.get(k) is not None}


@main_wrapper
def main(argv=None):
    import time

    from refusal_jax.convert import checkpoint, export_hf
    from refusal_jax.convert.loading import load_model
    from refusal_jax.errors import CheckpointError
    from refusal_jax.method import edits
    from refusal_jax.runs import checks, outputs

    args = parser().parse_args(argv)
    sources = [args.model, args.direction, args.harmless_mean]
    checks.edit_args(args)
    out = outputs.check_target(args.out, overwrite=args.overwrite, sources=sources, kind="hf_export")
    ckpt = (outputs.check_target(args.checkpoint, overwrite=args.overwrite, sources=sources, flag="--checkpoint",
                                 kind="checkpoint")
            if args.checkpoint else None)
    if ckpt is not None and ckpt == out:
        raise CheckpointError("--checkpoint and --out must be different directories")
    if args.shard_size <= 0:
        raise CheckpointError(f"--shard-size must be positive, got {args.shard_size}")
    t0 = time.perf_counter()
    load_direction(args.direction, None)  # fail fast on a bad file, before the (slow) model load
    checks.direction_and_layer(args)  # and on a width that does not fit the model, where its config says so
    if args.method == "projected" and not args.harmless_mean:
        raise DataError("--method projected needs --harmless-mean")
    params, cfg, tokenizer = load_model(args.model, dtype=args.dtype, strict_config=not args.no_strict_config,
                                        progress=not args.no_progress, on_device=False)
    direction = load_direction(args.direction, cfg.d_model)
    mean = (edits.load_harmless_mean(args.harmless_mean, cfg, args.direction) if args.harmless_mean else None)
    basis, preserve_norm = edits.edit_basis(direction, args.method, mean)
    for line in edits.describe(args.method, direction, mean):
        print(line)
    before = residual_write_norms(params, direction)
    ocfg = untied_config(cfg)
    # Edit tensor by tensor while writing, so the export holds the model plus one edited tensor.
    edit = streaming_edit(cfg, basis, preserve_norm=preserve_norm)
    after: dict[str, float] = {}

    def edit_and_measure(field, layer, w):
        w = edit(field, layer, w)
        if field in SITE_NAMES:
            after[SITE_NAMES[field]] = max(after.get(SITE_NAMES[field], 0.0), max_projection(w, direction))
        return w

    from refusal_jax.convert import engine
    from refusal_jax.runs.progress import progress_bar

    n_tensors = len(engine.hf_tensor_plan(ocfg))
    with progress_bar(n_tensors, f"writing {out.name}", not args.no_progress, unit="tensor") as bar:
        path = export_hf.save_hf(out, ocfg, params, tokenizer, dtype=args.dtype,
                                 shard_size=int(args.shard_size * 2**30), overwrite=args.overwrite, sources=sources,
                                 extra_config=_source_hf_config(args.model), edit=edit_and_measure,
                                 on_tensor=lambda _: bar.update())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    weights = sorted(f.name for f in path.glob("model*.safetensors*"))
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {args.dtype}) in {time.perf_counter() - t0:.1f} s")
    print(f"  {cfg.architecture} ({cfg.family}): {cfg.n_layers} layers, d_model {cfg.d_model}; direction "
          f"{'[' + str(cfg.d_model) + ']' if direction.ndim == 1 else list(direction.shape)} from {args.direction}")
    print(f"  files: config.json, generation_config.json, {', '.join(weights)}"
          + (", tokenizer files" if tokenizer is not None else ""))
    if cfg.tie_embeddings:
        print("  the tied embedding was untied: lm_head.weight keeps the original matrix (tie_word_embeddings=false)")
    print("  max |W r̂| before -> after (residual-writing matrices):")
    for name in before:
        print(f"    {name:<10} {before[name]:.3e} -> {after[name]:.3e}")
    if args.dtype != "float32":
        print(f"    (the edit is computed in float32; what is left is the {args.dtype} rounding of the edited weights)")
    if ckpt is not None:
        edited = edit_weights(params, cfg, basis, preserve_norm=preserve_norm)
        del params
        cpath = checkpoint.save(ckpt, ocfg, edited, tokenizer, source=f"{args.model} orthogonalized against "
                                f"{args.direction}", overwrite=args.overwrite, sources=sources)
        print(f"  refusal_jax checkpoint: {cpath} (load with refusal_jax.load_model({str(cpath)!r}))")
    print(f"  load it with: transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


if __name__ == "__main__":
    main()

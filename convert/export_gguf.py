"""python -m refusal_jax.convert.export_gguf: write a model, optionally orthogonalized first, as a llama.cpp GGUF
file (the writer: refusal_jax.convert.gguf_writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refusal_jax.convert.gguf_writer import GGUF_ARCH, TENSOR_TYPES, edit_metadata, save_gguf, stacked_plan


def parser():
    import argparse

    from refusal_jax.runs import cli

    p = argparse.ArgumentParser(prog="python -m refusal_jax.convert.export_gguf", description=(
        "Write a model as a llama.cpp GGUF file, optionally edited first (--direction: weight orthogonalization "
        "with --method plain / projected / norm-preserving, see python -m refusal_jax.orthogonalize). From a GGUF "
        "source the tokenizer metadata is copied and --type source keeps each tensor's type where gguf can "
        "encode it (else Q8_0)."))
    p.add_argument("--model", required=True,
                   help="the model: .gguf file, bundled model name, converted checkpoint, HF model dir or hub id "
                        "(required); a large .gguf is converted once and reused from the cache")
    p.add_argument("--out", required=True, help="the output .gguf file (required)")
    p.add_argument("--type", default=None, choices=TENSOR_TYPES,
                   help="tensor type: f32, f16, bf16, q8_0, or source = each tensor's type in the source GGUF "
                        "where gguf can write it, else Q8_0 (default: source for a GGUF or bundled model, else f16)")
    cli.add_direction_flag(p, "orthogonalize the weights against this direction first",
                           default="none, export unedited")
    cli.add_edit_flags(p)  # --method, --harmless-mean (used with --direction)
    p.add_argument("--tokenizer-gguf", default=None, metavar="FILE.gguf",
                   help="copy tokenizer metadata from this GGUF file (default: --model when it is a .gguf or a "
                        "bundled model)")
    p.add_argument("--name", default=None,
                   help="general.name (default: the source's, with ' (refusal direction orthogonalized)' "
                        "appended when --direction is given)")
    cli.add_overwrite_flag(p, "replace --out if it is a GGUF file refusal_jax wrote; the old file is moved aside to "
                              "OUT.previous-<timestamp>, not deleted (default: refuse)")
    cli.add_progress_flag(p)
    return p


def main(argv=None):
    from refusal_jax.runs.cli import main_wrapper

    return main_wrapper(_main)(argv)


def _main(argv=None):
    import time

    import jax

    from refusal_jax.convert.loading import load_model
    from refusal_jax.method import edits
    from refusal_jax.method.orthogonalization import load_direction, untied_config

    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    from refusal_jax.runs import checks, outputs

    sources = [args.model, args.tokenizer_gguf, args.direction, args.harmless_mean]
    checks.edit_args(args)
    out = outputs.check_target(args.out, overwrite=args.overwrite, sources=sources, directory=False)
    from refusal_jax.convert import bundled

    model_path = Path(args.model).expanduser()
    if bundled.is_known_model(args.model) and not model_path.exists():
        model_path = bundled.model_path(args.model, progress=not args.no_progress)
    is_gguf = model_path.suffix == ".gguf" and model_path.is_file()
    tok_src = args.tokenizer_gguf or (str(model_path) if is_gguf else None)
    tensor_type = args.type or ("source" if tok_src else "f16")
    if args.direction:
        load_direction(args.direction, None)
    if args.method == "projected" and args.direction and not args.harmless_mean:
        from refusal_jax.errors import DataError

        raise DataError("--method projected needs --harmless-mean (e.g. RUN/generate_directions/mean_harmless.npy)")
    params, cfg, _ = load_model(str(model_path) if is_gguf else args.model, progress=not args.no_progress)
    notes, metadata, name = [], {}, args.name
    if args.direction:
        direction = load_direction(args.direction, cfg.d_model)
        metadata = edit_metadata(direction, args.method, args.direction)
        if name is None:
            from refusal_jax.convert.gguf import read_gguf

            base = read_gguf(tok_src, strict=False).metadata.get("general.name") if tok_src else None
            name = f"{base or model_path.stem} (refusal direction orthogonalized)"
        mean = edits.load_harmless_mean(args.harmless_mean, cfg, args.direction) if args.harmless_mean else None
        params = edits.edit(params, cfg, direction, args.method, mean)
        cfg = untied_config(cfg)
        notes.append(f"orthogonalized ({args.method}) against {args.direction}")
    params = jax.tree.map(np.asarray, params)
    from refusal_jax.runs.progress import progress_bar

    with progress_bar(len(stacked_plan(cfg)), f"writing {out.name}", not args.no_progress,
                      unit="tensor") as bar:
        res = save_gguf(out, cfg, params, tokenizer_source=tok_src, tensor_type=tensor_type, name=name,
                        metadata=metadata, overwrite=args.overwrite, sources=sources, on_tensor=lambda _: bar.update())
    size = res["path"].stat().st_size
    print(f"wrote {res['path']} ({size / 2**20:.1f} MiB, {GGUF_ARCH[cfg.family]}) in {time.perf_counter() - t0:.1f} s")
    print(f"  tensor types: {', '.join(f'{k} x{v}' for k, v in sorted(res['counts'].items()))}")
    if res["type_changes"]:
        src_size = Path(tok_src).stat().st_size
        why = " (gguf cannot write them)" if tensor_type == "source" else f" (--type {tensor_type})"
        print(f"  types changed from the source{why}: "
              f"{', '.join(f'{k} x{v}' for k, v in sorted(res['type_changes'].items()))}; "
              f"{src_size / 2**20:.1f} MiB -> {size / 2**20:.1f} MiB ({size / src_size:.2f}x)")
    if metadata:
        print(f"  general.name {name!r}; metadata: " + ", ".join(f"{k} = {v}" for k, v in metadata.items()))
    for note in notes:
        print(f"  {note}")
    if tok_src:
        print(f"  tokenizer and general metadata copied from {tok_src} ({len(res['copied_keys'])} keys)")
    else:
        print("  no tokenizer metadata (the source is not a GGUF file): llama.cpp cannot run this file as is")


if __name__ == "__main__":
    main()

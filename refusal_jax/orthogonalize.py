"""Weight orthogonalization: a Params -> Params edit equivalent to directional ablation at inference time.

Every matrix that writes into the residual stream (token embedding, attention output projections, MLP down
projections) loses its component along r̂: W <- W - (W r̂) r̂ᵀ on the d_model axis. Then no block can write r̂ into
the residual, which is what hook-based ablation enforces (paper App. E).

Gemma-2/3 apply an RMSNorm *after* attention/MLP and before the residual add; projecting o/down does not remove
r̂ from a normed output, so for those families orthogonalization is not equivalent and we refuse it (use the
inference-time ablation, which acts on the tensors actually added).

Tied embeddings: the unembedding is the embedding matrix. Orthogonalizing it in place would also ablate r̂ from
the final normed residual before the LM head, which hook-based ablation does not do. We untie: the LM head keeps
the original embedding (transposed), so the edited model equals the ablated one.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from refusal_jax.runs.cli import main_wrapper
from refusal_jax.model.config import ModelConfig
from refusal_jax.runs import rundir as runs
from refusal_jax.errors import ConfigError, DataError
from refusal_jax.model.params import Params


def _unit_basis(direction) -> np.ndarray:
    """float32 [1, D] unit direction, or an [R, D] basis as given (rows assumed orthonormal, see subspace)."""
    d = np.asarray(direction, np.float64)
    if d.ndim == 1:
        norm = float(np.linalg.norm(d))
        if not norm > 0 or not np.isfinite(norm):
            raise DataError(f"cannot orthogonalize against a direction of norm {norm}")
        d = (d / norm)[None]
    return d.astype(np.float32)


EDITED_FIELDS = ("embed", "layers.o", "layers.down")  # the matrices whose rows write into the residual stream


def project_rows(w, basis, *, preserve_norm: bool = False, xp=jnp):
    """Remove span(basis) from the last axis (D) of w [..., D]; basis [R, D] or one per leading index [L, R, D].

    Computed in float32 and returned in w's dtype; with preserve_norm, each row is rescaled to its original norm
    (a row inside the span becomes zero). xp=np computes on the host (the streaming export's row blocks: no
    device copies); results then differ from jax.numpy's by float32 rounding only.
    """
    w32 = xp.asarray(w).astype(xp.float32)
    b = xp.asarray(basis, xp.float32)
    if b.ndim == 2:
        out = w32 - (w32 @ b.T) @ b  # [..., D] @ [D, R] @ [R, D]
    else:  # per layer: w [L, ..., D], b [L, R, D]
        flat = w32.reshape(w32.shape[0], -1, w32.shape[-1])
        out = (flat - (flat @ b.transpose(0, 2, 1)) @ b).reshape(w32.shape)
    if preserve_norm:
        before = xp.linalg.norm(w32, axis=-1, keepdims=True)
        after = xp.linalg.norm(out, axis=-1, keepdims=True)
        out = xp.where(after > 0, out * (before / xp.where(after > 0, after, 1.0)), 0.0)
    return out.astype(w.dtype)


def _check_editable(cfg: ModelConfig, basis: np.ndarray) -> None:
    if cfg.post_norms:
        raise ConfigError(
            f"weight edits are not equivalent to ablation for {cfg.family}: its post-attention/MLP norms rescale "
            "what is added to the residual. Use inference-time ablation instead.")
    if basis.ndim == 3 and basis.shape[0] != cfg.n_layers:
        raise DataError(f"per-layer basis has {basis.shape[0]} layers, the model {cfg.n_layers}")


def _field_basis(field: str, basis: np.ndarray, layer: int | None = None) -> np.ndarray:
    """The basis that edits `field` (or its layer slice): a per-layer basis edits the embedding with layer 0's."""
    if basis.ndim == 2:
        return basis
    if field == "embed":
        return basis[0]
    return basis if layer is None else basis[layer]


def edit_weights(params: Params, cfg: ModelConfig, basis, *, preserve_norm: bool = False) -> Params:
    """Project `basis` (unit [R, D], or [L, R, D] per layer) out of every residual-writing row (EDITED_FIELDS),
    optionally rescaling rows to their original norms. The LM head is untied (keeps the original embedding)."""
    b = np.asarray(basis, np.float32)
    _check_editable(cfg, b)
    layers = params.layers.replace(
        o=project_rows(params.layers.o, _field_basis("layers.o", b), preserve_norm=preserve_norm),  # [L, N, H, D]
        down=project_rows(params.layers.down, _field_basis("layers.down", b), preserve_norm=preserve_norm),
    )
    lm_head = params.lm_head if params.lm_head is not None else params.embed.T  # untie, see module docstring
    return params.replace(embed=project_rows(params.embed, _field_basis("embed", b), preserve_norm=preserve_norm),
                          layers=layers, lm_head=lm_head)


def orthogonalize(params: Params, cfg: ModelConfig, direction) -> Params:
    """Params with r̂ (or an orthonormal [R, D] basis) projected out of every residual-writing matrix."""
    return edit_weights(params, cfg, _unit_basis(direction))


def streaming_edit(cfg: ModelConfig, basis, *, preserve_norm: bool = False, chunk_bytes: int = 16 << 20):
    """The edit of `edit_weights` as a per-tensor function (field, layer or None, array) -> array, for
    `convert.engine.to_hf_tensors(edit=...)`: an export then holds the original model plus one edited tensor, not
    a second copy of every edited matrix. Rows are projected in chunks of about `chunk_bytes` (float32)."""
    b = np.asarray(basis, np.float32)
    _check_editable(cfg, b)

    def edit(field: str, layer: int | None, w):
        if field not in EDITED_FIELDS:
            return w
        fb = _field_basis(field, b, layer)
        w = np.asarray(w)
        rows = w.reshape(-1, w.shape[-1])
        out = np.empty(rows.shape, w.dtype)
        step = max(1, chunk_bytes // (4 * rows.shape[1]))
        for i in range(0, rows.shape[0], step):
            out[i:i + step] = project_rows(rows[i:i + step], fb, preserve_norm=preserve_norm, xp=np)
        return out.reshape(w.shape)

    return edit


def untied_config(cfg: ModelConfig) -> ModelConfig:
    """The config of an orthogonalized model: tie_embeddings is False because the head was untied."""
    import dataclasses

    return dataclasses.replace(cfg, tie_embeddings=False)


# ------------------------------------------------------------------------------------------------
# python -m refusal_jax.orthogonalize --model SRC --direction DIR/direction.npy --out OUT


def load_direction(path, d_model: int | None):
    """A refusal direction [D] (any norm) or an orthonormal basis [R, D] from a .npy file, checked.

    `path` may also be a run directory holding `direction.npy`. d_model=None skips the size check (to check the
    file before the model is loaded).
    Raises:
      DataError: missing or unreadable file, wrong shape, non-finite or zero values, non-orthonormal basis rows.
    """
    from pathlib import Path

    path = Path(path).expanduser()
    if path.is_dir() and (path / "direction.npy").exists():
        path = path / "direction.npy"
    arr = runs.read_npy(path, "direction")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a real-valued array, got {getattr(arr, 'dtype', type(arr))}")
    arr = arr.astype(np.float32)
    want = "D" if d_model is None else d_model
    if arr.ndim not in (1, 2) or arr.size == 0 or (d_model is not None and arr.shape[-1] != d_model):
        raise DataError(f"{path}: direction has shape {tuple(arr.shape)}; this model needs [{want}] "
                        f"(one direction) or [R, {want}] (orthonormal rows)")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: direction contains NaN or infinite values")
    norms = np.linalg.norm(arr, axis=-1)
    if (norms == 0).any():
        raise DataError(f"{path}: direction is zero (nothing to project out)")
    if arr.ndim == 2:
        gram = arr.astype(np.float64) @ arr.T.astype(np.float64)
        err = np.abs(gram - np.eye(arr.shape[0])).max()
        if err > 1e-3:
            raise DataError(f"{path}: the {arr.shape[0]} rows are not orthonormal (max |B Bᵀ - I| = {err:.2e}); "
                            "pass one direction [D] or orthonormalise the basis")
    return arr


SITE_NAMES = {"embed": "embed", "layers.o": "o_proj", "layers.down": "down_proj"}


def max_projection(w, direction, chunk_bytes: int = 16 << 20) -> float:
    """max |w r̂| over the rows of w [..., D] (0 once r̂ is projected out), in float32 row blocks on the host
    (one einsum over a whole stacked matrix made XLA copy it)."""
    basis = _unit_basis(direction)
    rows = np.asarray(w).reshape(-1, basis.shape[-1])
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    return max(float(np.abs(rows[i:i + step].astype(np.float32) @ basis.T).max())
               for i in range(0, rows.shape[0], step))


def residual_write_norms(params: Params, direction) -> dict[str, float]:
    """max |W r̂| over every residual-writing matrix (embedding, o_proj, down_proj): 0 after orthogonalization."""
    fields = {"embed": params.embed, "layers.o": params.layers.o, "layers.down": params.layers.down}
    return {SITE_NAMES[f]: max_projection(w, direction) for f, w in fields.items()}


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
    p.add_argument("--model", required=True,
                   help="the model to edit: converted refusal_jax checkpoint dir, .gguf file, HF model dir, HF hub id "
                        "(owner/name), or bundled model name (required)")
    p.add_argument("--direction", required=True,
                   help="the refusal direction: a .npy file holding [d_model] (any norm; it is normalised) or an "
                        "orthonormal basis [R, d_model], e.g. RUN/direction.npy from python -m refusal_jax.pipeline "
                        "(a run directory holding direction.npy is accepted too; required)")
    p.add_argument("--out", required=True,
                   help="output Hugging Face model directory (config.json, generation_config.json, "
                        "model.safetensors or shards + index, tokenizer files); must not exist unless --overwrite (required)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in and the edited weights are saved in (default float32; the "
                        "projection itself is computed in float32)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="also save the edited model as a converted refusal_jax checkpoint in DIR (loads fast with "
                        "refusal_jax.load_model; default: none)")
    p.add_argument("--shard-size", type=float, default=2.0, metavar="GB",
                   help="split model.safetensors into shards of at most this many GiB (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --checkpoint) if they exist")
    p.add_argument("--no-strict-config", action="store_true",
                   help="accept source config.json attributes refusal_jax does not know (only if you checked they "
                        "do not change the forward pass)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--method", default="plain", choices=("plain", "projected", "norm-preserving"),
                   help="plain (default): project r̂ out of every residual-writing row (the paper's edit); projected: "
                        "remove only the part of r orthogonal to the harmless mean; norm-preserving: project out "
                        "(biprojected r' with --harmless-mean, else r̂) and rescale every edited row to its original "
                        "norm. See refusal_jax.method.edits")
    p.add_argument("--harmless-mean", default=None, metavar="PATH.npy",
                   help="harmless mean activation for --method projected / norm-preserving: [d_model], [n_layers, "
                        "d_model] (per-layer biprojection) or [n_pos, n_layers, d_model] (position from "
                        "direction_metadata.json), or a run directory holding generate_directions/mean_harmless.npy (default: "
                        "none; required by projected)")
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
    from pathlib import Path

    from refusal_jax.convert import checkpoint
    from refusal_jax.method import edits
    from refusal_jax.convert import export_hf
    from refusal_jax.errors import CheckpointError
    from refusal_jax.convert.loading import load_model

    args = parser().parse_args(argv)
    out = Path(args.out).expanduser()
    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint else None
    for path, flag in ((out, "--out"), (ckpt, "--checkpoint")):
        if path is not None and path.exists() and not args.overwrite:
            raise CheckpointError(f"{flag} {path} already exists (pass --overwrite to replace it)")
    if args.shard_size <= 0:
        raise CheckpointError(f"--shard-size must be positive, got {args.shard_size}")
    t0 = time.perf_counter()
    load_direction(args.direction, None)  # fail fast on a bad file, before the (slow) model load
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

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        from refusal_jax.convert import engine

        bar = tqdm(total=len(engine.hf_tensor_plan(ocfg)), desc=f"writing {out.name}", unit="tensor", leave=False)
    try:
        path = export_hf.save_hf(out, ocfg, params, tokenizer, dtype=args.dtype,
                                 shard_size=int(args.shard_size * 2**30), overwrite=args.overwrite,
                                 extra_config=_source_hf_config(args.model), edit=edit_and_measure,
                                 progress=(lambda _: bar.update()) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
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
                                f"{args.direction}", overwrite=args.overwrite)
        print(f"  refusal_jax checkpoint: {cpath} (load with refusal_jax.load_model({str(cpath)!r}))")
    print(f"  load it with: transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


if __name__ == "__main__":
    main()

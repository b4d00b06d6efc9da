"""Shared command-line plumbing: clear errors with exit status 2, never a traceback for bad input."""

from __future__ import annotations

import functools
import os
import sys

from refusal_jax.errors import RefusalJaxError


def main_wrapper(fn):
    """Run a CLI main; a RefusalJaxError prints `error: ...` and exits 2, Ctrl-C exits 130."""

    @functools.wraps(fn)
    def run(argv=None):
        try:
            return fn(argv)
        except RefusalJaxError as e:
            print(f"error: {e}", file=sys.stderr)
            _exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted: completed stages are saved; rerun the same command to resume", file=sys.stderr)
            _exit(130)

    return run


def _exit(code: int):
    from refusal_jax.runs import distributed

    if distributed.process_count() > 1:
        # Not through JAX's shutdown barrier, which would hold this process (and the peers waiting on it) for
        # minutes: the peers see it gone within their heartbeat timeout and exit too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# Flags that several commands share, declared once.

MODEL_SOURCES = "converted refusal_jax checkpoint dir, .gguf file, HF model dir, HF hub id (owner/name), or bundled " \
                "model name"
DTYPES = ("float32", "bfloat16", "float16")
EDIT_METHODS = ("plain", "projected", "norm-preserving")


def add_dtype_flag(p, help: str = "parameter dtype (default float32)") -> None:
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help=help)


def add_overwrite_flag(p, help: str = "replace --out if it exists") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_strict_config_flag(p) -> None:
    p.add_argument("--no-strict-config", action="store_true",
                   help="accept source config.json attributes refusal_jax does not know (only if you checked they "
                        "do not change the forward pass)")


def add_progress_flag(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_edit_flags(p) -> None:
    """--method and --harmless-mean of the weight edits (orthogonalize, export_gguf)."""
    p.add_argument("--method", default="plain", choices=EDIT_METHODS,
                   help="plain (default): project r̂ out of every residual-writing row (the paper's edit); projected: "
                        "remove only the part of r orthogonal to the harmless mean; norm-preserving: project out "
                        "(biprojected r' with --harmless-mean, else r̂) and rescale every edited row to its original "
                        "norm. See refusal_jax.method.edits")
    p.add_argument("--harmless-mean", default=None, metavar="PATH.npy",
                   help="harmless mean activation for --method projected / norm-preserving: [d_model], [n_layers, "
                        "d_model] (per-layer biprojection) or [n_pos, n_layers, d_model] (position from "
                        "direction_metadata.json), or a run directory holding generate_directions/mean_harmless.npy")

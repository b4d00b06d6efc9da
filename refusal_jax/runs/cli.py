"""Shared command-line plumbing: clear errors with exit status 2, never a traceback for bad input."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

from refusal_jax.errors import RefusalJaxError

INTERRUPTED = "\ninterrupted: completed stages are saved; rerun the same command to resume"


def main_wrapper(fn):
    """Run a CLI main; a RefusalJaxError prints `error: ...` and exits 2, Ctrl-C exits 130.

    After a real SIGINT the process ends with os._exit(130) once the message is flushed: a normal interpreter exit
    would tear Python down while XLA's threads may still run the computation that was in flight, which crashed
    with SIGSEGV after the friendly message. Artifacts are written atomically, so nothing is lost by skipping the
    interpreter's cleanup. (A KeyboardInterrupt raised by code, as in tests, exits normally with status 130.)
    """

    @functools.wraps(fn)
    def run(argv=None):
        got_signal = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                got_signal.append(signum)
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            return fn(argv)
        except RefusalJaxError as e:
            message = " ".join(line.strip() for line in str(e).splitlines())  # one line, whatever the cause said
            print(f"error: {message}", file=sys.stderr)
            _exit(2)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            if got_signal:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            _exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

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


def add_overwrite_flag(p, help: str = "replace --out if it exists and is a refusal_jax output (never the source or a "
                                      "folder holding it); the old one is moved aside to OUT.previous-<timestamp>, "
                                      "not deleted") -> None:
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
                        "direction_metadata.json), or a run directory holding generate_directions/mean_harmless.npy (default: none; required by projected)")

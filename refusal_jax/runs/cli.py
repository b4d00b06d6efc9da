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

"""Shared command-line plumbing: clear errors with exit status 2, never a traceback for bad input."""

from __future__ import annotations

import functools
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
            sys.exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted: completed stages are saved; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return run

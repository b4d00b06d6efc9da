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
            sys.exit(2)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            if got_signal:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return run

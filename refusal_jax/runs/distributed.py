"""Several processes (TPU pod hosts, multi-node GPU, or CPU processes over gloo): one place to start and join them.

Every process runs the same command with the same prompts and the same program (JAX's multi-controller model).
`initialize` joins them through JAX's coordination service before anything touches a device; afterwards
`jax.devices()` lists the devices of every process and `--mesh` spans them all. Arrays computed on such a mesh are
global: `to_host` gathers one onto every host. Only the main process (0) writes files and prints; `barrier` and
`broadcast` let the others follow its decisions (which stages are complete) and read what it wrote.

If one process dies, the coordination service stops receiving its heartbeats; after `heartbeat_timeout_s` a
watch thread in every other process sees it missing and exits non-zero with a message naming it, even when the
main thread is blocked in a collective or a barrier with the dead peer. If process 0 (which hosts the service)
dies, JAX's own client ends the others at once with its "another task died" message.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pickle
import sys
import threading
from typing import Any

import jax
import numpy as np

from refusal_jax.errors import ConfigError, RunError

# How long the service waits for a silent process before declaring it dead (well inside the 60 s the tests allow).
HEARTBEAT_TIMEOUT_S = 20
# How long a barrier or broadcast waits for the slowest process (stages between barriers can take hours).
BARRIER_TIMEOUT_S = 24 * 3600

_state = {"initialized": False, "counter": 0}


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags that join several processes into one run (shared by every command that runs the model)."""
    g = p.add_argument_group("several processes (TPU pod hosts, multi-node GPU; see docs/pods.md)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service, the same in every process "
                        "(default: one process)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="number of processes (with --coordinator; default: 1)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's index, 0 to N-1 (with --coordinator; default: 0)")
    g.add_argument("--distributed", default=None, choices=["auto"],
                   help="'auto': let jax.distributed.initialize() detect the cluster (Cloud TPU VMs, SLURM, "
                        "Open MPI) instead of --coordinator/--num-processes/--process-id (default: off)")


def check_args(args: argparse.Namespace) -> None:
    """Raise ConfigError for an incomplete or inconsistent set of process flags (before anything is loaded)."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if args.distributed == "auto":
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ConfigError(f"--distributed auto detects the cluster by itself; drop {', '.join(extra)}")
        return
    if all(v is None for v in given.values()):
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"several processes need --coordinator, --num-processes and --process-id together "
                          f"(missing {', '.join(missing)})")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator {args.coordinator!r} is not HOST:PORT (e.g. 10.0.0.2:8476)")
    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise ConfigError(f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}")


def init_from_args(args: argparse.Namespace) -> None:
    """`initialize` as the flags ask (nothing for a single process). Call before anything touches a device."""
    check_args(args)
    if args.distributed == "auto":
        initialize(auto=True)
    elif args.coordinator is not None and args.num_processes > 1:
        initialize(args.coordinator, args.num_processes, args.process_id)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               init_timeout_s: int = 300) -> None:
    """Join this process to the others: `jax.distributed.initialize`, with gloo collectives on CPU.

    Must run before the first device use in this process (RunError otherwise). A second call is a no-op.
    """
    if _state["initialized"]:
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RunError("jax.distributed must be initialized before any device is used; call "
                       "refusal_jax.distributed.initialize() first")
    # CPU processes exchange collectives over TCP (gloo); harmless on GPU/TPU, where this option is not consulted.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    try:
        if auto:
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    except Exception as e:  # unreachable coordinator, timeout, undetectable cluster
        raise RunError(f"could not join the other processes ({'auto-detected cluster' if auto else coordinator}): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    _state["initialized"] = True
    _watch_peers(heartbeat_timeout_s)
    if not is_main_process():
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars only on process 0


def is_initialized() -> bool:
    return _state["initialized"]


def process_index() -> int:
    return jax.process_index() if _state["initialized"] else 0


def process_count() -> int:
    return jax.process_count() if _state["initialized"] else 1


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that writes files, prints and shows progress."""
    return process_index() == 0


def _client():
    from jax._src import distributed as jd

    return jd.global_state.client


def _next_key(name: str) -> str:
    # Every process calls barriers/broadcasts in the same order, so a counter gives them matching names.
    _state["counter"] += 1
    return f"refusal_jax/{_state['counter']}/{name}"


def barrier(name: str = "barrier", timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process reaches this point (no-op for one process). RunError if one does not in time."""
    if process_count() == 1:
        return
    key = _next_key(name)
    try:
        _client().wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:
        raise RunError(f"process {process_index()}: the other processes did not reach barrier {name!r} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); did one of them fail?") \
            from None


def broadcast(value: Any = None, name: str = "broadcast", timeout_s: float = BARRIER_TIMEOUT_S) -> Any:
    """Process 0's `value` (any picklable host object) in every process; others' `value` is ignored.

    Goes through the coordination service's key-value store (small objects: decisions, file contents), so it
    works whether or not the processes share a file system.
    """
    if process_count() == 1:
        return value
    key, client = _next_key(name), _client()
    if is_main_process():
        client.key_value_set_bytes(key, pickle.dumps(value))
        return value
    try:
        data = client.blocking_key_value_get_bytes(key, int(timeout_s * 1000))
    except Exception as e:
        raise RunError(f"process {process_index()}: no value {name!r} from process 0 ({type(e).__name__}); "
                       "did it fail?") from None
    return pickle.loads(data)


def main_decides(fn, name: str = "decision"):
    """fn() evaluated in process 0 only and its result given to every process (e.g. which stages are done)."""
    return broadcast(fn() if is_main_process() else None, name)


def to_host(x) -> np.ndarray:
    """A (possibly global, multi-process) array as a numpy array holding all of it, in every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _watch_peers(heartbeat_timeout_s: int) -> None:
    """A daemon thread that ends this process with a clear message once the coordination service no longer lists
    every process (one died or hung). JAX's own client also terminates the process then, with a longer message;
    this makes the first line say what happened."""
    n = jax.process_count()
    if n == 1:
        return
    client, me = _client(), jax.process_index()
    interval = max(1.0, heartbeat_timeout_s / 4)
    stop = threading.Event()
    # At a normal exit JAX's own atexit handler shuts the client down, after which the service no longer lists the
    # processes: stop watching first (atexit runs the handlers registered last first, and this one is registered
    # after jax.distributed.initialize registered its own).
    atexit.register(stop.set)

    def watch():
        while not stop.wait(interval):
            try:
                live = client.get_live_nodes(list(range(n)))
            except Exception as e:  # the service itself is gone (process 0 died)
                if not stop.is_set():
                    _die(f"process {me}: lost the coordination service at process 0 ({type(e).__name__}); "
                         "process 0 died or is unreachable")
                return
            missing = sorted(set(range(n)) - set(live))
            if missing and not stop.is_set():
                _die(f"process {me}: process(es) {missing} stopped responding (died or hung); giving up")
                return

    threading.Thread(target=watch, name="refusal_jax-peer-watch", daemon=True).start()


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(3)

"""Run by tests/test_distributed.py in subprocesses (XLA_FLAGS must set the CPU device count before jax starts).

  python tests/_pod_worker.py cli LOG extract|pipeline ARGS...
      the command's main(ARGS), logging "<process index> <path>" to LOG for every file it renames into place
      (runs.write_* and save_figure write a temporary file and os.replace it), so the test sees who wrote what.
  python tests/_pod_worker.py load MESH SOURCE...
      load_model(SOURCE, mesh=MESH) for each source, recording every host array handed to a device (jax.device_put
      and each shard that jax.make_array_from_callback asks for); prints `RESULT {json}` with, per parameter,
      the global shape, each device's shard shape, and the largest array any single placement moved.
  python tests/_pod_worker.py saveload PORT PROCESS_ID DIR
      one of two processes: process 0 alone saves a converted checkpoint (as load_model does for a bundled model),
      then both restore it on a data=1,model=4 mesh spanning them; prints `RESULT {json}` (values equal, shards).
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def cli(log, command, argv):
    from refusal_jax.runs import distributed
    from refusal_jax.runs import rundir as runs

    real_replace = os.replace

    def logged(src, dst):
        real_replace(src, dst)
        with open(log, "a") as f:
            f.write(f"{distributed.process_index()} {dst}\n")

    runs.os.replace = logged  # only runs' module-level reference: orbax and others are unaffected
    spans(log + ".spans")
    if command == "extract":
        from refusal_jax.extract import main
    else:
        from refusal_jax.pipeline import main
    main(argv)


# Every batched forward pass of the commands, by the module attribute its callers look up, and where its inputs are.
BATCHED = {
    "refusal_jax.method.scoring": {"evaluate_interventions": "batches", "evaluate_additions": "batches"},
    "refusal_jax.method.directions": {"mean_activations": "batches"},
    "refusal_jax.method.screening": {"site_moments": "batches"},
    "refusal_jax.model.generate": {"greedy_generate": "tokens"},
}


def spans(path):
    """Log "<process index> <module>.<function>" to `path` whenever one of `BATCHED` runs on token arrays that span
    several processes (not fully addressable), so the test knows the run took the code paths it must check: any
    host read of such an array (np.asarray, float(), .item()) raises in the run itself."""
    import functools
    import importlib
    import inspect

    from refusal_jax.runs import distributed

    def spanning(value) -> bool:
        arrays = [b.tokens for b in value] if isinstance(value, (list, tuple)) else [value]
        return any(not getattr(a, "is_fully_addressable", True) for a in arrays)

    for module_name, functions in BATCHED.items():
        module = importlib.import_module(module_name)
        for name, arg in functions.items():
            fn = getattr(module, name)
            signature = inspect.signature(getattr(fn, "__wrapped__", fn))

            @functools.wraps(fn)
            def spy(*args, __fn=fn, __sig=signature, __arg=arg, __name=f"{module_name}.{name}", **kwargs):
                if spanning(__sig.bind_partial(*args, **kwargs).arguments.get(__arg)):
                    with open(path, "a") as f:
                        f.write(f"{distributed.process_index()} {__name}\n")
                return __fn(*args, **kwargs)

            setattr(module, name, spy)


def load(mesh_spec, sources):
    import json

    import jax
    import numpy as np

    from refusal_jax.convert.loading import load_model
    from refusal_jax.model import sharding
    from refusal_jax.model.params import to_flat

    placed = []  # shapes of host arrays sent to one device
    real_put, real_cb = jax.device_put, jax.make_array_from_callback

    def put(x, device=None, *a, **k):
        for leaf in jax.tree.leaves(x):
            placed.append(list(np.shape(leaf)))
        return real_put(x, device, *a, **k)

    def from_callback(shape, sharding_, callback, *a, **k):
        def spy(index):
            out = callback(index)
            placed.append(list(np.shape(out)))
            return out
        return real_cb(shape, sharding_, spy, *a, **k)

    jax.device_put, jax.make_array_from_callback = put, from_callback
    mesh = sharding.make_mesh(mesh_spec)
    result = {}
    for src in sources:
        placed.clear()
        if src.endswith(".gguf"):  # a tokenizer-less file: the placement itself, without load_model's tokenizer
            from refusal_jax.convert import gguf, placement

            source = gguf.sharded_source(src)
            params = placement.place_params(source, sharding.param_shardings(source.cfg, mesh))
            host = to_flat(gguf.load_gguf(src, tokenizer=False)[1])
        else:
            params = load_model(src, mesh=mesh, progress=False).params
            host = to_flat(load_model(src, progress=False, on_device=False).params)
        result[src] = {
            "equal": all(np.array_equal(np.asarray(a), np.asarray(host[name])) for name, a in to_flat(params).items()),
            "params": {name: {"shape": list(a.shape), "spec": [list(e) if isinstance(e, tuple) else e
                                                                for e in a.sharding.spec],
                              "shards": [list(s.data.shape) for s in a.addressable_shards],
                              "bytes_per_device": [int(s.data.nbytes) for s in a.addressable_shards]}
                       for name, a in to_flat(params).items()},
            "placed": sorted(placed, key=lambda s: -int(np.prod(s)))[:5],
            "max_placed_elements": max((int(np.prod(s)) for s in placed), default=0),
        }
        del params
    print("RESULT " + json.dumps(result))


def saveload(port, process_id, out):
    import json

    from refusal_jax.runs import distributed

    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    import numpy as np

    from refusal_jax.convert import checkpoint
    from refusal_jax.model import sharding
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random, to_flat

    cfg = tiny_config("llama", n_kv_heads=4, vocab_size=64, d_ff=64)
    params = to_flat(init_random(cfg, 0))
    if distributed.is_main_process():
        checkpoint.save(out, cfg, checkpoint.from_flat({k: np.asarray(v) for k, v in params.items()}))
    distributed.barrier("saved")
    mesh = sharding.make_mesh("data=1,model=4")
    _, loaded, _ = checkpoint.load(out, with_tokenizer=False, shardings=lambda c: sharding.param_shardings(c, mesh))
    loaded = to_flat(loaded)
    print("RESULT " + json.dumps({
        "equal": all(np.array_equal(distributed.to_host(a), np.asarray(params[k])) for k, a in loaded.items()),
        "q_shards": [list(s.data.shape) for s in loaded["layers.q"].addressable_shards]}))


if __name__ == "__main__":
    if sys.argv[1] == "saveload":
        saveload(*sys.argv[2:5])
    elif sys.argv[1] == "cli":
        cli(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        load(sys.argv[2], sys.argv[3:])

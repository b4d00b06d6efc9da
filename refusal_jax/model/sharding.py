"""Sharding over a device mesh: data parallel over prompts and candidates, tensor parallel over heads and MLP width.

Nothing in the model code names a mesh. Parameters and inputs are placed with `NamedSharding`s built here, and
jit's sharding propagation (GSPMD) partitions every computation that consumes them: the einsums over sharded
heads / MLP width become local matmuls plus one all-reduce per sub-block, a batch sharded over "data" stays
sharded through the residual stream, the captured activations and the KV cache that `greedy_generate` builds
inside its jit. Results are the single-device results up to float32 reduction order.

Logical axes (the names used in every spec below) and the mesh axes they map to by default (`MeshRules()`):

  batch       prompts                     -> "data"
  candidates  stacked Interventions (C)   -> "data"
  heads       query heads N               -> "model"
  kv_heads    key/value heads K           -> "model"
  mlp         MLP width F                 -> "model"
  vocab       vocabulary V                -> "model"
  experts     experts E (MoE)             -> "expert"
  expert_mlp  one expert's MLP width X    -> "model"
  embed, layers, head_dim, seq            -> replicated

Expert parallelism ("data=2,expert=4,model=1"): every expert weight [L, E, ...] is split over "expert", so a
device holds E / expert experts, and `fit_config` sets the config's expert_groups to the axis size: the MoE
block then runs each group of experts where its weights are (a vmap over the groups that GSPMD partitions
over "expert") on the tokens routed to it, and adds the groups' outputs (one all-reduce per MoE block).

A rule may name one mesh axis, a tuple of mesh axes (the dimension is split over their product), or None.
A rule naming a mesh axis the mesh does not have is treated as replicated, so `make_mesh("auto")` (all devices
on "data") works with the default rules. One mesh axis may appear at most once in one array's spec
(`logical_to_spec` raises `ConfigError` otherwise).

Divisibility: a dimension whose size is not a multiple of the product of its mesh axes (2 KV heads on a 4-way
"model" axis, a batch of 4 on 8-way "data") is replicated instead, silently and per array; the other
dimensions of the same array keep their sharding. Results stay exact; only memory and speed change. Choose
batch sizes and chunk sizes that are multiples of the data axis to get data parallelism.

Usage:

    mesh = make_mesh("data=4,model=2")           # or "auto": every device on "data"
    params = shard_params(params, cfg, mesh)
    batches = shard_batches(batches, mesh)        # tokens/mask of `batching.Batch`es on "data"
    diffs = directions.mean_diffs(params, cfg, harmful, harmless, n_pos)
    tokens = greedy_generate(params, cfg, shard_batch(tok, mesh), shard_batch(mask, mesh), iv, max_new_tokens=64)

Multi-host (TPU pods, multi-node GPU): call `jax.distributed.initialize()` in every process *before* anything
else touches JAX (on Cloud TPU it needs no arguments; elsewhere pass coordinator_address, num_processes and
process_id), then build the mesh as above: `jax.devices()` then lists every device of every host and
`make_mesh` spans them all. Every process must run the same program with the same (global) host arrays;
`jax.device_put` then places each process's addressable shards. For per-host input pipelines use
`jax.make_array_from_process_local_data(sharding, local_rows)` instead of `shard_batch`. Read results with
`jax.experimental.multihost_utils.process_allgather` (np.asarray only sees addressable shards).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from refusal_jax.errors import ConfigError
from refusal_jax.model.batching import Batch
from refusal_jax.model.config import ModelConfig
from refusal_jax.model.params import PARAM_AXES, Params, from_flat, param_shapes, to_flat
from refusal_jax.model.transformer import Intervention, KVCache

LOGICAL_AXES = ("batch", "candidates", "heads", "kv_heads", "mlp", "vocab", "experts", "expert_mlp", "expert_mlp2",
                "embed", "layers", "head_dim", "seq")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """Logical axis -> mesh axis (a name, a tuple of names, or None = replicated)."""

    batch: MeshAxes = "data"
    candidates: MeshAxes = "data"
    heads: MeshAxes = "model"
    kv_heads: MeshAxes = "model"
    mlp: MeshAxes = "model"
    vocab: MeshAxes = "model"
    experts: MeshAxes = "expert"
    expert_mlp: MeshAxes = "model"
    expert_mlp2: MeshAxes = None  # gpt-oss's interleaved gate/up columns: kept whole
    embed: MeshAxes = None
    layers: MeshAxes = None
    head_dim: MeshAxes = None
    seq: MeshAxes = None

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes of one logical axis, as a tuple (empty = replicated; None = replicated)."""
        if logical is None:
            return ()
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"unknown logical axis {logical!r}; known: {', '.join(LOGICAL_AXES)}")
        value = getattr(self, logical)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)

    def used_mesh_axes(self) -> tuple[str, ...]:
        """Every mesh axis some rule refers to, in first-use order."""
        seen: dict[str, None] = {}
        for name in LOGICAL_AXES:
            for axis in self.mesh_axes(name):
                seen[axis] = None
        return tuple(seen)


DEFAULT_RULES = MeshRules()

# Logical axes of the KV cache fields and of stacked Interventions (leading candidate axis C).
CACHE_AXES = {
    "k": ("layers", "batch", "seq", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "seq", "kv_heads", "head_dim"),
    "mask": ("batch", "seq"),
    "lengths": ("batch",),
    "index": (),
}
INTERVENTION_AXES = {
    "ablate_basis": ("candidates", None, "embed"),  # [C, R, D]
    "ablate_layers": ("candidates", "layers"),  # [C, L]
    "add_direction": ("candidates", "embed"),  # [C, D]
    "add_coeffs": ("candidates", "layers"),  # [C, L]
}


# --------------------------------------------------------------------------------------------------
# logical axes -> PartitionSpec / NamedSharding


def logical_to_spec(axes: Sequence[str | None], rules: MeshRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have these logical axes.

    Raises ConfigError for an unknown logical axis, or when one mesh axis would shard two dimensions of the same
    array (e.g. batch and candidates both on "data" in one [C, B] array): remap one of them in `rules`.
    """
    spec, owner = [], {}
    for dim, logical in enumerate(axes):
        mesh_axes = rules.mesh_axes(logical)
        for axis in mesh_axes:
            if axis in owner:
                raise ConfigError(
                    f"mesh axis {axis!r} would shard two dimensions of one array: dimension {owner[axis][0]} "
                    f"({owner[axis][1]!r}) and dimension {dim} ({logical!r}) in logical axes {tuple(axes)}; "
                    f"map one of these logical axes to another mesh axis (or None) in MeshRules")
            owner[axis] = (dim, logical)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
             rules: MeshRules = DEFAULT_RULES) -> PartitionSpec:
    """`logical_to_spec`, fitted to a concrete shape and mesh.

    Mesh axes the mesh lacks are dropped, and any dimension not divisible by the product of its mesh axis sizes
    is replicated instead of sharded (the fallback for, e.g., 2 KV heads on a 4-way "model" axis).
    """
    if len(shape) != len(axes):
        raise ConfigError(f"shape {tuple(shape)} has {len(shape)} dimensions but logical axes {tuple(axes)} name "
                          f"{len(axes)}")
    spec = logical_to_spec(axes, rules)
    fitted = []
    for size, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n in mesh.shape)
        ways = math.prod(mesh.shape[n] for n in names)
        if not names or ways == 1 or size % ways:
            fitted.append(None)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*fitted)


def sharding_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh,
                 rules: MeshRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, axes, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# --------------------------------------------------------------------------------------------------
# parameters


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> Params:
    """A Params-shaped pytree of NamedSharding for the fields `cfg` uses (others None), per PARAM_AXES."""
    return from_flat({name: sharding_for(shape, PARAM_AXES[name], mesh, rules)
                      for name, shape in param_shapes(cfg).items()})


def fit_config(cfg: ModelConfig, mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> ModelConfig:
    """`cfg` with expert_groups = the number of shards of its experts on `mesh` (1 for dense models or experts
    not split), so that each device runs the experts it holds."""
    if not cfg.moe:
        return cfg
    spec = spec_for((cfg.n_layers, cfg.n_experts), ("layers", "experts"), mesh, rules)[1]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return dataclasses.replace(cfg, expert_groups=math.prod(mesh.shape[n] for n in names))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> Params:
    """`params` placed on `mesh` (jax.device_put; the input is not donated)."""
    flat, shardings = to_flat(params), to_flat(param_shardings(cfg, mesh, rules))
    if set(flat) != set(shardings):
        raise ConfigError(f"params do not match the config: fields {sorted(set(flat) ^ set(shardings))} differ")
    return from_flat(jax.device_put(flat, shardings))


# --------------------------------------------------------------------------------------------------
# activations: token batches, the KV cache, stacked interventions


def shard_batch(array, mesh: Mesh, rules: MeshRules = DEFAULT_RULES,
                axes: Sequence[str | None] = ("batch", "seq")) -> jax.Array:
    """One input array placed by its logical axes: tokens / masks [B, T] by default; ("batch",) for [B] weights."""
    array = np.asarray(array) if not isinstance(array, jax.Array) else array
    return jax.device_put(array, sharding_for(array.shape, axes, mesh, rules))


def shard_batches(batches: Sequence[Batch], mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> list[Batch]:
    """Copies of `batching.Batch`es whose tokens and mask are sharded over "batch".

    `index` and `weight` stay host numpy arrays: the directions code uses them for host-side float64
    bookkeeping, and jit replicates the [B] weight vector where it is an argument.
    """
    return [dataclasses.replace(b, tokens=shard_batch(b.tokens, mesh, rules), mask=shard_batch(b.mask, mesh, rules))
            for b in batches]


def cache_shardings(cfg: ModelConfig, mesh: Mesh, batch: int, capacity: int,
                    rules: MeshRules = DEFAULT_RULES, *, per_layer: bool = False) -> KVCache:
    """A KVCache-shaped pytree of NamedSharding: k/v [L, B, S, K, H] (or per layer [B, S, K, H]) over batch and
    kv_heads; mask, lengths over batch; index replicated."""
    shapes = {
        "k": (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim),
        "v": (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim),
        "mask": (batch, capacity), "lengths": (batch,), "index": (),
    }
    out = {name: sharding_for(shape, CACHE_AXES[name], mesh, rules) for name, shape in shapes.items()}
    if per_layer:
        for name in ("k", "v"):
            one = sharding_for(shapes[name][1:], CACHE_AXES[name][1:], mesh, rules)
            out[name] = (one,) * cfg.n_layers
    return KVCache(**out)


def shard_cache(cache: KVCache, cfg: ModelConfig, mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> KVCache:
    """`cache` placed per `cache_shardings`. (`greedy_generate` needs none: its cache is built inside jit and
    inherits the batch / kv_heads sharding of the keys and values written into it.)"""
    batch, capacity = cache.mask.shape
    per_layer = isinstance(cache.k, tuple)
    return jax.device_put(cache, cache_shardings(cfg, mesh, batch, capacity, rules, per_layer=per_layer))


def stack_interventions(interventions: Sequence[Intervention]) -> Intervention:
    """Interventions stacked on a new leading candidate axis C (what `scoring._scores` vmaps over)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *interventions)


def shard_interventions(stacked: Intervention, mesh: Mesh, rules: MeshRules = DEFAULT_RULES) -> Intervention:
    """A stacked Intervention (leading axis C) placed with C over "candidates"; other dimensions replicated."""
    return Intervention(**{
        name: shard_batch(getattr(stacked, name), mesh, rules, INTERVENTION_AXES[name]) for name in INTERVENTION_AXES
    })


# --------------------------------------------------------------------------------------------------
# meshes


def make_mesh(spec: str = "auto", rules: MeshRules = DEFAULT_RULES, devices: Sequence | None = None) -> Mesh:
    """A mesh from a command-line string.

    "auto" puts every device on "data". Otherwise comma-separated name=size pairs, e.g. "data=4,model=2"; one
    size may be -1 (the remaining devices). Names must be mesh axes `rules` refers to (default: data, model), and
    the sizes must multiply to the device count. Axes are `AxisType.Auto`, so jit propagates shardings through
    the model code (which has no explicit sharding annotations).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    known = rules.used_mesh_axes()
    text = spec.strip()
    if text.lower() == "auto":
        if "data" not in known:
            raise ConfigError(f"mesh 'auto' puts every device on 'data', which no rule uses (mesh axes: {known})")
        names, sizes = ["data"], [n]
    else:
        names, sizes = [], []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, size = part.partition("=")
            name = name.strip()
            try:
                if not eq:
                    raise ValueError
                size = int(size)
            except ValueError:
                raise ConfigError(f"bad mesh spec {spec!r}: {part!r} is not name=size "
                                  "(e.g. 'data=4,model=2')") from None
            if name not in known:
                raise ConfigError(f"unknown mesh axis {name!r} in {spec!r}; the sharding rules use: {', '.join(known)}")
            if name in names:
                raise ConfigError(f"mesh axis {name!r} given twice in {spec!r}")
            if size < 1 and size != -1:
                raise ConfigError(f"mesh axis {name}={size} in {spec!r}: sizes must be >= 1 (or -1 for the rest)")
            names.append(name)
            sizes.append(size)
        if not names:
            raise ConfigError(f"empty mesh spec {spec!r}; use e.g. 'data=4,model=2' or 'auto'")
        if sizes.count(-1) > 1:
            raise ConfigError(f"mesh spec {spec!r}: at most one axis size may be -1")
        if -1 in sizes:
            rest = math.prod(s for s in sizes if s != -1)
            if n % rest:
                raise ConfigError(f"mesh spec {spec!r}: {n} devices are not divisible by {rest}")
            sizes[sizes.index(-1)] = n // rest
    if math.prod(sizes) != n:
        shape = "x".join(map(str, sizes))
        raise ConfigError(f"mesh {spec!r} has {math.prod(sizes)} devices ({shape}) but {n} are available "
                          f"({devices[0].platform}); the axis sizes must multiply to the device count")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices)


def describe(mesh: Mesh) -> str:
    """e.g. "data=4 x model=2 (8 cpu devices)"."""
    axes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"{axes} ({mesh.devices.size} {mesh.devices.flat[0].platform} devices)"

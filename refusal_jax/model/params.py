"""Parameter pytrees. Layers are stacked on a leading axis L so the forward pass is one `lax.scan` (or, for
decoding on CPU, split into per-layer copies by `unstack_layers`).

Axis letters (used in every einsum of the project):
  B batch, T query positions, S key positions, D d_model, N query heads, K kv heads, G query heads per kv head,
  H head_dim, F MLP width, V vocabulary, L layers; mixtures of experts: E experts, X one expert's MLP width,
  A top-k assignments (token, chosen expert).

Norm weights are stored as the multiplier actually applied (Gemma's `1 + w` is folded in by the converter).
Optional tensors are None when the architecture has none (a None leaf is an empty pytree node).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from refusal_jax.model import families
from refusal_jax.model.config import ModelConfig


@struct.dataclass
class LayerParams:
    # q, k, v, o are always present (the defaults only let the optional pre-norms keep their place)
    attn_norm: jax.Array | None = None  # [L, D]; None without pre-norms (OLMo-2/3)
    q: jax.Array = None  # [L, D, N, H]
    k: jax.Array = None  # [L, D, K, H]
    v: jax.Array = None  # [L, D, K, H]
    o: jax.Array = None  # [L, N, H, D]
    mlp_norm: jax.Array | None = None  # [L, D]; None without pre-norms
    gate: jax.Array | None = None  # [L, D, F]; None for an MoE model without a shared expert
    up: jax.Array | None = None  # [L, D, F]
    down: jax.Array | None = None  # [L, F, D]
    q_bias: jax.Array | None = None  # [L, N, H]
    k_bias: jax.Array | None = None  # [L, K, H]
    v_bias: jax.Array | None = None  # [L, K, H]
    q_norm: jax.Array | None = None  # [L, H]
    k_norm: jax.Array | None = None  # [L, H]
    q_heads_norm: jax.Array | None = None  # [L, N, H] OLMoE: one RMSNorm over all query heads together
    k_heads_norm: jax.Array | None = None  # [L, K, H]
    post_attn_norm: jax.Array | None = None  # [L, D]
    post_mlp_norm: jax.Array | None = None  # [L, D]
    router: jax.Array | None = None  # [L, D, E] mixture of experts: the router's logits
    expert_gate: jax.Array | None = None  # [L, E, D, X]
    expert_up: jax.Array | None = None  # [L, E, D, X]
    expert_down: jax.Array | None = None  # [L, E, X, D]
    shared_gate: jax.Array | None = None  # [L, D] Qwen2-MoE: the shared expert's output times sigmoid(h . w)
    o_bias: jax.Array | None = None  # [L, D] gpt-oss: o_proj's bias (written into the residual stream)
    sinks: jax.Array | None = None  # [L, N] gpt-oss: each head's sink logit, one more column of its softmax
    router_bias: jax.Array | None = None  # [L, E]
    expert_gate_up: jax.Array | None = None  # [L, E, D, 2X] gpt-oss: gate and up interleaved (gate at even columns)
    expert_gate_up_bias: jax.Array | None = None  # [L, E, 2X]
    expert_down_bias: jax.Array | None = None  # [L, E, D] (written into the residual stream, times the gate weight)


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: LayerParams  # stacked [L, ...]; or a tuple of L per-layer LayerParams (`unstack_layers`)
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to `embed`


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of the pytree.

    axes:     its logical axes, in our layout (shapes: `param_shapes`; shardings: `sharding.param_shardings`).
    hf_name:  its Hugging Face tensor name: the suffix after "model.layers.{i}." for per-layer fields, else the
              whole name; a function of the config where families name it differently.
    hf_axes:  the HF tensor's dimensions in torch order, each a group of our axes flattened together (a torch
              Linear is [out, in]: q is [(heads, head_dim), (embed)]); conversion in both directions is the
              reshape + transpose between the two orders (`convert.engine`).
    present:  the config flag that makes it present (None = always).
    per_expert: one HF tensor per expert (hf_name has an "{e}" field; hf_axes leave out "experts").
    fused:    the spec used instead for checkpoints that store all experts in one tensor (gpt-oss).
    """

    axes: tuple[str, ...]
    hf_name: str | Callable[[ModelConfig], str]
    hf_axes: tuple[tuple[str, ...], ...]
    present: Callable[[ModelConfig], bool] | None = None
    per_expert: bool = False
    fused: "ParamSpec | None" = None

    def hf(self, cfg: ModelConfig) -> str:
        return self.hf_name(cfg) if callable(self.hf_name) else self.hf_name


def _linear(name: str, out: tuple[str, ...], in_: tuple[str, ...], present=None) -> ParamSpec:
    """A torch Linear weight [prod(out), prod(in)], stored by us as [in..., out...] (einsum "...in,in out")."""
    return ParamSpec((*in_, *out), name, (out, in_), present)


def _vector(name, axes: tuple[str, ...], present=None) -> ParamSpec:
    return ParamSpec(axes, name, (axes,), present)


def _same_layout(name, axes: tuple[str, ...], present=None) -> ParamSpec:
    """A tensor stored in our layout, dimension for dimension (gpt-oss's fused expert tensors)."""
    return ParamSpec(axes, name, tuple((a,) for a in axes), present)


# whether a config has an optional tensor (ParamSpec.present)
_qkv_bias = operator.attrgetter("qkv_bias")
_post_norms = operator.attrgetter("post_norms")
_pre_norms = operator.attrgetter("pre_norms")
_qk_norm_flat = operator.attrgetter("qk_norm_flat")
_dense_mlp = operator.attrgetter("dense_mlp")
_moe = operator.attrgetter("moe")
_fused_experts = operator.attrgetter("fused_experts")
_expert_bias = operator.attrgetter("expert_bias")
_o_bias = operator.attrgetter("o_bias")
_sinks = operator.attrgetter("attn_sinks")
_shared_expert = operator.attrgetter("shared_expert")


def _qk_norm(cfg):
    return cfg.qk_norm and not cfg.qk_norm_flat


def _per_expert(cfg):
    return cfg.moe and not cfg.fused_experts


def _moe_name(part: int, template: str):
    """HF name of an MoE tensor: `template` with {block} / {proj} from the family's moe_names."""
    def name(cfg):
        names = families.FAMILIES[cfg.family].moe_names
        return template.format(block=names[0], proj=names[part], e="{e}",
                           router=families.FAMILIES[cfg.family].moe_router)
    return name


def _mlp_name(proj: str):
    return lambda cfg: f"mlp.shared_expert.{proj}.weight" if cfg.shared_expert else f"mlp.{proj}.weight"


# Every Params field ("embed", "layers.q", ...; per-layer fields get a leading "layers" axis) in HF checkpoint
# order. Gemma-2/3 name their four norms differently: HF's post_attention_layernorm is their attention post-norm.
PARAM_SPEC: dict[str, ParamSpec] = {
    "embed": ParamSpec(("vocab", "embed"), "model.embed_tokens.weight", (("vocab",), ("embed",))),
    "layers.attn_norm": _vector("input_layernorm.weight", ("embed",), _pre_norms),
    "layers.q": _linear("self_attn.q_proj.weight", ("heads", "head_dim"), ("embed",)),
    "layers.k": _linear("self_attn.k_proj.weight", ("kv_heads", "head_dim"), ("embed",)),
    "layers.v": _linear("self_attn.v_proj.weight", ("kv_heads", "head_dim"), ("embed",)),
    "layers.o": _linear("self_attn.o_proj.weight", ("embed",), ("heads", "head_dim")),
    "layers.gate": _linear(_mlp_name("gate_proj"), ("mlp",), ("embed",), _dense_mlp),
    "layers.up": _linear(_mlp_name("up_proj"), ("mlp",), ("embed",), _dense_mlp),
    "layers.down": _linear(_mlp_name("down_proj"), ("embed",), ("mlp",), _dense_mlp),
    "layers.router": _linear(_moe_name(0, "{block}.{router}.weight"), ("experts",), ("embed",), _moe),
    "layers.router_bias": _vector(_moe_name(0, "{block}.{router}.bias"), ("experts",), _expert_bias),
    "layers.expert_gate": dataclasses.replace(_linear(_moe_name(1, "{block}.experts.{e}.{proj}.weight"),
                                                      ("expert_mlp",), ("embed",), _per_expert),
                                              axes=("experts", "embed", "expert_mlp"), per_expert=True),
    "layers.expert_up": dataclasses.replace(_linear(_moe_name(2, "{block}.experts.{e}.{proj}.weight"),
                                                    ("expert_mlp",), ("embed",), _per_expert),
                                            axes=("experts", "embed", "expert_mlp"), per_expert=True),
    # gpt-oss stores each layer's experts as one tensor, already in our [E, in, out] layout
    "layers.expert_gate_up": _same_layout("mlp.experts.gate_up_proj", ("experts", "embed", "expert_mlp2"),
                                     _fused_experts),
    "layers.expert_gate_up_bias": _same_layout("mlp.experts.gate_up_proj_bias", ("experts", "expert_mlp2"),
                                          _expert_bias),
    "layers.expert_down": dataclasses.replace(_linear(_moe_name(3, "{block}.experts.{e}.{proj}.weight"),
                                                      ("embed",), ("expert_mlp",), _moe),
                                              axes=("experts", "expert_mlp", "embed"), per_expert=True,
                                              fused=_same_layout("mlp.experts.down_proj",
                                                            ("experts", "expert_mlp", "embed"), _moe)),
    "layers.expert_down_bias": _same_layout("mlp.experts.down_proj_bias", ("experts", "embed"), _expert_bias),
    "layers.shared_gate": _linear("mlp.shared_expert_gate.weight", (), ("embed",), _shared_expert),
    "layers.post_attn_norm": _vector("post_attention_layernorm.weight", ("embed",), _post_norms),
    "layers.mlp_norm": _vector(lambda cfg: "pre_feedforward_layernorm.weight" if cfg.post_norms
                               else "post_attention_layernorm.weight", ("embed",), _pre_norms),
    "layers.post_mlp_norm": _vector("post_feedforward_layernorm.weight", ("embed",), _post_norms),
    "layers.q_bias": _vector("self_attn.q_proj.bias", ("heads", "head_dim"), _qkv_bias),
    "layers.k_bias": _vector("self_attn.k_proj.bias", ("kv_heads", "head_dim"), _qkv_bias),
    "layers.v_bias": _vector("self_attn.v_proj.bias", ("kv_heads", "head_dim"), _qkv_bias),
    "layers.q_norm": _vector("self_attn.q_norm.weight", ("head_dim",), _qk_norm),
    "layers.k_norm": _vector("self_attn.k_norm.weight", ("head_dim",), _qk_norm),
    "layers.o_bias": _vector("self_attn.o_proj.bias", ("embed",), _o_bias),
    "layers.sinks": _vector("self_attn.sinks", ("heads",), _sinks),
    "layers.q_heads_norm": _vector("self_attn.q_norm.weight", ("heads", "head_dim"), _qk_norm_flat),
    "layers.k_heads_norm": _vector("self_attn.k_norm.weight", ("kv_heads", "head_dim"), _qk_norm_flat),
    "final_norm": _vector("model.norm.weight", ("embed",)),
    "lm_head": _linear("lm_head.weight", ("vocab",), ("embed",), lambda cfg: not cfg.tie_embeddings),
}
def _with_layers(spec: ParamSpec) -> ParamSpec:
    fused = _with_layers(spec.fused) if spec.fused else None
    return dataclasses.replace(spec, axes=("layers", *spec.axes), fused=fused)


PARAM_SPEC = {name: (_with_layers(spec) if name.startswith("layers.") else spec) for name, spec in PARAM_SPEC.items()}
PARAM_AXES: dict[str, tuple[str, ...]] = {name: spec.axes for name, spec in PARAM_SPEC.items()}


def present_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The PARAM_SPEC entries this config uses, in HF checkpoint order (fused variants where the config's
    checkpoints store all experts in one tensor)."""
    return {name: (spec.fused if spec.fused and cfg.fused_experts else spec) for name, spec in PARAM_SPEC.items()
            if spec.present is None or spec.present(cfg)}


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Size of every logical axis of the parameters under `cfg`."""
    return {"vocab": cfg.vocab_size, "embed": cfg.d_model, "layers": cfg.n_layers, "heads": cfg.n_heads,
            "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "mlp": cfg.d_ff, "experts": cfg.n_experts,
            "expert_mlp": cfg.d_expert, "expert_mlp2": 2 * cfg.d_expert}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Field path ("embed", "layers.q", ...) -> shape, for exactly the fields this config uses."""
    sizes = axis_sizes(cfg)
    return {name: tuple(sizes[a] for a in spec.axes) for name, spec in present_params(cfg).items()}


def from_flat(flat: dict[str, np.ndarray | jax.Array]) -> Params:
    """Params from a {"embed": ..., "layers.q": ...} dict (the inverse of `to_flat`)."""
    layer = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    return Params(
        embed=flat["embed"],
        layers=LayerParams(**layer),
        final_norm=flat["final_norm"],
        lm_head=flat.get("lm_head"),
    )


def to_flat(params: Params) -> dict[str, jax.Array]:
    flat = {"embed": params.embed, "final_norm": params.final_norm}
    if params.lm_head is not None:
        flat["lm_head"] = params.lm_head
    for name in LayerParams.__dataclass_fields__:
        value = getattr(params.layers, name)
        if value is not None:
            flat[f"layers.{name}"] = value
    return flat


def init_random(cfg: ModelConfig, key: jax.Array | int, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params in the shapes of `cfg` (tests, and benchmarks where weight values do not matter).

    Norm weights are 1 + 0.1 N(0, 1), everything else scale * N(0, 1). Drawn on the host with numpy, seeded by an
    int or by the data of a jax PRNG key: jax.random would compile one program per parameter shape (seconds each on
    a CPU), which dominated small tests.
    """
    seed = key if isinstance(key, int) else np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(param_shapes(cfg).items()):
        noise = rng.standard_normal(shape)
        flat[name] = jnp.asarray(((1.0 + 0.1 * noise) if "norm" in name else scale * noise).astype(np.float32), dtype)
    return from_flat(flat)


def unembedding(params: Params) -> jax.Array:
    """The [D, V] matrix that maps the final normed residual to logits."""
    return params.embed.T if params.lm_head is None else params.lm_head


def unstack_layers(layers: LayerParams) -> tuple[LayerParams, ...]:
    """The stacked [L, ...] layer weights as L separate per-layer LayerParams (copies). The forward pass loops over
    such a tuple instead of scanning; `generate.decoding_params` says why decoding on CPU wants that."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(layers.q.shape[0]))


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)

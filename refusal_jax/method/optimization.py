"""Refusal direction optimization (RDO; Wollschläger et al. 2025, "The Geometry of Refusal in LLMs", sec. 3).

A unit direction r̂ is learned by gradient descent through the frozen model, starting from the
difference-in-means (DIM) direction. The loss is a weighted sum of

  ablation  cross-entropy of *compliant* target completions of harmful prompts, with r̂ ablated at every layer
            and position (`Intervention` with ablate_basis = r̂, built inside the loss so it is differentiable);
  addition  cross-entropy of *refusal* target completions of harmless prompts, with s·r̂ added to resid_pre of
            one layer l (ActAdd); s is fixed: the norm of the DIM direction the run starts from (the norm the
            pipeline's actadd uses), or `add_scale`. It is not learned, so the addition term only turns r̂;
  retain    KL(base || ablated) averaged over every real position of templated harmless prompts;
  independence (optional) sum_j |cos(r̂, b_j)|^p against fixed directions b_j (`subspace.independence_penalty`),
            to find a direction different from earlier ones.

Targets, as in the paper: the ablation target of each harmful prompt is the model's own greedy completion
under DIM ablation, the addition target of each harmless prompt its greedy completion under DIM actadd
(`generate_targets`, `--target-tokens` tokens, 30 by default). The token ids are kept as generated (never
decoded and re-encoded) and saved in DIR/targets.json. Callers can pass their own target strings instead
(`examples_from_texts`, or `--targets FILE.json`).

Unit norm: the optimised variable v is unconstrained in the loss, which uses r̂ = v/‖v‖ (so the gradient is
tangent to the sphere); after every Adam step v is renormalised to ‖v‖ = 1. This is projected gradient descent
on the sphere, and the stored direction is always exactly unit norm.

Everything that changes between steps (the direction, optimizer state, batch, loss weights, layer, scale) is
traced data: the train step compiles once per model config and batch shape. The model parameters are an
argument that is never differentiated (`jax.value_and_grad` with respect to v only), i.e. frozen.

Checkpoints (orbax, `checkpoint_every` steps and at the end) hold the direction, the Adam state, the step and
the loss history; a rerun with the same settings resumes from the latest one, and since the batch of step t is
drawn from `np.random.default_rng((seed, t))`, an interrupted and resumed run equals an uninterrupted one.

The command `python -m refusal_jax.optimize --model SRC --direction RUN/direction.npy --layer L --out DIR`
(refusal_jax/optimize.py) writes DIR/direction.npy (float32 [D]: r̂ times the DIM norm, so it can be used exactly
like the pipeline's direction.npy, including actadd with coefficient 1), DIR/optimize_metadata.json,
DIR/loss_curves.png, DIR/targets.json and DIR/checkpoints/.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from refusal_jax.errors import DataError, RunError
from refusal_jax.evaluation import judge
from refusal_jax.evaluation.loss import masked_ce_loss
from refusal_jax.model.batching import left_pad
from refusal_jax.model.transformer import Intervention, forward_unjitted
from refusal_jax.runs import rundir as runs

LOSS_TERMS = ("ablation", "addition", "retain", "independence")
DEFAULT_WEIGHTS = {"ablation": 1.0, "addition": 0.2, "retain": 1.0, "independence": 0.0}


# --------------------------------------------------------------------------------------------------
# training data: fixed-shape token sets


@struct.dataclass
class Examples:
    """N left-padded sequences of one fixed length T.

    tokens:    [N, T] int32
    mask:      [N, T] int32 attention mask
    loss_mask: [N, T] float32, indexed by predicting position: for cross-entropy, 1 where the next token is a
               target token; for the retain KL, 1 at every real position.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, idx) -> "Examples":
        return jax.tree.map(lambda a: a[idx], self)


@struct.dataclass
class RDOData:
    """The three example sets; a set is None when its loss term is off (it is then not even computed)."""

    ablation: Examples | None = None
    addition: Examples | None = None
    retain: Examples | None = None


@struct.dataclass
class RDOHyper:
    """Traced hyperparameters of the loss (changing them never recompiles).

    weights:   [4] float32 weights of LOSS_TERMS.
    layer:     int32 layer l of the activation addition.
    add_scale: float32 norm s of the added vector s·r̂.
    fixed:     [m, D] directions the independence term keeps r̂ away from (zero rows: none).
    """

    weights: jax.Array
    layer: jax.Array
    add_scale: jax.Array
    fixed: jax.Array


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_examples(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]] | None, pad: int,
                  *, bucket: int = 16, length: int | None = None) -> Examples:
    """Left-padded prompt+target sequences with their loss mask.

    With targets, loss_mask[t] = 1 where token t+1 is a target token (cross-entropy of the target given the
    prompt); without, loss_mask = attention mask (every real position, for the retain KL). T is the longest
    sequence rounded up to a multiple of `bucket` (or `length`).
    """
    if not prompt_ids:
        raise DataError("no prompts")
    if target_ids is not None and len(target_ids) != len(prompt_ids):
        raise DataError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
    seqs, n_target = [], []
    for i, p in enumerate(prompt_ids):
        t = list(target_ids[i]) if target_ids is not None else []
        if target_ids is not None and not t:
            raise DataError(f"target {i} is empty")
        seqs.append(list(p) + t)
        n_target.append(len(t))
    T = length or _round_up(max(len(s) for s in seqs), bucket)
    if max(len(s) for s in seqs) > T:
        raise DataError(f"sequences of {max(len(s) for s in seqs)} tokens do not fit length {T}")
    tokens, mask = left_pad(seqs, pad, T)
    if target_ids is None:
        loss_mask = mask.astype(np.float32)
    else:
        loss_mask = np.zeros((len(seqs), T), np.float32)
        for b, n in enumerate(n_target):
            loss_mask[b, T - n - 1:T - 1] = 1.0  # positions predicting the target tokens
    return Examples(tokens=tokens, mask=mask, loss_mask=loss_mask)


def examples_from_texts(tokenizer, prompts: Sequence[str], targets: Sequence[str] | None, **kw) -> Examples:
    """Examples from already-templated prompt strings and target strings (targets encoded without specials)."""
    from refusal_jax.model.batching import encode, pad_id

    p_ids = encode(tokenizer, list(prompts))
    t_ids = None
    if targets is not None:
        t_ids = [list(tokenizer.encode(t, add_special_tokens=False)) for t in targets]
    return make_examples(p_ids, t_ids, pad_id(tokenizer), **kw)


def generate_targets(params, cfg, tokenizer, prompts: Sequence[str], intervention, *, max_new_tokens: int = 30,
                     batch_size: int = 16, progress: bool = False, desc: str = "targets") -> list[list[int]]:
    """Greedy completion token ids (up to and including a stop token) of templated prompts, in input order."""
    from refusal_jax.model.generate import generate_ids

    return generate_ids(params, cfg, tokenizer, prompts, intervention, batch_size=min(batch_size, len(prompts)),
                        max_new_tokens=max_new_tokens, progress=progress, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------------
# the loss


def _mean_ce(logits, ex: Examples):
    s, n = masked_ce_loss(logits, ex.tokens, ex.loss_mask)
    return s / jnp.maximum(n, 1).astype(s.dtype)


def rdo_loss(v: jax.Array, params, cfg, data: RDOData, hp: RDOHyper) -> tuple[jax.Array, dict]:
    """Weighted RDO loss of the (unnormalised) direction v [D] on one batch; returns (total, per-term dict).

    Terms whose example set is None are 0 (and cost nothing).
    """
    dtype = v.dtype
    r = v / jnp.linalg.norm(v)
    L = cfg.n_layers
    zero = jnp.zeros((), dtype)
    ablate = Intervention(ablate_basis=r[None], ablate_layers=jnp.ones((L,), dtype),
                          add_direction=jnp.zeros_like(r), add_coeffs=jnp.zeros((L,), dtype))
    terms = {name: zero for name in LOSS_TERMS}
    if data.ablation is not None:
        ex = data.ablation
        terms["ablation"] = _mean_ce(forward_unjitted(params, cfg, ex.tokens, ex.mask, ablate).logits, ex)
    if data.addition is not None:
        ex = data.addition
        add = Intervention(ablate_basis=jnp.zeros_like(r)[None], ablate_layers=jnp.zeros((L,), dtype),
                           add_direction=hp.add_scale.astype(dtype) * r,
                           add_coeffs=(jnp.arange(L) == hp.layer).astype(dtype))
        terms["addition"] = _mean_ce(forward_unjitted(params, cfg, ex.tokens, ex.mask, add).logits, ex)
    if data.retain is not None:
        ex = data.retain
        base = jax.lax.stop_gradient(forward_unjitted(params, cfg, ex.tokens, ex.mask).logits)
        ablated = forward_unjitted(params, cfg, ex.tokens, ex.mask, ablate).logits
        kl = judge.kl_div_jax(base, ablated)  # [B, T]
        m = ex.loss_mask.astype(kl.dtype)
        terms["retain"] = jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)
    if hp.fixed is not None:
        from refusal_jax.method.subspace import independence_penalty

        terms["independence"] = independence_penalty(r[None], hp.fixed).astype(dtype)
    w = hp.weights.astype(dtype)
    total = sum(w[i] * terms[name] for i, name in enumerate(LOSS_TERMS))
    return total, terms


# --------------------------------------------------------------------------------------------------
# the train step


class TrainState(NamedTuple):
    v: jax.Array  # [D] the direction (unit norm after every step)
    opt_state: Any
    step: jax.Array  # int32 []


def _strong(tree):
    """Every leaf as an uncommitted device array of an explicit (not weak) dtype, made from a host copy, so that
    fresh states (optax keeps injected hyperparameters weakly typed) and states restored by orbax (committed to
    a device) hit the same compiled step instead of compiling it again."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def init_state(direction, optimizer) -> TrainState:
    v = jnp.asarray(direction, jnp.float32)
    v = v / jnp.linalg.norm(v)
    return _strong(TrainState(v=v, opt_state=optimizer.init(v), step=jnp.zeros((), jnp.int32)))


def _update(loss_fn: Callable, optimizer, renormalize: bool, state: TrainState, *args):
    """One optimizer update of v from the gradient of `loss_fn(v, *args) -> (loss, aux)` with respect to v only,
    then v <- v / ‖v‖ when `renormalize`: (new state, loss, aux)."""
    import optax

    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(state.v, *args)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.v)
    v = optax.apply_updates(state.v, updates)
    if renormalize:
        v = v / jnp.linalg.norm(v)
    return TrainState(v=v, opt_state=opt_state, step=state.step + 1), loss, aux


def make_train_step(loss_fn: Callable, optimizer, *, renormalize: bool = True, max_traces: int | None = None):
    """A jitted `step(state, *args) -> (state, loss, aux)` for `loss_fn(v, *args) -> (loss, aux)`.

    One Adam (any optax) update of v from `jax.value_and_grad` with respect to v only (everything in `args`,
    the model parameters included, is frozen), then v <- v / ‖v‖ when `renormalize`. With `max_traces`, the step
    raises (chex.assert_max_traces) if it is traced more often, i.e. if something recompiles it.
    """
    def step(state: TrainState, *args):
        return _update(loss_fn, optimizer, renormalize, state, *args)

    if max_traces is not None:
        import chex

        step = chex.assert_max_traces(step, n=max_traces)
    return jax.jit(step)


def adam(lr: float):
    """Adam whose learning rate lives in the optimizer state (optax.inject_hyperparams), so runs with different
    learning rates share one compiled step."""
    import optax

    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


def _rdo_step_impl(state: TrainState, params, data: RDOData, hp: RDOHyper, *, cfg):
    # adam(0.0): the learning rate is read from opt_state
    return _update(lambda v, p, d, h: rdo_loss(v, p, cfg, d, h), adam(0.0), True, state, params, data, hp)


rdo_train_step = jax.jit(_rdo_step_impl, static_argnames=("cfg",))
rdo_train_step.__doc__ = """One RDO step: `rdo_train_step(state, params, data, hyper, cfg=cfg) -> (state, loss, terms)`.

The Adam state must come from `adam(lr).init` (`init_state(direction, adam(lr))`). Compiles once per model config
and batch shapes, whatever the learning rate, loss weights, layer or scale.
"""


# --------------------------------------------------------------------------------------------------
# training loop with checkpoints


@dataclasses.dataclass
class TrainResult:
    direction: np.ndarray  # float32 [D], unit norm
    history: dict[str, list[float]]  # "step", "total" and every LOSS_TERMS entry, one value per step done
    steps: int
    resumed_from: int | None
    seconds: float


def sample_batch(data: RDOData, step: int, batch_size: int, seed: int) -> RDOData:
    """The batch of step `step`: a function of (seed, step) only, so resumed runs see the same batches."""
    rng = np.random.default_rng((seed, step))
    out = {}
    for name in ("ablation", "addition", "retain"):
        ex = getattr(data, name)
        if ex is None:
            out[name] = None
            continue
        n = len(ex)
        idx = rng.permutation(n)[:batch_size] if n >= batch_size else rng.integers(0, n, batch_size)
        out[name] = ex.take(np.sort(idx))
    return RDOData(**out)


def _fingerprint(data: RDOData, direction, hyper: dict, batch_size: int, seed: int, lr: float) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(data):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    h.update(np.asarray(direction, np.float32).tobytes())
    h.update(json.dumps({**hyper, "batch_size": batch_size, "seed": seed, "lr": lr}, sort_keys=True,
                        default=runs._json_default).encode())
    return h.hexdigest()[:16]


def train(params, cfg, data: RDOData, init_direction, *, layer: int, steps: int, lr: float = 1e-2,
          batch_size: int = 8, weights: dict[str, float] | None = None, add_scale: float | None = None,
          fixed_directions=None, seed: int = 0, checkpoint_dir: str | Path | None = None,
          checkpoint_every: int = 50, progress: bool = False, max_traces: int | None = None) -> TrainResult:
    """Run (or resume) RDO for `steps` steps in total.

    Args:
      init_direction: [D] the starting direction (any norm; the DIM direction).
      layer: ActAdd layer of the addition loss.
      weights: loss weights by LOSS_TERMS name (default DEFAULT_WEIGHTS); a term with weight 0 is not computed.
      add_scale: norm of the added vector (default ‖init_direction‖).
      fixed_directions: [m, D] for the independence term (needs weights["independence"] > 0).
      checkpoint_dir: orbax checkpoints of (direction, Adam state, step, history) every `checkpoint_every`
        steps and at the end; resumes from the latest one. A checkpoint written with different data or settings
        is refused (RunError) instead of silently mixed in.
    """
    t0 = time.perf_counter()
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    unknown = set(w) - set(LOSS_TERMS)
    if unknown:
        raise RunError(f"unknown loss terms {sorted(unknown)}; choose from {LOSS_TERMS}")
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise RunError("steps must be >= 0, batch_size and checkpoint_every >= 1")
    direction = np.asarray(init_direction, np.float32)
    if direction.shape != (cfg.d_model,) or not np.isfinite(direction).all() or not np.any(direction):
        raise DataError(f"the initial direction must be a finite non-zero [{cfg.d_model}] vector")
    if not 0 <= layer < cfg.n_layers:
        raise RunError(f"layer {layer} out of range 0..{cfg.n_layers - 1}")
    data = RDOData(ablation=data.ablation if w["ablation"] else None,
                   addition=data.addition if w["addition"] else None,
                   retain=data.retain if w["retain"] else None)
    if data.ablation is None and data.addition is None and data.retain is None and not w["independence"]:
        raise RunError("every loss term is off (or has no examples)")
    fixed = None
    if w["independence"]:
        if fixed_directions is None:
            raise RunError("the independence term needs fixed directions (--independent-of)")
        fixed = jnp.asarray(np.atleast_2d(np.asarray(fixed_directions, np.float32)))
    scale = float(np.linalg.norm(direction)) if add_scale is None else float(add_scale)
    hyper = RDOHyper(weights=jnp.asarray([w[k] for k in LOSS_TERMS], jnp.float32),
                     layer=jnp.asarray(layer, jnp.int32), add_scale=jnp.asarray(scale, jnp.float32), fixed=fixed)
    fingerprint = _fingerprint(data, direction, {"weights": w, "layer": layer, "add_scale": scale,
                                                 "fixed": None if fixed is None else np.asarray(fixed)},
                               batch_size, seed, lr)

    optimizer = adam(lr)
    if max_traces is None:
        step_fn = functools.partial(rdo_train_step, cfg=cfg)
    else:  # a fresh jitted step whose traces are counted (tests)
        step_fn = make_train_step(lambda v, p, d, h: rdo_loss(v, p, cfg, d, h), optimizer, max_traces=max_traces)
    state = init_state(direction, optimizer)
    history: dict[str, list[float]] = {"step": [], "total": [], **{k: [] for k in LOSS_TERMS}}
    resumed_from = None

    mngr = None
    if checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True)
        mngr = ocp.CheckpointManager(Path(checkpoint_dir).expanduser().resolve(), options=options)
        latest = mngr.latest_step()
        if latest is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
            restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
            if meta.get("fingerprint") != fingerprint:
                raise RunError(f"{checkpoint_dir} holds checkpoints of a different optimization (other data, "
                               "initial direction or settings); use another --out or delete its checkpoints/")
            state = _strong(TrainState(**restored["state"]))
            history = {k: list(v)[:latest] for k, v in meta["history"].items()}
            resumed_from = int(latest)

    def save(step: int):
        if mngr is None:
            return
        import orbax.checkpoint as ocp

        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            meta=ocp.args.JsonSave({"fingerprint": fingerprint, "history": history, "step": step})), force=True)
        mngr.wait_until_finished()

    start = int(state.step)
    bar = None
    if progress and steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="optimizing direction", unit="step", leave=False)
    try:
        for t in range(start, steps):
            batch = sample_batch(data, t, batch_size, seed)
            state, loss, aux = step_fn(state, params, batch, hyper)
            loss = float(loss)
            if not np.isfinite(loss):
                raise RunError(f"the loss became {loss} at step {t}; lower --lr")
            history["step"].append(t + 1)
            history["total"].append(loss)
            for k in LOSS_TERMS:
                history[k].append(float(aux[k]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if (t + 1) % checkpoint_every == 0 or t + 1 == steps:
                save(t + 1)
    finally:
        if bar is not None:
            bar.close()
        if mngr is not None:
            mngr.close()
    v = np.asarray(state.v, np.float32)
    return TrainResult(direction=v, history=history, steps=int(state.step), resumed_from=resumed_from,
                       seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# plots


def plot_loss_curves(history: dict[str, list[float]], path: Path, title: str = "refusal direction optimization"):
    """Left: the weighted total and the two cross-entropies; right: the retain KL (and the independence
    penalty, when on), which are orders of magnitude smaller, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history["step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(steps, history["total"], label="total (weighted)", color="black", lw=1.5)
    for k in ("ablation", "addition"):
        if any(history[k]):
            left.plot(steps, history[k], label=f"{k} CE", lw=1)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats / token)")
    left.legend(fontsize=8)
    for k, label in (("retain", "retain KL"), ("independence", "independence")):
        if any(history[k]):
            right.plot(steps, np.maximum(history[k], 1e-12), label=label, lw=1)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("mean KL(base || ablated) (log)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    runs.save_figure(fig, Path(path))
    plt.close(fig)

"""A faithful PyTorch + transformers implementation of the reference pipeline's method, for side-by-side timing.

It follows andyrdt/refusal_direction (spec §5-§8): forward pre-hooks on every decoder block and forward hooks on
every attention and MLP module for directional ablation; a pre-hook on one block for activation addition; a
per-candidate Python loop over the validation sets in batches of 32 with full logits (the reference computes
the whole [B, T, V] logits tensor and keeps the last position); for mean activations, the whole causal LM (logits
included, unused) with a float64 copy of each block input;
`model.generate` with the hooks active for completions. Benchmarks only: the library never imports torch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _tensor(batch):
    return torch.tensor(batch.tokens, dtype=torch.long), torch.tensor(batch.mask, dtype=torch.long)


@contextlib.contextmanager
def hooks(model, pre_hooks=(), fwd_hooks=()):
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks]
    handles += [m.register_forward_hook(h) for m, h in fwd_hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation_hooks(model, direction: np.ndarray):
    r = torch.tensor(direction, dtype=torch.float32)
    r = r / (r.norm() + 1e-8)

    def pre(module, args):
        x = args[0]
        return (x - (x @ r)[..., None] * r,) + tuple(args[1:])

    def out(module, inp, output):
        if isinstance(output, tuple):
            x = output[0]
            return (x - (x @ r)[..., None] * r,) + tuple(output[1:])
        return output - (output @ r)[..., None] * r

    layers = model.model.layers
    return ([(blk, pre) for blk in layers],
            [(blk.self_attn, out) for blk in layers] + [(blk.mlp, out) for blk in layers])


def actadd_hooks(model, direction: np.ndarray, layer: int, coeff: float):
    r = torch.tensor(direction, dtype=torch.float32)

    def pre(module, args):
        return (args[0] + coeff * r,) + tuple(args[1:])

    return [(model.model.layers[layer], pre)], []


def last_logits(model, batches) -> np.ndarray:
    out = []
    with torch.no_grad():
        for b in batches:
            ids, mask = _tensor(b)
            logits = model(input_ids=ids, attention_mask=mask).logits  # full [B, T, V], as the reference
            out.append(logits[:, -1].double().numpy()[b.weight > 0])
    return np.concatenate(out)


def refusal_scores(logits: np.ndarray, refusal_ids) -> np.ndarray:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pr = p[:, list(refusal_ids)].sum(-1)
    return np.log(pr + 1e-8) - np.log(1 - pr + 1e-8)


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def sm(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pa, pb = sm(a), sm(b)
    return (pa * (np.log(pa + 1e-6) - np.log(pb + 1e-6))).sum(-1)


def mean_diffs(model, harmful, harmless, n_pos: int) -> np.ndarray:
    """The reference's generate_directions: float64 mean of resid_pre at the last n_pos positions."""
    L, D = len(model.model.layers), model.config.hidden_size

    def means(batches):
        acc = torch.zeros((n_pos, L, D), dtype=torch.float64)
        n = sum(float(b.weight.sum()) for b in batches)
        for b in batches:
            w = torch.tensor(b.weight, dtype=torch.float64)

            def make(layer):
                def pre(module, args):
                    act = args[0].clone().to(torch.float64)  # as the reference's hook: the whole activation
                    acc[:, layer] += (act[:, -n_pos:] * w[:, None, None]).sum(0) / n
                return pre

            with hooks(model, [(blk, make(i)) for i, blk in enumerate(model.model.layers)]), torch.no_grad():
                ids, mask = _tensor(b)
                model(input_ids=ids, attention_mask=mask)  # the whole causal LM, logits included, as the reference
        return acc.numpy()

    return means(harmful) - means(harmless)


def score_candidates(model, diffs, harmful_val, harmless_val, refusal_ids, grid) -> list[dict]:
    """The reference's select_direction loop: 3 hooked forward passes over the val sets per candidate."""
    base_harmless = last_logits(model, harmless_val)
    out = []
    for pos, layer in grid:
        r = diffs[pos, layer]
        pre, fwd = ablation_hooks(model, r)
        with hooks(model, pre, fwd):
            ablated_harmless = last_logits(model, harmless_val)
            ablated_harmful = last_logits(model, harmful_val)
        pre, fwd = actadd_hooks(model, r, layer, 1.0)
        with hooks(model, pre, fwd):
            added = last_logits(model, harmless_val)
        out.append({"position": pos, "layer": layer,
                    "refusal_score": float(refusal_scores(ablated_harmful, refusal_ids).mean()),
                    "steering_score": float(refusal_scores(added, refusal_ids).mean()),
                    "kl_div_score": float(kl(base_harmless, ablated_harmless).mean())})
    return out


def generate(model, batches, max_new_tokens: int, pad_id: int, stop_ids, direction=None) -> list[list[int]]:
    """model.generate (greedy) with ablation hooks active, as the reference's generate_completions."""
    pre, fwd = ablation_hooks(model, direction) if direction is not None else ([], [])
    out = []
    with hooks(model, pre, fwd), torch.no_grad():
        for b in batches:
            ids, mask = _tensor(b)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=list(stop_ids))
            out.extend(gen[:, ids.shape[1]:].tolist())
    return out

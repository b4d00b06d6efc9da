"""A tiny ChatML model trained (in seconds) to refuse: the commands run on it with their default settings.

A random model refuses nothing, so the default refusal filter empties the harmful sets and the default thresholds
reject every candidate. This one is trained with optax on the prompts below, under the family's template, so that
its last-token logits put "I" (a refusal token) on top for harmful prompts and "Sure" for harmless ones, and so
that the difference-in-means direction at layers 1-2 behaves like a refusal direction: ablating it leaves the
harmless next-token distribution alone (KL well under 0.1) and adding it makes harmless prompts refused. The
default extraction then keeps every prompt and selects a candidate with every default filter on.
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_chat import chat_tokenizer

_VERBS, _NOUNS = ("make", "build", "hack", "steal"), ("bomb", "virus", "weapon", "money")
HARMFUL = [f"how to {v} a {n}" for v in _VERBS for n in _NOUNS] + [f"{v} the {n}" for v in _VERBS for n in _NOUNS]
HARMLESS = [f"{v} a {n}" for v in ("write", "make", "explain", "list")
            for n in ("poem", "story", "cake", "letter", "recipe", "food", "cat", "dog")]


def write_sets(root: Path) -> tuple[Path, Path]:
    harmful, harmless = root / "harmful.txt", root / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    harmless.write_text("\n".join(HARMLESS) + "\n")
    return harmful, harmless


def save_refusing_model(path: Path, *, n_layers: int = 4, steps: int = 60, lr: float = 1e-2, seed: int = 0) -> Path:
    """Train and save (as a converted checkpoint) the model described above; returns `path`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from refusal_jax.convert import checkpoint
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random
    from refusal_jax.model.transformer import Intervention, forward_unjitted
    from refusal_jax.prompts.chat import ChatPrompts

    tok = chat_tokenizer()
    cfg = tiny_config("qwen2", vocab_size=len(tok), n_layers=n_layers)
    params = init_random(cfg, jax.random.key(seed), scale=0.5)
    chat = ChatPrompts.for_model(cfg.family, tok, None)  # the template the commands use for this tokenizer
    (batch,) = chat.batches(HARMFUL + HARMLESS, len(HARMFUL) + len(HARMLESS))
    refuse, comply = tok.convert_tokens_to_ids(["I", "Sure"])
    assert refuse in chat.refusal_ids
    harmful = jnp.asarray(batch.index < len(HARMFUL), jnp.float32)
    harmless = 1.0 - harmful
    target = np.where(batch.index < len(HARMFUL), refuse, comply)

    def mean_over(x, w):  # [L, B, D] -> [L, D]
        return jnp.einsum("lbd,b->ld", x, w) / w.sum()

    def loss(p):
        out = forward_unjitted(p, cfg, batch.tokens, batch.mask, capture=("resid_pre",), logits="last")
        logp = jax.nn.log_softmax(out.logits)
        total = -jnp.mean(jnp.take_along_axis(logp, target[:, None], 1))
        last = out.resid_pre[:, :, -1]
        diff = jax.lax.stop_gradient(mean_over(last, harmful) - mean_over(last, harmless))
        for layer in range(1, n_layers - 1):
            # ablation keeps harmless outputs (KL), addition makes harmless prompts refused (induce score)
            ablated = jax.nn.log_softmax(forward_unjitted(p, cfg, batch.tokens, batch.mask,
                                                          Intervention.ablation(cfg, diff[layer]),
                                                          logits="last").logits)
            kl = (jnp.exp(logp) * (logp - ablated)).sum(-1)
            added = jax.nn.log_softmax(forward_unjitted(p, cfg, batch.tokens, batch.mask,
                                                        Intervention.addition(cfg, diff[layer], layer, 1.0),
                                                        logits="last").logits)
            total += jnp.sum((kl - added[:, refuse]) * harmless) / harmless.sum()
        return total

    optimizer = optax.adam(lr)

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return checkpoint.save(path, cfg, params, tok, source="tiny model trained to refuse (tests/tiny_refusing.py)")

"""Residual-capturing forward pass: refusal_jax vs transformers + torch forward hooks, same prompts, same run.

Both sides collect resid_pre (the input of every decoder block) at the last `n_pos` positions of left-padded,
chat-templated prompts, as stage 1 of the pipeline does. The PyTorch side runs twice: the reference's method
(`get_mean_activations` calls the whole causal LM, so it computes logits at every position that nobody reads) and,
as a stronger baseline, the decoder stack alone without the LM head. Prints one JSON record.

    python benchmarks/forward.py [--n-prompts 64] [--batch-size 32] [--n-pos 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import chat_prompts, emit, hf_reference_model, machine, timed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model name (GGUF)")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-pos", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    import jax

    import refusal_jax
    from refusal_jax.convert import bundled
    from refusal_jax.model.batching import bucketed, encode, pad_id
    from refusal_jax.model.transformer import forward

    model = refusal_jax.load_model(args.model, progress=False)
    prompts, _ = chat_prompts(args.n_prompts, model.tokenizer, model.cfg.family)
    ids = encode(model.tokenizer, prompts)
    batches = list(bucketed(ids, args.batch_size, pad_id(model.tokenizer)))
    n_tokens = int(sum(b.mask.sum() for b in batches))
    n_padded = int(sum(b.mask.size for b in batches))

    def ours():
        outs = [forward(model.params, model.cfg, b.tokens, b.mask, capture=("resid_pre",), capture_last=args.n_pos,
                        logits="none").resid_pre for b in batches]
        return [np.asarray(jax.block_until_ready(o)) for o in outs]

    first, steady, acts = timed(ours, args.repeats)
    record = {
        "benchmark": "forward_resid_capture", "machine": machine(), "model": args.model, "dtype": "float32",
        "n_prompts": args.n_prompts, "batch_size": args.batch_size, "n_pos": args.n_pos,
        "real_tokens": n_tokens, "padded_tokens": n_padded, "batch_shapes": sorted({b.tokens.shape for b in batches}),
        "jax": {"first_call_s": first, "compile_s_approx": first - steady, "steady_s": steady,
                "tokens_per_s": n_tokens / steady},
    }
    if not args.skip_torch:
        import reference_torch
        import torch

        hf = hf_reference_model(bundled.model_path(args.model))
        captured = {}
        positions = list(range(-args.n_pos, 0))

        def hook(layer, faithful):
            def pre_hook(module, inputs):
                if faithful:  # generate_directions.py: input[0].clone().to(float64), then the positions
                    captured.setdefault(layer, []).append(inputs[0].clone().to(torch.float64)[:, positions])
                else:
                    captured.setdefault(layer, []).append(inputs[0][:, positions].double())
            return pre_hook

        def run_torch(module, faithful):
            def reference():
                captured.clear()
                pre_hooks = [(blk, hook(i, faithful)) for i, blk in enumerate(hf.model.layers)]
                with reference_torch.hooks(hf, pre_hooks), torch.no_grad():
                    for b in batches:
                        module(input_ids=torch.tensor(b.tokens, dtype=torch.long),
                               attention_mask=torch.tensor(b.mask, dtype=torch.long))
                return {k: torch.cat(v).numpy() for k, v in captured.items()}

            return timed(reference, args.repeats)

        ours0 = np.concatenate([a[0] for a in acts])
        # The reference method: get_mean_activations calls the whole causal LM, so logits are computed for every
        # position ([B, T, 151936]) and thrown away.
        t_first, t_steady, ref = run_torch(hf, faithful=True)
        record["torch_reference_method"] = {"first_call_s": t_first, "steady_s": t_steady,
                                            "tokens_per_s": n_tokens / t_steady,
                                            "what": "AutoModelForCausalLM forward + pre-hooks, "
                                                    "as generate_directions.py"}
        record["speedup_steady"] = t_steady / steady
        record["layer0_capture_max_abs_diff"] = float(np.abs(ref[0] - ours0).max())
        # A leaner torch baseline than the reference: the decoder stack only (no LM head), as refusal_jax does.
        t_first, t_steady, _ = run_torch(hf.model, faithful=False)
        record["torch_without_lm_head"] = {"first_call_s": t_first, "steady_s": t_steady,
                                           "tokens_per_s": n_tokens / t_steady}
        record["speedup_vs_torch_without_lm_head"] = t_steady / steady
    emit(record)


if __name__ == "__main__":
    main()

"""What the sha256 manifest costs: saving and loading a converted checkpoint with and without the checksums.

    python benchmarks/checkpoint_checksum.py [--layers 24]

A random model with Qwen2.5-0.5B's shapes (float32, ~2 GB of params) is saved once; then `checkpoint.load` is timed
with the verification and with it switched off (best of `--repeats`, alternating), and the hashing alone. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import machine  # noqa: F401  (also puts the repository on sys.path)

QWEN25_05B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                  intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import jax
    import numpy as np

    from refusal_jax.convert import checkpoint
    from refusal_jax.model.config import from_hf_config
    from refusal_jax.model.params import from_flat, param_shapes

    cfg = from_hf_config({**QWEN25_05B, "num_hidden_layers": args.layers})
    rng = np.random.default_rng(0)
    params = from_flat({k: rng.standard_normal(s, dtype=np.float32) for k, s in param_shapes(cfg).items()})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = checkpoint.save(Path(tmp) / "ckpt", cfg, params)
        save_s = time.perf_counter() - t0
        del params
        nbytes = sum(f.stat().st_size for f in (path / "params").rglob("*") if f.is_file())
        t0 = time.perf_counter()
        checkpoint.params_checksums(path)
        hash_s = time.perf_counter() - t0
        verify = checkpoint.compare_checksums
        with_s, without_s = [], []
        for _ in range(args.repeats):
            for on, times in ((True, with_s), (False, without_s)):
                checkpoint.compare_checksums = verify if on else (lambda *a, **k: None)
                t0 = time.perf_counter()
                out = checkpoint.load(path, with_tokenizer=False)
                jax.block_until_ready(out[1])
                times.append(time.perf_counter() - t0)
                del out
        checkpoint.compare_checksums = verify
    print(json.dumps({"benchmark": "checkpoint_checksum", "machine": machine(), "params_bytes": nbytes,
                      "n_params": cfg.n_params, "save_s_with_checksums": round(save_s, 2),
                      "sha256_s": round(hash_s, 2), "sha256_GBps": round(nbytes / hash_s / 1e9, 2),
                      "load_s_verified": round(min(with_s), 2), "load_s_unverified": round(min(without_s), 2)},
                     indent=1))


if __name__ == "__main__":
    main()

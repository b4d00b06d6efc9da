"""Peak host memory of conversion and of the orthogonalized export, each in a fresh process.

Steps, each run as its own subprocess whose peak resident set size (VmHWM) is reported, next to the RSS the
process had after its imports (Python + JAX + the libraries, before any model byte was read):

  convert-gguf    python -m refusal_jax.convert MODEL.gguf --out CKPT        (dequantize, orbax save)
  convert-hf      python -m refusal_jax.convert HF_DIR --out CKPT            (safetensors -> orbax)
  orthogonalize   python -m refusal_jax.orthogonalize --model CKPT ... --out HF_OUT  (load, edit, stream out)
  torch-load-save the PyTorch reference: transformers from_pretrained(HF_DIR) + in-place orthogonalization of
                  the same matrices + save_pretrained (what the reference's weight edit does)

"model" is the byte size of the converted parameters in the target dtype and "biggest" the largest single
tensor; the issue's target is (peak - after imports) <= 1.5 x max(model, biggest). The HF input directory is
written first by refusal_jax's own exporter from the bundled GGUF (not measured).

    python benchmarks/memory.py [--dtype float32|bfloat16] [--skip-torch]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, emit, machine


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes. VmHWM is this process image's own peak RSS: unlike
    getrusage's ru_maxrss, it does not inherit the parent's peak through fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _rss_now() -> int:
    return _status("VmRSS")


def child(kind: str, argv: list[str]) -> None:
    """Run one step in this process and print {"after_imports", "peak"} in bytes."""
    if kind == "torch":
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM

        base = _rss_now()
        src, direction, out, dtype = argv
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
        r = torch.tensor(np.load(direction), dtype=torch.float32)
        r = r / r.norm()
        with torch.no_grad():
            def proj(w, out_dim):  # w [.., D] along out_dim
                wf = w.float()
                if out_dim:  # [D, in]: columns write into the residual
                    wf -= torch.outer(r, r @ wf)
                else:  # [V, D]
                    wf -= torch.outer(wf @ r, r)
                w.copy_(wf.to(w.dtype))

            proj(model.model.embed_tokens.weight, False)
            for layer in model.model.layers:
                proj(layer.self_attn.o_proj.weight, True)
                proj(layer.mlp.down_proj.weight, True)
        model.save_pretrained(out)
    else:
        import importlib

        import jax

        jax.devices()  # initialise the backend before measuring the baseline
        module = importlib.import_module({"convert": "refusal_jax.convert.__main__",
                                          "orthogonalize": "refusal_jax.orthogonalize"}[kind])
        base = _rss_now()
        try:
            module.main(argv)
        except SystemExit as e:
            if e.code:
                raise
    peak = _status("VmHWM")
    print("MEMORY " + json.dumps({"after_imports": base, "peak": peak}))


def measure(kind: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MEMORY "))
    rec = json.loads(line[len("MEMORY "):])
    rec["work"] = rec["peak"] - rec["after_imports"]
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model name (GGUF)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.rest)

    import numpy as np

    import refusal_jax
    from refusal_jax.convert import bundled, export_hf
    from refusal_jax.model.params import param_shapes

    gguf = bundled.model_path(args.model)
    model = refusal_jax.load_model(args.model, progress=False)
    cfg = model.cfg
    itemsize = np.dtype(np.float32 if args.dtype == "float32" else np.float16).itemsize
    sizes = {k: int(np.prod(s)) * itemsize for k, s in param_shapes(cfg).items()}
    model_bytes, biggest = sum(sizes.values()), max(sizes.values())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = export_hf.save_hf(tmp / "hf", cfg, model.params, model.tokenizer, dtype=args.dtype)
        del model
        direction = tmp / "direction.npy"
        np.save(direction, np.random.default_rng(0).normal(size=cfg.d_model).astype(np.float32))
        common = ["--dtype", args.dtype, "--no-progress"]
        steps = {
            "convert-gguf": measure("convert", [str(gguf), "--out", str(tmp / "ckpt-gguf"), *common]),
            "convert-hf": measure("convert", [str(hf_dir), "--out", str(tmp / "ckpt"), *common]),
            "orthogonalize": measure("orthogonalize", ["--model", str(tmp / "ckpt"), "--direction", str(direction),
                                                       "--out", str(tmp / "ortho"), *common]),
        }
        if not args.skip_torch:
            steps["torch-load-save"] = measure("torch", [str(hf_dir), str(direction), str(tmp / "torch-out"),
                                                         args.dtype])
    bound = max(model_bytes, biggest)
    for rec in steps.values():
        rec["work_over_model"] = round(rec["work"] / bound, 3)
    emit({"benchmark": "memory", "machine": machine(), "model": args.model, "dtype": args.dtype,
          "model_bytes": model_bytes, "biggest_tensor_bytes": biggest, "target": "work <= 1.5 x model_bytes",
          "steps": steps})


if __name__ == "__main__":
    main()

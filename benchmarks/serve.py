"""python -m refusal_jax.serve under load: tokens/s and time to first token at 1, 8 and 32 concurrent clients.

Starts the server on the bundled model (`--slots` slots) with a direction, then for each concurrency C runs C
client threads (the official `openai` client, streaming with usage), each sending `--requests` chat requests
in turn, alternating the variants NAME and NAME+ablation; greedy, `--max-tokens` tokens. Reports per C: completion
tokens/s over the wall time, time to first token (first content chunk; median and 90th percentile) and
request latency. The last line is one JSON record.

    python benchmarks/serve.py [--concurrency 1,8,32] [--requests 2] [--max-tokens 128] [--slots 32]
                               [--direction RUN_DIR|FILE.npy]

Without --direction a random unit direction is served (the variants' cost does not depend on which direction).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "refusal_direction"


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="bundled model (default: %(default)s)")
    p.add_argument("--direction", default=None, help="RUN_DIR or FILE.npy (default: a random unit direction)")
    p.add_argument("--concurrency", default="1,8,32", help="client counts (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default: %(default)s)")
    p.add_argument("--slots", type=int, default=32, help="server --slots (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=512, help="server --max-model-len (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, help="reference splits folder (prompts: harmful_test "
                                                                 "and harmless_test instructions)")
    return p.parse_args()


def prompts(data_dir: Path | None, n: int) -> list[str]:
    from refusal_jax.prompts import datasets

    data_dir = data_dir or (DEFAULT_DATA if DEFAULT_DATA.exists() else Path("/work/shared/data/refusal_direction"))
    harmful = datasets.reference_split(data_dir, "harmful_test", instructions_only=True)
    harmless = datasets.reference_split(data_dir, "harmless_test", instructions_only=True)
    mixed = [x for pair in zip(harmful, harmless) for x in pair]
    return [mixed[i % len(mixed)] for i in range(n)]


def main():
    args = parse()
    import openai

    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    direction = args.direction
    if direction is None:
        from refusal_jax.convert.loading import load_model

        d_model = load_model(args.model, progress=False).cfg.d_model
        v = np.random.default_rng(0).normal(size=d_model).astype(np.float32)
        direction = str(tmp / "direction.npy")
        np.save(direction, v / np.linalg.norm(v))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "refusal_jax.serve", "--model", args.model, "--direction",
                             direction, "--served-model-name", "m", "--port", str(port), "--slots", str(args.slots),
                             "--max-model-len", str(args.max_model_len), "--no-progress"],
                            stdout=log, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(1)
    startup = time.perf_counter() - t0
    print(f"server ready in {startup:.1f} s", file=sys.stderr)

    def one(prompt: str, model: str):
        start = time.perf_counter()
        first, tokens = None, 0
        for event in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=args.max_tokens, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if first is None and event.choices and event.choices[0].delta.content:
                first = time.perf_counter() - start
            if event.usage:
                tokens = event.usage.completion_tokens
        return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens

    record = {"benchmark": "serve", "machine": machine(), "model": args.model, "slots": args.slots,
              "max_model_len": args.max_model_len, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests, "server_startup_s": round(startup, 1), "levels": {}}
    try:
        for c in levels:
            texts = prompts(args.data_dir, c * args.requests)

            def client_loop(k: int):
                return [one(texts[k * args.requests + j], "m" if (k + j) % 2 == 0 else "m+ablation")
                        for j in range(args.requests)]

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                rows = [r for rs in pool.map(client_loop, range(c)) for r in rs]
            wall = time.perf_counter() - t0
            ttft = np.array([r[0] for r in rows])
            latency = np.array([r[1] for r in rows])
            tokens = sum(r[2] for r in rows)
            rec = {"clients": c, "requests": len(rows), "completion_tokens": tokens, "wall_s": round(wall, 2),
                   "tokens_per_s": round(tokens / wall, 2), "ttft_median_s": round(float(np.median(ttft)), 3),
                   "ttft_p90_s": round(float(np.percentile(ttft, 90)), 3),
                   "latency_median_s": round(float(np.median(latency)), 2)}
            record["levels"][str(c)] = rec
            print(json.dumps(rec), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(600)
        log.close()
    print(json.dumps(record))


if __name__ == "__main__":
    main()

"""python -m refusal_jax.serve --model SRC [--direction RUN_DIR|FILE.npy]: an OpenAI-compatible HTTP server that
serves a model and its refusal-direction variants side by side from one copy of the weights.

Every variant is a model id: NAME (the model as it is), NAME+ablation (directional ablation of the direction at
every layer), NAME+addition (activation addition of the direction at its layer), NAME+edit-plain (the paper's
weight orthogonalization, served as its exact inference-time equivalent: the ablation) and NAME+edit-projected
(projected abliteration against the harmless mean at the direction's position and layer, served as ablation of the
projected direction). Requests of every variant share one continuous batcher (`model.continuous.Engine`): each
row of a batch indexes its own entry of a small table of interventions. A request to NAME may also carry an
ad-hoc intervention on the loaded direction: {"intervention": {"kind": "ablation" | "addition", "layer": L,
"coefficient": C}}.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages through the model's own chat template; max_tokens,
temperature (default 0: greedy, as the project's commands), top_p, seed, stop, stream with server-sent events,
usage), GET /health (rows running, requests waiting). Completions are decoded with special tokens skipped and
stripped, as `refusal_jax.generate` returns them. Docs: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from refusal_jax.errors import DataError
from refusal_jax.runs import cli
from refusal_jax.runs.cli import main_wrapper

ROLES = ("system", "developer", "user", "assistant")
ADHOC_ENTRIES = 4  # table entries kept for ad-hoc interventions (distinct ones running at the same time)
MAX_STOP_STRINGS = 4


def parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m refusal_jax.serve",
        description="OpenAI-compatible server (GET /v1/models, POST /v1/chat/completions) for a model and its "
                    "refusal-direction variants (NAME, NAME+ablation, NAME+addition, NAME+edit-plain, "
                    "NAME+edit-projected), all decoded in one continuous batch from one copy of the weights.")
    p.add_argument("--model", required=True, help=f"the model to serve: {cli.MODEL_SOURCES} (required)")
    cli.add_direction_flag(p, "the refusal direction whose variants are served (a run directory also gives the "
                              "layer of NAME+addition and the harmless mean of NAME+edit-projected)",
                           default="only the model itself")
    p.add_argument("--layer", type=int, default=None,
                   help="layer of NAME+addition (default: 'layer' of direction_metadata.json next to --direction)")
    p.add_argument("--coeff", type=float, default=1.0, help="coefficient of NAME+addition (default 1.0)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients ask for (default: the name of --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ requests (default: no key)")
    p.add_argument("--slots", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-model-len", type=int, default=2048, metavar="N",
                   help="KV cache positions per row: the prompt (in whole 32-token chunks) plus max_tokens must fit "
                        "(default 2048)")
    p.add_argument("--steps", type=int, default=4,
                   help="decoding steps between host turns (new requests enter, streams get tokens; default 4)")
    cli.add_dtype_flag(p)
    cli.add_strict_config_flag(p)
    cli.add_progress_flag(p)
    return p


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# --------------------------------------------------------------------------------------------------
# variants


@dataclasses.dataclass
class Direction:
    """The loaded direction and what a run directory says about it."""

    vector: np.ndarray  # [D] or an orthonormal [R, D] basis
    layer: int | None
    harmless_mean: np.ndarray | None  # [D] at the direction's position and layer


def load_direction_arg(path: str, cfg, layer: int | None) -> Direction:
    from refusal_jax.method import edits
    from refusal_jax.method.orthogonalization import load_direction
    from refusal_jax.runs import rundir

    vector = np.asarray(load_direction(path, cfg.d_model))
    p = Path(path).expanduser()
    run_dir = p if p.is_dir() else p.parent
    meta = run_dir / "direction_metadata.json"
    meta = rundir.read_json(meta) if meta.exists() else {}
    if layer is None and "layer" in meta:
        layer = int(meta["layer"])
    if layer is not None and not 0 <= layer < cfg.n_layers:
        raise DataError(f"--layer must be in 0..{cfg.n_layers - 1}, got {layer}")
    mean = None
    if vector.ndim == 1 and layer is not None and (run_dir / edits.HARMLESS_MEAN_FILE).exists():
        per_layer = edits.load_harmless_mean(run_dir, cfg, direction_path=path, pos=meta.get("pos"))
        mean = per_layer[layer] if per_layer.ndim == 2 else per_layer
    return Direction(vector, layer, mean)


def variants(cfg, direction: Direction | None, coeff: float = 1.0) -> dict[str, Any]:
    """{suffix: Intervention or None} of the variants a direction gives ("" is the model itself)."""
    from refusal_jax.method import edits
    from refusal_jax.model.transformer import Intervention

    out: dict[str, Any] = {"": None}
    if direction is None:
        return out
    out["ablation"] = Intervention.ablation(cfg, direction.vector)
    if direction.vector.ndim == 1 and direction.layer is not None:
        out["addition"] = Intervention.addition(cfg, direction.vector, direction.layer, coeff)
    out["edit-plain"] = out["ablation"]  # weight orthogonalization equals directional ablation
    if direction.harmless_mean is not None:
        basis, _ = edits.edit_basis(direction.vector, "projected", direction.harmless_mean)
        out["edit-projected"] = Intervention.ablation(cfg, basis)
    return out


# --------------------------------------------------------------------------------------------------
# request parsing


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: 'content' must be a string", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS}",
                       param="stop")
    return stop


# --------------------------------------------------------------------------------------------------
# the server


class Server:
    """The model, its variants, the engine and the request handlers."""

    def __init__(self, model, name: str, named: dict[str, Any], direction: Direction | None, *, slots: int,
                 max_model_len: int, steps: int, api_key: str | None = None):
        from refusal_jax.model import continuous
        from refusal_jax.model.batching import pad_id
        from refusal_jax.model.generate import decoding_params, stop_token_ids

        self.model, self.name, self.direction, self.api_key = model, name, direction, api_key
        self.tokenizer = model.tokenizer
        self.stop_ids = stop_token_ids(self.tokenizer)
        entries: list = []
        self.entry: dict[str, int] = {}
        for suffix, iv in named.items():
            found = next((i for i, e in enumerate(entries) if e is iv), None)  # aliases share an entry
            if found is None:
                entries.append(iv)
                found = len(entries) - 1
            self.entry[name if not suffix else f"{name}+{suffix}"] = found
        self.adhoc_first = len(entries)
        entries += [None] * ADHOC_ENTRIES
        self.adhoc: dict[tuple, list[int]] = {}  # key -> [entry, users]
        self.created = int(time.time())
        self.engine = continuous.Engine(decoding_params(model.params), model.cfg,
                                        continuous.stack(model.cfg, entries), slots=slots, cache_len=max_model_len,
                                        stop_ids=self.stop_ids, pad=pad_id(self.tokenizer), steps=steps)
        self._lock = threading.Lock()

    # --- ad-hoc interventions

    def _adhoc(self, spec) -> tuple[tuple, Any]:
        from refusal_jax.model.transformer import Intervention

        cfg = self.model.cfg
        if not isinstance(spec, dict):
            raise ApiError(400, "'intervention' must be an object {kind, layer, coefficient}", param="intervention")
        unknown = set(spec) - {"kind", "layer", "coefficient"}
        if unknown:
            raise ApiError(400, f"unknown intervention fields: {', '.join(sorted(unknown))}", param="intervention")
        kind = spec.get("kind")
        if kind not in ("none", "ablation", "addition"):
            raise ApiError(400, "intervention 'kind' must be none, ablation or addition", param="intervention")
        if kind == "none":
            return ("none",), None
        if self.direction is None:
            raise ApiError(400, "the server was started without --direction: no ad-hoc interventions",
                           param="intervention")
        layer = _number(spec, "layer", None, 0, cfg.n_layers - 1, integer=True)
        vector = self.direction.vector
        if kind == "ablation":
            if "coefficient" in spec:
                raise ApiError(400, "ablation takes no coefficient", param="intervention")
            iv = Intervention.ablation(cfg, vector)
            if layer is not None:  # at that layer only
                iv = iv.replace(ablate_layers=(np.arange(cfg.n_layers) == layer).astype(np.float32))
            return ("ablation", layer), iv
        if vector.ndim != 1:
            raise ApiError(400, "activation addition needs a single direction, not a basis", param="intervention")
        layer = self.direction.layer if layer is None else layer
        if layer is None:
            raise ApiError(400, "addition needs a 'layer' (the direction has none)", param="intervention")
        coeff = float(_number(spec, "coefficient", 1.0))
        return ("addition", layer, coeff), Intervention.addition(cfg, vector, layer, coeff)

    def _acquire(self, key, iv) -> int:
        with self._lock:
            if key in self.adhoc:
                self.adhoc[key][1] += 1
                return self.adhoc[key][0]
            used = {e for e, _ in self.adhoc.values()}
            free = [e for e in range(self.adhoc_first, self.adhoc_first + ADHOC_ENTRIES) if e not in used]
            if not free:
                raise ApiError(429, f"at most {ADHOC_ENTRIES} different ad-hoc interventions run at once; retry "
                                    "later", type="rate_limit_error")
            self.engine.set_entry(free[0], iv)  # applied on the engine's thread before the request is admitted
            self.adhoc[key] = [free[0], 1]
            return free[0]

    def _release(self, key) -> None:
        with self._lock:
            self.adhoc[key][1] -= 1
            if self.adhoc[key][1] == 0:
                del self.adhoc[key]

    # --- requests

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat template's text for `messages` plus the generation prompt, tokenized as the commands do (BOS
        added by the tokenizer where it adds one, never twice)."""
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception (e.g. roles it does not take)
            raise ApiError(400, f"the chat template refused the messages: {str(e)[:200]}", param="messages") from None
        bos = getattr(tok, "bos_token", None)
        if bos and text.startswith(bos) and getattr(tok, "add_bos_token", False):
            text = text[len(bos):]
        return list(tok(text, add_special_tokens=True)["input_ids"])

    def check_auth(self, request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", type="authentication_error",
                           code="invalid_api_key")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created,
                                            "owned_by": "refusal_jax"} for m in self.entry]}

    def parse(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in self.entry:
            raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists "
                                f"{', '.join(self.entry)}", param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        messages = _messages(body)
        ids = self.prompt_ids(messages)
        room = self.engine.cache_len - self.engine.padded(len(ids))
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, over this server's context of "
                                f"{self.engine.cache_len} (--max-model-len)", param="messages",
                           code="context_length_exceeded")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": limit}, "max_tokens", room, 1, integer=True)
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens={max_tokens} exceed this server's "
                                f"context of {self.engine.cache_len} (--max-model-len)", param="max_tokens",
                           code="context_length_exceeded")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        adhoc = None
        if body.get("intervention") is not None:
            if model != self.name:
                raise ApiError(400, f"an ad-hoc intervention applies to {self.name!r} itself, not {model!r}",
                               param="intervention")
            adhoc = self._adhoc(body["intervention"])
        return dict(model=model, ids=ids, max_tokens=max_tokens, stream=stream,
                    include_usage=bool(options.get("include_usage")),
                    temperature=float(_number(body, "temperature", 0.0, 0, 2)),
                    top_p=float(_number(body, "top_p", 1.0, 0, 1)),
                    seed=_number(body, "seed", None, integer=True), stop=_stops(body), adhoc=adhoc)

    def start(self, job: dict, loop) -> tuple[Any, asyncio.Queue, Any]:
        """Submit a parsed request: (engine request, queue of (new tokens, stopped), ad-hoc key to release)."""
        from refusal_jax.model import continuous

        queue: asyncio.Queue = asyncio.Queue()
        variant, key = self.entry[job["model"]], None
        if job["adhoc"] is not None:
            key, iv = job["adhoc"]
            if iv is not None:
                variant = self._acquire(key, iv)
            else:
                key = None
        seed = job["seed"] if job["seed"] is not None else int(np.random.default_rng().integers(2**31))
        req = continuous.Request(job["ids"], lambda new, stopped: loop.call_soon_threadsafe(
            queue.put_nowait, (new, stopped)), variant=variant, max_tokens=job["max_tokens"],
            temperature=job["temperature"], top_p=job["top_p"], seed=seed)
        try:
            self.engine.submit(req)
        except RuntimeError:
            if key is not None:
                self._release(key)
            raise ApiError(503, "the server is shutting down", type="server_error") from None
        return req, queue, key


class Text:
    """The completion's text as tokens arrive: decoded with special tokens skipped, cut at the first stop string,
    stripped; `ready()` is the part a stream may send (no trailing whitespace, no partial character or stop
    string)."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: tuple[int, ...]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_ids)
        self.ids: list[int] = []
        self.text = ""
        self.hit_stop = False

    def add(self, new: list[int]) -> None:
        if self.hit_stop:
            return
        self.ids += new
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, self.hit_stop = text[:min(cuts)], True
        self.text = text

    def final(self) -> str:
        return self.text.strip()

    def ready(self) -> str:
        text = self.text.lstrip()
        if not self.hit_stop:
            for s in self.stops:  # hold back a suffix that may begin a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        text = text.rstrip()
        return text[:-1] if text.endswith("\ufffd") else text

    def finish_reason(self, max_tokens: int) -> str:
        if self.hit_stop or (self.ids and self.ids[-1] in self.stop_ids) or len(self.ids) < max_tokens:
            return "stop"
        return "length"


def build_app(server: Server):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def run_guarded(request: Request, handler):
        try:
            server.check_auth(request)
            return await handler(request)
        except ApiError as e:
            return e.response()

    async def models(request: Request):
        return await run_guarded(request, lambda r: _async(JSONResponse(server.models())))

    async def health(request: Request):
        return JSONResponse({"status": "ok", **server.engine.load()})

    async def chat(request: Request):
        return await run_guarded(request, _chat)

    async def _chat(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        job = server.parse(body)
        loop = asyncio.get_running_loop()
        req, queue, key = server.start(job, loop)
        text = Text(server.tokenizer, job["stop"], server.stop_ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": job["model"]}

        def usage():
            return {"prompt_tokens": len(job["ids"]), "completion_tokens": len(text.ids),
                    "total_tokens": len(job["ids"]) + len(text.ids)}

        async def events():
            """(new tokens, stopped) until the row stops; a stop string ends it early."""
            try:
                while True:
                    new, stopped = await queue.get()
                    text.add(new)
                    if text.hit_stop and not stopped:
                        req.cancel()
                    yield stopped
                    if stopped:
                        return
            finally:
                req.cancel()  # a client gone mid-way frees its slot
                if key is not None:
                    server._release(key)

        if not job["stream"]:
            async def wait():
                async for _ in events():
                    pass

            task = asyncio.ensure_future(wait())
            while not task.done():  # a client that disconnects frees its slot
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return JSONResponse({}, status_code=499)
            task.result()
            if server.engine.error is not None:
                raise ApiError(500, f"the engine failed: {server.engine.error}", type="server_error")
            return JSONResponse({**head, "object": "chat.completion",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text.final()},
                                              "finish_reason": text.finish_reason(job["max_tokens"]),
                                              "logprobs": None}],
                                 "usage": usage()})

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            sent = ""
            async for stopped in events():
                ready = text.final() if stopped else text.ready()
                if len(ready) > len(sent) and ready.startswith(sent):
                    yield chunk({"content": ready[len(sent):]})
                    sent = ready
            yield chunk({}, text.finish_reason(job["max_tokens"]))
            if job["include_usage"]:
                last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.close)

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


async def _async(value):
    return value


def _uvicorn_server(app, host: str, port: int):
    """uvicorn's server, with SIGINT/SIGTERM ending it normally: running requests finish, then exit status 0
    (uvicorn itself re-raises the signal after its graceful shutdown)."""
    import signal

    import uvicorn

    class Graceful(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Graceful(uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on",
                                   timeout_graceful_shutdown=None))


@main_wrapper
def main(argv=None):
    import sys

    from refusal_jax.convert.loading import load_model
    from refusal_jax.method.orthogonalization import load_direction

    args = parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise DataError(f"--port must be in 1..65535, got {args.port}")
    if args.slots < 1 or args.steps < 1 or args.max_model_len < 32:
        raise DataError("--slots and --steps must be >= 1, --max-model-len >= 32")
    if args.direction:
        load_direction(args.direction, None)  # a bad file fails before the model loads
    model = load_model(args.model, dtype=args.dtype, strict_config=not args.no_strict_config,
                       progress=not args.no_progress)
    if not getattr(model.tokenizer, "chat_template", None):
        raise DataError(f"{args.model}: the tokenizer has no chat template; the server renders messages with it")
    direction = load_direction_arg(args.direction, model.cfg, args.layer) if args.direction else None
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    server = Server(model, name, variants(model.cfg, direction, args.coeff), direction, slots=args.slots,
                    max_model_len=args.max_model_len, steps=args.steps, api_key=args.api_key)
    server.engine.start()
    print(f"compiling the decoding programs ({args.slots} slots, {args.max_model_len} positions) ...",
          file=sys.stderr, flush=True)
    server.engine.warm_up()
    print(f"serving {', '.join(server.entry)} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    _uvicorn_server(build_app(server), args.host, args.port).run()


if __name__ == "__main__":
    main()

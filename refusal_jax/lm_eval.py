"""refusal_jax as an lm-evaluation-harness model: `python -m refusal_jax.lm_eval ARGS` (lm-eval's own command line).

lm-eval 0.4 discovers no plugins, so this command registers the model "refusal_jax" and then runs lm-eval's
command line with ARGS unchanged:

    python -m refusal_jax.lm_eval --model refusal_jax \\
        --model_args pretrained=qwen2.5-coder-0.5b-instruct,intervention=ablation,direction=runs/extract \\
        --tasks arc_easy --limit 100

From Python: `refusal_jax.lm_eval.register()`, then `lm_eval.simple_evaluate(model="refusal_jax", ...)` (or pass
`RefusalJaxLM(...)` itself as the model).

model_args: pretrained (any refusal_jax model source, default the bundled model), intervention (none, ablation,
addition, edit-plain, edit-projected, edit-norm-preserving), direction, layer, coeff, harmless_mean, dtype
(`refusal_jax.evaluation.capabilities.ModelSpec`), batch_size (default 8), max_length (context window, default 2048),
max_gen_toks (default 256). The intervention is active in every forward pass. Bad model_args (an unknown or
repeated key, a value of the wrong type, an unknown intervention, a missing direction or model) are refused with
one `error:` line before any model is loaded (`check_model_args`).

  loglikelihood          one forward over context + continuation (left-padded, length-bucketed batches, jit);
                         log-softmax only over the continuation positions, in 16-position chunks, so no
                         [batch, length, vocab] array is held
  loglikelihood_rolling  lm-eval's disjoint rolling windows of max_length tokens, each scored as above
  generate_until         greedy decoding (`refusal_jax.model.generate`) until EOS, a token whose text contains an
                         `until` string, or max_gen_toks; the text is cut at the first `until` string. Sampling
                         arguments (do_sample, temperature) are ignored: decoding is always greedy.

Inside this module `import lm_eval` is an absolute import: it is the lm-evaluation-harness package, not this file.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refusal_jax.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the [eval] extra is not installed; register() / main() say so
    TemplateLM = None

MODEL_NAME = "refusal_jax"
_CHUNK = 16  # continuation positions per log-softmax chunk (and the bucket of the scored length)
MISSING = "the lm-eval integration needs lm-evaluation-harness: pip install 'refusal-jax[eval]' (or lm-eval)"


def _require():
    if TemplateLM is None:
        raise ConfigError(MISSING)


@functools.partial(jax.jit, static_argnames=("cfg", "n_scored"))
def _score(params, cfg, tokens, mask, targets, score_mask, intervention, *, n_scored: int):
    """Per row: summed log-probability of `targets` [B, K] (the next tokens of the last K = n_scored input
    positions) where `score_mask`, and whether every scored target is the argmax."""
    from refusal_jax.model.transformer import forward_unjitted, lm_head

    x = forward_unjitted(params, cfg, tokens, mask, intervention, capture=("resid_final",), capture_last=n_scored,
                 logits="none").resid_final  # [B, K, D]
    B, K, D = x.shape

    def chunk(args):  # the forward pass's LM head on _CHUNK positions at a time
        h, y = args  # [B, C, D], [B, C]
        logits = lm_head(params, cfg, h)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]
        return logp, jnp.argmax(logits, axis=-1) == y

    split = lambda a: jnp.moveaxis(a.reshape(B, K // _CHUNK, _CHUNK, *a.shape[2:]), 1, 0)  # noqa: E731
    logp, greedy = jax.lax.map(chunk, (split(x), split(targets)))  # [K/C, B, C]
    logp, greedy = (jnp.moveaxis(a, 0, 1).reshape(B, K) for a in (logp, greedy))
    on = score_mask > 0
    return jnp.sum(jnp.where(on, logp, 0.0), axis=1), jnp.all(greedy | ~on, axis=1)


def score_tokens(params, cfg, pad: int, pairs, intervention=None, *, batch_size: int = 8,
                 max_length: int = 2048, on_step=None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is greedy) for each (context ids, continuation ids) pair,
    in input order. Context + continuation is cut to its last max_length + 1 tokens, as lm-eval's HF model does."""
    from refusal_jax.model.batching import ForwardCost, bucketed

    inputs, conts = [], []
    for ctx, cont in pairs:
        if not cont:
            raise ConfigError("an lm-eval request has an empty continuation")
        seq = (list(ctx) + list(cont))[-(max_length + 1):]
        inputs.append(seq[:-1])
        conts.append((seq[1:], min(len(cont), len(seq) - 1)))
    out: list[Any] = [None] * len(pairs)
    for batch in bucketed(inputs, batch_size, pad, cost=ForwardCost.for_model(cfg)):  # long contexts: smaller batches
        rows = [int(i) for i in batch.index if i >= 0]
        K = -(-max(conts[i][1] for i in rows) // _CHUNK) * _CHUNK  # <= the padded length, a multiple of 16 too
        targets = np.zeros((len(batch.index), K), np.int32)
        score_mask = np.zeros((len(batch.index), K), np.int32)
        for r, i in enumerate(batch.index):
            if i < 0:
                continue
            y, n = conts[i]
            m = min(K, len(y))
            targets[r, K - m:] = y[len(y) - m:]
            score_mask[r, K - n:] = 1
        logp, greedy = _score(params, cfg, batch.tokens, batch.mask, targets, score_mask, intervention, n_scored=K)
        logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
        for r, i in enumerate(batch.index):
            if i >= 0:
                out[int(i)] = (float(logp[r]), bool(greedy[r]))
        if on_step is not None:
            on_step(len(rows))
    return out


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 8
    return _int("batch_size", value, low=1)


# model_args keys: ours (RefusalJaxLM's parameters), and the ones lm-eval adds itself
MODEL_ARGS = ("pretrained", "intervention", "direction", "layer", "coeff", "harmless_mean", "dtype", "batch_size",
              "max_length", "max_gen_toks", "add_bos_token", "progress")
_HARNESS_ARGS = ("device", "max_batch_size")


def _int(key: str, value, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ConfigError(f"model_args {key}={value}: not an integer")
    value = int(value)
    if low is not None and value < low:
        raise ConfigError(f"model_args {key}={value}: must be >= {low}")
    return value


def _float(key: str, value) -> float:
    try:
        out = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        out = None
    if out is None or not math.isfinite(out):
        raise ConfigError(f"model_args {key}={value}: not a finite number")
    return out


def _bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise ConfigError(f"model_args {key}={value}: not true or false")


def parse_model_args(text: str | None) -> dict[str, Any]:
    """'key=value,key=value' -> {key: value} as lm-eval parses it ("true" -> True, "8" -> 8), refusing an item
    without '=', an empty key and a repeated key (lm-eval keeps the last value of a repeated key, with at most a
    log line; which one the user meant is unknowable)."""
    from lm_eval.utils import handle_arg_string

    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"model_args: expected key=value, got {item!r}")
        if key in out:
            raise ConfigError(f"model_args: {key} is given twice ({key}={out[key]} and {key}={value})")
        out[key] = handle_arg_string(value)
    return out


def check_model_args(args: dict) -> dict:
    """The model_args checked and typed, and the intervention resolved (`ModelSpec.resolved`: direction and harmless
    mean files read, the layer taken from the direction's run), before any model is loaded. Returns the keyword
    arguments of `RefusalJaxLM` (plus "spec"). Raises ConfigError / DataError / CheckpointError: one line each."""
    from pathlib import Path

    from refusal_jax.convert import bundled
    from refusal_jax.errors import CheckpointError
    from refusal_jax.evaluation.capabilities import ModelSpec

    unknown = sorted(set(args) - set(MODEL_ARGS) - set(_HARNESS_ARGS) - {"loaded"})
    if unknown:
        raise ConfigError(f"unknown model_args {', '.join(unknown)}; refusal_jax takes {', '.join(MODEL_ARGS)}")
    pretrained = str(args.get("pretrained", "qwen2.5-coder-0.5b-instruct"))
    path = Path(pretrained).expanduser()
    hub_id = pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~"))
    if args.get("loaded") is None and not path.exists() and not bundled.is_known_model(pretrained) and not hub_id:
        raise CheckpointError(f"model_args pretrained={pretrained}: no such file or directory, and not a bundled "
                              f"model name ({', '.join(sorted(bundled.MODELS))}) or a hub id (owner/name)")
    optional = {k: args.get(k) for k in ("direction", "harmless_mean")}
    spec = ModelSpec(
        model=pretrained, intervention=str(args.get("intervention", "none")),
        direction=None if optional["direction"] is None else str(optional["direction"]),
        layer=None if args.get("layer") is None else _int("layer", args["layer"], low=0),
        coeff=_float("coeff", args.get("coeff", 1.0)),
        harmless_mean=None if optional["harmless_mean"] is None else str(optional["harmless_mean"]),
        dtype=str(args.get("dtype", "float32")))
    typed = {"spec": spec.resolved() if args.get("loaded") is None else spec,
             "batch_size": _batch_size(args.get("batch_size", 8)),
             "max_length": _int("max_length", args.get("max_length", 2048), low=2),
             "max_gen_toks": _int("max_gen_toks", args.get("max_gen_toks", 256), low=1),
             "add_bos_token": _bool("add_bos_token", args.get("add_bos_token", False)),
             "progress": _bool("progress", args.get("progress", True))}
    return typed


if TemplateLM is not None:
    _Base = TemplateLM
else:  # keeps the module importable without lm-eval
    _Base = object


class RefusalJaxLM(_Base):
    """An lm-eval model: a refusal_jax model under an intervention (module docstring)."""

    def __init__(self, pretrained: str = "qwen2.5-coder-0.5b-instruct", intervention: str = "none",
                 direction: str | None = None, layer: int | None = None, coeff: float = 1.0,
                 harmless_mean: str | None = None, dtype: str = "float32", batch_size=8, max_length: int = 2048,
                 max_gen_toks: int = 256, add_bos_token: bool = False, progress: bool = True, loaded=None,
                 **unused):
        _require()
        super().__init__()
        args = dict(pretrained=pretrained, intervention=intervention, direction=direction, layer=layer, coeff=coeff,
                    harmless_mean=harmless_mean, dtype=dtype, batch_size=batch_size, max_length=max_length,
                    max_gen_toks=max_gen_toks, add_bos_token=add_bos_token, progress=progress, loaded=loaded, **unused)
        typed = check_model_args({k: v for k, v in args.items() if v is not None or k in unused})
        self.spec, progress = typed["spec"], typed["progress"]
        self.loaded = loaded or self.spec.load(progress)
        self.params, self.cfg, self.tokenizer = self.loaded.params, self.loaded.cfg, self.loaded.tokenizer
        self.intervention = self.loaded.intervention
        self.batch_size = typed["batch_size"]
        self.max_length, self.max_gen_toks = typed["max_length"], typed["max_gen_toks"]
        self.add_bos_token = typed["add_bos_token"]
        self.progress = progress
        self._decoding = None
        self._token_texts: list[str] | None = None
        self._stop_cache: dict[tuple[str, ...], tuple] = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "RefusalJaxLM":
        """lm-eval's `simple_evaluate(model_args="k=v,...")`: as lm-eval's own, but a repeated key is refused."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**parse_model_args(arg_string), **extra)

    # -- tokenization (TemplateLM) --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer.encode(string, add_special_tokens=special))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _pad(self) -> int:
        from refusal_jax.model.batching import pad_id

        return pad_id(self.tokenizer)

    def _bar(self, total: int, desc: str, disable: bool):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=disable or not self.progress)

    # -- requests --------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        bar = self._bar(len(requests), "refusal_jax loglikelihood", disable_tqdm)
        out = score_tokens(self.params, self.cfg, self._pad(), [(ctx, cont) for _, ctx, cont in requests],
                           self.intervention, batch_size=self.batch_size, max_length=self.max_length,
                           on_step=bar.update)
        bar.close()
        for (key, _, _), res in zip(requests, out):
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(w)
                owner.append(i)
        bar = self._bar(len(windows), "refusal_jax loglikelihood_rolling", disable_tqdm)
        scores = score_tokens(self.params, self.cfg, self._pad(), windows, self.intervention,
                              batch_size=self.batch_size, max_length=self.max_length, on_step=bar.update)
        bar.close()
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def _stops(self, until: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """Where decoding can stop for the `until` strings (`generate.stop_string_tokens`); the text is cut at
        them anyway."""
        from refusal_jax.model.generate import stop_string_tokens, token_texts

        if until not in self._stop_cache:
            if self._token_texts is None:
                self._token_texts = token_texts(self.tokenizer)
            self._stop_cache[until] = stop_string_tokens(self._token_texts, until)
        return self._stop_cache[until]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from refusal_jax.model.batching import ForwardCost, bucketed
        from refusal_jax.model.generate import cut_at_stop, decoding_params, greedy_generate, stop_token_ids

        if self._decoding is None:
            self._decoding = decoding_params(self.params)
        groups: dict[tuple, list[int]] = {}
        specs = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            specs.append((context, until))
            groups.setdefault((until, max_new), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = self._bar(len(requests), "refusal_jax generate_until", disable_tqdm)
        pad = self._pad()
        for (until, max_new), idx in groups.items():
            until_ids, pairs = self._stops(until)
            stops = tuple(sorted(set(stop_token_ids(self.tokenizer)) | set(until_ids)))
            keep = max(1, self.max_length - max_new)
            ids = [self.tok_encode(specs[i][0])[-keep:] for i in idx]
            cost = ForwardCost.for_model(self.cfg)
            for batch in bucketed(ids, self.batch_size, pad, cost=lambda b, t, m=max_new, c=cost: c(b, t + m)):
                gen = np.asarray(greedy_generate(self._decoding, self.cfg, batch.tokens, batch.mask,
                                                 self.intervention, max_new_tokens=max_new, stop_ids=stops,
                                                 stop_pairs=pairs, pad=pad))
                for r, j in enumerate(batch.index):
                    if j < 0:
                        continue
                    text = self.tok_decode(cut_at_stop(gen[r].tolist(), stops, pairs))
                    for u in until:
                        if u:
                            text = text.split(u)[0]
                    req = requests[idx[int(j)]]
                    out[idx[int(j)]] = text
                    self.cache_hook.add_partial("generate_until", req.args, text)
                bar.update(int((batch.index >= 0).sum()))
        bar.close()
        return out


def register() -> type:
    """Register RefusalJaxLM with lm-eval as "refusal_jax" (idempotent); returns the class."""
    _require()
    from lm_eval.api.registry import model_registry, register_model

    if model_registry.get(MODEL_NAME, None) is not RefusalJaxLM:
        register_model(MODEL_NAME)(RefusalJaxLM)
    return RefusalJaxLM


def _cli_model_args(argv: list[str]) -> str | None:
    """The --model_args of an lm-eval command line that runs this model, joined with commas (None otherwise).
    lm-eval's parser merges repeated keys with only a log line, so they are checked here, before it runs."""
    model, values, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--model", "-M") and i + 1 < len(argv):
            model, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--model="):
            model = arg.split("=", 1)[1]
        elif arg in ("--model_args", "-a"):
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            continue
        elif arg.startswith("--model_args="):
            values.append(arg.split("=", 1)[1])
        i += 1
    if model != MODEL_NAME or any(v.lstrip().startswith("{") for v in values):  # JSON model_args: lm-eval's
        return None
    return ",".join(values)


def main(argv=None) -> None:
    """Register the model, then run lm-eval's command line with `argv` (default: this command's arguments).
    A RefusalJaxError (bad model_args, a damaged model file, ...) or an OSError is one `error:` line and exit
    status 2."""
    import sys

    from refusal_jax.errors import RefusalJaxError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        model_args = _cli_model_args(argv)
        if model_args is not None:
            check_model_args(parse_model_args(model_args))  # before lm-eval loads its tasks and the model
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *argv]
        cli_evaluate()
    except RefusalJaxError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk under --output_path, a symlink loop, a permission
        from refusal_jax.runs.cli import os_error_message

        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from refusal_jax.lm_eval import main as _main  # the registered class is refusal_jax.lm_eval's, not __main__'s

    _main()

"""Shared command-line plumbing: clear errors with exit status 2, never a traceback for bad input."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys
import threading

from refusal_jax.errors import RefusalJaxError
from refusal_jax.prompts import templates
from refusal_jax.runs import checks, distributed, presets
from refusal_jax.validate import real_arg

INTERRUPTED = "\ninterrupted: completed stages are saved; rerun the same command to resume"


def main_wrapper(fn):
    """Run a CLI main; a RefusalJaxError or an OSError (full disk, symlink loop, permission; `os_error_message`)
    prints one `error: ...` line and exits 2, Ctrl-C exits 130.

    After a real SIGINT the process ends with os._exit(130) once the message is flushed: a normal interpreter exit
    would tear Python down while XLA's threads may still run the computation that was in flight, which crashed
    with SIGSEGV after the friendly message. Artifacts are written atomically, so nothing is lost by skipping the
    interpreter's cleanup. (A KeyboardInterrupt raised by code, as in tests, exits normally with status 130.)
    """

    @functools.wraps(fn)
    def run(argv=None):
        got_signal = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                got_signal.append(signum)
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            return fn(argv)
        except RefusalJaxError as e:
            message = " ".join(line.strip() for line in str(e).splitlines())  # one line, whatever the cause said
            print(f"error: {message}", file=sys.stderr)
            _exit(2)
        except OSError as e:  # a full disk, a symlink loop, a permission: the OS's answer, not a bug of ours
            print(f"error: {os_error_message(e)}", file=sys.stderr)
            _exit(2)
        except RuntimeError as e:
            if not str(e).startswith("Symlink loop"):  # pathlib's resolve() before Python 3.13
                raise
            print(f"error: {e} (a symbolic link that points back to itself)", file=sys.stderr)
            _exit(2)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            if got_signal:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            _exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    return run


_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device (free some space or write elsewhere)",
    errno.EDQUOT: "disk quota exceeded (free some space or write elsewhere)",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path(s) it names, then errno-specific wording (or the OS's own)."""
    what = _OS_ERRORS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    message = f"{' -> '.join(paths)}: {what}" if paths else what
    return " ".join(message.split())


def _exit(code: int):
    if distributed.process_count() > 1:
        # Not through JAX's shutdown barrier, which would hold this process (and the peers waiting on it) for
        # minutes: the peers see it gone within their heartbeat timeout and exit too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# Flags that several commands share, declared once.

MODEL_SOURCES = "converted refusal_jax checkpoint dir, .gguf file, HF model dir, HF hub id (owner/name), or bundled " \
                "model name"
DTYPES = ("float32", "bfloat16", "float16")
EDIT_METHODS = ("plain", "projected", "norm-preserving")


def add_dtype_flag(p, help: str = "parameter dtype (default float32)") -> None:
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help=help)


def add_overwrite_flag(p, help: str = "replace --out if it exists and is a refusal_jax output (never the source or a "
                                      "folder holding it); the old one is moved aside to OUT.previous-<timestamp>, "
                                      "not deleted") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_strict_config_flag(p) -> None:
    p.add_argument("--no-strict-config", action="store_true",
                   help="accept source config.json attributes refusal_jax does not know (only if you checked they "
                        "do not change the forward pass)")


def add_progress_flag(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


DIRECTION_FILES = ("a .npy file holding [d_model] (any norm) or an orthonormal basis [R, d_model], or a run "
                   "directory holding direction.npy (e.g. RUN from python -m refusal_jax.extract)")


def add_direction_flag(p, purpose: str, *, required: bool = False, default: str = "none") -> None:
    """--direction, declared once for every command that takes a refusal direction."""
    p.add_argument("--direction", required=required, default=None,
                   help=f"{purpose}: {DIRECTION_FILES} " + ("(required)" if required else f"(default: {default})"))


def add_layer_flag(p, purpose: str) -> None:
    """--layer of activation addition, defaulting to the direction's own layer."""
    p.add_argument("--layer", type=int, default=None,
                   help=f"{purpose} (default: 'layer' of direction_metadata.json next to --direction)")


def add_edit_flags(p) -> None:
    """--method and --harmless-mean of the weight edits (orthogonalize, export_gguf)."""
    p.add_argument("--method", default="plain", choices=EDIT_METHODS,
                   help="plain (default): project r̂ out of every residual-writing row (the paper's edit); projected: "
                        "remove only the part of r orthogonal to the harmless mean; norm-preserving: project out "
                        "(biprojected r' with --harmless-mean, else r̂) and rescale every edited row to its original "
                        "norm. See refusal_jax.method.edits")
    p.add_argument("--harmless-mean", default=None, metavar="PATH.npy",
                   help="harmless mean activation for --method projected / norm-preserving: [d_model], [n_layers, "
                        "d_model] (per-layer biprojection) or [n_pos, n_layers, d_model] (position from "
                        "direction_metadata.json), or a run directory holding generate_directions/mean_harmless.npy "
                        "(default: none; required by projected)")


# The flags of every command that runs the reference's stages on a model (extract, pipeline, compare, optimize).


def add_common_args(p: argparse.ArgumentParser, *, selection: bool = True, n_test: bool = True) -> None:
    """The flags of every command that runs on a model with harmful / harmless prompts. `selection=False` leaves
    out the sweep and filter flags (--batch-size, --chunk, --positions, --layers, thresholds; the command then
    defines its own --batch-size); `n_test=False` leaves out --n-test (commands that generate no completions).
    Left-out flags keep their defaults."""

    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="converted checkpoint dir, .gguf file, HF model dir, HF hub id, or bundled model name "
                        "(default: the bundled qwen2.5-coder-0.5b-instruct)")
    g.add_argument("--out", default=None,
                   help="run directory (default: runs/<model>-<hash of the settings>, so the same command resumes "
                        "and different settings never collide)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter and activation dtype; statistics are always accumulated in float32/float64 "
                        "(default: float32)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a run with different settings (old artifacts are moved to "
                        "<out>/previous/)")
    add_progress_flag(g)
    g.add_argument("--mesh", default=None,
                   help="shard over devices: e.g. 'data=4,model=2' (prompts on data; heads and MLP width on "
                        "model) or 'auto' (all devices on data); parameters are placed shard by shard, see "
                        "refusal_jax.model.sharding (default: one device; with several processes: auto)")
    distributed.add_args(p)
    g.add_argument("--memory-budget", default="auto", metavar="SIZE",
                   help="memory one forward batch may use, e.g. 8GB or 512MiB: batches of long prompts are split "
                        "to fit (slower instead of running out of memory); see docs/pods.md (default: auto = half "
                        "the memory available at the start)")
    g.add_argument("--preset", default=presets.DEFAULT_PRESET, choices=sorted(presets.PRESETS),
                   help="sizes and thresholds for every flag marked 'preset' that is not given: 'cpu' = a run of a "
                        "few minutes on a CPU (see docs/results.md); 'reference' = the reference pipeline's sizes and "
                        "thresholds exactly (default: cpu)")
    d = p.add_argument_group("data (default: the bundled instruction sets)")
    d.add_argument("--harmful", help="harmful instructions file, .json/.jsonl/.csv/.txt (default: bundled)")
    d.add_argument("--harmless", help="harmless instructions file, .json/.jsonl/.csv/.txt (default: bundled)")
    d.add_argument("--data-dir", help="folder laid out like the reference's dataset/ (splits/, processed/): "
                                      "samples exactly as the reference, random.seed(42); used when neither "
                                      "--harmful nor --harmless is given (default: none)")
    d.add_argument("--n-train", type=int, default=None,
                   help="harmful and harmless train prompts before filtering " + presets.describe("n_train"))
    d.add_argument("--n-val", type=int, default=None,
                   help="harmful and harmless val prompts before filtering " + presets.describe("n_val"))
    if selection:
        d.add_argument("--min-val-refused", type=int, default=None,
                       help="draw more harmful val prompts (from the prompts left after train, val and test) until "
                            "at least this many are refused at baseline; 0 = never "
                            + presets.describe("min_val_refused"))
    if n_test:
        d.add_argument("--n-test", type=int, default=100,
                       help="harmful eval / harmless test prompts for completions, capped by what the bundled sets "
                            "leave after train and val (default: 100)")
    d.add_argument("--seed", type=int, default=42, help="sampling seed for instruction files and bundled sets; "
                                                         "the reference splits always use 42 (default: 42)")
    d.add_argument("--no-filter", action="store_true",
                   help="do not filter train/val prompts by the baseline refusal score (the reference filters)")
    d.add_argument("--max-prompt-tokens", type=int, default=checks.DEFAULT_MAX_PROMPT_TOKENS,
                   help="refuse a templated prompt longer than this many tokens, naming it (default "
                        f"{checks.DEFAULT_MAX_PROMPT_TOKENS}); one overlong prompt would make every batch of its "
                        "bucket that long")
    d.add_argument("--truncate-prompts", action="store_true",
                   help="cut overlong instructions to fit --max-prompt-tokens (with a warning) instead of refusing")
    d.add_argument("--eoi-mode", default="template", choices=templates.EOI_MODES,
                   help="post-instruction tokens: 'template' = the tokens that really end every prompt; "
                        "'reference' = the reference's encode(suffix), which differs for Llama-2, see "
                        "docs/deviations.md (default: template)")
    d.add_argument("--chat-style", default=None, choices=sorted(templates.TEMPLATES) + [templates.MODEL_STYLE],
                   help="chat template: a named one, or 'model' = the model's own chat template with the system "
                        "prompt it adds by default; 'family's' = the family's reference template, no system prompt "
                        + presets.describe("chat_style"))
    if not selection:
        p.set_defaults(chunk=8, screen=0, positions=None, layers=None, kl_threshold=None, induce_threshold=None,
                       induce_relative=None, prune_layer_fraction=None, min_val_refused=None)
        if not n_test:
            p.set_defaults(n_test=100)
        return
    if not n_test:
        p.set_defaults(n_test=100)
    s = p.add_argument_group("selection")
    s.add_argument("--batch-size", type=int, default=32,
                   help="prompts per forward batch (default: 32, as the reference)")
    s.add_argument("--chunk", type=int, default=8,
                   help="candidate directions evaluated together in one vmapped call (default: 8)")
    s.add_argument("--screen", type=non_negative_int, default=0, metavar="K",
                   help="score every candidate to first order from one backward pass per val set, evaluate exactly "
                        "only the K best (more rounds of K if none survives the filter), and select among those "
                        "(refusal_jax.method.screening; docs/benchmarks.md, Screening); 0 = the exhaustive sweep "
                        "(default: 0)")
    s.add_argument("--positions", type=int_list, default=None,
                   help="sweep only these post-instruction positions, e.g. --positions=-1 or --positions=-2,-1 "
                        + presets.describe("positions"))
    s.add_argument("--layers", type=layer_list, default=None,
                   help="sweep only these layers, e.g. 10-16 or 8,12, or 'middle' = from a quarter of the depth up "
                        "to the pruned layers " + presets.describe("layers"))
    s.add_argument("--kl-threshold", type=real_arg("--kl-threshold", low=0, allow_inf=True), default=None,
                   help="discard candidates whose ablation changes the harmless val next-token distribution by a "
                        "KL above this " + presets.describe("kl_threshold"))
    s.add_argument("--induce-threshold", type=real_arg("--induce-threshold", allow_inf=True), default=None,
                   help="discard candidates whose induce score (refusal score on harmless val under activation "
                        "addition) is below this; replaces --induce-relative " + presets.describe("induce_threshold"))
    s.add_argument("--induce-relative", type=real_arg("--induce-relative"), default=None, metavar="F",
                   help="induce threshold relative to the measured baselines: harmless baseline + F x (harmful "
                        "baseline - harmless baseline) " + presets.describe("induce_relative"))
    s.add_argument("--prune-layer-fraction",
                   type=real_arg("--prune-layer-fraction", low=0, high=1, high_open=True), default=None,
                   help="discard candidates in this last fraction of the layers "
                        + presets.describe("prune_layer_fraction"))


def layer_list(text: str):
    return "middle" if text.strip() == "middle" else int_list(text)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def int_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise argparse.ArgumentTypeError(f"empty list {text!r}")
    return out


def add_completion_args(p: argparse.ArgumentParser) -> None:
    """The flags of stages 3-5 (completions, their evaluation, loss): `stages.EvalSettings.from_args`."""
    g = p.add_argument_group("completions and evaluation")
    g.add_argument("--max-new-tokens", type=int, default=512,
                   help="greedy tokens per completion (default: 512, as the reference)")
    g.add_argument("--gen-batch-size", type=int, default=8,
                   help="prompts decoded together: the slots of continuous batching, where a stopped row's slot "
                        "takes the next prompt (default: 8; the reference decodes static batches of 8)")
    g.add_argument("--decode-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="precision of the decoding copy of the matmul weights: bfloat16 (float32 accumulation) or "
                        "int8 weight-only with per-channel scales; a smaller copy, completions may differ from "
                        "float32; speed on CPU: docs/benchmarks.md; scores, directions and statistics "
                        "always use the model's weights (default: float32)")
    g.add_argument("--loss-batch-size", type=int, default=2,
                   help="sequences per CE-loss batch (default: 2, as the reference)")
    g.add_argument("--loss-texts", nargs="*", default=None,
                   help="text files (one document per line, or .json/.jsonl/.csv) whose CE loss is reported, e.g. "
                        "a local Pile sample, truncated to 256 tokens as the reference (default: none)")
    g.add_argument("--reference-judge", action="store_true",
                   help="substring judge exactly as the reference (ASCII apostrophes only)")
    add_judge_flag(g)


def add_judge_flag(p) -> None:
    """--judge, repeatable: model judges beside the substring judge (`judge.parse_judges`)."""
    from refusal_jax.evaluation.judge import JUDGE_HELP

    p.add_argument("--judge", action="append", default=None, metavar="substring|guard:PATH|rubric:PATH",
                   help=JUDGE_HELP + " (default: substring)")

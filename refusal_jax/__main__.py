"""`refusal-jax COMMAND [ARGS]` (the console script) and `python -m refusal_jax COMMAND [ARGS]`: one entry point for
every command; each is also `python -m refusal_jax.<module>`."""

from __future__ import annotations

import importlib
import sys

# command -> (module with a main(argv), one line for the overview)
COMMANDS = {
    "extract": ("refusal_jax.extract", "find the refusal direction (stages 1-2; the main job)"),
    "pipeline": ("refusal_jax.pipeline", "the reference's five stages: directions, completions, evaluations"),
    "compare": ("refusal_jax.compare", "compare methods (DIM, optimized, edits) side by side on the same prompts"),
    "evaluate": ("refusal_jax.evaluate", "capabilities under an intervention (HumanEval)"),
    "optimize": ("refusal_jax.optimize", "refine a direction by gradient descent (refusal direction optimization)"),
    "orthogonalize": ("refusal_jax.orthogonalize", "project the direction out of the weights; export a HF model"),
    "serve": ("refusal_jax.serve", "an OpenAI-compatible server for a model and its edited variants"),
    "convert": ("refusal_jax.convert.__main__", "convert a GGUF file, HF folder or hub id to a refusal_jax checkpoint"),
    "export-gguf": ("refusal_jax.convert.export_gguf", "export a model (edited or not) as a GGUF file for llama.cpp"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: refusal-jax COMMAND [ARGS]   (refusal-jax COMMAND --help: the command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        sys.exit(2)
    module, _ = COMMANDS[name]
    sys.argv = [f"refusal-jax {name}", *argv[1:]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()

"""Named sets of run sizes and selection thresholds (`--preset`), applied to every flag the user left unset.

* `reference`: the reference pipeline exactly (PIPELINE_SPEC.md): 128 + 128 train and 32 + 32 val prompts before
  the filter, every post-instruction position x every layer, the family's reference chat template (no system
  prompt), KL threshold 0.1, induce threshold 0.0 (absolute), last 20% of layers pruned.
* `cpu` (the default): the same method at a size a CPU finishes in minutes, with choices that hold for any model
  rather than one: 64 + 64 train / 32 + 32 val prompts, more harmful val prompts drawn until at least 16 of them
  are refused (the filter keeps only refused ones, and a selection on a handful of prompts is noise); the last
  post-instruction position over the middle layers (a quarter of the depth up to the pruned layers, where the
  paper finds the direction); the model's own chat template (the prompt format the model is used with, and under
  which it refuses at all); and an induce threshold relative to the measured baselines: adding the direction must
  move the harmless val refusal score at least half-way to the harmful val baseline (the reference's absolute 0
  assumes a model whose refusals score well above 0).
"""

from __future__ import annotations

import argparse

# preset -> flag dest -> value. None for a dest means "the reference's own behaviour" (all positions, all layers,
# the family's template, no relative threshold).
PRESETS: dict[str, dict] = {
    "reference": {"n_train": 128, "n_val": 32, "min_val_refused": 0, "positions": None, "layers": None,
                  "chat_style": None, "kl_threshold": 0.1, "induce_threshold": 0.0, "induce_relative": None,
                  "prune_layer_fraction": 0.2},
    "cpu": {"n_train": 64, "n_val": 32, "min_val_refused": 16, "positions": [-1], "layers": "middle",
            "chat_style": "model", "kl_threshold": 0.1, "induce_threshold": None, "induce_relative": 0.5,
            "prune_layer_fraction": 0.2},
}
DEFAULT_PRESET = "cpu"
PRESET_DESTS = tuple(PRESETS["reference"])


def describe(dest: str) -> str:
    """'(default: cpu preset X; reference Y)' for a flag's help."""
    def show(v):
        if v is None:
            return "all" if dest in ("positions", "layers") else ("family's" if dest == "chat_style" else "off")
        if isinstance(v, list):
            return ",".join(map(str, v))
        return str(v)

    return f"(default: {show(PRESETS['cpu'][dest])}; --preset reference: {show(PRESETS['reference'][dest])})"


def apply(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every preset-controlled attribute the user left unset (None) from `args.preset`, in place.

    An explicit --induce-threshold replaces the preset's relative induce threshold (and vice versa). The filled
    dests are listed in `args.preset_filled`."""
    preset = PRESETS[getattr(args, "preset", None) or DEFAULT_PRESET]
    explicit_induce = getattr(args, "induce_threshold", None) is not None
    explicit_relative = getattr(args, "induce_relative", None) is not None
    args.preset_filled = [dest for dest in preset if getattr(args, dest, None) is None]
    for dest in args.preset_filled:
        setattr(args, dest, preset[dest])
    if explicit_induce and not explicit_relative:
        args.induce_relative = None
    if explicit_relative and not explicit_induce:
        args.induce_threshold = None
    return args


def chat_style(args, tokenizer) -> str | None:
    """The chat style to use: the preset's 'model' falls back to the family's template for a tokenizer without a
    chat template (an explicit --chat-style model is kept, and refused later with a clear message)."""
    from refusal_jax.prompts import templates

    if (args.chat_style == templates.MODEL_STYLE and "chat_style" in getattr(args, "preset_filled", ())
            and not getattr(tokenizer, "chat_template", None)):
        return None
    return args.chat_style


def middle_layers(n_layers: int, prune_layer_fraction: float) -> list[int]:
    """Layers from a quarter of the depth up to the first pruned layer: `--layers middle`."""
    stop = int(n_layers * (1.0 - prune_layer_fraction))
    start = min(n_layers // 4, max(stop - 1, 0))
    return list(range(start, max(stop, start + 1)))

"""Draws docs/img/refusal_rates.png, the README's picture: refusal rates of the bundled Qwen2.5-Coder-0.5B-Instruct
before and after the refusal direction is ablated or added, from the full-size run of docs/results.md.

The numbers are typed in, not computed: they are that run's stage-4 results (substring judge, 100 JailbreakBench and
100 Alpaca test prompts, 512 greedy tokens), measured on 2026-11-24 and again, identical, on 2026-12-07, on the
project's 2-core AMD EPYC CPU VM, by

    .venv/bin/python -m refusal_jax.pipeline --preset reference --data-dir ../shared/data/refusal_direction \
        --chat-style model --induce-threshold=-1 --gen-batch-size 64 --loss-batch-size 16 --screen 8 --out runs/full

(selected: position -2, layer 15). Run this file to redraw: .venv/bin/python docs/img/refusal_rates.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# (prompt set, [(condition, refusal rate)]) from runs/full/completions/*_evaluations.json
RATES = [
    ("JailbreakBench (harmful)", [("no intervention", 0.54), ("direction ablated", 0.08),
                                  ("direction subtracted", 0.04)]),
    ("Alpaca (harmless)", [("no intervention", 0.10), ("direction added", 0.66)]),
]
COLORS = {"no intervention": "#7f7f7f", "direction ablated": "#1f77b4", "direction subtracted": "#aec7e8",
          "direction added": "#d62728"}


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.0, 3.2), dpi=120)
    x, ticks, labels = 0.0, [], []
    for group, bars in RATES:
        start = x
        for condition, rate in bars:
            ax.bar(x, rate, width=0.8, color=COLORS[condition], label=condition)
            ax.text(x, rate + 0.015, f"{rate:.2f}", ha="center", va="bottom", fontsize=9)
            x += 1.0
        ticks.append((start + x - 1.0) / 2)
        labels.append(group)
        x += 0.8
    ax.set_xticks(ticks, labels)
    ax.set_ylabel("refusal rate")
    ax.set_ylim(0, 0.8)
    ax.set_title("Qwen2.5-Coder-0.5B-Instruct: refusal with and without its refusal direction", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, frameon=False, loc="upper center")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    draw(Path(__file__).with_suffix(".png"))

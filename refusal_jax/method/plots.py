"""Figures that explain a direction selection: where the chosen candidate lies, which thresholds the others
failed, and the baselines they are measured against.

Names used on every figure and in the terminal: the *refusal score under ablation* (harmful val prompts, the
direction ablated from every layer: lower = refusal removed), the *induce score* (refusal score of harmless val
prompts with the direction added at its layer: higher = refusal induced; `steering_score` in the reference's
JSON), and the *KL divergence* of the harmless val next-token distributions under ablation (lower = less
collateral change).
"""

from __future__ import annotations

from pathlib import Path

from refusal_jax.method import directions
from refusal_jax.runs import rundir as runs

LABELS = {
    "refusal_score": "refusal score under ablation (harmful val)",
    "steering_score": "induce score\n(refusal score under activation addition, harmless val)",
    "kl_div_score": "KL divergence under ablation (harmless val)",
}
FILES = {"refusal_score": "ablation_scores.png", "steering_score": "actadd_scores.png",
         "kl_div_score": "kl_div_scores.png"}
SUMMARY_FILE = "selection_summary.png"


def short_reason(reason: str) -> str:
    """One word for a `directions.rejection_reasons` entry."""
    for prefix, word in (("zero", "zero"), ("NaN", "NaN"), ("layer", "pruned layer"), ("KL", "KL"),
                         ("induce", "induce")):
        if reason.startswith(prefix):
            return word
    return reason


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def MaxNLocator(**kw):
    from matplotlib.ticker import MaxNLocator as locator

    return locator(**kw)


def _thresholds(ax, key: str, filt: dict, n_layers: int, baselines: dict) -> None:
    """Baseline line, the threshold of this score, and the pruned layers shaded."""
    first_pruned = int(n_layers * (1.0 - filt["prune_layer_fraction"]))
    if first_pruned < n_layers:
        ax.axvspan(first_pruned - 0.5, n_layers - 0.5, color="0.85", zorder=0,
                   label=f"pruned layers (last {filt['prune_layer_fraction']:.0%})")
    base = {"refusal_score": baselines["harmful"], "steering_score": baselines["harmless"], "kl_div_score": 0.0}[key]
    name = {"refusal_score": "baseline (no intervention)", "steering_score": "baseline (no intervention)",
            "kl_div_score": "baseline (0)"}[key]
    ax.axhline(base, color="black", ls="--", lw=1.2, zorder=5, label=f"{name}: {base:.2f}")
    if key == "kl_div_score":
        ax.axhline(filt["kl_threshold"], color="tab:red", ls=":", lw=1.5, zorder=5,
                   label=f"KL threshold {filt['kl_threshold']:g} (above: rejected)")
    if key == "steering_score":
        ax.axhline(filt["induce_threshold"], color="tab:red", ls=":", lw=1.5, zorder=5,
                   label=f"induce threshold {filt['induce_threshold']:.2f} (below: rejected)")


def plot_selection(evaluations: list[dict], n_layers: int, out_dir: Path, baselines: dict, filt: dict,
                   selected: tuple[int, int] | None) -> list[Path]:
    """Write the three per-score plots and the summary figure; returns their paths.

    Args:
      evaluations: direction_evaluations.json entries (position, layer, the three scores).
      baselines: {"harmful": refusal score of harmful val, "harmless": of harmless val} without intervention.
      filt: {"kl_threshold", "induce_threshold", "prune_layer_fraction"} as the selection used them.
      selected: (position, layer) of the chosen candidate, or None when every candidate was rejected.
    """
    plt = _pyplot()
    written = []
    positions = sorted({e["position"] for e in evaluations})
    for key, name in FILES.items():
        fig, ax = plt.subplots(figsize=(9, 5))
        _thresholds(ax, key, filt, n_layers, baselines)
        for pos in positions:
            pts = sorted((e["layer"], e[key]) for e in evaluations if e["position"] == pos)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"position {pos}", zorder=3)
        if selected is not None:
            ev = next(e for e in evaluations if (e["position"], e["layer"]) == selected)
            ax.plot([ev["layer"]], [ev[key]], marker="*", ms=16, color="gold", mec="black", zorder=6, ls="none",
                    label=f"selected: position {selected[0]}, layer {selected[1]}")
        ax.set_xlabel("layer the direction is taken from")
        ax.set_ylabel(LABELS[key])
        ax.set_title(LABELS[key].split("\n")[0].capitalize() + " per candidate direction")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.legend(fontsize=8)
        runs.save_figure(fig, out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    written.append(plot_summary(evaluations, n_layers, out_dir / SUMMARY_FILE, baselines, filt, selected))
    return written


def plot_summary(evaluations: list[dict], n_layers: int, path: Path, baselines: dict, filt: dict,
                 selected: tuple[int, int] | None) -> Path:
    """Left: refusal score under ablation per layer, survivors in colour, rejected candidates grey and labelled
    with the reason. Right: the trade-off, refusal score under ablation against KL, with the KL threshold."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    first_pruned = int(n_layers * (1.0 - filt["prune_layer_fraction"]))
    if first_pruned < n_layers:
        left.axvspan(first_pruned - 0.5, n_layers - 0.5, color="0.9", zorder=0, label="pruned layers")
    for ax in (left, right):
        ax.axhline(baselines["harmful"], color="black", ls="--", lw=1.2, zorder=5,
                   label=f"baseline (no intervention): {baselines['harmful']:.2f}")
    right.axvline(filt["kl_threshold"], color="tab:red", ls=":", lw=1.5, label=f"KL threshold {filt['kl_threshold']:g}")
    markers = "osD^v<>p"
    positions = sorted({e["position"] for e in evaluations})
    labelled = set()
    for e in evaluations:
        reasons = directions.rejection_reasons(e, n_layers, **filt)
        m = markers[positions.index(e["position"]) % len(markers)]
        if reasons:
            why = ", ".join(dict.fromkeys(short_reason(r) for r in reasons))
            kw = dict(color="0.6", alpha=0.8, ms=5)
            left.annotate(why, (e["layer"], e["refusal_score"]), fontsize=6, color="0.4", rotation=60,
                          xytext=(2, 3), textcoords="offset points")
            label = "rejected (grey; reason next to it)" if "rejected" not in labelled else None
            labelled.add("rejected")
        else:
            kw = dict(color="tab:blue", ms=6)
            label = "passed every filter" if "passed" not in labelled else None
            labelled.add("passed")
        left.plot([e["layer"]], [e["refusal_score"]], marker=m, ls="none", label=label, zorder=3, **kw)
        right.plot([e["kl_div_score"]], [e["refusal_score"]], marker=m, ls="none", zorder=3, **kw)
    if len(positions) > 1:
        for pos in positions:
            left.plot([], [], marker=markers[positions.index(pos) % len(markers)], ls="none", color="0.3",
                      label=f"position {pos}")
    if selected is not None:
        ev = next(e for e in evaluations if (e["position"], e["layer"]) == selected)
        for ax, x in ((left, ev["layer"]), (right, ev["kl_div_score"])):
            ax.plot([x], [ev["refusal_score"]], marker="*", ms=18, color="gold", mec="black", ls="none", zorder=6,
                    label=f"selected: position {selected[0]}, layer {selected[1]} "
                          f"({baselines['harmful']:.2f} -> {ev['refusal_score']:.2f})")
    left.set_xlabel("layer the direction is taken from")
    left.set_ylabel(LABELS["refusal_score"])
    left.set_xlim(-0.5, n_layers - 0.5)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title("Selection: the lowest refusal score under ablation among candidates that pass the filters")
    right.set_xlabel(LABELS["kl_div_score"])
    right.set_ylabel(LABELS["refusal_score"])
    right.set_title("Trade-off: refusal removed against collateral change")
    left.legend(fontsize=7, loc="best")
    right.legend(fontsize=7, loc="best")
    fig.tight_layout()
    runs.save_figure(fig, path)
    plt.close(fig)
    return path

"""The selection figures show what was chosen and why (refusal_jax.method.plots), read back from the matplotlib figure
before it is saved: the selected candidate is a star at its (layer, score), the baseline and every threshold are
drawn at their values, rejected candidates are grey and labelled with their reasons, axes are in words."""

import numpy as np
import pytest

from refusal_jax.method import directions, plots
from refusal_jax.runs import rundir as runs

N_LAYERS = 10
FILT = {"kl_threshold": 0.1, "induce_threshold": -1.0, "prune_layer_fraction": 0.2}
BASE = {"harmful": 0.5, "harmless": -3.0}


def evaluations():
    rng = np.random.default_rng(0)
    evs = []
    for pos in (-2, -1):
        for layer in range(N_LAYERS):
            evs.append({"position": pos, "layer": layer, "refusal_score": float(rng.uniform(-4, 1)),
                        "steering_score": float(rng.uniform(-3, 0)), "kl_div_score": float(rng.uniform(0, 0.2)),
                        "direction_norm": 0.0 if layer == 0 else 1.0})
    return evs


@pytest.fixture
def figures(monkeypatch, tmp_path):
    saved = {}

    def capture(fig, path):
        saved[path.name] = fig
        path.write_bytes(b"png")

    monkeypatch.setattr(runs, "save_figure", capture)
    monkeypatch.setattr(plots.runs, "save_figure", capture)
    evs = evaluations()
    best, _ = directions.select(evs, N_LAYERS, **FILT)
    selected = (best["position"], best["layer"])
    written = plots.plot_selection(evs, N_LAYERS, tmp_path, BASE, FILT, selected)
    return saved, written, evs, best


def lines(ax):
    return [(ln.get_xdata(), ln.get_ydata(), ln) for ln in ax.get_lines()]


def test_every_figure_is_written(figures, tmp_path):
    saved, written, _, _ = figures
    assert sorted(p.name for p in written) == sorted([*plots.FILES.values(), plots.SUMMARY_FILE])
    assert set(saved) == {p.name for p in written}


@pytest.mark.parametrize("key", list(plots.FILES))
def test_score_plots_mark_selection_baseline_and_thresholds(figures, key):
    saved, _, _, best = figures
    ax = saved[plots.FILES[key]].axes[0]
    assert ax.get_ylabel() == plots.LABELS[key] and "layer" in ax.get_xlabel()
    stars = [(x, y) for x, y, ln in lines(ax) if ln.get_marker() == "*"]
    assert stars == [([best["layer"]], [best[key]])]
    hlines = {float(y[0]) for x, y, ln in lines(ax) if list(x) == [0, 1] and len(set(y)) == 1}
    base = {"refusal_score": BASE["harmful"], "steering_score": BASE["harmless"], "kl_div_score": 0.0}[key]
    assert base in hlines
    if key == "kl_div_score":
        assert FILT["kl_threshold"] in hlines
    if key == "steering_score":
        assert FILT["induce_threshold"] in hlines
    # the pruned layers are shaded from the first pruned layer on
    spans = [p for p in ax.patches if p.get_x() == pytest.approx(int(N_LAYERS * 0.8) - 0.5)]
    assert spans


def test_summary_greys_rejected_candidates_with_their_reasons(figures):
    saved, _, evs, best = figures
    left, right = saved[plots.SUMMARY_FILE].axes
    rejected = [e for e in evs if directions.rejection_reasons(e, N_LAYERS, **FILT)]
    assert 0 < len(rejected) < len(evs)
    grey = [(x[0], y[0]) for x, y, ln in lines(left) if ln.get_color() == "0.6" and len(x) == 1]
    assert sorted(grey) == sorted((e["layer"], e["refusal_score"]) for e in rejected)
    texts = [t.get_text() for t in left.texts]
    assert len(texts) == len(rejected)
    for e, text in zip(rejected, texts):
        reasons = directions.rejection_reasons(e, N_LAYERS, **FILT)
        want = ", ".join(dict.fromkeys(plots.short_reason(r) for r in reasons))
        assert text == want
    assert "zero" in texts[0]  # layer 0: a zero candidate
    # trade-off panel: KL on x, the KL threshold as a vertical line, the selected star at (KL, score)
    assert right.get_xlabel() == plots.LABELS["kl_div_score"]
    assert any(list(x) == [FILT["kl_threshold"]] * 2 for x, y, ln in lines(right))
    stars = [(x[0], y[0]) for x, y, ln in lines(right) if ln.get_marker() == "*"]
    assert stars == [(best["kl_div_score"], best["refusal_score"])]


def test_all_rejected_still_plots(monkeypatch, tmp_path):
    monkeypatch.setattr(plots.runs, "save_figure", lambda fig, path: path.write_bytes(b"png"))
    written = plots.plot_selection(evaluations(), N_LAYERS, tmp_path, BASE, {**FILT, "kl_threshold": -1}, None)
    assert all(p.exists() for p in written)

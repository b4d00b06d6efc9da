"""Direction extraction (the reference's stages 1-2) as library code: filter prompts by the baseline refusal score,
take difference-in-means candidates, score every candidate, select one; the result and its artifacts.

`refusal_jax.extract_direction` and `python -m refusal_jax.extract` both run these functions, so they give the same
direction bit for bit. Artifact names follow the reference (spec §11), with .npy/.json for its .pt files.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from refusal_jax import validate
from refusal_jax.errors import ConfigError, RunError
from refusal_jax.method import directions, scoring, screening
from refusal_jax.runs import outputs, rundir

SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")

# Artifact paths inside a run directory.
FILTERED = Path("datasets") / "filtered.json"
MEAN_DIFFS = Path("generate_directions") / "mean_diffs.npy"
MEAN_HARMLESS = Path("generate_directions") / "mean_harmless.npy"
EVALUATIONS = Path("select_direction") / "direction_evaluations.json"
SURVIVORS = Path("select_direction") / "direction_evaluations_filtered.json"
BASELINES = Path("select_direction") / "baseline_scores.json"
DIRECTION = Path("direction.npy")
METADATA = Path("direction_metadata.json")


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """How candidates are computed, scored and filtered (the extract command's "selection" flags).

    positions / layers: restrict the sweep (None = every post-instruction position / every layer; layers
      "middle" = a quarter of the depth up to the first pruned layer).
    kl_threshold, induce_threshold, prune_layer_fraction: the reference's filters (`directions.select`);
    induce_relative F, when set, replaces induce_threshold by harmless baseline + F x (harmful - harmless
      baseline), measured on the val sets (`filters`).
    filter: keep only harmful prompts the model refuses and harmless ones it does not, before anything else;
    min_val_refused: the commands draw more harmful val prompts until this many are refused (0 = never).
    batch_size: prompts per forward batch; chunk: candidates evaluated together in one vmapped call.
    screen: K > 0 scores every candidate to first order and evaluates only the K best exactly
        (`screening.score_candidates_screened`); 0 = the exhaustive sweep.
    chat_style: None = the family's reference template, a template name, or "model" (its own chat template).
    eoi_mode: "template" (tokens that really end every prompt) or "reference" (encode(suffix)).
    """

    positions: tuple[int, ...] | None = None
    layers: tuple[int, ...] | str | None = None
    kl_threshold: float = 0.1
    induce_threshold: float | None = 0.0
    induce_relative: float | None = None
    prune_layer_fraction: float = 0.2
    filter: bool = True
    min_val_refused: int = 0
    batch_size: int = 32
    chunk: int = 8
    screen: int = 0
    chat_style: str | None = None
    eoi_mode: str = "template"

    def __post_init__(self):
        if self.screen < 0:
            raise ConfigError(f"screen must be >= 0, got {self.screen}")
        # NaN thresholds would compare false everywhere and switch their filter off: refused with the flags' rule
        validate.real(self.kl_threshold, "kl_threshold", low=0, allow_inf=True)
        validate.optional_real(self.induce_threshold, "induce_threshold", allow_inf=True)
        validate.optional_real(self.induce_relative, "induce_relative")
        validate.real(self.prune_layer_fraction, "prune_layer_fraction", low=0, high=1, high_open=True)
        validate.integer(self.batch_size, "batch_size", low=1)
        validate.integer(self.chunk, "chunk", low=1)
        validate.integer(self.min_val_refused, "min_val_refused", low=0)
        for name in ("positions", "layers"):
            value = getattr(self, name)
            if value is not None and value != "middle":
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.induce_threshold is None and self.induce_relative is None:
            raise ValueError("SelectionSettings needs induce_threshold or induce_relative")

    def layer_list(self, n_layers: int) -> tuple[int, ...] | None:
        """The layers to sweep for a model of `n_layers` (None = all)."""
        if self.layers == "middle":
            from refusal_jax.runs.presets import middle_layers

            return tuple(middle_layers(n_layers, self.prune_layer_fraction))
        return self.layers

    def filters(self, baselines: Mapping[str, float] | None = None) -> dict[str, float]:
        """Keyword arguments of `directions.select`; a relative induce threshold needs the val baselines
        ({"harmful_val_refusal_score", "harmless_val_refusal_score"}, as `score_grid` returns them)."""
        induce = self.induce_threshold
        if self.induce_relative is not None:
            if baselines is None:
                raise ValueError("a relative induce threshold needs the measured baselines")
            low, high = baselines["harmless_val_refusal_score"], baselines["harmful_val_refusal_score"]
            induce = float(low + self.induce_relative * (high - low))
        return {"kl_threshold": self.kl_threshold, "induce_threshold": induce,
                "prune_layer_fraction": self.prune_layer_fraction}


def filter_by_refusal(params, cfg, sets: Mapping[str, Sequence[str]], batches: Callable, refusal_ids,
                      on_step: Callable[[int], Any] | None = None, *, val_pool: Sequence[str] = (), n_val: int = 0,
                      min_val_refused: int = 0, on_draw: Callable[[int], Any] | None = None
                      ) -> tuple[dict[str, list[str]], dict, list[str]]:
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (score < 0) (stage 1a).

    `batches(instructions)` templates and batches a list of instructions. While fewer than `min_val_refused` harmful
    val prompts are kept, `n_val` more are drawn from `val_pool` (in order) and filtered the same way, until the pool
    runs out; `on_draw(n)` hears of each draw (a progress bar grows by n). Returns (kept sets, baseline scores per set,
    the drawn prompts). Raises RunError when a set ends up empty.
    """
    kept, scores = {}, {}

    def keep(key, instructions):
        s = scoring.baseline_refusal_scores(params, cfg, batches(instructions), refusal_ids)
        scores.setdefault(key, []).extend(s.tolist())
        if on_step:
            on_step(len(instructions))
        return [x for x, k in zip(instructions, s > 0 if key.startswith("harmful") else s < 0) if k]

    for key, instructions in sets.items():
        kept[key] = keep(key, list(instructions))
    pool, drawn = list(val_pool), []
    if min_val_refused and n_val < 1:
        raise ValueError("drawing val prompts (min_val_refused > 0) needs n_val >= 1")
    while len(kept["harmful_val"]) < min_val_refused and pool:
        more, pool = pool[:n_val], pool[n_val:]
        if on_draw:
            on_draw(len(more))
        drawn += more
        kept["harmful_val"] += keep("harmful_val", more)
    empty = [k for k, v in kept.items() if not v]
    if empty:
        raise RunError(f"after filtering by the baseline refusal score, {', '.join(empty)} is empty: the model "
                       "does not refuse those harmful prompts (or refuses all harmless ones). Use more or other "
                       "prompts, another --chat-style, or --no-filter.")
    return kept, scores, drawn


candidate_directions = directions.candidate_directions  # stage 1b; one implementation, in directions


def score_grid(params, cfg, diffs: np.ndarray, harmful_val, harmless_val, refusal_ids, settings: SelectionSettings,
               on_step: Callable[[int], Any] | None = None) -> tuple[list[dict], dict]:
    """Score every (pos, layer) candidate on val batches: (evaluations, baselines incl. sweep seconds and count)."""
    grid = directions.candidate_grid(cfg, diffs.shape[0], settings.positions, settings.layer_list(cfg.n_layers))
    t0 = time.perf_counter()
    evaluations, baselines = screening.score_candidates_screened(
        params, cfg, diffs, harmful_val, harmless_val, refusal_ids, grid, screen=settings.screen, chunk=settings.chunk,
        on_step=on_step, filters=settings.filters)
    return evaluations, {"harmful_val_refusal_score": float(baselines["harmful_refusal_score"]),
                         "harmless_val_refusal_score": float(baselines["harmless_refusal_score"]),
                         "sweep_seconds": time.perf_counter() - t0, "n_candidates": len(grid),
                         "screen": settings.screen, "n_evaluated_exactly": baselines["n_evaluated_exactly"]}


def sweep_steps(diffs: np.ndarray, cfg, settings: SelectionSettings, n_harmful_batches: int,
                n_harmless_batches: int) -> int:
    """Progress units of `score_grid`: live candidates (the first round of a screen) x batches over its three
    scores."""
    grid = directions.candidate_grid(cfg, diffs.shape[0], settings.positions, settings.layer_list(cfg.n_layers))
    live = len(directions.live_candidates(diffs, grid))
    return (min(settings.screen, live) if settings.screen else live) * (n_harmful_batches + 2 * n_harmless_batches)


@dataclasses.dataclass
class Extraction:
    """A selected refusal direction and everything that chose it.

    direction [D] = mean_diffs[pos, layer] (not normalised; float64); pos is negative (post-instruction token),
    layer the source layer. evaluations holds every scored candidate, survivors those that passed the filters,
    baselines the val refusal scores without intervention. prompts are the train/val sets after filtering,
    baseline_scores their scores before it (empty when not filtered).
    """

    direction: np.ndarray
    pos: int
    layer: int
    mean_diffs: np.ndarray
    mean_harmless: np.ndarray
    evaluations: list[dict]
    survivors: list[dict]
    baselines: dict
    prompts: dict[str, list[str]]
    baseline_scores: dict = dataclasses.field(default_factory=dict)

    @property
    def best(self) -> dict:
        return next(e for e in self.evaluations if e["position"] == self.pos and e["layer"] == self.layer)


    def save(self, out, n_layers: int | None = None, **metadata) -> Path:
        """Write the reference's artifacts under `out` (atomically, file by file) and the three score plots when
        `n_layers` is given; `metadata` goes into direction_metadata.json. `out` follows the commands' rule for
        run folders: new, empty or a refusal_jax run, never a model folder (OutputError otherwise)."""
        out = outputs.check_run_dir(out, flag="Extraction.save", create_parents=True)
        out.mkdir(parents=True, exist_ok=True)
        if outputs.marker_kind(out) is None:
            outputs.write_marker(out, "run")
        write_filtered(out, self.prompts, self.baseline_scores)
        write_candidates(out, self.mean_diffs, self.mean_harmless)
        rundir.write_json(out / EVALUATIONS, self.evaluations)
        if n_layers is not None:
            keys = ("kl_threshold", "induce_threshold", "prune_layer_fraction")
            filters = {k: self.baselines[k] for k in keys} if all(k in self.baselines for k in keys) else None
            plot_scores(self.evaluations, n_layers, out / EVALUATIONS.parent, self.baselines, filters,
                        (self.pos, self.layer))
        rundir.write_json(out / BASELINES, self.baselines)
        write_selected(out, self.direction, self.best, self.survivors, baselines=self.baselines, sets=self.prompts,
                       **metadata)
        return out

    @classmethod
    def load(cls, out) -> Extraction:
        """Read the artifacts of `save` (or of the extract / pipeline commands) back."""
        out = Path(out)
        missing = [str(p) for p in (FILTERED, MEAN_DIFFS, EVALUATIONS, SURVIVORS, DIRECTION, METADATA)
                   if not (out / p).exists()]
        if missing:
            raise RunError(f"{out}: not an extraction (missing {', '.join(missing)})")
        filtered, meta = rundir.read_json(out / FILTERED), rundir.read_direction_metadata(out / METADATA)
        diffs = np.load(out / MEAN_DIFFS)
        harmless = np.load(out / MEAN_HARMLESS) if (out / MEAN_HARMLESS).exists() else np.zeros_like(diffs)
        baselines = rundir.read_json(out / BASELINES) if (out / BASELINES).exists() else {}
        return cls(direction=np.load(out / DIRECTION), pos=meta["pos"], layer=meta["layer"], mean_diffs=diffs,
                   mean_harmless=harmless, evaluations=rundir.read_json(out / EVALUATIONS),
                   survivors=rundir.read_json(out / SURVIVORS), baselines=baselines, prompts=filtered["sets"],
                   baseline_scores=filtered.get("baseline_scores", {}))


def write_filtered(out: Path, sets: Mapping[str, list[str]], scores: Mapping[str, list[float]], **extra) -> None:
    rundir.write_json(out / FILTERED, {"sets": dict(sets), "baseline_scores": dict(scores),
                                       "sizes": {k: len(v) for k, v in sets.items()}, **extra})


def write_candidates(out: Path, diffs: np.ndarray, mean_harmless: np.ndarray) -> None:
    # the harmless mean feeds projected / norm-preserving abliteration (orthogonalize --harmless-mean)
    rundir.write_npy(out / MEAN_HARMLESS, mean_harmless)
    rundir.write_npy(out / MEAN_DIFFS, diffs)


def write_selected(out: Path, direction: np.ndarray, best: dict, survivors: list[dict], *,
                   baselines: Mapping[str, float] | None = None, sets: Mapping[str, list] | None = None,
                   **extra) -> None:
    """The surviving candidates, direction.npy and direction_metadata.json (pos, layer, the selected candidate's
    scores, plus `extra`: model, hashes). With `baselines` (as `score_grid` returns them, plus the thresholds
    used) and the val `sets`, the metadata also holds the scores without intervention, the thresholds and the
    number of val prompts, so baseline -> intervened can be read from one file."""
    rundir.write_json(out / SURVIVORS, survivors)
    rundir.write_npy(out / DIRECTION, direction)
    more = {}
    if baselines is not None:
        more = {"baseline_refusal_score": baselines["harmful_val_refusal_score"],
                "baseline_steering_score": baselines["harmless_val_refusal_score"],
                **{k: baselines[k] for k in ("induce_threshold", "kl_threshold") if k in baselines}}
    if sets is not None:
        more.update(n_harmful_val=len(sets["harmful_val"]), n_harmless_val=len(sets["harmless_val"]))
    rundir.write_json(out / METADATA, {
        "pos": best["position"], "layer": best["layer"], **extra, "refusal_score": best["refusal_score"],
        "steering_score": best["steering_score"], "kl_div_score": best["kl_div_score"],
        "n_survivors": len(survivors), "direction_norm": float(np.linalg.norm(direction)), **more})


def plot_scores(evaluations, n_layers, out_dir: Path, baselines: Mapping[str, float],
                filters: Mapping[str, float] | None = None, selected: tuple[int, int] | None = None) -> list[Path]:
    """The three score-vs-layer plots and selection_summary.png (`refusal_jax.method.plots`) of the exactly
    evaluated candidates: the baselines, the thresholds of `filters` (default: the reference's), the pruned layers
    and the `selected` candidate; and first_order_vs_exact.png when the evaluations carry first-order scores."""
    from refusal_jax.method import plots

    written = []
    if any("first_order_refusal_score" in e for e in evaluations):
        written.append(Path(out_dir) / "first_order_vs_exact.png")
        screening.plot_first_order(evaluations, written[-1])
    filters = dict(filters or SelectionSettings().filters())
    return written + plots.plot_selection(screening.evaluated(evaluations), n_layers, Path(out_dir),
                                          {"harmful": baselines["harmful_val_refusal_score"],
                                           "harmless": baselines["harmless_val_refusal_score"]}, filters, selected)

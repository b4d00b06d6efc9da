"""Property-based fuzzing of everything that parses user files: the instruction-file loaders, the config parser,
the safetensors and GGUF header readers. Random bytes and random JSON structures either parse or raise
refusal_jax's own error (one line at the command line); never another exception, and never an allocation above
`BOUND` bytes (measured with tracemalloc, which numpy reports its buffers to)."""

import json
import os
import struct
import tracemalloc

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refusal_jax.convert import safetensors_io  # noqa: E402
from refusal_jax.errors import RefusalJaxError  # noqa: E402
from refusal_jax.model.config import from_hf_config  # noqa: E402
from refusal_jax.prompts import datasets  # noqa: E402

BOUND = 64 * 2**20
# REFUSAL_JAX_FUZZ_EXAMPLES=2000 for a longer hunt; the default keeps the suite fast
FUZZ = settings(max_examples=int(os.environ.get("REFUSAL_JAX_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30)


def bounded(fn, *args, **kw):
    """Call fn; return its result or the RefusalJaxError it raised; fail on anything else or a big allocation."""
    tracemalloc.start()
    try:
        try:
            return fn(*args, **kw)
        except RefusalJaxError as e:
            return e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < BOUND, f"{fn.__name__} allocated {peak} bytes"


# ------------------------------------------------------------------------------------------------
# instruction files


@FUZZ
@given(data=st.binary(max_size=2000), ext=st.sampled_from(datasets.SUPPORTED_EXTENSIONS))
def test_loaders_on_random_bytes(tmp_path, data, ext):
    path = tmp_path / f"f{ext}"
    path.write_bytes(data)
    out = bounded(datasets.load_records, path)
    if not isinstance(out, RefusalJaxError):
        assert all(isinstance(r["instruction"], str) and r["instruction"].strip() for r in out)


@FUZZ
@given(value=json_values, ext=st.sampled_from([".json", ".jsonl"]))
def test_loaders_on_random_json(tmp_path, value, ext):
    path = tmp_path / f"f{ext}"
    text = json.dumps(value)
    path.write_text(text if ext == ".json" else text + "\n" + text)
    out = bounded(datasets.load_records, path)
    if not isinstance(out, RefusalJaxError):
        assert all(isinstance(r["instruction"], str) for r in out)
        assert all(r["category"] is None or isinstance(r["category"], str) for r in out)


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=30), max_size=4), max_size=6))
def test_csv_loader_on_random_tables(tmp_path, rows):
    import csv

    path = tmp_path / "f.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["instruction", "category"], *rows])
    bounded(datasets.load_records, path)


# ------------------------------------------------------------------------------------------------
# config.json

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


@FUZZ
@given(key=st.sampled_from(sorted(LLAMA) + ["rope_scaling", "rope_parameters", "head_dim", "layer_types",
                                           "sliding_window", "use_sliding_window", "hidden_act"]),
       value=json_values, strict=st.booleans())
def test_config_parser_one_bad_value(key, value, strict):
    out = bounded(from_hf_config, {**LLAMA, key: value}, strict=strict)
    if not isinstance(out, RefusalJaxError):
        assert out.n_layers >= 1 and out.d_model >= 1 and out.n_heads % out.n_kv_heads == 0


@FUZZ
@given(value=json_values)
def test_config_parser_random_structure(value):
    bounded(from_hf_config, value if isinstance(value, dict) else {"x": value}, strict=False)


# ------------------------------------------------------------------------------------------------
# safetensors and GGUF headers


@FUZZ
@given(data=st.binary(max_size=300))
def test_safetensors_random_bytes(tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    bounded(safetensors_io.read_header, path)


@FUZZ
@given(header=json_values, tail=st.binary(max_size=64))
def test_safetensors_random_header(tmp_path, header, tail):
    blob = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + tail)
    out = bounded(safetensors_io.read_header, path)
    if not isinstance(out, RefusalJaxError):
        for name, _ in bounded(lambda: list(safetensors_io.iter_file(path))):
            assert isinstance(name, str)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    from refusal_jax.convert import gguf_writer
    from refusal_jax.model.config import tiny_config
    from refusal_jax.model.params import init_random

    cfg = tiny_config("llama", n_layers=1)
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    gguf_writer.save_gguf(path, cfg, init_random(cfg, 0))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_mutated_and_truncated(tmp_path, gguf_bytes, data):
    from refusal_jax.convert.gguf import read_gguf

    raw = bytearray(gguf_bytes)
    cut = data.draw(st.integers(0, len(raw)))
    for _ in range(data.draw(st.integers(0, 8))):
        i = data.draw(st.integers(0, max(0, min(cut, 4096) - 1)))  # the header region
        if i < len(raw):
            raw[i] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw[:cut]))
    bounded(read_gguf, path, strict=data.draw(st.booleans()))


# ------------------------------------------------------------------------------------------------
# tensor layouts: the safetensors reader agrees with the reference library; an accepted GGUF layout is sound

_ST_SIZES = {"F32": 4, "F16": 2, "I8": 1}
st_entries = st.lists(st.tuples(st.sampled_from(sorted(_ST_SIZES)), st.lists(st.integers(0, 3), max_size=2),
                                st.integers(0, 40), st.integers(-4, 8)), min_size=1, max_size=3)


@FUZZ
@given(entries=st_entries, extra=st.integers(-8, 8))
def test_safetensors_layout_agrees_with_the_reference(tmp_path, entries, extra):
    """Random offsets near the right ones (begin, and a size error): refusal_jax accepts a file exactly when the
    `safetensors` library does, and then reads the same arrays."""
    import numpy as np
    from safetensors.numpy import load

    header, end = {}, 0
    for i, (dtype, shape, begin, size_error) in enumerate(entries):
        size = int(np.prod(shape)) * _ST_SIZES[dtype] + size_error
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        end = max(end, begin + size)
    blob = json.dumps(header).encode()
    raw = struct.pack("<Q", len(blob)) + blob + bytes(range(256))[: max(0, end + extra)]
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    try:
        theirs = load(raw)
    except Exception:
        theirs = None
    ours = bounded(lambda: dict(safetensors_io.iter_file(path)))
    assert isinstance(ours, RefusalJaxError) == (theirs is None), (header, len(raw), ours)
    if theirs is not None:
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            np.testing.assert_array_equal(np.asarray(ours[name]), theirs[name])


@FUZZ
@given(tensors=st.lists(st.tuples(st.sampled_from([0, 1, 8]), st.lists(st.integers(1, 96), min_size=1, max_size=3),
                                  st.integers(0, 12)), min_size=1, max_size=3),
       alignment=st.sampled_from([8, 16, 32]), cut=st.integers(0, 64))
def test_accepted_gguf_layout_is_sound(tmp_path, tensors, alignment, cut):
    """Random types, shapes and offsets (in units of 16 bytes): when the reader accepts the file, every tensor is
    aligned, inside the file and disjoint from every other."""
    import gguf
    import numpy as np

    from refusal_jax.convert.gguf import _open_reader
    from tests.test_containers import gguf_file

    infos = [(f"t{i}", ne, t, 16 * k) for i, (t, ne, k) in enumerate(tensors)]
    path = gguf_file(tmp_path / "m.gguf", infos, alignment=alignment)
    path.write_bytes(path.read_bytes()[: max(0, path.stat().st_size - cut)])
    reader = bounded(_open_reader, path)
    if isinstance(reader, RefusalJaxError):
        return
    size, spans = path.stat().st_size, []
    for t in reader.tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        begin = int(t.data_offset)
        end = begin + int(np.prod([int(d) for d in t.shape])) // block * type_size
        assert (begin - int(reader.data_offset)) % alignment == 0 and end <= size
        spans.append((begin, end))
    spans.sort()
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:]))

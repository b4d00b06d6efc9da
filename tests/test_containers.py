"""Container safety: safetensors and GGUF tensor layouts checked as the reference readers check them (files built
byte by byte), the converted checkpoint's sha256 manifest, float16 / bfloat16 casts that would overflow to
infinity, and OS errors (full disk, symlink loop) as one `error:` line with the partial output removed."""

from __future__ import annotations

import errno
import json
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from refusal_jax.convert import checkpoint, dtypes, safetensors_io
from refusal_jax.convert import gguf as gguf_reader
from refusal_jax.errors import CheckpointError, ChecksumError, RefusalJaxError
from refusal_jax.model.config import from_hf_config, tiny_config
from refusal_jax.model.params import init_random, to_flat

F32 = {"dtype": "F32"}


# ------------------------------------------------------------------------------------------------
# safetensors, byte by byte


def safetensors_file(path, header: dict, data_size: int):
    """A safetensors file with this header (no checks) and `data_size` bytes of data (float32 1, 2, 3, ...)."""
    blob = json.dumps(header).encode()
    data = np.arange(1, data_size // 4 + 1, dtype="<f4").tobytes() + bytes(data_size % 4)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def reference_accepts(path) -> bool:
    """Whether the `safetensors` library (the format's reference reader) loads the file."""
    from safetensors.numpy import load

    try:
        load(path.read_bytes())
        return True
    except Exception:  # SafetensorError, and ValueError for a layout numpy cannot view
        return False


GOOD = {"a": {**F32, "shape": [2, 2], "data_offsets": [0, 16]}, "b": {**F32, "shape": [3], "data_offsets": [16, 28]}}

BAD_SAFETENSORS = [
    ("overlap", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]},
                 "b": {**F32, "shape": [4], "data_offsets": [8, 24]}}, 24, "tensor b .*overlaps tensor a"),
    ("alias", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]},
               "b": {**F32, "shape": [4], "data_offsets": [0, 16]}}, 32, "overlaps tensor a"),
    ("gap", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]},
             "b": {**F32, "shape": [4], "data_offsets": [20, 36]}}, 36, "tensor b begins at data byte 20, leaving 4"),
    ("not-from-zero", {"a": {**F32, "shape": [4], "data_offsets": [8, 24]}}, 24, "tensor a .*at the start"),
    ("trailing-bytes", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]}}, 24, "8 bytes after the last tensor a"),
    ("size-mismatch", {"a": {**F32, "shape": [3], "data_offsets": [0, 16]}}, 16, "tensor a has 16 bytes for shape"),
    ("out-of-bounds", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]},
                       "b": {**F32, "shape": [4], "data_offsets": [16, 32]}}, 20, "truncated: tensor b ends at"),
    ("huge-shape", {"a": {**F32, "shape": [2**30, 2**9], "data_offsets": [0, 2**41]}}, 16, "truncated: tensor a"),
]


def test_well_formed_safetensors_reads_like_the_reference(tmp_path):
    from safetensors.numpy import load_file

    path = safetensors_file(tmp_path / "m.safetensors", GOOD, 28)
    ours = dict(safetensors_io.iter_file(path))
    theirs = load_file(path)
    assert sorted(ours) == sorted(theirs) == ["a", "b"]
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    np.testing.assert_array_equal(ours["b"], [5, 6, 7])


@pytest.mark.parametrize("case,header,data_size,match", BAD_SAFETENSORS, ids=[c[0] for c in BAD_SAFETENSORS])
def test_malformed_safetensors_layout_is_refused_naming_the_tensor(tmp_path, case, header, data_size, match):
    path = safetensors_file(tmp_path / "m.safetensors", header, data_size)
    assert not reference_accepts(path), "the reference reader accepts this file: the case is not malformed"
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as e:
            list(safetensors_io.iter_file(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _tiny_hf_dir(path, *, scale: dict | None = None):
    """A tiny llama HF folder (config.json, model.safetensors, byte-level tokenizer), torch-free; `scale` multiplies
    named tensors (to make one overflow float16)."""
    from tests.test_convert import LLAMA, hf_tensors
    from tests.tiny_code import byte_tokenizer

    tok = byte_tokenizer()
    config = {**LLAMA, "vocab_size": len(tok), "num_hidden_layers": 1}
    tensors = hf_tensors(from_hf_config(config))
    for name, factor in (scale or {}).items():
        tensors[name] = tensors[name] * np.float32(factor)
    path.mkdir()
    safetensors_io.write_file(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(path)
    return path


def test_convert_refuses_aliased_tensors_in_one_line(tmp_path, capsys):
    """Two equal-sized tensors pointed at the same bytes: the safetensors library refuses the file; so does
    convert, with one error line naming the tensor and nothing written."""
    from refusal_jax.convert.__main__ import main

    src = _tiny_hf_dir(tmp_path / "hf")
    st = src / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    blob = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    assert not reference_accepts(st)
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "overlaps tensor" in err[0] and "model." in err[0], err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------
# GGUF, byte by byte

GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_file(path, tensors, *, alignment: int = 32, data_size: int | None = None):
    """A GGUF v3 file: general.architecture and general.alignment metadata, tensor infos [(name, ne, ggml type,
    offset)] written as given (no checks), the data section padded to `alignment`, then `data_size` bytes (by
    default: up to the end of the last tensor)."""
    kv = (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
          + _gguf_string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", alignment))
    infos = b"".join(_gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                     + struct.pack("<I", t) + struct.pack("<Q", off) for name, ne, t, off in tensors)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2) + kv + infos
    head += bytes(-len(head) % alignment)
    if data_size is None:
        import gguf

        def nbytes(ne, t):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
            return int(np.prod(ne)) // block * size

        data_size = max([off + nbytes(ne, t) for _, ne, t, off in tensors] + [0])
    path.write_bytes(head + bytes(data_size))
    return path


def test_well_formed_gguf_layout_is_accepted(tmp_path):
    path = gguf_file(tmp_path / "m.gguf", [("a", [8], GGML_F32, 0), ("b", [3, 2], GGML_F32, 32),
                                           ("c", [64], GGML_Q8_0, 64), ("d", [4], GGML_F16, 160)])
    reader = gguf_reader._open_reader(path)
    assert [t.name for t in reader.tensors] == ["a", "b", "c", "d"]
    assert reader.tensors[1].data.shape == (2, 3)


BAD_GGUF = [
    ("overlap", [("a", [16], GGML_F32, 0), ("b", [8], GGML_F32, 32)], 32, None, "tensor b: data offset 32 overlaps "
     "tensor a, which ends at 64"),
    ("alias", [("a", [8], GGML_F32, 0), ("b", [8], GGML_F32, 0)], 32, None, "tensor b: data offset 0 overlaps"),
    ("misaligned", [("a", [8], GGML_F32, 0), ("b", [8], GGML_F32, 40)], 32, None,
     "tensor b: data offset 40 is not a multiple of general.alignment 32"),
    ("gap", [("a", [8], GGML_F32, 0), ("b", [8], GGML_F32, 64)], 32, None, "tensor b: data offset 64 leaves 32 "
     "unused bytes after tensor a"),
    ("first-not-at-zero", [("a", [8], GGML_F32, 32)], 32, None, "tensor a: .*at the start of the data"),
    ("block-size", [("a", [40], GGML_Q8_0, 0)], 32, 64, "tensor a: its first dimension 40 is not a multiple of the "
     "Q8_0 block size 32"),
    ("five-dims", [("a", [1, 1, 1, 1, 2], GGML_F32, 0)], 32, 8, "tensor a has 5 dimensions"),
    ("unknown-type", [("a", [8], 99, 0)], 32, 32, "tensor a has unknown ggml type 99"),
    ("truncated", [("a", [8], GGML_F32, 0), ("b", [8], GGML_F32, 32)], 32, 40, "tensor b ends at byte"),
    ("huge", [("a", [2**42, 2**22], GGML_F32, 0)], 32, 64, "tensor a has shape .* more than 2\\^63"),
    ("huge-in-bounds-check", [("a", [2**30, 2**20], GGML_F32, 0)], 32, 64, "tensor a ends at byte"),
    ("bad-alignment", [("a", [8], GGML_F32, 0)], 24, None, "alignment"),
]


@pytest.mark.parametrize("case,tensors,alignment,data_size,match", BAD_GGUF, ids=[c[0] for c in BAD_GGUF])
def test_malformed_gguf_layout_is_refused_naming_the_tensor(tmp_path, case, tensors, alignment, data_size, match):
    path = gguf_file(tmp_path / "m.gguf", tensors, alignment=alignment, data_size=data_size)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as e:
            gguf_reader.read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before refusing"
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_gguf_library_alone_reads_overlapping_tensors(tmp_path):
    """Why the checks exist: gguf-py's reader maps overlapping and misaligned tensors without a word (llama.cpp
    refuses them), so both would be converted as aliased weights."""
    import gguf

    for offsets in ((0, 0), (0, 40)):
        path = gguf_file(tmp_path / f"m{offsets[1]}.gguf", [("a", [8], GGML_F32, offsets[0]),
                                                              ("b", [8], GGML_F32, offsets[1])])
        reader = gguf.GGUFReader(path)
        assert [t.name for t in reader.tensors] == ["a", "b"]
        with pytest.raises(CheckpointError):
            gguf_reader.read_gguf(path)


# ------------------------------------------------------------------------------------------------
# checksums of converted checkpoints


@pytest.fixture
def converted(tmp_path):
    cfg = tiny_config("llama", n_layers=2)
    params = init_random(cfg, 0)
    path = checkpoint.save(tmp_path / "ckpt", cfg, params)
    return path, cfg, params


def _largest_params_file(path):
    return max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_manifest_records_every_params_file_and_load_verifies_it(converted):
    path, cfg, params = converted
    manifest = json.loads((path / checkpoint.MANIFEST_FILE).read_text())
    files = {p.relative_to(path).as_posix() for p in (path / "params").rglob("*") if p.is_file()}
    assert set(manifest["sha256"]) == files and all(len(h) == 64 for h in manifest["sha256"].values())
    _, loaded, _ = checkpoint.load(path, with_tokenizer=False)
    for name, value in to_flat(params).items():
        np.testing.assert_array_equal(np.asarray(to_flat(loaded)[name]), np.asarray(value))
    assert checkpoint.params_checksums(path) == manifest["sha256"]  # loading writes nothing into params/


def test_a_flipped_byte_is_a_checksum_error_naming_the_file(converted):
    path, _, _ = converted
    victim = _largest_params_file(path)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="differs from the .* recorded in manifest.json") as e:
        checkpoint.load(path, with_tokenizer=False)
    assert str(victim) in str(e.value)


def test_a_missing_or_added_params_file_is_a_checksum_error(converted):
    path, _, _ = converted
    extra = path / "params" / "d" / "extra"
    extra.parent.mkdir(exist_ok=True)
    extra.write_bytes(b"x")
    with pytest.raises(ChecksumError, match="not listed in manifest.json"):
        checkpoint.load(path, with_tokenizer=False)
    extra.unlink()
    _largest_params_file(path).unlink()
    with pytest.raises(ChecksumError, match="listed in manifest.json but missing"):
        checkpoint.load(path, with_tokenizer=False)


def test_an_old_manifest_without_checksums_loads_with_a_warning(converted, capsys):
    path, _, params = converted
    manifest_path = path / checkpoint.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    _, loaded, _ = checkpoint.load(path, with_tokenizer=False)
    np.testing.assert_array_equal(np.asarray(loaded.embed), np.asarray(params.embed))
    err = capsys.readouterr().err
    assert "warning:" in err and "not verified" in err
    manifest["sha256"] = ["not", "a", "map"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="malformed manifest"):
        checkpoint.load(path, with_tokenizer=False)


# ------------------------------------------------------------------------------------------------
# float16 / bfloat16 overflow


@pytest.mark.parametrize("values,dtype,ok", [
    ([1.0, -65504.0], np.float16, True),
    ([65519.0], np.float16, True),  # rounds down to 65504
    ([65520.0], np.float16, False),  # rounds up to inf
    ([-1e5, 3.0], np.float16, False),
    ([3.3e38], ml_dtypes.bfloat16, True),
    ([-3.4e38], ml_dtypes.bfloat16, False),
    ([3.4e38], np.float32, True),
])
def test_narrowing_cast_never_makes_infinity(values, dtype, ok):
    value = np.array(values, np.float32)
    if ok:
        out = dtypes.cast(value, dtype, "w")
        assert np.all(np.isfinite(out.astype(np.float32)))
    else:
        with pytest.raises(CheckpointError, match=f"tensor w has max \\|value\\| .* overflows {np.dtype(dtype).name}"):
            dtypes.cast(value, dtype, "w")


def test_convert_float16_refuses_an_overflowing_weight(tmp_path, capsys):
    from refusal_jax.convert.__main__ import main

    src = _tiny_hf_dir(tmp_path / "hf", scale={"model.layers.0.mlp.down_proj.weight": 1e6})
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(tmp_path / "c"), "--dtype", "float16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "model.layers.0.mlp.down_proj.weight" in err[0] and "overflows float16" in err[0]
    assert not (tmp_path / "c").exists()
    main([str(src), "--out", str(tmp_path / "c"), "--dtype", "bfloat16", "--no-progress"])  # bfloat16 holds it


def test_exports_refuse_an_overflowing_weight(tmp_path):
    from refusal_jax.convert import export_hf, gguf_writer

    cfg = tiny_config("llama", n_layers=1)
    flat = {k: np.asarray(v) for k, v in to_flat(init_random(cfg, 0)).items()}
    flat["layers.down"] = flat["layers.down"].copy()
    flat["layers.down"][0, 0, 0] = 7e4
    from refusal_jax.model.params import from_flat

    params = from_flat(flat)
    with pytest.raises(CheckpointError, match="down_proj.weight has max \\|value\\| 70000.* overflows float16"):
        export_hf.save_hf(tmp_path / "hf16", cfg, params, None, dtype="float16")
    assert not (tmp_path / "hf16").exists()
    with pytest.raises(CheckpointError, match="ffn_down.weight has max \\|value\\| 70000.* overflows float16"):
        gguf_writer.save_gguf(tmp_path / "m.gguf", cfg, params, tensor_type="f16")
    assert not (tmp_path / "m.gguf").exists()
    export_hf.save_hf(tmp_path / "hf32", cfg, params, None, dtype="bfloat16")  # fits bfloat16
    flat["layers.down"][0, 0, 0] = 0.0
    flat["layers.q"] = flat["layers.q"].copy()
    flat["layers.q"][0, 0, 0, 0] = 1e7  # Q8_0 (rows of 32): a block scale of 1e7 / 127 > 65504
    with pytest.raises(CheckpointError, match="attn_q.weight has a block with max \\|value\\| 1e\\+07, too large "
                                              "for Q8_0"):
        gguf_writer.save_gguf(tmp_path / "q.gguf", cfg, from_flat(flat), tensor_type="q8_0")
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "F16", "BF16"])
def test_gguf_check_agrees_with_gguf_quantization(type_name):
    """Around each type's limit, the check refuses a tensor exactly when gguf's own quantizer would store a
    non-finite value (its float16 block scale or minimum, or the F16 value itself)."""
    import warnings

    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    rng = np.random.default_rng(0)
    for amplitude in np.geomspace(3e4, 3e6, 25).tolist() + [3.39e38, 3.4e38]:
        value = rng.uniform(-1, 1, (3, 64)).astype(np.float32)
        value[1, 37] = amplitude
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stored = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        try:
            dtypes.check_gguf(value, type_name, "w")
            accepted = True
        except CheckpointError as e:
            accepted = False
            assert str(e).startswith("tensor w has"), e
        assert accepted == bool(np.all(np.isfinite(stored))), (type_name, amplitude)


# ------------------------------------------------------------------------------------------------
# OS errors: one line, partial output removed


def _fails_with(err):
    def fail(*args, **kwargs):
        raise err
    return fail


@pytest.mark.parametrize("err,match", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out"), "error: /data/out: no space left on the device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out"), "error: /data/out: disk quota exceeded"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/a"), "error: /a: too many levels of symbolic links"),
    (OSError(errno.EACCES, "Permission denied", "/root/x"), "error: /root/x: permission denied"),
    (OSError(errno.EIO, "Input/output error"), "error: Input/output error"),
    (RuntimeError("Symlink loop from '/tmp/l'"), "error: Symlink loop from '/tmp/l'"),
])
def test_main_wrapper_turns_os_errors_into_one_line(err, match, capsys):
    from refusal_jax.runs.cli import main_wrapper

    with pytest.raises(SystemExit) as e:
        main_wrapper(_fails_with(err))([])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(match), lines


def _no_partials(parent, name):
    left = [p.name for p in parent.iterdir() if name in p.name]
    assert left == [], f"partial output left behind: {left}"


def test_convert_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from refusal_jax.convert.__main__ import main

    src = _tiny_hf_dir(tmp_path / "hf")
    out = tmp_path / "outs"
    out.mkdir()
    # a full disk in the write path, after orbax wrote the params
    monkeypatch.setattr(checkpoint, "params_checksums",
                        _fails_with(OSError(errno.ENOSPC, "No space left on device", str(out / "c"))))
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(out / "c"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "no space left on the device" in lines[0], lines
    _no_partials(out, "c")
    monkeypatch.undo()

    class FullDisk:  # tensorstore's wording for a full disk, inside orbax's save
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, *args, **kwargs):
            raise ValueError("INTERNAL: Error writing file: [OS error 28: No space left on device]")

    monkeypatch.setattr(checkpoint, "_writer", FullDisk)
    with pytest.raises(SystemExit):
        main([str(src), "--out", str(out / "c"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {out / 'c'}: no space left on the device (free some space or " \
                                           "write elsewhere)", lines
    _no_partials(out, "c")


def test_symlink_loop_as_out_is_one_line(tmp_path, capsys):
    from refusal_jax.convert.__main__ import main

    src = _tiny_hf_dir(tmp_path / "hf")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for out in (loop, loop / "c"):
        with pytest.raises(SystemExit) as e:
            main([str(src), "--out", str(out), "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
        assert "symbolic link" in lines[0] or "Symlink loop" in lines[0] or "loop" in lines[0], lines


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    """A converted tiny model with a tokenizer (for the export commands)."""
    from refusal_jax.convert.__main__ import main

    root = tmp_path_factory.mktemp("tiny")
    src = _tiny_hf_dir(root / "hf")
    main([str(src), "--out", str(root / "ckpt"), "--no-progress"])
    direction = root / "direction.npy"
    np.save(direction, np.random.default_rng(0).normal(size=32).astype(np.float32))
    return root / "ckpt", direction


@pytest.mark.parametrize("command", ["orthogonalize", "export_gguf"])
def test_export_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, converted_tiny, command):
    import gguf

    from refusal_jax import orthogonalize
    from refusal_jax.convert import export_gguf, export_hf

    ckpt, direction = converted_tiny
    out = tmp_path / "outs"
    out.mkdir()
    if command == "orthogonalize":
        def write_then_fail(path, *args, **kwargs):  # a few bytes reach the disk, then it is full
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(export_hf, "write_safetensors_stream", write_then_fail)
        main, target = orthogonalize.main, out / "export"
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                            _fails_with(OSError(errno.ENOSPC, "No space left on device")))
        main, target = export_gguf.main, out / "m.gguf"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(ckpt), "--direction", str(direction), "--out", str(target), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "no space left on the device" in lines[0], lines
    _no_partials(out, target.stem)


def test_generic_exception_is_never_taken_for_a_full_disk():
    err = ValueError("shape mismatch")
    assert checkpoint._os_error(err, "/x") is None
    mapped = checkpoint._os_error(ValueError("[OS error 122: Disk quota exceeded]"), "/x")
    assert isinstance(mapped, OSError) and mapped.errno == errno.EDQUOT and mapped.filename == "/x"
    assert issubclass(ChecksumError, RefusalJaxError)


def test_extract_full_disk_is_one_line(tmp_path, monkeypatch, capsys, converted_tiny):
    """A full disk while extract writes its artifacts: one error line (the completed stages stay resumable)."""
    from refusal_jax import extract
    from tests.tiny_chat import write_sets

    ckpt, _ = converted_tiny
    harmful, harmless = write_sets(tmp_path)
    full = OSError(errno.ENOSPC, "No space left on device")

    def save(file, *args, **kwargs):
        Path(file).write_bytes(b"\x93NUMPY half")  # the disk fills up halfway through the file
        full.filename = str(file)
        raise full

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(SystemExit) as e:
        extract.main(["--model", str(ckpt), "--harmful", str(harmful), "--harmless", str(harmless), "--chat-style",
                      "model", "--n-train", "4", "--n-val", "2", "--batch-size", "4", "--no-filter", "--no-progress",
                      "--layers", "0", "--positions=-1", "--kl-threshold", "1e9", "--induce-threshold=-1e9",
                      "--prune-layer-fraction", "0", "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "no space left on the device" in lines[0] and "generate_directions" in lines[0], lines
    # the line names the artifact, not its temporary file, and no temporary file is left behind
    named = Path(lines[0].split(":")[1].strip())
    assert named.suffix == ".npy" and not named.name.startswith("."), lines
    hidden = [p.name for p in (tmp_path / "run").rglob(".*") if p.name not in (".lock", ".refusal_jax_output")]
    assert not hidden, hidden

"""The streaming safetensors writer, checked with safetensors' own reader."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from converters import writer
from converters.errors import InputError
from converters.tensors import LazyTensor
from converters.writer import check_sha256sums, sha256_file, write_safetensors, write_sha256sums


def tensors():
    rng = np.random.default_rng(0)
    return {"b.weight": rng.normal(size=(3, 5)).astype(np.float32),
            "a.bias": rng.normal(size=(7,)).astype(np.float32),
            "steps": np.arange(4, dtype=np.int64)}


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                ("float16", torch.float16)])
def test_round_trip_through_safetensors_reader(tmp_path, dtype, torch_dtype):
    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, {k: LazyTensor.of(v) for k, v in tensors().items()}, dtype=dtype,
                               metadata={"source_sha256": "ab" * 32, "format": "npz"})
    assert digest == sha256_file(path)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"source_sha256": "ab" * 32, "format": "npz"}
        for name, value in tensors().items():
            got = f.get_tensor(name)
            want = torch.from_numpy(value)
            want = want.to(torch_dtype) if want.is_floating_point() else want
            assert got.dtype == want.dtype, name
            assert torch.equal(got, want), name  # casting is the same rounding torch does


def test_header_is_aligned_and_ordered(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {k: LazyTensor.of(v) for k, v in tensors().items()})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header) == ["b.weight", "a.bias", "steps"]  # the order given, no metadata key
    assert header["b.weight"]["data_offsets"] == [0, 60]
    assert len(raw) == 8 + n + 60 + 28 + 32


def test_one_tensor_loaded_at_a_time(tmp_path):
    live = []

    def loader(v):
        def load():
            live.append(v.nbytes)
            return v
        return load

    src = {k: LazyTensor(v.shape, v.dtype, loader(v)) for k, v in tensors().items()}
    seen = []
    write_safetensors(tmp_path / "m.safetensors", src, on_tensor=lambda name, n: seen.append(name))
    assert seen == list(tensors())
    assert len(live) == 3  # each loaded exactly once


def test_nonfinite_refused_by_name(tmp_path):
    bad = tensors()
    bad["a.bias"][2] = np.nan
    with pytest.raises(InputError, match=r"^a\.bias: 1 non-finite values"):
        write_safetensors(tmp_path / "m.safetensors", {k: LazyTensor.of(v) for k, v in bad.items()})
    write_safetensors(tmp_path / "m.safetensors", {k: LazyTensor.of(v) for k, v in bad.items()},
                      allow_nonfinite=True)


def test_sha256sums_detects_tamper_missing_and_extra(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    write_sha256sums(tmp_path)
    assert check_sha256sums(tmp_path) == []
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "c.txt").write_text("c")
    assert check_sha256sums(tmp_path) == ["a.txt", "b.txt", "c.txt"]


def _bf16_bits_by_torch(array: np.ndarray) -> np.ndarray:
    return torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bfloat16_cast_is_bit_exact_with_torch():
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint32).view(np.float32)  # every exponent
    ties = (rng.integers(0, 2**16, 4096, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halves
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.4028235e38, 1e-45, -1e-45,
                      1.00390625, 1.01171875, 65504.0, 1.1754942e-38], np.float32)
    values = np.concatenate([random_bits, ties, edges])
    values = values[~np.isnan(values)]
    assert np.array_equal(writer.to_bfloat16(values), _bf16_bits_by_torch(values))
    nan = writer.to_bfloat16(np.array([np.nan, -np.nan], np.float32))
    assert ((nan & 0x7F80) == 0x7F80).all() and (nan & 0x7F).all()  # still NaN (torch's payload varies)


@pytest.mark.parametrize("shape, axes", [((3, 3, 40, 72), (3, 2, 0, 1)), ((1, 1, 48, 70), (3, 2, 0, 1)),
                                         ((33, 70), (1, 0)), ((2, 3, 5), (2, 0, 1)), ((5, 1, 17, 9), (3, 2, 0, 1))])
def test_tiled_transposes_match_numpy(tmp_path, monkeypatch, shape, axes):
    monkeypatch.setattr(writer, "_CHUNK", 4096)  # many blocks, ragged last tile
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    view = np.transpose(array, axes)
    expected = np.ascontiguousarray(view).tobytes()
    assert b"".join(bytes(p) for p in writer._encoded_chunks(view, "float32")) == expected
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": LazyTensor(view.shape, view.dtype, lambda: view)}, dtype="bfloat16")
    with safe_open(path, framework="pt") as f:
        got = f.get_tensor("w")
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(view)).to(torch.bfloat16))


def test_write_error_on_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        write_safetensors(tmp_path / "x.safetensors", {"a": LazyTensor.of(np.ones(4, np.float32))})


def test_pipelined_writes_never_hold_more_than_the_largest_tensor(tmp_path, monkeypatch):
    """The loader runs ahead of the write-and-hash thread, but never past the largest tensor."""
    import time
    import weakref

    sizes = [1 << 20, 256, 1 << 20, 300 << 10, 300 << 10, 300 << 10, 1 << 20]
    live, peak = [0], [0]

    def loader(n):
        def load():
            array = np.ones(n // 4, np.float32)
            live[0] += array.nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(array, lambda: live.__setitem__(0, live[0] - n))
            return array
        return load

    slow = writer._pwrite_all
    monkeypatch.setattr(writer, "_pwrite_all", lambda *a: (time.sleep(0.01), slow(*a)))
    monkeypatch.setattr(writer, "_CHUNK", 64 << 10)
    src = {f"t{i}": LazyTensor((n // 4,), np.dtype(np.float32), loader(n)) for i, n in enumerate(sizes)}
    write_safetensors(tmp_path / "m.safetensors", src)
    assert peak[0] <= max(sizes)
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        assert all(f.get_tensor(k).sum() == n // 4 for k, n in zip(src, sizes))

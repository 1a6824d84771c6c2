"""The streaming safetensors writer, checked with safetensors' own reader."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

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

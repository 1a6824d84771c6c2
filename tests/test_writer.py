"""The streaming safetensors writer, checked with safetensors' own reader."""

import hashlib
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


@pytest.mark.parametrize("dtype, overflows", [("float16", 65520.0), ("bfloat16", 2.0 ** 127 * (2 - 2.0 ** -8))])
def test_values_a_half_type_turns_into_inf_are_refused(tmp_path, dtype, overflows):
    """The boundary is where the cast rounds to Inf (torch's cast is the reference), not the largest finite value."""
    fits = np.nextafter(np.float32(overflows), np.float32(0))  # the float32 just below
    edge = torch.tensor([fits, -overflows], dtype=torch.float32).to(getattr(torch, dtype))
    assert torch.isfinite(edge[0]) and torch.isinf(edge[1])
    values = np.array([1.0, fits, -fits], np.float32)
    write_safetensors(tmp_path / "ok.safetensors", {"w": LazyTensor.of(values)}, dtype=dtype)
    values[0] = -overflows
    with pytest.raises(InputError, match=rf"^w: 1 values beyond {dtype}'s range \(largest magnitude .*\) would be "
                                         r"written as Inf; convert to float32, or pass --allow-nonfinite$"):
        write_safetensors(tmp_path / "m.safetensors", {"w": LazyTensor.of(values)}, dtype=dtype)
    write_safetensors(tmp_path / "m.safetensors", {"w": LazyTensor.of(values)}, dtype=dtype, allow_nonfinite=True)
    write_safetensors(tmp_path / "m.safetensors", {"w": LazyTensor.of(values)}, dtype="float32")


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
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space"):
        write_safetensors(tmp_path / "x.safetensors", {"a": LazyTensor.of(np.ones(4, np.float32))})
    import threading

    assert not [t.name for t in threading.enumerate() if t.name.startswith("safetensors-")]  # none left waiting


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


def _blocks_of(tmp_path, monkeypatch, direct: bool, block: int = 3 * 4096):
    """Small blocks, so that headers and tensors straddle block and sector boundaries."""
    monkeypatch.setattr(writer, "_DIRECT", direct)
    monkeypatch.setattr(writer, "_BLOCK", block)
    monkeypatch.setattr(writer, "_CHUNK", 5000)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("sizes", [[1], [3000, 1, 7001, 12288], [0, 20000]], ids=["tiny", "ragged", "empty"])
def test_blocks_straddling_sectors_read_back_exact(tmp_path, monkeypatch, direct, sizes):
    """Every size against the block and sector grid, written directly and through the page cache."""
    _blocks_of(tmp_path, monkeypatch, direct)
    rng = np.random.default_rng(len(sizes))
    arrays = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    arrays["kernel"] = rng.standard_normal((3, 3, 40, 72)).astype(np.float32).transpose(3, 2, 0, 1)
    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, {k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()},
                               metadata={"note": "x" * 5000})  # a header over one sector
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"note": "x" * 5000}
        for name, value in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(name), value)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_late_metadata_is_written_and_hashed_once_known(tmp_path, monkeypatch, direct):
    """The source hash may finish after most blocks are written: the header is rewritten over the
    placeholder and the digest catches up from the file, equal to a hash of the finished file."""
    import threading
    from concurrent.futures import Future

    _blocks_of(tmp_path, monkeypatch, direct)
    future: Future = Future()
    values = np.arange(30000, dtype=np.float32)

    def load_then_finish(i):
        def load():
            if i == 2:  # blocks were written with the placeholder; the hash lags behind them
                threading.Timer(0.05, future.set_result, ["f" * 64]).start()
            return values[i * 10000:(i + 1) * 10000]
        return load

    path = tmp_path / "m.safetensors"
    digest = write_safetensors(path, {f"p{i}": LazyTensor((10000,), values.dtype, load_then_finish(i))
                                      for i in range(3)},
                               metadata={"source_sha256": writer.Later(future, 64), "format": "pt"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"source_sha256": "f" * 64, "format": "pt"}
        np.testing.assert_array_equal(np.concatenate([f.get_tensor(f"p{i}") for i in range(3)]), values)


def test_direct_writes_refused_by_the_file_system_fall_back_to_buffered(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the writes (EINVAL), others refuse the open."""
    import errno

    _blocks_of(tmp_path, monkeypatch, True)
    real = writer._pwrite_all

    def refuse_direct(fd, data, offset, direct=False):
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", refuse_direct)
    value = np.arange(20000, dtype=np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"v": LazyTensor.of(value)})
    real_open = writer.os.open

    def refuse_direct_open(path, flags, mode=0o777):
        if flags & writer.os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(writer.os, "open", refuse_direct_open)
    write_safetensors(tmp_path / "b.safetensors", {"v": LazyTensor.of(value)})
    for name in ("a", "b"):
        with safe_open(tmp_path / f"{name}.safetensors", framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor("v"), value)


def test_scratch_mappings_are_reused_only_once_no_array_views_them():
    from converters import memory

    memory.release()
    mappings = memory._pools.setdefault("test", [])
    first = memory.empty((3 << 20,), np.uint8, pool="test")
    assert first.ctypes.data % memory.HUGE_PAGE == 0
    address = first.ctypes.data
    view = memoryview(first[4096:].view(np.float32))  # a view keeps the mapping busy
    del first
    second = memory.empty((3 << 20,), np.uint8, pool="test")
    assert second.ctypes.data != address and len(mappings) == 2
    del view
    smaller = memory.empty((1 << 20,), np.float32, pool="test")  # 4 MiB: the idle mapping is reused
    assert smaller.ctypes.data == address and len(mappings) == 2
    assert memory.empty((3 << 20,), np.uint8, pool="other").ctypes.data != address  # pools apart
    del smaller
    larger = memory.empty((16 << 20,), np.uint8, pool="test")  # no idle one fits: it is unmapped first
    assert len(mappings) == 2  # the busy `second` and the new one
    del larger, second
    memory.release()
    assert memory._pools["test"] == [] and memory._pools["other"] == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("out", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("order", ["C", "transposed"])
def test_nonfinite_found_in_every_float_width(tmp_path, dtype, bad, out, order):
    """float16 is checked through its bits, wider floats through their sum or, written as a half type,
    their max and min: each sees every position, in a view of any order."""
    values = np.full((1 << 20) + 4, 65504.0, dtype)  # float16's largest finite value, everywhere
    view = (lambda v: v) if order == "C" else (lambda v: v.reshape(4, -1).T)
    write_safetensors(tmp_path / "ok.safetensors", {"w": LazyTensor.of(view(values))}, dtype=out)
    values[[0, (1 << 19) + 1, -1]] = bad
    with pytest.raises(InputError, match=r"^w: 3 non-finite values \(NaN or Inf\)"):
        write_safetensors(tmp_path / "m.safetensors", {"w": LazyTensor.of(view(values))}, dtype=out)


def test_a_write_error_found_at_the_end_still_ends_both_threads(tmp_path, monkeypatch):
    """The error surfaces while the last block is handed over: the threads must still be told to stop."""
    import errno
    import threading
    import time

    monkeypatch.setattr(writer, "_BLOCK", 8192)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_all", full)
    one_block_and_a_tail = np.ones(8192 // 4 + 100, np.float32)
    with pytest.raises(OSError, match="No space"):  # the first block fails while the tail waits
        write_safetensors(tmp_path / "x.safetensors", {"a": LazyTensor.of(one_block_and_a_tail)},
                          on_tensor=lambda name, n: time.sleep(0.2))
    time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("safetensors-")]


def test_direct_io_can_be_turned_off(tmp_path, monkeypatch):
    """Network file systems may write each direct block synchronously: PARITYPORT_DIRECT_IO=0 opts out."""
    monkeypatch.setattr(writer, "_DIRECT", True)
    fd, direct = writer._open_for_writing(tmp_path / "a")
    os_direct = bool(writer.os.O_DIRECT & writer.fcntl.fcntl(fd, writer.fcntl.F_GETFL))
    writer.os.close(fd)
    assert direct == os_direct  # on, where /tmp's file system takes it
    monkeypatch.setenv(writer.DIRECT_IO_ENV, "0")
    fd, direct = writer._open_for_writing(tmp_path / "b")
    assert not direct and not writer.os.O_DIRECT & writer.fcntl.fcntl(fd, writer.fcntl.F_GETFL)
    writer.os.close(fd)

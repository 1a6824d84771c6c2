"""Readers on hostile and broken files: refused with one line naming the file and the culprit."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attacks_budgets import torch_zip
from converters.errors import InputError, UnsafeInputError
from converters.readers import keras_h5 as keras_reader
from converters.readers import npz as npz_reader
from converters.readers.detect import open_checkpoint
from converters.readers.keras_h5 import read_keras_h5
from converters.readers.npz import read_npz
from converters.readers.torch_pickle import read_torch

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_LONG = settings(max_examples=5000, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_line(error: pytest.ExceptionInfo, path: Path) -> str:
    text = str(error.value)
    assert "\n" not in text and str(path) in text
    return text


# ---------------------------------------------------------------- npz


def _npy_bytes(shape, descr: str = "<f4", payload: bytes | None = None) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue() + (payload if payload is not None else b"\0" * 16)


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_npz_object_dtype_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", ok=np.ones(2), bad=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UnsafeInputError, match="'bad.npy' has an object dtype") as error:
        read_npz(tmp_path / "o.npz")
    _one_line(error, tmp_path / "o.npz")


@pytest.mark.parametrize("descr", [[("a", "<f4"), ("b", "|O")], "|V2", "<U3", "<M8[s]"])
def test_npz_non_numeric_dtypes_refused(tmp_path: Path, descr) -> None:
    payload = b"\0" * np.dtype(descr).itemsize  # the right size: only the dtype is wrong
    with pytest.raises(InputError, match=r"member 'x\.npy' has (unsupported dtype|an object dtype)"):
        read_npz(_zip(tmp_path / "d.npz", {"x.npy": _npy_bytes((1,), descr, payload)}))


@pytest.mark.parametrize("shape", [(10**12,), (3,), (5,), (2, 2, 2)])
def test_npz_header_lying_about_size_refused(tmp_path: Path, shape) -> None:
    path = _zip(tmp_path / "l.npz", {"w.npy": _npy_bytes(shape, payload=b"\0" * 16)})  # holds 4 floats
    with pytest.raises(InputError, match="'w.npy'.* (header )?declares") as error:
        read_npz(path)
    _one_line(error, path)


def test_npz_truncated_everywhere(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", a=np.arange(100, dtype=np.float32), b=np.ones((4, 4)))
    raw = (tmp_path / "w.npz").read_bytes()
    for cut in (0, 1, 10, 100, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        (tmp_path / "t.npz").write_bytes(raw[:cut])
        with pytest.raises(InputError):
            read_npz(tmp_path / "t.npz")
        with pytest.raises(InputError):
            open_checkpoint(tmp_path / "t.npz")


def test_npz_truncated_after_it_was_opened(tmp_path: Path) -> None:
    """Members are mapped from the file: one cut short since the directory was read is an error,
    not an access past the end of the file (which would end the process with SIGBUS)."""
    np.savez(tmp_path / "w.npz", a=np.arange(1000, dtype=np.float32), b=np.ones((4, 4)))
    checkpoint = read_npz(tmp_path / "w.npz")
    raw = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "w.npz").write_bytes(raw[: raw.find(b"PK\x03\x04", 10) - 100])  # inside a's data
    with pytest.raises(InputError, match=r"member 'a.npy': truncated after \d+ of 4000 bytes") as error:
        checkpoint.tensors["a"].load()
    _one_line(error, tmp_path / "w.npz")


def test_npz_zip_bomb_member_ratio(tmp_path: Path) -> None:
    path = _zip(tmp_path / "b.npz", {"w.npy": _npy_bytes((4,))}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    declared = 2**32 - 1  # patch the uncompressed size in the local and central headers
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, declared)
    struct.pack_into("<I", raw, central + 24, declared)
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsafeInputError, match="zip bomb: member 'w.npy'"):
        read_npz(path)


def test_npz_zip_bomb_archive_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(npz_reader, "ARCHIVE_RATIO_FLOOR", 2**20)
    np.savez_compressed(tmp_path / "z.npz", zeros=np.zeros(2**21, np.float32))
    with pytest.raises(UnsafeInputError, match="zip bomb"):
        read_npz(tmp_path / "z.npz")


@pytest.mark.parametrize("name", ["../evil.npy", "/abs.npy", "a/../../b.npy", "C:\\x.npy", "a\\..\\b.npy"])
def test_npz_path_tricks_refused(tmp_path: Path, name: str) -> None:
    path = _zip(tmp_path / "p.npz", {name: _npy_bytes((4,))})
    with pytest.raises(UnsafeInputError, match="path trick"):
        read_npz(path)


def test_npz_nul_in_name_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "n.npz", {"aXb.npy": _npy_bytes((4,))})
    path.write_bytes(path.read_bytes().replace(b"aXb.npy", b"a\0b.npy"))
    with pytest.raises(UnsafeInputError, match="path trick"):
        read_npz(path)


def test_npz_duplicate_and_foreign_members_refused(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        path = _zip(tmp_path / "d.npz", {})
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("w.npy", _npy_bytes((4,)))
            archive.writestr("w.npy", _npy_bytes((4,)))
    with pytest.raises(UnsafeInputError, match="duplicate member name 'w.npy'"):
        read_npz(path)
    with pytest.raises(InputError, match="'notes.txt' is not a .npy array"):
        read_npz(_zip(tmp_path / "f.npz", {"w.npy": _npy_bytes((4,)), "notes.txt": b"hi"}))


def test_npz_changed_after_open_is_caught(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", a=np.ones(4, np.float32))
    checkpoint = read_npz(tmp_path / "w.npz")
    np.savez(tmp_path / "w.npz", a=np.ones(8, np.float32))
    with pytest.raises(InputError):
        checkpoint.tensors["a"].load()


def _valid_npz() -> bytes:
    stream = io.BytesIO()
    np.savez(stream, a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(2, np.float16))
    return stream.getvalue()


def _read_all(reader, path: Path) -> None:
    for lazy in reader(path).tensors.values():
        lazy.load()


def _mutate(data: bytes, position: int, value: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1:]


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_npz_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.npz"
    path.write_bytes(b"PK\x03\x04" + data)
    with pytest.raises(InputError):
        _read_all(read_npz, path)


def _fuzz_npz_mutation(tmp_path: Path, position: int, value: int) -> None:
    path = tmp_path / "m.npz"
    path.write_bytes(_mutate(_valid_npz(), position, value))
    try:
        _read_all(open_checkpoint, path)
    except InputError:
        pass


@FUZZ
@given(position=st.integers(0, 10**6), value=st.integers(0, 255))
def test_fuzz_npz_mutations(tmp_path: Path, position: int, value: int) -> None:
    _fuzz_npz_mutation(tmp_path, position, value)


@pytest.mark.fuzz_long
@FUZZ_LONG
@given(position=st.integers(0, 10**6), value=st.integers(0, 255))
def test_fuzz_npz_mutations_long(tmp_path: Path, position: int, value: int) -> None:
    _fuzz_npz_mutation(tmp_path, position, value)


# ---------------------------------------------------------------- keras h5


def _keras_file(path: Path, add) -> Path:
    """A save_weights-layout file whose layer 'd' holds 'kernel:0', made by `add(group, h5)`."""
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        group = h5.create_group("d")
        group.attrs["weight_names"] = np.array([b"kernel:0"])
        add(group, h5)
    return path


def test_h5_external_link_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "secret.h5", "w") as other:
        other["x"] = np.arange(4, dtype=np.float32)
    def add(group, h5):
        group["kernel:0"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/x")
    path = _keras_file(tmp_path / "e.h5", add)
    with pytest.raises(UnsafeInputError, match="'/d/kernel:0' is an external link") as error:
        read_keras_h5(path)
    _one_line(error, path)


def test_h5_external_link_as_layer_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "secret.h5", "w") as other:
        other.create_group("g")
    path = tmp_path / "l.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        h5["d"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/g")
    with pytest.raises(UnsafeInputError, match="'/d' is an external link"):
        read_keras_h5(path)


def test_h5_soft_link_to_external_link_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "secret.h5", "w") as other:
        other["x"] = np.arange(4, dtype=np.float32)
    def add(group, h5):
        h5["hidden"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/x")
        group["kernel:0"] = h5py.SoftLink("/hidden")
    with pytest.raises(UnsafeInputError, match="'/hidden' is an external link"):
        read_keras_h5(_keras_file(tmp_path / "s.h5", add))


def test_h5_soft_link_loop_refused(tmp_path: Path) -> None:
    def add(group, h5):
        h5["a"] = h5py.SoftLink("/b")
        h5["b"] = h5py.SoftLink("/a")
        group["kernel:0"] = h5py.SoftLink("/a")
    with pytest.raises(UnsafeInputError, match="soft link chain too long"):
        read_keras_h5(_keras_file(tmp_path / "loop.h5", add))


def test_h5_external_storage_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\1" * 16)
    def add(group, h5):
        group.create_dataset("kernel:0", shape=(4,), dtype="<f4",
                             external=[(str(tmp_path / "secret.bin"), 0, 16)])
    with pytest.raises(UnsafeInputError, match="dataset '/d/kernel:0' keeps its data in external files"):
        read_keras_h5(_keras_file(tmp_path / "x.h5", add))


def test_h5_virtual_dataset_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "secret.h5", "w") as other:
        other["x"] = np.arange(4, dtype=np.float32)
    def add(group, h5):
        layout = h5py.VirtualLayout(shape=(4,), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "secret.h5"), "x", shape=(4,))
        group.create_virtual_dataset("kernel:0", layout)
    with pytest.raises(UnsafeInputError, match="dataset '/d/kernel:0' is a virtual dataset"):
        read_keras_h5(_keras_file(tmp_path / "v.h5", add))


def test_h5_huge_unwritten_dataset_refused(tmp_path: Path) -> None:
    def add(group, h5):
        group.create_dataset("kernel:0", shape=(10**9,), dtype="<f4", chunks=(1024,), compression="gzip")
    with pytest.raises(InputError, match="has no stored data"):
        read_keras_h5(_keras_file(tmp_path / "h.h5", add))


def test_h5_dataset_of_mostly_unwritten_chunks_refused(tmp_path: Path) -> None:
    def add(group, h5):
        group.create_dataset("kernel:0", shape=(10**7,), dtype="<f4", chunks=(1024,))[:1024] = 1.0
    path = _keras_file(tmp_path / "s.h5", add)
    with pytest.raises(InputError, match=r"dataset '/d/kernel:0' declares 40000000 bytes but stores 4096 "
                                         r"\(the rest would be read as fill value\); refused") as error:
        read_keras_h5(path)
    _one_line(error, path)


def test_h5_file_declaring_far_more_than_its_size_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(keras_reader, "FILE_RATIO_FLOOR", 2**20)
    def add(group, h5):  # zeros compress ~1000:1, within one dataset's limit
        group.create_dataset("kernel:0", data=np.zeros(2**21, np.float32), chunks=(2**16,), compression="gzip")
    path = _keras_file(tmp_path / "z.h5", add)
    with pytest.raises(InputError, match=r"bytes of file declare 8388608 bytes of weights "
                                         r"\(over 100 times its size\); refused"):
        read_keras_h5(path)


def test_h5_not_keras_and_truncated(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "plain.h5", "w") as h5:
        h5["x"] = np.ones(2)
    with pytest.raises(InputError, match="no 'layer_names' attribute"):
        read_keras_h5(tmp_path / "plain.h5")
    raw = _valid_h5(tmp_path)
    for cut in (8, 100, len(raw) // 2, len(raw) - 10):
        (tmp_path / "t.h5").write_bytes(raw[:cut])
        with pytest.raises(InputError):
            _read_all(open_checkpoint, tmp_path / "t.h5")


def _valid_h5(tmp_path: Path) -> bytes:
    def add(group, h5):
        group["kernel:0"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    return _keras_file(tmp_path / "valid.h5", add).read_bytes()


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_h5_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + data)
    with pytest.raises(InputError):
        _read_all(read_keras_h5, path)


_H5_MUTATION_CHILD = """
import sys, random
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from converters.errors import InputError
from converters.readers.keras_h5 import read_keras_h5
raw = Path(sys.argv[2]).read_bytes()
rng = random.Random(int(sys.argv[3]))
target = Path(sys.argv[2]).with_name("mutant.h5")
for i in range(int(sys.argv[4])):
    data = bytearray(raw)
    data[rng.randrange(len(data))] = rng.randrange(256)
    target.write_bytes(bytes(data))
    try:
        for lazy in read_keras_h5(target).tensors.values():
            lazy.load()
    except InputError:
        pass
print("ok")
"""


def _fuzz_h5_mutations(tmp_path: Path, count: int) -> None:
    """Mutated HDF5 can crash libhdf5 itself, so the mutations run in a child process."""
    (tmp_path / "valid.h5").write_bytes(_valid_h5(tmp_path))
    result = subprocess.run([sys.executable, "-c", _H5_MUTATION_CHILD, str(REPO),
                             str(tmp_path / "valid.h5"), "1234", str(count)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_fuzz_h5_mutations(tmp_path: Path) -> None:
    _fuzz_h5_mutations(tmp_path, 100)


@pytest.mark.fuzz_long
def test_fuzz_h5_mutations_long(tmp_path: Path) -> None:
    _fuzz_h5_mutations(tmp_path, 5000)


# ---------------------------------------------------------------- torch: malicious pickles


class _Payload:
    def __init__(self, reduce_value):
        self.reduce_value = reduce_value

    def __reduce__(self):
        return self.reduce_value


def _payloads(marker: Path) -> dict[str, tuple[object, int, str]]:
    import functools

    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').write('x')"
    return {
        "os.system": (_Payload((os.system, (touch,))), 2, "posix.system"),
        "stack_global": (_Payload((os.system, (touch,))), 4, "posix.system"),
        "partial": (_Payload((functools.partial(os.system, touch), ())), 2, "functools.partial"),
        "eval": (_Payload((eval, (code,))), 2, "builtins.eval"),
        "exec": (_Payload((exec, (code,))), 4, "builtins.exec"),
        "getattr": (_Payload((getattr, (1, "real"))), 2, "builtins.getattr"),
        "subprocess": (_Payload((subprocess.call, (["touch", str(marker)],))), 2, "subprocess.call"),
        "nested_in_state_dict": ({"model": {"w": _Payload((os.system, (touch,)))}}, 2, "posix.system"),
    }


@pytest.mark.parametrize("case", list(_payloads(Path("m"))))
def test_malicious_pickle_refused_by_name(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "PWNED"
    payload, protocol, global_name = _payloads(marker)[case]
    path = torch_zip(tmp_path / "evil.pt", pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafeInputError, match=f"refusing to load: pickle calls {global_name}") as error:
        open_checkpoint(path)
    _one_line(error, path)
    assert not marker.exists()


def test_malicious_legacy_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    stream = io.BytesIO()
    for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(value, stream, protocol=2)
    pickle.dump(_Payload((os.system, (f"touch {marker}",))), stream, protocol=2)
    (tmp_path / "old.pt").write_bytes(stream.getvalue())
    with pytest.raises(UnsafeInputError, match="posix.system"):
        open_checkpoint(tmp_path / "old.pt")
    assert not marker.exists()


class _PersistentPickler(pickle.Pickler):
    def __init__(self, file, pid):
        super().__init__(file, protocol=2)
        self.pid = pid

    def persistent_id(self, obj):
        return self.pid if isinstance(obj, _Payload) else None


@pytest.mark.parametrize("pid", [("module", "x", "y", "z", 1), "storage", ("storage",), 42])
def test_non_storage_persistent_id_refused(tmp_path: Path, pid) -> None:
    stream = io.BytesIO()
    _PersistentPickler(stream, pid).dump({"w": _Payload(None)})
    with pytest.raises(UnsafeInputError, match="refusing persistent id"):
        read_torch(torch_zip(tmp_path / "p.pt", stream.getvalue()))


def _storage_pickle(numel: int, key: str = "0", shape=(4,), stride=(1,), offset: int = 0) -> bytes:
    """A data.pkl with one float tensor, written by hand the way torch.save writes it."""
    out = io.BytesIO()
    out.write(b"\x80\x02}X\x01\x00\x00\x00w")
    out.write(b"ctorch._utils\n_rebuild_tensor_v2\n(")
    out.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n")
    out.write(pickle.dumps(key, 2)[2:-1] + pickle.dumps("cpu", 2)[2:-1] + pickle.dumps(numel, 2)[2:-1])
    out.write(b"tQ" + pickle.dumps(offset, 2)[2:-1] + pickle.dumps(shape, 2)[2:-1])
    out.write(pickle.dumps(stride, 2)[2:-1] + b"\x89ccollections\nOrderedDict\n)RtRs.")
    return out.getvalue()


def test_hand_written_storage_pickle_is_valid(tmp_path: Path) -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    path = torch_zip(tmp_path / "ok.pt", _storage_pickle(4), {"0": data})
    np.testing.assert_array_equal(read_torch(path).tensors["w"].load(), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("pkl, storages, message", [
    (_storage_pickle(100), {"0": b"\0" * 16}, "storage '0' holds 16 bytes, declared 100"),
    (_storage_pickle(4), {}, "storage '0' is missing"),
    (_storage_pickle(4, shape=(8,)), {"0": b"\0" * 16}, "tensor 'w' .* reads past its storage"),
    (_storage_pickle(4, shape=(2, 2), stride=(3, 1)), {"0": b"\0" * 16}, "reads past its storage"),
    (_storage_pickle(1, shape=(60000, 60000), stride=(0, 0)), {"0": b"\0" * 4},
     r"tensor 'w' \(float32\[60000, 60000\]\) repeats the 1 elements of storage '0' as 3600000000 "
     r"\(a stride-0 view\); expanded views may declare 64 MiB in all"),
    (_storage_pickle(4, shape=(4, 2**22 + 1), stride=(1, 0)), {"0": b"\0" * 16}, "repeats the 4 elements"),
    (_storage_pickle(4, offset=-1), {"0": b"\0" * 16}, "invalid storage offset"),
    (_storage_pickle(4, shape=(-1,)), {"0": b"\0" * 16}, "invalid tensor size"),
])
def test_storage_checks(tmp_path: Path, pkl: bytes, storages: dict, message: str) -> None:
    with pytest.raises(InputError, match=message) as error:
        read_torch(torch_zip(tmp_path / "s.pt", pkl, storages))
    _one_line(error, tmp_path / "s.pt")


@pytest.mark.parametrize("pkl, message", [
    (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", "bytearray"),   # bytearray(2**30)
    (b"\x80\x02]K\x00K\x01s.", "corrupt or truncated pickle"),                    # SETITEM on a list
    (b"\x80\x02" + b"]" * 100_000 + b"K\x01" + b"a" * 100_000 + b".", "too large or too deep"),
    (b"\x80\x02]q\x00h\x00a.", "cyclic structure"),
    (b"\x80\x02ccollections\nOrderedDict\n)R}b.", None),                           # BUILD state kept aside
    (b"\x80\x02ctorch\nFloatStorage\n)R.", "not callable"),
    (b"\x80\x02}", "corrupt or truncated pickle"),
])
def test_abuse_of_allowed_globals(tmp_path: Path, pkl: bytes, message: str | None) -> None:
    path = torch_zip(tmp_path / "a.pt", pkl)
    if message is None:
        assert read_torch(path).tensors == {}
        return
    with pytest.raises(InputError, match=message) as error:
        read_torch(path)
    _one_line(error, path)



@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_memo_index_past_the_pickle_is_refused_before_the_memo_grows(tmp_path: Path, container: str) -> None:
    """One LONG_BINPUT naming slot 2**26 would make the C unpickler allocate 1 GiB of memo table
    (twice the index, 8 bytes a slot) from 10 bytes of file; a pickler numbers its slots from 0."""
    pkl = b"\x80\x02}r" + struct.pack("<I", 2**26) + b"."
    path = tmp_path / "m.pt"
    if container == "zip":
        torch_zip(path, pkl)
    else:
        path.write_bytes(pkl)  # the legacy stream starts with a pickle
    with pytest.raises(InputError, match="malformed checkpoint pickle: memo index 67108864 at opcode 3") as error:
        read_torch(path)
    _one_line(error, path)

def test_compressed_storage_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", _storage_pickle(4))
        archive.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(InputError, match="is compressed"):
        read_torch(path)


def test_encrypted_member_refused(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "e.pt", _storage_pickle(4), {"0": b"\0" * 16})
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central + 8] |= 0x1  # general purpose flag: encrypted
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="encrypted"):
        read_torch(path)


def test_torch_truncated_everywhere(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.arange(64.0)}, "epoch": 1}, tmp_path / "w.pt")
    torch.save({"w": torch.arange(64.0)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    for name in ("w.pt", "l.pt"):
        raw = (tmp_path / name).read_bytes()
        for cut in (1, 20, len(raw) // 3, len(raw) // 2, len(raw) - 40, len(raw) - 1):
            (tmp_path / "t.pt").write_bytes(raw[:cut])
            with pytest.raises(InputError):
                _read_all(open_checkpoint, tmp_path / "t.pt")


def _valid_torch(legacy: bool) -> bytes:
    stream = io.BytesIO()
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3).t(), "h": torch.ones(2).half()},
                "args": {"lr": 0.1}}, stream, _use_new_zipfile_serialization=not legacy)
    return stream.getvalue()


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_torch_random_pickles(tmp_path: Path, data: bytes) -> None:
    path = torch_zip(tmp_path / "r.pt", b"\x80\x02" + data, {"0": b"\0" * 16})
    with pytest.raises(InputError):
        _read_all(read_torch, path)
        raise InputError(path, "parsed")  # a random pickle that parses is fine too


def _fuzz_torch_mutation(tmp_path: Path, legacy: bool, position: int, value: int) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(_mutate(_valid_torch(legacy), position, value))
    try:
        _read_all(open_checkpoint, path)
    except InputError:
        pass


@FUZZ
@given(legacy=st.booleans(), position=st.integers(0, 10**6), value=st.integers(0, 255))
def test_fuzz_torch_mutations(tmp_path: Path, legacy: bool, position: int, value: int) -> None:
    _fuzz_torch_mutation(tmp_path, legacy, position, value)


@pytest.mark.fuzz_long
@FUZZ_LONG
@given(legacy=st.booleans(), position=st.integers(0, 10**6), value=st.integers(0, 255))
def test_fuzz_torch_mutations_long(tmp_path: Path, legacy: bool, position: int, value: int) -> None:
    _fuzz_torch_mutation(tmp_path, legacy, position, value)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_detect_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    with pytest.raises(InputError):
        open_checkpoint(path)


def test_convert_refuses_a_code_running_checkpoint_with_exit_2(tmp_path: Path, capsys) -> None:
    """Through the command: a DeepSpeed-shaped file whose pickle would run code beside real weights."""
    import torch

    from parityport.cli import main

    marker = tmp_path / "PWNED"
    state = {"module": {"cls_token": torch.zeros(1, 1, 8)},
             "args": _Payload((os.system, (f"touch {marker}",)))}
    src = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(state, src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"parityport: error: {src}: refusing to load: pickle calls posix.system"]
    assert not marker.exists() and not out.exists()

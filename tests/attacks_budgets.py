"""Small files that would cost minutes and gigabytes to read without the readers' budgets.

`SEEDS` maps a name to a function that writes one attack file into a folder and returns its
path. Each file is a few kilobytes to a megabyte, built in well under a second; the tests in
`test_budgets.py` convert each and assert a quick one-line refusal, and fuzzing mutates them.
"""

from __future__ import annotations

import bz2
import io
import lzma
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---------------------------------------------------------------- pickle pieces


def _op(value: object) -> bytes:
    """The opcodes pushing `value` (protocol 2), without PROTO and STOP."""
    return pickle.dumps(value, 2)[2:-1]


def _memo_dag(levels: int) -> bytes:
    """Opcodes pushing a tuple whose two items are one memoized tuple, `levels` deep: 2**levels
    leaves from 8 bytes a level (memo slot 0 is rebound to each new level)."""
    out = b"X\x01\x00\x00\x00aq\x000"
    for _ in range(levels):
        out += b"h\x00h\x00\x86q\x000"  # BINGET 0, BINGET 0, TUPLE2, BINPUT 0, POP
    return out + b"h\x00"


def torch_zip(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A torch zip checkpoint of `pickled` and raw `storages`, laid out as torch.save writes one."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


def _raw_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> Path:
    """A zip written field by field: (name, method, bytes as stored, declared size, CRC-32), so a
    member may declare another size than its stream inflates to, or use any method."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, method, data, size, crc in members:
        offset, encoded = out.tell(), name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size,
                              len(encoded), 0) + encoded + data)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data),
                                  size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                          len(central.getvalue()), start, 0))
    path.write_bytes(out.getvalue())
    return path


def _stored(name: str, data: bytes) -> tuple[str, int, bytes, int, int]:
    return name, zipfile.ZIP_STORED, data, len(data), zlib.crc32(data)


def _deflate_runs(runs: list[tuple[bytes, int]], checksum: bool = True) -> tuple[bytes, int, int]:
    """A raw deflate stream of each (piece, times) run in turn, with its inflated size and CRC-32, in
    milliseconds: each piece is compressed once, ended by a full flush so that the copy stands alone,
    and repeated; an empty final block ends the stream."""
    stream, size, crc = b"", 0, 0
    for piece, times in runs:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        stream += (compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH)) * times
        size += len(piece) * times
        for _ in range(times if checksum else 0):
            crc = zlib.crc32(piece, crc)
    return stream + b"\x03\x00", size, crc


def _zlib_zeros(mib: int) -> bytes:
    """A zlib stream (header, deflate, Adler-32) of `mib` MiB of zeros, as HDF5's deflate filter reads."""
    stream, _, _ = _deflate_runs([(bytes(1 << 20), mib)], checksum=False)
    adler = 1
    for _ in range(mib):
        adler = zlib.adler32(bytes(1 << 20), adler)
    return b"\x78\xda" + stream + struct.pack(">I", adler)


# ---------------------------------------------------------------- torch attacks


def pid_memo_dag(folder: Path) -> Path:
    """A persistent id that is a memo DAG of 2**40 leaves: quoting it whole in the refusal would
    build a string of terabytes."""
    return torch_zip(folder / "pid_dag.pt", b"\x80\x02" + _memo_dag(40) + b"Q.")


def legacy_protocol_memo_dag(folder: Path) -> Path:
    """A legacy stream whose protocol number is a memo DAG of 2**40 leaves."""
    path = folder / "protocol_dag.pt"
    path.write_bytes(pickle.dumps(LEGACY_MAGIC, 2) + b"\x80\x02" + _memo_dag(40) + b".")
    return path


def tensor_size_memo_dag(folder: Path) -> Path:
    """A tensor whose size is a memo DAG of 2**40 leaves (quoted by the size check)."""
    pickled = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
               b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + _op("0") + _op("cpu") + _op(1)
               + b"tQK\x00" + _memo_dag(40) + _op((1,)) + b"\x89ccollections\nOrderedDict\n)RtRs.")
    return torch_zip(folder / "size_dag.pt", pickled, {"0": b"\0" * 4})


def deflated_opcode_run(folder: Path, mib: int = 128) -> Path:
    """A data.pkl of `mib` MiB of MARK POP_MARK opcodes, deflated ~1000:1 into a file of ~`mib` KB:
    every opcode walked one at a time."""
    stream, size, crc = _deflate_runs([(b"\x80\x02", 1), (b"(1" * (1 << 19), mib), (b"N.", 1)])
    return _raw_zip(folder / "opcode_run.pt", [
        ("archive/data.pkl", zipfile.ZIP_DEFLATED, stream, size, crc),
        _stored("archive/byteorder", b"little"), _stored("archive/version", b"3\n")])


def memo_dag_of_tensors(folder: Path, levels: int = 21) -> Path:
    """One tensor, then `levels` dicts each holding the one below twice: 2**levels dotted paths to
    tensors of one 4-byte storage, from under a kilobyte of pickle."""
    out = io.BytesIO()
    out.write(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(")
    out.write(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + _op("0") + _op("cpu") + _op(1))
    out.write(b"tQK\x00" + _op((1,)) + _op((1,)) + b"\x89ccollections\nOrderedDict\n)RtRq\x00")
    for _ in range(levels):
        out.write(b"}(X\x01\x00\x00\x00ah\x00X\x01\x00\x00\x00bh\x00uq\x00")
    out.write(b".")
    return torch_zip(folder / "tensor_dag.pt", out.getvalue(), {"0": b"\0" * 4})


def memo_dag_of_objects(folder: Path, levels: int = 24) -> Path:
    """`levels` lists each holding the one below twice: 2**levels objects to walk from ~200 bytes."""
    out = b"\x80\x02K\x01q\x000"
    for _ in range(levels):
        out += b"(h\x00h\x00lq\x000"  # MARK, BINGET 0 twice, LIST, BINPUT 0, POP
    return torch_zip(folder / "object_dag.pt", out + b"h\x00.")


def _byteorder_bomb(folder: Path, name: str, method: int, stream: bytes) -> Path:
    """A checkpoint whose `byteorder` member declares 6 bytes ("little") but is `stream`."""
    pickled = b"\x80\x02}."
    return _raw_zip(folder / name, [
        _stored("archive/data.pkl", pickled),
        ("archive/byteorder", method, stream, 6, zlib.crc32(b"little")),
        _stored("archive/version", b"3\n")])


def byteorder_bzip2(folder: Path) -> Path:
    """`byteorder` as a bzip2 stream of "little" and 16 MiB of zeros (bzip2 has no ratio limit)."""
    compressor = bz2.BZ2Compressor(9)
    stream = compressor.compress(b"little") + compressor.compress(bytes(16 << 20)) + compressor.flush()
    return _byteorder_bomb(folder, "byteorder_bz2.pt", zipfile.ZIP_BZIP2, stream)


def byteorder_lzma(folder: Path) -> Path:
    """`byteorder` as an lzma stream (zipfile's framing) of "little" and 4 MiB of zeros."""
    compressor = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA1}])
    raw = compressor.compress(b"little" + bytes(4 << 20)) + compressor.flush()
    props = lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1})
    stream = struct.pack("<BBH", 9, 4, len(props)) + props + raw
    return _byteorder_bomb(folder, "byteorder_lzma.pt", zipfile.ZIP_LZMA, stream)


def byteorder_deflate(folder: Path) -> Path:
    """`byteorder` as a deflate stream of 1 GiB of zeros, declaring 6 bytes."""
    stream, _, _ = _deflate_runs([(bytes(1 << 20), 1024)], checksum=False)
    return _byteorder_bomb(folder, "byteorder_deflate.pt", zipfile.ZIP_DEFLATED, stream)


# ---------------------------------------------------------------- keras h5 attacks


def h5_vlen_names_one_heap_object(folder: Path, count: int = 3500) -> Path:
    """`layer_names` of `count` variable-length strings that all point at one 1 MiB string in the
    global heap: reading the attribute materialises `count` MiB from a ~1 MB file."""
    path = folder / "vlen_names.h5"
    big = "x" * (1 << 20)
    names = [big] + [f"n{i:05d}" for i in range(1, count)]
    with h5py.File(path, "w") as h5:
        h5.attrs.create("layer_names", names, dtype=h5py.string_dtype())
    raw = bytearray(path.read_bytes())
    first = next(at for at in range(len(raw))  # (length, heap collection address, object index) each
                 if raw[at: at + 4] == struct.pack("<I", 1 << 20) and raw[at + 16: at + 20] == struct.pack("<I", 6))
    element = bytes(raw[first: first + 16])
    for index in range(1, count):
        raw[first + 16 * index: first + 16 * (index + 1)] = element
    path.write_bytes(bytes(raw))
    return path


def _h5_chunked_kernel(path: Path, chunks: int, stream: bytes) -> Path:
    """A layer 'd' whose kernel has `chunks` chunks of 672 float32 (2,688 bytes), each stored as `stream`."""
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        group = h5.create_group("d")
        group.attrs["weight_names"] = np.array([b"kernel:0"])
        dataset = group.create_dataset("kernel:0", shape=(672 * chunks,), dtype="<f4", chunks=(672,),
                                       compression="gzip")
        for index in range(chunks):
            dataset.id.write_direct_chunk((672 * index,), stream)
    return path


def h5_chunks_inflating_past_their_shape(folder: Path) -> Path:
    """Six chunks declaring 2,688 bytes, each stored as ~1 MB of deflate that inflates to 1 GiB."""
    return _h5_chunked_kernel(folder / "chunk_bomb.h5", 6, _zlib_zeros(1024))


def h5_bit_kernel_inflating_past_its_shape(folder: Path) -> Path:
    """A small BiT `.h5` one of whose kernels is one deflated chunk stored in fewer bytes than it
    declares (so no size check sees it) that inflates to ~1000 times its declared size."""
    from checkpoints.synthetic import bit_arrays, write_bit_h5

    path = folder / "bit_chunk_bomb.h5"
    write_bit_h5(path, bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3, seed=0))
    with h5py.File(path, "a") as h5:
        datasets: list[h5py.Dataset] = []
        h5.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        largest = min(datasets, key=lambda d: abs(d.nbytes - (256 << 10)))  # inflating to ~256 MB
        name, shape, dtype = largest.name, largest.shape, largest.dtype
        stream = _zlib_zeros(largest.nbytes * 1000 >> 20)
        assert len(stream) < largest.nbytes
        del h5[name]
        h5.create_dataset(name, shape=shape, dtype=dtype, chunks=shape, compression="gzip")
        h5[name].id.write_direct_chunk((0,) * len(shape), stream)
    return path


SEEDS: dict[str, Callable[[Path], Path]] = {
    "pid_memo_dag": pid_memo_dag,
    "legacy_protocol_memo_dag": legacy_protocol_memo_dag,
    "tensor_size_memo_dag": tensor_size_memo_dag,
    "deflated_opcode_run": deflated_opcode_run,
    "memo_dag_of_tensors": memo_dag_of_tensors,
    "memo_dag_of_objects": memo_dag_of_objects,
    "byteorder_bzip2": byteorder_bzip2,
    "byteorder_lzma": byteorder_lzma,
    "byteorder_deflate": byteorder_deflate,
    "h5_vlen_names_one_heap_object": h5_vlen_names_one_heap_object,
    "h5_chunks_inflating_past_their_shape": h5_chunks_inflating_past_their_shape,
    "h5_bit_kernel_inflating_past_its_shape": h5_bit_kernel_inflating_past_its_shape,
}

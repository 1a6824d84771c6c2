"""Read an untrusted `.npz` (np.savez / np.savez_compressed) lazily and without pickle.

The zip central directory is parsed with `zipfile`; every `.npy` member's header
is parsed and checked (name, dtype, shape, byte count, compression ratio) before
a single array byte is read or allocated; every directory entry must agree with its
local header, and no two members' bytes may overlap (`zipcheck`). `allow_pickle` is never involved: an
object dtype is refused outright. Peak memory is one tensor: a stored (uncompressed)
member is mapped straight from its offset in the file, after its local header and
`.npy` header are checked again, and its CRC-32 is verified; a deflated member is
read through `zipfile`, which verifies the CRC itself.
"""

from __future__ import annotations

import io
import os
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
from numpy.lib import format as npy_format

from converters import memory
from converters.errors import InputError, UnsafeInputError
from converters.readers import zipcheck
from converters.tensors import Checkpoint, LazyTensor, exceeds, shape_text

# A deflate stream cannot expand more than ~1032:1; anything above is a crafted member.
MAX_MEMBER_RATIO = 1100
# The whole archive may not declare more than this many times its own size once
# it is past a small floor (real weights compress ~1.1:1; only zeros compress more).
MAX_ARCHIVE_RATIO = 100
ARCHIVE_RATIO_FLOOR = 256 * 2**20
MAX_TOTAL_BYTES = 64 * 2**30
MAX_HEADER_BYTES = 10_000
MAX_NDIM = 32
PLAIN_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_CHUNK = 2**20
_READ_CHUNK = 8 * 2**20  # bytes of a mapped member added to its CRC-32 at a time
# A zip local file header: signature, versions, flags, method, time, date, crc, sizes, name and
# extra lengths (zipfile.structFileHeader).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
# Version 3.0 only adds utf-8 field names, i.e. structured dtypes, which are refused anyway.
_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0,
                   (2, 0): npy_format.read_array_header_2_0}


@dataclass(frozen=True)
class _Member:
    name: str          # the zip member name, with `.npy`
    shape: tuple[int, ...]
    dtype: np.dtype    # as stored (byte order included)
    fortran: bool
    header_len: int
    nbytes: int
    crc: int = 0                   # CRC-32 of the member, from the central directory
    header_offset: int = 0         # where the member's local header begins
    data_start: int | None = None  # where a stored member's bytes begin in the file


def read_npz(path: str | Path) -> Checkpoint:
    """Open an `.npz` archive and describe its arrays without reading their data.

    Every member must be a `.npy` array with a plain numeric dtype whose header
    agrees with the member's size; names with path tricks, duplicate names,
    unsupported or suspicious compression (zip bombs) and truncated archives are
    refused with an `InputError` naming the archive and the member (an
    `UnsafeInputError` for object dtypes). Tensor names drop the `.npy` suffix;
    arrays load as C-ordered, native little-endian numpy arrays.
    """
    path = Path(path)
    with _open_zip(path) as archive:
        infos = archive.infolist()
        _check_directory(path, infos)
        spans = _member_spans(path, archive, infos)
        members = [_inspect_member(path, archive, info) for info in infos]
    members = [replace(m, data_start=spans[info.filename].data_start)
               if info.compress_type == zipfile.ZIP_STORED else m for m, info in zip(members, infos)]
    checked: set[str] = set()
    tensors = {m.name[: -len(".npy")]: _lazy(path, m, checked) for m in members}
    compressed = [m.name[: -len(".npy")] for m, info in zip(members, infos)
                  if info.compress_type != zipfile.ZIP_STORED]

    def verify_unread() -> None:  # a member is CRC-checked whole as it loads: load those never loaded
        for member in members:
            if member.name not in checked:
                _load(path, member)
                checked.add(member.name)

    return Checkpoint(path, "npz", tensors, {"compressed_members": compressed}, verify_unread)


def _member_spans(path: Path, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> dict[str, zipcheck.MemberSpan]:
    """Every member's span, its directory entry checked against its local header, none overlapping."""
    try:
        return zipcheck.member_spans(path, archive.fp.fileno(), infos, archive.start_dir)
    except OSError as error:
        raise InputError(path, f"cannot read ({_one_line(error)})") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as error:
        raise InputError(path, f"truncated or not a zip archive ({_one_line(error)})") from None


def _check_directory(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Names, duplicates, compression methods and declared sizes, from the directory alone."""
    if not infos:
        raise InputError(path, "empty .npz archive (no arrays)")
    seen: set[str] = set()
    for info in infos:
        _check_name(path, info)
        if info.filename in seen:
            raise UnsafeInputError(path, f"duplicate member name {info.filename!r}")
        seen.add(info.filename)
        _check_compression(path, info)
    total = sum(info.file_size for info in infos)
    archive_size = path.stat().st_size
    if total > MAX_TOTAL_BYTES:
        raise InputError(path, f"archive declares {total} bytes, over the {MAX_TOTAL_BYTES} limit")
    if total > ARCHIVE_RATIO_FLOOR and total > MAX_ARCHIVE_RATIO * archive_size:
        raise UnsafeInputError(path, f"zip bomb: {archive_size} bytes declare {total} bytes of arrays")


def _check_name(path: Path, info: zipfile.ZipInfo) -> None:
    name = info.orig_filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    tricky = ("\x00" in name or name.startswith(("/", "\\")) or ".." in parts
              or (len(name) > 1 and name[1] == ":"))
    if tricky:
        raise UnsafeInputError(path, f"member name with a path trick: {name!r}")
    if not name.endswith(".npy") or info.is_dir():
        raise InputError(path, f"member {name!r} is not a .npy array")


def _check_compression(path: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    if info.flag_bits & 0x1:
        raise InputError(path, f"member {name!r} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise InputError(path, f"member {name!r}: stored size {info.compress_size} "
                                   f"!= declared size {info.file_size}")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > MAX_MEMBER_RATIO * max(info.compress_size, 1) + 4096:
            raise UnsafeInputError(path, f"zip bomb: member {name!r} declares {info.file_size} "
                                         f"bytes from {info.compress_size} compressed")
    else:
        raise InputError(path, f"member {name!r} uses unsupported compression "
                               f"method {info.compress_type}")


def _inspect_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    try:
        with archive.open(info) as stream:
            return _parse_header(path, info, stream)
    except InputError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError, zlib.error) as error:  # zlib.error: a deflated member's stream is corrupt
        raise InputError(path, f"member {info.filename!r}: truncated or corrupt "
                               f"({_one_line(error)})") from None


def _parse_header(path: Path, info: zipfile.ZipInfo, stream) -> _Member:
    name = info.filename
    try:
        version = npy_format.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran, dtype = reader(stream, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, UnicodeDecodeError,
            OverflowError, KeyError, EOFError, tokenize.TokenError) as error:  # TokenError: numpy's 1.0 header filter
        raise InputError(path, f"member {name!r}: bad .npy header ({_one_line(error)})") from None
    _check_dtype(path, name, dtype)
    _check_shape(path, name, shape, dtype)
    header_len = stream.tell()
    nbytes = _prod(shape) * dtype.itemsize
    if header_len + nbytes != info.file_size:
        raise InputError(path, f"member {name!r}: header declares {dtype}{list(shape)} = "
                               f"{nbytes} bytes but the member holds "
                               f"{info.file_size - header_len}")
    return _Member(name, tuple(shape), dtype, bool(fortran), header_len, nbytes, info.CRC,
                   info.header_offset)


def _local_data_start(path: Path, file, name: str, orig_name: str, offset: int) -> int:
    """Where the bytes of stored member `name` begin, after checking its local header at `offset`.

    The header must have the local-header signature, the central directory's name
    (decoded the same way), stored method and no encryption, as `zipfile.ZipFile.open` requires.
    """
    raw = os.pread(file.fileno(), _LOCAL_HEADER.size, offset)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != _LOCAL_MAGIC:
        raise InputError(path, f"member {name!r}: truncated or corrupt (bad local header)")
    fields = _LOCAL_HEADER.unpack(raw)
    flags, method, name_len, extra_len = fields[3], fields[4], fields[10], fields[11]
    at = offset + _LOCAL_HEADER.size
    local_name = os.pread(file.fileno(), name_len, at)
    encoding = "utf-8" if flags & 0x800 else "cp437"
    if local_name.decode(encoding, errors="replace") != orig_name:
        raise InputError(path, f"member {name!r}: local header names {local_name!r}")
    if flags & 0x1 or method != zipfile.ZIP_STORED:
        raise InputError(path, f"member {name!r}: local header disagrees with the directory "
                               f"(method {method}, flags {flags:#x})")
    return at + name_len + extra_len


def _check_dtype(path: Path, name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise UnsafeInputError(path, f"member {name!r} has an object dtype ({dtype}); "
                                     "object arrays need pickle and are refused")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in PLAIN_KINDS:
        raise InputError(path, f"member {name!r} has unsupported dtype {dtype} "
                               "(only plain numeric dtypes are read)")


def _check_shape(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise InputError(path, f"member {name!r} has an invalid shape {shape_text(shape[:MAX_NDIM + 1])}")
    if exceeds(shape, dtype.itemsize, MAX_TOTAL_BYTES):
        raise InputError(path, f"member {name!r} declares an absurd shape {shape_text(shape)}")


def _prod(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _lazy(path: Path, member: _Member, checked: set[str]) -> LazyTensor:
    """A lazy tensor of `member`, whose name joins `checked` once a load has verified its CRC-32."""
    dtype = member.dtype.newbyteorder("<") if member.dtype.itemsize > 1 else member.dtype

    def load() -> np.ndarray:
        array = _load(path, member)
        checked.add(member.name)
        return array

    return LazyTensor(member.shape, dtype, load)


def _load(path: Path, member: _Member) -> np.ndarray:
    """Re-check the member's header, then read exactly its declared bytes and verify their CRC."""
    if member.data_start is not None:
        return _arrange(_load_stored(path, member), member)
    with _open_zip(path) as archive:
        try:
            info = archive.getinfo(member.name)
        except KeyError:
            raise InputError(path, f"member {member.name!r} disappeared") from None
        _check_compression(path, info)
        try:
            with archive.open(info) as stream:
                if _parse_header(path, info, stream) != member:
                    raise InputError(path, f"member {member.name!r} changed since it was opened")
                flat = _read_exact(path, member, stream)
        except InputError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError, zlib.error) as error:
            raise InputError(path, f"member {member.name!r}: truncated or corrupt "
                                   f"({_one_line(error)})") from None
    return _arrange(flat, member)


def _load_stored(path: Path, member: _Member) -> np.ndarray:
    """A stored member's array, mapped from the file: no directory parse, no copy.

    The local header and the `.npy` header are read and checked again (a file
    replaced or rewritten since `read_npz` fails here or at the CRC), the file
    must still hold every byte, then the bytes are mapped read-only and their
    CRC-32 computed a slice at a time. Mapping, not reading, keeps the pages the
    page cache already holds: no copy into fresh memory, which a virtual machine
    must also zero. The input must not change while it is converted (the command
    line checks that it did not); a file truncated while mapped ends the process
    with SIGBUS, as with any memory-mapped loader.
    """
    changed = InputError(path, f"member {member.name!r} changed since it was opened")
    try:
        with open(path, "rb", buffering=0) as file:
            fd, start = file.fileno(), member.data_start
            if _local_data_start(path, file, member.name, member.name, member.header_offset) != start:
                raise changed
            head = os.pread(fd, member.header_len, start)
            info = zipfile.ZipInfo(member.name)
            info.file_size, info.CRC = member.header_len + member.nbytes, member.crc
            info.header_offset = member.header_offset
            if len(head) != member.header_len or \
                    replace(_parse_header(path, info, io.BytesIO(head)), data_start=start) != member:
                raise changed
            data = start + member.header_len
            held = os.fstat(fd).st_size - data
            if held < member.nbytes:
                raise InputError(path, f"member {member.name!r}: truncated after {max(held, 0)} of "
                                       f"{member.nbytes} bytes")
            flat = memory.map_file(fd, data, member.nbytes)
    except OSError as error:
        raise InputError(path, f"member {member.name!r}: cannot read ({_one_line(error)})") from None
    crc = zlib.crc32(head)
    for i in range(0, member.nbytes, _READ_CHUNK):
        crc = zlib.crc32(flat[i:i + _READ_CHUNK], crc)
    if crc != member.crc:
        raise InputError(path, f"member {member.name!r}: bad CRC-32 (corrupt, or changed since it was opened)")
    return flat


def _read_exact(path: Path, member: _Member, stream) -> np.ndarray:
    flat = np.empty(member.nbytes, dtype=np.uint8)
    view = memoryview(flat)
    done = 0
    while done < member.nbytes:
        got = stream.readinto(view[done: done + _CHUNK])
        if not got:
            raise InputError(path, f"member {member.name!r}: truncated after {done} of "
                                   f"{member.nbytes} bytes")
        done += got
    stream.read(1)  # reach the end so zipfile verifies the CRC
    return flat


def _arrange(flat: np.ndarray, member: _Member) -> np.ndarray:
    array = flat.view(member.dtype)
    if member.fortran:
        array = array.reshape(member.shape[::-1]).transpose()
    else:
        array = array.reshape(member.shape)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else array.copy(order="C")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]

"""Zip members taken as data, not trusted: every central-directory entry is checked against its
local header (and data descriptor), no two members' bytes may overlap, and a stored member's
CRC-32 is computed as its bytes are read.

`zipfile` trusts the central directory: an entry may point at another member's local header or
at one forged inside another member's data, and a stored member mapped from the file has no CRC
check at all. `member_spans` refuses the first two; `RunningCrc` covers the third, a slice at a
time, as lazy tensors map their bytes.
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters import memory
from converters.errors import InputError

# A zip local file header: signature, versions, flags, method, time, date, crc, sizes, name and
# extra lengths (zipfile.structFileHeader).
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
LOCAL_MAGIC = b"PK\x03\x04"
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_HAS_DESCRIPTOR = 0x8  # general purpose flag: CRC and sizes follow the data
_ZIP64 = 0xFFFFFFFF
_CRC_SLICE = 8 * 2**20  # bytes of a mapped member added to its CRC-32 at a time


@dataclass(frozen=True)
class MemberSpan:
    """Where one member's bytes lie in the file, as its local header and the directory agree."""

    name: str
    data_start: int
    size: int   # bytes stored (compressed size)
    crc: int


def member_spans(path: Path, fd: int, infos: list[zipfile.ZipInfo], directory_start: int) -> dict[str, MemberSpan]:
    """Check every entry's local header against the directory, then that no two members overlap.

    The local header must carry the entry's name, method and flags, and its CRC-32 and sizes (or,
    with a data descriptor, the descriptor must). Each member's header, data and descriptor must
    lie before the central directory and apart from every other member's: an entry pointing into
    another member's data reads bytes the archive stored for something else. `InputError` names
    the file and the member.
    """
    spans, extents = {}, []
    for info in infos:
        span, end = _check_entry(path, fd, info)
        if end > directory_start:
            raise InputError(path, f"member {info.filename!r}: its bytes run into the central directory "
                                   "(truncated or corrupt)")
        spans[info.filename] = span
        extents.append((info.header_offset, end, info.filename))
    extents.sort()
    for (_, end, name), (start, _, other) in zip(extents, extents[1:]):
        if start < end:
            raise InputError(path, f"members {name!r} and {other!r} overlap (the directory points one "
                                   "entry into another member's bytes); corrupt or forged archive")
    return spans


def _check_entry(path: Path, fd: int, info: zipfile.ZipInfo) -> tuple[MemberSpan, int]:
    """The member's span and the end of its bytes (descriptor included), after the local header check."""
    name = info.filename
    raw = os.pread(fd, LOCAL_HEADER.size, info.header_offset)
    if len(raw) != LOCAL_HEADER.size or raw[:4] != LOCAL_MAGIC:
        raise InputError(path, f"member {name!r}: truncated or corrupt (bad local header)")
    _, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = LOCAL_HEADER.unpack(raw)
    at = info.header_offset + LOCAL_HEADER.size
    local_name = os.pread(fd, name_len, at)
    encoding = "utf-8" if flags & 0x800 else "cp437"
    if local_name.decode(encoding, errors="replace") != info.orig_filename:
        raise InputError(path, f"member {name!r}: local header names {local_name[:80]!r}")
    if (flags & 0x1) != (info.flag_bits & 0x1) or method != info.compress_type or \
            (flags & _HAS_DESCRIPTOR) != (info.flag_bits & _HAS_DESCRIPTOR):
        raise InputError(path, f"member {name!r}: local header disagrees with the directory "
                               f"(method {method}, flags {flags:#x})")
    start = at + name_len + extra_len
    end = start + info.compress_size
    if flags & _HAS_DESCRIPTOR:
        end += _check_descriptor(path, fd, info, end)
    elif crc != info.CRC or not _sizes_agree(fd, info, at + name_len, extra_len, csize, usize):
        raise InputError(path, f"member {name!r}: local header disagrees with the directory "
                               f"(CRC-32 or sizes)")
    if end > os.fstat(fd).st_size:
        raise InputError(path, f"member {name!r}: truncated or corrupt (its bytes run past the end of the file)")
    return MemberSpan(name, start, info.compress_size, info.CRC), end


def _sizes_agree(fd: int, info: zipfile.ZipInfo, extra_at: int, extra_len: int, csize: int, usize: int) -> bool:
    """The local header's sizes are the directory's (from its zip64 extra field where they overflow)."""
    if _ZIP64 in (csize, usize):
        extra = os.pread(fd, extra_len, extra_at)
        found = _zip64_sizes(extra)
        if found is None:
            return False
        usize, csize = found
    return (csize, usize) == (info.compress_size, info.file_size)


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    while len(extra) >= 4:
        kind, size = struct.unpack_from("<2H", extra)
        if kind == 0x0001 and size >= 16:
            return struct.unpack_from("<2Q", extra, 4)
        extra = extra[4 + size:]
    return None


def _check_descriptor(path: Path, fd: int, info: zipfile.ZipInfo, at: int) -> int:
    """The data descriptor after the member's data must repeat the directory's CRC-32 and sizes;
    returns its length (with or without its optional signature, 32- or 64-bit sizes)."""
    raw = os.pread(fd, 24, at)
    lead = 4 if raw[:4] == _DESCRIPTOR_MAGIC else 0
    for fmt in ("<L2L", "<L2Q"):
        length = lead + struct.calcsize(fmt)
        if len(raw) >= length and struct.unpack_from(fmt, raw, lead) == (info.CRC, info.compress_size, info.file_size):
            return length
    raise InputError(path, f"member {info.filename!r}: its data descriptor disagrees with the directory "
                           "(CRC-32 or sizes); corrupt or forged archive")


def crc32(data: np.ndarray, crc: int = 0) -> int:
    """`zlib.crc32` of a (mapped) byte array, a slice at a time."""
    for i in range(0, len(data), _CRC_SLICE):
        crc = zlib.crc32(data[i:i + _CRC_SLICE], crc)
    return crc


class RunningCrc:
    """The CRC-32 of one stored member, advanced in order as loads map a prefix of its bytes.

    Loads may read any part of a member, and several tensors may share one; the running CRC
    covers the member from its first byte up to the furthest byte any load has mapped, so no byte
    is added twice, and is checked when it reaches the member's last byte. `finish` covers what
    no load reached, at the end of a conversion.
    """

    def __init__(self, path: Path, span: MemberSpan) -> None:
        self.path, self.span = path, span
        self.done, self.crc = 0, 0
        self._lock = threading.Lock()

    def cover(self, mapped: np.ndarray) -> None:
        """Add the member's bytes `mapped` (its first `len(mapped)` bytes) past those already covered."""
        with self._lock:
            if len(mapped) <= self.done:
                return
            self.crc = crc32(mapped[self.done:], self.crc)
            self.done = len(mapped)
            if self.done == self.span.size and self.crc != self.span.crc:
                raise InputError(self.path, f"member {self.span.name!r}: bad CRC-32 (corrupt, or changed "
                                            "since it was opened)")

    def finish(self) -> None:
        """Cover (and so check) the rest of the member, mapped from the file."""
        if self.done < self.span.size:
            self.cover(map_member(self.path, self.span, self.span.size))
        elif self.span.size == 0 and self.span.crc != 0:
            raise InputError(self.path, f"member {self.span.name!r}: bad CRC-32 (corrupt)")


def map_member(path: Path, span: MemberSpan, nbytes: int) -> np.ndarray:
    """The first `nbytes` of a stored member, mapped read-only from the file, after checking that
    the file still holds them."""
    try:
        with open(path, "rb", buffering=0) as file:
            held = os.fstat(file.fileno()).st_size - span.data_start
            if held < nbytes:
                raise InputError(path, f"member {span.name!r}: truncated after {max(held, 0)} of {nbytes} bytes")
            return memory.map_file(file.fileno(), span.data_start, nbytes)
    except OSError as error:
        raise InputError(path, f"member {span.name!r}: cannot read ({error.strerror or error})") from None

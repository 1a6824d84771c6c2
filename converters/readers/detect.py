"""Pick the reader for a checkpoint from its bytes, never from its extension."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from converters.errors import InputError
from converters.readers.keras_h5 import read_keras_h5
from converters.readers.npz import read_npz
from converters.readers.source import check_regular
from converters.readers.torch_pickle import LEGACY_MAGIC, read_torch
from converters.tensors import Checkpoint

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 allows a user block before the superblock, at 0 or a power of two >= 512.
HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_EXPECTED = "expected .npz, Keras .h5 or PyTorch .pt/.pth"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open any supported checkpoint, choosing the reader from the file's contents.

    A zip of `.npy` members is an npz, a zip with `<name>/data.pkl` a PyTorch
    zip checkpoint, the HDF5 signature a Keras `.h5`, a pickle starting with
    torch's magic number a legacy PyTorch file. A missing, empty, unreadable or
    unrecognised file (including one that is already safetensors) raises an
    `InputError` with one line naming the file and what was found.
    """
    path = Path(path)
    head = _head(path)
    if head.startswith(ZIP_MAGICS):
        return _open_zip(path)
    if _is_hdf5(path, head):
        return read_keras_h5(path)
    if _is_torch_legacy(head):
        return read_torch(path)
    raise InputError(path, _unrecognised(path, head))


def _head(path: Path) -> bytes:
    check_regular(path)  # a FIFO would block the read below, a device never end it
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror or error})") from None
    if not head:
        raise InputError(path, "empty file")
    return head


def _open_zip(path: Path) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
        raise InputError(path, "truncated or not a zip archive") from None
    if any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return read_torch(path)
    if names and all(name.endswith(".npy") for name in names):
        return read_npz(path)
    shown = ", ".join(repr(n) for n in names[:3]) or "none"
    raise InputError(path, f"a zip archive that is neither an .npz nor a PyTorch checkpoint "
                           f"(members: {shown}{', ...' if len(names) > 3 else ''})")


def _is_hdf5(path: Path, head: bytes) -> bool:
    if head.startswith(HDF5_SIGNATURE):
        return True
    with open(path, "rb") as file:
        for offset in HDF5_OFFSETS[1:]:
            file.seek(offset)
            if file.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
    return False


def _is_torch_legacy(head: bytes) -> bool:
    """Protocol-2+ pickle of torch's magic number: PROTO n, LONG1 10, the 10-byte integer."""
    if head[:1] != b"\x80":
        return False
    body = head[11:] if head[2:3] == b"\x95" else head[2:]  # protocol 4+ opens with a FRAME
    if body[:2] != b"\x8a\x0a" or len(body) < 12:
        return False
    return int.from_bytes(body[2:12], "little", signed=True) == LEGACY_MAGIC


def _unrecognised(path: Path, head: bytes) -> str:
    if _is_safetensors(path, head):
        return "already safetensors; nothing to convert"
    if head.startswith(NPY_MAGIC):
        return "a single .npy array, not an .npz archive of named arrays"
    if head[:1] == b"\x80":
        return "a plain pickle without torch's header (not a PyTorch checkpoint)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (torch < 0.4 tar checkpoints are not supported)"
    return f"not a recognised checkpoint ({_EXPECTED}); first bytes: {head[:16]!r}"


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 10:
        return False
    header_len = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 8 + header_len <= path.stat().st_size

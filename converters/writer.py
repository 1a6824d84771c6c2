"""Streaming safetensors writer: one tensor in memory at a time.

The `safetensors` package can only save tensors that are all in memory at once,
so the file is written here by hand from the format's definition (an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of
8, then the raw little-endian tensor bytes in header order) and read back in the
tests with `safetensors.safe_open`, the format's own reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from converters.errors import InputError
from converters.tensors import LazyTensor

# numpy dtype → safetensors dtype tag. bfloat16 has no numpy dtype: it is
# produced from float32 by torch and written as raw 2-byte words.
_TAGS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
         np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_CHUNK = 16 << 20  # bytes cast and written at a time, beside the one loaded tensor


_FLOAT_OUT = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _tag_and_size(tensor: LazyTensor, dtype: str | None) -> tuple[str, int]:
    count = int(np.prod(tensor.shape, dtype=np.int64))
    if dtype is not None and np.issubdtype(tensor.dtype, np.floating):
        tag, itemsize = _FLOAT_OUT[dtype]
        return tag, count * itemsize
    return _TAGS[np.dtype(tensor.dtype)], count * np.dtype(tensor.dtype).itemsize


def _encoded_chunks(array: np.ndarray, dtype: str | None) -> Iterator[memoryview]:
    """The little-endian bytes of `array`, floats cast to `dtype`, in pieces of about `_CHUNK`.

    A C-ordered array is cut into flat slices; a strided view (a transposed
    kernel) into blocks of its leading axis. Only one block is copied, cast and
    held at a time, so writing adds at most a chunk to the loaded tensor.
    """
    if array.size == 0:
        return
    if array.flags.c_contiguous or array.ndim < 2:
        flat = np.ascontiguousarray(array).reshape(-1)
        step = max(1, _CHUNK // max(flat.itemsize, 1))
        blocks = (flat[i:i + step] for i in range(0, flat.size, step))
    else:
        row = max(1, array[0].nbytes)
        step = max(1, _CHUNK // row)
        blocks = (array[i:i + step] for i in range(0, array.shape[0], step))
    for block in blocks:
        yield _encode(block, dtype)


def _encode(array: np.ndarray, dtype: str | None) -> memoryview:
    """The little-endian bytes of `array`, floats cast to `dtype` (float32/bfloat16/float16)."""
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
        if dtype == "bfloat16":  # round-to-nearest-even, as torch does
            import torch

            words = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16)
            return memoryview(words.view(torch.int16).numpy()).cast("B")
        array = array.astype(dtype, copy=False)  # float32 → float32 is not copied
    array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    return memoryview(array).cast("B")


def header_for(tensors: Mapping[str, LazyTensor], dtype: str | None,
               metadata: Mapping[str, str]) -> bytes:
    """The padded JSON header for `tensors` written in the given order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if not name or name == "__metadata__":  # the header's own key; a loader would misread it
            raise InputError(None, f"refusing tensor name {name!r} in the output")
        tag, size = _tag_and_size(tensor, dtype)
        entries[name] = {"dtype": tag, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: Path, tensors: Mapping[str, LazyTensor], *, dtype: str | None = "float32",
                      metadata: Mapping[str, str] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None,
                      allow_nonfinite: bool = False) -> str:
    """Write `tensors` to `path` as safetensors, loading one tensor at a time.

    Floating tensors are cast to `dtype` (None keeps each tensor's own dtype);
    `metadata` goes into `__metadata__` (string values only, as the format
    requires). `on_tensor(name, nbytes)` is called after each tensor, for
    progress. The file is flushed and fsynced; returns its sha256 hex digest.
    Non-finite values are refused, naming the tensor, unless `allow_nonfinite`.
    """
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(None, f"unsupported --dtype {dtype!r} (choose from {', '.join(OUTPUT_DTYPES)})")
    header = header_for(tensors, dtype, metadata or {})
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(header)), header):
            f.write(chunk)
            digest.update(chunk)
        for name, tensor in tensors.items():
            array = tensor.load()
            if not allow_nonfinite:
                _check_finite(name, array)
            written = 0
            for piece in _encoded_chunks(array, dtype):
                f.write(piece)
                digest.update(piece)
                written += len(piece)
            if on_tensor:
                on_tensor(name, written)
            del array
        f.flush()
        os.fsync(f.fileno())
    _remember_digest(path, digest.hexdigest())
    return digest.hexdigest()


def _check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN/Inf, checked a block at a time (a whole-tensor mask would cost a quarter of it)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    flat = array.reshape(-1) if array.flags.c_contiguous else array
    step = max(1, _CHUNK // max(flat[:1].nbytes, 1))
    if all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.shape[0], step)):
        return
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + step]))) for i in range(0, flat.shape[0], step))
    raise InputError(None, f"{name}: {bad} non-finite values (NaN or Inf); "
                           "pass --allow-nonfinite to convert anyway")


# Digests of the files this process has just written, so SHA256SUMS does not read
# them back: path → (inode, size, mtime_ns, sha256). A file changed since no longer matches.
_WRITTEN: dict[str, tuple[int, int, int, str]] = {}


def _remember_digest(path: Path, digest: str) -> None:
    st = os.stat(path)
    _WRITTEN[os.path.abspath(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (or remembered, if this process just wrote it)."""
    known = _WRITTEN.get(os.path.abspath(path))
    if known is not None:
        st = os.stat(path)
        if known[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
            return known[3]
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_sha256sums(folder: Path, names: Iterable[str] | None = None) -> Path:
    """Write `SHA256SUMS` (sha256sum format, sorted) for every regular file in `folder`."""
    names = sorted(names if names is not None else
                   (p.name for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS"))
    lines = [f"{sha256_file(folder / n)}  {n}\n" for n in names]
    target = folder / "SHA256SUMS"
    target.write_text("".join(lines))
    return target


def check_sha256sums(folder: Path) -> list[str]:
    """Files in `folder` whose checksum does not match SHA256SUMS, or that are missing or unlisted."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return ["SHA256SUMS"]
    listed = dict(reversed(line.split("  ", 1)) for line in sums.read_text().splitlines() if line)
    bad = [n for n, h in listed.items() if not (folder / n).is_file() or sha256_file(folder / n) != h]
    unlisted = [p.name for p in folder.iterdir() if p.is_file() and p.name not in listed and p.name != "SHA256SUMS"]
    return sorted(bad + unlisted)

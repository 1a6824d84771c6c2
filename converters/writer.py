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
import queue
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from converters import memory
from converters.errors import InputError
from converters.tensors import LazyTensor

# numpy dtype → safetensors dtype tag. bfloat16 has no numpy dtype: it is
# produced from float32 with integer arithmetic (`to_bfloat16`) and written as raw 2-byte words.
_TAGS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
         np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_CHUNK = 16 << 20  # bytes cast and written at a time, beside the one loaded tensor
_TILE = 16         # source rows per transposed tile: one 64-byte cache line of float32 per output row
_PENDING = 2       # encoded pieces waiting for the write-and-hash thread (memory: 2 x _CHUNK)
_BF16_NAN = 0x7FC0  # the quiet NaN torch's scalar float → bfloat16 conversion produces


_FLOAT_OUT = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _tag_and_size(tensor: LazyTensor, dtype: str | None) -> tuple[str, int]:
    count = int(np.prod(tensor.shape, dtype=np.int64))
    if dtype is not None and np.issubdtype(tensor.dtype, np.floating):
        tag, itemsize = _FLOAT_OUT[dtype]
        return tag, count * itemsize
    return _TAGS[np.dtype(tensor.dtype)], count * np.dtype(tensor.dtype).itemsize


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even exactly as torch does.

    The low 16 bits are dropped after adding 0x7FFF plus the lowest kept bit, so a
    tie rounds to the even neighbour and overflow carries into the exponent (large
    values round to inf, as in torch). NaN becomes the quiet NaN 0x7FC0.
    """
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))
    words = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        words[nan.reshape(words.shape)] = _BF16_NAN
    return words


def _encoded_chunks(array: np.ndarray, dtype: str | None) -> Iterator[memoryview]:
    """The little-endian bytes of `array`, floats cast to `dtype`, in pieces of about `_CHUNK`.

    A C-ordered array is cut into flat slices; a transposed view (a converted
    kernel) into blocks of its leading axis, each copied in cache-sized tiles
    (`_contiguous_rows`). Only one block is copied, cast and held at a time, so
    writing adds at most a chunk to the loaded tensor.
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
        blocks = (_contiguous_rows(array, i, i + step) for i in range(0, array.shape[0], step))
    for block in blocks:
        yield _encode(block, dtype)


def _contiguous_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """`array[start:stop]` as a C-ordered copy, tiled when `array` is a transposed view.

    A plain copy of a transposed view reads one element per cache line. For the
    two layouts converters produce, the rows are gathered tile by tile instead:
    a 2-D transpose `(C, R) ← (R, C)` reads `_TILE` source rows at a time, and a
    conv kernel `(O, I, H, W) ← (H, W, I, O)` `_TILE` input channels at a time
    (about twice numpy's speed on both). Any other view gets numpy's own copy.
    """
    block = array[start:stop]
    if array.ndim == 2 and array.T.flags.c_contiguous:
        return _transpose_2d(array.T[:, start:stop])
    if array.ndim == 4 and array.transpose(2, 3, 1, 0).flags.c_contiguous:
        source = array.transpose(2, 3, 1, 0)  # (H, W, I, O), C-ordered
        h, w, i, _ = source.shape
        if h * w == 1:  # a 1x1 kernel is a 2-D transpose
            return _transpose_2d(source.reshape(i, -1)[:, start:stop]).reshape(block.shape)
        out = memory.empty(block.shape, block.dtype)  # O, I, H, W
        for r in range(0, i, _TILE):  # runs of _TILE*H*W output values per source row read
            out[:, r:r + _TILE] = source[:, :, r:r + _TILE, start:stop].transpose(3, 2, 0, 1)
        return out
    return np.ascontiguousarray(block)


def _transpose_2d(source: np.ndarray) -> np.ndarray:
    """`source.T` as a C-ordered copy, `_TILE` source rows at a time (rows of `source` may be strided)."""
    out = memory.empty(source.shape[::-1], source.dtype)
    for r in range(0, source.shape[0], _TILE):
        out[:, r:r + _TILE] = source[r:r + _TILE].T
    return out


def _encode(array: np.ndarray, dtype: str | None) -> memoryview:
    """The little-endian bytes of `array`, floats cast to `dtype` (float32/bfloat16/float16)."""
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
        if dtype == "bfloat16":
            return memoryview(to_bfloat16(array)).cast("B")
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


@dataclass(frozen=True)
class Later:
    """A metadata value still being computed (the source's sha256, hashed on another thread),
    whose length is known, so the header's size and every tensor's offset are fixed before it is.
    """

    future: Future
    length: int

    def placeholder(self) -> str:
        return "0" * self.length

    def value(self) -> str:
        text = self.future.result()
        if len(text) != self.length:
            raise InputError(None, f"metadata value {text!r} is not {self.length} characters")
        return text


def write_safetensors(path: Path, tensors: Mapping[str, LazyTensor], *, dtype: str | None = "float32",
                      metadata: Mapping[str, str | Later] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None,
                      allow_nonfinite: bool = False) -> str:
    """Write `tensors` to `path` as safetensors, loading one tensor at a time.

    Floating tensors are cast to `dtype` (None keeps each tensor's own dtype);
    `metadata` goes into `__metadata__` (string values only, as the format
    requires; a `Later` value is filled in when it is ready, while the tensors
    are already being written). `on_tensor(name, nbytes)` is called after each
    tensor, for progress. The file is fsynced; returns its sha256 hex digest.
    Non-finite values are refused, naming the tensor, unless `allow_nonfinite`.

    Reading and reordering run here while a second thread writes and hashes
    (`_Sink`); peak memory stays about the largest tensor plus a few pieces.
    """
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(None, f"unsupported --dtype {dtype!r} (choose from {', '.join(OUTPUT_DTYPES)})")
    metadata = dict(metadata or {})
    late = {k: v for k, v in metadata.items() if isinstance(v, Later)}
    draft = header_for(tensors, dtype, {k: v.placeholder() if k in late else v for k, v in metadata.items()})

    def final_header() -> bytes:
        header = header_for(tensors, dtype, {k: v.value() if k in late else v for k, v in metadata.items()})
        if len(header) != len(draft):
            raise InputError(None, "the header changed size once its metadata was complete")
        return header

    ready = (lambda: all(v.future.done() for v in late.values())) if late else (lambda: True)
    budget = max((t.nbytes for t in tensors.values()), default=0)
    with open(path, "w+b", buffering=0) as f, _Sink(f.fileno(), 8 + len(draft), final_header, ready) as sink:
        held = 0  # bytes of earlier tensors that queued pieces may still point into
        for name, tensor in tensors.items():
            if held + tensor.nbytes > budget:
                sink.drain()  # never hold more than the largest tensor
                held = 0
            array = tensor.load()
            if not allow_nonfinite:
                _check_finite(name, array)
            written = sink.put_all(_encoded_chunks(array, dtype))
            held += array.nbytes if array.flags.c_contiguous else 0  # else pieces are copies
            if on_tensor:
                on_tensor(name, written)
            del array
    _remember_digest(path, sink.hexdigest)
    return sink.hexdigest


class _Sink:
    """Writes pieces at their offsets and hashes the file in order on a second thread, while
    the caller reads and reorders the next ones (pwrite and sha256 release the GIL).

    At most `_PENDING` pieces wait. Data may be written before the header is final
    (`ready()` false): the hash then lags, and catches up by reading the written bytes
    back once `header()` can be built. On exit the header is written, the file fsynced
    and `hexdigest` set; an error on the thread is raised in the caller at its next call.
    """

    def __init__(self, fd: int, data_start: int, header: Callable[[], bytes], ready: Callable[[], bool]) -> None:
        self._fd, self._header, self._ready = fd, header, ready
        self._data_start = self._end = data_start
        self._hashed: int | None = None  # file offset the digest covers; None before the header
        self._digest = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(_PENDING)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
        self.hexdigest = ""

    def __enter__(self) -> "_Sink":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc[0] is not None:
            return
        self._raise()
        if self._hashed is None:
            self._start_hash()  # waits for the late metadata
        self._catch_up(self._end)
        os.fsync(self._fd)
        self.hexdigest = self._digest.hexdigest()

    def _run(self) -> None:
        while True:
            piece = self._queue.get()
            if piece is None:
                break
            if self._error is None:
                try:
                    self._write(piece)
                except BaseException as error:  # noqa: BLE001  handed to the caller
                    self._error = error
            piece = None  # a piece may be a view of a whole tensor: do not keep it while waiting
            self._queue.task_done()
        self._queue.task_done()

    def _write(self, piece: memoryview | bytes) -> None:
        start = self._end
        _pwrite_all(self._fd, piece, start)
        self._end += len(piece)
        if self._hashed is None and self._ready():
            self._start_hash()
        if self._hashed is not None:
            self._catch_up(start)
            self._digest.update(piece)
            self._hashed = self._end

    def _start_hash(self) -> None:
        header = self._header()
        prefix = struct.pack("<Q", len(header)) + header
        if len(prefix) != self._data_start:
            raise InputError(None, "the header changed size once its metadata was complete")
        _pwrite_all(self._fd, prefix, 0)
        self._digest.update(prefix)
        self._hashed = self._data_start

    def _catch_up(self, stop: int) -> None:
        """Hash the bytes written before the header was final, read back from the file."""
        buffer = None
        while self._hashed < stop:
            buffer = buffer or bytearray(min(_CHUNK, stop - self._hashed))
            view = memoryview(buffer)[: min(len(buffer), stop - self._hashed)]
            got = os.preadv(self._fd, [view], self._hashed)
            if not got:
                raise OSError(f"short read at {self._hashed} while hashing the written file")
            self._digest.update(view[:got])
            self._hashed += got

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put_all(self, pieces: Iterable[bytes | memoryview]) -> int:
        """Queue `pieces` in order; returns their total bytes (no reference to them is kept)."""
        total = 0
        for piece in pieces:
            self._raise()
            self._queue.put(piece)
            total += len(piece)
        return total

    def drain(self) -> None:
        """Wait until every piece given so far is written."""
        self._queue.join()
        self._raise()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN/Inf, checked a block at a time (a whole-tensor mask would cost a quarter of it)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    # A finite sum proves every value finite (any NaN or Inf makes it NaN or Inf), with no
    # temporary mask and at ~3x the speed; only a non-finite sum (or an overflowing one) is
    # looked at value by value.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
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

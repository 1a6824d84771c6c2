"""Streaming safetensors writer: one tensor in memory at a time.

The `safetensors` package can only save tensors that are all in memory at once,
so the file is written here by hand from the format's definition (an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of
8, then the raw little-endian tensor bytes in header order) and read back in the
tests with `safetensors.safe_open`, the format's own reader.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from converters import memory
from converters.digest import remember, sha256_file
from converters.errors import InputError
from converters.tensors import SAFETENSORS_TAGS, LazyTensor, described

# numpy dtype → safetensors dtype tag. bfloat16 has no numpy dtype: it is
# produced from float32 with integer arithmetic (`to_bfloat16`) and written as raw 2-byte words.
_TAGS = SAFETENSORS_TAGS
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")
_CHUNK = 16 << 20  # bytes cast and written at a time, beside the one loaded tensor
_TILE = 16         # source rows per transposed tile: one 64-byte cache line of float32 per output row
_BLOCK = 8 << 20   # bytes of the file assembled in memory and written at once
_ALIGN = 4096      # file offsets, lengths and addresses of direct writes are multiples of this
_PENDING = 2       # full blocks waiting for each of the write and hash threads
_WRITE = 512 << 10  # bytes per buffered pwrite: 2 MiB and larger calls measured 5-10x slower here
_DIRECT = hasattr(os, "O_DIRECT")  # write around the page cache where the file system allows it
DIRECT_IO_ENV = "PARITYPORT_DIRECT_IO"  # "0": always write through the page cache (network file systems)
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
    work = memory.empty(bits.shape, np.uint32, pool="cast")  # recycled: fresh memory faults
    np.right_shift(bits, 16, out=work)
    np.bitwise_and(work, 1, out=work)
    work += np.uint32(0x7FFF)
    work += bits
    work >>= 16
    words = memory.empty(bits.shape, np.uint16, pool="cast")
    np.copyto(words, work, casting="unsafe")
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=work)  # magnitudes: above +inf's is NaN
    if work.size and work.max() > 0x7F800000:
        words[work > 0x7F800000] = _BF16_NAN
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
        out = memory.empty(block.shape, block.dtype, pool="piece")  # O, I, H, W
        for r in range(0, i, _TILE):  # runs of _TILE*H*W output values per source row read
            out[:, r:r + _TILE] = source[:, :, r:r + _TILE, start:stop].transpose(3, 2, 0, 1)
        return out
    return np.ascontiguousarray(block)


def _transpose_2d(source: np.ndarray) -> np.ndarray:
    """`source.T` as a C-ordered copy, `_TILE` source rows at a time (rows of `source` may be strided)."""
    out = memory.empty(source.shape[::-1], source.dtype, pool="piece")
    for r in range(0, source.shape[0], _TILE):
        out[:, r:r + _TILE] = source[r:r + _TILE].T
    return out


def _encode(array: np.ndarray, dtype: str | None) -> memoryview:
    """The little-endian bytes of `array`, floats cast to `dtype` (float32/bfloat16/float16)."""
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
        if dtype == "bfloat16":
            return memoryview(to_bfloat16(array)).cast("B")
        if array.dtype != np.dtype(dtype):
            cast = memory.empty(array.shape, dtype, pool="cast")  # recycled: fresh memory faults
            with np.errstate(over="ignore"):  # Inf only where --allow-nonfinite let it through (_check_values)
                np.copyto(cast, array, casting="same_kind")
            array = cast
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

    Reading and reordering run here while other threads write and hash (`_Sink`);
    peak memory stays about the largest tensor plus a few pieces and blocks.
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
    try:
        with _Sink(path, struct.pack("<Q", len(draft)) + draft, final_header, ready) as sink:
            for name, tensor in tensors.items():
                array = tensor.load()
                if not allow_nonfinite:
                    _check_values(described(name, tensor), array, dtype)
                written = sink.put_all(_encoded_chunks(array, dtype))
                if on_tensor:
                    on_tensor(name, written)
                del array
    finally:
        memory.release()  # the recycled read, piece and block buffers
    remember(path, sink.hexdigest)
    return sink.hexdigest


class _Sink:
    """Assembles the file in aligned blocks, which one thread writes and another then hashes while
    the caller reads and reorders the next pieces (pwrite, sha256 and numpy copies release the GIL).

    Pieces are copied into the current block as they come, so nothing the caller
    loaded is referenced once `put_all` returns; at most `_PENDING` full blocks wait
    for each thread.
    Blocks are written with O_DIRECT where the file system allows it: the device
    reads them from memory without the kernel copying them into the page cache,
    and the final fsync has little left to flush. The file starts with `prefix`
    (length and header, whose late metadata may still be placeholders). Until
    `ready()` the header is not final and hashing waits; it then catches up by
    reading the written bytes back. On exit the final header is written over the
    draft, the file truncated to its length (a direct write's tail is padded),
    fsynced and closed, and `hexdigest` set. An error on the thread is raised in
    the caller at its next call.
    """

    def __init__(self, path: Path, prefix: bytes, header: Callable[[], bytes], ready: Callable[[], bool]) -> None:
        self._fd, self._direct = _open_for_writing(path)
        self._header, self._ready = header, ready
        self._prefix_len = len(prefix)
        self._head_len = _round_up(len(prefix), _ALIGN)  # rewritten once the header is final
        self._head = bytearray()  # the file's first `_head_len` bytes as first written
        self._pos = self._block_start = 0  # bytes placed so far; file offset of the current block
        self._block: np.ndarray | None = None
        self._hashed: int | None = None  # file offset the digest covers; None before the header
        self._final_prefix = b""
        self._prefix = prefix
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._to_write: queue.Queue = queue.Queue(_PENDING)
        to_hash: queue.Queue = queue.Queue(_PENDING)
        self._threads = [threading.Thread(target=self._run, args=(self._to_write, self._write, to_hash),
                                          name="safetensors-write", daemon=True),
                         threading.Thread(target=self._run, args=(to_hash, self._hash, None),
                                          name="safetensors-hash", daemon=True)]
        self.hexdigest = ""

    def __enter__(self) -> "_Sink":
        for thread in self._threads:
            thread.start()
        self._place(memoryview(self._prefix))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            try:
                if exc[0] is None and self._pos > self._block_start:
                    self._dispatch()  # the last, partial block
            finally:  # the threads end however this does
                self._to_write.put(None)
                for thread in self._threads:
                    thread.join()
            if exc[0] is not None:
                return
            self._raise()
            if self._hashed is None:
                self._start_hash()  # waits for the late metadata
            self._catch_up(self._pos)
            self._write_head()
            os.ftruncate(self._fd, self._pos)
            os.fsync(self._fd)
            self.hexdigest = self._digest.hexdigest()
        finally:
            os.close(self._fd)

    def put_all(self, pieces: Iterable[bytes | memoryview]) -> int:
        """Copy `pieces` into the file's blocks in order; returns their total bytes."""
        total = 0
        for piece in pieces:
            self._raise()
            view = memoryview(piece).cast("B")
            self._place(view)
            total += len(view)
        return total

    def _place(self, view: memoryview) -> None:
        source = np.frombuffer(view, np.uint8)
        while source.size:
            if self._block is None:
                self._block, self._block_start = memory.empty((_BLOCK,), pool="block"), self._pos
            fill = self._pos - self._block_start
            n = min(_BLOCK - fill, source.size)
            self._block[fill:fill + n] = source[:n]
            self._pos += n
            source = source[n:]
            if fill + n == _BLOCK:
                self._dispatch()

    def _dispatch(self) -> None:
        block, start, length = self._block, self._block_start, self._pos - self._block_start
        if start < self._head_len:
            self._head += block[: min(length, self._head_len - start)].tobytes()
        self._block, self._block_start = None, self._pos
        self._raise()
        self._to_write.put((block, start, length))

    def _run(self, inbox: queue.Queue, work: Callable[..., None], outbox: queue.Queue | None) -> None:
        """One stage (write, then hash): blocks in order from `inbox`, on to `outbox`. After an
        error it only drains, so that no queue stays full."""
        while True:
            item = inbox.get()
            if item is None:
                break
            if self._error is None:
                try:
                    work(*item)
                except BaseException as error:  # noqa: BLE001  handed to the caller
                    self._error = error
            if outbox is not None and self._error is None:
                outbox.put(item)
            item = None  # do not keep the block busy while waiting
        if outbox is not None:
            outbox.put(None)

    def _write(self, block: np.ndarray, start: int, length: int) -> None:
        if self._direct:
            try:  # the tail is padded to whole sectors; the file is truncated at the end
                _pwrite_all(self._fd, block[:_round_up(length, _ALIGN)], start, True)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system took O_DIRECT at open but not for writes
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        if not self._direct:
            _pwrite_all(self._fd, block[:length], start)

    def _hash(self, block: np.ndarray, start: int, length: int) -> None:
        """Hash a written block, after any bytes still unhashed before it (once the header is final)."""
        if self._hashed is None and self._ready():
            self._start_hash()
        if self._hashed is not None:
            self._catch_up(start)
            self._digest.update(block[self._hashed - start: length])
            self._hashed = start + length

    def _start_hash(self) -> None:
        header = self._header()
        prefix = struct.pack("<Q", len(header)) + header
        if len(prefix) != self._prefix_len:
            raise InputError(None, "the header changed size once its metadata was complete")
        self._digest.update(prefix)
        self._hashed = self._prefix_len
        self._final_prefix = prefix

    def _catch_up(self, stop: int) -> None:
        """Hash the bytes written before the header was final, read back from the file in
        whole aligned sectors (as direct reads require), the next piece read while one is hashed."""
        if self._hashed >= stop:
            return
        buffers = [memory.empty((_BLOCK,), pool="read-back") for _ in range(2)]
        start = self._hashed - self._hashed % _ALIGN
        end = _round_up(stop, _ALIGN)

        def read(i: int, offset: int) -> memoryview:
            view = memoryview(buffers[i])[: min(_BLOCK, end - offset)]
            got = os.preadv(self._fd, [view], offset)
            return view[:got]

        with ThreadPoolExecutor(1, thread_name_prefix="safetensors-read-back") as reader:
            pending, i = reader.submit(read, 0, start), 0
            while self._hashed < stop:
                data = pending.result()
                if len(data) <= self._hashed - start:
                    raise OSError(f"short read at {self._hashed} while hashing the written file")
                following = start + len(data)
                if following < end:
                    pending, i = reader.submit(read, 1 - i, following), 1 - i
                upto = min(following, stop)
                self._digest.update(data[self._hashed - start: upto - start])
                self._hashed, start = upto, following

    def _write_head(self) -> None:
        """Write the final header over the draft (with the data that shares its sectors)."""
        head = memory.aligned(_round_up(len(self._head), _ALIGN))
        head[: len(self._head)] = np.frombuffer(self._head, np.uint8)
        head[: self._prefix_len] = np.frombuffer(self._final_prefix, np.uint8)
        _pwrite_all(self._fd, head if self._direct else head[: len(self._head)], 0, self._direct)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _open_for_writing(path: Path) -> tuple[int, bool]:
    """A new file descriptor for `path` (created or truncated), and whether it writes directly."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _DIRECT and os.environ.get(DIRECT_IO_ENV, "1") != "0":
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as error:
            if error.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT
                raise
    return os.open(path, flags, 0o666), False


def _pwrite_all(fd: int, data: np.ndarray | bytes | memoryview, offset: int, direct: bool = False) -> None:
    """Write all of `data` at `offset`: a direct write in one call (whole sectors), a buffered
    one in calls of `_WRITE` bytes."""
    view = memoryview(data).cast("B")
    step = len(view) if direct else _WRITE
    while view:
        done = os.pwrite(fd, view[:step], offset)
        view, offset = view[done:], offset + done


def _check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN/Inf, checked a block at a time (a whole-tensor mask would cost a quarter of it)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    if array.dtype.itemsize == 2 and array.flags.c_contiguous:
        # float16 sums slowly (no vector loop); its bits are tested instead, a cache-sized slice
        # at a time: a value is NaN or Inf exactly when its exponent bits are all ones.
        bits = array.reshape(-1).view(np.uint16)
        step = 1 << 19
        if all(np.max(bits[i:i + step] & 0x7FFF) < 0x7C00 for i in range(0, bits.size, step)):
            return
    else:
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


# The smallest magnitude each half type rounds to Inf: halfway between its largest finite value
# and the next power of two, which round-to-nearest-even sends up (float16 65504 -> 65520).
_ROUNDS_TO_INF = {"float16": 65520.0, "bfloat16": float(2.0 ** 127 * (2 - 2.0 ** -8))}


_SLICE = 1 << 16  # elements whose max and min are taken in turn while they sit in the cache


def _check_values(name: str, array: np.ndarray, dtype: str | None) -> None:
    """Refuse NaN/Inf (`_check_finite`) and, for a half `dtype`, finite values its cast would turn into
    Inf. For the half types one pass of max and min a cache-sized slice at a time does both: a NaN
    makes the max NaN and an Inf passes the limit (measured on 256 MB: 25 ms, against 54 for the
    finite check's sum followed by a whole-array max and min)."""
    limit = _ROUNDS_TO_INF.get(dtype or "")
    if limit is None or not np.issubdtype(array.dtype, np.floating) or array.dtype.itemsize <= 2 or not array.size:
        return _check_finite(name, array)  # 16-bit floats fit both half types' ranges
    # A view in another order (a transposed kernel) is read whole, in memory order, by numpy.
    parts = ((array.reshape(-1)[i:i + _SLICE] for i in range(0, array.size, _SLICE))
             if array.flags.c_contiguous else [array])
    largest = max(max(float(part.max()), -float(part.min())) for part in parts)
    if largest < limit:  # False for NaN
        return
    _check_finite(name, array)
    count = int(np.count_nonzero(np.abs(array) >= limit))
    raise InputError(None, f"{name}: {count} values beyond {dtype}'s range (largest magnitude {largest:g}) "
                           f"would be written as Inf; convert to float32, or pass --allow-nonfinite")


def write_sha256sums(folder: Path, names: Iterable[str] | None = None) -> Path:
    """Write `SHA256SUMS` (sha256sum format, sorted) for every regular file in `folder`."""
    names = sorted(names if names is not None else
                   (p.name for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS"))
    lines = [f"{sha256_file(folder / n)}  {n}\n" for n in names]
    target = folder / "SHA256SUMS"
    target.write_text("".join(lines))
    return target


def listed_sha256sums(folder: Path) -> dict[str, str]:
    """`{file name: sha256}` as `folder`'s SHA256SUMS lists them; empty when it has none."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return {}
    return dict(reversed(line.split("  ", 1)) for line in sums.read_text().splitlines() if line)


def check_sha256sums(folder: Path) -> list[str]:
    """Files in `folder` whose checksum does not match SHA256SUMS, or that are missing or unlisted."""
    if not (folder / "SHA256SUMS").is_file():
        return ["SHA256SUMS"]
    listed = listed_sha256sums(folder)
    bad = [n for n, h in listed.items() if not (folder / n).is_file() or sha256_file(folder / n) != h]
    unlisted = [p.name for p in folder.iterdir() if p.is_file() and p.name not in listed and p.name != "SHA256SUMS"]
    return sorted(bad + unlisted)

"""Large scratch buffers backed by transparent huge pages, recycled once their arrays are gone;
read-only mappings of file ranges.

Each first touch of fresh memory costs a page fault per 4 KiB page, and in a
virtual machine a fault is expensive: reading a 2 GB checkpoint into fresh numpy
buffers measured ~0.4-2 GB/s, against ~9 GB/s into memory advised to use 2 MiB
pages (`madvise(MADV_HUGEPAGE)`, honoured when transparent huge pages are in
"madvise" or "always" mode). Even huge pages are zeroed by the kernel when first
touched, and a conversion asks for as many bytes of scratch as the file holds
(every tensor is read into one buffer, every reordered piece copied into
another): a mapping whose arrays are all gone is therefore kept and handed out
again instead of being unmapped. Buffers are private anonymous mappings.
"""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np

HUGE_PAGE = 2 << 20  # below this a mapping gains nothing; numpy's allocator serves it
_lock = threading.Lock()
_pools: dict[str, list[mmap.mmap]] = {}  # per use, every mapping made and still mapped, in use or idle


def empty(shape: tuple[int, ...], dtype: np.dtype | type = np.uint8, pool: str = "") -> np.ndarray:
    """An uninitialised C-ordered array; one of `HUGE_PAGE` bytes or more lives in a mapping of its
    own, starting on a huge-page boundary (the kernel backs only whole aligned 2 MiB ranges with huge
    pages; the head and tail of an unaligned buffer would fault 4 KiB at a time).

    The mapping is the smallest idle one of `pool` that is large enough. When there is none,
    the pool's idle mappings are unmapped before a new one is made, so what is kept never adds
    to the peak. Callers name a pool per use (tensors read, pieces copied) so that a small
    piece never takes, and keeps busy, a mapping the size of a tensor.
    """
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for dim in shape:
        nbytes *= int(dim)
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # whole huge pages, plus room to align
    with _lock:
        mappings = _pools.setdefault(pool, [])
        buffer = _reuse(mappings, size)
        if buffer is None:
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buffer.madvise(mmap.MADV_HUGEPAGE)
            mappings.append(buffer)
    start = -np.frombuffer(buffer, np.uint8, count=1).ctypes.data % HUGE_PAGE
    return np.frombuffer(buffer, np.uint8, count=nbytes, offset=start).view(dtype).reshape(shape)


def aligned(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer starting on a page boundary (what direct I/O needs), of any size."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                         np.uint8, count=nbytes)


def _reuse(mappings: list[mmap.mmap], size: int) -> mmap.mmap | None:
    """The smallest idle mapping of at least `size` bytes; when there is none, the idle ones are
    unmapped (beside a new one they would only raise the peak) and None is returned.

    A mapping is idle when no array views it any more: every array made from it holds a
    reference, so only the list's own and getrefcount's argument remain.
    """
    idle = [i for i in range(len(mappings)) if sys.getrefcount(mappings[i]) == 2]
    fits = [i for i in idle if len(mappings[i]) >= size]
    if fits:
        return mappings[min(fits, key=lambda i: len(mappings[i]))]
    for i in reversed(idle):
        mappings.pop(i).close()
    return None


def release() -> None:
    """Unmap every idle mapping (a finished conversion's scratch)."""
    with _lock:
        for mappings in _pools.values():
            _reuse(mappings, 1 << 62)


def map_file(fd: int, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` of an open file from `offset`, mapped private and read-only (uint8): the page
    cache's own pages, no copy and no fresh memory. The caller checks the file holds them all;
    a file truncated while mapped ends the process with SIGBUS, as with any mapped loader."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    base = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    mapping = mmap.mmap(fd, offset - base + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=base)
    return np.frombuffer(mapping, np.uint8, count=nbytes, offset=offset - base)

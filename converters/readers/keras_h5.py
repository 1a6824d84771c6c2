"""Read the weights of an untrusted Keras `.h5` file with h5py alone.

No Keras model is ever built and `model_config` is never deserialised. Weights
are found the way Keras' legacy loader finds them: the root (or `model_weights`)
attribute `layer_names`, then each layer group's `weight_names`, in order,
because Keras assigns weights by position. Every object on the way is checked
before it is opened: external links, soft links that do not resolve to hard
links inside the file, external raw storage, virtual datasets and unknown filter
plugins are refused, since each can make HDF5 read other files or run plugins.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from converters.errors import InputError, UnsafeInputError
from converters.tensors import Checkpoint, LazyTensor, exceeds, shape_text

PLAIN_KINDS = "biufc"
MAX_TENSOR_BYTES = 64 * 2**30
# Chunks never written read back as the fill value, so a dataset may declare far more than it
# stores. Keras writes weights uncompressed (1:1) and deflate cannot expand past ~1032:1, so a
# dataset declaring more than this ratio of its stored bytes (plus one small chunk) is crafted.
MAX_DATASET_RATIO = 1100
# As for .npz: the whole file may not declare more than this many times its own size once past
# a small floor (only zeros compress more than ~1.1:1).
MAX_FILE_RATIO = 100
FILE_RATIO_FLOOR = 256 * 2**20
MAX_LINK_HOPS = 8
# deflate (gzip), shuffle, fletcher32 and lzf ship with h5py; anything else is a plugin.
ALLOWED_FILTERS = {1, 2, 3, 32000}
_DEFLATE, _SHUFFLE, _FLETCHER32 = 1, 2, 3
# Chunks through these filters are decoded here, each inflated no further than its chunk's size;
# libhdf5's own deflate grows its buffer until the stream ends.
DECODED_FILTERS = {_DEFLATE, _SHUFFLE, _FLETCHER32}
# A filter may not store a chunk in more than its raw size plus this much (deflate's worst case adds
# 5 bytes a 16 KiB block and a header, fletcher32 4, lzf 1 in 32); a larger chunk is crafted.
def _max_stored(nbytes: int) -> int:
    return nbytes + nbytes // 32 + 64
# What h5py raises on a damaged file; any of them means bad input, not a bug here.
_H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError,
              AttributeError, UnicodeError, OverflowError, MemoryError)


def read_keras_h5(path: str | Path) -> Checkpoint:
    """Describe the weights of a Keras `save_weights` (or full-model) `.h5` file.

    Tensors are named `"{layer_name}/{weight_name}"` (a trailing `:0` removed) in
    stored order; `meta["order"]` lists `(layer_name, [weight names])` because
    Keras loads by position. External links, escaping soft links, external
    storage, virtual datasets and non-builtin filters raise `UnsafeInputError`
    naming the object; missing attributes or datasets raise `InputError`.
    """
    path = Path(path)
    try:
        return _read(path)
    except InputError:
        raise
    except _H5_ERRORS as error:
        raise InputError(path, f"corrupt HDF5 file ({type(error).__name__}: {_one_line(error)})") from None


def _read(path: Path) -> Checkpoint:
    with _open(path) as h5:
        root = _weights_root(path, h5)
        order, tensors = [], {}
        for layer in _string_list(path, root, "layer_names", "the weights group"):
            group = _resolve(path, root, layer, h5py.Group)
            weights = _string_list(path, group, "weight_names", f"layer {layer!r}")
            order.append((layer, [_strip(w) for w in weights]))
            for weight in weights:
                dataset = _resolve(path, group, weight, h5py.Dataset)
                name = f"{layer}/{_strip(weight)}"
                if name in tensors:
                    raise InputError(path, f"duplicate weight {name!r}")
                tensors[name] = _lazy(path, dataset, name)
        meta = {"order": order, "root": root.name, **_version_attrs(h5), **_version_attrs(root)}
    _check_total(path, tensors)
    return Checkpoint(path, "keras-h5", tensors, meta)


def _check_total(path: Path, tensors: dict[str, LazyTensor]) -> None:
    """Refuse a file whose datasets together declare over `MAX_FILE_RATIO` times its size."""
    total, size = sum(t.nbytes for t in tensors.values()), path.stat().st_size
    if total > FILE_RATIO_FLOOR and total > MAX_FILE_RATIO * size:
        raise InputError(path, f"{size} bytes of file declare {total} bytes of weights "
                               f"(over {MAX_FILE_RATIO} times its size); refused")


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise InputError(path, f"truncated or not an HDF5 file ({_one_line(error)})") from None


def _weights_root(path: Path, h5: h5py.File) -> h5py.Group:
    """The group holding `layer_names`: the root, or `model_weights` of a full-model save."""
    if _has_attr(h5, "layer_names"):
        return h5
    if "model_weights" in h5:
        root = _resolve(path, h5, "model_weights", h5py.Group)
        if _has_attr(root, "layer_names"):
            return root
    raise InputError(path, "no 'layer_names' attribute at the root or in 'model_weights' "
                           "(not a Keras save_weights .h5 file)")


def _has_attr(obj: h5py.HLObject, name: str) -> bool:
    return name in obj.attrs or f"{name}0" in obj.attrs


def _string_list(path: Path, obj: h5py.HLObject, name: str, where: str) -> list[str]:
    """A Keras name-list attribute, also in its chunked form (`name0`, `name1`, ...)."""
    if name in obj.attrs:
        chunks = [_read_attr(path, obj, name, where)]
    elif f"{name}0" in obj.attrs:
        chunks, index = [], 0
        while f"{name}{index}" in obj.attrs:
            chunks.append(_read_attr(path, obj, f"{name}{index}", where))
            index += 1
    else:
        raise InputError(path, f"{where} has no {name!r} attribute")
    return [_decode(path, item, name, where) for chunk in chunks for item in chunk]


def _read_attr(path: Path, obj: h5py.HLObject, name: str, where: str) -> np.ndarray:
    _check_attr_size(path, obj, name, where, None)
    try:
        value = np.asarray(obj.attrs[name])
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise InputError(path, f"{where}: cannot read attribute {name!r} "
                               f"({_one_line(error)})") from None
    if value.size == 0:
        return value.reshape(-1)  # Keras writes an empty float array for weightless layers
    if value.ndim > 1 or value.dtype.kind not in "SUO":
        raise InputError(path, f"{where}: attribute {name!r} is not a list of names")
    return value.reshape(-1)


def _check_attr_size(path: Path, obj: h5py.HLObject, name: str, where: str, max_items: int | None) -> None:
    """Refuse, before reading it, an attribute whose reading could cost more than the file holds:
    variable-length strings (each is a reference into the heap, and every one may name the same
    large string; Keras writes fixed-length names) where more than `max_items` elements, or more
    fixed-size bytes than the file's size."""
    try:
        attr = obj.attrs.get_id(name)
        count, kind = int(np.prod(attr.shape, dtype=np.int64)), attr.get_type()
        vlen = isinstance(kind, h5py.h5t.TypeVlenID) or (isinstance(kind, h5py.h5t.TypeStringID)
                                                        and kind.is_variable_str())
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise InputError(path, f"{where}: cannot read attribute {name!r} ({_one_line(error)})") from None
    if vlen and (max_items is None or count > max_items):
        raise InputError(path, f"{where}: attribute {name!r} holds {count} variable-length strings (Keras "
                               "writes fixed-length names; each variable-length one may repeat one stored "
                               "string); refused")
    if not vlen and count * kind.get_size() > path.stat().st_size:
        raise InputError(path, f"{where}: attribute {name!r} declares {count} x {kind.get_size()} bytes, "
                               "more than the file holds")


def _decode(path: Path, item: Any, name: str, where: str) -> str:
    if isinstance(item, bytes):
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(path, f"{where}: attribute {name!r} holds non-utf-8 names") from None
    if not isinstance(item, str) or not item or "\x00" in item:
        raise InputError(path, f"{where}: attribute {name!r} holds an invalid name {item!r}")
    return item


def _strip(weight: str) -> str:
    return weight[:-2] if weight.endswith(":0") else weight


def _resolve(path: Path, base: h5py.Group, name: str, kind: type) -> Any:
    """Follow `name` under `base` one component at a time, allowing only in-file links."""
    _check_chain(path, base, name, hops=0)
    try:
        obj = base[name]
    except (KeyError, OSError, ValueError) as error:
        raise InputError(path, f"cannot open {_full(base, name)!r} ({_one_line(error)})") from None
    if not isinstance(obj, kind):
        raise InputError(path, f"{obj.name!r} is not a {kind.__name__.lower()}")
    if isinstance(obj, h5py.Dataset):
        _check_dataset(path, obj)
    return obj


def _check_chain(path: Path, base: h5py.Group, name: str, hops: int) -> None:
    if hops > MAX_LINK_HOPS:
        raise UnsafeInputError(path, f"soft link chain too long at {_full(base, name)!r}")
    group = base.file["/"] if name.startswith("/") else base
    parts = [p for p in name.split("/") if p]
    for index, part in enumerate(parts):
        full = _full(group, part)
        try:
            link = group.get(part, getlink=True)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(path, f"cannot read link {full!r} ({_one_line(error)})") from None
        if link is None:
            raise InputError(path, f"missing {full!r}")
        if isinstance(link, h5py.ExternalLink):
            raise UnsafeInputError(path, f"{full!r} is an external link to "
                                         f"{link.filename}:{link.path}; refused")
        if isinstance(link, h5py.SoftLink):
            _check_chain(path, group, link.path, hops + 1)
        elif not isinstance(link, h5py.HardLink):
            raise UnsafeInputError(path, f"{full!r} is an unknown link type; refused")
        if index < len(parts) - 1:
            group = _group(path, group, part, full)


def _group(path: Path, group: h5py.Group, part: str, full: str) -> h5py.Group:
    try:
        child = group[part]
    except (KeyError, OSError, ValueError) as error:
        raise InputError(path, f"cannot open {full!r} ({_one_line(error)})") from None
    if not isinstance(child, h5py.Group):
        raise InputError(path, f"{full!r} is not a group")
    return child


def _full(group: h5py.Group, name: str) -> str:
    return name if name.startswith("/") else f"{group.name.rstrip('/')}/{name}"


def _check_dataset(path: Path, dataset: h5py.Dataset) -> None:
    name = dataset.name
    if dataset.is_virtual:
        raise UnsafeInputError(path, f"dataset {name!r} is a virtual dataset (reads other files); refused")
    if dataset.external:
        raise UnsafeInputError(path, f"dataset {name!r} keeps its data in external files; refused")
    _check_filters(path, dataset)
    _check_chunks(path, dataset)
    dtype = dataset.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in PLAIN_KINDS:
        raise InputError(path, f"dataset {name!r} has unsupported dtype {dtype}")
    if exceeds(dataset.shape, dtype.itemsize, MAX_TENSOR_BYTES):
        raise InputError(path, f"dataset {name!r} declares shape {shape_text(dataset.shape)}, over the "
                               f"{MAX_TENSOR_BYTES >> 30} GiB limit (a zero dimension counted as one)")
    stored = dataset.id.get_storage_size()
    if dataset.nbytes and stored == 0:
        raise InputError(path, f"dataset {name!r} has no stored data")
    if dataset.nbytes > MAX_DATASET_RATIO * stored + 4096:
        raise InputError(path, f"dataset {name!r} declares {dataset.nbytes} bytes but stores {stored} "
                               "(the rest would be read as fill value); refused")


def _filters(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(index)[0] for index in range(plist.get_nfilters())]


def _check_filters(path: Path, dataset: h5py.Dataset) -> None:
    codes = _filters(dataset)
    for code in codes:
        if code not in ALLOWED_FILTERS:
            raise UnsafeInputError(path, f"dataset {dataset.name!r} needs HDF5 filter {code} "
                                         "(a plugin); refused")
        if codes.count(code) > 1:  # two deflate passes inflate a million-fold
            raise InputError(path, f"dataset {dataset.name!r} applies HDF5 filter {code} twice; refused")


def _chunk_nbytes(dataset: h5py.Dataset) -> int:
    return int(np.prod(dataset.chunks, dtype=np.int64)) * dataset.dtype.itemsize


def _chunks(dataset: h5py.Dataset) -> list[Any]:
    """The stored chunks' (offset, filter_mask, byte_offset, size), from the chunk index alone."""
    found: list[Any] = []
    dataset.id.chunk_iter(found.append)
    return found


def _check_chunks(path: Path, dataset: h5py.Dataset) -> None:
    """Refuse, before any is read, a chunk stored in more bytes than its filters could make of its
    declared size (chunk shape x itemsize): the stored bytes would inflate past it."""
    if dataset.chunks is None or not _filters(dataset):
        return
    limit = _max_stored(_chunk_nbytes(dataset))
    for chunk in _chunks(dataset):
        if chunk.size > limit:
            raise InputError(path, f"dataset {dataset.name!r}: the chunk at {list(chunk.chunk_offset)} stores "
                                   f"{chunk.size} bytes for a chunk of {_chunk_nbytes(dataset)}; refused")


def _lazy(path: Path, dataset: h5py.Dataset, name: str) -> LazyTensor:
    dtype = dataset.dtype.newbyteorder("<") if dataset.dtype.itemsize > 1 else dataset.dtype
    shape, where = tuple(int(d) for d in dataset.shape), dataset.name
    return LazyTensor(shape, dtype, lambda: _load(path, where, name, shape, dtype))


def _load(path: Path, where: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Reopen the file, re-check the dataset's path and read just that dataset."""
    try:
        return _read_dataset(path, where, name, shape, dtype)
    except InputError:
        raise
    except _H5_ERRORS as error:
        raise InputError(path, f"cannot read {name!r} ({type(error).__name__}: {_one_line(error)})") from None


def _read_dataset(path: Path, where: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    with _open(path) as h5:
        dataset = _resolve(path, h5, where, h5py.Dataset)
        if tuple(dataset.shape) != shape:
            raise InputError(path, f"dataset {where!r} changed since it was opened")
        codes = _filters(dataset)
        if dataset.chunks is not None and codes and set(codes) <= DECODED_FILTERS and dataset.size:
            array = _read_chunks(path, dataset, codes)
        else:
            array = np.asarray(dataset[()])
    array = array.astype(dtype, copy=False)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _read_chunks(path: Path, dataset: h5py.Dataset, codes: list[int]) -> np.ndarray:
    """The dataset, its chunks decoded here so that none inflates past its chunk size; chunks never
    written read as the fill value, as libhdf5 reads them."""
    array = np.full(dataset.shape, dataset.fillvalue, dataset.dtype)
    chunk_shape, nbytes = tuple(dataset.chunks), _chunk_nbytes(dataset)
    for chunk in _chunks(dataset):
        offset = tuple(chunk.chunk_offset)
        if chunk.size > _max_stored(nbytes):
            raise InputError(path, f"dataset {dataset.name!r}: the chunk at {list(offset)} changed since it was opened")
        mask, raw = dataset.id.read_direct_chunk(offset)
        data = _unfilter(path, dataset.name, offset, raw, codes, mask, nbytes, dataset.dtype.itemsize)
        block = np.frombuffer(data, dataset.dtype).reshape(chunk_shape)
        target = tuple(slice(o, min(o + c, d)) for o, c, d in zip(offset, chunk_shape, dataset.shape))
        array[target] = block[tuple(slice(0, t.stop - t.start) for t in target)]
    return array


def _unfilter(path: Path, name: str, offset: tuple[int, ...], data: bytes, codes: list[int], mask: int,
              nbytes: int, itemsize: int) -> bytes:
    """Undo a chunk's filters, last applied first (those its mask skipped left out)."""
    where = f"dataset {name!r}: the chunk at {list(offset)}"
    for index in reversed(range(len(codes))):
        if mask & (1 << index):
            continue
        if codes[index] == _FLETCHER32:
            data = _check_fletcher32(path, where, data)
        elif codes[index] == _DEFLATE:
            data = _inflate(path, where, data, nbytes)
        elif codes[index] == _SHUFFLE:
            data = _unshuffle(data, itemsize)
    if len(data) != nbytes:
        raise InputError(path, f"{where} decodes to {len(data)} bytes, not its {nbytes}")
    return data


def _inflate(path: Path, where: str, data: bytes, nbytes: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, nbytes + 4)  # + fletcher32, where it is applied before deflate
    except zlib.error as error:
        raise InputError(path, f"{where}: corrupt deflate stream ({_one_line(error)})") from None
    if not inflater.eof:
        raise InputError(path, f"{where} inflates past its {nbytes} bytes (or is truncated); refused")
    return out


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    whole = len(data) // itemsize * itemsize
    if itemsize <= 1 or not whole:
        return data
    planes = np.frombuffer(data, np.uint8, whole).reshape(itemsize, whole // itemsize)
    return planes.T.tobytes() + data[whole:]


def _check_fletcher32(path: Path, where: str, data: bytes) -> bytes:
    """`data` less its 4-byte checksum, after checking it as libhdf5 does (or its older byte order)."""
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    value = fletcher32(body)
    swapped = ((value & 0xFF00FF00) >> 8) | ((value & 0x00FF00FF) << 8)
    if len(data) < 4 or stored not in (value, swapped):
        raise InputError(path, f"{where}: bad fletcher32 checksum (corrupt)")
    return body


def fletcher32(data: bytes) -> int:
    """libhdf5's Fletcher-32 of `data`: big-endian 16-bit words (an odd last byte as a high byte),
    both sums kept mod 65535 but as 65535, not 0, once any word is nonzero."""
    padded = data + b"\0" * (len(data) % 2)
    words = np.frombuffer(padded, ">u2").astype(np.uint64)
    if not words.any():
        return 0
    count, first, second = len(words), 0, 0
    for start in range(0, count, 1 << 20):
        piece = words[start: start + (1 << 20)]
        weights = (count - start - np.arange(len(piece), dtype=np.uint64)) % 65535
        first = (first + int(piece.sum())) % 65535
        second = (second + int((piece * weights % 65535).sum())) % 65535
    return (((second - 1) % 65535 + 1) << 16) | ((first - 1) % 65535 + 1)


def _version_attrs(group: h5py.Group) -> dict[str, str]:
    found = {}
    for key in ("keras_version", "backend"):
        if key not in group.attrs or _attr_items(group, key) != 1:
            continue  # a version is one string; reading a list of them could repeat one without limit
        value = group.attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            found[key] = value
    return found


def _attr_items(obj: h5py.HLObject, name: str) -> int:
    try:
        return int(np.prod(obj.attrs.get_id(name).shape, dtype=np.int64))
    except (OSError, ValueError, KeyError):
        return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]

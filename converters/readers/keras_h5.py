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


def _check_filters(path: Path, dataset: h5py.Dataset) -> None:
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code = plist.get_filter(index)[0]
        if code not in ALLOWED_FILTERS:
            raise UnsafeInputError(path, f"dataset {dataset.name!r} needs HDF5 filter {code} "
                                         "(a plugin); refused")


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
        array = np.asarray(dataset[()])
    array = array.astype(dtype, copy=False)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _version_attrs(group: h5py.Group) -> dict[str, str]:
    found = {}
    for key in ("keras_version", "backend"):
        value = group.attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            found[key] = value
    return found


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]

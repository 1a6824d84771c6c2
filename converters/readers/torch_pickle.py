"""Read untrusted PyTorch checkpoints (`.pt`/`.pth`) without running their pickle.

`torch.load` is never called. The pickle is read by a restricted unpickler whose
`find_class` knows a short allowlist (`ALLOWED_GLOBALS`): tensor rebuild
functions and storage types become lazy descriptors, `argparse.Namespace` and
omegaconf containers become inert records, numpy scalars become numbers, and
every other global is refused by name before it can be called. Persistent ids
must be torch's `('storage', type, key, location, numel)`. Storage bytes are read
later, one tensor at a time, straight from the file at a checked offset; in the zip
container each directory entry is checked against its local header first, and every
byte read is added to its member's running CRC-32 (`zipcheck.RunningCrc`), the bytes no
tensor reads by `Checkpoint.verify_unread`.

Both containers are read: the zip format of torch >= 1.6 (`<name>/data.pkl`,
`<name>/data/<key>`) and the legacy stream (magic number, protocol, sys_info,
pickle, storage keys, raw storages).
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from converters import memory
from converters.errors import InputError, UnsafeInputError
from converters.readers import zipcheck
from converters.tensors import Checkpoint, LazyTensor, exceeds, shape_text, shown

MAX_PICKLE_BYTES = 256 * 2**20
MAX_DEPTH = 200                 # nesting of containers in the unpickled object
MAX_NODES = 5_000_000           # objects visited while flattening (memo reuse can fan out)
# Budgets that grow with what the file holds, each with a floor that small real files sit far below.
# Every object the flattening visits is made or named by at least one byte of pickle, unless the memo
# fans one object out into many paths (a DAG of 40 bytes names 2**20 paths); real files reuse a few
# objects (tied weights), so visits may reach the pickle's byte count, or the floor.
NODE_FLOOR = 200_000
NODES_PER_PICKLE_BYTE = 1
# torch.save spends ~117 bytes of pickle on a state-dict tensor (its rebuild call, storage id, key and
# name) and ~55 on an optimizer-state one (short, memoized names).
TENSOR_FLOOR = 10_000
PICKLE_BYTES_PER_TENSOR = 16
# A stored pickle has at most one opcode per byte; a deflated torch pickle (~5:1, ~3.6 bytes an opcode)
# about 1.5 per compressed byte. Counted against the whole file, so real checkpoints never come near.
OPCODE_FLOOR = 1_000_000
OPCODES_PER_FILE_BYTE = 8
# torch.save stores every member; a re-zipped file may deflate data.pkl (~5:1) and byteorder. More
# than this many bytes out per compressed byte in, at any point of the stream, is a crafted member.
MAX_INFLATE_RATIO = 64
_INFLATE_SLACK = 4096           # bytes out allowed before the ratio applies (headers, tiny members)
_INFLATE_PIECE = 64 << 10
SHOWN_CHARS = 80                # of a value from the file quoted in a message
MAX_NDIM = 32
# Real dotted paths are under ~200 characters; a memoized long key repeated at every level would
# otherwise build paths of gigabytes within the depth and object budgets.
MAX_PATH_CHARS = 4096
# torch.save keeps the storage a view was taken from, so an expanded (stride-0) view of one
# element declares any size from a few bytes of file, and loading it allocates that size. Real
# checkpoints expand only small buffers (position ids), so views that repeat their storage's
# elements may declare this many bytes in all, and a file declaring more is refused.
MAX_EXPANDED_BYTES = 64 * 2**20
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# storage type -> element dtype; bfloat16 has no numpy dtype and is widened on load.
STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# torch.<name> dtype objects that may appear as data or in _rebuild_tensor_v3.
TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "float64": "float64", "double": "float64",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "complex128": "complex128",
}
_ITEMSIZE = {"bfloat16": 2, **{n: np.dtype(n).itemsize for n in set(TORCH_DTYPES.values()) - {"bfloat16"}}}


class _Bad(Exception):
    """Malformed pickle content; becomes an InputError naming the file."""


def _shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A repr of `value` of at most `limit` characters (then "..."), made by walking only as many of
    its elements as those characters show: a memo DAG of 2**40 leaves or a 5,000-digit integer costs
    no more to quote than a short tuple, where `str(value)[:limit]` would build all of it first."""
    parts: list[str] = []
    size = 0

    def emit(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)

    def walk(item: Any) -> None:
        if size > limit:
            return
        if isinstance(item, (tuple, list, set, frozenset, dict)):
            opening, closing = {tuple: "()", list: "[]", dict: "{}"}.get(type(item), "{}")
            emit(opening)
            for index, element in enumerate(item.items() if isinstance(item, dict) else item):
                if size > limit:
                    break
                emit(", " * bool(index))
                if isinstance(item, dict):
                    walk(element[0])
                    emit(": ")
                    walk(element[1])
                else:
                    walk(element)
            emit(closing)
        elif isinstance(item, (str, bytes, bytearray)):
            emit(repr(item[: limit + 1]))
        elif type(item) is int and item.bit_length() > 64:
            emit(f"<int of {item.bit_length()} bits>")
        elif item is None or isinstance(item, (bool, int, float, complex)):
            emit(repr(item))
        elif isinstance(item, _Global):
            emit(item.name)
        else:
            emit(f"<{type(item).__name__}>")

    walk(value)
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id: `elem_offset` is nonzero only for legacy views."""

    key: str
    dtype: str
    numel: int
    root: str
    elem_offset: int = 0

    def __setstate__(self, state: Any) -> None:
        raise _Bad("BUILD on a storage")


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: Any) -> None:
        raise _Bad("BUILD on a tensor")


class _Global:
    """What `find_class` returns: a name, optionally a safe function we wrote ourselves."""

    def __init__(self, name: str, call: Callable[..., Any] | None = None, dtype: str = "") -> None:
        self.name, self._call, self.dtype = name, call, dtype

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            raise _Bad(f"{self.name} is not callable here")
        return self._call(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Bad(f"BUILD on {self.name}")


class _Record:
    """An inert stand-in for a class (Namespace, omegaconf): keeps its pickled state, runs nothing."""

    kind = "record"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Record":
        self = object.__new__(cls)
        self.state = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Namespace(_Record):
    kind = "namespace"


class _DictConfig(_Record):
    kind = "dictconfig"


class _ListConfig(_Record):
    kind = "listconfig"


class _Node(_Record):
    kind = "node"


class _Metadata(_Record):
    kind = "metadata"


class _PickledOrderedDict(dict):
    """`collections.OrderedDict` as a plain dict; BUILD state (torch's `_metadata`) is kept aside."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["pickled_state"] = state


class _NumpyDType(_Record):
    """`numpy.dtype(spec, align, copy)` plus its BUILD state; only plain numeric specs survive."""

    def __init__(self, spec: Any = None, *args: Any) -> None:
        self.spec = spec

    def numpy(self) -> np.dtype:
        spec = getattr(self, "spec", None)
        if not isinstance(spec, str) or not re.fullmatch(r"(b1|[iuf][1248]|f2|c8|c16|\?)", spec):
            raise _Bad(f"numpy dtype {_shown(spec)} is not a plain numeric dtype")
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        if order not in ("<", ">", "=", "|"):
            raise _Bad(f"numpy dtype byte order {_shown(order)}")
        return np.dtype(spec).newbyteorder(order if order != "|" else "=")


class _NumpyArray(_Record):
    """`numpy.core.multiarray._reconstruct` + BUILD: a small numeric array from bytes in the pickle."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Bad("malformed numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _NumpyDType) or not isinstance(raw, bytes):
            raise _Bad("numpy array with a non-numeric dtype")
        dt, shape = dtype.numpy(), _int_tuple(shape, "numpy array shape")
        if _prod(shape) * dt.itemsize != len(raw):
            raise _Bad("numpy array size does not match its bytes")
        self.state = np.frombuffer(raw, dt).reshape(shape, order="F" if fortran else "C").copy()


# ---------------------------------------------------------------- allowed globals


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if (not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM
            or not all(type(v) is int and v >= 0 for v in value)):
        raise _Bad(f"invalid {what}: {_shown(value)}")
    return tuple(value)


def _prod(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise _Bad("tensor rebuilt from something that is not a storage")
    if type(offset) is not int or offset < 0:
        raise _Bad(f"invalid storage offset {_shown(offset)}")
    shape, strides = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    if len(shape) != len(strides):
        raise _Bad("tensor size and stride differ in length")
    return _TensorRef(storage, dtype or storage.dtype, offset, shape, strides)


def _rebuild_tensor(storage, offset, size, stride, *rest) -> _TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest) -> _TensorRef:
    if not isinstance(dtype, _Global) or dtype.dtype not in _ITEMSIZE:
        raise _Bad("_rebuild_tensor_v3 without a known dtype")
    if not isinstance(storage, _Storage) or storage.dtype != "uint8":
        raise _Bad("_rebuild_tensor_v3 needs an untyped storage")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *rest) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise _Bad("parameter rebuilt from something that is not a tensor")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise _Bad("numpy scalar of a non-numeric dtype")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise _Bad("numpy scalar size does not match its dtype")
    return np.frombuffer(data, dt)[0].item()


def _numpy_reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> _NumpyArray:
    if not (isinstance(cls, _Global) and cls.name == "numpy.ndarray"):
        raise _Bad("numpy _reconstruct of something other than ndarray")
    return _NumpyArray()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad("_codecs.encode used for something other than bytes")
    return text.encode("latin1")


def _plain_items(value: Any = ()) -> Any:
    if not isinstance(value, (list, tuple, set, frozenset, str, bytes)):
        raise _Bad(f"unexpected argument of type {type(value).__name__}")
    return value


def _ordered_dict(items: Any = ()) -> _PickledOrderedDict:
    return _PickledOrderedDict(_plain_items(items))


def _default_dict(factory: Any = None, *rest: Any) -> dict:
    return {}


def _number_call(kind: type) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if len(args) > 3 or not all(a is None or type(a) in (int, float) for a in args):
            raise _Bad(f"{kind.__name__}() with non-numeric arguments")
        return kind(*args)
    return call


def _bytearray(value: Any = b"", *rest: Any) -> bytearray:
    if isinstance(value, str) and rest in ((), ("latin1",), ("latin-1",)):
        return bytearray(value.encode("latin1"))
    if isinstance(value, bytes):
        return bytearray(value)
    raise _Bad("bytearray() with a size or an unknown argument")


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise _Bad("invalid torch.device")
    return kind if index is None else f"{kind}:{index}"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}

    def add(module: str, name: str, value: Any = None) -> None:
        table[(module, name)] = _Global(f"{module}.{name}") if value is None else value

    def fn(module: str, name: str, call: Callable[..., Any]) -> None:
        table[(module, name)] = _Global(f"{module}.{name}", call)

    fn("torch._utils", "_rebuild_tensor", _rebuild_tensor)
    fn("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor)
    fn("torch._utils", "_rebuild_tensor_v3", _rebuild_tensor_v3)
    fn("torch._utils", "_rebuild_parameter", _rebuild_parameter)
    fn("torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter)
    for storage, dtype in STORAGE_DTYPES.items():
        table[("torch", storage)] = _Global(f"torch.{storage}", dtype=dtype)
    table[("torch.storage", "UntypedStorage")] = _Global("torch.storage.UntypedStorage", dtype="uint8")
    for name, dtype in TORCH_DTYPES.items():
        table[("torch", name)] = _Global(f"torch.{name}", dtype=dtype)
    fn("torch", "Size", _torch_size)
    fn("torch", "device", _torch_device)
    fn("collections", "OrderedDict", _ordered_dict)
    fn("collections", "defaultdict", _default_dict)
    add("argparse", "Namespace", _Namespace)
    add("omegaconf.dictconfig", "DictConfig", _DictConfig)
    add("omegaconf.listconfig", "ListConfig", _ListConfig)
    add("omegaconf.base", "ContainerMetadata", _Metadata)
    add("omegaconf.base", "Metadata", _Metadata)
    for node in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                 "BytesNode", "PathNode", "EnumNode", "ValueNode", "InterpolationResultNode"):
        add("omegaconf.nodes", node, _Node)
    add("typing", "Any")
    for name in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "object"):
        add("builtins", name)
    fn("builtins", "set", lambda items=(): set(_plain_items(items)))
    fn("builtins", "frozenset", lambda items=(): frozenset(_plain_items(items)))
    fn("builtins", "complex", _number_call(complex))
    fn("builtins", "slice", _number_call(slice))
    fn("builtins", "bytearray", _bytearray)
    fn("_codecs", "encode", _codecs_encode)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        fn(module, "scalar", _numpy_scalar)
        fn(module, "_reconstruct", _numpy_reconstruct)
    add("numpy", "dtype", _NumpyDType)
    add("numpy", "ndarray")
    return table


ALLOWED_GLOBALS = _allowed_globals()


# ---------------------------------------------------------------- unpickling


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only from `ALLOWED_GLOBALS`; persistent ids only as torch storages."""

    def __init__(self, file: Any, path: Path, legacy: bool) -> None:
        super().__init__(file, encoding="latin1")
        self.path, self.legacy = path, legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles spell Python 2 names (`__builtin__.long`); map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeInputError(self.path, f"refusing to load: pickle calls {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        size = 6 if self.legacy else 5
        if not isinstance(pid, tuple) or len(pid) != size or pid[0] != "storage":
            raise UnsafeInputError(self.path, f"refusing persistent id {_shown(pid)} "
                                              "(only torch storages are allowed)")
        _, kind, key, location, numel = pid[:5]
        if not isinstance(kind, _Global) or not kind.dtype or kind.name.split(".")[-1] not in STORAGE_DTYPES:
            raise _Bad(f"persistent id with storage type {_shown(kind)}")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise _Bad(f"malformed storage id for key {_shown(key, 40)}")
        return self._register(_Storage(key, kind.dtype, numel, key), pid[5] if self.legacy else None)

    def _register(self, storage: _Storage, view: Any) -> _Storage:
        known = self.storages.setdefault(storage.key, storage)
        if (known.dtype, known.numel) != (storage.dtype, storage.numel):
            raise _Bad(f"storage {storage.key!r} declared twice with different types or sizes")
        if view is None:
            return known
        if (not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[0], str)
                or not all(type(v) is int and v >= 0 for v in view[1:])):
            raise _Bad(f"malformed storage view of {storage.key!r}")
        view_key, offset, numel = view
        if offset + numel > storage.numel:
            raise _Bad(f"storage view {view_key!r} runs past storage {storage.key!r}")
        return _Storage(view_key, storage.dtype, numel, storage.key, offset)


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                  KeyError, struct.error, OverflowError, MemoryError, RecursionError,
                  UnicodeDecodeError, ImportError)
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


class _Recorder:
    """Hands `pickletools.genops` the file's bytes and keeps them in one buffer (not one bytes
    object per opcode), to unpickle the same bytes after."""

    def __init__(self, file: Any) -> None:
        self.file, self.data = file, bytearray()

    def read(self, n: int) -> bytes:
        piece = self.file.read(n)
        self.data += piece
        return piece

    def readline(self) -> bytes:
        piece = self.file.readline()
        self.data += piece
        return piece


def _scanned(file: Any, max_opcodes: int) -> bytes:
    """The next pickle in `file`, read up to its STOP, with every memo index checked first.

    The C unpickler grows its memo table to twice the largest index a PUT names, so one
    LONG_BINPUT in a file of a few hundred bytes would allocate gigabytes before any other
    check. A pickler numbers its memo from 0, one entry per memoized object, so an index
    at or past the count of opcodes read so far is refused here, before the unpickler runs;
    so is a pickle of more than `max_opcodes` opcodes, which bounds the memo with it.
    """
    recorder = _Recorder(file)
    for count, (opcode, arg, _) in enumerate(pickletools.genops(recorder), 1):
        if opcode.name in _MEMO_PUTS and arg >= count:
            raise _Bad(f"memo index {arg} at opcode {count}, past any object the pickle made")
        if count > max_opcodes:
            raise _Bad(f"more than {max_opcodes} opcodes, over the budget for a file of this size")
    return bytes(recorder.data)


def _opcode_budget(path: Path) -> int:
    return max(OPCODE_FLOOR, OPCODES_PER_FILE_BYTE * path.stat().st_size)


def _unpickle(path: Path, file: Any, legacy: bool) -> tuple[Any, dict[str, _Storage]]:
    try:
        unpickler = _RestrictedUnpickler(io.BytesIO(_scanned(file, _opcode_budget(path))), path, legacy)
        return unpickler.load(), unpickler.storages
    except InputError:
        raise
    except _Bad as error:
        raise InputError(path, f"malformed checkpoint pickle: {_one_line(error)}") from None
    except _PICKLE_ERRORS as error:
        raise InputError(path, f"corrupt or truncated pickle ({type(error).__name__}: "
                               f"{_one_line(error)})") from None


class _BoundedReader:
    """A read-only view of a file that refuses to hand out more than `limit` bytes."""

    def __init__(self, file: Any, limit: int, path: Path) -> None:
        self.file, self.left, self.path = file, limit, path

    def _take(self, n: int) -> int:
        if n < 0 or n > self.left:
            raise InputError(self.path, f"pickle stream larger than {MAX_PICKLE_BYTES} bytes")
        return n

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(self._take(n))
        self.left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self) -> bytes:
        line = self.file.readline(self.left + 1)
        self._take(len(line))
        self.left -= len(line)
        return line


# ---------------------------------------------------------------- public entry


def read_torch(path: str | Path) -> Checkpoint:
    """Describe a PyTorch checkpoint's tensors without running its pickle.

    Handles the zip container (`format="torch-zip"`) and the legacy stream
    (`format="torch-legacy"`). Every tensor found anywhere in the unpickled
    object is listed under its dotted path (`model.blocks.0.norm1.weight`,
    `module.head.bias`); `meta` holds the rest (`args` as a dict, `cfg` as
    nested dicts and lists, numbers, strings) with tensors replaced by a
    `"<tensor NAME>"` placeholder, plus `meta["source_dtypes"]` for bfloat16
    tensors, which load widened to float32. Any global outside
    `ALLOWED_GLOBALS` raises `UnsafeInputError` naming it; malformed or
    truncated files raise `InputError`.
    """
    path = Path(path)
    head = _head(path)
    if head.startswith(b"PK"):
        return _read_zip(path)
    if head[:1] == b"\x80":
        return _read_legacy(path)
    raise InputError(path, f"not a PyTorch checkpoint (first bytes {head[:8]!r})")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(8)
    except OSError as error:
        raise InputError(path, f"cannot read ({_one_line(error)})") from None


# ---------------------------------------------------------------- zip container


def _read_zip(path: Path) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            prefix = _zip_prefix(path, infos)
            _check_methods(path, infos)
            members = zipcheck.member_spans(path, archive.fp.fileno(), infos, archive.start_dir)
            little = _byteorder(path, archive, prefix)
            pickled = _read_pickle(path, archive, prefix)
            obj, storages = _unpickle(path, io.BytesIO(pickled), False)
            crcs = {info.filename: zipcheck.RunningCrc(path, members[info.filename]) for info in infos
                    if info.compress_type == zipfile.ZIP_STORED}
            spans = {key: _zip_span(path, archive, f"{prefix}/data/{key}", storage, crcs)
                     for key, storage in _roots(storages).items()}
    except InputError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError) as error:  # RuntimeError: zipfile's "encrypted, password required"
        raise InputError(path, f"truncated or not a zip archive ({_one_line(error)})") from None
    checked_at_parse = {f"{prefix}/data.pkl"}  # read whole through zipfile, which checks its CRC-32
    rest = [crc for name, crc in crcs.items() if name not in checked_at_parse]
    compressed = [info for info in infos if info.compress_type != zipfile.ZIP_STORED
                  and info.filename not in checked_at_parse]
    return _checkpoint(path, "torch-zip", obj, spans, little, len(pickled),
                       lambda: _verify_members(path, rest, compressed))


def _verify_members(path: Path, crcs: list[zipcheck.RunningCrc], compressed: list[zipfile.ZipInfo]) -> None:
    """Check the CRC-32 of every member byte no load has checked: the rest of each stored member
    (storages of dropped tensors, bytes past every view), then each compressed member, streamed."""
    for crc in crcs:
        crc.finish()
    if not compressed:
        return
    info = compressed[0]
    try:
        with zipfile.ZipFile(path) as archive:
            for info in compressed:
                with archive.open(info) as stream:
                    while stream.read(2**20):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError,
            zlib.error) as error:
        raise InputError(path, f"member {info.filename!r}: truncated or corrupt ({_one_line(error)})") from None


def _zip_prefix(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    names = [info.orig_filename for info in infos]
    for name in names:
        parts = PurePosixPath(name).parts
        if "\x00" in name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
            raise UnsafeInputError(path, f"member name with a path trick: {name!r}")
    if len(set(names)) != len(names):
        raise UnsafeInputError(path, "duplicate member names in the zip archive")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise InputError(path, "zip archive has no single '<name>/data.pkl' (not a PyTorch checkpoint)")
    return pickles[0][: -len("/data.pkl")]


def _check_methods(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Every member stored (as torch.save writes them) or deflated (a re-zipped file), and none
    encrypted: bzip2 and lzma streams expand without bound before a size could cut them."""
    for info in infos:
        if info.flag_bits & 0x1:
            raise InputError(path, f"member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(path, f"member {info.filename!r} uses compression method {info.compress_type} "
                                   "(torch.save stores its members; only stored or deflated are read)")


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The bytes of a small member (data.pkl, byteorder), refused before reading where it declares
    more than `limit`, and while inflating where it gives more bytes than it declares or more than
    `MAX_INFLATE_RATIO` per compressed byte read so far. Its CRC-32 is checked."""
    name = info.filename
    if info.file_size > limit:
        raise InputError(path, f"member {name!r} declares {info.file_size} bytes, over the {limit} limit")
    if info.compress_type == zipfile.ZIP_DEFLATED and \
            info.file_size > MAX_INFLATE_RATIO * info.compress_size + _INFLATE_SLACK:
        raise InputError(path, f"member {name!r} declares {info.file_size} bytes, over the {MAX_INFLATE_RATIO} "
                               f"times its {info.compress_size} compressed that a real one inflates to; refused")
    with archive.open(info):  # zipfile's own checks of the local header; the bytes are read below
        pass
    start = _data_offset(path, archive, info, info.compress_size)
    archive.fp.seek(start)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise InputError(path, f"member {name!r}: stored size {info.compress_size} != declared size "
                                   f"{info.file_size}")
        data = archive.fp.read(info.file_size)
    else:
        data = _inflate(path, name, archive.fp, info.compress_size, info.file_size)
    if len(data) != info.file_size:
        raise InputError(path, f"member {name!r} is truncated ({len(data)} of {info.file_size} bytes)")
    if zlib.crc32(data) != info.CRC:
        raise InputError(path, f"member {name!r}: bad CRC-32 (corrupt)")
    return data


def _inflate(path: Path, name: str, file: Any, compressed: int, declared: int) -> bytes:
    inflater, out, taken = zlib.decompressobj(-15), bytearray(), 0
    while taken < compressed and not inflater.eof:
        piece = file.read(min(_INFLATE_PIECE, compressed - taken))
        if not piece:
            break
        taken += len(piece)
        while piece and not inflater.eof:
            room = min(declared + 1, MAX_INFLATE_RATIO * taken + _INFLATE_SLACK) - len(out)
            if room <= 0:
                raise InputError(path, f"member {name!r} inflates past its declared {declared} bytes or "
                                       f"{MAX_INFLATE_RATIO} times its compressed size; refused")
            out += inflater.decompress(piece, room)
            piece = inflater.unconsumed_tail
    if not inflater.eof:
        raise InputError(path, f"member {name!r}: truncated deflate stream")
    return bytes(out)


def _byteorder(path: Path, archive: zipfile.ZipFile, prefix: str) -> bool:
    name = f"{prefix}/byteorder"
    if name not in archive.namelist():
        return True
    value = _read_member(path, archive, archive.getinfo(name), 16).strip()
    if value not in (b"little", b"big"):
        raise InputError(path, f"member {name!r} says {value[:16]!r}, expected little or big")
    return value == b"little"


def _read_pickle(path: Path, archive: zipfile.ZipFile, prefix: str) -> bytes:
    return _read_member(path, archive, archive.getinfo(f"{prefix}/data.pkl"), MAX_PICKLE_BYTES)


def _roots(storages: dict[str, _Storage]) -> dict[str, _Storage]:
    return {s.root: s for s in storages.values() if s.root == s.key}


def _zip_span(path: Path, archive: zipfile.ZipFile, name: str, storage: _Storage,
              crcs: dict[str, zipcheck.RunningCrc]) -> "_StorageBytes":
    """How to read a storage member, after checking it against its declaration."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise InputError(path, f"storage {storage.key!r} is missing (no member {name!r})") from None
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise InputError(path, f"storage member {name!r} is compressed (torch.save never compresses)")
    expected = storage.numel * _ITEMSIZE[storage.dtype]
    if info.file_size != expected:
        raise InputError(path, f"storage {storage.key!r} holds {info.file_size} bytes, "
                               f"declared {storage.numel} x {storage.dtype} = {expected}")
    return _MemberBytes(path, crcs[name])


class _StorageBytes:
    """Reads bytes of one storage, by offset from its first byte."""

    def read(self, first: int, nbytes: int) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class _MemberBytes(_StorageBytes):
    """A zip member's bytes, mapped from its first byte, each new byte added to its running CRC-32."""

    path: Path
    crc: zipcheck.RunningCrc

    def read(self, first: int, nbytes: int) -> np.ndarray:
        if not nbytes:
            return np.empty(0, np.uint8)
        mapped = zipcheck.map_member(self.path, self.crc.span, first + nbytes)
        self.crc.cover(mapped)
        return mapped[first:]


@dataclass(frozen=True)
class _StreamBytes(_StorageBytes):
    """A legacy storage's bytes, from `start` in the file (the legacy stream has no checksum)."""

    path: Path
    start: int

    def read(self, first: int, nbytes: int) -> np.ndarray:
        return _read_span(self.path, self.start + first, nbytes)


def _data_offset(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, stored: int) -> int:
    archive.fp.seek(info.header_offset)
    header = archive.fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise InputError(path, f"member {info.filename!r}: bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + stored > path.stat().st_size:
        raise InputError(path, f"member {info.filename!r} is truncated")
    return start


# ---------------------------------------------------------------- legacy stream


def _read_legacy(path: Path) -> Checkpoint:
    try:
        with open(path, "rb") as file:
            reader = _BoundedReader(file, MAX_PICKLE_BYTES, path)
            little = _legacy_preamble(path, reader)
            obj, storages = _unpickle(path, reader, True)
            keys, _ = _unpickle(path, reader, False)
            spans = _legacy_spans(path, file, keys, _roots(storages))
    except OSError as error:
        raise InputError(path, f"cannot read ({_one_line(error)})") from None
    return _checkpoint(path, "torch-legacy", obj, spans, little, MAX_PICKLE_BYTES - reader.left)


def _legacy_preamble(path: Path, reader: _BoundedReader) -> bool:
    magic, _ = _unpickle(path, reader, False)
    if magic != LEGACY_MAGIC:
        raise InputError(path, "a pickle without torch's magic number (not a PyTorch checkpoint)")
    protocol, _ = _unpickle(path, reader, False)
    if protocol != LEGACY_PROTOCOL:
        raise InputError(path, f"legacy torch protocol {_shown(protocol)} is not supported")
    info, _ = _unpickle(path, reader, False)
    if not isinstance(info, dict) or not isinstance(info.get("little_endian", True), bool):
        raise InputError(path, "malformed legacy sys_info")
    return info.get("little_endian", True)


def _legacy_spans(path: Path, file: Any, keys: Any, roots: dict[str, _Storage]) -> dict[str, _StorageBytes]:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise InputError(path, "malformed legacy storage key list")
    missing = sorted(set(roots) - set(keys))
    if missing:
        raise InputError(path, f"storage {missing[0]!r} is missing from the legacy key list")
    size, spans = path.stat().st_size, {}
    for key in keys:
        if key not in roots:
            raise InputError(path, f"legacy storage {key!r} is not used by any tensor")
        spans[key] = _legacy_span(path, file, roots[key], size)
    return spans


def _legacy_span(path: Path, file: Any, storage: _Storage, size: int) -> _StorageBytes:
    raw = file.read(8)
    if len(raw) != 8:
        raise InputError(path, f"storage {storage.key!r} is truncated")
    numel = struct.unpack("<q", raw)[0]
    if numel != storage.numel:
        raise InputError(path, f"storage {storage.key!r} holds {numel} elements, "
                               f"declared {storage.numel}")
    start, nbytes = file.tell(), numel * _ITEMSIZE[storage.dtype]
    if start + nbytes > size:
        raise InputError(path, f"storage {storage.key!r} is truncated")
    file.seek(start + nbytes)
    return _StreamBytes(path, start)


# ---------------------------------------------------------------- flattening


def _checkpoint(path: Path, fmt: str, obj: Any, spans: dict[str, _StorageBytes], little: bool,
                pickle_bytes: int, verify_unread: Callable[[], None] = lambda: None) -> Checkpoint:
    flat = _Flattener(path, pickle_bytes)
    content = flat.plain(obj, "", 0)
    tensors, source_dtypes = {}, {}
    expanded, limit = 0, max(path.stat().st_size, MAX_EXPANDED_BYTES)
    for name, ref in flat.tensors.items():
        _check_bounds(path, name, ref, limit)
        expanded += _check_expansion(path, name, ref, expanded)
        tensors[name] = _lazy(path, ref, spans[ref.storage.root], little)
        if ref.dtype == "bfloat16":
            source_dtypes[name] = "bfloat16"
    meta = dict(content) if isinstance(content, dict) else {"content": content}
    if "source_dtypes" in meta:
        meta["content.source_dtypes"] = meta.pop("source_dtypes")
    meta["source_dtypes"] = source_dtypes
    return Checkpoint(path, fmt, tensors, meta, verify_unread)


class _Flattener:
    """Turns the unpickled object into plain data and collects tensors by dotted path, within budgets
    of objects visited and tensors found that grow with the pickle's size (`NODE_FLOOR`, ...)."""

    def __init__(self, path: Path, pickle_bytes: int) -> None:
        self.path = path
        self.tensors: dict[str, _TensorRef] = {}
        self.visited = 0
        self.active: set[int] = set()
        self.max_nodes = min(MAX_NODES, max(NODE_FLOOR, NODES_PER_PICKLE_BYTE * pickle_bytes))
        self.max_tensors = max(TENSOR_FLOOR, pickle_bytes // PICKLE_BYTES_PER_TENSOR)
        self.pickle_bytes = pickle_bytes

    def plain(self, obj: Any, name: str, depth: int) -> Any:
        self.visited += 1
        if len(name) > MAX_PATH_CHARS:
            raise InputError(self.path, f"a dotted path of {len(name)} characters (over {MAX_PATH_CHARS}): "
                                        f"{_shown(name)}")
        if self.visited > self.max_nodes or depth > MAX_DEPTH:
            raise InputError(self.path, f"object structure too large or too deep at {_shown(name)} "
                                        f"(over {self.max_nodes} objects for {self.pickle_bytes} bytes of "
                                        f"pickle, or {MAX_DEPTH} levels: the memo repeats objects)")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, slice)):
            return obj
        if isinstance(obj, _TensorRef):
            return self._tensor(obj, name)
        if isinstance(obj, (_Global, _Storage, np.ndarray)):
            return _leaf(obj)
        if id(obj) in self.active:
            raise InputError(self.path, f"cyclic structure at {name!r}")
        self.active.add(id(obj))
        try:
            return self._container(obj, name, depth)
        finally:
            self.active.discard(id(obj))

    def _tensor(self, ref: _TensorRef, name: str) -> str:
        if name in self.tensors:
            raise InputError(self.path, f"two tensors have the same dotted path {_shown(name)}")
        if len(self.tensors) >= self.max_tensors:
            raise InputError(self.path, f"more than {self.max_tensors} tensors for {self.pickle_bytes} bytes "
                                        "of pickle (the memo repeats one tensor under many names); refused")
        self.tensors[name or "tensor"] = ref
        return f"<tensor {name}>"

    def _container(self, obj: Any, name: str, depth: int) -> Any:
        if isinstance(obj, dict):
            return {k: self.plain(v, _join(name, k), depth + 1) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = [self.plain(v, _join(name, i), depth + 1) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.plain(v, name, depth + 1) for v in obj)
        if isinstance(obj, _Record):
            return self.plain(_unwrap(self.path, obj, name), name, depth + 1)
        raise InputError(self.path, f"unexpected object {type(obj).__name__} at {name!r}")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _leaf(obj: Any) -> Any:
    if isinstance(obj, _Global):
        return obj.name
    if isinstance(obj, _Storage):
        return f"<storage {obj.key}>"
    return obj


def _unwrap(path: Path, record: _Record, name: str) -> Any:
    """The inert content of a stand-in record: attributes, omegaconf `_content` or `_val`."""
    state = record.state
    if isinstance(record, _NumpyDType):
        try:
            return str(record.numpy())
        except _Bad as error:
            raise InputError(path, f"at {name!r}: {error}") from None
    if isinstance(record, (_Namespace, _NumpyArray)) or state is None:
        return state
    if isinstance(record, _Metadata):
        return None
    if not isinstance(state, dict):
        raise InputError(path, f"malformed {record.kind} state at {name!r}")
    return state.get("_val") if isinstance(record, _Node) else state.get("_content")


def _check_bounds(path: Path, name: str, ref: _TensorRef, limit: int) -> None:
    """The tensor must lie inside its storage; sizes, strides and offset must be int64s before any
    of them is multiplied or formatted, and a zero-size tensor's other dimensions may not declare
    more than `limit` bytes (a zero does not switch the check off)."""
    storage, itemsize = ref.storage, _ITEMSIZE[ref.dtype]
    if any(v >= 2**63 for v in (*ref.shape, *ref.stride, ref.offset)):
        raise InputError(path, f"tensor {name!r} declares shape {shape_text(ref.shape)}, stride "
                               f"{shape_text(ref.stride)}, offset {shown(ref.offset)}: past torch's int64")
    if not _prod(ref.shape) and exceeds(ref.shape, itemsize, limit):
        raise InputError(path, f"tensor {name!r} declares shape {shape_text(ref.shape)}, past what the "
                               "file could hold (a zero dimension counted as one)")
    capacity = storage.numel * _ITEMSIZE[storage.dtype] // itemsize
    if _prod(ref.shape) and ref.offset + _span(ref) > capacity:
        raise InputError(path, f"tensor {name!r} ({ref.dtype}{list(ref.shape)}, offset "
                               f"{ref.offset}) reads past its storage {storage.key!r}")


def _check_expansion(path: Path, name: str, ref: _TensorRef, expanded: int) -> int:
    """The bytes `ref` declares where it holds more elements than its storage (0 for any other view),
    refused where they take the file's expanded views past `MAX_EXPANDED_BYTES`."""
    storage, itemsize, numel = ref.storage, _ITEMSIZE[ref.dtype], _prod(ref.shape)
    capacity = storage.numel * _ITEMSIZE[storage.dtype] // itemsize
    if numel <= capacity:
        return 0
    if expanded + numel * itemsize > MAX_EXPANDED_BYTES:
        raise InputError(path, f"tensor {name!r} ({ref.dtype}{list(ref.shape)}) repeats the {capacity} "
                               f"elements of storage {storage.key!r} as {numel} (a stride-0 view); "
                               f"expanded views may declare {MAX_EXPANDED_BYTES >> 20} MiB in all")
    return numel * itemsize


def _span(ref: _TensorRef) -> int:
    """Elements from the first to one past the last element the tensor touches."""
    if not _prod(ref.shape):
        return 0
    return 1 + sum((dim - 1) * step for dim, step in zip(ref.shape, ref.stride))


# ---------------------------------------------------------------- loading


def _lazy(path: Path, ref: _TensorRef, storage: _StorageBytes, little: bool) -> LazyTensor:
    dtype = np.dtype("float32" if ref.dtype == "bfloat16" else ref.dtype)
    return LazyTensor(ref.shape, dtype, lambda: _load(ref, storage, little))


def _load(ref: _TensorRef, storage: _StorageBytes, little: bool) -> np.ndarray:
    """Read only the bytes the tensor touches, then lay them out C-contiguously."""
    itemsize = _ITEMSIZE[ref.dtype]
    first = ref.storage.elem_offset * _ITEMSIZE[ref.storage.dtype] + ref.offset * itemsize
    count = _span(ref)
    raw = storage.read(first, count * itemsize)
    storage_dtype = np.dtype("uint16" if ref.dtype == "bfloat16" else ref.dtype)
    flat = raw.view(storage_dtype.newbyteorder("<" if little else ">"))
    if _is_contiguous(ref) or not count:
        array = flat[: _prod(ref.shape)].reshape(ref.shape)
    else:
        strides = tuple(step * itemsize for step in ref.stride)
        array = np.lib.stride_tricks.as_strided(flat, ref.shape, strides, writeable=False).copy()
    array = array.astype(storage_dtype, copy=False)
    if ref.dtype == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _is_contiguous(ref: _TensorRef) -> bool:
    expected = 1
    for dim, step in zip(reversed(ref.shape), reversed(ref.stride)):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def _read_span(path: Path, start: int, nbytes: int) -> np.ndarray:
    """The bytes of a storage span, mapped from the file (`memory.map_file`) once it is known to
    hold them all."""
    try:
        with open(path, "rb", buffering=0) as file:
            held = os.fstat(file.fileno()).st_size - start
            if held < nbytes:
                raise InputError(path, f"storage truncated at byte {start + max(held, 0)}")
            return memory.map_file(file.fileno(), start, nbytes)
    except OSError as error:
        raise InputError(path, f"cannot read ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


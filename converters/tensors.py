"""Lazy tensors: a name's shape and dtype are known before any of its bytes are read.

Readers return a `Checkpoint` whose tensors are `LazyTensor`s in the ORIGINAL
names and layout; rules transform them lazily; the writer loads one at a time.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from converters.errors import InputError

# The dtypes parityport writes into safetensors files, with the format's tags (bfloat16 sources are
# read as float32). The writer encodes these; the rules refuse any other dtype by name first.
SAFETENSORS_TAGS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class _Shown(reprlib.Repr):
    """reprlib's cut repr, with an integer too long to print (Python refuses past 4,300 digits, and
    would spend time and memory well before) given by its length."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 64:
            return repr(x)
        return f"<an integer of {int(x.bit_length() * 0.30103) + 1} digits>"  # log10(2) digits a bit


_SHOWN = _Shown()
_SHOWN.maxstring = _SHOWN.maxother = 80


def shown(value: Any) -> str:
    """A value read from a file as a message may show it: cut to a few items and 80 characters,
    an integer of more than 64 bits by its number of digits. Nothing from a file is formatted
    whole before it is cut, since formatting a huge integer fails (or takes minutes)."""
    return _SHOWN.repr(value)


def shape_text(shape: tuple[Any, ...]) -> str:
    """`[d0, d1, ...]` for a message, each dimension as `shown` gives it."""
    return "[" + ", ".join(shown(d) for d in shape) + "]"


def exceeds(shape: tuple[int, ...], itemsize: int, limit: int) -> bool:
    """Whether a shape asks for more than `limit` bytes with each zero dimension counted as one:
    every dimension is bounded on its own, so a zero does not hide a dimension of 10**12 (or
    of a thousand digits, which the product stops multiplying as soon as it passes `limit`)."""
    need = itemsize
    for dim in shape:
        need *= max(dim, 1)
        if need > limit:
            return True
    return False


def plausible_dims(key: str, shape: tuple[int, ...], rank: int, high: int, low: int = 1) -> tuple[int, ...]:
    """`shape` when it has `rank` dimensions, each from `low` to `high`; otherwise `InputError`
    naming `key` (without a path: the converter adds it). A family checks every dimension it reads
    a variant from, before any arithmetic on it or any table built from it."""
    if len(shape) != rank or not all(low <= dim <= high for dim in shape):
        raise InputError(None, f"{key} has shape {shape_text(shape)}; expected {rank} "
                               f"dimension{'s' * (rank > 1)}, each from {low} to {high}")
    return tuple(shape)


@dataclass(frozen=True)
class LazyTensor:
    """An array that is read (or computed) only when `load()` is called.

    `load()` checks that the loader kept its promise about shape and dtype, so a
    lying header or a buggy rule fails loudly at the tensor that lied.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    loader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    origin: tuple[str, ...] = field(default=(), compare=False)  # the names in the file it was read or made from

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def load(self) -> np.ndarray:
        array = np.asarray(self.loader())
        if tuple(array.shape) != tuple(self.shape) or array.dtype != np.dtype(self.dtype):
            raise InputError(None, f"tensor declared {self.dtype}{list(self.shape)} "
                                   f"but produced {array.dtype}{list(array.shape)}")
        return array

    @classmethod
    def of(cls, array: np.ndarray) -> "LazyTensor":
        """Wrap an in-memory array (tests, derived values)."""
        array = np.asarray(array)
        return cls(tuple(array.shape), array.dtype, lambda: array)


@dataclass
class Checkpoint:
    """What a reader found in a file: tensors in original names, plus inert metadata.

    `format` names the container ("npz", "keras-h5", "torch-zip", "torch-legacy").
    `meta` holds the non-tensor content as plain data (dicts, lists, strings,
    numbers), e.g. a pickled `args` Namespace or a fairseq `cfg`, and reader notes
    such as `{"order": [...]}` for formats whose meaning is positional.
    `tensors` keeps the file's order. `verify_unread()` checks the integrity of every byte of the
    file that no load has checked yet (the CRC-32 of zip members, or of their parts, that no
    tensor read), raising `InputError` naming the member; a conversion calls it once it has loaded
    what it needs, before it commits anything.
    """

    path: Path
    format: str
    tensors: dict[str, LazyTensor]
    meta: dict[str, Any] = field(default_factory=dict)
    verify_unread: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Each tensor keeps its name in the file for errors to show, whatever renames it before the rules.
        self.tensors = {name: t if t.origin else replace(t, origin=(name,)) for name, t in self.tensors.items()}


def described(name: str, tensor: LazyTensor) -> str:
    """`name` as an error shows it: the tensor's names in the original file first, which the user knows,
    then the converted name, e.g. "resnet/head/conv2d/bias (converted to classifier.1.bias)"."""
    if not tensor.origin or tensor.origin == (name,):
        return name
    return f"{', '.join(tensor.origin)} (converted to {name})"

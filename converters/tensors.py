"""Lazy tensors: a name's shape and dtype are known before any of its bytes are read.

Readers return a `Checkpoint` whose tensors are `LazyTensor`s in the ORIGINAL
names and layout; rules transform them lazily; the writer loads one at a time.
"""

from __future__ import annotations

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
    `tensors` keeps the file's order.
    """

    path: Path
    format: str
    tensors: dict[str, LazyTensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each tensor keeps its name in the file for errors to show, whatever renames it before the rules.
        self.tensors = {name: t if t.origin else replace(t, origin=(name,)) for name, t in self.tensors.items()}


def described(name: str, tensor: LazyTensor) -> str:
    """`name` as an error shows it: the tensor's names in the original file first, which the user knows,
    then the converted name, e.g. "resnet/head/conv2d/bias (converted to classifier.1.bias)"."""
    if not tensor.origin or tensor.origin == (name,):
        return name
    return f"{', '.join(tensor.origin)} (converted to {name})"

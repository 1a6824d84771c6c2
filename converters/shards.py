"""Sharded safetensors: `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.

The split follows huggingface_hub's splitter (`serialization/_base.py`): tensors
go into shards greedily in their order, a new shard starts when the next tensor
would push the current one past the limit, and a tensor larger than the limit
gets a shard of its own. Each shard is written by the streaming writer (one
tensor in memory at a time) and carries the same `__metadata__`. A model that
fits in one shard is written as a plain `model.safetensors` with no index, as
transformers' `save_pretrained` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from converters.errors import InputError
from converters.tensors import LazyTensor
from converters.writer import write_safetensors

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = 5_000_000_000  # huggingface_hub's default (serialization/_base.py MAX_SHARD_SIZE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(text: str | int, option: str = "--max-shard-size") -> int:
    """Bytes in a size such as `5GB`, `100KB`, `2GiB` or `1000000` (decimal units, as huggingface_hub).

    A size under one byte (`0.5`, `0.1KB`) is refused naming `option`: it would
    round to 0, which callers read as "no size given".
    """
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
        if match is None:
            raise InputError(None, f"{option}: bad size {text!r} (use e.g. 5GB, 500MB, 100KB)")
        size = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if size < 1:
        raise InputError(None, f"{option}: {text!r} is under one byte (use e.g. 5GB, 500MB, 100KB)")
    return size


def stored_size(tensor: LazyTensor, dtype: str | None) -> int:
    """Bytes `tensor` takes in the file once floats are cast to `dtype` (None keeps its own dtype)."""
    if dtype is not None and np.issubdtype(tensor.dtype, np.floating):
        return int(np.prod(tensor.shape, dtype=np.int64)) * _FLOAT_BYTES[dtype]
    return tensor.nbytes


def plan_shards(tensors: Mapping[str, LazyTensor], dtype: str | None,
                max_shard_size: int) -> list[dict[str, LazyTensor]]:
    """Split `tensors` greedily, in order, into groups of at most `max_shard_size` stored bytes."""
    shards: list[dict[str, LazyTensor]] = [{}]
    filled = 0
    for name, tensor in tensors.items():
        size = stored_size(tensor, dtype)
        if shards[-1] and filled + size > max_shard_size:
            shards.append({})
            filled = 0
        shards[-1][name] = tensor
        filled += size
    return shards


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (0-based) of `count`, as huggingface_hub names them."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_sharded(folder: Path, tensors: Mapping[str, LazyTensor], *, dtype: str | None,
                  metadata: Mapping[str, str], max_shard_size: int = MAX_SHARD_SIZE,
                  on_tensor: Callable[[str, int], None] | None = None,
                  allow_nonfinite: bool = False) -> list[str]:
    """Write `tensors` into `folder` as one file or as shards plus the index; return the weight files.

    Below `max_shard_size` bytes this writes `model.safetensors` exactly as
    `write_safetensors` does. Above it, every shard gets the same `metadata`
    and `model.safetensors.index.json` records `metadata.total_size` (the sum
    of tensor bytes) and the `weight_map` from each tensor name to its shard.
    """
    shards = plan_shards(tensors, dtype, max_shard_size)
    if len(shards) == 1:
        write_safetensors(folder / MODEL_FILE, tensors, dtype=dtype, metadata=metadata,
                          on_tensor=on_tensor, allow_nonfinite=allow_nonfinite)
        return [MODEL_FILE]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, dtype=dtype, metadata=metadata,
                          on_tensor=on_tensor, allow_nonfinite=allow_nonfinite)
    index = {"metadata": {"total_size": sum(stored_size(t, dtype) for t in tensors.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def weight_files(folder: Path) -> list[str]:
    """The folder's weight files in shard order: the index's shards, else `model.safetensors`."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return [MODEL_FILE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(index, "not a valid safetensors index (no weight_map)") from None


def _from_header(path: Path, read: Callable[[Any], Any]) -> Any:
    """`read(handle)` on the safetensors file's opened header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return read(f)
    except Exception as error:  # noqa: BLE001  safetensors raises its own error type
        raise InputError(path, f"cannot read the safetensors header: {error}") from None


def read_metadata(folder: Path) -> dict[str, str]:
    """The `__metadata__` of the folder's (first) weight file: provenance of the conversion."""
    return _from_header(folder / weight_files(folder)[0], lambda f: dict(f.metadata() or {}))


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in the folder's weight files, from their headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in weight_files(folder):
        shapes |= _from_header(folder / name, lambda f: {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes

"""Synthetic BiT checkpoints written in the EXACT original file layouts.

Nothing here reaches the original buckets, so tests and the offline demo use
files that have the published structure with random (but realistic) values:

- `.npz`: a flat, uncompressed `np.savez` of float32 arrays under `resnet/`,
  HWIO kernels, 1-D GroupNorm `gamma`/`beta`, a (1,1,C,K) `head/conv2d` kernel
  and a (K,) bias (shared/research/bit.md §1).
- `.h5`: a TF2 Keras `save_weights` HDF5 file, as tf.keras 2.3.0-tf (TensorFlow
  2.2.0, the version bit_tf2/requirements.txt pins) writes it for big_transfer's
  bit_tf2/models.py `ResnetV2(name="resnet")`: root attributes `layer_names`,
  `backend`, `keras_version`; one group per layer (`head/dense` nests in `head`)
  with attribute `weight_names` (an empty float array for weightless layers) and
  each weight stored at `<layer>/<variable name>`, e.g.
  `block1/resnet/block1/unit01/a/group_norm/gamma:0`. Per unit: `a` GN, `a` conv,
  `b` GN, `b` conv, `c` GN, `c` conv, then the `a/proj` conv LAST (created in
  `build()`); the head is a Dense `head/dense` with a 2-D (C,K) kernel. Whether
  the variable names carry the `resnet/` scope depends on how the saving script
  built the model (see `SCOPES`); Keras itself loads by position only.

Only numpy and h5py are used; the names, shapes and `.h5` order come from the
one statement of BiT's layout, `converters/families/bit.py`.
"""

from __future__ import annotations

import os
from typing import Mapping

import h5py
import numpy as np

# DEPTHS is re-exported: the writers of published variants take it from here with bit_arrays
from converters.families.bit import DEPTHS, PREFIX, UNIT, BitSpec, npz_shapes, tree_name, unit_weights  # noqa: F401

# The smallest layout the tests convert end to end: two units in block1 (a unit without a
# projection), GroupNorm(32)-compatible widths, a 10-way head.
TINY_BIT = dict(depths=(2, 1, 1, 1), root_width=32, num_classes=10)
# The variable-name scope `save_weights` stores, by how the model was first built (TF 2.2.0):
# called once eagerly, `model(x)`, every name starts with the model's name; built with
# `model.build((None, None, None, 3))`, as bit_tf2/train.py does, Keras calls `call()`
# outside the model's own name scope and the names start at the layer (`root_block/...`).
SCOPES = {"call": PREFIX, "build": ""}
KERAS_VERSION = "2.3.0-tf"  # tf.keras in TensorFlow 2.2.0


def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Realistic values: He-normal kernels, GN gamma ~ 1 + noise, small beta, small nonzero head."""
    if name.endswith("head/conv2d/kernel"):
        return rng.normal(0.0, 0.01, shape)
    if name.endswith("head/conv2d/bias"):
        return rng.normal(0.0, 0.01, shape)
    if name.endswith("/kernel"):  # HWIO: fan-in is H*W*I
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
    if name.endswith("/gamma"):
        return 1.0 + rng.normal(0.0, 0.1, shape)
    return rng.normal(0.0, 0.1, shape)  # beta


def _numbered(names: list[str]) -> dict[str, str]:
    """Keras-style global numbering: the first conv keeps `standardized_conv2d`, then `_1`, `_2`, ..."""
    renames, count = {}, 0
    for name in names:
        if "/standardized_conv2d/" in name:
            suffix = f"_{count}" if count else ""
            renames[name] = name.replace("/standardized_conv2d/", f"/standardized_conv2d{suffix}/")
            count += 1
    return renames


def bit_arrays(depths: tuple[int, ...] = DEPTHS[50], width: int = 1, num_classes: int = 1000,
               seed: int = 0, *, root_width: int | None = None,
               numbered_convs: bool = False) -> dict[str, np.ndarray]:
    """Random float32 BiT arrays under the exact original npz names.

    `width` is the published width factor (root width 64*width); `root_width`
    overrides it for tiny test models (GroupNorm(32) needs it divisible by 32,
    e.g. `depths=(1, 1, 1, 1), root_width=32`). `numbered_convs` renames conv
    scopes to `standardized_conv2d_N`, a spelling some published files use.
    """
    rng = np.random.default_rng(seed)
    shapes = npz_shapes(BitSpec(tuple(depths), root_width or 64 * width, num_classes))
    arrays = {k: _random_value(k, s, rng).astype(np.float32) for k, s in shapes.items()}
    if numbered_convs:
        renames = _numbered(list(arrays))
        arrays = {renames.get(k, k): v for k, v in arrays.items()}
    return arrays


def write_bit_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the arrays as the original flat, uncompressed `np.savez` (float32), at exactly `path`."""
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})


# ---------------------------------------------------------------------------
# TF2 Keras `save_weights` HDF5
# ---------------------------------------------------------------------------


def keras_layers(arrays: Mapping[str, np.ndarray], scope: str = PREFIX,
                 ) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The TF2 Keras layers of a BiT and their `(weight name, array)` in saved order.

    Layers with weights: `root_block`, `block1`..`block4`, `group_norm`,
    `head/dense`. Inside a block, units in order, each `a` GN, `a` conv, `b` GN,
    `b` conv, `c` GN, `c` conv, then `a/proj` (built last). Weight names are the
    Keras variable names, `scope` + npz name + `:0`; the Dense head kernel is (C, K).
    """
    canon = {tree_name(k): np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    layers = [("root_block", ["root_block/standardized_conv2d/kernel"])]
    for b in range(1, 5):
        count = len({name.split("/")[1] for name in canon if name.startswith(f"block{b}/")})
        names = [f"{UNIT.format(b=b, u=u)}/{k}" for u in range(1, count + 1) for k in unit_weights(u == 1)]
        layers.append((f"block{b}", names))
    layers.append(("group_norm", ["group_norm/gamma", "group_norm/beta"]))
    head = [(f"{scope}head/dense/kernel:0", canon["head/conv2d/kernel"][0, 0]),  # (1,1,C,K) -> (C,K)
            (f"{scope}head/dense/bias:0", canon["head/conv2d/bias"])]
    return [(layer, [(f"{scope}{n}:0", canon[n]) for n in names]) for layer, names in layers] + \
        [("head/dense", head)]


def write_bit_h5(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *,
                 built_by: str = "call", weightless_layers: bool = True) -> None:
    """Write the arrays as a TF2 Keras `save_weights` HDF5 file, with h5py only.

    The layout is the one tf.keras 2.3.0-tf writes for bit_tf2's `ResnetV2`: root
    attributes `layer_names` (fixed-length bytes), `backend` and `keras_version`;
    a group per layer, created in name order, with attribute `weight_names` and a
    dataset per weight at `<layer>/<weight name>`. `built_by` ("call" or "build",
    see `SCOPES`) picks the variable-name scope. `weightless_layers` keeps the
    weight-free pre-head `re_lu_<3 * units>` (every unit made three ReLUs before
    it) and `global_average_pooling2d` layers that Keras lists.
    """
    layers = keras_layers(arrays, SCOPES[built_by])
    if weightless_layers:
        units = sum(n.endswith("/c/standardized_conv2d/kernel:0") for _, w in layers for n, _ in w)
        layers[-1:-1] = [(f"re_lu_{3 * units}", []), ("global_average_pooling2d", [])]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name, _ in layers], dtype="S")
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = KERAS_VERSION.encode()
        for layer, weights in sorted(layers, key=lambda item: item[0]):  # as Keras: by name
            group = f.create_group(layer)
            names = [n.encode() for n, _ in weights]
            # Keras stores np.asarray(names): fixed-length bytes, an empty float64 array if none.
            group.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([])
            for name, value in weights:
                group.create_dataset(name, data=value)

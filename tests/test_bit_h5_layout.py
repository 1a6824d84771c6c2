"""The BiT `.h5` layout, pinned to what TF2 Keras really writes.

The literals below were observed by running google-research/big_transfer
bit_tf2/models.py (commit 140de6e, unchanged) under TensorFlow 2.2.0 with
tf.keras 2.3.0-tf and h5py 2.10.0 (bit_tf2/requirements.txt pins
tensorflow==2.2.0): `ResnetV2(num_units=(2, 1, 1, 1), num_outputs=10,
filters_factor=2, name="resnet")` (the `TINY_BIT` layout), first built either
by one eager call `model(x)` or by `model.build((None, None, None, 3))` as
bit_tf2/train.py does, then `model.save_weights("tiny.h5")`. The same TF 2.2.0
model also loads `write_bit_h5`'s file with `load_weights` and saves it back
unchanged, and its logits match the converted transformers model to 2e-6.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from checkpoints.synthetic import TINY_BIT, bit_arrays, write_bit_h5
from converters.bit import convert, name_h5_positions
from converters.errors import InputError
from converters.readers.keras_h5 import read_keras_h5

# Root attribute `layer_names`: the model's layers in `model.layers` order. The pre-head
# ReLU is Keras' 16th `re_lu` of the process (five units made three each before it).
LAYER_NAMES = ["root_block", "block1", "block2", "block3", "block4", "group_norm",
               "re_lu_15", "global_average_pooling2d", "head/dense"]

# Attribute `weight_names` of each layer group, with the shape of each weight, after an
# eager call (`model(x)`). In a unit the `a/proj` conv comes LAST: it is created in
# `BottleneckV2Unit.build()`, after `__init__` assigned the a, a-conv, b and c layers.
WEIGHTS_CALL = {
    "root_block": [("resnet/root_block/standardized_conv2d/kernel:0", (7, 7, 3, 32))],
    "block1": [
        ("resnet/block1/unit01/a/group_norm/gamma:0", (32,)),
        ("resnet/block1/unit01/a/group_norm/beta:0", (32,)),
        ("resnet/block1/unit01/a/standardized_conv2d/kernel:0", (1, 1, 32, 32)),
        ("resnet/block1/unit01/b/group_norm/gamma:0", (32,)),
        ("resnet/block1/unit01/b/group_norm/beta:0", (32,)),
        ("resnet/block1/unit01/b/standardized_conv2d/kernel:0", (3, 3, 32, 32)),
        ("resnet/block1/unit01/c/group_norm/gamma:0", (32,)),
        ("resnet/block1/unit01/c/group_norm/beta:0", (32,)),
        ("resnet/block1/unit01/c/standardized_conv2d/kernel:0", (1, 1, 32, 128)),
        ("resnet/block1/unit01/a/proj/standardized_conv2d/kernel:0", (1, 1, 32, 128)),
        ("resnet/block1/unit02/a/group_norm/gamma:0", (128,)),
        ("resnet/block1/unit02/a/group_norm/beta:0", (128,)),
        ("resnet/block1/unit02/a/standardized_conv2d/kernel:0", (1, 1, 128, 32)),
        ("resnet/block1/unit02/b/group_norm/gamma:0", (32,)),
        ("resnet/block1/unit02/b/group_norm/beta:0", (32,)),
        ("resnet/block1/unit02/b/standardized_conv2d/kernel:0", (3, 3, 32, 32)),
        ("resnet/block1/unit02/c/group_norm/gamma:0", (32,)),
        ("resnet/block1/unit02/c/group_norm/beta:0", (32,)),
        ("resnet/block1/unit02/c/standardized_conv2d/kernel:0", (1, 1, 32, 128)),
    ],
    "block2": [
        ("resnet/block2/unit01/a/group_norm/gamma:0", (128,)),
        ("resnet/block2/unit01/a/group_norm/beta:0", (128,)),
        ("resnet/block2/unit01/a/standardized_conv2d/kernel:0", (1, 1, 128, 64)),
        ("resnet/block2/unit01/b/group_norm/gamma:0", (64,)),
        ("resnet/block2/unit01/b/group_norm/beta:0", (64,)),
        ("resnet/block2/unit01/b/standardized_conv2d/kernel:0", (3, 3, 64, 64)),
        ("resnet/block2/unit01/c/group_norm/gamma:0", (64,)),
        ("resnet/block2/unit01/c/group_norm/beta:0", (64,)),
        ("resnet/block2/unit01/c/standardized_conv2d/kernel:0", (1, 1, 64, 256)),
        ("resnet/block2/unit01/a/proj/standardized_conv2d/kernel:0", (1, 1, 128, 256)),
    ],
    "block3": [
        ("resnet/block3/unit01/a/group_norm/gamma:0", (256,)),
        ("resnet/block3/unit01/a/group_norm/beta:0", (256,)),
        ("resnet/block3/unit01/a/standardized_conv2d/kernel:0", (1, 1, 256, 128)),
        ("resnet/block3/unit01/b/group_norm/gamma:0", (128,)),
        ("resnet/block3/unit01/b/group_norm/beta:0", (128,)),
        ("resnet/block3/unit01/b/standardized_conv2d/kernel:0", (3, 3, 128, 128)),
        ("resnet/block3/unit01/c/group_norm/gamma:0", (128,)),
        ("resnet/block3/unit01/c/group_norm/beta:0", (128,)),
        ("resnet/block3/unit01/c/standardized_conv2d/kernel:0", (1, 1, 128, 512)),
        ("resnet/block3/unit01/a/proj/standardized_conv2d/kernel:0", (1, 1, 256, 512)),
    ],
    "block4": [
        ("resnet/block4/unit01/a/group_norm/gamma:0", (512,)),
        ("resnet/block4/unit01/a/group_norm/beta:0", (512,)),
        ("resnet/block4/unit01/a/standardized_conv2d/kernel:0", (1, 1, 512, 256)),
        ("resnet/block4/unit01/b/group_norm/gamma:0", (256,)),
        ("resnet/block4/unit01/b/group_norm/beta:0", (256,)),
        ("resnet/block4/unit01/b/standardized_conv2d/kernel:0", (3, 3, 256, 256)),
        ("resnet/block4/unit01/c/group_norm/gamma:0", (256,)),
        ("resnet/block4/unit01/c/group_norm/beta:0", (256,)),
        ("resnet/block4/unit01/c/standardized_conv2d/kernel:0", (1, 1, 256, 1024)),
        ("resnet/block4/unit01/a/proj/standardized_conv2d/kernel:0", (1, 1, 512, 1024)),
    ],
    "group_norm": [("resnet/group_norm/gamma:0", (1024,)), ("resnet/group_norm/beta:0", (1024,))],
    "re_lu_15": [],
    "global_average_pooling2d": [],
    "head/dense": [("resnet/head/dense/kernel:0", (1024, 10)), ("resnet/head/dense/bias:0", (10,))],
}

# After `model.build(...)` Keras runs `call()` outside the model's own name scope: the same
# names without `resnet/` (observed for every layer; these four written out).
WEIGHT_NAMES_BUILD = {
    "root_block": ["root_block/standardized_conv2d/kernel:0"],
    "block2": ["block2/unit01/a/group_norm/gamma:0", "block2/unit01/a/group_norm/beta:0",
               "block2/unit01/a/standardized_conv2d/kernel:0",
               "block2/unit01/b/group_norm/gamma:0", "block2/unit01/b/group_norm/beta:0",
               "block2/unit01/b/standardized_conv2d/kernel:0",
               "block2/unit01/c/group_norm/gamma:0", "block2/unit01/c/group_norm/beta:0",
               "block2/unit01/c/standardized_conv2d/kernel:0",
               "block2/unit01/a/proj/standardized_conv2d/kernel:0"],
    "group_norm": ["group_norm/gamma:0", "group_norm/beta:0"],
    "head/dense": ["head/dense/kernel:0", "head/dense/bias:0"],
}

# Each weight is a dataset at `<layer group>/<weight name>`, intermediate groups implied.
SOME_DATASETS_CALL = [
    "root_block/resnet/root_block/standardized_conv2d/kernel:0",
    "block1/resnet/block1/unit01/a/proj/standardized_conv2d/kernel:0",
    "group_norm/resnet/group_norm/gamma:0",
    "head/dense/resnet/head/dense/kernel:0",
]
SOME_DATASETS_BUILD = [
    "root_block/root_block/standardized_conv2d/kernel:0",
    "block1/block1/unit01/a/proj/standardized_conv2d/kernel:0",
    "group_norm/group_norm/gamma:0",
    "head/dense/head/dense/kernel:0",
]


def _expected(built_by: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    if built_by == "call":
        return WEIGHTS_CALL
    return {layer: [(n.removeprefix("resnet/"), s) for n, s in weights]
            for layer, weights in WEIGHTS_CALL.items()}


def _written(tmp_path: Path, built_by: str = "call", seed: int = 0) -> tuple[Path, dict]:
    arrays = bit_arrays(**TINY_BIT, seed=seed)
    path = tmp_path / f"tiny-{built_by}.h5"
    write_bit_h5(path, arrays, built_by=built_by)
    return path, arrays


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    f.visititems(lambda name, obj: found.update({name: obj}) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.parametrize("built_by", ["call", "build"])
def test_synthetic_h5_has_the_names_tf_keras_writes(tmp_path, built_by):
    path, _ = _written(tmp_path, built_by)
    expected = _expected(built_by)
    with h5py.File(path, "r") as f:
        assert f.attrs["layer_names"].dtype.kind == "S"  # fixed-length bytes, as np.asarray writes
        assert [n.decode() for n in f.attrs["layer_names"]] == LAYER_NAMES
        assert f.attrs["backend"] == "tensorflow" and f.attrs["keras_version"] == "2.3.0-tf"
        attrs = {layer: f[layer].attrs["weight_names"] for layer in LAYER_NAMES}
        datasets = {p: (d.shape, d.dtype, d.chunks) for p, d in _datasets(f).items()}
    written = {layer: [n.decode() for n in names] for layer, names in attrs.items()}
    assert written == {layer: [n for n, _ in weights] for layer, weights in expected.items()}
    if built_by == "build":
        assert {layer: written[layer] for layer in WEIGHT_NAMES_BUILD} == WEIGHT_NAMES_BUILD
    for layer in ("re_lu_15", "global_average_pooling2d"):  # Keras writes np.asarray([])
        assert attrs[layer].dtype == np.float64 and attrs[layer].shape == (0,)
    assert datasets == {f"{layer}/{n}": (s, np.float32, None)
                        for layer, weights in expected.items() for n, s in weights}
    assert set(SOME_DATASETS_CALL if built_by == "call" else SOME_DATASETS_BUILD) <= set(datasets)


@pytest.mark.parametrize("built_by", ["call", "build"])
def test_both_spellings_convert_to_the_same_npz_names(tmp_path, built_by):
    path, arrays = _written(tmp_path, built_by)
    checkpoint = read_keras_h5(path)
    assert [layer for layer, _ in checkpoint.meta["order"]] == LAYER_NAMES
    tensors = name_h5_positions(checkpoint)
    arrays["resnet/head/dense/kernel"] = arrays.pop("resnet/head/conv2d/kernel")[0, 0]
    arrays["resnet/head/dense/bias"] = arrays.pop("resnet/head/conv2d/bias")
    assert tensors.keys() == arrays.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(tensor.load(), arrays[name], err_msg=name)
    assert convert(checkpoint).variant == "R17x0.5"


def _rewrite_weight_names(path: Path, layer: str, rename) -> None:
    """Rename the datasets of one layer group and its `weight_names`, keeping the order."""
    with h5py.File(path, "a") as f:
        group = f[layer]
        old = [n.decode() for n in group.attrs["weight_names"]]
        new = [rename(i, n) for i, n in enumerate(old)]
        values = [group[n][()] for n in old]
        for n in old:
            del group[n]
        for n, value in zip(new, values):
            group.create_dataset(n, data=value)
        group.attrs["weight_names"] = np.array([n.encode() for n in new], dtype="S")


def test_names_only_known_by_position_still_convert(tmp_path):
    """A later Keras may store short or opaque names: the order and shapes are enough."""
    path, _ = _written(tmp_path)
    reference = {k: t.load() for k, t in name_h5_positions(read_keras_h5(path)).items()}
    for layer in ("root_block", "block1", "block2", "group_norm", "head/dense"):
        _rewrite_weight_names(path, layer, lambda i, n: f"w{i}/{n.split('/')[-1]}")
    tensors = name_h5_positions(read_keras_h5(path))
    assert tensors.keys() == reference.keys()
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(tensor.load(), reference[name], err_msg=name)


def test_full_name_that_disagrees_with_its_position_is_refused(tmp_path):
    """block2: stored c-conv and proj names swapped (shapes differ, so Keras would put them wrong)."""
    path, _ = _written(tmp_path)
    swap = {8: 9, 9: 8}
    names = [n for n, _ in WEIGHTS_CALL["block2"]]
    _rewrite_weight_names(path, "block2", lambda i, n: names[swap.get(i, i)])
    with pytest.raises(InputError, match=r"h5 layer 'block2' stores "
                                         r"'resnet/block2/unit01/a/proj/standardized_conv2d/kernel' "
                                         r"at position 8, where Keras' order puts "
                                         r"'resnet/block2/unit01/c/standardized_conv2d/kernel'"):
        name_h5_positions(read_keras_h5(path))


@pytest.mark.parametrize("extra, first", [("extra/group_norm", "group_norm"), ("more/block2", "block2")])
def test_two_layers_with_the_same_names_are_refused(tmp_path, extra, first):
    """A layer named like another one (same last part) would silently replace its weights."""
    path, _ = _written(tmp_path)
    with h5py.File(path, "a") as f:
        f.copy(f[first], extra)
        names = [n.decode() for n in f.attrs["layer_names"]]
        names.insert(names.index(first) + 1, extra)
        f.attrs["layer_names"] = np.array([n.encode() for n in names], dtype="S")
    with pytest.raises(InputError, match=rf"h5 layers '{first}' and '{extra}' both hold "
                                         rf"'resnet/{first}/[^']+': one layer each is expected"):
        name_h5_positions(read_keras_h5(path))

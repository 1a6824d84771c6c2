"""BiT (ResNet-v2, GroupNorm, weight standardization) → transformers `BitForImageClassification`.

Sources: Google's `.npz` (flat names under `resnet/`, HWIO kernels, the head as a
(1,1,C,K) conv) and TF2 Keras `.h5` (the same arrays, the head as a (C,K) Dense,
and names whose meaning is positional). Everything about the variant (units per
block, width, classes) is read from the shapes; no flag is needed.
"""

from __future__ import annotations

import re

import numpy as np

from converters.errors import InputError
from converters.families.bit import (GROUPS, NUMBERED_CONV, PREFIX, ROOT_KERNEL, BitSpec, infer_spec,
                                     target_shapes, unit_weights)
from converters.family import Conversion
from converters.rules import Compose, Rename, Reshape, Rule, Transpose, apply_rules
from converters.tensors import Checkpoint, LazyTensor

HWIO_TO_OIHW = Transpose((3, 2, 0, 1))
UNIT = PREFIX + "block{b}/unit{u:02d}"
LAYER = "bit.encoder.stages.{b-1}.layers.{u-1}"


def is_bit(checkpoint: Checkpoint) -> bool:
    """A BiT file: npz names under `resnet/`, or an h5 whose first layer is `root_block`."""
    if checkpoint.format == "keras-h5":
        order = checkpoint.meta.get("order") or []
        return bool(order) and order[0][0].split("/")[-1] == "root_block"
    return ROOT_KERNEL in checkpoint.tensors or any(
        k.startswith("resnet/root_block/") for k in checkpoint.tensors)


# ---------------------------------------------------------------------------
# Source names: npz spelling quirk, and h5 positions → npz names


def normalise_npz_names(tensors: dict[str, LazyTensor]) -> tuple[dict[str, LazyTensor], int]:
    """Rewrite `/standardized_conv2d_N/` to `/standardized_conv2d/`, as big_vision does for
    "some files containing weird naming of variables"; returns the count rewritten."""
    out: dict[str, LazyTensor] = {}
    renamed = 0
    for key, tensor in tensors.items():
        new = NUMBERED_CONV.sub("/standardized_conv2d/", key)
        renamed += new != key
        if new in out:
            raise InputError(None, f"{key} and another key both normalise to {new}")
        out[new] = tensor
    return out, renamed


def _h5_layer_names(layer: str, count: int) -> list[str]:
    """npz-style names for the `count` weights of one h5 layer group, in stored order."""
    leaf = layer.split("/")[-1]
    if leaf == "root_block":
        return [ROOT_KERNEL]
    if leaf == "group_norm":
        return ["resnet/group_norm/gamma", "resnet/group_norm/beta"]
    if layer.endswith("head/dense") or leaf == "dense":
        return ["resnet/head/dense/kernel", "resnet/head/dense/bias"]
    block = re.fullmatch(r"block(\d)", leaf)
    if block is None or (count - 1) % 9:
        raise InputError(None, f"unexpected h5 layer {layer!r} with {count} weights")
    units = (count - 1) // 9
    b = int(block.group(1))
    return [f"{UNIT.format(b=b, u=u)}/{name}" for u in range(1, units + 1) for name in unit_weights(u == 1)]


# A stored name that spells a full BiT path (TF 2.2 writes `resnet/block1/unit01/a/...:0` when
# the model was called eagerly, `block1/unit01/a/...:0` after `model.build`) must agree with
# its position; other spellings (a later Keras may drop the outer scopes) are taken by position.
_FULL_H5_NAME = re.compile(r"(?:resnet/)?((?:root_block|block\d+/unit\d+|head/dense)/.+)")


def name_h5_positions(checkpoint: Checkpoint) -> dict[str, LazyTensor]:
    """Give the positional h5 weights their npz names (Keras loads h5 weights by order).

    Where a stored weight name is itself a full BiT path it must name the same
    weight as its position, otherwise the file did not come from bit_tf2's model
    and `InputError` names the weight. Two layers that map to the same names
    (`group_norm` and `extra/group_norm`) are refused naming both, since either
    would otherwise overwrite the other unseen.
    """
    out: dict[str, LazyTensor] = {}
    owner: dict[str, str] = {}
    for layer, weights in checkpoint.meta["order"]:
        if not weights:
            continue
        names = _h5_layer_names(layer, len(weights))
        if len(names) != len(weights):
            raise InputError(checkpoint.path, f"h5 layer {layer!r} holds {len(weights)} weights, "
                                              f"expected {len(names)}")
        clash = next((name for name in names if name in owner), None)
        if clash:
            raise InputError(checkpoint.path, f"h5 layers {owner[clash]!r} and {layer!r} both hold "
                                              f"{clash!r}: one layer each is expected")
        owner.update(dict.fromkeys(names, layer))
        for index, (name, weight) in enumerate(zip(names, weights)):
            stored = _FULL_H5_NAME.fullmatch(weight)
            if stored and NUMBERED_CONV.sub("/standardized_conv2d/", stored.group(1)) != \
                    name.removeprefix("resnet/"):
                raise InputError(checkpoint.path, f"h5 layer {layer!r} stores {weight!r} at position "
                                                  f"{index}, where Keras' order puts {name!r}")
            out[name] = checkpoint.tensors[f"{layer}/{weight}"]
    return out


# ---------------------------------------------------------------------------
# The rule table

def bit_rules(spec: BitSpec) -> list[Rule]:
    """Original names → transformers names, with the layout changes, for one variant."""
    width = spec.hidden_sizes[-1]
    head = (Rename("resnet/head/conv2d/kernel", "classifier.1.weight",
                   Compose((Reshape((1, 1, width, spec.num_classes), (width, spec.num_classes)),
                            Transpose((1, 0)))))
            if spec.head == "conv2d" else
            Rename("resnet/head/dense/kernel", "classifier.1.weight", Transpose((1, 0))))
    return [
        Rename(ROOT_KERNEL, "bit.embedder.convolution.weight", HWIO_TO_OIHW),
        Rename(f"{UNIT}/a/proj/standardized_conv2d/kernel", f"{LAYER}.downsample.conv.weight", HWIO_TO_OIHW),
        *[rule for part, n in zip("abc", "123") for rule in (
            Rename(f"{UNIT}/{part}/group_norm/gamma", f"{LAYER}.norm{n}.weight"),
            Rename(f"{UNIT}/{part}/group_norm/beta", f"{LAYER}.norm{n}.bias"),
            Rename(f"{UNIT}/{part}/standardized_conv2d/kernel", f"{LAYER}.conv{n}.weight", HWIO_TO_OIHW))],
        Rename("resnet/group_norm/gamma", "bit.norm.weight"),
        Rename("resnet/group_norm/beta", "bit.norm.bias"),
        head,
        Rename(f"resnet/head/{spec.head}/bias", "classifier.1.bias"),
    ]


def hf_config(spec: BitSpec, id2label: dict[int, str] | None) -> dict:
    """The exact `BitConfig`: BiT's fixed symmetric padding and widths given explicitly.

    `global_padding=None` + `embedding_dynamic_padding=False` is BiT's fixed
    padding with a zero-padded max-pool ("SAME" is TF padding and changes
    outputs at even sizes). Widths go through `embedding_size`/`hidden_sizes`
    because `width_factor` scales only the stages and crashes for x3/x4.
    """
    labels = id2label or {i: f"LABEL_{i}" for i in range(spec.num_classes)}
    return {
        "model_type": "bit", "architectures": ["BitForImageClassification"],
        "layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False,
        "num_channels": 3, "embedding_size": spec.embedding_size, "hidden_sizes": list(spec.hidden_sizes),
        "depths": list(spec.depths), "num_groups": GROUPS, "hidden_act": "relu", "output_stride": 32,
        "width_factor": 1, "drop_path_rate": 0.0,
        "id2label": {str(i): v for i, v in labels.items()}, "label2id": {v: i for i, v in labels.items()},
    }


def preprocessor_config(size: int = 480) -> dict:
    """BiT's own eval: squash (no crop) to size×size bilinear, pixels to [-1, 1]."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,  # PIL bilinear
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def convert(checkpoint: Checkpoint) -> Conversion:
    """Map a BiT checkpoint onto `BitForImageClassification`, strictly and lazily.

    1000- and 21843-way heads get the ImageNet-1k / Google ImageNet-21k labels.
    """
    from checkpoints.labels import imagenet_id2label

    notes: list[str] = []
    if checkpoint.format == "keras-h5":
        tensors = name_h5_positions(checkpoint)
        notes.append("h5 weights named by position (TF2 Keras order: a/proj last in unit01).")
    else:
        try:
            tensors, renamed = normalise_npz_names(checkpoint.tensors)
        except InputError as e:
            raise InputError(checkpoint.path, e.problem) from None
        if renamed:
            notes.append(f"{renamed} keys spelled standardized_conv2d_N were normalised.")
    try:
        spec = infer_spec({key: tensor.shape for key, tensor in tensors.items()})
    except InputError as e:
        raise InputError(checkpoint.path, e.problem) from None
    config = hf_config(spec, imagenet_id2label(spec.num_classes))
    expected = target_shapes(config)  # == BitForImageClassification's state dict (tests/test_shapes.py)
    mapped = apply_rules(tensors, bit_rules(spec), expected, path=str(checkpoint.path))
    notes.append("Weight standardization: the original uses eps 1e-10 inside the sqrt; "
                 "transformers' WeightStandardizedConv2d uses 1e-8 (measured effect in the parity table).")
    return Conversion("bit", spec.name, mapped.tensors, config, preprocessor_config(),
                      mapped.dropped, notes)


def source_arrays(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """The original arrays under npz names and layouts, for the source-side reference.

    `.h5` weights are named by position and the Dense head (C,K) becomes the
    npz's (1,1,C,K) `head/conv2d`; `standardized_conv2d_N` spellings are normalised.
    """
    if checkpoint.format == "keras-h5":
        tensors = name_h5_positions(checkpoint)
    else:
        tensors = normalise_npz_names(checkpoint.tensors)[0]
    arrays = {k: t.load() for k, t in tensors.items()}
    if "resnet/head/dense/kernel" in arrays:
        arrays["resnet/head/conv2d/kernel"] = arrays.pop("resnet/head/dense/kernel")[None, None]
        arrays["resnet/head/conv2d/bias"] = arrays.pop("resnet/head/dense/bias")
    return arrays

"""BiT (Big Transfer) ResNet-v2 in TensorFlow 2, fed in the TF2 Keras `.h5` weight order.

A second, independent source for BiT's `.h5` files (bit_tf2's Keras model saved
with `save_weights`). Keras HDF5 weights load by POSITION, so this model lists
its variables in exactly that order (`keras_weight_names`): `root_block`,
then per block and unit `a` GN gamma/beta, `a` conv, `b` GN, `b` conv, `c` GN,
`c` conv and the `a/proj` conv LAST, then the pre-head `group_norm` and the Dense
`head/dense` (kernel (C, K), bias (K,)). Kernels are HWIO, feature maps NHWC.

It is written with plain `tf.nn` ops rather than Keras layers, so it does not
depend on the Keras version that ships with TensorFlow. TensorFlow is an
optional extra: it is imported inside the functions that need it.

Math as the Flax/PyTorch references (shared/research/bit.md §3): WS eps 1e-10
inside the sqrt, GroupNorm(32) two-pass eps 1e-5, fixed symmetric padding, stem
max-pool over ZERO padding, stride on the 3x3, projection on the pre-activated input.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from converters.families.bit import BLOCK_STRIDES, GROUPS, UNIT, UNIT_TAP, BitSpec, npz_shapes, tree_name, units


def _tensorflow() -> Any:
    """Import TensorFlow, loading torch's compiler stack (and triton) first.

    In this environment, importing triton (pulled in by `torch._dynamo`, e.g. via
    timm/torchvision) AFTER TensorFlow segfaults; the other order is fine.
    """
    import torch._dynamo  # noqa: F401  (load order matters, see above)
    import tensorflow as tf

    return tf


def keras_weight_shapes(config: BitSpec) -> dict[str, tuple[int, ...]]:
    """Weight names (npz names, head as `head/dense`) and shapes in TF2 Keras `save_weights` order."""
    npz = {tree_name(k): s for k, s in npz_shapes(config).items()}  # its unit order is Keras'
    order = ["root_block/standardized_conv2d/kernel", *(n for n in npz if n.startswith("block"))]
    shapes = {name: npz[name] for name in order + ["group_norm/gamma", "group_norm/beta"]}
    channels = npz["group_norm/gamma"][0]
    return shapes | {"head/dense/kernel": (channels, config.num_classes),
                     "head/dense/bias": (config.num_classes,)}


# ---------------------------------------------------------------------------
# Primitives (NHWC); `tf` is passed in so the module imports without TensorFlow
# ---------------------------------------------------------------------------

def standardize_weight(tf: Any, kernel: Any) -> Any:
    """Weight standardization of an HWIO kernel per output filter over H, W, I."""
    mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)  # biased variance
    return (kernel - mean) / tf.sqrt(var + 1e-10)  # eps 1e-10 INSIDE the sqrt (original code)


def fixed_pad(tf: Any, x: Any, k: int) -> Any:
    """BiT's input-size-independent symmetric zero padding for a k x k window (not TF "SAME")."""
    beg = (k - 1) // 2
    return tf.pad(x, [[0, 0], [beg, k - 1 - beg], [beg, k - 1 - beg], [0, 0]])


def std_conv(tf: Any, x: Any, kernel: Any, stride: int = 1) -> Any:
    """Bias-free weight-standardized conv: fixed padding, then VALID."""
    k = int(kernel.shape[0])
    return tf.nn.conv2d(fixed_pad(tf, x, k), standardize_weight(tf, kernel), stride, "VALID")


def group_norm(tf: Any, x: Any, gamma: Any, beta: Any) -> Any:
    """GroupNorm with 32 contiguous channel groups, two-pass biased variance, eps 1e-5."""
    shape = tf.shape(x)
    c = int(x.shape[-1])
    g = tf.reshape(x, tf.concat([shape[:3], [GROUPS, c // GROUPS]], 0))
    mean = tf.reduce_mean(g, axis=[1, 2, 4], keepdims=True)
    var = tf.reduce_mean(tf.square(g - mean), axis=[1, 2, 4], keepdims=True)
    g = (g - mean) / tf.sqrt(var + 1e-5)  # eps 1e-5 inside the sqrt, as the original
    return tf.reshape(g, shape) * gamma + beta


def max_pool_zero_padded(tf: Any, x: Any) -> Any:
    """The stem pool: ZERO-pad 1 (`tf.pad`), then 3x3/2 max-pool VALID (not "SAME", not -inf)."""
    return tf.nn.max_pool2d(fixed_pad(tf, x, 3), 3, 2, "VALID")


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class BiTTF:
    """BiT ResNet-v2 over `tf.Variable`s named as in the `.h5`; `model(x NHWC)` returns `(logits, taps)`.

    Taps as the other references: `stem`, `block{b}.unit{u:02d}`, `norm`,
    `pre_logits`, `logits`. Fill it with `assign_keras_order` (positional, as
    Keras loads `.h5`) or `assign_npz` (original npz names).
    """

    def __init__(self, config: BitSpec) -> None:
        self.tf = tf = _tensorflow()
        self.config = config
        self.shapes = keras_weight_shapes(config)
        self.weights = {name: tf.Variable(tf.zeros(shape), name=name.replace("/", "__"))
                        for name, shape in self.shapes.items()}

    def assign_keras_order(self, values: Sequence[np.ndarray]) -> None:
        """Assign weights by position in the Keras order, checking count and every shape."""
        if len(values) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} weights, got {len(values)}")
        for (name, shape), value in zip(self.shapes.items(), values):
            if tuple(np.shape(value)) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {np.shape(value)}")
            self.weights[name].assign(np.asarray(value, dtype=np.float32))

    def assign_npz(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Assign from original npz arrays; the (1,1,C,K) `head/conv2d` kernel becomes the Dense (C,K)."""
        canon = {tree_name(k): v for k, v in arrays.items()}
        canon["head/dense/kernel"] = np.asarray(canon.pop("head/conv2d/kernel"))[0, 0]
        canon["head/dense/bias"] = canon.pop("head/conv2d/bias")
        self.assign_keras_order([canon[name] for name in self.shapes])

    def _unit(self, x: Any, unit: str, stride: int) -> Any:
        tf, w = self.tf, self.weights
        gn = lambda h, part: tf.nn.relu(group_norm(tf, h, w[f"{unit}/{part}/group_norm/gamma"],
                                                   w[f"{unit}/{part}/group_norm/beta"]))
        conv = lambda h, part, s=1: std_conv(tf, h, w[f"{unit}/{part}/standardized_conv2d/kernel"], s)
        y = gn(x, "a")  # N, H, W, Cin
        shortcut = conv(y, "a/proj", stride) if f"{unit}/a/proj/standardized_conv2d/kernel" in w else x
        h = conv(gn(conv(y, "a"), "b"), "b", stride)  # stride on the 3x3
        return conv(gn(h, "c"), "c") + shortcut

    def __call__(self, x: Any) -> tuple[Any, dict[str, Any]]:
        tf, w = self.tf, self.weights
        x = std_conv(tf, tf.convert_to_tensor(x, tf.float32), w["root_block/standardized_conv2d/kernel"], 2)
        taps = {"stem": max_pool_zero_padded(tf, x)}  # N, H/4, W/4, W
        x = taps["stem"]
        for b, u in units(self.config):
            stride = BLOCK_STRIDES[b - 1] if u == 1 else 1
            x = taps[UNIT_TAP.format(b=b, u=u)] = self._unit(x, UNIT.format(b=b, u=u), stride)
        taps["norm"] = tf.nn.relu(group_norm(tf, x, w["group_norm/gamma"], w["group_norm/beta"]))
        taps["pre_logits"] = tf.reduce_mean(taps["norm"], axis=[1, 2])  # N, C
        taps["logits"] = tf.matmul(taps["pre_logits"], w["head/dense/kernel"]) + w["head/dense/bias"]
        return taps["logits"], taps

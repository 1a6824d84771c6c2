"""BiT (Big Transfer) ResNet-v2 in JAX/Flax linen, consuming the original npz as its params.

The module tree is the original `.npz` tree, so `params_from_npz` only strips
`resnet/` and splits names on `/`:

    root_block/standardized_conv2d/kernel                 (7, 7, 3, W)   HWIO
    block{b}/unit{u:02d}/{a,b,c}/group_norm/{gamma,beta}  (C,)  1-D, as stored
    block{b}/unit{u:02d}/{a,b,c}/standardized_conv2d/kernel              HWIO
    block{b}/unit01/a/proj/standardized_conv2d/kernel                    HWIO
    group_norm/{gamma,beta}
    head/conv2d/kernel (1, 1, C, K), head/conv2d/bias (K,)

The PyTorch reference (reference/bit_torch.py) has the same tree and names;
feature maps here are NHWC. Every conv and dot runs at
`jax.lax.Precision.HIGHEST` so that fp32 parity is not limited by TF32/bf16
passes on accelerators.

Math (shared/research/bit.md §3): weight standardization per output filter over
H, W, I with eps 1e-10 inside the sqrt; GroupNorm(32) two-pass, eps 1e-5; fixed
symmetric padding + VALID; stem max-pool over ZERO padding; pre-activation
bottleneck, stride on the 3x3, projection on the pre-activated input.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from converters.families.bit import BLOCK_STRIDES, GROUPS, UNIT_TAP, BitSpec, spec_from_arrays, tree_name

__all__ = ["BiT", "BitSpec", "spec_from_arrays", "params_from_npz", "from_npz",
           "standardize_weight", "max_pool_zero_padded"]

HIGHEST = jax.lax.Precision.HIGHEST

# ---------------------------------------------------------------------------
# Primitives (NHWC)
# ---------------------------------------------------------------------------


def standardize_weight(kernel: jax.Array) -> jax.Array:
    """Weight standardization of an HWIO kernel per output filter over H, W, I."""
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)  # biased
    # eps 1e-10 INSIDE the sqrt, as in the original code (timm/transformers use 1e-8).
    return (kernel - mean) / jnp.sqrt(var + 1e-10)


def fixed_pad(x: jax.Array, k: int) -> jax.Array:
    """BiT's input-size-independent symmetric zero padding for a k x k window (not TF "SAME")."""
    beg = (k - 1) // 2
    end = k - 1 - beg
    return jnp.pad(x, ((0, 0), (beg, end), (beg, end), (0, 0)), constant_values=0.0)


def max_pool_zero_padded(x: jax.Array) -> jax.Array:
    """The stem pool: ZERO-pad 1, then 3x3/2 max-pool VALID.

    Flax's `nn.max_pool(padding=((1, 1), (1, 1)))` pads with -inf instead, which
    changes border outputs wherever the root conv output is negative.
    """
    x = fixed_pad(x, 3)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class StdConv(nn.Module):
    """Bias-free weight-standardized conv with fixed padding; `kernel` is HWIO."""

    features: int
    k: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.k, self.k, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.he_normal(), shape)
        return jax.lax.conv_general_dilated(
            fixed_pad(x, self.k), standardize_weight(kernel), (self.stride, self.stride), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


class GroupNorm(nn.Module):
    """GroupNorm with 32 contiguous channel groups, two-pass biased variance, eps 1e-5."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        gamma = self.param("gamma", nn.initializers.ones, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        g = x.reshape(n, h, w, GROUPS, c // GROUPS)
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
        g = (g - mean) / jnp.sqrt(var + 1e-5)  # eps 1e-5 inside the sqrt, as the original
        return g.reshape(n, h, w, c) * gamma + beta


class Projection(nn.Module):
    """The strided 1x1 shortcut `a/proj/standardized_conv2d` of each block's unit01."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return StdConv(self.features, 1, self.stride, name="standardized_conv2d")(x)


class PreActConv(nn.Module):
    """One of a unit's `a`/`b`/`c` parts: ReLU(GN(x)) then a StdConv (plus `proj` in unit01/a)."""

    features: int
    k: int
    stride: int = 1
    proj_features: int | None = None
    proj_stride: int = 1

    def setup(self) -> None:
        self.group_norm = GroupNorm()
        self.standardized_conv2d = StdConv(self.features, self.k, self.stride)
        if self.proj_features:
            self.proj = Projection(self.proj_features, self.proj_stride)

    def preact(self, x: jax.Array) -> jax.Array:
        return nn.relu(self.group_norm(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.standardized_conv2d(self.preact(x))


class Unit(nn.Module):
    """Pre-activation bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1, no activation after the add."""

    mid: int
    out: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        needs_proj = self.stride != 1 or x.shape[-1] != self.out  # exactly unit01 of each block
        a = PreActConv(self.mid, 1, proj_features=self.out if needs_proj else None,
                       proj_stride=self.stride, name="a")
        y = a.preact(x)  # N, H, W, Cin
        shortcut = a.proj(y) if needs_proj else x  # proj reads the PRE-ACTIVATED input
        h = PreActConv(self.mid, 3, self.stride, name="b")(a.standardized_conv2d(y))
        return PreActConv(self.out, 1, name="c")(h) + shortcut  # N, H/s, W/s, Out


class Conv1x1(nn.Module):
    """A plain 1x1 conv with bias (`kernel` (1, 1, C, K), `bias` (K,)), applied to pooled (N, C)."""

    features: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        shape = (1, 1, pooled.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.zeros, shape)  # BiT heads start at zero
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.dot(pooled, kernel[0, 0], precision=HIGHEST) + bias  # N, K


class Head(nn.Module):
    """The classifier, stored as the 1x1 conv `head/conv2d` (not weight-standardized)."""

    num_classes: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        return Conv1x1(self.num_classes, name="conv2d")(pooled)


class RootBlock(nn.Module):
    """Stem: StdConv 7x7/2 (pad 3), zero-pad 1, 3x3/2 max-pool VALID; no norm, no activation."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = StdConv(self.width, 7, 2, name="standardized_conv2d")(x)  # N, H/2, W/2, W
        return max_pool_zero_padded(x)  # N, H/4, W/4, W


class Block(nn.Module):
    """`depth` units of one width; unit01 carries the block's stride and projection."""

    depth: int
    mid: int
    out: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        outputs = []
        for u in range(1, self.depth + 1):
            x = Unit(self.mid, self.out, self.stride if u == 1 else 1, name=f"unit{u:02d}")(x)
            outputs.append(x)
        return x, outputs


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class BiT(nn.Module):
    """BiT ResNet-v2; `apply({"params": p}, x NHWC in [-1, 1])` returns `(logits, taps)`.

    Taps: `stem` (after the max-pool), `block{b}.unit{u:02d}` (each unit's
    output), `norm` (ReLU(GN) map before pooling), `pre_logits` (N, C), `logits`.
    """

    config: BitSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        taps = {"stem": RootBlock(cfg.root_width, name="root_block")(x)}
        x = taps["stem"]
        for b, (n, stride) in enumerate(zip(cfg.depths, BLOCK_STRIDES), 1):
            x, outputs = Block(n, cfg.mid(b), cfg.out(b), stride, name=f"block{b}")(x)
            taps |= {UNIT_TAP.format(b=b, u=u): y for u, y in enumerate(outputs, 1)}
        taps["norm"] = nn.relu(GroupNorm(name="group_norm")(x))  # N, h, w, C
        taps["pre_logits"] = jnp.mean(taps["norm"], axis=(1, 2))  # N, C
        taps["logits"] = Head(cfg.num_classes, name="head")(taps["pre_logits"])  # N, K
        return taps["logits"], taps


# ---------------------------------------------------------------------------
# Loading original arrays
# ---------------------------------------------------------------------------


def params_from_npz(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Original npz arrays to this model's nested params: strip `resnet/`, split on `/`.

    Layouts stay as stored (HWIO kernels, 1-D gamma/beta, (1,1,C,K) head);
    `standardized_conv2d_N` spellings are normalised to `standardized_conv2d`.
    """
    params: dict[str, Any] = {}
    for name, array in arrays.items():
        *scopes, leaf = tree_name(name).split("/")
        node = params
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = jnp.asarray(array, dtype=jnp.float32)
    return params


def from_npz(arrays: Mapping[str, np.ndarray]) -> tuple[BiT, dict[str, Any]]:
    """The model for the arrays' inferred config and its params, ready for `model.apply`."""
    return BiT(spec_from_arrays(arrays)), params_from_npz(arrays)

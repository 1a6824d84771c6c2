"""BiT (Big Transfer) ResNet-v2 in PyTorch, in the original checkpoint's names.

The module tree is the original `.npz` tree, so `state_dict()` keys are the npz
names without the `resnet/` prefix and with `/` replaced by `.`:

    root_block.standardized_conv2d.kernel            (W, 3, 7, 7)     OIHW
    block{b}.unit{u:02d}.{a,b,c}.group_norm.{gamma,beta}   (C,)
    block{b}.unit{u:02d}.{a,b,c}.standardized_conv2d.kernel           OIHW
    block{b}.unit01.a.proj.standardized_conv2d.kernel                 OIHW
    group_norm.{gamma,beta}
    head.conv2d.kernel (K, C, 1, 1) OIHW, head.conv2d.bias (K,)

Parameters keep the original leaf names (`kernel`, `gamma`, `beta`, `bias`);
`state_dict_from_npz` applies only generic rules (strip the prefix, `/` -> `.`,
every 4-D kernel HWIO -> OIHW, the 1x1 head included). Feature maps are NCHW.

The variant (`BitSpec`) and the npz layout are stated once, framework-free, in
`converters/families/bit.py`, shared with the Flax and TensorFlow references.

Math (see shared/research/bit.md §3): weight standardization per output filter
with eps 1e-10 inside the sqrt; GroupNorm(32) two-pass, eps 1e-5; fixed
symmetric padding; stem max-pool over ZERO padding; pre-activation bottleneck
with the stride on the 3x3 and the projection reading the pre-activated input.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from converters.families.bit import BLOCK_STRIDES, GROUPS, BitSpec, spec_from_arrays, tree_name

# ---------------------------------------------------------------------------
# Primitives (NCHW)
# ---------------------------------------------------------------------------

def standardize_weight(kernel: torch.Tensor) -> torch.Tensor:
    """Weight standardization of an OIHW kernel per output filter over I, H, W."""
    mean = kernel.mean(dim=(1, 2, 3), keepdim=True)
    var = ((kernel - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased variance
    # eps 1e-10 INSIDE the sqrt, as in the original code (timm/transformers use 1e-8).
    return (kernel - mean) / torch.sqrt(var + 1e-10)


def fixed_pad(x: torch.Tensor, k: int) -> torch.Tensor:
    """BiT's input-size-independent symmetric zero padding for a k x k window (not TF "SAME")."""
    beg = (k - 1) // 2
    end = k - 1 - beg
    return F.pad(x, (beg, end, beg, end), value=0.0)


def group_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """GroupNorm with 32 contiguous channel groups, two-pass biased variance, eps 1e-5."""
    n, c, h, w = x.shape
    g = x.reshape(n, GROUPS, c // GROUPS, h, w)
    mean = g.mean(dim=(2, 3, 4), keepdim=True)
    var = ((g - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    g = (g - mean) / torch.sqrt(var + 1e-5)  # eps 1e-5 inside the sqrt, as the original
    return g.reshape(n, c, h, w) * gamma.view(1, c, 1, 1) + beta.view(1, c, 1, 1)


def max_pool_zero_padded(x: torch.Tensor) -> torch.Tensor:
    """The stem pool: ZERO-pad 1, then 3x3/2 max-pool VALID.

    `nn.MaxPool2d(3, 2, padding=1)` pads with -inf instead, which changes border
    outputs wherever the root conv output is negative.
    """
    return F.max_pool2d(fixed_pad(x, 3), kernel_size=3, stride=2)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

class StdConv(nn.Module):
    """Bias-free weight-standardized conv with fixed padding; `kernel` is OIHW."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(cout, cin, k, k))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.shape[-1]
        return F.conv2d(fixed_pad(x, k), standardize_weight(self.kernel), stride=self.stride)


class GroupNorm(nn.Module):
    """GroupNorm(32) with the original `gamma`/`beta` parameter names."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.gamma, self.beta)


class Projection(nn.Module):
    """The strided 1x1 shortcut `a/proj/standardized_conv2d` of each block's unit01."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.standardized_conv2d = StdConv(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardized_conv2d(x)


class PreActConv(nn.Module):
    """One of a unit's `a`/`b`/`c` parts: ReLU(GN(x)) then a StdConv (plus `proj` in unit01/a)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1,
                 proj_features: int | None = None, proj_stride: int = 1) -> None:
        super().__init__()
        self.group_norm = GroupNorm(cin)
        self.standardized_conv2d = StdConv(cin, cout, k, stride)
        self.proj = Projection(cin, proj_features, proj_stride) if proj_features else None

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.group_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardized_conv2d(self.preact(x))


class Unit(nn.Module):
    """Pre-activation bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1, no activation after the add."""

    def __init__(self, cin: int, mid: int, out: int, stride: int) -> None:
        super().__init__()
        needs_proj = stride != 1 or cin != out  # exactly unit01 of each block in BiT
        self.a = PreActConv(cin, mid, 1, proj_features=out if needs_proj else None, proj_stride=stride)
        self.b = PreActConv(mid, mid, 3, stride)
        self.c = PreActConv(mid, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a.preact(x)  # N, Cin, H, W
        shortcut = self.a.proj(y) if self.a.proj is not None else x  # proj reads the PRE-ACTIVATED input
        return self.c(self.b(self.a.standardized_conv2d(y))) + shortcut  # N, Out, H/s, W/s


class RootBlock(nn.Module):
    """Stem: StdConv 7x7/2 (pad 3), zero-pad 1, 3x3/2 max-pool VALID; no norm, no activation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.standardized_conv2d = StdConv(3, width, 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_zero_padded(self.standardized_conv2d(x))  # N, W, H/4, W/4


class Conv1x1(nn.Module):
    """A plain 1x1 conv with bias (`kernel` OIHW (K, C, 1, 1), `bias`), applied to pooled (N, C)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled, self.kernel[:, :, 0, 0], self.bias)  # N, K


class Head(nn.Module):
    """The classifier, stored as the 1x1 conv `head/conv2d` (not weight-standardized)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv2d = Conv1x1(channels, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.conv2d(pooled)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class BiT(nn.Module):
    """BiT ResNet-v2; `forward(x NCHW in [-1, 1])` returns `(logits, taps)`.

    Taps: `stem` (after the max-pool), `block{b}.unit{u:02d}` (each unit's
    output), `norm` (ReLU(GN) map before pooling), `pre_logits` (N, C), `logits`.
    """

    def __init__(self, config: BitSpec) -> None:
        super().__init__()
        self.config = config
        self.root_block = RootBlock(config.root_width)
        cin = config.root_width
        for b, (n, stride) in enumerate(zip(config.depths, BLOCK_STRIDES), 1):
            units = {}
            for u in range(1, n + 1):
                units[f"unit{u:02d}"] = Unit(cin, config.mid(b), config.out(b), stride if u == 1 else 1)
                cin = config.out(b)
            self.add_module(f"block{b}", nn.ModuleDict(units))
        self.group_norm = GroupNorm(cin)
        self.head = Head(cin, config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taps = {"stem": self.root_block(x)}
        x = taps["stem"]
        for b in range(1, len(self.config.depths) + 1):
            for name, unit in getattr(self, f"block{b}").items():
                x = taps[f"block{b}.{name}"] = unit(x)
        taps["norm"] = F.relu(self.group_norm(x))  # N, C, h, w
        taps["pre_logits"] = taps["norm"].mean(dim=(2, 3))  # N, C
        taps["logits"] = self.head(taps["pre_logits"])  # N, K
        return taps["logits"], taps


# ---------------------------------------------------------------------------
# Loading original arrays
# ---------------------------------------------------------------------------

def state_dict_from_npz(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Original npz arrays to this module's state dict by generic rules only.

    Strip `resnet/`, normalise `standardized_conv2d_N`, replace `/` with `.`, and
    transpose every 4-D kernel HWIO -> OIHW (the (1,1,C,K) head becomes (K,C,1,1)).
    """
    state = {}
    for name, array in arrays.items():
        array = np.asarray(array, dtype=np.float32)
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        # a copy: loaded arrays may be read-only views of the file
        state[tree_name(name).replace("/", ".")] = torch.from_numpy(np.array(array, order="C"))
    return state


def from_npz(arrays: Mapping[str, np.ndarray]) -> BiT:
    """A BiT in eval mode built from the arrays' inferred config and loaded strictly."""
    model = BiT(spec_from_arrays(arrays))
    model.load_state_dict(state_dict_from_npz(arrays), strict=True)
    return model.eval()

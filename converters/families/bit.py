"""BiT's original layout and variant, framework-free (numpy only).

The one statement of the `.npz` tree (names under `resnet/`, HWIO kernels, the
(1,1,C,K) head conv), the `.h5` weight order, the variant read from shapes and
the tap names. The converter, the JAX/Flax, PyTorch and TF2 references, the
synthetic writers and parity all read it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from converters.errors import InputError
from converters.shapes import MAX_CLASSES
from converters.tensors import plausible_dims

PREFIX = "resnet/"
GROUPS = 32  # GroupNorm groups everywhere in BiT; channels are grouped contiguously
BLOCK_STRIDES = (1, 2, 2, 2)  # block1 keeps the stem's resolution; the stride sits on unit01's 3x3

# Variants are data: depth -> units per block; width factor -> root width 64*wf.
DEPTHS: dict[int, tuple[int, ...]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
WIDTH_FACTORS = (1, 2, 3, 4)

UNIT = "block{b}/unit{u:02d}"        # a unit's scope in the original files
UNIT_TAP = "block{b}.unit{u:02d}"    # its tap, and its module path in the references
TARGET_UNIT = "bit.encoder.stages.{s}.layers.{i}"  # its module in transformers' BitModel
# The module that produces each tap in the target and in each peer; a unit's takes s = block - 1
# and i = unit - 1.
TAP_MODULES = {
    "transformers": {"stem": "bit.embedder", "unit": TARGET_UNIT, "norm": "bit.norm",
                     "pre_logits": "bit.pooler", "logits": "classifier"},
    "timm": {"stem": "stem", "unit": "stages.{s}.blocks.{i}", "norm": "norm",
             "pre_logits": "head.global_pool", "logits": "head"},
}
ROOT_KERNEL = PREFIX + "root_block/standardized_conv2d/kernel"
MAX_WIDTH = 2**16  # channels (and kernel sides); the widest published BiT, R152x4, has 8192

# One unit's weights, relative to its scope, in the order bit_tf2's Keras model lists them:
# `_unit_a`, `_unit_a_conv`, `_unit_b`, `_unit_c` are made in `__init__`, `_proj` only in
# `build()`, so the projection comes LAST (it exists only in unit01 of each block).
UNIT_WEIGHTS = ("a/group_norm/gamma", "a/group_norm/beta", "a/standardized_conv2d/kernel",
                "b/group_norm/gamma", "b/group_norm/beta", "b/standardized_conv2d/kernel",
                "c/group_norm/gamma", "c/group_norm/beta", "c/standardized_conv2d/kernel")
PROJECTION = "a/proj/standardized_conv2d/kernel"

# Some published files spell `standardized_conv2d_N` (big_vision normalises it too).
NUMBERED_CONV = re.compile(r"/standardized_conv2d_\d+/")
_BLOCK = re.compile(r"resnet/block(\d+)/")


@dataclass(frozen=True)
class BitSpec:
    """The variant: units per block, root width, classes, and the head's kind.

    Block b is `root_width * 2**(b-1)` wide inside and four times that at its
    output unless `hidden_sizes` (the block output widths, as read from a file)
    says otherwise; R50x1 is `BitSpec((3, 4, 6, 3), 64, K)`. `head` is "conv2d"
    (npz, a (1,1,C,K) kernel) or "dense" (h5, a (C,K) kernel).
    """

    depths: tuple[int, ...]
    root_width: int
    num_classes: int
    hidden_sizes: tuple[int, ...] = field(default=())
    head: str = "conv2d"

    def __post_init__(self) -> None:
        if not self.hidden_sizes:
            widths = tuple(4 * self.root_width * 2 ** b for b in range(len(self.depths)))
            object.__setattr__(self, "hidden_sizes", widths)

    @property
    def embedding_size(self) -> int:
        return self.root_width

    def out(self, block: int) -> int:
        return self.hidden_sizes[block - 1]

    def mid(self, block: int) -> int:
        return self.out(block) // 4

    @property
    def name(self) -> str:
        layers = 3 * sum(self.depths) + 2
        return f"R{layers}x{self.root_width / 64:g}"


def bit_spec(depth: int = 50, width_factor: int = 1, num_classes: int = 1000) -> BitSpec:
    """A published variant, e.g. `bit_spec(101, 3, 21843)` for BiT-M R101x3."""
    return BitSpec(DEPTHS[depth], 64 * width_factor, num_classes)


def canonical_name(name: str) -> str:
    """An original name with `resnet/` and with `standardized_conv2d_N` spelled `standardized_conv2d`."""
    return NUMBERED_CONV.sub("/standardized_conv2d/", name if name.startswith(PREFIX) else PREFIX + name)


def tree_name(name: str) -> str:
    """An original name as the references' module trees spell it: `canonical_name` without `resnet/`."""
    return canonical_name(name).removeprefix(PREFIX)


def units(spec: BitSpec) -> list[tuple[int, int]]:
    """(block, unit) of every residual unit in forward order, both counted from 1."""
    return [(b, u) for b, n in enumerate(spec.depths, 1) for u in range(1, n + 1)]


def tap_names(spec: BitSpec) -> list[str]:
    """Every tap in forward order: `stem`, `block1.unit01`, ..., `norm`, `pre_logits`, `logits`."""
    return ["stem", *(UNIT_TAP.format(b=b, u=u) for b, u in units(spec)), "norm", "pre_logits", "logits"]


def tap_modules(side: str, depths: Sequence[int]) -> dict[str, str]:
    """Each tap's module in `side` ("transformers" for the target, "timm" for the peer)."""
    modules = dict(TAP_MODULES[side])
    unit = modules.pop("unit")
    units = {UNIT_TAP.format(b=b, u=u): unit.format(s=b - 1, i=u - 1)
             for b, n in enumerate(depths, 1) for u in range(1, n + 1)}
    return {"stem": modules.pop("stem"), **units, **modules}


def unit_weights(first: bool) -> tuple[str, ...]:
    """A unit's weight names relative to its scope, in `.h5` order (the projection last, unit01 only)."""
    return UNIT_WEIGHTS + ((PROJECTION,) if first else ())


def _unit_shapes(cin: int, mid: int, out: int, first: bool) -> list[tuple[int, ...]]:
    """The shapes of `unit_weights(first)`, in that order (HWIO kernels)."""
    shapes: list[tuple[int, ...]] = []
    for c, kernel in ((cin, (1, 1, cin, mid)), (mid, (3, 3, mid, mid)), (mid, (1, 1, mid, out))):
        shapes += [(c,), (c,), kernel]
    return shapes + ([(1, 1, cin, out)] if first else [])


def npz_shapes(spec: BitSpec) -> dict[str, tuple[int, ...]]:
    """Every original npz name (with `resnet/`) and its shape, in model order."""
    shapes = {ROOT_KERNEL: (7, 7, 3, spec.root_width)}
    cin = spec.root_width
    for b, u in units(spec):
        scope = PREFIX + UNIT.format(b=b, u=u)
        first = u == 1
        shapes |= {f"{scope}/{name}": shape for name, shape in
                   zip(unit_weights(first), _unit_shapes(cin, spec.mid(b), spec.out(b), first))}
        cin = spec.out(b)
    k = spec.num_classes
    return shapes | {f"{PREFIX}group_norm/gamma": (cin,), f"{PREFIX}group_norm/beta": (cin,),
                     f"{PREFIX}head/conv2d/kernel": (1, 1, cin, k), f"{PREFIX}head/conv2d/bias": (k,)}


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise InputError(None, f"missing keys: {key}")
    return tuple(shapes[key])


def infer_spec(shapes: Mapping[str, Sequence[int]]) -> BitSpec:
    """The variant from canonical original names and their shapes (units counted from the names,
    widths and classes from the kernel and head shapes); an `InputError` for an inconsistent file."""
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if blocks != [1, 2, 3, 4]:
        raise InputError(None, f"expected blocks 1-4 under resnet/, found {blocks}")
    depths = tuple(len({k.split("/")[2] for k in shapes if k.startswith(f"{PREFIX}block{b}/unit")})
                   for b in blocks)
    hidden = tuple(_kernel_width(shapes, f"{PREFIX}block{b}/unit01/c/standardized_conv2d/kernel") for b in blocks)
    head = "dense" if f"{PREFIX}head/dense/bias" in shapes else "conv2d"
    bias = f"{PREFIX}head/{head}/bias"
    spec = BitSpec(depths, _kernel_width(shapes, ROOT_KERNEL),
                   plausible_dims(bias, _shape(shapes, bias), 1, MAX_CLASSES)[0], hidden, head)
    _check_consistent(shapes, spec)
    return spec


def _kernel_width(shapes: Mapping[str, Sequence[int]], key: str) -> int:
    """The output channels of an HWIO kernel, every dimension checked as data first."""
    return plausible_dims(key, _shape(shapes, key), 4, MAX_WIDTH)[3]


def _check_consistent(shapes: Mapping[str, Sequence[int]], spec: BitSpec) -> None:
    """The root width must feed block1 (the known broken BiT-S .h5 files fail here)."""
    gamma = f"{PREFIX}block1/unit01/a/group_norm/gamma"
    first = plausible_dims(gamma, _shape(shapes, gamma), 1, MAX_WIDTH)[0]
    if first != spec.root_width:
        raise InputError(None, f"root kernel has {spec.root_width} output channels but "
                               f"block1/unit01 expects {first}: inconsistent file (the published "
                               f"BiT-S-R50x3.h5 and BiT-S-R101x1.h5 are broken this way; use the .npz)")
    widths = (spec.root_width, *spec.hidden_sizes, *(w // 4 for w in spec.hidden_sizes))
    odd = sorted({w for w in widths if w % GROUPS})
    if odd:
        raise InputError(None, f"widths {odd} are not divisible by {GROUPS} GroupNorm groups")


def spec_from_arrays(arrays: Mapping[str, Any]) -> BitSpec:
    """The variant of original arrays under any npz spelling (with or without `resnet/`)."""
    return infer_spec({canonical_name(k): tuple(v.shape) for k, v in arrays.items()})


# ---------------------------------------------------------------------------
# The target's layout: transformers `BitForImageClassification`, layer_type "preactivation",
# listed from the config dict so that conversion needs neither torch nor transformers
# (tests/test_shapes.py proves it equal to the class's meta-device state dict).

def _make_div(value: float, divisor: int = 8) -> int:
    """transformers' `bit.make_div`: round to a multiple of 8, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _target_unit(prefix: str, cin: int, cout: int, stride: int) -> dict[str, tuple[int, ...]]:
    mid = _make_div(cout * 0.25)  # bottle_ratio 0.25
    shapes: dict[str, tuple[int, ...]] = {}
    if cin != cout or stride != 1:
        shapes[f"{prefix}.downsample.conv.weight"] = (cout, cin, 1, 1)
    for n, (i, o, k) in enumerate(((cin, mid, 1), (mid, mid, 3), (mid, cout, 1)), start=1):
        shapes[f"{prefix}.norm{n}.weight"] = (i,)
        shapes[f"{prefix}.norm{n}.bias"] = (i,)
        shapes[f"{prefix}.conv{n}.weight"] = (o, i, k, k)
    return shapes


def target_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of `BitForImageClassification(BitConfig(**config))` (pre-activation BiT)."""
    if config["layer_type"] != "preactivation" or config.get("output_stride", 32) != 32:
        raise ValueError("target_shapes covers pre-activation BiT with output stride 32 only")
    cin = config["embedding_size"]
    shapes: dict[str, tuple[int, ...]] = {"bit.embedder.convolution.weight": (cin, config["num_channels"], 7, 7)}
    for s, (depth, cout) in enumerate(zip(config["depths"], config["hidden_sizes"])):
        for u in range(depth):
            stride = 2 if s > 0 and u == 0 else 1
            shapes.update(_target_unit(TARGET_UNIT.format(s=s, i=u), cin, cout, stride))
            cin = cout
    shapes["bit.norm.weight"] = shapes["bit.norm.bias"] = (cin,)
    classes = len(config["id2label"])
    if classes:
        shapes["classifier.1.weight"] = (classes, cin)
        shapes["classifier.1.bias"] = (classes,)
    return shapes

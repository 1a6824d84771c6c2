"""Evaluation preprocessing protocols: data per model family, and the two ways to apply them.

A `Protocol` says how one image becomes the model's input tensor: resize
policy (squash to a square, or shorter side then keep the ratio), the resize
side, the centre crop, the interpolation and the normalisation. The ORIGINAL
table holds each family's published eval pipeline, and a folder converted from a
catalogued checkpoint takes that entry's own `original` / `timm` pipeline first
(`catalogued`: variants of a family differ); `hub` reads the folder's
preprocessor_config.json and `timm` reads timm's pretrained config for the
matching model, both also expressed as a `Protocol` so the GPU path can apply
them.

Two appliers:
- `faithful_transform` runs on a PIL image in a DataLoader worker, with the
  exact library code of the protocol (torchvision PIL transforms for
  `original`, the transformers PIL image processor for `hub`, timm's
  `create_transform` for `timm`). transformers' default backend for image
  processors is now torchvision on tensors, whose antialiased resize is not
  PIL's; `hub` asks for the PIL backend, the only one of earlier releases.
- `batch_transform` runs on decoded uint8 tensors (any device), resizing each
  image with antialiasing, rounding to uint8 levels as PIL does, then
  centre-cropping (with the protocol's offset rounding: transformers floors
  where torchvision rounds) and normalising the batch.

The "area" interpolation is big_vision's (the BiT distillation checkpoints' eval:
`decode|resize_small(256)|central_crop(224)|value_range(-1, 1)`), whose resize is
TensorFlow's ResizeArea: its faithful transform runs TensorFlow itself on the file's
bytes (parity/eval_tf.py, the `tensorflow` extra), and `batch_transform` repeats
ResizeArea's float32 sums in the kernel's order (`tf_area_resize`), truncating to uint8
as big_vision's cast does. Only the fast path's JPEG decoder differs from TensorFlow's
(`Protocol.describe` says by how much).

Folder overrides (for models evaluated at their own resolution): an optional
``"parityport": {...}`` block in preprocessor_config.json, or
``"parityport_eval": {...}`` in config.json (the former wins), with keys
``image_size`` (final crop side), ``crop_pct`` (resize side =
floor(image_size / crop_pct)), ``resize_size`` (explicit resize side, wins
over crop_pct) and ``timm_model`` (timm pretrained-config name). They apply to
the `original` and `timm` protocols; `hub` follows the processor file itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import PIL
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from converters.errors import InputError
from parity.eval_args import PROTOCOL_NAMES, model_family, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)

@dataclass(frozen=True)
class Protocol:
    """One eval preprocessing pipeline as data.

    ``resize`` is "squash" (both sides to `resize_side`) or "shorter" (shorter
    side to `resize_side`, ratio kept); then a centre crop of `image_size`
    (a no-op when the resized image already has that size), whose offset
    (margin / 2) is rounded as torchvision's CenterCrop does ("round") or
    floored as transformers' image processors do ("floor"): where the margin
    is odd, the two crops sit one pixel apart.

    ``interpolation`` "bilinear" and "bicubic" are PIL's antialiased filters (through
    torchvision, transformers or timm); "area" is TensorFlow's ResizeArea as big_vision's
    resize ops apply it (`library` "tensorflow"): each side h of a "shorter" resize becomes
    round_half_even(float32(h) * (float32(resize_side) / float32(shorter side))) and levels are
    clipped and truncated to uint8; its central_crop rounds the offset down (`crop_offset` "floor").
    """

    name: str
    resize: str  # "squash" | "shorter"
    image_size: int
    crop_pct: float
    interpolation: str  # "bilinear" | "bicubic" (PIL) | "area" (TensorFlow, as big_vision)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None
    crop_offset: str = "round"  # "round" | "floor"

    @property
    def resize_side(self) -> int:
        """The resize target side: explicit, or floor(image_size / crop_pct) as timm and BEiT do."""
        return self.resize_size or math.floor(self.image_size / self.crop_pct)

    @property
    def library(self) -> str:
        """Whose resize this is: "tensorflow" for big_vision's area resize, "pil" for the others."""
        return "tensorflow" if self.interpolation in TF_INTERPOLATIONS else "pil"

    def describe(self, fast: bool = False) -> str:
        """The pipeline in words: "shorter side to 256 bicubic, centre crop 224, mean 0.5 std 0.5"; for
        a TensorFlow protocol also who decodes, and on the fast path (`fast`) how its decoder differs."""
        side = self.resize_side
        steps = [f"squash to {side}x{side}" if self.resize == "squash" else f"shorter side to {side}"]
        steps[0] += f" {self.interpolation}"
        if self.library == "tensorflow":
            steps[0] += (" (TensorFlow's ResizeArea" + ", its float32 sums repeated in its order" * fast
                         + "; sizes rounded half to even, levels truncated to uint8)")
            steps.insert(0, TF_FAST_DECODE if fast else "TensorFlow decode (tf.io.decode_image)")
        if self.resize == "shorter" or side != self.image_size:
            steps.append(f"centre crop {self.image_size}" + " (offset rounded down)" * (self.crop_offset == "floor"))
        steps.append(f"mean {_levels(self.mean)} std {_levels(self.std)}")
        return ", ".join(steps)


def _levels(values: Sequence[float]) -> str:
    """Per-channel constants as "0.5" when all equal, else "0.485/0.456/0.406"."""
    text = [f"{float(v):g}" for v in values]
    return text[0] if len(set(text)) == 1 else "/".join(text)


# The published eval pipelines (shared/research/bit.md §5, data2vec.md §4).
ORIGINAL: dict[str, Protocol] = {
    # big_transfer bit_pytorch: Resize((480, 480)) bilinear, no crop, Normalize(0.5, 0.5) -> [-1, 1]
    "bit": Protocol("bit-original", "squash", 480, 1.0, "bilinear", INCEPTION_MEAN, INCEPTION_STD),
    # BEiT datasets.build_transform: Resize(int(224 / 0.875) = 256, bicubic) + CenterCrop(224), inception norms
    "data2vec-vision": Protocol(
        "data2vec-original", "shorter", 224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD
    ),
    # fairseq mae_finetuning_image_dataset: Resize(256, bicubic) + CenterCrop(224), ImageNet mean/std
    "data2vec2-vision": Protocol(
        "data2vec2-original", "shorter", 224, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD
    ),
}

# timm pretrained configs that stand for each family (timm has no data2vec entry:
# BEiT is the same architecture for 1.0, MAE ViT shares 2.0's normalisation).
TIMM_PEERS: dict[str, Callable[[dict], str]] = {
    "bit": lambda c: "resnetv2_{}x{}_bit.{}".format(
        {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(c.get("depths", ())), 50),
        max(1, int(c.get("hidden_sizes", [256])[0]) // 256),
        "goog_in21k" if len(c.get("id2label", {})) == 21843 else "goog_in21k_ft_in1k",
    ),
    "data2vec-vision": lambda c: {1024: "beit_large_patch16_224.in22k_ft_in22k_in1k"}.get(
        c.get("hidden_size"), "beit_base_patch16_224.in22k_ft_in22k_in1k"
    ),
    "data2vec2-vision": lambda c: {1024: "vit_large_patch16_224.mae", 1280: "vit_huge_patch14_224.mae"}.get(
        c.get("hidden_size"), "vit_base_patch16_224.mae"
    ),
}

_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
# Interpolations only TensorFlow applies faithfully: big_vision's resize ops call tf.image.resize, and
# neither PIL nor torchvision has TF's ResizeArea (PIL's BOX filter covers the same areas but rounds
# each of its two passes to uint8, where TF sums both in float32 and the cast truncates once).
TF_INTERPOLATIONS = ("area",)
# What each resolver can apply of a catalogued protocol: `original` runs TensorFlow for big_vision's
# protocols, `timm` only has PIL's filters.
_APPLIED = {"original": (*_INTERP, *TF_INTERPOLATIONS), "timm": tuple(_INTERP)}
# TensorFlow decodes JPEGs with libjpeg's fast integer IDCT (tf.io.decode_image has no DCT choice and
# equals decode_jpeg's default, INTEGER_FAST), where PIL and libjpeg-turbo in torchvision (the fast
# path's --decode cpu) use the accurate one; the GPU decoders differ from both. Measured with the
# accurate IDCT on smooth-plus-noise JPEGs of quality 75 and 95 and 300-500 px, after resize_small(256)
# area and central_crop(224): 67.5-70.1% of the model's input levels differ, by 0.95-1.07 on average
# (0.82 of it upward) and up to 3-5 (`test_the_fast_paths_jpeg_decoder_is_not_tensorflows`).
TF_FAST_DECODE = ("JPEGs decoded by the fast path's decoder, not by TensorFlow's libjpeg with its fast IDCT (with "
                  "libjpeg-turbo's accurate IDCT two thirds of the model's input levels differ, by one on average, "
                  "up to 5)")
_OVERRIDE_KEYS = {"image_size", "crop_pct", "resize_size", "timm_model"}


def folder_overrides(model_dir: Path) -> dict[str, Any]:
    """The folder's eval overrides (module docstring): preprocessor block over config block."""
    blocks = [(read_json(model_dir / name).get(key, {}), name, key)
              for name, key in (("config.json", "parityport_eval"), ("preprocessor_config.json", "parityport"))]
    for found, name, key in blocks:
        if not isinstance(found, dict):
            raise InputError(model_dir / name, f"{key!r} must be a JSON object of eval overrides")
    block = {**blocks[0][0], **blocks[1][0]}
    unknown = set(block) - _OVERRIDE_KEYS
    if unknown:
        raise InputError(model_dir, f"unknown eval override keys {sorted(unknown)}; known: {sorted(_OVERRIDE_KEYS)}")
    for key, value in block.items():
        if not _OVERRIDE_CHECKS[key](value):
            raise InputError(model_dir, f"eval override {key}={value!r}: expected {_OVERRIDE_EXPECTED[key]}")
    return block


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_OVERRIDE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "image_size": _whole,
    "crop_pct": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
    "resize_size": lambda v: v is None or _whole(v),
    "timm_model": lambda v: isinstance(v, str) and bool(v),
}
_OVERRIDE_EXPECTED = {"image_size": "a whole number of pixels >= 1", "crop_pct": "a number in (0, 1]",
                      "resize_size": "a whole number of pixels >= 1 or null", "timm_model": "a timm pretrained-config name"}


def apply_overrides(protocol: Protocol, overrides: dict[str, Any], where: Path | None = None) -> Protocol:
    """Return `protocol` with the folder's image_size / crop_pct / resize_size applied."""
    fields = {k: overrides[k] for k in ("image_size", "crop_pct", "resize_size") if k in overrides}
    if "image_size" in fields and "resize_size" not in fields and "crop_pct" not in fields:
        fields["resize_size"] = None  # keep the protocol's crop_pct at the new size
    changed = dataclasses.replace(protocol, **fields)
    if changed.resize_side < changed.image_size:
        raise InputError(where, f"eval overrides {overrides}: the resize side {changed.resize_side} is smaller "
                               f"than the crop {changed.image_size}")
    return changed


# ---- resolving a protocol name to (Protocol, faithful transform) -------------------------------


def catalogued(model_dir: Path, name: str) -> Protocol | None:
    """The catalog's protocol `name` for the checkpoint the folder was converted from, or None.

    Variants of one family share their weights' shapes but not their eval pipelines (the
    distilled BiT-R50x1 is evaluated with a 224 crop, BiT-M's ILSVRC-2012 fine-tunes with a
    480 squash), so a catalogued checkpoint's own entry stands before the family's table.
    """
    from parity.card import CATALOG_RESIZE, catalog_crop_offset, folder_catalog_entry

    entry, _ = folder_catalog_entry(model_dir)
    spec = entry.eval.get(name) if entry is not None else None
    if spec is None:
        return None
    if spec.interpolation not in _APPLIED.get(name, tuple(_INTERP)) or spec.resize not in CATALOG_RESIZE:
        raise InputError(model_dir, f"the catalog's {name} protocol for {entry.name} ({spec.resize} {spec.resize_size}, "
                                    f"{spec.interpolation}) is not one parityport eval applies ({spec.source})")
    crop = spec.crop_size if spec.crop_size is not None else spec.resize_size
    offset = catalog_crop_offset(name, spec.interpolation)
    # crop_pct keeps the ratio when a folder override changes only the image size
    return Protocol(f"{entry.name}:{name}", CATALOG_RESIZE[spec.resize], crop, crop / spec.resize_size,
                    spec.interpolation, tuple(spec.mean), tuple(spec.std), resize_size=spec.resize_size,
                    crop_offset=offset)


def original_protocol(model_dir: Path) -> Protocol:
    """The folder's `original` protocol: its catalog entry's, else its family's, with the folder's overrides."""
    family = model_family(model_dir)
    protocol = catalogued(model_dir, "original") or ORIGINAL.get(family)
    if protocol is None:
        raise InputError(model_dir, f"no original protocol for model_type {family!r}; known: {sorted(ORIGINAL)}")
    return apply_overrides(protocol, folder_overrides(model_dir), model_dir)


def _original(model_dir: Path) -> tuple[Protocol, Callable[[Image.Image], torch.Tensor]]:
    protocol = original_protocol(model_dir)
    if protocol.library == "tensorflow":
        from parity.eval_tf import tensorflow_transform

        return protocol, tensorflow_transform(protocol, model_dir)
    return protocol, torchvision_transform(protocol)


def _hub(model_dir: Path) -> tuple[Protocol, Callable[[Image.Image], torch.Tensor]]:
    from transformers import AutoImageProcessor

    if not (model_dir / "preprocessor_config.json").is_file():
        raise InputError(model_dir, "protocol 'hub' needs preprocessor_config.json")
    try:
        processor = AutoImageProcessor.from_pretrained(str(model_dir), backend="pil")
    except (ValueError, OSError, TypeError) as error:  # e.g. an image_processor_type transformers lacks
        raise InputError(model_dir / "preprocessor_config.json", f"transformers cannot build its image processor: "
                                                                 f"{str(error).splitlines()[0].split('. ')[0]}") from None
    try:
        return protocol_from_processor(processor.to_dict()), _ProcessorTransform(processor)
    except InputError as error:
        raise InputError(model_dir / "preprocessor_config.json", error.problem) from None


def _timm(model_dir: Path) -> tuple[Protocol, Callable[[Image.Image], torch.Tensor]]:
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    overrides = folder_overrides(model_dir)
    family = model_family(model_dir)
    # a timm_model override names the config; else the catalogued checkpoint's timm protocol; else the family's peer
    protocol = None if "timm_model" in overrides else catalogued(model_dir, "timm")
    if protocol is None:
        name = overrides.get("timm_model") or (TIMM_PEERS[family](read_json(model_dir / "config.json")) if family in TIMM_PEERS else None)
        cfg = get_pretrained_cfg(name) if name else None
        if cfg is None:
            raise InputError(model_dir, f"no timm config for model_type {family!r} (set parityport.timm_model)")
        data = resolve_data_config(pretrained_cfg=cfg.to_dict())
        protocol = Protocol(
            f"timm:{name}",
            "squash" if data["crop_mode"] == "squash" else "shorter",
            int(data["input_size"][-1]),
            float(data["crop_pct"]),
            data["interpolation"],
            tuple(data["mean"]),
            tuple(data["std"]),
        )
    protocol = apply_overrides(protocol, overrides, model_dir)
    # timm computes the resize side as floor(size / crop_pct); pass a crop_pct that lands on ours exactly.
    crop_pct = protocol.image_size / (protocol.resize_side + 0.5)
    transform = create_transform(
        input_size=(3, protocol.image_size, protocol.image_size),
        interpolation=protocol.interpolation,
        mean=protocol.mean,
        std=protocol.std,
        crop_pct=crop_pct,
        crop_mode="squash" if protocol.resize == "squash" else "center",
    )
    return protocol, transform


RESOLVERS: dict[str, Callable[[Path], tuple[Protocol, Callable[[Image.Image], torch.Tensor]]]] = {
    "original": _original,
    "hub": _hub,
    "timm": _timm,
}


def resolve_protocol(model_dir: str | Path, name: str) -> tuple[Protocol, Callable[[Image.Image], torch.Tensor]]:
    """Return the `Protocol` for `name` on this folder and its faithful PIL → tensor transform."""
    if name not in RESOLVERS:
        raise InputError(None, f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
    return RESOLVERS[name](Path(model_dir))


def protocol_from_processor(cfg: dict[str, Any]) -> Protocol:
    """Express a transformers image-processor config (size/crop/resample/mean/std) as a `Protocol`."""
    size = cfg.get("size") or {}
    size = {"height": size, "width": size} if isinstance(size, int) else size
    crop = cfg.get("crop_size") or {}
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    if "shortest_edge" in size:
        resize, side = "shorter", int(size["shortest_edge"])
    elif size.get("height") is not None and size.get("height") == size.get("width"):
        resize, side = "squash", int(size["height"])
    else:
        raise InputError(None, f"image processor size {size} is not a square or shortest_edge resize")
    if resize == "shorter" and not cfg.get("do_center_crop"):
        raise InputError(None, f"image processor resizes the shorter side to {side} without a centre crop: "
                               "images keep their shapes, so they make no batch")
    if cfg.get("do_center_crop") and crop.get("width", crop.get("height")) != crop.get("height"):
        raise InputError(None, f"image processor crop_size {crop} is not a square")
    image_size = int(crop.get("height", side)) if cfg.get("do_center_crop") else side
    if image_size > side:
        raise InputError(None, f"image processor crops {image_size} from a resize to {side}: transformers pads the "
                               "image with zeros, which parityport eval does not apply")
    # the tensor path resizes every image and scales by 1/255, whatever the file says: refuse what it would not follow
    if not cfg.get("do_resize", True):
        raise InputError(None, "image processor has do_resize false, which parityport eval does not apply")
    factor = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-12:
        raise InputError(None, f"image processor rescales by {factor!r} (do_rescale, rescale_factor), not 1/255, which "
                               "parityport eval does not apply")
    resample = cfg.get("resample", 2)
    if resample not in _PIL_RESAMPLE:
        raise InputError(None, f"image processor resample {resample!r} is not one parityport eval applies; "
                               f"known: {', '.join(f'{k} ({v})' for k, v in _PIL_RESAMPLE.items())}")
    normalize = cfg.get("do_normalize", True)
    return Protocol(
        "hub",
        resize,
        image_size,
        1.0,
        _PIL_RESAMPLE[resample],
        tuple(cfg.get("image_mean") or (0.0,) * 3) if normalize else (0.0,) * 3,
        tuple(cfg.get("image_std") or (1.0,) * 3) if normalize else (1.0,) * 3,
        resize_size=side,
        crop_offset="floor",  # transformers' center_crop: (H - size) // 2
    )


def processor_fields(protocol: Protocol) -> dict[str, Any]:
    """The transformers image-processor keys that apply `protocol` (the inverse of
    `protocol_from_processor`, but for the crop offset, which transformers always rounds down)."""
    side = protocol.resize_side
    size = {"height": side, "width": side} if protocol.resize == "squash" else {"shortest_edge": side}
    crop = protocol.resize == "shorter" or side != protocol.image_size
    resample = {name: code for code, name in _PIL_RESAMPLE.items()}
    if protocol.interpolation not in resample:
        raise InputError(None, f"transformers' image processors have no {protocol.interpolation} resize")
    return {"do_resize": True, "size": size, "resample": resample[protocol.interpolation],
            "do_center_crop": crop, "crop_size": {"height": protocol.image_size, "width": protocol.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(protocol.mean), "image_std": list(protocol.std)}


class _ProcessorTransform:
    """A picklable PIL → CHW float tensor wrapper around a transformers image processor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def torchvision_transform(protocol: Protocol) -> Callable[[Image.Image], torch.Tensor]:
    """The faithful transform: torchvision's PIL Resize (PIL's antialiased filters) + CenterCrop + Normalize."""
    side = protocol.resize_side
    return T.Compose(
        [
            T.Resize((side, side) if protocol.resize == "squash" else side, interpolation=_INTERP[protocol.interpolation]),
            T.CenterCrop(protocol.image_size),
            T.ToTensor(),
            T.Normalize(protocol.mean, protocol.std),
        ]
    )


# ---- the tensor path (GPU in practice, any device in tests) ------------------------------------


def resized_shape(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """The (H, W) after the protocol's resize, with torchvision's rounding for the shorter side, or for
    a TensorFlow protocol big_vision's resize_small: both sides times float32(side) / float32(shorter),
    in float32, rounded half to even (tf.round)."""
    side = protocol.resize_side
    if protocol.resize == "squash":
        return side, side
    if protocol.library == "tensorflow":
        factor = np.float32(side) / np.float32(min(height, width))
        return int(np.rint(np.float32(height) * factor)), int(np.rint(np.float32(width) * factor))
    short, long = (height, width) if height <= width else (width, height)
    other = int(side * long / short)  # torchvision _compute_resized_output_size truncates
    return (side, other) if height <= width else (other, side)


def center_crop_box(height: int, width: int, size: int, offset: str = "round") -> tuple[int, int]:
    """(top, left) of a centre crop: int(round((H - size) / 2)) as torchvision's CenterCrop, or
    (H - size) // 2 as transformers' center_crop (`offset="floor"`)."""
    if offset == "floor":
        return (height - size) // 2, (width - size) // 2
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


# Pillow 13 runs the vertical pass first where the height shrinks by more than twice what the width
# does (libImaging/Resample.c, ImagingResampleInner: a portrait photo squashed to 480x480, say);
# earlier releases always run the horizontal pass first. The order changes which sums are rounded.
PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def pil_passes(height: int, width: int, out_h: int, out_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (H, W) after each of PIL's two resize passes, in the order the installed Pillow runs them."""
    vertical_first = PIL_VERTICAL_FIRST and 0 < height - out_h and (width - out_w) * 2 < height - out_h
    return ((out_h, width), (out_h, out_w)) if vertical_first else ((height, out_w), (out_h, out_w))


def resize_group(images: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Resize + centre-crop a B, 3, H, W uint8 stack of same-size images to float levels of uint8 (as PIL
    rounds, or for a TensorFlow protocol as TensorFlow's ResizeArea and big_vision's cast give them)."""
    height, width = images.shape[-2:]
    out_h, out_w = resized_shape(height, width, protocol)
    if protocol.library == "tensorflow":
        x = tf_area_resize(images, out_h, out_w)
    else:
        x = _pil_resize(images, out_h, out_w, protocol.interpolation)
    size = protocol.image_size
    top, left = center_crop_box(out_h, out_w, size, protocol.crop_offset)
    return x[:, :, top : top + size, left : left + size]


def _pil_resize(images: torch.Tensor, out_h: int, out_w: int, interpolation: str) -> torch.Tensor:
    """PIL's antialiased resize of a uint8 stack to float levels of uint8, rounded as PIL rounds."""
    height, width = images.shape[-2:]
    x = images.float()
    # antialias=True is torch's port of PIL's filters (support scaled by the downscale factor,
    # bicubic a = -0.5). PIL resizes 8-bit images in two passes and rounds each to uint8, half
    # up (its fixed-point sums start at 0.5 and are floored), where round() would take halves to
    # even: do the same, in PIL's order, so most pixels match exactly.
    for size_hw in pil_passes(height, width, out_h, out_w):
        if tuple(x.shape[-2:]) != size_hw:
            x = F.interpolate(x, size=size_hw, mode=interpolation, align_corners=False, antialias=True)
            x = x.add_(0.5).floor_().clamp_(0, 255)
    return x


@functools.lru_cache(maxsize=4096)  # ImageNet's val set has about 1,000 distinct sides
def area_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorFlow ResizeArea's taps along one axis: (index, weight), both K x out_size on `device`.

    Output pixel o covers input [o * s, (o + 1) * s) with s = float32(in) / float32(out); column o
    lists the input pixels it reads, in the kernel's order (ascending), clamped into the image as
    the kernel bounds them, with the covered length of each as the kernel computes it in float32
    (1 inside, a fraction at either end). Taps past a pixel's last are weight 0: adding 0.0 leaves
    a float32 sum as it was, so every pixel can take K terms.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    edges = np.arange(out_size + 1).astype(np.float32) * scale  # float(o) * s, in float32 as the kernel
    low, high = edges[:-1, None], edges[1:, None]
    start, end = np.floor(low).astype(np.int64), np.ceil(high).astype(np.int64)
    index = start + np.arange(int((end - start).max()))
    left, right = index.astype(np.float32), (index + 1).astype(np.float32)
    weight = np.where(left < low, np.where(right > high, scale, right - low),
                      np.where(right > high, high - left, np.float32(1.0))).astype(np.float32)
    weight = np.where(index < end, weight, np.float32(0.0))
    index = np.clip(index, 0, in_size - 1)
    return (torch.from_numpy(np.ascontiguousarray(index.T)).to(device),
            torch.from_numpy(np.ascontiguousarray(weight.T)).to(device))


def tf_area_resize(images: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TensorFlow's ResizeArea (tf.image.resize method "area") of a B, 3, H, W uint8 stack, clipped and
    truncated to uint8 levels as big_vision's cast does; float levels of uint8, bit for bit TF's.

    The kernel sums each input row's covered pixels times their covered lengths in float32, left to
    right, then the rows times theirs, top to bottom, then multiplies by float32(1 / float32(sx * sy)).
    This repeats those products and sums in that order, one tap at a time over the whole stack
    (separate multiplies and adds, never fused). A weight-matrix product (A_h @ image @ A_w^T, weights
    the covered lengths / s) sums in another order: even in float64 it moved 1 level on up to 0.11%
    of the values of random images scaled down to 256 (none at exactly half size) and on 1.3% of
    those scaled up from 224, since an average that is a whole level in exact arithmetic can be one
    ulp under it in TF's float32 sums, or the reverse, and the cast truncates.
    """
    height, width = images.shape[-2:]
    x = images.float()
    columns, column_weights = area_taps(width, out_w, images.device)
    rows, row_weights = area_taps(height, out_h, images.device)
    across = None  # B, 3, H, out_w: each input row's sum per output column
    for index, weight in zip(columns, column_weights):
        term = x.index_select(3, index) * weight
        across = term if across is None else across + term
    total = None  # B, 3, out_h, out_w
    for index, weight in zip(rows, row_weights):
        term = across.index_select(2, index) * weight[:, None]
        total = term if total is None else total + term
    sy, sx = np.float32(height) / np.float32(out_h), np.float32(width) / np.float32(out_w)
    scale = float(np.float32(1.0 / np.float64(sy * sx)))  # the kernel's 1.0 / float is a double division
    # a float32 value as a Python scalar: exact in the float32 multiply, and no host-to-device copy
    return total.mul_(scale).clamp_(0, 255).floor_()


def resize_one(image: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """`resize_group` for one uint8 CHW image."""
    return resize_group(image.unsqueeze(0), protocol)[0]


def batch_transform(images: list[torch.Tensor], protocol: Protocol) -> torch.Tensor:
    """Resize/crop uint8 CHW images, scale to [0, 1] and normalise: B, 3, S, S float32.

    Images of one size are resized together (one kernel per step for the whole group, as
    ImageNet-like sets hold few distinct sizes); each image's result is the same as alone.
    The groups are put back in the input's order with one index sent to the device per
    batch: a small host-to-device copy waits for the device's queued work, so one per group
    would stall the host once per group.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    device = images[0].device
    batch = torch.cat([resize_group(torch.stack([images[i] for i in members]), protocol) for members in groups.values()])
    order = [i for members in groups.values() for i in members]
    if order != sorted(order):
        position = torch.empty(len(order), dtype=torch.long)
        position[order] = torch.arange(len(order))
        batch = batch[position.to(device)]
    mean, std = _normalisation(tuple(protocol.mean), tuple(protocol.std), device)
    return (batch - mean) / std


@functools.cache
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's mean and std in uint8 levels, as 1, 3, 1, 1 tensors on `device` (made once)."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)

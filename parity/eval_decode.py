"""JPEG decoding for the fast eval path: a packed batch's JPEG bytes become uint8 C, H, W images on the device.

Where JPEGs are decoded is `parityport eval --decode` (`DECODERS`, or "auto", the default:
`resolve_decoder`):

- ``gpu``: torchvision.io.decode_jpeg on the batch's list. It creates nvJPEG with
  its default flags, which upsample 4:2:0 chroma by repeating each sample; libjpeg, and so
  PIL and the faithful path, interpolates it ("fancy upsampling"). The pixels differ: after
  the protocol's resize by 1.6-2.1 uint8 levels on average for ImageNet-sized photos and
  4-5 levels for 64-96 px ones (measured on an H200).
- ``nvimgcodec``: NVIDIA nvImageCodec (``pip install "nvidia-nvimgcodec-cu13[nvjpeg]"``;
  ``-cu12`` for CUDA 12 builds of torch), the decoder DALI is built on, with its
  ``fancy_upsampling`` option on: nvJPEG's interpolated chroma upsampling, libjpeg's
  method. It chooses among its backends (the GPU's hardware JPEG engines where there are
  some, CUDA kernels, Huffman decoding on its own CPU threads); which of them honour
  ``fancy_upsampling`` and so serve these images is not measured yet. "auto" picks it on CUDA when it is
  installed and can start: on an H200 it brought the trained BiT fixture's agreement with
  the faithful path from 97.2% (``gpu``) to 99.6-99.8%, and data2vec's from 99.6% to 100%.
- ``cpu``: libjpeg-turbo in the DataLoader workers (`eval_data.BytesDataset`); PIL's pixels, bit for bit.

An image the decoder cannot read is decoded by PIL, which also decides what counts as
unreadable, as on the faithful path.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import threading
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from converters.errors import InputError
from parity.eval_args import DECODE_CHOICES, DECODERS
from parity.eval_data import unpack

NVIMGCODEC_INSTALL = ('pip install "nvidia-nvimgcodec-cu13[nvjpeg]" (or -cu12 for a CUDA 12 build of torch; '
                      '"parityport[nvimgcodec]" from this project)')

_NVIMGCODEC_LOCK = threading.Lock()
Decoded = list["torch.Tensor | Exception"]


def decode_batch(batch: dict[str, Any], device: torch.device, decoder: str) -> tuple[list[torch.Tensor | None], list[str]]:
    """A `collate_packed` batch as uint8 C, H, W images on `device` (None where unreadable) and its notes.

    JPEG bytes go to `decoder` ("gpu" or "nvimgcodec") in one call, whatever it fails on to PIL;
    pixels decoded in the workers reach `device` in one copy of the packed batch when that is all it holds.
    """
    if "jpeg" not in batch["kinds"]:
        return unpack(batch, batch["packed"].to(device, non_blocking=True)), list(batch["notes"])
    data = unpack(batch)
    images = [item.to(device, non_blocking=True) if kind == "pixels" else None for item, kind in zip(data, batch["kinds"])]
    notes = list(batch["notes"])
    pending = [i for i, kind in enumerate(batch["kinds"]) if kind == "jpeg"]
    for i, result in zip(pending, JPEG_DECODERS[decoder]([data[i] for i in pending], device)):
        if isinstance(result, Exception):
            images[i], notes[i] = _pil_fallback(data[i], device, result)
        else:
            images[i] = result
    return images, notes


def _torchvision(data: Sequence[torch.Tensor], device: torch.device) -> Decoded:
    """nvJPEG through torchvision: the whole list in one call, image by image when that call fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decode_jpeg's deprecation notice in favour of TorchCodec
        try:
            return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return [_attempt(lambda d=d: decode_jpeg(d, mode=ImageReadMode.RGB, device=device)) for d in data]


def _nvimgcodec(data: Sequence[torch.Tensor], device: torch.device) -> Decoded:
    """nvImageCodec with libjpeg's chroma upsampling: every parsable stream in one call, on the current stream."""
    module = _nvimgcodec_module()
    streams = [_attempt(lambda d=d: module.CodeStream(d.numpy())) for d in data]
    parsed = [s for s in streams if not isinstance(s, Exception)]
    # PIL shows a file as stored: no EXIF rotation, here either
    params = module.DecodeParams(apply_exif_orientation=False, color_spec=module.ColorSpec.SRGB)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    with _NVIMGCODEC_LOCK:  # one decoder per GPU, shared by the batch-preparing threads
        decoded = _nvimgcodec_decoder(_device_index(device)).decode(parsed, params=params, cuda_stream=stream) if parsed else []
    images = iter(decoded)
    out: Decoded = []
    for s in streams:
        if isinstance(s, Exception):
            out.append(s)
        elif (image := next(images)) is None:
            out.append(RuntimeError("nvImageCodec could not decode it"))
        else:
            out.append(torch.from_dlpack(image).permute(2, 0, 1))  # H, W, C -> C, H, W
    return out


JPEG_DECODERS: dict[str, Callable[[Sequence[torch.Tensor], torch.device], Decoded]] = {
    "gpu": _torchvision, "nvimgcodec": _nvimgcodec}


def resolve_decoder(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The decoder to use for `requested` on `device`, and a note when "auto" could not pick nvImageCodec.

    "auto" is nvImageCodec on CUDA when it is installed and makes a decoder there, else torchvision's
    nvJPEG ("gpu", with a note saying why and what that changes); off CUDA it is "cpu". Any other
    request is checked by `check_decoder` and returned as it is.
    """
    if requested not in DECODE_CHOICES:
        raise InputError(None, f"decode must be one of {', '.join(DECODE_CHOICES)}, not {requested!r}")
    if requested != "auto":
        check_decoder(requested, device)
        return requested, None
    if device.type != "cuda":
        return "cpu", None
    try:
        check_decoder("nvimgcodec", device)
    except InputError as error:
        return "gpu", (f"decoded JPEGs with torchvision's nvJPEG, whose chroma upsampling is not libjpeg's, so fewer "
                       f"predictions match the faithful path's; nvImageCodec was not usable: {error.problem}")
    return "nvimgcodec", None


def check_decoder(decoder: str, device: torch.device) -> None:
    """Raise InputError, before any work, when `decoder` cannot run on `device`."""
    if decoder not in DECODERS:
        raise InputError(None, f"decode must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if decoder == "nvimgcodec":
        if device.type != "cuda":
            raise InputError(None, "--decode nvimgcodec decodes on a CUDA device; use --decode cpu or gpu elsewhere")
        try:
            _nvimgcodec_decoder(_device_index(device))
        except RuntimeError as error:  # e.g. a CUDA driver older than the package's CUDA
            raise InputError(None, f"nvImageCodec could not make a decoder on {device}: {error}") from None


def _nvimgcodec_module() -> Any:
    # Its log's errors include the optional JPEG 2000 and TIFF extensions it could not load, on
    # every start; decode failures reach us as results (PIL then decodes), so keep its log quiet
    # unless the user asked otherwise. Its loaders still print one "Failed to load" note each.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except ImportError as error:
        raise InputError(None, f"--decode nvimgcodec needs NVIDIA nvImageCodec, which is not installed ({error}): "
                               f"{NVIMGCODEC_INSTALL}") from None


@functools.cache
def _nvimgcodec_decoder(device_index: int) -> Any:
    """One nvImageCodec decoder per GPU, kept for the process: making one sets up its engines and threads."""
    return _nvimgcodec_module().Decoder(device_id=device_index, options=":fancy_upsampling=1")


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _attempt(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as error:
        return error


def _pil_fallback(data: torch.Tensor, device: torch.device, error: Exception) -> tuple[torch.Tensor | None, str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            image.load()
            array = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
        return array.permute(2, 0, 1).to(device), "GPU decode failed; PIL"
    except Exception as pil_error:
        return None, f"{type(error).__name__}: {error}; PIL: {pil_error}"

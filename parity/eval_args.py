"""`parityport eval`'s command line: its options and the names they accept.

This module imports neither torch nor PIL, so `parityport eval --help`, a usage error and an input
refused by `check_before_torch` answer at once; the evaluation itself (parity/eval_run.py) takes about
4 s and 0.9 GB to import torch and transformers. The modules that act on these names (protocols,
eval_data, eval_decode, eval_run) take them from here.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown
from converters.errors import InputError, print_traceback

PROTOCOL_NAMES = ("original", "hub", "timm")  # resolved by parity/protocols.py
DECODERS = ("gpu", "nvimgcodec", "cpu")  # where fast-path JPEGs are decoded: parity/eval_decode.py
DECODE_CHOICES = ("auto", *DECODERS)
HALF_NAMES = ("bf16", "fp16")  # the fast path's half types, parity/eval_run.py's HALF
PRECISIONS = ("auto", *HALF_NAMES, *(f"{name}-pure" for name in HALF_NAMES), "tf32")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"  # the VAL_DIR layouts: parity/eval_data.py
WNIDS_BY_ID = "ILSVRC2012_wnids_by_id.txt"
LOC_CSV = "LOC_val_solution.csv"
EXPECTED_LAYOUTS = (
    "expected one of: class subfolders holding images (ImageNet wnids like n01440764, or any class names); "
    f"flat ILSVRC2012_val_*.JPEG files with the devkit {GROUND_TRUTH} plus meta.mat or {WNIDS_BY_ID}; "
    f"or images with Kaggle's {LOC_CSV}"
)


def _number(kind: Callable[[str], Any], accepts: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse type: a `kind` number that `accepts`; argparse exits 2 naming the option and the
    `requirement` otherwise. Comparisons with NaN are false, so NaN is refused by any bound."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{requirement}, not {text}")
        return value

    return parse


def at_least(minimum: int | float, kind: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse type: a `kind` number not below `minimum`."""
    return _number(kind, lambda value: value >= minimum, f"must be at least {minimum}")


# A top-1 in percent: NaN, which every gap would be within, is refused with the rest.
percent = _number(float, lambda value: 0 <= value <= 100, "a top-1 in percent is from 0 to 100")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `parityport eval`'s options to a (sub)parser."""
    parser.add_argument("--model", required=True, help="converted model folder (config.json + weights)")
    parser.add_argument("--data", required=True, help="validation folder (class subfolders, ILSVRC2012 flat + devkit, or LOC csv)")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOL_NAMES, default=["original"], metavar="PROTOCOL",
                        help=f"preprocessing, of {', '.join(PROTOCOL_NAMES)} (default: original); several are "
                             "evaluated in turn and shown side by side, and --expect is about the first")
    parser.add_argument("--expect", type=percent, help="expected top-1 (percent); exit 1 when off by more than --tolerance")
    parser.add_argument("--tolerance", type=at_least(0.0, float), default=0.1, help="allowed |top1 - expect| in points (default 0.1)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda where CUDA is available)")
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--workers", type=at_least(0), default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="fast", action="store_true", default=None, help="GPU decode, bf16 or TF32 (default on CUDA)")
    group.add_argument("--faithful", dest="fast", action="store_false", help="exact protocol transforms, fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (fast path; the last batch is padded to one shape). Compiling "
                             "took 15-21 s on an H200 (2-3 s from inductor's on-disk cache) and counts in images/s: it pays "
                             "on long runs")
    parser.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                        help="fast path: decode JPEGs on the GPU with NVIDIA nvImageCodec (nvimgcodec: libjpeg's "
                             "chroma upsampling; a separate install) or with "
                             "torchvision's nvJPEG (gpu: repeats chroma samples, so its pixels are not PIL's), or in "
                             "the workers (cpu: libjpeg-turbo, PIL's exact pixels, for predictions identical to the "
                             "faithful path's); auto (default): nvimgcodec when installed, else gpu, with a note")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="fast path arithmetic: bf16 or fp16 autocast, bf16-pure or fp16-pure (weights and "
                             "activations stored in that type), or TF32 (auto: TF32 for BiT, bf16-pure for data2vec "
                             "1.0, bf16 otherwise, and fp16 for bf16 on GPUs older than Ampere); fp16 is 8x finer "
                             "than bf16 but ends at 65504: a batch whose activations overflow it is scored again in "
                             "TF32, and the summary says how many were")
    parser.add_argument("--limit", type=at_least(1), help="evaluate an evenly strided subset of this many images")
    parser.add_argument("--json", type=Path, help="write the result (top1, top5, images, images_per_s, ...) here; with "
                             "several protocols {protocols, runs: {protocol: result}, side_by_side: [...]}")
    parser.add_argument("--agree-with", type=Path, help="a previous --json result to compare predictions with")


# ---- what can be refused before torch is imported ------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, or {} when the file does not exist; a broken file is an InputError."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


def model_family(model_dir: Path) -> str:
    """The family named by config.json's model_type ("bit", "data2vec-vision", "data2vec2-vision", ...)."""
    config = read_json(model_dir / "config.json")
    if "model_type" not in config:
        raise InputError(model_dir / "config.json", "missing (or without model_type): not a model folder")
    return str(config["model_type"])


def check_model_folder(model_dir: str | Path) -> None:
    """Raise InputError unless `model_dir` is a folder whose config.json is a JSON object naming a model_type."""
    if Path(model_dir).is_file():
        raise InputError(model_dir, "is a file, not a converted folder; convert it first: "
                                    "parityport convert FILE --out DIR, then --model DIR")
    if not Path(model_dir).is_dir():
        raise InputError(model_dir, "no such folder; --model is a folder parityport convert wrote")
    model_family(Path(model_dir))


_CUDA_SUCCESS = 0  # the CUDA driver API's CUresult for success (cuda.h); anything else is an error
NO_CUDA = "--device cuda but CUDA is not available here; use --device cpu"


def no_cuda_here() -> bool:
    """True when this machine certainly offers torch no CUDA device, found in milliseconds without
    importing torch: on Linux, no NVIDIA driver library (libcuda.so.1, which every CUDA build of torch
    loads), or a driver whose cuInit fails or that counts no device (it honours CUDA_VISIBLE_DEVICES,
    as torch does). False wherever it cannot be sure (another system, a ROCm build of torch, whose
    "cuda" device is an AMD GPU): there `torch.cuda.is_available()` decides, after torch is imported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if "rocm" in importlib.metadata.version("torch"):
            return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    count = ctypes.c_int(0)
    if driver.cuInit(0) != _CUDA_SUCCESS:
        return True
    return driver.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS or count.value == 0


def check_before_torch(args: argparse.Namespace) -> None:
    """Raise InputError for what `parityport eval` can refuse before it imports torch: `--device cuda` on a
    machine with no CUDA device (`no_cuda_here`), a `--data` that is not a folder, a `--model` that is not a
    folder holding a readable config.json with a model_type. The same checks run again, with torch, where
    the evaluation needs them; these only answer sooner."""
    if args.device and args.device.startswith("cuda") and no_cuda_here():
        raise InputError(None, NO_CUDA)
    if not Path(args.data).is_dir():
        raise InputError(args.data, f"not a folder; {EXPECTED_LAYOUTS}")
    check_model_folder(args.model)


def refuse(error: InputError | OSError, args: argparse.Namespace) -> int:
    """Print `parityport eval`'s one line for bad input (the traceback first with --debug) and return 2."""
    if getattr(args, "debug", False):  # the traceback, and still exit 2 (bad input)
        print_traceback()
    where = f"{shown(error.filename, PATH_LIMIT)}: " if isinstance(error, OSError) and error.filename else ""
    problem = shown(error.strerror or error, MESSAGE_LIMIT) if isinstance(error, OSError) else error
    print(f"parityport eval: error: {where}{problem}", file=sys.stderr)
    return 2


def refuse_early(args: argparse.Namespace) -> int | None:
    """What `parityport eval` says before torch and transformers are imported: 2 after `refuse`'s line for
    what `check_before_torch` finds, else None (the evaluation goes on)."""
    try:
        check_before_torch(args)
    except (InputError, OSError) as error:  # OSError: a folder that cannot be read
        return refuse(error, args)
    return None

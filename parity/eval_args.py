"""`parityport eval`'s command line: its options and the names they accept.

This module imports neither torch nor PIL, so `parityport eval --help` and a usage error answer at
once; the evaluation itself (parity/eval_run.py) takes about 4 s to import torch and transformers.
The modules that act on these names (protocols, eval_data, eval_decode, eval_run) take them from here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

PROTOCOL_NAMES = ("original", "hub", "timm")  # resolved by parity/protocols.py
DECODERS = ("gpu", "nvimgcodec", "cpu")  # where fast-path JPEGs are decoded: parity/eval_decode.py
DECODE_CHOICES = ("auto", *DECODERS)
HALF_NAMES = ("bf16", "fp16")  # the fast path's half types, parity/eval_run.py's HALF
PRECISIONS = ("auto", *HALF_NAMES, *(f"{name}-pure" for name in HALF_NAMES), "tf32")


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

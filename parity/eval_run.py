"""ImageNet-style top-1/top-5 evaluation of a converted folder: `parityport eval`.

Two pipelines share one scoring loop:
- faithful: the protocol's exact PIL transforms in DataLoader workers (TensorFlow's own
  decode and resize for big_vision's protocols, parity/eval_tf.py), fp32 model, TF32 off;
- fast (CUDA): workers read file bytes; JPEGs are decoded in batches on the GPU
  (nvImageCodec when installed, else nvJPEG through torchvision; parity/eval_decode.py) or, with
  decode="cpu", by libjpeg-turbo in the workers (PIL's exact pixels); each batch travels as one packed
  tensor, is resized with antialiasing and normalised on the GPU, the model runs in
  channels_last under bf16 or fp16 autocast, stored in either, or in TF32 (per model type,
  `FAST_PRECISION`; optionally torch.compile), and a prefetch thread on its own CUDA stream prepares
  the next batch while the current one runs.

Under torchrun (or an initialised process group) image i is evaluated by rank
i % world_size only, so every image counts exactly once; per-rank counts are
all_reduced and per-image predictions all_gathered, giving every rank the
complete, identical result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown
from converters.errors import InputError, UsageParser, internal_error, print_traceback
from parity.eval_args import HALF_NAMES, PRECISIONS, add_eval_arguments
from parity.eval_data import (
    BytesDataset,
    EncodedDataset,
    EvalSet,
    LabelMap,
    PILDataset,
    collate_packed,
    find_eval_set,
    resolve_labels,
)
from parity.eval_decode import decode_batch, resolve_decoder
from parity.protocols import Protocol, batch_transform, resolve_protocol

MAX_FAILURES_LISTED = 100


# ---- model -------------------------------------------------------------------------------------



def worker_context(workers: int) -> str | None:
    """How DataLoader workers start: fork, unless JAX or TensorFlow threads are already running in
    this process (forking a multithreaded process can deadlock), then forkserver."""
    if workers and ("jax" in sys.modules or "tensorflow" in sys.modules):
        return "forkserver"
    return None


def load_model(model_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """AutoModelForImageClassification.from_pretrained(DIR), fp32, eval mode; with trust_remote_code only
    for a folder whose custom code (its config's auto_map) is byte for byte the code parityport ships."""
    from transformers import AutoModelForImageClassification

    from parity.protocols import read_json
    from parity.verify import check_code

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InputError(path, "not a model folder (no config.json)")
    check_code(path)  # any other code would run here, as verify and parity refuse to
    remote = "auto_map" in read_json(path / "config.json")
    try:
        model = AutoModelForImageClassification.from_pretrained(str(path), trust_remote_code=remote, dtype=torch.float32)
    except Exception as error:  # missing or corrupt weights, a config transformers refuses (their errors have no
        # common class): the folder is bad input (exit 2), not a missed --expect (exit 1)
        raise InputError(path, f"transformers cannot load it: {_first_line(error)}") from None
    return model.to(device).eval()


def _first_line(error: Exception) -> str:
    """The first line of an error's message, with the next one where it ends in a colon ("Validation error for
    field 'x':" is followed by what the error is)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


# ---- batch sources: each yields (pixels on device, indices, ok mask, notes) ---------------------


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def _faithful_batches(eval_set: EvalSet, indices: Sequence[int], transform: Any, protocol: Protocol,
                      device: torch.device, batch_size: int, workers: int) -> Iterator[Batch]:
    from PIL import Image

    if getattr(transform, "reads_bytes", False):  # it decodes the files itself (TensorFlow, parity/eval_tf.py)
        dataset = EncodedDataset(eval_set.samples, indices, transform, transform.shape)
    else:
        shape = tuple(transform(Image.new("RGB", (protocol.image_size,) * 2)).shape)
        dataset = PILDataset(eval_set.samples, indices, transform, shape)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        multiprocessing_context=worker_context(workers))
    for pixels, index, ok, notes in loader:
        yield pixels.to(device, non_blocking=True), index, ok, list(notes)


def _prepare(batch: dict[str, Any], protocol: Protocol, device: torch.device, decode: str) -> Batch:
    images, notes = decode_batch(batch, device, decode)
    ok = torch.tensor([image is not None for image in images])
    blank = torch.zeros(3, protocol.image_size, protocol.image_size, dtype=torch.uint8, device=device)
    pixels = batch_transform([image if image is not None else blank for image in images], protocol)
    return pixels, batch["index"], ok, notes


def _fast_batches(eval_set: EvalSet, indices: Sequence[int], protocol: Protocol, device: torch.device,
                  batch_size: int, workers: int, decode: str = "gpu", producers: int = 1) -> Iterator[Batch]:
    """Read bytes (or decode, with `decode="cpu"`) in workers; finish the next batches on side streams while one runs.

    `producers` threads, each with its own CUDA stream, take packed batches from the loader in
    turn and decode, resize and normalise them. With more than one, a thread can resize a batch
    while another waits on the decoder, and batches may arrive out of order (their rows carry
    the images' indices, so nothing depends on the order).
    """
    loader = DataLoader(BytesDataset(eval_set.samples, indices, decode), batch_size=batch_size, num_workers=workers,
                        multiprocessing_context=worker_context(workers),
                        pin_memory=decode == "cpu" and device.type == "cuda",
                        collate_fn=collate_packed, prefetch_factor=4 if workers else None)
    packed_batches, take = iter(loader), threading.Lock()
    ready: queue.Queue = queue.Queue(maxsize=2 * producers)
    stop = threading.Event()  # set when the consumer is done, early or not

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                return ready.put(item, timeout=0.1)
            except queue.Full:
                continue

    def produce() -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not stop.is_set():
                    with take:  # a DataLoader iterator is not thread-safe
                        packed = next(packed_batches, None)
                    if packed is None:
                        break
                    batch = _prepare(packed, protocol, device, decode)
                    if stream is not None:
                        stream.synchronize()
                    put(batch)
        except BaseException as error:  # surfaced in the consumer
            put(error)
        put(None)

    threads = [threading.Thread(target=produce, daemon=True) for _ in range(producers)]
    for thread in threads:
        thread.start()
    running = producers
    try:
        while running:
            if (batch := ready.get()) is None:
                running -= 1
                continue
            if isinstance(batch, BaseException):
                raise batch
            if device.type == "cuda":
                batch[0].record_stream(torch.cuda.current_stream(device))
            yield batch
    finally:  # also when the consumer stops early (closing this generator): no thread or worker left behind
        stop.set()
        for thread in threads:
            thread.join()
        del packed_batches  # its workers shut down with it


# ---- distributed -------------------------------------------------------------------------------


def _world(device_type: str) -> tuple[int, int]:
    """(rank, world_size), initialising the process group from torchrun's environment if needed:
    NCCL for CUDA devices, gloo for CPU ones (or where PARITYPORT_DIST_BACKEND=gloo)."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nccl = device_type == "cuda" and torch.cuda.is_available() and os.environ.get("PARITYPORT_DIST_BACKEND") != "gloo"
        backend = "nccl" if nccl else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_device(device: torch.device, rank: int, world: int) -> torch.device:
    """This rank's device: under torchrun, "cuda" becomes the GPU of the rank's LOCAL_RANK (and the
    current device, which NCCL collectives use). Every rank sees the same arguments, so the errors
    below stop all of them alike before any collective."""
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None:
        raise InputError(None, f"--device {device} would put all {world} ranks on one GPU; give --device cuda "
                               "and each rank takes the GPU of its LOCAL_RANK")
    gpus, per_machine = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_machine > gpus:
        raise InputError(None, f"{per_machine} ranks on a machine with {gpus} GPU{'s' * (gpus != 1)}; "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % gpus)))
    torch.cuda.set_device(device)
    return device


def _agree_on_failure(failure: InputError | None, world: int) -> None:
    """Raise `failure` here, or on every rank the first rank's failure, so that no rank waits in a
    collective for one that has stopped (and every rank exits 2 with the same line)."""
    if world > 1:
        failures: list[tuple[str | None, str] | None] = [None] * world
        dist.all_gather_object(failures, None if failure is None else (failure.path, failure.problem))
        first = next(((r, f) for r, f in enumerate(failures) if f is not None), None)
        if first is not None and failure is None:
            path, problem = first[1]
            failure = InputError(path, f"{problem} (found by rank {first[0]} of {world})")
    if failure is not None:
        raise failure


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_rows(rows: torch.Tensor, total: int, world: int, device: torch.device) -> torch.Tensor:
    """all_gather per-rank rows [n_r, k] padded to ceil(total / world) (padding is never counted)."""
    if world == 1:
        return rows
    per_rank = -(-total // world)
    padded = torch.full((per_rank, rows.shape[1]), -2, dtype=torch.long, device=_comm_device(device))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    gathered = torch.cat(parts)
    return gathered[gathered[:, 0] != -2]


# ---- evaluation --------------------------------------------------------------------------------


def _settings(fast: bool, device: torch.device) -> None:
    # faithful: strict fp32 (TF32 changes logits by ~1e-3 relative); fast: the throughput settings
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast and device.type == "cuda"


# The fast path's arithmetic per model type ("bf16" / "fp16": autocast to that type, norms and softmax
# in fp32; "bf16-pure" / "fp16-pure": weights and activations stored in it, as timm's validate
# --model-dtype; "tf32": fp32 storage, TF32 matmuls and convolutions). Measured on an H200, model
# alone, eager: data2vec base at 224 8,270 img/s in bf16-pure, 6,882 in bf16 autocast (100% agreement
# on the trained fixture either way); BiT-R50x1 at 448 2,605 in bf16-pure, 1,819 in TF32, 1,661 in bf16
# autocast (its GroupNorms run in fp32 with casts around each), but BiT's trained fixture keeps the
# faithful top-1 on 99.4-99.6% of images in bf16 against 99.8-100% in TF32: bf16-pure moves its logits
# by 0.03 (median of the largest change per image, on CPU; at most 0.19) where 1% of its images have a
# top-2 margin under 0.08. fp16 keeps 3 more mantissa bits: on CPU fp16-pure moves the same logits by
# 0.004 (at most 0.027) and keeps 100% of the fixture's predictions, data2vec's by 0.0016; Hopper runs
# fp16 and bf16 at the same tensor-core rate, but fp16-pure is not yet measured on a GPU, and fp16's
# range ends at 65504 (`Scorer` scores a batch that overflows again in TF32). So BiT stays TF32 for
# now; other model types take bf16 autocast.
FAST_PRECISION = {"bit": "tf32", "data2vec-vision": "bf16-pure"}
HALF = dict(zip(HALF_NAMES, (torch.bfloat16, torch.float16)))  # the half types named in PRECISIONS


def fast_precision(requested: str, model_type: str, device: torch.device | None = None) -> str:
    """The fast path's precision: `requested`, or for "auto" the model type's entry of FAST_PRECISION,
    its bf16 made fp16 on a CUDA device without bf16 arithmetic of its own (before Ampere: V100, T4),
    where torch would emulate bf16 far slower than fp16 runs."""
    if requested not in PRECISIONS:
        raise InputError(None, f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    choice = FAST_PRECISION.get(model_type, "bf16")
    if device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return choice.replace("bf16", "fp16")
    return choice


def _half(precision: str) -> tuple[torch.dtype | None, bool]:
    """The half type of `precision` (None for "tf32" and "fp32") and whether the model is stored in it."""
    return HALF.get(precision.removesuffix("-pure")), precision.endswith("-pure")


def fast_model(model: torch.nn.Module, precision: str, compile: bool = False) -> torch.nn.Module:
    """The fast path's model: channels_last, its weights in bf16 or fp16 for "*-pure", optionally torch.compile'd."""
    model = model.to(memory_format=torch.channels_last)
    half, pure = _half(precision)
    if pure:
        model = model.to(half)
    return torch.compile(model) if compile else model


def logits(model: torch.nn.Module, pixels: torch.Tensor, precision: str) -> torch.Tensor:
    """The model's fp32 logits for `pixels`: as given in "fp32" (faithful), else channels_last in
    bf16 or fp16 autocast ("bf16", "fp16"), in that type into a model stored in it ("bf16-pure",
    "fp16-pure", `fast_model`), or in fp32 with TF32 convolutions and matmuls ("tf32", `_settings`)."""
    if precision == "fp32":
        return model(pixel_values=pixels).logits.float()
    half, pure = _half(precision)
    dtype = half if pure else pixels.dtype
    with torch.autocast(pixels.device.type, dtype=half or torch.bfloat16, enabled=half is not None and not pure):
        return model(pixel_values=pixels.to(dtype, memory_format=torch.channels_last)).logits.float()


def _progress(total: int, rank: int, world: int = 1):
    """Rank 0's bar on a TTY; under torchrun it counts that rank's share, which the others keep pace with."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
                desc=f"rank 0's share (1/{world})" if world > 1 else None)


def evaluate(model_dir: str | Path, data_dir: str | Path, *, protocol: str = "original", device: str = "cpu",
             batch_size: int = 64, workers: int = 4, fast: bool | None = None, limit: int | None = None,
             compile: bool = False, decode: str = "auto", precision: str = "auto", producers: int = 1,
             eval_set: EvalSet | None = None) -> dict[str, Any]:
    """Top-1/top-5 of the folder's model on VAL_DIR with the named protocol; the result dict of `--json`.

    `eval_set` is `find_eval_set(data_dir, limit)` when the caller has it already (several protocols
    on one set list the folder once).

    `fast=None` picks the fast GPU pipeline on CUDA and the faithful one elsewhere; `fast=True`
    off CUDA runs the same pipeline with CPU decode (for tests). On the fast path `decode`
    says where JPEGs are decoded (`eval_args.DECODERS`: "gpu", torchvision's nvJPEG in
    batches; "nvimgcodec", nvImageCodec with libjpeg's chroma upsampling; "cpu", libjpeg-turbo
    in the workers, PIL's exact pixels; "auto", `eval_decode.resolve_decoder`, whose note
    lands in decode_note), `precision` its arithmetic (`fast_precision`) and `producers` how
    many threads prepare batches (`_fast_batches`). Failed images count as wrong
    and are listed. A half-precision batch whose logits overflow is scored again in TF32
    (`Scorer`; rescored_batches counts them); logits inf or NaN even so stop the run with an
    InputError naming the image. Under torch.distributed each rank evaluates images
    i % world == rank and every rank returns the full result. Result keys: top1, top5
    (percent), images, correct, failures, failed_images, converted, images_per_s, protocol,
    preprocessing (the protocol in words), model, data, layout, label_mapping, device,
    pipeline, decode, precision, first_batch_s (this rank's seconds until its first batch was
    scored), batches and rescored_batches (over all ranks), batch_size, world_size, predictions
    (top-1 output per image, -1 for a failure, in the set's order).
    """
    if Path(model_dir).is_file():
        raise InputError(model_dir, "is a file, not a converted folder; convert it first: "
                                    "parityport convert FILE --out DIR, then --model DIR")
    if not Path(model_dir).is_dir():
        raise InputError(model_dir, "no such folder; --model is a folder parityport convert wrote")
    torch_device = torch.device(device)
    rank, world = _world(torch_device.type)
    torch_device = _rank_device(torch_device, rank, world)
    fast = torch_device.type == "cuda" if fast is None else fast
    decode_note = None
    if fast:
        decode, decode_note = resolve_decoder(decode, torch_device)
    _settings(fast, torch_device)
    if eval_set is None:
        eval_set = find_eval_set(data_dir, limit)
    spec, transform = resolve_protocol(model_dir, protocol)
    model = load_model(model_dir, torch_device)
    labels = resolve_labels(eval_set, model.config)
    precision = fast_precision(precision, model.config.model_type, torch_device) if fast else "fp32"
    if fast:
        model = fast_model(model, precision, compile)
    indices = list(range(rank, len(eval_set.samples), world))
    batches = (_fast_batches(eval_set, indices, spec, torch_device, batch_size, workers, decode, producers) if fast
               else _faithful_batches(eval_set, indices, transform, spec, torch_device, batch_size, workers))
    reload = None if _half(precision)[0] is None else lambda: fast_model(load_model(model_dir, torch_device), "tf32")
    scorer = Scorer(model, labels, precision, reload, pad_to(batch_size, fast, compile, torch_device))
    failure = None  # a failure this rank found, raised on every rank by _agree_on_failure before any result
    try:
        rows, notes, elapsed, first = _run(scorer, batches, len(indices), rank, world)
    except NonFiniteLogits as error:
        failure = InputError(eval_set.samples[error.indices[0]].path, _non_finite_problem(error))
    except torch.cuda.OutOfMemoryError as error:
        failure = InputError(None, f"{torch_device} ran out of memory at --batch-size {batch_size}; give a smaller "
                                   f"one ({'. '.join(str(error).split('. ')[:2])})")
    finally:
        batches.close()  # the pipeline's threads and workers stop here, not at garbage collection
    _agree_on_failure(failure, world)
    return _result(eval_set, labels, rows, notes, elapsed, world, torch_device, (scorer.batches, scorer.rescored),
                   {"protocol": protocol, "protocol_spec": spec.__dict__ | {"resize_side": spec.resize_side},
                    "preprocessing": spec.describe(fast),
                    "model": str(model_dir), "data": str(data_dir), "batch_size": batch_size,
                    "pipeline": "fast" if fast else "faithful", "device": str(torch_device),
                    "decode": (decode if torch_device.type == "cuda" else "cpu") if fast else "PIL", "precision": precision,
                    **({"decode_note": decode_note} if decode_note else {}), "first_batch_s": first,
                    "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"})


def pad_to(batch_size: int, fast: bool, compile: bool, device: torch.device) -> int | None:
    """The batch size every batch is padded to (`Scorer`), or None for no padding.

    A compiled model would compile again for the shorter last batch, and on CUDA the fast path's
    cuDNN benchmark mode would time every convolution's algorithms again for its shape (seconds
    for a ResNet), so both get one shape; the cost is at most batch_size - 1 images' work.
    """
    return batch_size if compile or (fast and device.type == "cuda") else None


class Scorer:
    """A batch's class scores from the eval's model in its precision.

    A half-precision batch whose logits are inf or NaN for a decoded image (fp16 ends at 65504)
    is scored again in TF32 by a float copy of the model, loaded by `reload` at the first such
    batch; `rescored` counts those batches, `batches` all of them. Logits still not finite
    raise NonFiniteLogits: their top-k would mean nothing. With `pad_to`, a shorter (last) batch
    is padded with zero images up to that size and their scores dropped, so the model sees one
    shape: a compiled model does not compile again, nor cuDNN autotune again.
    """

    def __init__(self, model: torch.nn.Module, labels: LabelMap, precision: str,
                 reload: Callable[[], torch.nn.Module] | None = None, pad_to: int | None = None) -> None:
        self.model, self.labels, self.precision, self.reload, self.pad_to = model, labels, precision, reload, pad_to
        self.rescored = self.batches = 0
        self._float: torch.nn.Module | None = None

    def __call__(self, pixels: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        precision = self.precision
        out = logits(self.model, padded(pixels, self.pad_to), precision)[: len(pixels)]
        bad = ~out.isfinite().all(1).cpu() & ok
        if bool(bad.any()) and self.reload is not None:
            if self._float is None:
                self._float = self.reload()
            out, precision = logits(self._float, pixels, "tf32"), "tf32"
            self.rescored += 1
            bad = ~out.isfinite().all(1).cpu() & ok
        if bool(bad.any()):
            raise NonFiniteLogits([int(i) for i in index[bad]], len(index), precision)
        return self.labels.scores(out)


@torch.inference_mode()
def _run(scorer: Scorer, batches: Iterator[Batch], total: int, rank: int,
         world: int = 1) -> tuple[torch.Tensor, dict[int, str], float, float | None]:
    """Score every batch; rows are [index, ok, top-5 outputs...] per image (top-k padded with -1).
    Also returned: the seconds taken in all and until the first batch was scored (compiling and
    cuDNN's autotuning happen there; None when there was no batch).
    """
    rows, notes, first = [], {}, None
    start = time.perf_counter()
    with _progress(total, rank, world) as bar:
        for pixels, index, ok, batch_notes in batches:
            scores = scorer(pixels, index, ok)
            k = min(5, scores.shape[1])
            top = torch.full((len(index), 5), -1, dtype=torch.long)
            top[:, :k] = scores.topk(k, dim=1).indices.cpu()
            top[~ok] = -1  # a failed image predicts nothing and counts as wrong
            rows.append(torch.cat([index.view(-1, 1), ok.long().view(-1, 1), top], dim=1))
            notes.update({int(i): n for i, n in zip(index, batch_notes) if n})
            first = time.perf_counter() - start if first is None else first  # the .cpu() above waited for the scores
            bar.update(len(index))
            bar.set_postfix(img_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.0f}")
    if any(p.is_cuda for p in scorer.model.parameters()):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return (torch.cat(rows) if rows else torch.empty(0, 7, dtype=torch.long)), notes, elapsed, first


class NonFiniteLogits(Exception):
    """The model's logits were inf or NaN in `precision` for `indices` (positions in the eval set),
    `of` images in their batch."""

    def __init__(self, indices: list[int], of: int, precision: str) -> None:
        super().__init__(f"non-finite logits in {precision} for images {indices}")
        self.indices, self.of, self.precision = indices, of, precision


def _non_finite_problem(error: NonFiniteLogits) -> str:
    """The one-line problem for `NonFiniteLogits`: the weights give inf or NaN in float arithmetic."""
    where = f"the model's logits are inf or NaN in {error.precision} for this image"
    if len(error.indices) > 1:
        where += f" and {len(error.indices) - 1} more of its batch of {error.of}"
    return f"{where}: its weights give non-finite outputs (check the folder with `parityport parity`)"


def padded(pixels: torch.Tensor, size: int | None) -> torch.Tensor:
    """`pixels` (B, C, H, W) with zero images appended up to `size` rows (unchanged when None or not shorter)."""
    if size is None or len(pixels) >= size:
        return pixels
    return torch.cat([pixels, pixels.new_zeros((size - len(pixels), *pixels.shape[1:]))])


def _result(eval_set: EvalSet, labels: LabelMap, rows: torch.Tensor, notes: dict[int, str], elapsed: float,
            world: int, device: torch.device, batches: tuple[int, int], meta: dict[str, Any]) -> dict[str, Any]:
    """The eval's result dict from this rank's rows, notes and (batches, rescored batches), summed
    over the ranks."""
    total = len(eval_set.samples)
    targets = labels.targets(eval_set.samples)
    local = torch.tensor([
        int((rows[:, 2] == targets[rows[:, 0]]).sum()) if len(rows) else 0,
        int((rows[:, 2:] == targets[rows[:, 0]].view(-1, 1)).any(1).sum()) if len(rows) else 0,
        int((rows[:, 1] == 0).sum()),
        *batches,
    ], dtype=torch.float64)
    timing = torch.tensor([elapsed], dtype=torch.float64)
    if world > 1:
        comm = _comm_device(device)
        local, timing = local.to(comm), timing.to(comm)
        dist.all_reduce(local)
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        gathered_notes: list[dict[int, str]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered_notes, notes)
        notes = {k: v for part in gathered_notes for k, v in part.items()}
    rows = _gather_rows(rows.to(_comm_device(device)), total, world, device).cpu()
    predictions = torch.full((total,), -1, dtype=torch.long)
    predictions[rows[:, 0]] = rows[:, 2]
    failed = sorted(int(i) for i in rows[rows[:, 1] == 0, 0])
    correct1, correct5, failures, batch_count, rescored = (int(v) for v in local.cpu())
    elapsed = float(timing.cpu()[0])
    return {
        **meta,
        "top1": 100.0 * correct1 / max(total, 1),
        "top5": 100.0 * correct5 / max(total, 1),
        "images": total,
        "correct": correct1,
        "failures": failures,
        "failed_images": [{"path": str(eval_set.samples[i].path), "error": notes.get(i, "")} for i in failed[:MAX_FAILURES_LISTED]],
        "converted": _converted(notes, set(failed)),
        "images_per_s": total / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "layout": eval_set.layout,
        "layout_notes": eval_set.notes,
        "label_mapping": labels.kind,
        "world_size": world,
        "batches": batch_count,
        "rescored_batches": rescored,
        "predictions": predictions.tolist(),
    }


def _converted(notes: dict[int, str], failed: set[int]) -> dict[str, int]:
    """How many images were decoded after a conversion (e.g. "PNG/RGBA", "JPEG/CMYK", "JPEG/L")."""
    counts: dict[str, int] = {}
    for index, note in notes.items():
        if index not in failed:
            counts[note] = counts.get(note, 0) + 1
    return dict(sorted(counts.items()))


def prediction_agreement(run_a: dict[str, Any], run_b: dict[str, Any]) -> dict[str, Any]:
    """Agreement between two runs on the same set: % of images with the same top-1 output, and the top-1 gap.

    Both runs must carry `predictions` of equal length (same data, same order).
    """
    a, b = run_a["predictions"], run_b["predictions"]
    if len(a) != len(b):
        raise InputError(None, f"runs have {len(a)} and {len(b)} predictions: not the same image set")
    same = sum(int(x == y) for x, y in zip(a, b))
    return {
        "images": len(a),
        "agreement": 100.0 * same / max(len(a), 1),
        "disagreements": len(a) - same,
        "top1_difference": run_a["top1"] - run_b["top1"],
        "pipelines": [run_a.get("pipeline"), run_b.get("pipeline")],
    }


# ---- command line ------------------------------------------------------------------------------


def _check_device(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, "--device cuda but CUDA is not available here; use --device cpu")
    if args.fast and not args.device.startswith("cuda"):
        raise InputError(None, "--fast decodes on the GPU and needs --device cuda")
    if args.decode in ("gpu", "nvimgcodec") and not args.device.startswith("cuda"):
        raise InputError(None, f"--decode {args.decode} is the fast path's, on a CUDA device; on {args.device} "
                               "the faithful path decodes with PIL")


def run_eval(args: argparse.Namespace) -> int:
    """Run `parityport eval` from parsed arguments; return the exit code (0 ok, 1 --expect missed, 2 bad input)."""
    try:
        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_device(args)
        if args.json:  # before the evaluation, which can take hours: its result must have somewhere to go
            _check_destination(args.json)
        protocols = list(dict.fromkeys(args.protocol))
        eval_set = find_eval_set(args.data, args.limit)
        others = {}
        if args.agree_with:  # checked before any evaluation
            from parity.protocols import read_json

            other = read_json(args.agree_with)
            others = {protocol: _run_to_agree_with(other, protocol, args.agree_with) for protocol in protocols}
            _check_same_count(others, len(eval_set.samples), args)
        results = [evaluate(args.model, args.data, protocol=protocol, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, fast=args.fast, limit=args.limit, compile=args.compile,
                            decode=args.decode, precision=args.precision, eval_set=eval_set)
                   for protocol in protocols]
        for result in results:
            if result["protocol"] in others:
                result["agreement"] = prediction_agreement(result, others[result["protocol"]])
        _add_published(results, Path(args.model))
    except (InputError, OSError) as error:  # OSError: a folder that cannot be read, under either entry point
        if getattr(args, "debug", False):  # the traceback, and still exit 2 (bad input)
            print_traceback()
        where = f"{shown(error.filename, PATH_LIMIT)}: " if isinstance(error, OSError) and error.filename else ""
        problem = shown(error.strerror or error, MESSAGE_LIMIT) if isinstance(error, OSError) else error
        print(f"parityport eval: error: {where}{problem}", file=sys.stderr)
        return 2
    result = results[0]
    if result.get("world_size", 1) > 1 and dist.get_rank() != 0:
        return _exit_code(result, args, quiet=True)
    print("\n".join(_summary(r) for r in results))
    written = result
    if len(results) > 1:
        rows = side_by_side(results, args.expect)
        print(_side_by_side_table(rows))
        written = {"protocols": [r["protocol"] for r in results], "runs": {r["protocol"]: r for r in results},
                   "side_by_side": rows}
    if args.json:
        try:
            write_result(args.json, written)
        except OSError as error:
            print(f"parityport eval: error: {args.json}: cannot write the result: {error.strerror or error}", file=sys.stderr)
            return 2
    return _exit_code(result, args)


def _check_destination(path: Path) -> None:
    """Raise InputError unless a file can be written at `path`: not a folder, below no file."""
    if path.is_dir():
        raise InputError(path, "is a folder; --json takes the path of a file to write")
    existing = next(p for p in path.parents if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise InputError(existing, f"is a file, so --json {path} cannot be written below it")


def write_result(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename: a write cut short (a full
    disk) leaves the previous file whole, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _check_same_count(others: dict[str, dict[str, Any]], images: int, args: argparse.Namespace) -> None:
    """Raise InputError, before any evaluation, when the `--agree-with` runs have another number of
    predictions than this run's `images` (another set, or another --limit): agreement is per image."""
    for protocol, other in others.items():
        if len(other["predictions"]) != images:
            subset = f" with --limit {args.limit}" if args.limit else ""
            raise InputError(args.agree_with, f"its {protocol} run has {len(other['predictions'])} predictions where "
                                              f"{args.data}{subset} has {images} images: not the same image set")


def side_by_side_runs(data: Any) -> dict[str, Any] | None:
    """The per-protocol results of a side-by-side `--json` file ({protocols, runs, side_by_side}),
    or None for any other content (a single protocol's result, say)."""
    runs = data.get("runs") if isinstance(data, dict) else None
    return runs if isinstance(runs, dict) else None


def _run_to_agree_with(other: Any, protocol: str, path: Path) -> dict[str, Any]:
    """The result in an `--agree-with` file to compare a `protocol` run with: the file's result, or
    from a side-by-side file its run of the same protocol."""
    if (runs := side_by_side_runs(other)) is not None:
        if protocol not in runs:
            raise InputError(path, f"has no {protocol} run to agree with (it has {', '.join(runs)})")
        other = runs[protocol]
    if not isinstance(other, dict) or not isinstance(other.get("predictions"), list) or "top1" not in other:
        raise InputError(path, "not a `parityport eval --json` result (no predictions to agree with)")
    return other


def _add_published(results: list[dict[str, Any]], model_dir: Path) -> None:
    """Give each result the catalog's published top-1 for its preprocessing, where the folder was
    converted from a catalogued checkpoint and the catalog has a figure measured that way
    (`card.published_figure`)."""
    from parity.card import folder_catalog_entry, published_figure

    entry, synthetic = folder_catalog_entry(model_dir)
    for result in results:
        if (figure := published_figure(entry, result["protocol_spec"])) is not None:
            result["published"] = {"top1": figure.top1, "protocol": figure.protocol, "dataset": figure.dataset,
                                   "source": figure.cited, "catalog_entry": entry.name,
                                   "gap": result["top1"] - figure.top1, "synthetic_weights": synthetic}


def side_by_side(results: Sequence[dict[str, Any]], expect: float | None = None) -> list[dict[str, Any]]:
    """One row per protocol's result: its preprocessing, top-1/top-5, the published top-1 for it (None
    when not catalogued), gap to `expect` (None without one) and agreement with the first result's
    predictions (`prediction_agreement`)."""
    return [{"protocol": r["protocol"], "preprocessing": r["preprocessing"], "top1": r["top1"], "top5": r["top5"],
             "published_top1": r.get("published", {}).get("top1"),
             "gap_to_expected": None if expect is None else r["top1"] - expect,
             "agreement_with_first": prediction_agreement(r, results[0])} for r in results]


def _side_by_side_table(rows: list[dict[str, Any]]) -> str:
    """`side_by_side`'s rows as a Markdown table (it reads as text and pastes into a model card)."""
    expected = rows[0]["gap_to_expected"] is not None
    published = any(row["published_top1"] is not None for row in rows)
    lines = [f"protocols side by side (agreement: images with the same top-1 as under {rows[0]['protocol']}):",
             "| protocol | preprocessing | top-1 | top-5 |" + " published (gap) |" * published + " vs expected |" * expected
             + " agreement |", "|---|---|---|---|" + "---|" * (published + expected) + "---|"]
    for row in rows:
        figure, cells = row["published_top1"], []
        if published:
            cells.append("none catalogued" if figure is None else f"{figure:g}% ({row['top1'] - figure:+.3f})")
        if expected:
            cells.append(f"{row['gap_to_expected']:+.3f}")
        lines.append(f"| {row['protocol']} | {row['preprocessing']} | {row['top1']:.3f}% | {row['top5']:.3f}% | "
                     + "".join(f"{cell} | " for cell in cells) + f"{row['agreement_with_first']['agreement']:.2f}% |")
    return "\n".join(lines)


def _summary(result: dict[str, Any]) -> str:
    notes = result.get("layout_notes", {})
    subset, missing = notes.get("subset_of"), notes.get("labels_without_image", 0)
    whole = (subset or result["images"]) + missing if subset or missing else None  # the set the ground truth names
    lines = [
        f"{result['model']} on {result['data']} ({result['layout']}, {result['label_mapping']}), "
        f"protocol {result['protocol']} ({result['preprocessing']}), {result['pipeline']} pipeline on {result['device']}"
        + (f" (JPEGs decoded by {result['decode']}, {result['precision']})" if result["pipeline"] == "fast" else ""),
        f"top-1 {result['top1']:.3f}%  top-5 {result['top5']:.3f}%  images {result['images']}"
        + (f" (--limit: a strided subset of {subset})" if subset else "")
        + (f" ({missing} more images named by the ground truth are not in the folder)" if missing else "")
        + f"  {result['images_per_s']:.1f} img/s",
    ]
    if result["failures"]:
        lines.append(f"failures: {result['failures']} images could not be decoded and count as wrong:")
        lines += [f"  {f['path']}: {f['error']}" for f in result["failed_images"][:10]]
    if result["converted"]:
        lines.append("decoded after conversion to RGB: " + ", ".join(f"{k} x{v}" for k, v in result["converted"].items()))
    if "published" in result:
        published = result["published"]
        lines.append(f"published top-1 with this preprocessing (the catalog's {published['protocol']} protocol) on "
                     f"{published['dataset']}: {published['top1']:g}% ({published['source']}); this run "
                     f"{published['gap']:+.3f}"
                     + (f" on {result['images']} of the set's {whole} images, not a reproduction" if whole else "")
                     + ("; this folder was converted from a synthetic stand-in, not the published weights"
                        if published["synthetic_weights"] else ""))
    if result.get("rescored_batches"):
        lines.append(f"note: {result['rescored_batches']} of {result['batches']} batches gave inf or NaN logits in "
                     f"{result['precision']} (beyond its range) and were scored again in TF32")
    if "decode_note" in result:
        lines.append(f"note: {result['decode_note']}")
    if "agreement" in result:
        a = result["agreement"]
        lines.append(f"agreement with the other run: {a['agreement']:.3f}% of images, top-1 difference {a['top1_difference']:+.3f}")
    return "\n".join(lines)


def _exit_code(result: dict[str, Any], args: argparse.Namespace, quiet: bool = False) -> int:
    if args.expect is None:
        return 0
    gap = result["top1"] - args.expect
    # both are decimal percents in binary floats (30.0 - 30.1 is -0.10000000000000142): a gap equal to the
    # tolerance as written passes, so the comparison allows their rounding, far below one image's share of any set
    if abs(gap) > args.tolerance + 1e-9:
        if not quiet:
            print(f"top-1 {result['top1']:.3f}% is {gap:+.3f} points from the expected {args.expect:.3f}% "
                  f"(tolerance {args.tolerance})", file=sys.stderr)
        return 1
    if not quiet:
        print(f"top-1 within {args.tolerance} of the expected {args.expect:.3f}% (gap {gap:+.3f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m parity.eval_run ...` (the same options as `parityport eval`)."""
    parser = UsageParser(prog="parityport eval", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    try:
        return run_eval(parser.parse_args(argv))
    except Exception:
        return internal_error(parser.prog)
    finally:
        if dist.is_available() and dist.is_initialized() and "TORCHELASTIC_RUN_ID" in os.environ:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

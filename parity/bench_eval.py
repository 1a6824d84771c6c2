"""End-to-end ImageNet-eval throughput: faithful vs fast vs a timm-validate-style baseline (`make bench-eval`).

Generates an ImageNet-like validation set (N JPEGs, quality 90, sizes drawn like
ImageNet val: mostly 500 px on the long side at 4:3 / 3:4 / 3:2 / 1:1, a tail of
larger and odd-ratio images; 1000 wnid class folders) into a cache folder once,
then measures images/s of three pipelines in the same run on each model:

- faithful: `evaluate(fast=False)` — PIL transforms in workers, fp32, TF32 off;
- fast: `evaluate(fast=True)` — batched GPU JPEG decode, GPU resize, bf16 or TF32,
  channels_last; the same with nvImageCodec as the decoder (`decode="nvimgcodec"`, when
  installed), with JPEGs decoded in the workers (`decode="cpu"`) and with two threads
  preparing batches (`producers=2`); with `--compile`, also the fast path with the model
  compiled;
- baseline: what timm's validate.py does — DataLoader + PIL resize/crop to uint8 in
  workers, pinned memory, normalise on the GPU, bf16 autocast, channels_last.

More figures say what limits the fast path: its input pipeline alone (read, decode,
resize, normalise, no model) per decoder, each GPU decoder alone on bytes held in
memory, and the model alone on one resident batch in the fast path's settings (per
precision; compiled too with `--compile`).
A pipeline that cannot run here (nvImageCodec not installed) is listed as skipped, with why.

Models: `--model DIR` (repeatable), or randomly initialised data2vec-vision base at
224 and BiT-R50x1 at 448 (squash) built from transformers configs (`--model-size
tiny` builds small stand-ins instead, the default on CPU). Each pipeline gets a
short warm-up run before it is timed. Results go to benchmarks/eval.json, naming the
device. Needs CUDA; `--device cpu --images 64` is a smoke run of the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from converters.errors import InputError
from parity.eval_args import DECODERS, at_least
from parity.eval_args import PRECISIONS as FAST_PRECISIONS
from parity.eval_data import (BytesDataset, EvalSet, PILDataset, collate_packed, find_eval_set, imagenet1k_wnids,
                               resolve_labels)
from parity.eval_decode import JPEG_DECODERS, check_decoder, decode_batch
from parity.eval_run import (_fast_batches, _progress, _settings, evaluate, fast_model, load_model, logits,
                             prediction_agreement, worker_context)
from parity.protocols import Protocol, resolve_protocol

DEFAULT_CACHE = Path("checkpoints/cache/bench_eval")
# the evaluate() runs of each model: the faithful path, the fast path (JPEGs decoded on the GPU by
# torchvision's nvJPEG, or by nvImageCodec), the fast path with JPEGs decoded in the workers by
# libjpeg-turbo (PIL's exact pixels), each GPU decoder with two batch-preparing threads (one
# resizes while the other waits on the decoder), and with --compile the fast path with a compiled model
EVALUATED = {"faithful": {"fast": False}, "fast": {"fast": True, "decode": "gpu"},
             "fast_nvimgcodec": {"fast": True, "decode": "nvimgcodec"},
             "fast_cpu_decode": {"fast": True, "decode": "cpu"},
             "fast_2_producers": {"fast": True, "decode": "gpu", "producers": 2},
             "fast_nvimgcodec_2_producers": {"fast": True, "decode": "nvimgcodec", "producers": 2}}
COMPILED = {"fast_compiled": {"fast": True, "decode": "gpu", "compile": True},
            "fast_nvimgcodec_compiled": {"fast": True, "decode": "nvimgcodec", "compile": True}}
GPU_DECODERS = tuple(JPEG_DECODERS)  # the decoders that run in the main process, on the device
DECODE_ONLY_IMAGES = 5_000  # files whose bytes the decoder-alone run holds in memory (about 0.6 GB at ImageNet sizes)
PRECISIONS = tuple(p for p in FAST_PRECISIONS if p != "auto")
PIPELINES = (*EVALUATED, *COMPILED, "baseline", *(f"input_only_{d}_decode" for d in DECODERS),
             *(f"decode_only_{d}" for d in GPU_DECODERS),
             *(f"model_only_{p}{c}" for p in PRECISIONS for c in ("", "_compiled")))
# (long side, probability) and (aspect w/h, probability), shaped after ImageNet val's typical files
LONG_SIDES = ([500, 400, 640, 800, 1024, 1600], [0.84, 0.04, 0.05, 0.03, 0.02, 0.02])
ASPECTS = ([4 / 3, 3 / 4, 3 / 2, 1.0, 16 / 9, 2 / 3], [0.55, 0.15, 0.12, 0.08, 0.05, 0.05])


# ---- data --------------------------------------------------------------------------------------


def _size(rng: np.random.Generator) -> tuple[int, int]:
    long = int(rng.choice(LONG_SIDES[0], p=LONG_SIDES[1]))
    aspect = float(rng.choice(ASPECTS[0], p=ASPECTS[1]))
    return (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)


def _write_image(job: tuple[int, str]) -> None:
    """A photo-like JPEG: smooth colour field + edges + grain, so file sizes resemble ImageNet's (~110 kB)."""
    from PIL import Image, ImageFilter

    seed, path = job
    rng = np.random.default_rng(seed)
    width, height = _size(rng)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize((width, height))
    image = Image.blend(base, detail.filter(ImageFilter.SMOOTH), 0.35)
    grain = rng.standard_normal((height, width, 3), dtype=np.float32) * 8
    image = Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
    image.save(path, quality=90)


def make_dataset(cache: Path, images: int, workers: int, seed: int = 0) -> Path:
    """Write (once) `images` JPEGs into 1000 wnid folders under `cache`; return the folder."""
    root = cache / f"val_n{images}_s{seed}"
    if (root / ".complete").is_file():
        return root
    wnids = imagenet1k_wnids()
    jobs = []
    for i in range(images):
        folder = root / wnids[i % len(wnids)]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((seed * 10_000_019 + i, str(folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG")))
    print(f"writing {images} JPEGs to {root} ...", file=sys.stderr)
    import multiprocessing

    with multiprocessing.get_context(worker_context(max(1, workers))).Pool(max(1, workers)) as pool:
        for _ in pool.imap_unordered(_write_image, jobs, chunksize=64):
            pass
    (root / ".complete").write_text(f"{images}\n")
    return root


# ---- models ------------------------------------------------------------------------------------


def _save(model: torch.nn.Module, processor: Any, path: Path, override: dict[str, Any]) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    config_file = path / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "parityport": override}))
    return path


STAND_INS = ("data2vec", "bit")


def build_models(cache: Path, size: str, which: Sequence[str] = STAND_INS) -> list[Path]:
    """Random-weight stand-ins: data2vec-vision base @224 and BiT-R50x1 @448 (or tiny ones)."""
    from transformers import (BeitImageProcessor, BitConfig, BitForImageClassification, BitImageProcessor,
                              Data2VecVisionConfig, Data2VecVisionForImageClassification)

    full = size == "full"
    d2v = Data2VecVisionConfig(num_labels=1000, use_mean_pooling=True, layer_norm_eps=1e-6, use_relative_position_bias=True,
                               **({} if full else dict(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=128)))
    bit = BitConfig(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False, num_labels=1000,
                    **({"depths": [3, 4, 6, 3]} if full else dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8)))
    torch.manual_seed(0)
    folder = cache / f"models_{size}"
    res_d2v, res_bit = (224, 448) if full else (64, 64)
    half = [0.5] * 3
    models = {
        "data2vec": lambda: _save(Data2VecVisionForImageClassification(d2v),
              BeitImageProcessor(size={"height": res_d2v, "width": res_d2v}, do_center_crop=False, resample=3,
                                 image_mean=half, image_std=half),
              folder / f"data2vec-vision-{'base' if full else 'tiny'}-{res_d2v}", {"image_size": res_d2v}),
        "bit": lambda: _save(BitForImageClassification(bit),
              BitImageProcessor(size={"shortest_edge": res_bit}, crop_size={"height": res_bit, "width": res_bit},
                                resample=2, image_mean=half, image_std=half),
              folder / f"bit-{'r50x1' if full else 'tiny'}-{res_bit}", {"image_size": res_bit}),
    }
    return [models[name]() for name in which]


# ---- the timm-validate-style baseline ----------------------------------------------------------


@torch.inference_mode()
def baseline(model_dir: Path, eval_set: EvalSet, spec: Protocol, device: torch.device, batch_size: int,
             workers: int, limit: int | None = None) -> dict[str, Any]:
    """DataLoader + PIL resize/crop to uint8 in workers, pinned, normalise on the GPU, bf16 autocast."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[spec.interpolation]
    side = spec.resize_side
    transform = T.Compose([T.Resize((side, side) if spec.resize == "squash" else side, interpolation=interp),
                           T.CenterCrop(spec.image_size), T.PILToTensor()])
    model = load_model(model_dir, device).to(memory_format=torch.channels_last)
    labels = resolve_labels(eval_set, model.config)
    count = len(eval_set.samples) if limit is None else min(limit, len(eval_set.samples))
    loader = DataLoader(PILDataset(eval_set.samples, range(count), transform, (3, spec.image_size, spec.image_size)),
                        batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        multiprocessing_context=worker_context(workers),
                        persistent_workers=False)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    predictions = torch.full((count,), -1, dtype=torch.long)
    start = time.perf_counter()
    with _progress(count, 0) as bar:
        for pixels, index, _ok, _notes in loader:
            x = (pixels.to(device, non_blocking=True).float() - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = labels.scores(model(pixel_values=x.contiguous(memory_format=torch.channels_last)).logits.float())
            predictions[index] = logits.argmax(1).cpu()
            bar.update(len(index))
    seconds = time.perf_counter() - start
    targets = labels.targets(eval_set.samples[:count])
    return {"pipeline": "baseline", "images": count, "seconds": seconds, "images_per_s": count / seconds,
            "top1": 100.0 * float((predictions == targets).float().mean()), "predictions": predictions.tolist()}


# ---- what limits the fast path: its input pipeline alone, and the model alone --------------------


def input_only(eval_set: EvalSet, spec: Protocol, device: torch.device, batch_size: int, workers: int,
               limit: int | None = None, decode: str = "gpu") -> dict[str, Any]:
    """The fast path's batches (read, decode, resize, normalise) with no model: its input ceiling."""
    count = len(eval_set.samples) if limit is None else min(limit, len(eval_set.samples))
    start = time.perf_counter()
    for _ in _fast_batches(eval_set, range(count), spec, device, batch_size, workers, decode):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def decode_only(eval_set: EvalSet, device: torch.device, batch_size: int, decode: str, limit: int) -> dict[str, Any]:
    """The GPU decoder alone: up to `limit` files' bytes, packed per batch in memory first, decoded
    batch by batch with no reading, resizing or model; the part of the input ceiling that decoding sets."""
    count = min(limit, len(eval_set.samples))
    dataset = BytesDataset(eval_set.samples, range(count), decode)
    batches = [collate_packed([dataset[i] for i in range(a, min(a + batch_size, count))]) for a in range(0, count, batch_size)]
    start = time.perf_counter()
    for batch in batches:
        decode_batch(batch, device, decode)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


@torch.inference_mode()
def model_only(model_dir: Path, spec: Protocol, device: torch.device, batch_size: int, precision: str,
               compile: bool = False, steps: int = 20) -> dict[str, Any]:
    """The model alone on one resident batch, in the fast path's settings (`fast_model`: channels_last,
    `precision`, optionally compiled); `warmup_s` holds the three untimed steps, compilation included."""
    _settings(True, device)
    model = fast_model(load_model(model_dir, device), precision, compile)
    x = torch.randn(batch_size, 3, spec.image_size, spec.image_size, device=device)

    def timed(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            logits(model, x, precision).argmax(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warmup = timed(3)
    seconds = timed(steps)
    return {"images": steps * batch_size, "seconds": seconds, "images_per_s": steps * batch_size / seconds,
            "warmup_s": warmup}


# ---- the run -----------------------------------------------------------------------------------


def _measure(model: Path, data: Path, args: argparse.Namespace,
             save: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """Run the wanted pipelines on `model`; the report so far goes to `save` after each one."""
    device = torch.device(args.device)
    eval_set = find_eval_set(data)
    spec, _ = resolve_protocol(model, "original")
    warm = min(len(eval_set.samples), 2 * args.batch_size)
    common = dict(protocol="original", device=args.device, batch_size=args.batch_size, workers=args.workers,
                  precision=args.precision)
    size, workers = args.batch_size, args.workers
    # each pipeline: the decoder it needs (None: any) and its run for a number of images (None: all)
    jobs: dict[str, tuple[str | None, Callable[[int | None], dict[str, Any]]]] = {
        **{name: (options.get("decode"), lambda n, o=options: evaluate(model, data, limit=n, **o, **common))
           for name, options in {**EVALUATED, **COMPILED}.items()},
        "baseline": (None, lambda n: baseline(model, eval_set, spec, device, size, workers, limit=n)),
        **{f"input_only_{d}_decode": (d, lambda n, d=d: input_only(eval_set, spec, device, size, workers, limit=n, decode=d))
           for d in DECODERS},
        **{f"decode_only_{d}": (d, lambda n, d=d: decode_only(eval_set, device, size, d, n or DECODE_ONLY_IMAGES))
           for d in GPU_DECODERS},
        **{f"model_only_{p}{'_compiled' * c}": (None, lambda n, p=p, c=c: model_only(model, spec, device, size, p, compile=c))
           for p in PRECISIONS for c in (False, True)},
    }
    runs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in _wanted(args):
        decode, job = jobs[name]
        if decode and (why := _unavailable(decode, device)):
            skipped[name] = why
            continue
        if not name.startswith("model_only_"):  # model_only warms up inside
            job(warm)
        runs[name] = job(None)
        _say(model, name, runs[name])
        save(_report(model, spec, runs, skipped))
    return _report(model, spec, runs, skipped)


def _report(model: Path, spec: Protocol, runs: dict[str, dict[str, Any]], skipped: dict[str, str]) -> dict[str, Any]:
    """One model's entry of eval.json: each run's figures, the skipped pipelines, ratio and agreements."""
    keep = ("images", "images_per_s", "seconds", "warmup_s", "first_batch_s", "top1", "failures", "decode", "precision")
    report = {"model": str(model), "protocol": spec.__dict__ | {"resize_side": spec.resize_side},
              **{name: {k: run[k] for k in keep if k in run} for name, run in runs.items()}, "skipped": dict(skipped)}
    if "fast" in runs and "baseline" in runs:
        report["fast_vs_baseline"] = runs["fast"]["images_per_s"] / runs["baseline"]["images_per_s"]
    if "faithful" in runs:
        report |= {f"agreement_{name}_vs_faithful": prediction_agreement(runs[name], runs["faithful"])
                   for name in runs if name.startswith("fast") or name == "baseline"}
    return report


def _wanted(args: argparse.Namespace) -> list[str]:
    """The pipelines to measure, in PIPELINES order: `--only`'s, or all but the compiled ones unless `--compile`."""
    if args.only:
        return [name for name in PIPELINES if name in args.only]
    return [name for name in PIPELINES if args.compile or not name.endswith("_compiled")]


def _unavailable(decode: str, device: torch.device) -> str | None:
    """Why the fast path cannot decode with `decode` on `device` (nvImageCodec not installed, say); None if it can."""
    try:
        check_decoder(decode, device)
    except InputError as error:
        return str(error)
    return None


def _say(model: Path, name: str, run: dict[str, Any]) -> None:
    print(f"  {model.name} {name}: {run['images_per_s']:.1f} img/s over {run['images']} images", file=sys.stderr, flush=True)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


LABELS = {
    "faithful": "faithful (PIL in workers, fp32, TF32 off)",
    "fast": "fast (torchvision nvJPEG batched, GPU resize)",
    "fast_nvimgcodec": "fast, nvImageCodec decode (libjpeg's chroma upsampling)",
    "fast_cpu_decode": "fast, JPEGs decoded in the workers (PIL's pixels)",
    "fast_2_producers": "fast, two threads preparing batches",
    "fast_nvimgcodec_2_producers": "fast, nvImageCodec decode, two threads preparing batches",
    "fast_compiled": "fast, model compiled (compile time included)",
    "fast_nvimgcodec_compiled": "fast, nvImageCodec decode, model compiled (compile time included)",
    "baseline": "baseline (timm-validate style: PIL in workers, bf16)",
    "input_only_gpu_decode": "fast path's input alone, torchvision nvJPEG",
    "input_only_nvimgcodec_decode": "fast path's input alone, nvImageCodec",
    "input_only_cpu_decode": "fast path's input alone, libjpeg-turbo in workers",
    "decode_only_gpu": "decoding alone (bytes in memory), torchvision nvJPEG",
    "decode_only_nvimgcodec": "decoding alone (bytes in memory), nvImageCodec",
    "model_only_bf16": "model alone, bf16 autocast",
    "model_only_bf16_compiled": "model alone, bf16 autocast, compiled",
    "model_only_bf16-pure": "model alone, weights and activations in bf16",
    "model_only_bf16-pure_compiled": "model alone, weights and activations in bf16, compiled",
    "model_only_fp16": "model alone, fp16 autocast",
    "model_only_fp16_compiled": "model alone, fp16 autocast, compiled",
    "model_only_fp16-pure": "model alone, weights and activations in fp16",
    "model_only_fp16-pure_compiled": "model alone, weights and activations in fp16, compiled",
    "model_only_tf32": "model alone, TF32",
    "model_only_tf32_compiled": "model alone, TF32, compiled",
}


def _limit(run: dict[str, Any]) -> str | None:
    """Which ceiling the fast path met: its input pipeline alone or the model alone, in the same run
    (None when one of the three was not measured)."""
    precision = run.get("fast", {}).get("precision", "bf16")
    parts = ("fast", "input_only_gpu_decode", f"model_only_{precision}")
    if not all(part in run for part in parts):
        return None
    ceilings = {"its input pipeline alone (nvJPEG)": run["input_only_gpu_decode"]["images_per_s"],
                f"the model alone ({precision})": run[f"model_only_{precision}"]["images_per_s"]}
    name, lowest = min(ceilings.items(), key=lambda kv: kv[1])
    fast = run["fast"]["images_per_s"]
    serial = 1 / sum(1 / v for v in ceilings.values())
    return (f"What limits the fast path: {name} runs at {lowest:.0f} img/s, the lower of its two ceilings; the fast "
            f"path reached {fast:.0f} ({100 * fast / lowest:.0f}% of it; {serial:.0f} if input and model did not overlap at all).")


def _after_first_batch(run: dict[str, Any], batch_size: int) -> str | None:
    """The compiled runs' rates without their first batch, where compiling happens (None when not recorded)."""
    rates = {name: (run[name]["images"] - batch_size) / (run[name]["seconds"] - run[name]["first_batch_s"])
             for name in COMPILED if run.get(name, {}).get("first_batch_s") is not None
             and run[name]["images"] > batch_size}
    if not rates:
        return None
    return ("Compiled runs after their first batch (compiling happens there): "
            + "; ".join(f"{LABELS[name].split(' (')[0]} {rate:.0f} img/s" for name, rate in rates.items()) + ".")


def markdown(report: dict[str, Any]) -> str:
    """The report as a page: one table per model, rates and ratios to the baseline of the same run."""
    lines = ["# ImageNet-eval throughput", "",
             f"Device: {report.get('machine', report['device'])}. {report['images']} ImageNet-like JPEGs, batch "
             f"{report['batch_size']}, {report['workers']} workers. {report['note']}. "
             "`make bench-eval` regenerates this page and eval.json beside it.", ""]
    if "invocations" in report:
        lines += [f"Runs: {report['invocations']}.", ""]
    for run in report["runs"]:
        base = run.get("baseline", {}).get("images_per_s")
        lines += [f"## {Path(run['model']).name}", "", f"Protocol: {run['protocol']['name']} at {run['protocol']['image_size']} px. "
                  f"Fast path precision: {run.get('fast', {}).get('precision', 'n/a')}.", "",
                  "| pipeline | images/s | ÷ baseline | agreement with faithful |", "|---|---|---|---|"]
        for name in PIPELINES:
            if name in run:
                rate, agreement = run[name]["images_per_s"], run.get(f"agreement_{name}_vs_faithful", {}).get("agreement")
                lines.append(f"| {LABELS[name]} | {rate:.0f} | {'' if base is None else f'{rate / base:.2f}×'} | "
                             f"{'' if agreement is None else f'{agreement:.2f}%'} |")
        if limit := _limit(run):
            lines += ["", limit]
        if steady := _after_first_batch(run, report["batch_size"]):
            lines += ["", steady]
        if run.get("skipped"):
            lines += ["", "Not measured here:", *(f"- {LABELS[name]}: {why}" for name, why in run["skipped"].items())]
        lines += ["", "Agreement on these randomly initialised stand-ins is not a quality figure: their top-1 "
                  "margins are near zero, so tiny input differences flip predictions. The trained fixtures' "
                  "agreement is checked by tests/test_fixtures.py.", ""]
        if "_note" in run:
            lines += [f"Note: {run['_note']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 2 with a clear message when CUDA is needed but absent."""
    parser = argparse.ArgumentParser(prog="python -m parity.bench_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="model folder(s); default: random data2vec-B@224 and BiT-R50x1@448")
    parser.add_argument("--images", type=at_least(1), default=50_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--workers", type=at_least(0), default=min(16, os.cpu_count() or 1))
    parser.add_argument("--compile", action="store_true",
                        help="also measure the fast path and the model alone with the model compiled (torch.compile)")
    parser.add_argument("--only", nargs="+", choices=PIPELINES, metavar="PIPELINE",
                        help=f"measure only these pipelines (of: {', '.join(PIPELINES)}); ratios and agreement "
                             "appear where their parts were measured")
    parser.add_argument("--precision", choices=FAST_PRECISIONS, default="auto",
                        help="the fast path's arithmetic in the evaluate() runs (default auto: the model type's, as "
                             "`parityport eval`); the baseline stays bf16 autocast, the model-alone runs cover each")
    parser.add_argument("--model-size", choices=("full", "tiny"), help="stand-in models (default: full on CUDA, tiny on CPU)")
    parser.add_argument("--stand-ins", nargs="+", choices=STAND_INS, default=list(STAND_INS),
                        help="which random-weight stand-ins to measure when no --model is given")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/eval.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-eval measures the GPU pipelines and needs CUDA, which is not available here. "
              "For a CPU smoke run of the same code: python -m parity.bench_eval --device cpu --images 64", file=sys.stderr)
        return 2
    data = make_dataset(args.cache, args.images, args.workers)
    models = args.model or build_models(args.cache, args.model_size or ("full" if args.device.startswith("cuda") else "tiny"),
                                        args.stand_ins)
    report = {
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "compile": args.compile,
        "decoders": ("fast: torchvision's nvJPEG, batched; fast_nvimgcodec: nvImageCodec, batched; fast_cpu_decode: "
                     "libjpeg-turbo in the workers" if args.device.startswith("cuda")
                     else "CPU (smoke run: not a GPU measurement)"),
        "dataset": str(data),
        "note": "images_per_s is end to end (read, decode, preprocess, model, top-k) after a warm-up run; model loading excluded",
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    def save(runs: list[dict[str, Any]]) -> None:  # after each pipeline, so a cut-short run keeps what it measured
        args.out.write_text(json.dumps(report | {"runs": runs}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report | {"runs": runs}))

    for model in models:
        run = _measure(model, data, args, lambda partial: save([*report["runs"], partial]))
        report["runs"].append(run)
        save(report["runs"])
        rates = ", ".join(f"{p} {run[p]['images_per_s']:.1f} img/s" for p in PIPELINES if p in run)
        agreement = ", ".join(f"{name[len('agreement_'):-len('_vs_faithful')]} {a['agreement']:.2f}%"
                              for name, a in run.items() if name.startswith("agreement_"))
        ratio = f"; fast/baseline {run['fast_vs_baseline']:.2f}x" if "fast_vs_baseline" in run else ""
        print(f"{Path(run['model']).name}: {rates}{ratio}; agreement with faithful: {agreement or 'not measured'}"
              + "".join(f"; skipped {k}: {v}" for k, v in run["skipped"].items()), flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

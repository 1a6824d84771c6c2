"""Trained fixtures stand in for the published checkpoints: source framework → original file → eval.

Each fixture is trained by its own command line (a fresh process, so the
deterministic XLA / torch settings hold) on the seeded JPEG set. Its source
framework's own held-out top-1 must equal the catalog's "published" figure,
and `parityport convert` + `parityport eval --protocol original` must give
exactly that top-1, image by image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints.catalog import lookup
from checkpoints.fixtures.prepare_eval import main as prepare_eval
from checkpoints.fixtures.dataset import (CLASSES, JPEG_QUALITY, SPLITS, TRAIN_PER_CLASS, VAL_PER_CLASS, draw,
                                          generate)
from parityport.cli import main

ROOT = Path(__file__).resolve().parents[1]
# family: (trainer module, catalog name)
FIXTURES = {
    "bit": ("checkpoints.fixtures.train_bit", "fixture-BiT-R14x0.5-shapes10"),
    "data2vec1": ("checkpoints.fixtures.train_data2vec", "fixture-data2vec-vision-tiny-shapes10"),
}
# module scope groups the tests by family: data2vec's run while BiT is still training
BY_FAMILY = pytest.mark.parametrize("family", ["data2vec1", "bit"], scope="module")
MIN_GPU_AGREEMENT = 99.5  # percent of images with the same top-1 on the fast and the faithful path
# Known shortfalls, measured on an H200: torchvision's nvJPEG repeats 4:2:0 chroma where libjpeg
# interpolates it, so its pixels are not PIL's (on the fixtures' 64-96 px JPEGs they differ by
# 4-5 uint8 levels on average after a resize to 224 or 448), and the 32 px BiT fixture is the
# more sensitive model: 96.8-97.2% over three runs. nvImageCodec with libjpeg's upsampling
# (decode="auto" picks it where installed) gave 99.6-99.8%, decode="cpu" 99.8-100%.
BELOW_BAR_ON_GPU_DECODE = {("bit", "gpu"): "GPU-decoded BiT fixture agreed on 96.8-97.2% (14-16 of 500 differ)"}
# bf16 arithmetic on PIL's pixels: the BiT fixture kept 99.4% of its predictions on an H200 in
# bf16-pure (twice) and 99.4% then 99.6% in bf16 autocast (99.8-100% in TF32, its fast-path
# default). Not strict: cuDNN's autotuned algorithms land a prediction either side of the bar.
BELOW_BAR_IN_BF16 = {("bit", p): f"BiT fixture in {p} agreed on 99.4-99.6% (2-3 of 500 differ)" for p in ("bf16", "bf16-pure")}


def _needs_converter(family: str) -> None:
    if family == "data2vec1":
        pytest.importorskip("converters.data2vec", reason="the data2vec converter is not there yet")
    from converters.registry import CONVERTERS

    if family not in CONVERTERS:
        pytest.skip(f"no converter registered for {family}")


# ---- fixtures: both trainers run at once, each result is awaited where it is needed ---------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    generate(root / "data")  # once, before the trainers share it
    return root


@pytest.fixture(scope="module")
def trainers(workdir: Path) -> dict[str, subprocess.Popen]:
    """`python -m <trainer> --out DIR --data DIR/data` for every fixture, started together."""
    return {family: subprocess.Popen([sys.executable, "-m", module, "--out", str(workdir), "--data",
                                      str(workdir / "data")], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            for family, (module, _) in FIXTURES.items()}


@pytest.fixture(scope="module")
def records(workdir: Path, trainers: dict[str, subprocess.Popen]):
    """The trainer's JSON record of a family (waiting for its process on first use)."""
    done: dict[str, dict] = {}

    def record(family: str) -> dict:
        if family not in done:
            output, _ = trainers[family].communicate(timeout=600)
            assert trainers[family].returncode == 0, f"{FIXTURES[family][0]} failed:\n{output}"
            done[family] = json.loads((workdir / f"{FIXTURES[family][1]}.json").read_text())
        return done[family]

    return record


@pytest.fixture(scope="module")
def converted(workdir: Path, records):
    """The converted, eval-ready folder of a family (`parityport convert` with its parity check)."""
    done: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in done:
            record, out = records(family), workdir / f"converted-{family}"
            assert main(["convert", record["checkpoint"], "--out", str(out)]) == 0
            assert prepare_eval([str(workdir / f"{FIXTURES[family][1]}.json"), str(out)]) == 0  # the README's step
            done[family] = out
        return done[family]

    return folder


def _eval(folder: Path, record: dict, expect: float, json_path: Path | None = None) -> int:
    args = ["eval", "--model", str(folder), "--data", record["val"], "--protocol", "original",
            "--expect", str(expect), "--tolerance", "0.1", "--device", "cpu", "--workers", "0"]
    return main(args + (["--json", str(json_path)] if json_path else []))


# ---- tests --------------------------------------------------------------------------------------------


def test_data_set_is_deterministic(workdir: Path) -> None:
    import io

    data = workdir / "data"
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        assert [len(list((data / split / c).iterdir())) for c in CLASSES] == [count] * len(CLASSES)
    for s, c, k in ((0, 0, 0), (1, 4, 7), (1, 9, VAL_PER_CLASS - 1)):
        buffer = io.BytesIO()
        draw(CLASSES[c], np.random.default_rng([0, s, c, k])).save(buffer, "JPEG", quality=JPEG_QUALITY)
        assert (data / SPLITS[s] / CLASSES[c] / f"{CLASSES[c]}_{k:03d}.jpg").read_bytes() == buffer.getvalue()


@BY_FAMILY
def test_source_top1_is_the_published_figure(family: str, records) -> None:
    record, entry = records(family), lookup(FIXTURES[family][1])
    assert entry.kind == "fixture" and entry.family == family and entry.published[0].protocol == "original"
    assert entry.published[0].image_size == record["image_size"]
    assert abs(record["top1"] - entry.top1) <= 0.1, (
        f"{entry.name}: source top-1 {record['top1']:.3f} != published {entry.top1} (training not deterministic?)")
    assert record["top1"] > 60.0 and record["images"] == len(CLASSES) * VAL_PER_CLASS


@BY_FAMILY
def test_eval_reproduces_the_source_evaluation_exactly(family: str, records, converted, tmp_path: Path) -> None:
    _needs_converter(family)
    record, entry = records(family), lookup(FIXTURES[family][1])
    result_path = tmp_path / "eval.json"
    assert _eval(converted(family), record, entry.top1, result_path) == 0
    result = json.loads(result_path.read_text())
    assert result["label_mapping"] == "id2label" and result["protocol_spec"]["image_size"] == record["image_size"]
    assert result["pipeline"] == "faithful" and result["failures"] == 0
    assert result["top1"] == record["top1"], f"eval {result['top1']} != source {record['top1']}"
    assert result["predictions"] == record["predictions"]
    # each file is named after its catalog entry, so eval shows the published figure beside the run
    published = {"top1": entry.top1, "catalog_entry": entry.name, "gap": 0.0}
    assert {k: v for k, v in result["published"].items() if k in published} == published


@BY_FAMILY
def test_eval_fails_a_wrong_expectation(family: str, records, converted) -> None:
    _needs_converter(family)
    record = records(family)
    assert _eval(converted(family), record, record["top1"] - 1.0) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@BY_FAMILY
@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec", "cpu"])
def test_fast_gpu_path_agrees_with_faithful(family: str, decode: str, records, converted, request) -> None:
    if (family, decode) in BELOW_BAR_ON_GPU_DECODE:
        request.applymarker(pytest.mark.xfail(reason=BELOW_BAR_ON_GPU_DECODE[family, decode], strict=True,
                                              raises=AssertionError))  # a crash is no expected failure
    agreement = _gpu_agreement(family, records, converted, decode=decode)
    assert agreement["agreement"] >= MIN_GPU_AGREEMENT, agreement


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@BY_FAMILY
@pytest.mark.parametrize("precision", ["bf16", "bf16-pure", "fp16", "fp16-pure", "tf32"])
def test_fast_gpu_arithmetic_agrees_with_faithful(family: str, precision: str, records, converted, request) -> None:
    """PIL's pixels (decode="cpu") on both paths, so the agreement measures the fast path's arithmetic alone."""
    if (family, precision) in BELOW_BAR_IN_BF16:
        request.applymarker(pytest.mark.xfail(reason=BELOW_BAR_IN_BF16[family, precision], strict=False,
                                              raises=AssertionError))  # at the bar: may pass; may not crash
    agreement = _gpu_agreement(family, records, converted, decode="cpu", precision=precision)
    assert agreement["agreement"] >= MIN_GPU_AGREEMENT, agreement


def _gpu_agreement(family: str, records, converted, **fast_options) -> dict:
    from parity.eval_run import evaluate, prediction_agreement

    _needs_converter(family)
    if fast_options.get("decode") == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    folder, val = converted(family), records(family)["val"]
    fast = evaluate(folder, val, protocol="original", device="cuda", fast=True, workers=2, **fast_options)
    faithful = evaluate(folder, val, protocol="original", device="cuda", fast=False, workers=2)
    agreement = prediction_agreement(fast, faithful)
    print(f"{family} decode={fast['decode']} precision={fast['precision']}: {agreement}")
    return agreement


def test_files_are_in_the_original_layout(records) -> None:
    from converters.families.bit import BitSpec, npz_shapes
    from checkpoints.synthetic_data2vec import d2v1_state_dict
    from checkpoints.fixtures import train_data2vec

    with np.load(records("bit")["checkpoint"]) as npz:
        shapes = {k: npz[k].shape for k in npz.files}
    assert shapes == npz_shapes(BitSpec((1, 1, 1, 1), 32, len(CLASSES)))
    container = torch.load(records("data2vec1")["checkpoint"], map_location="cpu", weights_only=True)
    template = d2v1_state_dict(train_data2vec.CONFIG, 0, shared_rel_pos=False, finetuned=True)
    assert list(container["module"]) == list(template)
    assert container["module"]["head.weight"].dtype == torch.float16

"""ImageNet evaluation harness: layouts, label mapping, protocols, failures, exit codes, JSON."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converters.errors import InputError
from parity import eval_data, protocols
from parity.eval_run import evaluate, main, prediction_agreement, worker_context

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet-1k classes 0, 1, 2
COUNTS = [4, 3, 3]  # images per class: 10 in all
SMALL = {"image_size": 32, "crop_pct": 0.875}  # evaluate the tiny models at 32 (resize side 36)


# ---- fixtures: tiny models and image sets ------------------------------------------------------


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize(size, Image.BILINEAR))
    noise = rng.integers(-20, 20, smooth.shape)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def _biased(model: torch.nn.Module, order: list[int]) -> torch.nn.Module:
    """Zero the head's weights and rank `order` first by bias: the prediction no longer depends on the image."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for rank, cls in enumerate(order):
            head.bias[cls] = 100.0 - rank
    return model


def make_bit(path: Path, num_labels: int = 1000, order: list[int] | None = None, id2label: dict | None = None,
             seed: int = 0) -> Path:
    """A tiny BiT classifier folder (with a 'parityport' size override) saved through save_pretrained."""
    from transformers import BitConfig, BitForImageClassification, BitImageProcessor

    torch.manual_seed(seed)
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    config = BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="preactivation",
                       global_padding=None, embedding_dynamic_padding=False, num_groups=2, num_labels=num_labels, **extra)
    model = BitForImageClassification(config)
    if order is not None:
        _biased(model, order)
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=2,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    _add_override(path)
    return path


def _add_override(path: Path) -> None:
    config_file = path / "preprocessor_config.json"
    data = json.loads(config_file.read_text())
    data["parityport"] = SMALL
    config_file.write_text(json.dumps(data))


def make_data2vec(path: Path, order: list[int] | None = None, seed: int = 0) -> Path:
    from transformers import BeitImageProcessor, Data2VecVisionConfig, Data2VecVisionForImageClassification

    torch.manual_seed(seed)
    config = Data2VecVisionConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, use_mean_pooling=True, num_labels=1000)
    model = Data2VecVisionForImageClassification(config)
    (model if order is None else _biased(model, order)).save_pretrained(path)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False, resample=3,
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    _add_override(path)
    return path


def make_class_folders(root: Path, names: list[str] = WNIDS, counts: list[int] = COUNTS) -> Path:
    seed = 0
    for name, count in zip(names, counts):
        (root / name).mkdir(parents=True)
        for i in range(count):
            _image(seed := seed + 1).save(root / name / f"img_{i}.JPEG", quality=90)
    return root


def make_flat(root: Path, labels: list[int]) -> list[Path]:
    root.mkdir(parents=True)
    paths = [root / f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(labels) + 1)]
    for seed, path in enumerate(paths):
        _image(seed).save(path, quality=90)
    return paths


@pytest.fixture(scope="module")
def bit_class1(tmp_path_factory) -> Path:
    """Predicts ImageNet class 1, then 2, 0, 3, 4."""
    return make_bit(tmp_path_factory.mktemp("bit") / "model", order=[1, 2, 0, 3, 4])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("val") / "val")


def _eval(model: Path, data: Path, **kw):
    kw = {"protocol": "original", "device": "cpu", "batch_size": 4, "workers": 0, **kw}
    return evaluate(model, data, **kw)


# ---- layouts and label mapping -----------------------------------------------------------------


def test_class_folders_known_top1(bit_class1, folders):
    result = _eval(bit_class1, folders)
    assert result["layout"] == "class-folders" and result["label_mapping"] == "imagenet-1k"
    assert result["images"] == 10 and result["failures"] == 0
    assert result["top1"] == pytest.approx(30.0)  # 3 of 10 images are class 1
    assert result["top5"] == pytest.approx(100.0)  # classes 0, 1, 2 are all in the top 5
    assert result["predictions"] == [1] * 10
    assert result["protocol_spec"]["resize_side"] == 36 and result["pipeline"] == "faithful"


def test_data2vec_and_workers(tmp_path, folders):
    model = make_data2vec(tmp_path / "d2v", order=[0, 5, 6, 7, 8])
    result = _eval(model, folders, workers=2, batch_size=3)
    assert result["top1"] == pytest.approx(40.0) and result["top5"] == pytest.approx(40.0)
    assert result["protocol_spec"]["name"] == "data2vec-original"


def test_flat_devkit_with_id_list_and_meta_mat(tmp_path, bit_class1):
    # ILSVRC2012_IDs are NOT sorted-wnid positions: use a reversed order to prove the mapping is used
    by_id = list(reversed(eval_data.imagenet1k_wnids()))
    ids_of = {w: i + 1 for i, w in enumerate(by_id)}
    labels = [1, 1, 0, 2, 1, 0]  # sorted-wnid classes of images 1..6
    val = tmp_path / "val"
    make_flat(val, labels)
    lines = [ids_of[eval_data.imagenet1k_wnids()[c]] for c in labels] + [ids_of[WNIDS[0]]] * 4  # 4 without image
    (val / eval_data.GROUND_TRUTH).write_text("\n".join(map(str, lines)) + "\n")
    (val / eval_data.WNIDS_BY_ID).write_text("\n".join(by_id) + "\n")
    result = _eval(bit_class1, val)
    assert result["layout"] == "ilsvrc-devkit" and result["layout_notes"]["labels_without_image"] == 4
    assert result["top1"] == pytest.approx(50.0)

    scipy_io = pytest.importorskip("scipy.io")
    (val / eval_data.WNIDS_BY_ID).unlink()
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    synsets = np.array([(i + 1, w, 0) for i, w in enumerate(by_id)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    assert [s.label for s in eval_data.find_eval_set(val).samples] == [eval_data.imagenet1k_wnids()[c] for c in labels]


@pytest.mark.parametrize("ground_truth, problem", [
    ("0\n1\n", "line 1: '0' is not an ILSVRC2012_ID from 1 to 1000"),  # would read the last wnid
    ("1\n-5\n", "line 2: '-5' is not an ILSVRC2012_ID from 1 to 1000"),
    ("1001\n1\n", "line 1: '1001' is not an ILSVRC2012_ID from 1 to 1000"),
    ("1\nabc\n", "line 2: 'abc' is not an ILSVRC2012_ID from 1 to 1000"),
])
def test_a_ground_truth_id_outside_1_to_1000_is_refused_naming_its_line(tmp_path, ground_truth, problem):
    val = tmp_path / "val"
    make_flat(val, [0, 0])
    (val / eval_data.GROUND_TRUTH).write_text(ground_truth)
    (val / eval_data.WNIDS_BY_ID).write_text("\n".join(eval_data.imagenet1k_wnids()) + "\n")
    with pytest.raises(InputError) as error:
        eval_data.find_eval_set(val)
    assert (error.value.path, error.value.problem) == (str(val / eval_data.GROUND_TRUTH), problem)


def test_a_devkit_id_list_or_meta_mat_that_is_not_one_is_named(tmp_path):
    val = tmp_path / "val"
    make_flat(val, [0, 0])
    (val / eval_data.GROUND_TRUTH).write_text("1\n2\n")
    (val / eval_data.WNIDS_BY_ID).write_text("\n".join(eval_data.imagenet1k_wnids()[:999]) + "\n")
    with pytest.raises(InputError) as error:
        eval_data.find_eval_set(val)
    assert (error.value.path, error.value.problem) == (
        str(val / eval_data.WNIDS_BY_ID), "holds 999 wnids; it needs 1000, line k the wnid of ILSVRC2012_ID k")
    pytest.importorskip("scipy.io")
    (val / eval_data.WNIDS_BY_ID).unlink()
    (val / "meta.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(InputError) as error:
        eval_data.find_eval_set(val)
    assert error.value.path == str(val / "meta.mat")
    assert error.value.problem.startswith("not the devkit's meta.mat (a synsets table of ILSVRC2012_ID and WNID): ")


def test_loc_csv_kaggle_tree(tmp_path, bit_class1):
    images = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    paths = make_flat(images, [0] * 5)
    rows = [f"{p.stem},{WNIDS[c]} 1 2 3 4 {WNIDS[c]} 5 6 7 8" for p, c in zip(paths, [1, 0, 1, 2, 1])]
    (tmp_path / "kaggle" / eval_data.LOC_CSV).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    for data in (tmp_path / "kaggle", images):
        result = _eval(bit_class1, data)
        assert result["layout"] == "loc-csv" and result["top1"] == pytest.approx(60.0)


def test_loc_csv_that_names_none_of_the_images_is_an_error_not_zero_percent(tmp_path):
    test = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "test"
    make_flat(test, [0] * 3)
    (tmp_path / "kaggle" / eval_data.LOC_CSV).write_text("ImageId,PredictionString\nILSVRC2012_val_00009999,n01440764 1\n")
    with pytest.raises(InputError, match=r"none of its 3 images is named in .*LOC_val_solution.csv") as error:
        eval_data.find_eval_set(test)
    assert error.value.path == str(test)


@pytest.mark.parametrize("text, problem", [
    ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "line 2: no wnid in the PredictionString of "
                                                              "'ILSVRC2012_val_00000001'"),
    ("ImageId,PredictionString\nILSVRC2012_val_00000001\n", "line 2: no wnid in the PredictionString of "
                                                             "'ILSVRC2012_val_00000001'"),
    ("id,label\nILSVRC2012_val_00000001,n01440764\n", "its header is ['id', 'label']; expected the columns ImageId "
                                                      "and PredictionString"),
    ("", "its header is None; expected the columns ImageId and PredictionString"),
])
def test_a_loc_csv_without_its_columns_or_a_wnid_is_named(tmp_path, text, problem):
    val = tmp_path / "val"
    make_flat(val, [0])
    (val / eval_data.LOC_CSV).write_text(text)
    with pytest.raises(InputError) as error:
        eval_data.find_eval_set(val)
    assert (error.value.path, error.value.problem) == (str(val / eval_data.LOC_CSV), problem)


def test_loc_csv_above_a_val_folder_sorted_into_class_folders_is_not_its_layout(tmp_path, folders):
    root = tmp_path / "imagenet"
    shutil.copytree(folders, root / "val")
    (root / eval_data.LOC_CSV).write_text("not, Kaggle's\n")  # not even read: it is not this folder's
    found = eval_data.find_eval_set(root / "val")
    assert found.layout == "class-folders" and len(found.samples) == 10


def test_generic_folders_by_id2label_and_sorted(tmp_path):
    data = make_class_folders(tmp_path / "data", ["apple", "mango", "zebra"], [1, 2, 3])
    named = make_bit(tmp_path / "named", 3, order=[0], id2label={0: "zebra", 1: "apple", 2: "mango"})
    result = _eval(named, data)
    assert result["label_mapping"] == "id2label" and result["top1"] == pytest.approx(50.0)
    plain = make_bit(tmp_path / "plain", 4, order=[0])
    result = _eval(plain, data)
    assert result["label_mapping"] == "sorted-folders" and result["top1"] == pytest.approx(100 / 6)


def test_folders_named_by_class_index_map_to_that_index_on_a_named_head(tmp_path):
    from checkpoints.labels import imagenet_id2label

    names = [str(i) for i in range(12)]  # ImageNetV2's layout; sorted as text, "10" would come third
    data = make_class_folders(tmp_path / "v2", names, [3 if name == "10" else 1 for name in names])
    model = make_bit(tmp_path / "m", 1000, order=[10], id2label=imagenet_id2label(1000))
    result = _eval(model, data)
    assert result["label_mapping"] == "folder-index" and result["correct"] == 3 and result["images"] == 14


def test_folders_that_match_a_named_heads_labels_only_in_part_are_refused(tmp_path):
    data = make_class_folders(tmp_path / "data", ["apple", "mango", "zebras"], [1, 1, 1])
    named = make_bit(tmp_path / "named", 3, order=[0], id2label={0: "zebra", 1: "apple", 2: "mango"})
    with pytest.raises(InputError) as error:
        _eval(named, data)  # sorted, "apple" would be output 0, which the model calls "zebra"
    assert error.value.problem == ("the model names its 3 classes (config.json id2label) and 1 of the 3 class folders "
                                   "match none of those names (e.g. 'zebras'); name the folders by its labels, by "
                                   "ImageNet wnids, or by class index")


def test_in21k_head_scored_on_1k(tmp_path, folders):
    to_21k = eval_data.in21k_to_in1k_indices()
    assert len(to_21k) == 1000 and len(set(to_21k)) == 1000
    not_in1k = next(i for i in range(21843) if i not in set(to_21k))
    # the largest logit is a class outside ImageNet-1k: scoring must ignore it
    model = make_bit(tmp_path / "m21k", 21843, order=[not_in1k, to_21k[2], to_21k[0]])
    result = _eval(model, folders)
    assert result["label_mapping"] == "imagenet-21k→1k"
    assert result["top1"] == pytest.approx(30.0) and result["predictions"] == [2] * 10


def test_in1k_class_missing_from_the_21k_list_is_never_predicted(tmp_path):
    to_21k = eval_data.in21k_to_in1k_indices()
    teddy = eval_data.imagenet1k_wnids().index("n04399382")
    assert to_21k[teddy] == -1 and sorted(to_21k)[1] >= 0  # the only class the 21k list lacks
    data = tmp_path / "val"
    for seed, wnid in enumerate(["n04399382", "n01440764"]):
        (data / wnid).mkdir(parents=True)
        _image(seed).save(data / wnid / f"{seed}.JPEG")
    # the head's last output (what index -1 would read) ranks first, then class 0's
    model = make_bit(tmp_path / "m21k", 21843, order=[21842, to_21k[0]])
    result = _eval(model, data)
    assert result["label_mapping"] == "imagenet-21k→1k"
    assert result["predictions"] == [0, 0] and result["top1"] == pytest.approx(50.0)


def test_limit_keeps_every_class(folders):
    labels = [s.label for s in eval_data.find_eval_set(folders, limit=3).samples]
    assert sorted(set(labels)) == WNIDS


def test_a_limited_run_says_it_is_a_subset_beside_any_published_figure(bit_class1, folders):
    from parity.eval_run import _summary

    result = _eval(bit_class1, folders, limit=4)
    assert result["images"] == 4 and result["layout_notes"]["subset_of"] == 10
    result["published"] = {"top1": 80.0, "protocol": "original", "dataset": "imagenet-1k-val", "source": "paper",
                           "gap": result["top1"] - 80.0, "synthetic_weights": False}
    lines = _summary(result).splitlines()
    assert "images 4 (--limit: a strided subset of 10)" in lines[1]
    assert lines[2].endswith(f"this run {result['top1'] - 80.0:+.3f} on 4 of the set's 10 images, not a reproduction")
    assert "subset" not in _summary(_eval(bit_class1, folders))


def test_a_set_missing_images_its_ground_truth_names_says_so_beside_any_published_figure(tmp_path, bit_class1):
    from parity.eval_run import _summary

    val = tmp_path / "val"
    make_flat(val, [1] * 6)
    (val / eval_data.GROUND_TRUTH).write_text("2\n" * 10)  # 10 images labelled, 6 in the folder
    (val / eval_data.WNIDS_BY_ID).write_text("\n".join(eval_data.imagenet1k_wnids()) + "\n")
    result = _eval(bit_class1, val)
    result["published"] = {"top1": 80.0, "protocol": "original", "dataset": "imagenet-1k-val", "source": "paper",
                           "gap": result["top1"] - 80.0, "synthetic_weights": False}
    lines = _summary(result).splitlines()
    assert "images 6 (4 more images named by the ground truth are not in the folder)" in lines[1]
    assert lines[2].endswith("this run +20.000 on 6 of the set's 10 images, not a reproduction")
    limited = _eval(bit_class1, val, limit=3)
    limited["published"] = result["published"]
    assert _summary(limited).splitlines()[2].endswith("on 3 of the set's 10 images, not a reproduction")


# ---- protocols ---------------------------------------------------------------------------------


def test_bit_squash_to_minus_one_one():
    # rows constant: a width-only squash keeps each row's value; [0, 255] maps to [-1, 1]
    rows = np.array([0, 51, 204, 255], dtype=np.uint8)
    image = Image.fromarray(np.repeat(rows[:, None, None], 8 * 3, axis=1).reshape(4, 8, 3))
    spec = protocols.apply_overrides(protocols.ORIGINAL["bit"], {"image_size": 4})
    assert (spec.resize, spec.resize_side, spec.interpolation) == ("squash", 4, "bilinear")
    out = protocols.torchvision_transform(spec)(image)
    expected = torch.tensor([-1.0, -0.6, 0.6, 1.0]).view(1, 4, 1).expand(3, 4, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_data2vec_shorter_side_then_center_crop():
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2
    spec = protocols.apply_overrides(protocols.ORIGINAL["data2vec-vision"], {"image_size": 4, "crop_pct": 1.0})
    out = protocols.torchvision_transform(spec)(Image.fromarray(pixels))
    # shorter side already 4: no resize; the crop keeps columns 1..4; mean/std 0.5
    expected = torch.from_numpy(pixels[:, 1:5].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert protocols.ORIGINAL["data2vec-vision"].resize_side == 256  # int(224 / 0.875)
    assert protocols.ORIGINAL["data2vec2-vision"].mean == protocols.IMAGENET_MEAN


@pytest.mark.parametrize("family", ["bit", "data2vec-vision"])
def test_tensor_path_matches_faithful(family):
    spec = protocols.apply_overrides(protocols.ORIGINAL[family], {"image_size": 24})
    image = _image(7, (61, 45))
    faithful = protocols.torchvision_transform(spec)(image)
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    fast = protocols.batch_transform([tensor], spec)[0]
    step = 1 / 127.5  # one uint8 level after normalisation with std 0.5
    assert (fast - faithful).abs().max() <= 1.01 * step
    assert ((fast - faithful).abs() > step / 2).float().mean() <= 0.01  # PIL-exact but for rare rounding ties


@pytest.mark.parametrize("family, size, side, differing", [
    ("bit", (64, 48), 32, 0.0),  # a 2x bilinear reduction: every other sum is a tie PIL rounds up
    ("data2vec-vision", (40, 100), 24, 0.0),  # height shrinks more than twice the width: Pillow 13 goes vertical first
    ("bit", (30, 50), 40, 0.05),  # a portrait photo squashed to a square (25.98% of its levels differed)
])
def test_tensor_path_rounds_and_orders_its_passes_as_pil(family, size, side, differing):
    spec = protocols.apply_overrides(protocols.ORIGINAL[family], {"image_size": side})
    image = _image(3, size)
    faithful = protocols.torchvision_transform(spec)(image)
    fast = protocols.batch_transform([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)], spec)[0]
    levels = (fast - faithful).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255  # in uint8 levels
    assert float(levels.max()) <= 1.0 + 1e-4
    assert float((levels > 0.5).float().mean()) <= differing


def test_tensor_path_crops_where_the_hub_processor_does(tmp_path):
    spec, hub = protocols.resolve_protocol(make_bit(tmp_path / "m"), "hub")  # shorter side 36, crop 32
    image = _image(7, (69, 45))  # resized to 55 x 36: a margin of 23 columns
    assert spec.crop_offset == "floor" and [protocols.center_crop_box(36, 55, 32, o)[1] for o in ("floor", "round")] == [11, 12]
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    step = 1 / 127.5
    assert (protocols.batch_transform([tensor], spec)[0] - hub(image)).abs().max() <= 1.01 * step
    rounded = protocols.batch_transform([tensor], dataclasses.replace(spec, crop_offset="round"))[0]
    assert (rounded - hub(image)).abs().max() > 8 * step  # torchvision's offset: one column to the right


@pytest.mark.parametrize("family", ["bit", "data2vec-vision"])
def test_batch_transform_groups_sizes_without_changing_any_image(family):
    spec = protocols.apply_overrides(protocols.ORIGINAL[family], {"image_size": 24})
    sizes = [(61, 45), (40, 48), (61, 45), (33, 70), (61, 45)]
    tensors = [torch.from_numpy(np.asarray(_image(i, size)).copy()).permute(2, 0, 1) for i, size in enumerate(sizes)]
    alone = torch.stack([protocols.batch_transform([t], spec)[0] for t in tensors])
    assert torch.equal(protocols.batch_transform(tensors, spec), alone)


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_packed_batches_cross_worker_processes_intact(odd_images, decode):
    eval_set = eval_data.find_eval_set(odd_images)
    dataset = eval_data.BytesDataset(eval_set.samples, range(len(eval_set.samples)), decode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=eval_data.collate_packed,
                                         multiprocessing_context=worker_context(2))  # as evaluate() starts its workers
    seen = {}
    for batch in loader:
        seen.update(zip(batch["index"].tolist(), zip(batch["kinds"], eval_data.unpack(batch))))
    assert sorted(seen) == list(range(len(eval_set.samples)))
    kinds = {eval_set.samples[i].path.name: kind for i, (kind, _) in seen.items()}
    assert {k for k, kind in kinds.items() if not kind} == {"garbage.JPEG", "truncated.JPEG"}
    assert {k for k, kind in kinds.items() if kind == "jpeg"} == (set() if decode == "cpu" else {"img_0.JPEG", "img_1.JPEG"})
    for index, (kind, item) in seen.items():
        path = eval_set.samples[index].path
        if kind == "jpeg":
            assert item.numpy().tobytes() == path.read_bytes()
        elif kind == "pixels":  # libjpeg-turbo in the worker, or PIL for the odd ones: PIL's pixels either way
            expected = np.asarray(eval_data.open_rgb(path)[0])
            assert item.dtype == torch.uint8 and np.array_equal(item.permute(1, 2, 0).numpy(), expected), path.name


def test_libjpeg_decode_in_workers_gives_pils_pixels(tmp_path):
    for seed, size in enumerate([(61, 45), (500, 375), (97, 131)]):
        path = tmp_path / f"{seed}.JPEG"
        _image(seed, size).save(path, quality=90)
        ours = eval_data._libjpeg(path.read_bytes(), path)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), np.asarray(Image.open(path).convert("RGB")))


def test_padding_the_last_batch_leaves_every_score_unchanged(tmp_path, odd_images, monkeypatch):
    from parity.eval_run import padded

    x = torch.randn(3, 3, 8, 8)
    assert padded(x, None) is x and padded(x, 3) is x
    assert padded(x, 5).shape == (5, 3, 8, 8) and torch.equal(padded(x, 5)[:3], x) and not padded(x, 5)[3:].any()
    model = make_bit(tmp_path / "rand", 1000, seed=3)  # random weights: its outputs depend on every pixel
    plain = _eval(model, odd_images, fast=True, batch_size=3)
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the padding, without a compiler's run time
    compiled_shape = _eval(model, odd_images, fast=True, batch_size=3, compile=True)  # 8 images: last batch of 2
    assert compiled_shape["predictions"] == plain["predictions"] and compiled_shape["top1"] == plain["top1"]
    assert 0 < compiled_shape["first_batch_s"] <= compiled_shape["seconds"]


def test_batches_are_padded_to_one_shape_where_a_compiler_or_cudnn_autotuning_would_run_again():
    from parity.eval_run import pad_to

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pad_to(64, fast=True, compile=False, device=cuda) == 64  # cuDNN benchmark mode
    assert pad_to(64, fast=True, compile=True, device=cpu) == 64  # a compiled model
    assert pad_to(64, fast=False, compile=False, device=cuda) is None  # faithful: no autotuning
    assert pad_to(64, fast=True, compile=False, device=cpu) is None


@pytest.mark.slow
@pytest.mark.parametrize("maker", [make_bit, make_data2vec], ids=["bit", "data2vec"])
def test_compiled_fast_path_predicts_as_the_eager_one(tmp_path, odd_images, maker):
    """A real torch.compile (inductor's CPU backend) of the fast path's channels_last model, with the padded last batch."""
    model = maker(tmp_path / "rand", seed=3)  # random weights: the outputs depend on every pixel
    eager = _eval(model, odd_images, fast=True, batch_size=3)
    compiled = _eval(model, odd_images, fast=True, batch_size=3, compile=True)  # 8 images: last batch of 2
    assert compiled["predictions"] == eager["predictions"] and compiled["top1"] == eager["top1"]


def test_fast_precision_per_model_type():
    from parity.eval_run import fast_precision

    assert [fast_precision("auto", t) for t in ("bit", "data2vec-vision", "data2vec2-vision")] == ["tf32", "bf16-pure", "bf16"]
    assert fast_precision("bf16", "bit") == "bf16"
    assert fast_precision("fp16-pure", "bit") == "fp16-pure"
    with pytest.raises(InputError, match="precision must be one of auto, bf16, fp16, bf16-pure, fp16-pure, tf32, not 'fp8'"):
        fast_precision("fp8", "bit")


def test_auto_precision_avoids_emulated_bf16(monkeypatch):
    from parity.eval_run import fast_precision

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a V100
    assert [fast_precision("auto", t, cuda) for t in ("bit", "data2vec-vision", "data2vec2-vision")] == ["tf32", "fp16-pure", "fp16"]
    assert fast_precision("bf16-pure", "data2vec-vision", cuda) == "bf16-pure"  # asked for: kept
    assert fast_precision("auto", "data2vec-vision", torch.device("cpu")) == "bf16-pure"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert fast_precision("auto", "data2vec-vision", cuda) == "bf16-pure"


HALF_TYPES = {"bf16": torch.bfloat16, "bf16-pure": torch.bfloat16, "fp16": torch.float16, "fp16-pure": torch.float16}


@pytest.mark.parametrize("maker", [make_bit, make_data2vec], ids=["bit", "data2vec"])
@pytest.mark.parametrize("precision", list(HALF_TYPES))
def test_half_fast_models_compute_the_fp32_function(tmp_path, maker, precision):
    from parity.eval_run import fast_model, load_model, logits

    folder = maker(tmp_path / "rand", seed=3)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = logits(load_model(folder, torch.device("cpu")), x, "fp32")
        model = fast_model(load_model(folder, torch.device("cpu")), precision)
        ours = logits(model, x, precision)
    half = HALF_TYPES[precision]
    weights = {p.dtype for p in model.parameters()}
    assert weights == ({half} if precision.endswith("-pure") else {torch.float32}) and ours.dtype == torch.float32
    # a few layers of rounding (half of eps, relative, each: 2^-8 in bf16, 2^-11 in fp16): within 4 of
    # them of the largest logit. These models measured 1.0-1.1e-3 of it in fp16 and 4.2e-3-1.0e-2 in
    # bf16, so bf16 arithmetic where fp16 was asked for fails.
    error, scale = float((ours - reference).abs().max()), float(reference.abs().max())
    assert error <= 2 * torch.finfo(half).eps * scale, f"{precision}: max-abs {error:.3g} against logits up to {scale:.3g}"


def _with_head_bias(path: Path, cls: int, value: float, order: list[int] | None = None) -> Path:
    """A tiny BiT folder (`make_bit`) whose head bias for class `cls` is `value`."""
    from parity.eval_run import load_model

    model = load_model(make_bit(path, order=order), torch.device("cpu"))
    with torch.no_grad():
        model.classifier[-1].bias[cls] = value
    model.save_pretrained(path)
    return path


def _overflowing_fp16(path: Path) -> Path:
    """A tiny BiT predicting class 1 by a head bias of 1e5: finite in fp32 and bf16, beyond fp16's 65504."""
    return _with_head_bias(path, 1, 1e5, order=[1, 2, 0])


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("precision", ["fp16", "fp16-pure"])
def test_fp16_overflow_is_scored_again_in_tf32(tmp_path, folders, precision, device):
    model = _overflowing_fp16(tmp_path / "model")
    result = _eval(model, folders, fast=True, precision=precision, device=device)  # 10 images in batches of 4
    assert result["predictions"] == [1] * 10 and result["top1"] == 30.0
    assert (result["batches"], result["rescored_batches"], result["precision"]) == (3, 3, precision)
    from parity.eval_run import _summary

    assert f"note: 3 of 3 batches gave inf or NaN logits in {precision} (beyond its range) and were scored again in TF32" \
        in _summary(result).splitlines()
    bf16 = _eval(model, folders, fast=True, precision="bf16-pure", device=device)  # bf16 has fp32's range
    assert bf16["predictions"] == [1] * 10 and bf16["rescored_batches"] == 0
    assert "scored again" not in _summary(bf16)


@pytest.mark.parametrize("fast, precision", [(False, "fp32"), (True, "fp16-pure")])
def test_non_finite_logits_in_float_blame_the_weights(tmp_path, folders, fast, precision):

    path = _with_head_bias(tmp_path / "model", 3, float("nan"))
    first = sorted((folders / WNIDS[0]).iterdir())[0]
    shown = "tf32" if fast else "fp32"  # an fp16 batch is scored again in TF32 before anything is blamed
    with pytest.raises(InputError, match="^" + re.escape(f"{first}: the model's logits are inf or NaN in {shown} for this "
                                                         "image and 3 more of its batch of 4: its weights give non-finite "
                                                         "outputs (check the folder with `parityport parity`)") + "$"):
        _eval(path, folders, fast=fast, precision=precision)


@pytest.mark.parametrize("fast, producers", [(False, 1), (True, 1), (True, 2)])
def test_a_run_stopped_by_an_error_leaves_no_thread_or_worker_behind(tmp_path, folders, fast, producers):
    import multiprocessing
    import threading

    def threads() -> set[threading.Thread]:  # tqdm's progress-bar monitor comes and goes on its own
        return {t for t in threading.enumerate() if t.name != "tqdm_monitor"}

    path = _with_head_bias(tmp_path / "model", 3, float("nan"))
    before = threads()
    with pytest.raises(InputError, match="non-finite outputs"):
        _eval(path, folders, fast=fast, batch_size=2, workers=2, producers=producers)  # stops at the first of 5 batches
    assert multiprocessing.active_children() == []
    for _ in range(50):  # the workers' queue-feeding threads end just after the workers
        if threads() <= before:
            break
        time.sleep(0.1)
    assert threads() <= before


@pytest.mark.parametrize("precision", ["auto", "bf16-pure"])
def test_the_fast_path_predicts_what_the_faithful_path_does(tmp_path, folders, precision):
    """On a model whose outputs depend on the pixels (random weights, well separated logits), the fast
    path's decode, resize and arithmetic must keep the faithful path's predictions."""
    from transformers import AutoModelForImageClassification

    model = make_bit(tmp_path / "rand", 1000, seed=5)
    m = AutoModelForImageClassification.from_pretrained(model)
    with torch.no_grad():
        head = torch.nn.init.normal_(m.classifier[1].weight, std=5.0)
        head.sub_(head.mean(0))  # without the direction all classes share, the winner varies with the image
    m.save_pretrained(model)
    faithful = _eval(model, folders)
    fast = _eval(model, folders, fast=True, precision=precision)
    assert len(set(faithful["predictions"])) > 2  # the check means something only if predictions vary
    assert prediction_agreement(faithful, fast)["agreement"] >= 90.0, (faithful["predictions"], fast["predictions"])


@pytest.mark.parametrize("precision", ["bf16-pure", "fp16-pure"])
def test_pure_half_fast_path_end_to_end(bit_class1, odd_images, precision):
    result = _eval(bit_class1, odd_images, fast=True, precision=precision)
    assert result["precision"] == precision and result["failures"] == 2 and result["top1"] == pytest.approx(400 / 8)


def test_hub_and_timm_protocols(bit_class1):
    hub, transform = protocols.resolve_protocol(bit_class1, "hub")
    assert (hub.resize, hub.resize_side, hub.image_size, hub.interpolation) == ("shorter", 36, 32, "bilinear")
    assert transform(_image(1)).shape == (3, 32, 32)
    timm, transform = protocols.resolve_protocol(bit_class1, "timm")
    assert timm.name.startswith("timm:resnetv2_") and timm.image_size == 32 and timm.resize_side == 36
    image = _image(1)  # 48x40: shorter side to 36 bilinear (43x36), centre crop 32, BiT's mean and std 0.5
    resized = np.asarray(image.resize((43, 36), Image.BILINEAR), np.float32)[2:34, 6:38] / 255
    expected = torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1)
    assert image.size == (48, 40) and (transform(image) - expected).abs().max() <= 1 / 127.5  # one uint8 step
    assert protocols.TIMM_PEERS["bit"]({"depths": [3, 4, 6, 3], "hidden_sizes": [256]}) == "resnetv2_50x1_bit.goog_in21k_ft_in1k"


# ---- failures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    root = make_class_folders(tmp_path_factory.mktemp("odd") / "val", WNIDS[:2], [2, 1])
    odd = root / WNIDS[1]
    _image(20).save(odd / "png.JPEG", format="PNG")
    _image(21).convert("L").save(odd / "gray.JPEG", quality=90)
    _image(22).convert("CMYK").save(odd / "cmyk.JPEG", quality=90)
    full = (root / WNIDS[0] / "img_0.JPEG").read_bytes()
    (odd / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (odd / "garbage.JPEG").write_bytes(b"not an image at all")
    return root


@pytest.mark.parametrize("fast, decode", [(False, "gpu"), (True, "gpu"), (True, "cpu")])
def test_odd_images_decoded_or_counted(bit_class1, odd_images, fast, decode):
    result = _eval(bit_class1, odd_images, fast=fast, decode=decode)
    assert result["images"] == 8 and result["failures"] == 2
    failed = sorted(Path(f["path"]).name for f in result["failed_images"])
    assert failed == ["garbage.JPEG", "truncated.JPEG"]
    assert result["converted"] == {"JPEG/CMYK": 1, "JPEG/L": 1, "PNG/RGB": 1}
    assert result["top1"] == pytest.approx(400 / 8)  # 6 images of class 1, 2 of them failed (wrong)
    assert result["pipeline"] == ("fast" if fast else "faithful")


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_two_producer_threads_give_the_one_thread_result(tmp_path, odd_images, decode):
    model = make_bit(tmp_path / "rand", seed=3)  # random weights: every image's prediction is its own
    one = _eval(model, odd_images, fast=True, decode=decode, batch_size=2)  # 8 images: 4 batches
    two = _eval(model, odd_images, fast=True, decode=decode, batch_size=2, producers=2)
    for key in ("predictions", "top1", "top5", "failures", "converted", "batches"):
        assert two[key] == one[key], key
    assert sorted(map(str, two["failed_images"])) == sorted(map(str, one["failed_images"]))


@pytest.mark.parametrize("fast", [False, True])
def test_a_link_to_an_image_that_is_gone_counts_as_a_failure(tmp_path, bit_class1, fast):
    data = make_class_folders(tmp_path / "val", WNIDS[1:2], [2])
    gone = data / WNIDS[1] / "gone.JPEG"
    gone.symlink_to(tmp_path / "moved-away.JPEG")
    result = _eval(bit_class1, data, fast=fast)
    assert (result["images"], result["failures"], result["correct"]) == (3, 1, 2)
    assert result["top1"] == pytest.approx(200 / 3)
    [failed] = result["failed_images"]
    assert failed["path"] == str(gone) and "No such file or directory" in failed["error"]


def test_jpeg_header_routing(odd_images):
    comps = {p.name: eval_data.jpeg_components(p.read_bytes()) for p in (odd_images / WNIDS[1]).iterdir()}
    assert comps["img_0.JPEG"] == 3 and comps["gray.JPEG"] == 1 and comps["cmyk.JPEG"] == 4
    assert comps["png.JPEG"] is None and comps["garbage.JPEG"] is None


# ---- command line ------------------------------------------------------------------------------


def test_a_folders_own_code_runs_only_where_it_is_parityports(tmp_path, folders, capsys):
    from converters.data2vec import AUTO_MAP, hf_code_files

    model, ran = tmp_path / "m", tmp_path / "code-ran"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "data2vec2-vision", "auto_map": AUTO_MAP}))
    for name, code in hf_code_files().items():
        (model / name).write_bytes(code)
    edited = model / "configuration_data2vec2.py"
    edited.write_text(edited.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")
    assert main(["--model", str(model), "--data", str(folders), "--device", "cpu", "--workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"parityport eval: error: {model}: configuration_data2vec2.py: missing or differs from the code parityport "
        "ships; refusing to run it with trust_remote_code"]
    assert not ran.exists()


def _break_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")


@pytest.mark.parametrize("entry", ["parityport", "python -m parity.eval_run"])
@pytest.mark.parametrize("damage, problem", [
    (lambda m: (m / "model.safetensors").unlink(), "Error no file named model.safetensors, or pytorch_model.bin, found in "
                                                   "directory {model}."),
    (_break_weights, "Error while deserializing header: invalid header length"),
    (lambda m: _edit_json(m / "config.json", hidden_sizes="wide"), "Validation error for field 'hidden_sizes': TypeError: Field 'hidden_sizes' with value "
                                                                 "'wide' doesn't match "),
])
def test_a_folder_transformers_cannot_load_exits_2_in_one_line(tmp_path, folders, capsys, entry, damage, problem):
    from parityport.cli import main as parityport

    model = make_bit(tmp_path / "m", 3)
    damage(model)
    capsys.readouterr()  # make_bit's own progress bar
    args = ["--model", str(model), "--data", str(folders), "--device", "cpu", "--workers", "0"]
    assert (parityport(["eval", *args]) if entry == "parityport" else main(args)) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"parityport eval: error: {model}: transformers cannot load it: {problem.format(model=model)}")


def test_an_unreadable_folder_exits_2_in_one_line_under_torchruns_entry_point(tmp_path, folders, capsys, monkeypatch):
    import parity.eval_run as eval_run

    def unreadable(data, limit=None):
        raise PermissionError(13, "Permission denied", str(data))

    monkeypatch.setattr(eval_run, "find_eval_set", unreadable)
    model = make_bit(tmp_path / "m", 3)
    capsys.readouterr()
    assert main(["--model", str(model), "--data", str(folders), "--device", "cpu", "--workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"parityport eval: error: {folders}: Permission denied"]


def test_bad_layout_exits_2(tmp_path, bit_class1, folders, capsys):
    flat = tmp_path / "flat"
    make_flat(flat, [0, 1])  # flat files but no ground truth: no layout matches
    assert main(["--model", str(bit_class1), "--data", str(flat), "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "expected one of" in err and "ILSVRC2012_validation_ground_truth.txt" in err and "class subfolders" in err
    capsys.readouterr()
    assert main(["--model", str(tmp_path), "--data", str(folders), "--device", "cpu"]) == 2
    assert "not a model folder" in capsys.readouterr().err.splitlines()[-1]


def test_a_model_that_is_no_folder_or_a_gpu_decoder_on_cpu_exit_2(tmp_path, bit_class1, folders, capsys):
    npz = tmp_path / "R50x1.npz"
    npz.write_bytes(b"PK")
    assert main(["--model", str(npz), "--data", str(folders), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (f"parityport eval: error: {npz}: is a file, not a converted folder; "
                                               "convert it first: parityport convert FILE --out DIR, then --model DIR")
    assert main(["--model", str(tmp_path / "missing"), "--data", str(folders), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (f"parityport eval: error: {tmp_path / 'missing'}: no such folder; "
                                               "--model is a folder parityport convert wrote")
    assert main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--decode", "nvimgcodec"]) == 2
    assert capsys.readouterr().err.strip() == ("parityport eval: error: --decode nvimgcodec is the fast path's, on a CUDA "
                                               "device; on cpu the faithful path decodes with PIL")


@pytest.mark.parametrize("option, value, problem", [("--batch-size", "0", "must be at least 1, not 0"),
                                                     ("--workers", "-1", "must be at least 0, not -1"),
                                                     ("--limit", "0", "must be at least 1, not 0"),
                                                     ("--tolerance", "-0.5", "must be at least 0.0, not -0.5"),
                                                     ("--tolerance", "nan", "must be at least 0.0, not nan"),
                                                     ("--expect", "nan", "a top-1 in percent is from 0 to 100, not nan"),
                                                     ("--expect", "180", "a top-1 in percent is from 0 to 100, not 180"),
                                                     ("--batch-size", "many", "not a number: 'many'")])
def test_bad_numbers_exit_2_naming_the_option(bit_class1, folders, capsys, option, value, problem):
    with pytest.raises(SystemExit) as caught:
        main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", option, value])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"parityport eval: error: argument {option}: {problem} "
                                                    "(see parityport eval --help)"]


@pytest.mark.parametrize("argv, code, stream", [(["--expect", "101"], 2, "stderr"), (["--help"], 0, "stdout")])
def test_usage_errors_and_help_answer_without_importing_torch(argv, code, stream):
    """The eval command's options live in parity/eval_args.py: a usage error or --help never waits
    about 4 s for torch and transformers."""
    script = ("import sys\nfrom parityport.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print('exit', e.code, 'torch' in sys.modules, 'PIL' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, "eval", "--model", "m", "--data", "d", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.stderr.splitlines()[-1] == f"exit {code} False False"
    expected = ("a top-1 in percent is from 0 to 100, not 101" if code else "usage: parityport eval")
    assert expected in getattr(done, stream)


# The refusals `parityport eval` makes before importing torch and transformers (4 s, 0.9 GB): (what is
# wrong, the arguments after `eval`, the problem); {model} and {data} are a model folder and an image set.
REFUSED_BEFORE_TORCH = [
    ("no data", ["--model", "{model}", "--data", "{data}/missing"], "{data}/missing: not a folder; expected one of:"),
    ("no model", ["--model", "{model}/missing", "--data", "{data}"],
     "{model}/missing: no such folder; --model is a folder parityport convert wrote"),
    ("a broken config.json", ["--model", "{model}", "--data", "{data}"],
     "{model}/config.json: cannot read JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("no model_type", ["--model", "{model}", "--data", "{data}"],
     "{model}/config.json: missing (or without model_type): not a model folder"),
    ("no CUDA", ["--model", "{model}", "--data", "{data}", "--device", "cuda"],
     "--device cuda but CUDA is not available here; use --device cpu"),
]


@pytest.mark.parametrize("case, argv, problem", REFUSED_BEFORE_TORCH, ids=[case for case, *_ in REFUSED_BEFORE_TORCH])
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, case, argv, problem):
    if case == "no CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    model, data = tmp_path / "m", tmp_path / "val" / WNIDS[0]
    data.mkdir(parents=True)
    _image(0).save(data / "a.png")
    model.mkdir()
    (model / "config.json").write_text({"a broken config.json": "{not json", "no model_type": "{}"}.get(
        case, json.dumps({"model_type": "bit"})))
    script = ("import sys\nfrom parityport.cli import main\ncode = main(sys.argv[1:])\n"
              "print('exit', code, 'torch' in sys.modules, 'PIL' in sys.modules, 'transformers' in sys.modules, "
              "file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, "eval", *(a.format(model=model, data=data.parent) for a in argv)],
                          capture_output=True, text=True, timeout=60)
    refusal, modules = done.stderr.splitlines()[-2:]
    assert refusal.startswith("parityport eval: error: " + problem.format(model=model, data=data.parent))
    assert modules == "exit 2 False False False"


class _Driver:
    """libcuda.so.1's cuInit and cuDeviceGetCount, answering `init` and counting `devices`."""

    def __init__(self, init: int, devices: int) -> None:
        self.init, self.devices = init, devices

    def cuInit(self, flags):
        return self.init

    def cuDeviceGetCount(self, count):
        count._obj.value = self.devices
        return 0


@pytest.mark.parametrize("driver, torch_version, absent", [
    (None, "2.14.1", True),  # no NVIDIA driver library
    (_Driver(100, 0), "2.14.1", True),  # CUDA_ERROR_NO_DEVICE: a driver, no GPU (or CUDA_VISIBLE_DEVICES="")
    (_Driver(0, 0), "2.14.1", True),
    (_Driver(0, 2), "2.14.1", False),
    (None, "2.14.1+rocm6.2", False),  # a ROCm build's "cuda" is an AMD GPU: torch decides
])
def test_no_cuda_here_is_sure_only_without_a_driver_or_a_device(monkeypatch, driver, torch_version, absent):
    import ctypes
    import importlib.metadata

    from parity import eval_args

    def load(name):
        assert name == "libcuda.so.1"
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return driver

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", load)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: torch_version)
    assert eval_args.no_cuda_here() is absent


OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                 "1.02 GiB is free")


def test_running_out_of_device_memory_asks_for_a_smaller_batch(bit_class1, folders, capsys, monkeypatch):
    import parity.eval_run as eval_run

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError(OUT_OF_MEMORY)

    monkeypatch.setattr(eval_run, "_run", out_of_memory)
    assert main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--batch-size", "4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "parityport eval: error: cpu ran out of memory at --batch-size 4; give a smaller one "
        "(CUDA out of memory. Tried to allocate 2.00 GiB)")


def test_an_unexpected_exception_exits_3_with_its_traceback(bit_class1, folders, capsys, monkeypatch):
    import parity.eval_run as eval_run

    monkeypatch.setattr(eval_run, "_run", lambda *args: 1 / 0)
    assert main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert "Traceback (most recent call last):" in err and "ZeroDivisionError: division by zero" in err
    assert err[-1] == ("parityport eval: internal error: ZeroDivisionError: division by zero (a fault in parityport, "
                       "not a failed check or bad input: the traceback above says where)")


def test_the_progress_bar_under_torchrun_says_it_counts_rank_0s_share(monkeypatch, capsys):
    from parity.eval_run import _progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for world, label in ((2, "rank 0's share (1/2): 100%"), (1, "100%")):
        with _progress(6, 0, world) as bar:
            bar.update(6)
        assert capsys.readouterr().err.split("\r")[-1].startswith(label)


def test_expect_and_json(tmp_path, bit_class1, folders, capsys):
    out = tmp_path / "r.json"
    args = ["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--workers", "0", "--json", str(out)]
    assert main(args + ["--expect", "30.05"]) == 0
    result = json.loads(out.read_text())
    for key in ("top1", "top5", "images", "images_per_s", "protocol", "model", "device", "failures", "failed_images"):
        assert key in result
    assert (result["top1"], result["images"], result["device"], result["protocol"]) == (30.0, 10, "cpu", "original")
    assert main(args + ["--expect", "30.2"]) == 1
    assert "-0.200 points" in capsys.readouterr().err
    assert main(args + ["--expect", "31", "--tolerance", "1.5", "--agree-with", str(out)]) == 0
    assert json.loads(out.read_text())["agreement"]["agreement"] == 100.0
    assert main(args + ["--fast"]) == 2  # the fast path needs CUDA


@pytest.mark.parametrize("where, problem", [("folder", "{json}: is a folder; --json takes the path of a file to write"),
                                            ("below a file", "{file}: is a file, so --json {json} cannot be written below it")])
def test_a_json_destination_that_cannot_be_written_stops_the_run_before_it_starts(tmp_path, capsys, monkeypatch, where,
                                                                                     problem):
    import parity.eval_run as eval_run

    monkeypatch.setattr(eval_run, "evaluate", lambda *a, **kw: pytest.fail("evaluated before checking --json"))
    (tmp_path / "file").write_text("x")
    json_path = tmp_path if where == "folder" else tmp_path / "file" / "out" / "r.json"
    assert main(["--model", "m", "--data", "d", "--device", "cpu", "--json", str(json_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "parityport eval: error: " + problem.format(json=json_path, file=tmp_path / "file")]


def test_a_json_write_cut_short_leaves_the_previous_result_whole(tmp_path, capsys, monkeypatch):
    _canned_evaluate(monkeypatch, {"original": 84.2}, {"original": [1, 2, 3, 4]})
    out = tmp_path / "r.json"
    out.write_text('{"top1": 80.0}\n')
    real = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(["--model", "m", "--data", "d", "--device", "cpu", "--json", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"parityport eval: error: {out}: cannot write the result: "
                                                        "No space left on device")
    monkeypatch.undo()
    assert out.read_text() == '{"top1": 80.0}\n' and sorted(tmp_path.iterdir()) == [out]


def test_protocols_side_by_side_end_to_end(tmp_path, bit_class1, folders, capsys):
    out = tmp_path / "r.json"
    assert main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--workers", "0", "--protocol",
                 "original", "hub", "timm", "hub", "--expect", "30", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["protocols"] == ["original", "hub", "timm"] and list(written["runs"]) == written["protocols"]
    assert [run["top1"] for run in written["runs"].values()] == [30.0] * 3  # the head ignores the pixels
    assert [row["agreement_with_first"]["agreement"] for row in written["side_by_side"]] == [100.0] * 3
    printed = capsys.readouterr().out
    assert "protocol hub (shorter side to 36 bilinear, centre crop 32 (offset rounded down), mean 0.5 std 0.5), faithful pipeline" in printed
    table = printed[printed.index("protocols side by side"):].splitlines()
    assert table[:5] == [
        "protocols side by side (agreement: images with the same top-1 as under original):",
        "| protocol | preprocessing | top-1 | top-5 | vs expected | agreement |", "|---|---|---|---|---|---|",
        "| original | squash to 36x36 bilinear, centre crop 32, mean 0.5 std 0.5 | 30.000% | 100.000% | +0.000 | 100.00% |",
        "| hub | shorter side to 36 bilinear, centre crop 32 (offset rounded down), mean 0.5 std 0.5 | 30.000% | 100.000% | +0.000 "
        "| 100.00% |"]


def _canned_evaluate(monkeypatch, top1: dict[str, float], predictions: dict[str, list[int]],
                     specs: dict[str, protocols.Protocol] | None = None) -> None:
    """`evaluate` answering each protocol with the given top-1 and predictions (4 images) on a set of
    4 images that need not exist."""
    import parity.eval_run as eval_run

    monkeypatch.setattr(eval_run, "find_eval_set", lambda data, limit=None: eval_data.EvalSet([None] * 4, "class-folders", []))
    specs = specs or {}
    monkeypatch.setattr(eval_run, "evaluate", lambda model, data, protocol, **kw: {
        "protocol": protocol, "preprocessing": f"{protocol} steps", "top1": top1[protocol], "top5": 99.0,
        "protocol_spec": (specs[protocol].__dict__ | {"resize_side": specs[protocol].resize_side}
                          if protocol in specs else {"resize": "squash", "resize_side": 8, "image_size": 8,
                                                     "interpolation": "nearest", "mean": (0,) * 3, "std": (1,) * 3}),
        "predictions": predictions[protocol], "model": model, "data": data, "layout": "class-folders",
        "label_mapping": "imagenet-1k", "pipeline": "faithful", "device": "cpu", "images": 4, "images_per_s": 1.0,
        "failures": 0, "converted": {}})


def test_agree_with_a_side_by_side_file_pairs_the_protocols(tmp_path, bit_class1, folders, capsys, monkeypatch):
    import parity.eval_run as eval_run

    both, hub = tmp_path / "both.json", tmp_path / "hub.json"
    args = ["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--workers", "0"]
    assert main(args + ["--protocol", "original", "hub", "--json", str(both)]) == 0
    assert main(args + ["--protocol", "hub", "--agree-with", str(both), "--json", str(hub)]) == 0
    agreement = json.loads(hub.read_text())["agreement"]
    assert (agreement["agreement"], agreement["images"]) == (100.0, 10)
    capsys.readouterr()
    monkeypatch.setattr(eval_run, "evaluate", lambda *a, **kw: pytest.fail("evaluated before checking --agree-with"))
    assert main(args + ["--protocol", "timm", "--agree-with", str(both)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"parityport eval: error: {both}: has no timm run to agree "
                                                        "with (it has original, hub)")
    (tmp_path / "other.json").write_text(json.dumps({"top1": 3.0}))
    assert main(args + ["--agree-with", str(tmp_path / "other.json")]) == 2
    assert "not a `parityport eval --json` result (no predictions to agree with)" in capsys.readouterr().err


def test_agree_with_says_which_run_it_compared_with(tmp_path, capsys, monkeypatch):
    _canned_evaluate(monkeypatch, {"original": 84.2, "hub": 83.97}, {"original": [1, 2, 3, 4], "hub": [1, 2, 0, 4]})
    both, hub = tmp_path / "both.json", tmp_path / "hub.json"
    args = ["--model", "m", "--data", "d", "--device", "cpu"]
    assert main(args + ["--protocol", "original", "hub", "--json", str(both)]) == 0
    assert main(args + ["--protocol", "hub", "--json", str(hub)]) == 0
    capsys.readouterr()
    assert main(args + ["--protocol", "hub", "--agree-with", str(both)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"agreement with the hub run in {both}: 100.000% of images, "
                                                        "top-1 difference +0.000")
    assert main(args + ["--protocol", "original", "--agree-with", str(hub), "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"agreement with the hub run in {hub}: 75.000% of images, "
                                                        "top-1 difference +0.230")
    assert json.loads((tmp_path / "r.json").read_text())["agreement"]["with"] == {"file": str(hub), "protocol": "hub"}


def test_agree_with_another_number_of_images_stops_the_run_before_it_starts(tmp_path, folders, capsys, monkeypatch):
    import parity.eval_run as eval_run

    full = tmp_path / "full.json"
    full.write_text(json.dumps({"top1": 30.0, "predictions": [1] * 10}))
    monkeypatch.setattr(eval_run, "evaluate", lambda *a, **kw: pytest.fail("evaluated before checking --agree-with"))
    assert main(["--model", "m", "--data", str(folders), "--device", "cpu", "--limit", "4", "--agree-with", str(full)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"parityport eval: error: {full}: its original run has 10 predictions where {folders} with --limit 4 has 4 "
        "images: not the same image set"]


def test_several_protocols_list_the_folder_once(tmp_path, bit_class1, folders, monkeypatch):
    import parity.eval_run as eval_run

    listed = []
    monkeypatch.setattr(eval_run, "find_eval_set", lambda *a: listed.append(a) or eval_data.find_eval_set(*a))
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps({"top1": 30.0, "predictions": [1] * 10}))
    assert main(["--model", str(bit_class1), "--data", str(folders), "--device", "cpu", "--workers", "0",
                 "--protocol", "original", "hub", "--agree-with", str(previous)]) == 0
    assert listed == [(str(folders), None)]


def test_expect_is_about_the_first_protocol(monkeypatch, capsys):
    _canned_evaluate(monkeypatch, {"original": 84.2, "hub": 83.97}, {"original": [1, 2, 3, 4], "hub": [1, 2, 0, 4]})
    args = ["--model", "m", "--data", "d", "--device", "cpu", "--expect", "84.2"]
    assert main(args + ["--protocol", "original", "hub"]) == 0
    table = capsys.readouterr().out.splitlines()[-3:]
    assert table == ["| original | original steps | 84.200% | 99.000% | +0.000 | 100.00% |",
                     "| hub | hub steps | 83.970% | 99.000% | -0.230 | 75.00% |",
                     "top-1 within 0.1 of the expected 84.200% (gap +0.000)"]
    assert main(args + ["--protocol", "hub", "original"]) == 1
    assert "top-1 83.970% is -0.230 points from the expected 84.200%" in capsys.readouterr().err


@pytest.mark.parametrize("top1, expect, code", [(30.0, "30.1", 0), (30.0, "29.9", 0), (80.2, "80.1", 0),
                                                (84.2, "84.3", 0), (30.0, "30.11", 1), (80.22, "80.1", 1)])
def test_a_gap_equal_to_the_tolerance_passes(monkeypatch, capsys, top1, expect, code):
    _canned_evaluate(monkeypatch, {"original": top1}, {"original": [1, 2, 3, 4]})
    assert main(["--model", "m", "--data", "d", "--device", "cpu", "--expect", expect, "--tolerance", "0.1"]) == code


def test_published_figures_stand_beside_their_protocols(monkeypatch, tmp_path, capsys):
    import parity.card as card
    from checkpoints.catalog import lookup

    entry = lookup("data2vec-vision-base-ft1k")  # published: 84.2 with the original crop, 83.97 with the hub's squash
    monkeypatch.setattr(card, "folder_catalog_entry", lambda folder: (entry, False))
    crop = protocols.ORIGINAL["data2vec-vision"]  # shorter side 256 bicubic, centre crop 224
    squash = protocols.Protocol("hub", "squash", 224, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3, 224, "floor")
    _canned_evaluate(monkeypatch, {"original": 84.21, "hub": 83.97, "timm": 84.1},
                     {"original": [1, 2, 3, 4], "hub": [1, 2, 0, 4], "timm": [1, 2, 3, 0]},
                     {"original": crop, "hub": squash, "timm": dataclasses.replace(crop, crop_pct=0.9)})
    out = tmp_path / "r.json"
    assert main(["--model", "m", "--data", "d", "--device", "cpu", "--protocol", "original", "hub", "timm",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == ("published top-1 with this preprocessing (the catalog's original protocol) on imagenet-1k-val: "
                          "84.2% (data2vec paper (arXiv 2202.03555), ViT-B, as quoted on the hub model card); this run "
                          "+0.010")
    assert printed[-5:-3] == ["| protocol | preprocessing | top-1 | top-5 | published (gap) | agreement |",
                              "|---|---|---|---|---|---|"]
    assert printed[-3:] == ["| original | original steps | 84.210% | 99.000% | 84.2% (+0.010) | 100.00% |",
                            "| hub | hub steps | 83.970% | 99.000% | 83.97% (+0.000) | 75.00% |",
                            "| timm | timm steps | 84.100% | 99.000% | none catalogued | 75.00% |"]
    runs = json.loads(out.read_text())["runs"]
    assert runs["hub"]["published"]["catalog_entry"] == "data2vec-vision-base-ft1k" and "published" not in runs["timm"]
    # what decides is the pipeline: a converted folder's own preprocessor keeps the original crop
    # (with transformers' offset), so its "hub" run is neither the hub card's squash nor the paper's crop
    _canned_evaluate(monkeypatch, {"original": 84.21, "hub": 84.18}, {"original": [1, 2, 3, 4], "hub": [1, 2, 3, 4]},
                     {"original": crop, "hub": dataclasses.replace(crop, name="hub", crop_offset="floor")})
    assert main(["--model", "m", "--data", "d", "--device", "cpu", "--protocol", "original", "hub"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| hub | hub steps | 84.180% | 99.000% | none catalogued | 100.00% |"
    _canned_evaluate(monkeypatch, {"original": 84.21}, {"original": [1, 2, 3, 4]}, {"original": crop})
    monkeypatch.setattr(card, "folder_catalog_entry", lambda folder: (entry, True))
    assert main(["--model", "m", "--data", "d", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith(
        "this run +0.010; this folder was converted from a synthetic stand-in, not the published weights")


def test_protocol_descriptions():
    from parity.protocols import ORIGINAL, Protocol

    assert [p.describe() for p in ORIGINAL.values()] == [
        "squash to 480x480 bilinear, mean 0.5 std 0.5",
        "shorter side to 256 bicubic, centre crop 224, mean 0.5 std 0.5",
        "shorter side to 256 bicubic, centre crop 224, mean 0.485/0.456/0.406 std 0.229/0.224/0.225"]
    squash_crop = Protocol("x", "squash", 224, 0.9, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert squash_crop.describe() == "squash to 248x248 bicubic, centre crop 224, mean 0.5 std 0.5"


def test_summary_names_the_fast_paths_decoder_and_precision_and_its_note(bit_class1, folders):
    from parity.eval_run import _summary

    result = _eval(bit_class1, folders, fast=True)
    assert "fast pipeline on cpu (JPEGs decoded by cpu, tf32)" in _summary(result).splitlines()[0]
    assert "note: " not in _summary(result)
    note = "decoded JPEGs with torchvision's nvJPEG, ..."
    assert _summary(result | {"decode_note": note}).splitlines()[2] == f"note: {note}"
    assert "(JPEGs decoded" not in _summary(_eval(bit_class1, folders, fast=False))


def test_prediction_agreement():
    a = {"predictions": [1, 2, 3, 4], "top1": 50.0, "pipeline": "faithful"}
    b = {"predictions": [1, 2, 0, 4], "top1": 25.0, "pipeline": "fast"}
    result = prediction_agreement(a, b)
    assert (result["agreement"], result["disagreements"], result["top1_difference"]) == (75.0, 1, 25.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec"])
def test_fast_gpu_path_matches_faithful(tmp_path, bit_class1, odd_images, decode):
    if decode == "nvimgcodec":
        pytest.importorskip("nvidia.nvimgcodec")
    faithful = _eval(bit_class1, odd_images, fast=False, device="cuda")
    fast = _eval(bit_class1, odd_images, fast=True, device="cuda", decode=decode)
    assert fast["pipeline"] == "fast" and fast["failures"] == faithful["failures"] == 2
    assert fast["converted"] == faithful["converted"]
    assert prediction_agreement(fast, faithful)["agreement"] == 100.0
    random_model = make_bit(tmp_path / "rand", 1000, seed=3)
    data = make_class_folders(tmp_path / "many", WNIDS, [20, 20, 20])
    a = _eval(random_model, data, fast=True, device="cuda", decode=decode)
    b = _eval(random_model, data, fast=False, device="cuda")
    assert prediction_agreement(a, b)["agreement"] >= 90.0


def test_bench_eval_cpu_smoke(tmp_path):
    from parity import bench_eval

    out = tmp_path / "eval.json"
    args = ["--device", "cpu", "--images", "6", "--workers", "0", "--batch-size", "3", "--cache", str(tmp_path), "--out", str(out)]
    assert bench_eval.main(args) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and len(report["runs"]) == 2
    for run in report["runs"]:
        assert all(run[p]["images"] == 6 and run[p]["images_per_s"] > 0 for p in ("faithful", "fast", "baseline"))
        assert run["agreement_fast_vs_faithful"]["images"] == 6
        assert run["skipped"]["fast_nvimgcodec"].startswith("--decode nvimgcodec decodes on a CUDA device") and "fast_nvimgcodec" not in run
        assert set(run["skipped"]) == {"fast_nvimgcodec", "fast_nvimgcodec_2_producers", "input_only_nvimgcodec_decode",
                                       "decode_only_nvimgcodec"}
        assert run["fast_2_producers"]["images"] == 6
        assert run["decode_only_gpu"]["images"] == 6 and "decode_only_nvimgcodec" not in run
    page = out.with_suffix(".md").read_text()
    assert page.count("What limits the fast path:") == 2 and "| fast (torchvision nvJPEG batched, GPU resize) |" in page
    assert page.count("- fast, nvImageCodec decode (libjpeg's chroma upsampling): --decode nvimgcodec decodes on a CUDA device") == 2


def test_bench_eval_gives_compiled_rates_after_the_first_batch():
    from parity.bench_eval import _after_first_batch

    run = {"fast_compiled": {"images": 1000, "seconds": 12.0, "first_batch_s": 2.0},  # 744 images in 10 s
           "fast_nvimgcodec_compiled": {"images": 1000, "seconds": 5.0},  # recorded before first_batch_s existed
           "fast": {"images": 1000, "seconds": 1.0, "first_batch_s": 0.5}}  # not compiled: no line for it
    assert _after_first_batch(run, 256) == "Compiled runs after their first batch (compiling happens there): fast, model compiled 74 img/s."
    assert _after_first_batch({"fast": run["fast"]}, 256) is None


def test_bench_eval_measures_only_the_pipelines_asked_for(tmp_path):
    from parity import bench_eval

    out = tmp_path / "eval.json"
    assert bench_eval.main(["--device", "cpu", "--images", "6", "--workers", "0", "--batch-size", "3", "--cache",
                            str(tmp_path), "--out", str(out), "--stand-ins", "bit", "--precision", "fp16-pure",
                            "--only", "model_only_fp16-pure", "fast"]) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert {k for k in run if k not in ("model", "protocol", "skipped")} == {"fast", "model_only_fp16-pure"}
    assert run["fast"]["precision"] == "fp16-pure"
    page = out.with_suffix(".md").read_text()
    assert "| model alone, weights and activations in fp16 |" in page and "Fast path precision: fp16-pure." in page
    assert "What limits" not in page and "| baseline (timm" not in page


def test_hub_protocol_for_data2vec_squash(tmp_path):
    model = make_data2vec(tmp_path / "d2v", order=[0])
    hub, transform = protocols.resolve_protocol(model, "hub")
    assert (hub.resize, hub.resize_side, hub.image_size, hub.interpolation) == ("squash", 32, 32, "bicubic")
    assert transform(_image(2, (50, 30))).shape == (3, 32, 32)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("override, problem", [
    ({"image_size": "32"}, "eval override image_size='32': expected a whole number of pixels >= 1"),
    ({"crop_pct": 0}, "eval override crop_pct=0: expected a number in (0, 1]"),
    ({"resize_size": 2.5}, "eval override resize_size=2.5: expected a whole number of pixels >= 1 or null"),
    ({"image_size": 32, "resize_size": 16}, "eval overrides {'image_size': 32, 'resize_size': 16}: "
                                            "the resize side 16 is smaller than the crop 32"),
    ([1], "'parityport' must be a JSON object of eval overrides"),
])
def test_bad_eval_overrides_are_input_errors(tmp_path, override, problem):
    model = make_bit(tmp_path / "m", 3)
    _edit_json(model / "preprocessor_config.json", parityport=override)
    with pytest.raises(InputError) as error:
        protocols.resolve_protocol(model, "original")
    assert error.value.problem == problem


@pytest.mark.parametrize("changes, problem", [
    ({"resample": 1}, "image processor resample 1 is not one parityport eval applies; known: 2 (bilinear), 3 (bicubic)"),
    ({"do_center_crop": False}, "image processor resizes the shorter side to 36 without a centre crop: "
                                "images keep their shapes, so they make no batch"),
    ({"image_processor_type": "NoSuchImageProcessor"}, "transformers cannot build its image processor: "),
    ({"do_rescale": False}, "image processor rescales by 1.0 (do_rescale, rescale_factor), not 1/255, which parityport "
                            "eval does not apply"),
    ({"rescale_factor": 1 / 127.5}, "image processor rescales by 0.00784313725490196 (do_rescale, rescale_factor), not "
                                    "1/255, which parityport eval does not apply"),
    ({"do_resize": False}, "image processor has do_resize false, which parityport eval does not apply"),
    ({"size": {"height": 24, "width": 24}}, "image processor crops 32 from a resize to 24: transformers pads the image "
                                            "with zeros, which parityport eval does not apply"),
    ({"crop_size": {"height": 32, "width": 24}}, "image processor crop_size {'height': 32, 'width': 24} is not a square"),
])
def test_hub_processors_eval_cannot_apply_are_input_errors(tmp_path, changes, problem):
    model = make_bit(tmp_path / "m", 3)
    _edit_json(model / "preprocessor_config.json", **changes)
    with pytest.raises(InputError) as error:
        protocols.resolve_protocol(model, "hub")
    assert error.value.problem.startswith(problem) and error.value.path == str(model / "preprocessor_config.json")


def test_a_catalogued_checkpoints_own_protocols_come_before_its_familys(tmp_path, monkeypatch):
    import parity.card as card
    from checkpoints.catalog import lookup

    model = make_bit(tmp_path / "m", 1000)
    processor = json.loads((model / "preprocessor_config.json").read_text())
    del processor["parityport"]  # no folder override: the catalog decides
    (model / "preprocessor_config.json").write_text(json.dumps(processor))
    monkeypatch.setattr(card, "folder_catalog_entry", lambda folder: (lookup("BiT-R50x1-distilled-224"), False))
    timm, transform = protocols.resolve_protocol(model, "timm")  # not the 448 of BiT-M's ILSVRC-2012 fine-tunes
    assert (timm.resize, timm.resize_side, timm.image_size, timm.interpolation) == ("shorter", 256, 224, "bicubic")
    assert transform(_image(1, (300, 260))).shape == (3, 224, 224)
    # its original protocol is big_vision's area resize, run by TensorFlow: tests/test_eval_area.py
    monkeypatch.setattr(card, "folder_catalog_entry", lambda folder: (lookup("BiT-S-R50x1"), False))
    assert protocols.resolve_protocol(model, "timm")[0].resize_side == 256  # BiT-S: timm's 224 protocol
    assert protocols.resolve_protocol(model, "original")[0] == protocols.ORIGINAL["bit"]  # none catalogued
    monkeypatch.setattr(card, "folder_catalog_entry", lambda folder: (None, False))
    assert protocols.resolve_protocol(model, "timm")[0].resize_side == 448  # the family's peer

"""Validation-set layouts, label mapping and the datasets that feed evaluation.

Supported VAL_DIR layouts (checked in this order):

1. ``loc-csv`` — Kaggle's ImageNet layout: ``LOC_val_solution.csv`` (columns
   ImageId, PredictionString; the first token of PredictionString is the wnid)
   in VAL_DIR or up to four parent folders; images ``<ImageId>.JPEG`` in VAL_DIR
   or in VAL_DIR/ILSVRC/Data/CLS-LOC/val (with neither holding images, the CSV is not
   this folder's: a val folder sorted into class folders below it is layout 3).
2. ``ilsvrc-devkit`` — the flat ILSVRC2012 val files ``ILSVRC2012_val_NNNNNNNN.JPEG``
   with the devkit ground truth ``ILSVRC2012_validation_ground_truth.txt`` (line n =
   the 1-based ILSVRC2012_ID of image n). IDs are mapped to wnids through the
   devkit's ``meta.mat`` (``synsets`` struct: ILSVRC2012_ID, WNID; read with scipy),
   or through ``ILSVRC2012_wnids_by_id.txt`` (1000 lines, line k = wnid of ID k).
   Both files are looked for in VAL_DIR, VAL_DIR/data, VAL_DIR/ILSVRC2012_devkit_t12/data
   and the same places under VAL_DIR's parent. (Kaggle's LOC_synset_mapping.txt
   is in sorted-wnid order, not ID order, and is NOT accepted for this.)
3. ``class-folders`` — one subfolder per class holding image files (searched
   recursively). Subfolders named by ImageNet wnids map to the position of the wnid
   in the sorted 1000 ImageNet-1k wnids; other names map through the model's
   id2label when every folder name is a label. Otherwise, for a model whose classes
   have names, folders named by class index (ImageNetV2's 0..999) map to that index
   and any other names are refused; for a model with only LABEL_k names, they map to
   the position of the folder name among the sorted subfolders (torchvision's
   ImageFolder order).

A 21843-way (ImageNet-21k, Google order) head is scored on the 1000 classes:
its logits are restricted to the in21k positions of the 1000 in1k wnids.
Image files: .jpeg .jpg .png .bmp .webp .ppm .tif .tiff (any case).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from converters.errors import InputError
from parity.eval_args import DECODERS, EXPECTED_LAYOUTS, GROUND_TRUTH, LOC_CSV, WNIDS_BY_ID

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
_FLAT_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Sample:
    """One image file and its class name (a wnid or a class-folder name)."""

    path: Path
    label: str


@dataclass
class EvalSet:
    """The images of a validation folder, in a fixed order, and what was found around them."""

    samples: list[Sample]
    layout: str
    class_names: list[str]  # every class the layout declares, sorted (folders, or wnids seen)
    notes: dict[str, int] = field(default_factory=dict)  # labels without images, images without labels, subset_of


@dataclass(frozen=True)
class LabelMap:
    """How class names become target indices, and which model outputs are scored."""

    kind: str
    target_of: dict[str, int]
    logit_indices: list[int] | None = None  # restrict logits to these outputs before ranking; -1: none

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the scored classes (B, classes): all of them, or the columns `logit_indices`
        names, where -1 (a class the head lacks, like in1k's teddy bear in the 21k list) scores -inf
        and so is never predicted, instead of reading the head's last output."""
        if self.logit_indices is None:
            return logits
        indices = torch.as_tensor(self.logit_indices, device=logits.device)
        selected = logits[:, indices.clamp(min=0)]
        return selected.masked_fill(indices < 0, float("-inf"))

    def targets(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Target index of every sample (in the scored space)."""
        return torch.tensor([self.target_of[s.label] for s in samples], dtype=torch.long)


# ---- ImageNet class lists ----------------------------------------------------------------------


def _timm_info(name: str) -> list[str]:
    from importlib.resources import files

    return files("timm.data").joinpath("_info", name).read_text().split()


@functools.lru_cache(maxsize=None)
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order (class index = position)."""
    try:
        from checkpoints.labels import imagenet1k_wnids as shared

        wnids = tuple(shared())
        if len(wnids) == 1000:
            return wnids
    except (ImportError, AttributeError, TypeError):
        pass
    return tuple(_timm_info("imagenet_synsets.txt"))


@functools.lru_cache(maxsize=None)
def in21k_to_in1k_indices() -> tuple[int, ...]:
    """For each in1k class (sorted wnids), its output index in a 21843-way Google in21k head, -1 where
    the 21k list lacks the class (n04399382, teddy bear)."""
    try:
        from checkpoints.labels import in21k_to_in1k_indices as shared

        indices = tuple(int(i) for i in shared())
        if len(indices) == 1000:
            return indices
    except (ImportError, AttributeError, TypeError):
        pass
    position = {wnid: i for i, wnid in enumerate(_timm_info("imagenet21k_goog_synsets.txt"))}
    return tuple(position.get(w, -1) for w in imagenet1k_wnids())


# ---- layouts -----------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    """An image file by its name, or a link to one that is gone: listed, it counts as a failure, where
    skipping it would drop it from the count unseen."""
    dangling = path.is_symlink() and not path.exists()
    return (path.is_file() or dangling) and path.suffix.lower() in IMAGE_SUFFIXES


def _search_dirs(data_dir: Path, subdirs: Sequence[str]) -> list[Path]:
    return [base / sub for base in (data_dir, data_dir.parent) for sub in subdirs]


def _find_file(dirs: Sequence[Path], name: str) -> Path | None:
    return next((d / name for d in dirs if (d / name).is_file()), None)


def _class_folders(data_dir: Path) -> EvalSet | None:
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [Sample(f, d.name) for d in folders for f in sorted(d.rglob("*")) if _is_image(f)]
    if not samples:
        return None
    return EvalSet(samples, "class-folders", [d.name for d in folders])


def _devkit_wnids(dirs: Sequence[Path]) -> list[str] | None:
    """The wnid of each ILSVRC2012_ID 1-1000 (position = ID - 1), from the first of WNIDS_BY_ID or
    meta.mat found in `dirs`; None where neither is."""
    text = _find_file(dirs, WNIDS_BY_ID)
    if text:
        wnids = text.read_text().split()
        if len(wnids) != 1000:
            raise InputError(text, f"holds {len(wnids)} wnids; it needs 1000, line k the wnid of ILSVRC2012_ID k")
        return wnids
    meta = _find_file(dirs, "meta.mat")
    if meta is None:
        return None
    try:
        from scipy.io import loadmat
    except ImportError:
        raise InputError(meta, f"reading meta.mat needs scipy; or write {WNIDS_BY_ID}") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except Exception as error:  # scipy's read errors share no class narrower than this
        raise InputError(meta, f"not the devkit's meta.mat (a synsets table of ILSVRC2012_ID and WNID): "
                               f"{type(error).__name__}: {error}") from None
    if missing := [i for i in range(1, 1001) if i not in by_id]:
        raise InputError(meta, f"has no synset for ILSVRC2012_ID {missing[0]} ({len(missing)} of 1-1000 missing)")
    return [by_id[i] for i in range(1, 1001)]


def _ground_truth(path: Path) -> list[int]:
    """The devkit's ground truth: the ILSVRC2012_ID (1-1000) of image n on its n-th (non-blank) line.
    An ID outside 1-1000 would index the wnid list from its end or past it, so it is refused."""
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not (text := line.strip()):
            continue
        if not text.isdigit() or not 1 <= int(text) <= 1000:
            raise InputError(path, f"line {number}: {text!r} is not an ILSVRC2012_ID from 1 to 1000")
        ids.append(int(text))
    return ids


def _flat_devkit(data_dir: Path) -> EvalSet | None:
    dirs = _search_dirs(data_dir, ("", "data", "ILSVRC2012_devkit_t12/data"))
    truth = _find_file(dirs, GROUND_TRUTH)
    files = sorted(p for p in data_dir.iterdir() if _FLAT_NAME.match(p.name) and _is_image(p))
    if truth is None or not files:
        return None
    wnids = _devkit_wnids(dirs)
    if wnids is None:
        raise InputError(truth, f"found the ground truth but no devkit meta.mat or {WNIDS_BY_ID} (1000 wnids) beside it")
    ids = _ground_truth(truth)
    samples = []
    for path in files:
        number = int(_FLAT_NAME.match(path.name).group(1))
        if not 1 <= number <= len(ids):
            raise InputError(path, f"image number {number} is outside the {len(ids)} ground-truth lines")
        samples.append(Sample(path, wnids[ids[number - 1] - 1]))
    notes = {"labels_without_image": len(ids) - len(samples)}
    return EvalSet(samples, "ilsvrc-devkit", sorted(set(wnids)), notes)


def _loc_csv(data_dir: Path) -> EvalSet | None:
    solution = _find_file([data_dir, *list(data_dir.parents)[:4]], LOC_CSV)
    if solution is None:
        return None
    image_dir = next((d for d in (data_dir, data_dir / "ILSVRC/Data/CLS-LOC/val") if d.is_dir() and any(_is_image(p) for p in d.iterdir())), None)
    if image_dir is None:
        return None
    rows = _loc_solution(solution)
    files = sorted(p for p in image_dir.iterdir() if _is_image(p))
    samples = [Sample(p, rows[p.stem]) for p in files if p.stem in rows]
    if not samples:
        raise InputError(image_dir, f"none of its {len(files)} images is named in {solution} (ImageId + "
                                    "the image suffix, e.g. ILSVRC2012_val_00000001.JPEG); is this the val set?")
    notes = {"labels_without_image": len(rows) - len(samples), "images_without_label": len(files) - len(samples)}
    return EvalSet(samples, "loc-csv", sorted(set(rows.values())), notes)


def _loc_solution(path: Path) -> dict[str, str]:
    """Kaggle's solution file as {ImageId: wnid} (the first word of PredictionString)."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise InputError(path, f"its header is {reader.fieldnames}; expected the columns ImageId and PredictionString")
        rows = {}
        for row in reader:
            words = (row["PredictionString"] or "").split()
            if not words:
                raise InputError(path, f"line {reader.line_num}: no wnid in the PredictionString of {row['ImageId']!r}")
            rows[row["ImageId"]] = words[0]
    return rows


LAYOUTS: list[Callable[[Path], EvalSet | None]] = [_loc_csv, _flat_devkit, _class_folders]


def find_eval_set(data_dir: str | Path, limit: int | None = None) -> EvalSet:
    """Detect VAL_DIR's layout (module docstring) and list its samples in a fixed order.

    `limit` keeps an evenly strided subset of that many images (every class stays
    represented in a class-sorted listing). A folder matching no layout raises
    InputError naming the expected layouts.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(root, f"not a folder; {EXPECTED_LAYOUTS}")
    for layout in LAYOUTS:
        found = layout(root)
        if found is not None:
            if limit is not None and limit < len(found.samples):
                step = len(found.samples) / limit
                found.notes["subset_of"] = len(found.samples)
                found.samples = [found.samples[int((i + 0.5) * step)] for i in range(limit)]
            return found
    raise InputError(root, f"no images in a known layout; {EXPECTED_LAYOUTS}")


def _default_labels(id2label: dict[Any, str]) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def resolve_labels(eval_set: EvalSet, config: Any) -> LabelMap:
    """Choose how the set's class names map to the model's outputs (module docstring order)."""
    num_labels = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = {s.label for s in eval_set.samples}
    if id2label and not _default_labels(id2label) and names <= set(id2label.values()):
        return LabelMap("id2label", {v: k for k, v in id2label.items() if v in names})
    in1k = imagenet1k_wnids()
    if names <= set(in1k) and num_labels in (1000, 21843):
        target = {w: i for i, w in enumerate(in1k)}
        if num_labels == 1000:
            return LabelMap("imagenet-1k", target)
        return LabelMap("imagenet-21k→1k", target, list(in21k_to_in1k_indices()))
    folders = eval_set.class_names if eval_set.layout == "class-folders" else []
    if folders and id2label and not _default_labels(id2label):
        # a head whose classes have names: folder positions would mean other classes than the names say
        indices = [int(n) for n in folders if n.isdigit()]
        if len(indices) == len(folders) == len(set(indices)) and max(indices) < num_labels:
            return LabelMap("folder-index", {n: int(n) for n in folders})  # ImageNetV2's folders 0..999
        unmatched = sorted(names - set(id2label.values()))
        raise InputError(None, f"the model names its {num_labels} classes (config.json id2label) and {len(unmatched)} of "
                               f"the {len(names)} class folders match none of those names (e.g. "
                               f"{', '.join(map(repr, unmatched[:3]))}); name the folders by its labels, by ImageNet "
                               "wnids, or by class index")
    if folders and len(folders) <= num_labels:
        return LabelMap("sorted-folders", {n: i for i, n in enumerate(folders)})
    raise InputError(
        None,
        f"cannot map the {len(names)} class names of this {eval_set.layout} set onto the model's "
        f"{num_labels} outputs (need ImageNet wnids with a 1000- or 21843-way head, id2label names, "
        "or at most num_labels class folders)",
    )


# ---- decoding ----------------------------------------------------------------------------------


def open_rgb(path: Path) -> tuple[Image.Image, str | None]:
    """Open an image by content (a PNG named .JPEG is fine) as RGB; also say what was converted."""
    with Image.open(path) as image:
        image.load()  # truncated or corrupt data raises here
        note = None
        if image.format != "JPEG" or image.mode != "RGB":
            note = f"{image.format}/{image.mode}"
        return image.convert("RGB"), note


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a baseline/extended JPEG (SOF0/SOF1) from its header; None otherwise.

    The fast path sends only 3-component baseline JPEGs to a JPEG decoder of its own;
    grayscale, CMYK, progressive, PNG-named-JPEG and unparsable files are decoded by PIL.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1):
            return data[i + 9]
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None
        i += 2 + length
    return None


class PILDataset(Dataset):
    """Faithful path: PIL decode → RGB → the protocol's exact transform, in DataLoader workers.

    Items are (pixels, index, ok, note); a failed image gives zeros, ok=False and the error.
    """

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], transform: Callable, shape: tuple[int, ...]) -> None:
        self.samples, self.indices, self.transform, self.shape = samples, list(indices), transform, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, bool, str]:
        index = self.indices[item]
        try:
            image, note = open_rgb(self.samples[index].path)
            return self.transform(image), index, True, note or ""
        except Exception as error:  # any decode/transform failure is counted, never dropped
            return torch.zeros(self.shape), index, False, f"{type(error).__name__}: {error}"


class EncodedDataset(PILDataset):
    """Faithful path for a transform that decodes the file itself (`reads_bytes`: TensorFlow's decoder for
    big_vision's protocols, parity/eval_tf.py): file bytes → the transform, in DataLoader workers.

    Items are PILDataset's. The note is the file's "FORMAT/MODE" where it is not an RGB JPEG, as on the
    other paths. A file TensorFlow cannot decode (`Undecodable`: TIFF, PPM, a truncated JPEG) goes to PIL,
    which decides what is unreadable as on every path; one PIL reads is resized by TensorFlow and
    noted as decoded by PIL.
    """

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, bool, str]:
        from parity.eval_tf import Undecodable

        index = self.indices[item]
        path = self.samples[index].path
        try:
            data = path.read_bytes()
            try:
                return self.transform(data), index, True, format_note(data)
            except Undecodable:
                image, note = open_rgb(path)
                return self.transform(image), index, True, f"{note or 'JPEG/RGB'} decoded by PIL, not TensorFlow"
        except Exception as error:  # any decode/transform failure is counted, never dropped
            return torch.zeros(self.shape), index, False, f"{type(error).__name__}: {error}"


def format_note(data: bytes) -> str:
    """"FORMAT/MODE" of an encoded image from its header (as `open_rgb` notes it) unless it is an RGB
    JPEG, then ""; "unidentified by PIL" for a file PIL cannot identify."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return "" if (image.format, image.mode) == ("JPEG", "RGB") else f"{image.format}/{image.mode}"
    except OSError:  # PIL's UnidentifiedImageError is one
        return "unidentified by PIL"


class BytesDataset(Dataset):
    """Fast path: read file bytes in workers. Items are dicts.

    A 3-component baseline JPEG that ends in its EOI marker either stays bytes for a
    GPU decoder (`decode="gpu"` or `"nvimgcodec"`, see parity/eval_decode.py) or is
    decoded here by libjpeg-turbo through torchvision (`decode="cpu"`: the same pixels
    as PIL's decoder, bit for bit). Anything else (grayscale, CMYK, progressive,
    truncated, PNG named .JPEG, unparsable) is decoded here by PIL, which also decides
    what counts as unreadable, as on the faithful path.
    """

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], decode: str = "gpu") -> None:
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, not {decode!r}")
        self.samples, self.indices, self.decode = samples, list(indices), decode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self.indices[item]
        path = self.samples[index].path
        out: dict[str, Any] = {"index": index, "data": None, "image": None, "note": ""}
        try:
            data = path.read_bytes()
            if jpeg_components(data) != 3 or not data.endswith(b"\xff\xd9"):
                out["image"], out["note"] = pil_tensor(path)
            elif self.decode == "cpu":
                out["image"] = _libjpeg(data, path)
            else:
                out["data"] = data
        except Exception as error:
            out["note"] = f"{type(error).__name__}: {error}"
        return out


def _libjpeg(data: bytes, path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return pil_tensor(path)[0]  # PIL decides, with its own error for an unreadable file


def pil_tensor(path: Path) -> tuple[torch.Tensor, str]:
    """PIL-decode a file to a uint8 CHW RGB tensor (the fast path's fallback decoder)."""
    import numpy as np

    image, note = open_rgb(path)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous(), note or ""


def collate_packed(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pack a fast-path batch in the worker: all JPEG bytes and decoded pixels in ONE uint8 tensor.

    A DataLoader moves each tensor of a batch through its own shared-memory segment and
    the device copy is one transfer per tensor, so one packed tensor instead of one or
    two per image keeps both costs per batch. In a worker the tensor is made in shared
    memory at once, so each byte is copied once, not again on its way to the main
    process. Keys: index (long), packed (uint8), spans (per image: start, end and, for
    decoded pixels, their C, H, W shape; an empty span when the image has neither),
    kinds ("jpeg", "pixels" or "" per image) and notes.
    """
    parts, spans, kinds, end = [], [], [], 0
    for it in items:
        if it["data"] is not None:
            part, shape, kind = torch.frombuffer(bytearray(it["data"]), dtype=torch.uint8), (), "jpeg"
        elif it["image"] is not None:
            part, shape, kind = it["image"].reshape(-1), tuple(it["image"].shape), "pixels"
        else:
            part, shape, kind = None, (), ""
        size = 0 if part is None else part.numel()
        parts.append(part)
        spans.append((end, end + size, shape))
        kinds.append(kind)
        end += size
    packed = _packed_buffer(end)
    for part, (a, b, _) in zip(parts, spans):
        if part is not None:
            packed[a:b] = part
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "packed": packed,
        "spans": spans,
        "kinds": kinds,
        "notes": [it["note"] for it in items],
    }


def _packed_buffer(nbytes: int) -> torch.Tensor:
    """An empty uint8 tensor of `nbytes`: in shared memory inside a DataLoader worker, as the
    DataLoader's own collate does, since sending it to the main process would copy it there."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def unpack(batch: dict[str, Any], packed: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Per image of a `collate_packed` batch: its JPEG bytes (1-D) or its C, H, W pixels, as views
    of `packed` (the batch's own by default, or a copy of it on another device); None for neither."""
    packed = batch["packed"] if packed is None else packed
    return [None if not kind else packed[a:b] if kind == "jpeg" else packed[a:b].view(shape)
            for (a, b, shape), kind in zip(batch["spans"], batch["kinds"])]

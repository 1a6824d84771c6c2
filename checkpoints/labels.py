"""ImageNet class lists for classifier heads, read from the files timm ships.

- 1000 classes: ILSVRC-2012 in the standard order (the sorted WordNet ids,
  index 0 = n01440764 "tench, Tinca tinca"), as BiT-S, the `-ILSVRC2012` files
  and the data2vec fine-tuned heads use.
- 21843 classes: Google's ImageNet-21k order used by the BiT-M upstream heads
  (timm `imagenet21k_goog_synsets.txt`, the same list as BiT's
  `imagenet21k_wordnet_ids.txt`).

Label text is the WordNet lemma list (`"tench, Tinca tinca"`), as in the
transformers ImageNet configs.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

_SUBSETS = {1000: "imagenet-1k", 21843: "imagenet-21k-goog"}
# timm's class files (timm/data/imagenet_info.py reads the same ones), by subset.
_SYNSET_FILES = {1000: "imagenet_synsets.txt", 21843: "imagenet21k_goog_synsets.txt"}
_LEMMA_FILE = "imagenet_synset_to_lemma.txt"


class _ImageNetLists:
    """The WordNet ids of one subset and their lemma descriptions, as timm's `ImageNetInfo` gives them."""

    def __init__(self, num_classes: int) -> None:
        folder = _timm_info_folder()
        self._synsets = (folder / _SYNSET_FILES[num_classes]).read_text("utf-8").splitlines()
        lemmas = (folder / _LEMMA_FILE).read_text("utf-8").splitlines()
        self._lemmas = dict(csv.reader(lemmas, delimiter="\t"))

    def label_names(self) -> list[str]:
        return self._synsets

    def label_descriptions(self) -> list[str]:
        return [self._lemmas[s] for s in self._synsets]


def _timm_info_folder() -> Path:
    """timm's `data/_info` folder, found without importing timm (importing it pulls in torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the ImageNet class lists come from timm, which is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"


@functools.cache
def _info(num_classes: int) -> _ImageNetLists:
    return _ImageNetLists(num_classes)


def imagenet_id2label(num_classes: int) -> dict[int, str] | None:
    """Return `{index: lemmas}` for a 1000- or 21843-way ImageNet head, else None.

    1000 gives ILSVRC-2012 in class-index order, 21843 Google's ImageNet-21k
    order (BiT-M). For any other width the caller names classes `LABEL_i`.
    """
    if num_classes not in _SUBSETS:
        return None
    return dict(enumerate(_info(num_classes).label_descriptions()))


def imagenet1k_wnids() -> list[str]:
    """Return the 1000 ILSVRC-2012 WordNet ids in class-index order (sorted ids)."""
    return list(_info(1000).label_names())


def imagenet21k_wnids() -> list[str]:
    """Return the 21843 WordNet ids of Google's ImageNet-21k head order (BiT-M upstream)."""
    return list(_info(21843).label_names())


# ILSVRC-2012 classes absent from Google's ImageNet-21k list: "teddy, teddy bear" is in
# neither fall11 nor the 21843-class list (timm PR #2145, FocalNet issue #27).
IN1K_MISSING_FROM_IN21K = ("n04399382",)


@functools.cache
def _in21k_to_in1k() -> np.ndarray:
    position = {wnid: i for i, wnid in enumerate(imagenet21k_wnids())}
    indices = np.array([position.get(w, -1) for w in imagenet1k_wnids()], dtype=np.int64)
    indices.setflags(write=False)
    return indices


def in21k_to_in1k_indices() -> np.ndarray:
    """Return, for each ImageNet-1k class in order, its index in the 21843-way list, or -1.

    The array is int64, shape (1000,), read-only. One class has no 21k
    counterpart (`IN1K_MISSING_FROM_IN21K`, index 850 "teddy bear") and maps to
    -1; plain fancy indexing would silently read the last 21k logit there, so
    score heads with `in21k_logits_to_in1k`.
    """
    return _in21k_to_in1k()


def in21k_logits_to_in1k(logits: Any) -> Any:
    """Select the 1000 ILSVRC-2012 columns of 21843-way logits (numpy array or torch tensor).

    Classes missing from the 21k list get -inf, so they are never predicted:
    the honest score of a 21k head on ImageNet-1k.
    """
    indices = _in21k_to_in1k()
    missing = np.flatnonzero(indices < 0)
    selected = logits[..., np.where(indices < 0, 0, indices)]
    selected[..., missing] = float("-inf")
    return selected

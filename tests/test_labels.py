"""ImageNet label lists: lengths, known entries and the 21k -> 1k index map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints.labels import (
    IN1K_MISSING_FROM_IN21K,
    imagenet1k_wnids,
    imagenet21k_wnids,
    imagenet_id2label,
    in21k_logits_to_in1k,
    in21k_to_in1k_indices,
)


def test_imagenet1k_labels() -> None:
    labels = imagenet_id2label(1000)
    assert len(labels) == 1000 and list(labels) == list(range(1000))
    assert labels[0] == "tench, Tinca tinca"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    wnids = imagenet1k_wnids()
    assert wnids[0] == "n01440764" and wnids == sorted(wnids) and len(set(wnids)) == 1000


def test_imagenet21k_google_order() -> None:
    labels = imagenet_id2label(21843)
    wnids = imagenet21k_wnids()
    assert len(labels) == len(wnids) == len(set(wnids)) == 21843
    assert wnids[0] == "n00004475" and labels[0] == "organism, being"
    # Google's list has the two classes fall11 lacks (big_transfer#18).
    assert {"n03931044", "n09859684"} <= set(wnids)


@pytest.mark.parametrize("num_classes", [10, 21841, 11221, 0])
def test_other_widths_have_no_labels(num_classes: int) -> None:
    assert imagenet_id2label(num_classes) is None


def test_in21k_to_in1k_indices() -> None:
    indices = in21k_to_in1k_indices()
    assert indices.shape == (1000,) and indices.dtype == np.int64 and not indices.flags.writeable
    wnids1k, wnids21k = imagenet1k_wnids(), imagenet21k_wnids()
    valid = indices >= 0
    assert valid.sum() == 999 and len(set(indices[valid].tolist())) == 999 and indices.max() < 21843
    assert all(wnids21k[j] == wnids1k[i] for i, j in enumerate(indices) if j >= 0)
    # "teddy, teddy bear" is in ILSVRC-2012 but not in ImageNet-21k: it is the one -1.
    assert IN1K_MISSING_FROM_IN21K == ("n04399382",)
    assert np.flatnonzero(~valid).tolist() == [wnids1k.index("n04399382")] == [850]


@pytest.mark.parametrize("as_torch", [False, True])
def test_in21k_logits_to_in1k(as_torch: bool) -> None:
    logits = np.random.default_rng(0).standard_normal((2, 21843)).astype(np.float32)
    out = in21k_logits_to_in1k(torch.from_numpy(logits) if as_torch else logits)
    out = out.numpy() if as_torch else out
    indices = in21k_to_in1k_indices()
    assert out.shape == (2, 1000) and np.all(np.isneginf(out[:, 850]))
    keep = indices >= 0
    np.testing.assert_array_equal(out[:, keep], logits[:, indices[keep]])

"""BiT parity sides: Flax on the original arrays (source), transformers (target), timm (npz) or
the TF2 reference (h5) as peer.

Taps, in forward order: `stem` (after the zero-padded max-pool), `block{b}.unit{u:02d}`,
`norm` (ReLU(GN) before pooling), `pre_logits` (N, C), `logits`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from converters.families.bit import spec_from_arrays, tap_modules, tap_names
from converters.tensors import Checkpoint
from parity.capture import capture
from parity.engine import Side

MEAN = STD = (0.5, 0.5, 0.5)  # BiT pixels are in [-1, 1]


def _nchw(taps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).transpose(0, 3, 1, 2) if np.ndim(v) == 4 else np.asarray(v)
            for k, v in taps.items()}


def flax_source(arrays: Mapping[str, np.ndarray]) -> Side:
    """The original-semantics JAX/Flax model straight on the original npz names."""
    import jax

    from reference.bit_flax import from_npz

    model, params = from_npz(arrays)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])
    order = tap_names(model.config)  # jit returns dicts with sorted keys: restore forward order

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        taps = apply(params, x.transpose(0, 2, 3, 1))
        return _nchw({k: taps[k] for k in order})

    return Side("flax reference (original arrays)", "source", run)


def tf_peer(checkpoint: Checkpoint, arrays: Mapping[str, np.ndarray]) -> Side:
    """The TF2 reference (tensorflow extra) filled by POSITION from the `.h5`, as Keras loads it.

    Its weight order is its own (reference/bit_tf.py), so this checks the
    converter's positional naming of the file independently; `arrays` (npz
    names) only give the variant, and every shape is checked on assignment.
    """
    from reference import bit_tf

    model = bit_tf.BiTTF(spec_from_arrays(arrays))
    model.assign_keras_order([checkpoint.tensors[f"{layer}/{weight}"].load()
                              for layer, weights in checkpoint.meta["order"] for weight in weights])

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return _nchw({k: v.numpy() for k, v in model(x.transpose(0, 2, 3, 1))[1].items()})

    return Side("tensorflow reference (h5 weights by position)", "peer", run)


def torch_side(model: torch.nn.Module, taps: dict[str, str], name: str, role: str) -> Side:
    """A PyTorch model read through hooks; `pre_logits` is flattened to (N, C)."""
    model = model.float().eval()
    post = {"pre_logits": lambda t: t.flatten(1)}
    return Side(name, role, lambda x: capture(model, taps, lambda: model(torch.from_numpy(x)), post))


def transformers_target(folder: Path) -> Side:
    """The converted folder as users load it, computed in float32."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
    return torch_side(model, tap_modules("transformers", model.config.depths),
                      "transformers BitForImageClassification", "target")


def timm_peer(npz_path: Path, depths: tuple[int, ...], root_width: int,
              hidden_sizes: tuple[int, ...], num_classes: int) -> Side:
    """timm's ResNetV2, filled by timm's OWN npz loader from the original file."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    model = ResNetV2(layers=list(depths), channels=tuple(hidden_sizes), stem_chs=root_width,
                     num_classes=num_classes, stem_type="fixed",
                     conv_layer=partial(StdConv2d, eps=1e-8),  # timm's BiT models use 1e-8
                     norm_layer=partial(GroupNormAct, num_groups=32))
    model.load_pretrained(str(npz_path))
    return torch_side(model, tap_modules("timm", depths), "timm ResNetV2 (timm's npz loader)", "peer")

"""What every family converter returns, and the pieces they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from converters.display import shown_list
from converters.errors import InputError
from converters.tensors import Checkpoint, LazyTensor


@dataclass
class Conversion:
    """A converted checkpoint, still lazy: nothing has been read or written yet.

    `tensors` are in the TARGET names and layout; `config` and `preprocessor`
    are the JSON dicts of the output folder; `dropped` maps each source key that
    was deliberately not converted to the reason; `notes` are the residual
    differences and format observations the report must state; `extra_files`
    are further files of the folder (name → bytes), e.g. custom model code.
    """

    family: str
    variant: str
    tensors: dict[str, LazyTensor]
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)


def expected_shapes(model_class: type, config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `model_class(config)`, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


Detector = Callable[[Checkpoint], bool]
Converter = Callable[[Checkpoint], Conversion]


def detect_family(checkpoint: Checkpoint, detectors: Mapping[str, Detector]) -> str:
    """The one family whose detector accepts `checkpoint`, or an InputError saying none did."""
    found = [name for name, accepts in detectors.items() if accepts(checkpoint)]
    if len(found) != 1:
        sample = shown_list(checkpoint.tensors, 4) or "no tensors"
        raise InputError(checkpoint.path, f"not a BiT or data2vec-vision checkpoint "
                                          f"({checkpoint.format}; first keys: {sample})")
    return found[0]

"""Per family: build the parity sides for a converted folder and run them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from converters import bit
from converters.family import Conversion
from converters.tensors import Checkpoint
from parity import bit as bit_sides
from parity.data2vec import data2vec1_parity, data2vec2_parity
from parity.capture import strict_numerics
from parity.engine import ParityReport, Side, run_parity
from parity.inputs import standard_inputs

BIT_SIZES = ((224, 224), (161, 193))  # an even AND an odd size: TF-SAME bugs hide at odd sizes


def bit_parity(checkpoint: Checkpoint, conversion: Conversion, folder: Path, dtype: str,
               sizes: Sequence[tuple[int, int]] = BIT_SIZES) -> ParityReport:
    """Flax on the original arrays vs the converted folder in transformers; timm or TF as peers."""
    strict_numerics()
    arrays = bit.source_arrays(checkpoint)
    others: list[tuple[Side, str]] = [(bit_sides.transformers_target(folder), dtype)]
    notes = list(conversion.notes)
    peer = _peer(checkpoint, conversion, arrays, notes)
    if peer is not None:
        others.append((peer, "float32"))
    inputs = standard_inputs(sizes, bit_sides.MEAN, bit_sides.STD)
    report = run_parity(bit_sides.flax_source(arrays), others, inputs,
                        family="bit", variant=conversion.variant)
    report.notes = notes
    return report


def _peer(checkpoint: Checkpoint, conversion: Conversion, arrays, notes: list[str]) -> Side | None:
    """timm through its own loader for npz files; the TF2 reference for h5 when TF is installed."""
    cfg = conversion.config
    try:
        if checkpoint.format == "npz":
            return bit_sides.timm_peer(checkpoint.path, tuple(cfg["depths"]), cfg["embedding_size"],
                                       tuple(cfg["hidden_sizes"]), len(cfg["id2label"]))
        return bit_sides.tf_source(arrays)
    except Exception as e:  # a peer is evidence, not a requirement: say why it is absent
        notes.append(f"peer not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


PARITY: dict[str, Callable[..., ParityReport]] = {"bit": bit_parity, "data2vec1": data2vec1_parity,
                                                  "data2vec2": data2vec2_parity}

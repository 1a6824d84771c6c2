"""Stand-ins for catalog files that cannot be downloaded: the exact original layout, random values.

They let the whole pipeline (read → convert → write → parity) run offline; every
message and report that uses one says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from checkpoints.catalog import Entry
from converters.errors import InputError


def _bit(entry: Entry, path: Path) -> None:
    from checkpoints.synthetic import DEPTHS, bit_arrays, write_bit_npz

    m = re.search(r"R(\d+)x(\d+)", entry.name)
    if m is None or entry.classes is None:
        raise InputError(None, f"cannot synthesise {entry.name}: unknown architecture")
    depth, width = int(m.group(1)), int(m.group(2))
    write_bit_npz(path, bit_arrays(DEPTHS[depth], width, entry.classes, seed=0))


WRITERS: dict[str, Callable[[Entry, Path], None]] = {"bit": _bit}


def synthetic_stand_in(entry: Entry, folder: Path) -> Path:
    """Write (once) a synthetic file in `entry`'s exact original layout under `folder`."""
    writer = WRITERS.get(entry.family)
    if writer is None or entry.format not in ("npz", "pth", "pt"):
        raise InputError(None, f"no synthetic stand-in for {entry.name} ({entry.family}, {entry.format})")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry.name}.synthetic.{entry.format}"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        writer(entry, partial)
        partial.replace(path)
    return path

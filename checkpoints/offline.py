"""Stand-ins for catalog files that cannot be downloaded: the exact original layout, random values.

They let the whole pipeline (read → convert → write → parity) run offline; every
message and report that uses one says so.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
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


# Catalog arch → reference variant name (data2vec entries).
D2V_VARIANTS = {"ViT-B/16": "base", "ViT-L/16": "large", "ViT-H/14": "huge"}


def _d2v_variant(entry: Entry) -> str:
    if entry.arch not in D2V_VARIANTS:
        raise InputError(None, f"cannot synthesise {entry.name}: unknown architecture {entry.arch!r}")
    return D2V_VARIANTS[entry.arch]


def _data2vec1(entry: Entry, path: Path) -> None:
    """Fine-tuned: a DeepSpeed file with per-layer tables (the likely release layout); pretrained: the
    .pth of beit/utils.py::save_model with the shared table."""
    from checkpoints import synthetic_data2vec as synth
    from reference.data2vec1_torch import config_for

    finetuned = entry.classes is not None
    config = config_for(_d2v_variant(entry), num_classes=entry.classes or 0)
    sd = synth.d2v1_state_dict(config, seed=0, shared_rel_pos=not finetuned, finetuned=finetuned)
    (synth.write_d2v1_deepspeed if finetuned else synth.write_d2v1_pretrained)(path, sd)


def _data2vec2(entry: Entry, path: Path) -> None:
    """A fairseq checkpoint (`*_ft.pt` when the entry has classes) with its plain-dict cfg."""
    from checkpoints import synthetic_data2vec as synth
    from reference.data2vec2_torch import config_for

    finetuned = entry.classes is not None
    config = config_for(_d2v_variant(entry), num_classes=entry.classes or 0)
    synth.write_d2v2_fairseq(path, synth.d2v2_state_dict(config, seed=0, finetuned=finetuned),
                             synth.d2v2_cfg(config, finetuned=finetuned))


WRITERS: dict[str, Callable[[Entry, Path], None]] = {"bit": _bit, "data2vec1": _data2vec1,
                                                     "data2vec2": _data2vec2}


STAND_IN_MARK = ".synthetic."  # in every stand-in's file name, NAME.synthetic.npz: it marks the weights as random
# ...and its zip archive's comment (npz and torch files are zip archives; every loader ignores the
# comment), which the file keeps under any name it is copied or renamed to.
STAND_IN_COMMENT = b"parityport synthetic stand-in: random values in the original layout, not published weights"


def names_stand_in(name: str) -> bool:
    """Whether a file name is a stand-in's (`NAME.synthetic.EXT`); a name only, no file is read."""
    return STAND_IN_MARK in Path(name).name


def is_stand_in(path: str | Path) -> bool:
    """Whether the file at `path` is a synthetic stand-in written by `synthetic_stand_in`: by its
    name, or, under any name, by the comment its archive ends with. Only a regular file is read,
    and only its last bytes (a device such as /dev/zero has no end to read to)."""
    if names_stand_in(str(path)):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since does not block
    except OSError:  # missing or unreadable
        return False
    try:
        st = os.fstat(fd)
        tail = len(STAND_IN_COMMENT)
        regular = stat.S_ISREG(st.st_mode) and st.st_size >= tail
        return regular and os.pread(fd, tail, st.st_size - tail) == STAND_IN_COMMENT
    finally:
        os.close(fd)


def _mark(path: Path) -> None:
    """End the archive at `path` with `STAND_IN_COMMENT` (rewrites only its central directory)."""
    with zipfile.ZipFile(path, "a") as archive:
        archive.comment = STAND_IN_COMMENT


def synthetic_stand_in(entry: Entry, folder: Path) -> Path:
    """Write (once) a synthetic file in `entry`'s exact original layout under `folder`, marked as one."""
    writer = WRITERS.get(entry.family)
    if writer is None or entry.format not in ("npz", "pth", "pt"):
        raise InputError(None, f"no synthetic stand-in for {entry.name} ({entry.family}, {entry.format})")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry.name}{STAND_IN_MARK}{entry.format}"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        writer(entry, partial)
        _mark(partial)
        partial.replace(path)
    return path

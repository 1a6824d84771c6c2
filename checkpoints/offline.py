"""Stand-ins for catalog files that cannot be downloaded: the exact original layout, random values.

They let the whole pipeline (read → convert → write → parity) run offline; every
message and report that uses one says so. Each is written once into the download
cache's `synthetic/` folder and reused by later runs.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from checkpoints.catalog import Entry
from converters.errors import InputError


def _bit_layout(entry: Entry) -> tuple[tuple[int, ...], int]:
    """The units per block and the width factor of a BiT entry's arch (`R50x1`), or InputError."""
    from checkpoints.synthetic import DEPTHS

    m = re.fullmatch(r"R(\d+)x(\d+)", entry.arch)
    if m is None or int(m.group(1)) not in DEPTHS or entry.classes is None:
        raise InputError(None, _no_stand_in(entry, f"unknown architecture {entry.arch!r}"))
    return DEPTHS[int(m.group(1))], int(m.group(2))


def _bit(entry: Entry, path: Path) -> None:
    """The npz of the bit_models bucket, or the TF2 Keras `save_weights` file of its `.h5` twin."""
    from checkpoints.synthetic import bit_arrays, write_bit_h5, write_bit_npz

    depths, width = _bit_layout(entry)
    arrays = bit_arrays(depths, width, entry.classes, seed=0)
    (write_bit_h5 if entry.format == "h5" else write_bit_npz)(path, arrays)


# Catalog arch → reference variant name (data2vec entries).
D2V_VARIANTS = {"ViT-B/16": "base", "ViT-L/16": "large", "ViT-H/14": "huge"}


def _d2v_variant(entry: Entry) -> str:
    if entry.arch not in D2V_VARIANTS:
        raise InputError(None, _no_stand_in(entry, f"unknown architecture {entry.arch!r}"))
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
# What each family's writer writes, by catalog format; each check raises InputError before anything is written.
LAYOUTS: dict[str, dict[str, Callable[[Entry], object]]] = {
    "bit": {"npz": _bit_layout, "h5": _bit_layout},
    "data2vec1": {"pth": _d2v_variant, "pt": _d2v_variant},
    "data2vec2": {"pt": _d2v_variant},
}


STAND_IN_MARK = ".synthetic."  # in every stand-in's file name, NAME.synthetic.npz: it marks the weights as random
# ...and its last bytes (npz and torch files are zip archives, ended by the archive's comment; an HDF5
# file is followed by them; every loader ignores both), which it keeps under any name it is given.
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
    """End the file at `path` with `STAND_IN_COMMENT`: as its zip archive's comment (rewriting only
    the central directory), or appended to any other file (HDF5 reads nothing past its own end)."""
    if not zipfile.is_zipfile(path):
        with open(path, "ab") as f:
            f.write(STAND_IN_COMMENT)
        return
    with zipfile.ZipFile(path, "a") as archive:
        archive.comment = STAND_IN_COMMENT


def _no_stand_in(entry: Entry, why: str) -> str:
    return f"no synthetic stand-in for {entry.name} ({entry.family}, {entry.format}): {why}"


@dataclass(frozen=True)
class StandIn:
    """The synthetic stand-in of one catalog entry: where it lives and what writes it.

    `path` is `<cache>/synthetic/NAME.synthetic.EXT` (the download cache's root,
    `checkpoints.download.cache_dir`); nothing is written until `write`.
    """

    entry: Entry
    path: Path

    @property
    def exists(self) -> bool:
        """Whether a complete stand-in is already there (a partial one never has the final name)."""
        return self.path.is_file()

    def write(self) -> Path:
        """Write the stand-in once, through a temporary name renamed into place, and return its path.

        An existing complete file is reused. On any failure (an interrupt included)
        the temporary file, and any folder this call made, are removed; a
        temporary file left by a killed run is removed by the next one.
        """
        from checkpoints.download import make_folders, remove_empty
        from converters.export import fsync_path

        if self.exists:
            return self.path
        made = make_folders(self.path.parent)
        _remove_abandoned(self.path)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            WRITERS[self.entry.family](self.entry, partial)
            _mark(partial)
            fsync_path(partial)
            os.replace(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            remove_empty(made)
            raise
        return self.path


def stand_in_folder() -> Path:
    """Where stand-ins are kept: `synthetic/` in the download cache (`$PARITYPORT_CACHE` or its default)."""
    from checkpoints.download import cache_dir

    return cache_dir() / "synthetic"


def stand_in(entry: Entry, folder: Path | None = None) -> StandIn:
    """The stand-in of `entry` (in `folder`, default `stand_in_folder()`), checked but not written.

    Raises `InputError` with one line saying what to do instead for an entry
    that has none: a trained fixture (the command that trains it), a file the
    catalog marks broken (its reason), an architecture or format no writer knows.
    """
    from checkpoints.download import broken_message, fixture_message

    if entry.kind == "fixture":
        raise InputError(None, fixture_message(entry))
    if entry.broken:
        raise InputError(None, broken_message(entry))
    check = LAYOUTS.get(entry.family, {}).get(entry.format)
    if check is None or entry.family not in WRITERS:
        raise InputError(None, _no_stand_in(entry, "no writer for this layout"))
    check(entry)
    stem = entry.filename.removesuffix("." + entry.format)  # BiT-S-R50x1.h5 -> BiT-S-R50x1.synthetic.h5
    return StandIn(entry, (folder or stand_in_folder()) / f"{stem}{STAND_IN_MARK}{entry.format}")


def synthetic_stand_in(entry: Entry, folder: Path | None = None) -> Path:
    """Write (once) a synthetic file in `entry`'s exact original layout, marked as one; see `StandIn`."""
    return stand_in(entry, folder).write()


def _remove_abandoned(path: Path) -> None:
    """Remove the temporary files of `path` whose writing process is gone (a killed run's)."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = partial.name[len(path.name) + 2:-len(".partial")]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

"""Attack files aimed at how the source is opened: special files in its place, and the regular files
whose reading the same code decides (a stand-in's mark, an HDF5 user block).

`SEEDS` maps a name to a function that writes the attack into a folder and returns its path; the
targeted fuzz corpus (tests/test_fuzz_attacks.py) mutates the regular ones and runs the others as
they are. Every one must be refused with exit 2 and one line, or read cleanly, quickly.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from checkpoints.offline import STAND_IN_COMMENT


def fifo(folder: Path) -> Path:
    """A named pipe: opening it for reading blocks until a writer comes, and none does."""
    os.mkfifo(folder / "pipe.npz")
    return folder / "pipe.npz"


def link_to_dev_zero(folder: Path) -> Path:
    """A symbolic link to a character device without end: read to its end, it fills memory."""
    (folder / "zero.pt").symlink_to("/dev/zero")
    return folder / "zero.pt"


def link_to_dev_null(folder: Path) -> Path:
    """A character device that reads as empty."""
    (folder / "null.npz").symlink_to("/dev/null")
    return folder / "null.npz"


def directory(folder: Path) -> Path:
    """A folder named like a checkpoint."""
    (folder / "folder.pth").mkdir()
    return folder / "folder.pth"


def socket_file(folder: Path) -> Path:
    """A unix socket's file (made without a listener: mknod of a socket needs no privilege)."""
    os.mknod(folder / "socket.h5", stat.S_IFSOCK | 0o600)
    return folder / "socket.h5"


def dangling_link(folder: Path) -> Path:
    """A link to nothing."""
    (folder / "gone.npz").symlink_to(folder / "never-written.npz")
    return folder / "gone.npz"


def link_chain_to_fifo(folder: Path) -> Path:
    """Two links, then a named pipe: what the links lead to is what counts."""
    os.mkfifo(folder / "deep-pipe")
    (folder / "middle").symlink_to("deep-pipe")
    (folder / "chain.pt").symlink_to("middle")
    return folder / "chain.pt"


def stand_in_marked_npz(folder: Path) -> Path:
    """A small npz whose archive comment is the stand-in mark, which is read from the file's tail."""
    stream = io.BytesIO()
    np.savez(stream, a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(2, np.float16))
    path = folder / "marked.npz"
    path.write_bytes(stream.getvalue())
    with zipfile.ZipFile(path, "a") as archive:
        archive.comment = STAND_IN_COMMENT
    return path


def stand_in_marked_torch(folder: Path) -> Path:
    """A small torch zip checkpoint ending with the stand-in mark."""
    import torch

    path = folder / "marked.pt"
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(2).half()}}, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.comment = STAND_IN_COMMENT
    return path


def h5_after_a_user_block(folder: Path) -> Path:
    """A Keras-layout h5 whose superblock sits after a 512-byte user block, where detection looks."""
    path = folder / "user-block.h5"
    with h5py.File(path, "w", userblock_size=512) as h5:
        h5.attrs["layer_names"] = np.array([b"d"])
        group = h5.create_group("d")
        group.attrs["weight_names"] = np.array([b"d/kernel:0"])
        group["d/kernel:0"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    return path


# name -> writer; the first seven are not regular files (nothing to mutate: they run as they are)
SEEDS: dict[str, Callable[[Path], Path]] = {
    "fifo": fifo, "link_to_dev_zero": link_to_dev_zero, "link_to_dev_null": link_to_dev_null,
    "directory": directory, "socket": socket_file, "dangling_link": dangling_link,
    "link_chain_to_fifo": link_chain_to_fifo,
    "stand_in_marked_npz": stand_in_marked_npz, "stand_in_marked_torch": stand_in_marked_torch,
    "h5_after_a_user_block": h5_after_a_user_block,
}

# what each special file is refused as (the stable part of the message)
SPECIAL_KINDS = {
    "fifo": "is a named pipe (FIFO), not a regular file; refused",
    "link_to_dev_zero": "is a symbolic link to '/dev/zero', a character device, not a regular file; refused",
    "link_to_dev_null": "is a symbolic link to '/dev/null', a character device, not a regular file; refused",
    "directory": "is a directory, not a regular file; refused",
    "socket": "is a socket, not a regular file; refused",
    "dangling_link": "is a symbolic link to '{folder}/never-written.npz', which does not exist",
    "link_chain_to_fifo": ("is a symbolic link to '{folder}/deep-pipe', a named pipe (FIFO), "
                           "not a regular file; refused"),
}

"""Files whose names try to write onto the user's terminal: a newline and a forged success line,
ESC sequences that set the window title, clear the line and move the cursor, bidi overrides and
isolates, and names long enough to flood the screen.

`SEEDS` maps an attack's name to a function that writes its file into a folder and returns the
file's path; every file is small (the longest, 1.5 MB, holds the long key).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

# A forged line after a newline; the window title set (OSC 0, ended by BEL); the line cleared and the
# cursor moved up over the real message; then a right-to-left override and isolates.
INJECTION = ("\n parityport: wrote out (parity passed)\x1b]0;pwned\x07\x1b[2K\x1b[1A\r"
             "\u202eevil\u2066\u2067\u2068\u2069\u200f")
LONG_KEY_CHARS = 1_500_000
# The longest member name a zip archive can hold (its length field has 16 bits).
LONG_MEMBER_CHARS = 65_535 - len(".npy")


def _npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def _npz(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(f"{name}.npy", _npy(np.ones(4, np.float32)))
    return path


def npz_member_name(folder: Path) -> Path:
    """An npz whose only array's member name carries the injection."""
    return _npz(folder / "member.npz", [f"w{INJECTION}"])


def npz_long_member_name(folder: Path) -> Path:
    """An npz whose member name is as long as a zip allows."""
    return _npz(folder / "long_member.npz", ["k" * LONG_MEMBER_CHARS])


def npz_bit_with_hostile_extra(folder: Path) -> Path:
    """A well-formed tiny BiT npz plus one array whose name carries the injection: the rules step
    names it as the key no rule converts."""
    from checkpoints.synthetic import TINY_BIT, bit_arrays

    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays[f"resnet/{INJECTION}"] = np.ones(4, np.float32)
    path = folder / "bit_extra.npz"
    np.savez(path, **arrays)
    return path


def torch_dict_key(folder: Path) -> Path:
    """A torch .pt whose state-dict key carries the injection."""
    import torch

    path = folder / "key.pt"
    torch.save({f"w{INJECTION}": torch.ones(2)}, path)
    return path


def torch_long_key(folder: Path) -> Path:
    """A torch .pt whose only key is 1.5 million characters long."""
    import torch

    path = folder / "long_key.pt"
    torch.save({"k" * LONG_KEY_CHARS: torch.ones(2)}, path)
    return path


def h5_external_link_target(folder: Path) -> Path:
    """A Keras h5 whose weight is an external link: the refusal names the link's target file and
    path, both carrying the injection."""
    import h5py

    path = folder / "link.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"layer"], dtype="S")  # fixed-length, as Keras writes
        layer = f.create_group("layer")
        layer.attrs["weight_names"] = np.array([b"layer/kernel:0"], dtype="S")
        layer["layer/kernel:0"] = h5py.ExternalLink(f"/tmp/{INJECTION}.h5", f"/{INJECTION}")
    return path


def h5_layer_name(folder: Path) -> Path:
    """A Keras h5 whose layer name (and so the weight it misses) carries the injection and is
    60,000 characters long."""
    import h5py

    path = folder / "layer.h5"
    name = f"w{INJECTION}" + "k" * 60_000
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode()], dtype="S")  # fixed-length, as Keras writes
        f.create_group(name).attrs["weight_names"] = np.array([f"{name}/kernel:0".encode()], dtype="S")
    return path


def path_control_chars(folder: Path) -> Path:
    """An npz of no known family, saved under a file name that carries the injection."""
    return _npz(folder / f"src{INJECTION}.npz", ["w"])


SEEDS: dict[str, Callable[[Path], Path]] = {
    "npz_member_name": npz_member_name,
    "npz_long_member_name": npz_long_member_name,
    "npz_bit_with_hostile_extra": npz_bit_with_hostile_extra,
    "torch_dict_key": torch_dict_key,
    "torch_long_key": torch_long_key,
    "h5_external_link_target": h5_external_link_target,
    "h5_layer_name": h5_layer_name,
    "path_control_chars": path_control_chars,
}

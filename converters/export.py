"""The output folder: staged beside the destination, renamed into place only when complete.

A folder at the destination therefore always is a finished conversion; an
interrupted or failed run leaves at most a `.NAME.partial-*` folder (removed
when the run fails cleanly, ignored and swept by the next run otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from safetensors import safe_open

from converters import __version__
from converters.errors import InputError
from converters.family import Conversion
from converters.tensors import Checkpoint
from converters.writer import check_sha256sums, sha256_file, write_safetensors

MODEL_FILE = "model.safetensors"


def check_destination(source: Path, dest: Path) -> None:
    """Refuse an output that is the input, contains it, or lies inside it."""
    src = source.resolve()
    out = dest.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise InputError(dest, f"the output folder may not be, contain or be inside the input {source}")
    if dest.exists() and not dest.is_dir():
        raise InputError(dest, "exists and is not a folder")


def up_to_date(dest: Path, source_sha256: str) -> bool:
    """True when `dest` is a verified conversion of this exact source by this converter version."""
    if not (dest / "SHA256SUMS").is_file() or check_sha256sums(dest):
        return False
    try:
        parity = json.loads((dest / "parity.json").read_text())
        with safe_open(dest / MODEL_FILE, framework="numpy") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError):
        return False
    return (parity.get("passed") is True and meta.get("source_sha256") == source_sha256
            and meta.get("converter_version") == __version__)


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest`; removed if the block raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit(tmp: Path, dest: Path) -> None:
    """Move the finished `tmp` to `dest`, replacing an old folder only after the new one is whole."""
    _fsync_dir(tmp)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model(tmp: Path, conversion: Conversion, checkpoint: Checkpoint, source_sha256: str,
                dtype: str, allow_nonfinite: bool = False,
                on_tensor: Callable[[str, int], None] | None = None) -> None:
    """Write model.safetensors (with provenance metadata), config.json, preprocessor_config.json."""
    metadata = {"format": "pt", "source_file": checkpoint.path.name, "source_format": checkpoint.format,
                "source_sha256": source_sha256, "converter": "parityport",
                "converter_version": __version__, "family": conversion.family,
                "variant": conversion.variant}
    try:
        write_safetensors(tmp / MODEL_FILE, conversion.tensors, dtype=dtype, metadata=metadata,
                          on_tensor=on_tensor, allow_nonfinite=allow_nonfinite)
    except InputError as e:
        raise InputError(checkpoint.path, e.problem) from None
    config = dict(conversion.config, torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps(conversion.preprocessor, indent=2) + "\n")
    for name, data in conversion.extra_files.items():
        (tmp / name).write_bytes(data)


def source_digest(path: Path) -> str:
    """sha256 of the source file (recorded in the metadata and the report)."""
    return sha256_file(path)

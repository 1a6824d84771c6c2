"""The output folder: staged beside the destination, renamed into place only when complete.

A folder at the destination therefore always is a finished conversion; an
interrupted or failed run leaves at most a `.NAME.partial-*` folder (removed
when the run fails cleanly, ignored and swept by the next run otherwise). A run
holds a lock on its folder's `.lock` file beside it, so a concurrent run to the
same destination never sweeps a folder that is still being written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from converters import __version__
from converters.digest import sha256_file
from converters.errors import InputError
from converters.family import Conversion
from converters.tensors import Checkpoint
from converters.writer import Later, check_sha256sums, listed_sha256sums

MODEL_FILE = "model.safetensors"
SHA256_HEX = 64  # characters of a sha256 hex digest
STAND_IN_KEY = "synthetic"  # weights metadata: "true" when the source was a stand-in of random values
SUMS_FILE = "SHA256SUMS"
FAILED_SUFFIX = ".parity-failed"  # DIR.parity-failed: the folder of a run whose parity failed, never DIR
NOTES_KEY = "conversion_notes"  # weights metadata: the conversion's notes (JSON list), kept without parity.json
LOCK_SUFFIX = ".lock"  # `.NAME.partial-XXXX.lock`: held by the run writing `.NAME.partial-XXXX`


def check_destination(source: Path, dest: Path) -> None:
    """Refuse an output that is the input, contains it, or lies inside it, is a symlink, holds the
    current folder, is a folder whose replacement would delete something of the user's
    (`check_replaceable`), or lies inside a folder parityport wrote.

    A symlinked destination is refused outright: committing would replace the
    link itself (or, dangling, fail at the very end), and a link to the input
    or its folder would aim the output at the input.
    """
    _refuse_link(dest)
    src = source.resolve()
    out = dest.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise InputError(dest, f"the output folder may not be, contain or be inside the input {source}")
    if Path.cwd().resolve().is_relative_to(out):
        raise InputError(dest, "is the current folder or contains it, which cannot be replaced; give a new folder's path")
    check_replaceable(dest)
    inside = next((folder for folder in out.parents if _written_by_us(folder)), None)
    if inside is not None:
        raise InputError(dest, f"lies inside {inside}, a folder parityport converted: its SHA256SUMS would not "
                               "list the new folder, and converting that one again with --force would delete it; "
                               "choose an --out outside it")


def check_replaceable(folder: Path) -> None:
    """Refuse replacing `folder` (with --force, or by a failed run's report) unless everything in it
    is parityport's: a non-empty folder must hold weights parityport wrote, and every entry in it
    must be a file its SHA256SUMS lists (`user_entries`). A symlink or a file is refused outright.
    Replacing deletes everything in the folder: this is what keeps a file of the user's from that.
    """
    _refuse_link(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not _written_by_us(folder):
        raise InputError(folder, "exists and is not a folder parityport wrote (no model.safetensors of its own), "
                                 "so it is never replaced, even with --force; choose another --out")
    yours = user_entries(folder)
    if yours:
        from converters.rules import some_names

        why = (f"not listed in its {SUMS_FILE}, so not parityport's" if (folder / SUMS_FILE).is_file()
               else f"no {SUMS_FILE} says parityport wrote them")
        raise InputError(folder, f"holds {some_names(yours)} ({why}): a folder holding anything of yours is "
                                 "never replaced, even with --force, as that would delete it; move them out "
                                 "or choose another --out")


def _refuse_link(folder: Path) -> None:
    if folder.is_symlink():
        raise InputError(folder, f"is a symbolic link (to {os.readlink(folder)}); give a real folder path")


def user_entries(folder: Path) -> list[str]:
    """The names in `folder` that are not parityport's, sorted: every entry (file, folder or link)
    other than SHA256SUMS and the regular files it lists; all of them where no readable SHA256SUMS
    is there to say which files parityport wrote."""
    sums = folder / SUMS_FILE
    try:
        ours = {*listed_sha256sums(folder), SUMS_FILE} if sums.is_file() and not sums.is_symlink() else set()
    except (OSError, ValueError):  # unreadable or not in its format: it vouches for nothing
        ours = set()
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ours or p.is_symlink() or not p.is_file())


def failed_folder(dest: Path) -> Path:
    """`DIR.parity-failed`, where a run whose parity failed leaves its folder instead of at `dest`."""
    return dest.with_name(dest.name + FAILED_SUFFIX)


def _written_by_us(folder: Path) -> bool:
    """Whether `folder` holds a conversion of ours: weights whose metadata names parityport."""
    from converters.shards import read_metadata

    try:
        return read_metadata(folder).get("converter") == "parityport"
    except (InputError, OSError, ValueError, IndexError):
        return False


def up_to_date(dest: Path, source_sha256: str, dtype: str = "float32", verified: bool = True) -> bool:
    """True when `dest` is an intact conversion of this exact source, by this converter version,
    to `dtype`, and (when `verified` is asked for) one whose parity passed."""
    from converters.shards import read_metadata

    if not (dest / "SHA256SUMS").is_file() or check_sha256sums(dest):
        return False
    try:
        config = json.loads((dest / "config.json").read_text())
        meta = read_metadata(dest)  # the first shard's, when sharded
        passed = json.loads((dest / "parity.json").read_text()).get("passed") is True if verified else True
    except (OSError, ValueError, InputError):
        return False
    return (passed and config.get("torch_dtype") == dtype and meta.get("source_sha256") == source_sha256
            and meta.get("converter_version") == __version__)


@contextmanager
def staging(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest`, locked while the block runs; removed if it raises.

    Leftovers of killed runs are swept first: the `.NAME.partial-*` folders whose
    lock no process holds any more, and the `.NAME.old-*` folders (the one `commit`
    parks under the same lock, where it cannot swap folders in one step). The lock is
    an exclusive `flock` on `<folder>.lock` beside the folder (inside, it would be
    published with the folder), taken before the folder exists and released after
    the folder was committed or removed.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _sweep(dest)
        lock, tmp = _locked_folder(dest)
    except OSError as error:
        raise _unwritable(dest, error) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # made 0700 like mkdtemp's; the result is an ordinary folder
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock, tmp)


def _unwritable(dest: Path, error: OSError) -> Exception:
    """The InputError naming the folder `dest` cannot be made in, for an `error` that says so (a
    read-only file system, no permission, a file where a folder should be); other errors as they are."""
    folder = next(p for p in (dest.parent, *dest.parent.parents) if os.path.lexists(p))  # the nearest that is
    if os.path.isdir(folder) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return InputError(folder, f"is not writable ({error.strerror}), so --out {dest} cannot be made in it; "
                                  "choose an --out in a folder you can write")
    if not os.path.isdir(folder) and error.errno in (errno.ENOTDIR, errno.EEXIST):
        return InputError(folder, f"is not a folder, so --out {dest} cannot be made in it")
    return error


def _locked_folder(dest: Path) -> tuple[int, Path]:
    """(descriptor holding the lock, folder): a new lock file, locked, then its folder."""
    while True:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", suffix=LOCK_SUFFIX, dir=dest.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper that took it first removes it: then start again
        folder = Path(name[: -len(LOCK_SUFFIX)])
        if _is_at(fd, name):
            try:
                folder.mkdir(0o700)
                return fd, folder
            except FileExistsError:  # another run's mkdtemp-style name, however unlikely
                os.unlink(name)
            except OSError:  # the lock file is never left without its folder
                os.unlink(name)
                os.close(fd)
                raise
        os.close(fd)


def _unlock(fd: int, folder: Path) -> None:
    """Remove the lock file of `folder`, then release it (no one ever sees it unlocked)."""
    try:
        os.unlink(f"{folder}{LOCK_SUFFIX}")
    except FileNotFoundError:
        pass
    os.close(fd)


def _is_at(fd: int, name: str) -> bool:
    """Whether the open file `fd` still is the file at path `name`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(name))
    except FileNotFoundError:
        return False


def _sweep(dest: Path) -> None:
    """Remove what killed runs left beside `dest`, never a folder whose run still holds its lock."""
    for path in dest.parent.glob(f".{dest.name}.partial-*"):
        if path.name.endswith(LOCK_SUFFIX):
            _sweep_locked(path)
        elif not Path(f"{path}{LOCK_SUFFIX}").exists():  # the lock file is made first, removed last
            shutil.rmtree(path, ignore_errors=True)
    for old in dest.parent.glob(f".{dest.name}.old-*"):  # a lock file left now is a live run's
        if not Path(f"{_partial_of(old, dest)}{LOCK_SUFFIX}").exists():
            shutil.rmtree(old, ignore_errors=True)


def _old_of(tmp: Path, dest: Path) -> Path:
    """`.NAME.old-X`, where the committing run of `.NAME.partial-X` parks the folder it replaces."""
    return tmp.with_name(f".{dest.name}.old-{tmp.name[len(f'.{dest.name}.partial-'):]}")


def _partial_of(old: Path, dest: Path) -> Path:
    """`.NAME.partial-X`, whose lock covers `.NAME.old-X` (the inverse of `_old_of`)."""
    return old.with_name(f".{dest.name}.partial-{old.name[len(f'.{dest.name}.old-'):]}")


def _sweep_locked(lock: Path) -> None:
    """Remove the folder of `lock` and the lock file, if no live process holds the lock."""
    try:
        fd = os.open(lock, os.O_RDWR)  # read-write: flock over NFS is a write lock
    except OSError:  # gone meanwhile, or another user's: left alone
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its owner is alive and writing
        os.close(fd)
        return
    if _is_at(fd, str(lock)):
        shutil.rmtree(lock.with_name(lock.name[: -len(LOCK_SUFFIX)]), ignore_errors=True)
        lock.unlink(missing_ok=True)
    os.close(fd)


def commit(tmp: Path, dest: Path) -> None:
    """Move the finished `tmp` to `dest`, replacing an old folder only after the new one is whole.

    Every file is fsynced, then the folder, so the rename can never publish a
    folder whose contents are still only in the page cache.
    """
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_path(path)
    fsync_path(tmp)
    if dest.exists() and _exchange(tmp, dest):  # one atomic step: no moment without a folder
        fsync_path(dest.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        return
    old = None
    if dest.exists():  # parked under a name `tmp`'s lock covers, so no other run sweeps it meanwhile
        old = _old_of(tmp, dest)
        old.mkdir(0o700)
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_path(path: Path) -> None:
    """Flush a file's contents, or a folder's entries (what makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model(tmp: Path, conversion: Conversion, checkpoint: Checkpoint, source_sha256: str | Future[str],
                dtype: str, allow_nonfinite: bool = False,
                on_tensor: Callable[[str, int], None] | None = None,
                max_shard_size: int | None = None, synthetic: bool = False) -> None:
    """Write the weights (with provenance metadata), config.json, preprocessor_config.json.

    `synthetic` (the source is a stand-in of random values) is recorded in the
    metadata as `STAND_IN_KEY`, which the card, `verify` and `publish` read, and the
    conversion's notes as `NOTES_KEY`, which the card states even without parity.json.

    Weights above `max_shard_size` bytes (default huggingface_hub's 5 GB) are
    written as shards plus `model.safetensors.index.json`; below it, as one
    `model.safetensors`. `source_sha256` may still be computing (a Future from
    `hash_in_background`): the weights are written meanwhile and the header last.
    """
    from converters.shards import MAX_SHARD_SIZE, write_sharded

    metadata = {"format": "pt", "source_file": checkpoint.path.name, "source_format": checkpoint.format,
                "source_sha256": (Later(source_sha256, SHA256_HEX) if isinstance(source_sha256, Future)
                                  else source_sha256), "converter": "parityport",
                "converter_version": __version__, "family": conversion.family,
                "variant": conversion.variant, NOTES_KEY: json.dumps(conversion.notes),
                **({STAND_IN_KEY: "true"} if synthetic else {})}
    try:
        write_sharded(tmp, conversion.tensors, dtype=dtype, metadata=metadata,
                      max_shard_size=MAX_SHARD_SIZE if max_shard_size is None else max_shard_size, on_tensor=on_tensor,
                      allow_nonfinite=allow_nonfinite)
    except InputError as e:
        raise InputError(checkpoint.path, e.problem) from None
    config = dict(conversion.config, torch_dtype=dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps(conversion.preprocessor, indent=2) + "\n")
    for name, data in conversion.extra_files.items():
        (tmp / safe_file_name(name)).write_bytes(data)


def safe_file_name(name: str) -> str:
    """`name` if it is a plain file name inside the folder; an InputError for path tricks.

    Checked with both POSIX and Windows rules (a published folder is opened on
    both): no separators, no `..`, no drive letters, no NUL or control characters.
    """
    bad = (not name or name in (".", "..") or any(c in name for c in '/\\:') or
           any(ord(c) < 32 for c in name))
    if bad:
        raise InputError(None, f"refusing output file name {name!r} (path trick)")
    return name


def source_digest(path: Path) -> str:
    """sha256 of the source file (recorded in the metadata and the report)."""
    return sha256_file(path)

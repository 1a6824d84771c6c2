"""The checkpoint file, opened once: only a regular file, and every later read of it through that opening.

A FIFO blocks the first read forever and a character device (`/dev/zero`) never
ends, so anything but a regular file (after following links) is refused by what
it is before it is opened. The file is then opened once; the isolated pre-parse,
the main parse, the lazy tensor loads and the source's hash all read it through
`Source.handle`, a path that names that opening and not whatever the user's path
names later, so a file swapped in after the pre-parse is never read. Numpy-free,
so the command can open the source before anything heavy loads.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from converters.digest import identity
from converters.errors import InputError

# What a path is, by the file type bits of its mode (S_IFMT), in words for the message.
KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "named pipe (FIFO)", stat.S_IFCHR: "character device",
         stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Source:
    """A regular file opened once. `path` is the name the user gave (what messages show); `file` is
    the opening every read goes through; `identity` is (device, inode, size, mtime) at opening."""

    path: Path
    file: BinaryIO
    identity: tuple[int, ...]

    @property
    def handle(self) -> Path:
        """A path that opens this very file, in this process and in a child given its descriptor
        (`pass_fds`): Linux's /proc/self/fd/N. Valid while `file` is open (while this object lives)."""
        return Path(f"/proc/self/fd/{self.file.fileno()}")


def check_regular(path: str | Path) -> os.stat_result:
    """The `os.stat` of `path` (links followed) when it is a regular file; otherwise an InputError
    naming what it is (no such file, a directory, a FIFO, a device, a socket, a dangling link).
    Nothing is opened, so a device with side effects on open is never touched."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise InputError(path, f"is a symbolic link to {_link_target(path)}, which does not exist"
                         if dangling else "no such file") from None
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror or error})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, f"is {_what(path, st.st_mode)}, not a regular file; refused")
    return st


def open_source(path: str | Path) -> Source:
    """Open `path` once for every read of the conversion, after `check_regular` refused anything but
    a regular file. The link chain is resolved first and the final name opened without following a
    link (a link swapped in since is refused) and without blocking (a FIFO swapped in opens, and
    the `fstat` check below refuses it); `identity` is taken from the opening itself."""
    path = Path(path)
    check_regular(path)
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror or error})") from None
    file = os.fdopen(fd, "rb", buffering=0)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        file.close()
        raise InputError(path, f"is a {_kind(st.st_mode)}, not a regular file; refused")
    return Source(path, file, identity(fd))


def _kind(mode: int) -> str:
    return KINDS.get(stat.S_IFMT(mode), f"special file (mode {stat.S_IFMT(mode):o})")


def _link_target(path: str | Path) -> str:
    return repr(os.path.realpath(path))  # the end of the chain, not its next link


def _what(path: str | Path, mode: int) -> str:
    """"a socket", or "a symbolic link to '/dev/zero', a character device" when `path` is a link."""
    return f"a symbolic link to {_link_target(path)}, a {_kind(mode)}" if os.path.islink(path) else f"a {_kind(mode)}"

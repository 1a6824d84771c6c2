"""The download cache: find a catalogued checkpoint locally, or fetch it resumably and verified.

Where files live (`cache_dir()`):

- `$PARITYPORT_CACHE` when set;
- otherwise `checkpoints/cache/` inside a source checkout (git-ignored), so a
  clone keeps its downloads beside the code;
- otherwise (an installed package) `$XDG_CACHE_HOME/parityport`, by default
  `~/.cache/parityport`.

A catalog entry is cached as `<cache_dir>/<entry.filename>` (`BiT-M-R50x1.npz`,
`data2vec-vision-base-ft1k.pt`): to use a file fetched by hand, put it there.

`$PARITYPORT_BASE_URL` (for mirrors and tests) replaces the scheme and host of
every catalog URL and keeps its path: with `http://127.0.0.1:8000/mirror`,
`https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz` is fetched from
`http://127.0.0.1:8000/mirror/bit_models/BiT-M-R50x1.npz`.

A download streams into `<dest>.partial` beside the destination, resumes it
with an HTTP Range request (restarting cleanly when the server ignores Range),
hashes while streaming, checks the sha256 when it is known, then fsyncs and
renames atomically: the destination is either absent or complete. The digest is
kept beside it (`<file>.sha256.json`, `converters.digest.record`), so that a
conversion of the cached file does not hash it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from tqdm import tqdm

from checkpoints.catalog import Entry, lookup
from converters.digest import record, recorded
from converters.errors import InputError
from converters.export import fsync_path

ENV_CACHE = "PARITYPORT_CACHE"
ENV_BASE_URL = "PARITYPORT_BASE_URL"
CHUNK = 1 << 20  # 1 MiB per read: large enough to be fast, small enough for a smooth progress bar
USER_AGENT = "parityport/0.1 (+urllib)"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)

try:  # POSIX: stop two processes from appending to the same partial file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class DownloadError(InputError):
    """A download failed; `network` is True when the host could not be reached or the link broke."""

    def __init__(self, path: str | Path | None, problem: str, *, network: bool) -> None:
        super().__init__(path, problem)
        self.network = network


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class _Restart(Exception):
    """The server's answer cannot extend the partial file: start again from byte 0."""


def cache_dir() -> Path:
    """Return the download cache folder (not created): `$PARITYPORT_CACHE`, the checkout's
    `checkpoints/cache/`, or `$XDG_CACHE_HOME/parityport` (`~/.cache/parityport`) when installed."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / "checkpoints" / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "parityport"


def cached_path(entry: Entry) -> Path | None:
    """Return the cached file of `entry` when it is present, else None (a `.partial` does not count).
    A cached file of another size than the catalog's is an error naming it: it is not that file."""
    path = cache_dir() / entry.filename
    if not path.is_file():
        return None
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise InputError(path, f"is {size} bytes where the catalog's {entry.name} is {entry.size}: a cut-off "
                               "or different file; delete it to download again")
    return path


def cached_digest(path: Path) -> str | None:
    """The sha256 this cache's download recorded for `path` while the file is unchanged since, else
    None. Only files inside the cache folder qualify: elsewhere nothing vouches for a record."""
    try:
        inside = Path(path).resolve().parent == cache_dir().resolve()
    except OSError:
        return None
    return recorded(Path(path)) if inside else None


def entry_url(entry: Entry) -> str:
    """Return the URL to fetch `entry` from, with `$PARITYPORT_BASE_URL` applied when set."""
    if entry.url is None:
        raise InputError(None, f"checkpoint '{entry.name}' has no download URL")
    return apply_base_url(entry.url)


def apply_base_url(url: str) -> str:
    """Replace the scheme and host of `url` by `$PARITYPORT_BASE_URL` (when set), keeping the path."""
    base = os.environ.get(ENV_BASE_URL)
    if not base:
        return url
    parts = urlparse(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return base.rstrip("/") + tail


def fetch(
    entry_or_url: Entry | str,
    dest: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    attempts: int = 3,
) -> Path:
    """Download `entry_or_url` to `dest` resumably and atomically, and return `dest`.

    Bytes stream into `dest.partial`; an existing partial file is resumed with a
    Range request, and restarted from zero when the server answers 200 or an
    unexpected range. A link that breaks after delivering bytes is resumed up
    to `attempts` times. The sha256 (argument, else the entry's) is computed while
    streaming; a mismatch removes the file and raises `InputError` naming it and
    both digests. The progress bar shows only when `progress` and stderr is a
    TTY. Failures raise `DownloadError` (`network=True` for unreachable hosts and
    broken links). `timeout` bounds each socket operation, in seconds.
    """
    size = None
    if isinstance(entry_or_url, Entry):
        url, sha256, size = entry_url(entry_or_url), sha256 or entry_or_url.sha256, entry_or_url.size
    else:
        url = entry_or_url
    dest = Path(dest)
    made = make_folders(dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    with _locked(partial) as f:
        try:
            got = _download(url, f, dest.name, progress=progress, timeout=timeout, attempts=attempts)
        except BaseException:
            _remove_if_empty(partial)  # keep bytes worth resuming, not an empty husk
            remove_empty(made)
            raise
        _check_size(f, partial, dest, size, url)
        _verify(got, f, partial, dest, sha256)
        f.flush()
        os.fsync(f.fileno())
        os.replace(partial, dest)
    record(dest, got)  # every byte was hashed as it arrived: a conversion need not read it again
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a folder: harmless here
        fsync_path(dest.parent)
    return dest


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (outermost first, as `make_folders` returns them) left empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            folder.rmdir()


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


@contextlib.contextmanager
def _locked(partial: Path):
    """Open (creating) the partial file for read/write, exclusively locked where the OS allows."""
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DownloadError(partial, "another download is writing this file", network=False) from None
        yield f


def _download(url: str, f: BinaryIO, label: str, *, progress: bool, timeout: float, attempts: int) -> str:
    """Fill `f` with the whole body of `url`, resuming from its current size; return its sha256.

    A broken link that delivered bytes is resumed, `attempts` requests in all; a
    server answer that cannot extend the partial file restarts it once from zero.
    """
    failures, restarted = 0, False
    while True:
        before = _size(f)
        try:
            return _stream(url, f, label, progress=progress, timeout=timeout)
        except _Restart:
            if restarted:
                raise DownloadError(url, "the server's byte ranges do not match the request", network=False) from None
            restarted = True
            _truncate(f)
        except DownloadError as error:
            failures += 1
            if not (error.network and _size(f) > before and failures < attempts):
                raise


def _size(f: BinaryIO) -> int:
    return f.seek(0, os.SEEK_END)


def _truncate(f: BinaryIO) -> None:
    f.seek(0)
    f.truncate()


def _stream(url: str, f: BinaryIO, label: str, *, progress: bool, timeout: float) -> str:
    """One HTTP request: append the rest of the body to `f` (or rewrite it on a 200 answer).

    Returns the sha256 of the whole file, hashed as the bytes arrive (only a
    resumed prefix is read back from disk).
    """
    offset = _size(f)
    with _open(url, offset, timeout) as response:
        total = _expected_total(response, offset)
        if response.status == 200 and offset:
            _truncate(f)
            offset = 0
        digest = _prefix_digest(f, offset)
        show = progress and sys.stderr.isatty()
        with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=label, file=sys.stderr, disable=not show, leave=False) as bar:
            written = _copy(response, f, digest, bar, url)
    if total is not None and written != total:
        raise DownloadError(url, f"connection closed after {written} of {total} bytes", network=True)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # our partial file is not a prefix of what the server has
            raise _Restart() from None
        raise DownloadError(url, f"HTTP {error.code} {error.reason}", network=False) from None
    except _NETWORK_ERRORS as error:
        raise DownloadError(url, f"cannot connect: {_reason(error)}", network=True) from None


def _expected_total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Total file size the response promises, checking a 206's range starts where we are."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise _Restart()
        return None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _prefix_digest(f: BinaryIO, offset: int) -> _Hasher:
    """A sha256 fed with the first `offset` bytes already in `f`; leaves `f` at its end."""
    digest = hashlib.sha256()
    f.seek(0)
    remaining = offset
    while remaining and (chunk := f.read(min(CHUNK, remaining))):
        digest.update(chunk)
        remaining -= len(chunk)
    f.seek(offset)
    return digest


def _copy(response: http.client.HTTPResponse, f: BinaryIO, digest: _Hasher, bar: tqdm, url: str) -> int:
    """Copy the response body into `f`, hashing and counting it; return the file's size afterwards."""
    while True:
        try:
            chunk = response.read(CHUNK)
        except _NETWORK_ERRORS as error:
            f.flush()
            raise DownloadError(url, f"connection broken after {f.tell()} bytes: {_reason(error)}",
                                network=True) from None
        if not chunk:
            break
        f.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
    f.flush()
    return f.tell()


def _check_size(f: BinaryIO, partial: Path, dest: Path, size: int | None, url: str) -> None:
    """Check the finished download against the catalog's `size` (when known): a server that closes
    the link without a Content-Length leaves no other sign of a cut-off body."""
    got = _size(f)
    if size is None or got == size:
        return
    if got < size:  # a prefix: kept, and resumed by the next attempt
        raise DownloadError(url, f"the link closed after {got} of the catalog's {size} bytes", network=True)
    f.close()
    partial.unlink(missing_ok=True)
    raise InputError(dest, f"the server sent {got} bytes where the catalog's file is {size}; the download was removed")


def _verify(got: str, f: BinaryIO, partial: Path, dest: Path, sha256: str | None) -> None:
    """Check the finished download's digest against `sha256`; on mismatch remove it and raise."""
    if sha256 is not None and got != sha256.lower():
        f.close()
        partial.unlink(missing_ok=True)
        raise InputError(dest, f"sha256 mismatch: expected {sha256.lower()}, got {got}; the download was removed")


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, str):
        error = error.reason
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(error) or type(error).__name__


def resolve(name_or_path: str, *, offline: bool = False) -> Path:
    """Return a local file for `name_or_path`: an existing path as is, else a catalog entry's
    cached file, downloading it into the cache when needed and allowed.

    When the file is not cached and cannot be fetched (`offline`, an unreachable
    host, a broken link, an HTTP error) the `InputError` says the URL to fetch
    it from and the full path to save it as; for a trained fixture, the command
    that trains it. An entry the catalog marks broken is refused with its reason.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        entry = lookup(name_or_path)
    except InputError:
        if os.sep in name_or_path or "/" in name_or_path:
            raise InputError(name_or_path, "no such file, and not a catalog name (parityport catalog lists them)") from None
        raise
    if entry.broken:
        raise InputError(None, broken_message(entry))
    cached = cached_path(entry)
    if cached is not None:
        return cached
    if entry.kind == "fixture":
        raise InputError(None, fixture_message(entry))
    if entry.url is None:
        raise InputError(None, f"checkpoint '{entry.name}' is not in the cache and has no download URL; "
                               f"save it as {cache_dir() / entry.filename}")
    if offline:
        raise InputError(None, not_cached_message(entry, "offline"))
    try:
        return fetch(entry, cache_dir() / entry.filename, sha256=entry.sha256, progress=True)
    except DownloadError as error:
        raise InputError(None, not_cached_message(entry, error.problem)) from None


def not_cached_message(entry: Entry, reason: str) -> str:
    """The one-line instruction given when `entry` is not cached and cannot be downloaded."""
    return (f"checkpoint '{entry.name}' is not in the cache and could not be downloaded ({reason}); "
            f"download {entry_url(entry)} and save it as {cache_dir() / entry.filename}")


def broken_message(entry: Entry) -> str:
    """The one-line refusal of an entry the catalog marks broken, with the catalog's reason."""
    return f"checkpoint '{entry.name}' cannot be converted: {entry.broken}"


def fixture_message(entry: Entry) -> str:
    """The one-line instruction for a trained fixture that is not in the cache: it is never downloaded,
    and a stand-in of random values would not be the trained model the catalog's figure measures."""
    trainer = entry.extra.get("trainer")
    make = (f"make it with `python -m {trainer} --out DIR` and convert DIR/{entry.filename}, or save that file as "
            if trainer else "save it as ")
    return (f"checkpoint '{entry.name}' is a fixture the project trains, not a download: "
            f"{make}{cache_dir() / entry.filename}")

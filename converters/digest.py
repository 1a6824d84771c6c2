"""sha256 of files, without numpy, so that the source's hash can start before anything heavy loads.

The source's digest (provenance, up-to-date checks) runs on its own thread
from the first moment of a conversion: the output's hash cannot pass the
header, which records it, until it is known. A download already hashed every
byte as it arrived; `record` keeps that digest beside the file and `recorded`
gives it back while the file is unchanged, so a cached checkpoint is not read
twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future
from pathlib import Path

# Digests of the files this process has just written, so SHA256SUMS does not read
# them back: path → (identity, sha256). A file changed since no longer matches.
_WRITTEN: dict[str, tuple[tuple[int, ...], str]] = {}
SIDECAR = ".sha256.json"  # `record`'s file, beside the one it describes


def identity(path: Path | int) -> tuple[int, ...]:
    """What changes when a file is replaced, rewritten or truncated: device, inode, size, mtime (of
    the file a path names now, or of an open descriptor's file)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember(path: Path, digest: str) -> None:
    """Record the digest of a file this process has just written."""
    _WRITTEN[os.path.abspath(path)] = (identity(path), digest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (or remembered, if this process just wrote it)."""
    known = _WRITTEN.get(os.path.abspath(path))
    if known is not None and known[0] == identity(path):
        return known[1]
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(path: Path, digest: str) -> None:
    """Keep `digest` beside `path` (`<name>.sha256.json`) with the `identity` of the file it
    belongs to, written atomically."""
    sidecar = path.with_name(path.name + SIDECAR)
    staged = sidecar.with_name(sidecar.name + ".tmp")
    staged.write_text(json.dumps({"sha256": digest, "identity": list(identity(path))}) + "\n")
    os.replace(staged, sidecar)


def recorded(path: Path, now: tuple[int, ...] | None = None) -> str | None:
    """The digest `record` kept for `path`, or None when there is none or the file has changed since:
    when its identity is not `now` (that of an opened file), or by default what the path names now."""
    try:
        kept = json.loads(path.with_name(path.name + SIDECAR).read_text())
        now = list(identity(path) if now is None else now)
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("identity") != now:
        return None
    digest = kept.get("sha256")
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def hash_in_background(path: Path, known: str | None = None) -> Future[str]:
    """`sha256_file(path)` computed on a second thread; `.result()` waits for it (and re-raises).

    sha256 and file reads release the GIL, so the hash of a large source overlaps
    the imports, the child pre-parse, the header checks and the rule mapping. A
    `known` digest (one `recorded` for a download) is returned as it is.
    """
    future: Future[str] = Future()
    if known is not None:
        future.set_result(known)
        return future

    def run() -> None:
        try:
            future.set_result(sha256_file(path))
        except BaseException as error:  # noqa: BLE001  re-raised by .result()
            future.set_exception(error)

    threading.Thread(target=run, name="source-sha256", daemon=True).start()
    return future

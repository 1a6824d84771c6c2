"""sha256 of files, without numpy, so that the source's hash can start before anything heavy loads.

The source's digest (provenance, up-to-date checks) runs on its own thread
from the first moment of a conversion: the output's hash cannot pass the
header, which records it, until it is known.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

# Digests of the files this process has just written, so SHA256SUMS does not read
# them back: path → (inode, size, mtime_ns, sha256). A file changed since no longer matches.
_WRITTEN: dict[str, tuple[int, int, int, str]] = {}


def remember(path: Path, digest: str) -> None:
    """Record the digest of a file this process has just written."""
    st = os.stat(path)
    _WRITTEN[os.path.abspath(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, digest)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (or remembered, if this process just wrote it)."""
    known = _WRITTEN.get(os.path.abspath(path))
    if known is not None:
        st = os.stat(path)
        if known[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
            return known[3]
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_in_background(path: Path) -> Future[str]:
    """`sha256_file(path)` computed on a second thread; `.result()` waits for it (and re-raises).

    sha256 and file reads release the GIL, so the hash of a large source overlaps
    the imports, the child pre-parse, the header checks and the rule mapping.
    """
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(sha256_file(path))
        except BaseException as error:  # noqa: BLE001  re-raised by .result()
            future.set_exception(error)

    threading.Thread(target=run, name="source-sha256", daemon=True).start()
    return future

"""Downloads against a local HTTP server: resume, servers that ignore Range, broken links,
HTTP errors, checksum failures, the offline message and the progress bar."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from checkpoints import download
from checkpoints.catalog import lookup
from checkpoints.download import DownloadError, apply_base_url, cache_dir, cached_path, fetch, resolve
from converters.errors import InputError

BODY = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(BODY).hexdigest()
HALF = len(BODY) // 2
NPZ_PATH = "/bit_models/BiT-M-R50x1-ILSVRC2012.npz"


class Handler(BaseHTTPRequestHandler):
    """Serves BODY under several behaviours chosen by the first path segment."""

    log: list[tuple[str, str | None]] = []
    dropped: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.log.append((self.path, self.headers.get("Range")))
        mode = self.path.split("/")[1]
        if mode == "missing":
            self.send_error(404, "Not Found")
        elif mode == "norange":
            self._send(200, BODY)
        elif mode == "badrange":
            self._partial(start=1) if self.headers.get("Range") else self._send(200, BODY)
        elif mode == "nolength" and not self.headers.get("Range"):  # HTTP/1.0: the close ends the body
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BODY[:HALF])
        elif mode == "drop" and self.path not in self.dropped:
            self.dropped.add(self.path)
            self._send(200, BODY, cut=HALF)
        else:  # "range", "drop" after the first request, and the mirror of catalog URLs
            self._serve_range()

    def _serve_range(self) -> None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if not match:
            return self._send(200, BODY)
        start = int(match.group(1))
        if start >= len(BODY):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(BODY)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self._partial(start)

    def _partial(self, start: int) -> None:
        self._send(206, BODY[start:], extra={"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"})

    def _send(self, status: int, body: bytes, cut: int | None = None, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:cut])  # with `cut`, HTTP/1.0 closes the connection mid-body

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    Handler.log.clear()
    monkeypatch.setenv("PARITYPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PARITYPORT_BASE_URL", raising=False)
    return tmp_path


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_fetch_streams_checks_and_leaves_no_partial(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "file.npz"
    assert fetch(f"{server}/range/a.npz", dest, sha256=SHA, progress=False, timeout=5) == dest
    assert dest.read_bytes() == BODY and not (tmp_path / "sub" / "file.npz.partial").exists()
    assert Handler.log == [("/range/a.npz", None)]


def test_resume_sends_range_and_hashes_the_old_bytes_too(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    (tmp_path / "file.npz.partial").write_bytes(BODY[:100_000])
    fetch(f"{server}/range/b.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY and Handler.log == [("/range/b.npz", "bytes=100000-")]


def test_server_ignoring_range_restarts_cleanly(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    (tmp_path / "file.npz.partial").write_bytes(b"stale bytes that are not a prefix" * 1000)
    fetch(f"{server}/norange/c.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY


def test_wrong_content_range_restarts_from_zero(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    (tmp_path / "file.npz.partial").write_bytes(BODY[:1000])
    fetch(f"{server}/badrange/d.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY and [r for _, r in Handler.log] == ["bytes=1000-", None]


def test_partial_longer_than_the_file_restarts(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    (tmp_path / "file.npz.partial").write_bytes(BODY + b"junk")
    fetch(f"{server}/range/e.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY and [r for _, r in Handler.log] == [f"bytes={len(BODY) + 4}-", None]


def test_dropped_connection_is_resumed(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    fetch(f"{server}/drop/f.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY
    assert Handler.log == [("/drop/f.npz", None), ("/drop/f.npz", f"bytes={HALF}-")]


def test_dropped_connection_keeps_the_partial_for_the_next_run(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    with pytest.raises(DownloadError) as caught:
        fetch(f"{server}/drop/g.npz", dest, progress=False, timeout=5, attempts=1)
    assert caught.value.network and str(caught.value) == (
        f"{server}/drop/g.npz: connection closed after {HALF} of {len(BODY)} bytes")
    assert (tmp_path / "file.npz.partial").read_bytes() == BODY[:HALF] and not dest.exists()
    fetch(f"{server}/drop/g.npz", dest, sha256=SHA, progress=False, timeout=5)
    assert dest.read_bytes() == BODY


def test_a_body_cut_short_without_a_length_is_caught_by_the_catalog_size(server: str, tmp_path: Path) -> None:
    entry = dataclasses.replace(lookup("BiT-M-R50x1-ILSVRC2012"), url=f"{server}/nolength/r50.npz", size=len(BODY))
    dest = tmp_path / "file.npz"
    with pytest.raises(DownloadError) as caught:
        fetch(entry, dest, progress=False, timeout=5)
    assert caught.value.network and str(caught.value) == (
        f"{server}/nolength/r50.npz: the link closed after {HALF} of the catalog's {len(BODY)} bytes")
    assert (tmp_path / "file.npz.partial").read_bytes() == BODY[:HALF] and not dest.exists()
    assert fetch(entry, dest, progress=False, timeout=5).read_bytes() == BODY  # resumed
    longer = dataclasses.replace(entry, url=f"{server}/range/r50.npz", size=len(BODY) - 1)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'other.npz'}: the server sent {len(BODY)} bytes where the "
                                         rf"catalog's file is {len(BODY) - 1}; the download was removed$"):
        fetch(longer, tmp_path / "other.npz", progress=False, timeout=5)
    assert not (tmp_path / "other.npz").exists() and not (tmp_path / "other.npz.partial").exists()


def test_a_cached_file_of_the_wrong_size_is_not_taken_for_the_checkpoint(tmp_path: Path) -> None:
    entry = dataclasses.replace(lookup("BiT-M-R50x1-ILSVRC2012"), size=len(BODY))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / entry.filename).write_bytes(BODY[:HALF])
    with pytest.raises(InputError, match=rf"^{tmp_path / 'cache' / entry.filename}: is {HALF} bytes where the "
                                         rf"catalog's BiT-M-R50x1-ILSVRC2012 is {len(BODY)}: a cut-off or different "
                                         "file; delete it to download again$"):
        cached_path(entry)
    (tmp_path / "cache" / entry.filename).write_bytes(BODY)
    assert cached_path(entry) == tmp_path / "cache" / entry.filename


def test_http_error_is_reported_and_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    with pytest.raises(DownloadError) as caught:
        fetch(f"{server}/missing/h.npz", dest, progress=False, timeout=5)
    assert str(caught.value) == f"{server}/missing/h.npz: HTTP 404 Not Found" and not caught.value.network
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_is_a_network_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cannot connect") as caught:
        fetch(f"{_closed_port_url()}/x.npz", tmp_path / "x.npz", progress=False, timeout=5)
    assert caught.value.network and list(tmp_path.iterdir()) == []


def test_sha256_mismatch_removes_the_file(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "file.npz"
    wrong = "0" * 64
    with pytest.raises(InputError) as caught:
        fetch(f"{server}/range/i.npz", dest, sha256=wrong, progress=False, timeout=5)
    assert str(caught.value) == f"{dest}: sha256 mismatch: expected {wrong}, got {SHA}; the download was removed"
    assert list(tmp_path.iterdir()) == []


def test_progress_is_silent_without_a_tty(server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fetch(f"{server}/range/j.npz", tmp_path / "file.npz", progress=True, timeout=5)
    assert capsys.readouterr().err == ""


def test_progress_shows_on_a_tty(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fetch(f"{server}/range/k.npz", tmp_path / "shown.npz", progress=True, timeout=5)
    assert "shown.npz" in terminal.getvalue()


def test_cache_dir_defaults_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PARITYPORT_CACHE")
    assert cache_dir() == Path(download.__file__).resolve().parent / "cache"  # inside a checkout
    monkeypatch.setattr(download, "_REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "parityport"


def test_base_url_keeps_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://storage.googleapis.com/bit_models/distill/R50x1_224.npz"
    assert apply_base_url(url) == url
    monkeypatch.setenv("PARITYPORT_BASE_URL", "http://127.0.0.1:9/mirror/")
    assert apply_base_url(url) == "http://127.0.0.1:9/mirror/bit_models/distill/R50x1_224.npz"


def test_resolve_existing_path_and_cache_hit(tmp_path: Path) -> None:
    local = tmp_path / "mine.npz"
    local.write_bytes(b"x")
    assert resolve(str(local)) == local
    entry = lookup("BiT-M-R50x1-ILSVRC2012")
    assert cached_path(entry) is None
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "BiT-M-R50x1-ILSVRC2012.npz").write_bytes(b"x")
    assert resolve("BiT-M-R50x1-ILSVRC2012", offline=True) == tmp_path / "cache" / "BiT-M-R50x1-ILSVRC2012.npz"
    assert cached_path(entry) == tmp_path / "cache" / "BiT-M-R50x1-ILSVRC2012.npz"


def test_resolve_offline_says_where_to_put_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        resolve("BiT-M-R50x1-ILSVRC2012", offline=True)
    assert str(caught.value) == (
        "checkpoint 'BiT-M-R50x1-ILSVRC2012' is not in the cache and could not be downloaded (offline); "
        "download https://storage.googleapis.com/bit_models/BiT-M-R50x1-ILSVRC2012.npz "
        f"and save it as {tmp_path / 'cache' / 'BiT-M-R50x1-ILSVRC2012.npz'}"
    )


def test_resolve_unreachable_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = _closed_port_url()
    monkeypatch.setenv("PARITYPORT_BASE_URL", base)
    with pytest.raises(InputError) as caught:
        resolve("data2vec-vision-base-ft1k")
    message = str(caught.value)
    assert message.startswith(
        "checkpoint 'data2vec-vision-base-ft1k' is not in the cache and could not be downloaded (cannot connect: ")
    assert message.endswith(
        f"); download {base}/fairseq/data2vec/data2vec_vision/finetuned_base/checkpoint-99/mp_rank_00_model_states.pt"
        f" and save it as {tmp_path / 'cache' / 'data2vec-vision-base-ft1k.pt'}")


def test_resolve_downloads_into_the_cache(server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARITYPORT_BASE_URL", server)
    path = resolve("BiT-M-R50x1-ILSVRC2012")
    assert path == tmp_path / "cache" / "BiT-M-R50x1-ILSVRC2012.npz" and path.read_bytes() == BODY
    assert Handler.log == [(NPZ_PATH, None)]
    assert resolve("BiT-M-R50x1-ILSVRC2012") == path and len(Handler.log) == 1  # a cache hit


def test_resolve_rejects_unknown_names_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^unknown checkpoint 'BiT-M-R50x9'; did you mean"):
        resolve("BiT-M-R50x9")
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(InputError) as caught:
        resolve(missing)
    assert str(caught.value) == f"{missing}: no such file, and not a catalog name (parityport catalog lists them)"


def test_a_missing_file_is_named_as_such_when_a_stand_in_was_allowed(tmp_path: Path, capsys) -> None:
    from parityport.cli import main

    missing = str(tmp_path / "nope.npz")  # what `make convert-bit CKPT=...` passes, with --synthetic-if-offline
    assert main(["convert", missing, "--out", str(tmp_path / "out"), "--synthetic-if-offline"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"parityport: error: {missing}: no such file, and not a catalog name (parityport catalog lists them)")


def test_a_download_records_its_digest_for_as_long_as_the_file_is_unchanged(server: str, tmp_path: Path) -> None:
    from checkpoints.download import cached_digest
    from converters.digest import recorded

    dest = cache_dir() / "file.npz"
    fetch(f"{server}/range/a.npz", dest, progress=False, timeout=5)
    assert cached_digest(dest) == SHA
    assert json.loads((cache_dir() / "file.npz.sha256.json").read_text())["sha256"] == SHA
    os.utime(dest, ns=(1, 1))  # rewritten (or touched) since: no longer vouched for
    assert cached_digest(dest) is None
    outside = tmp_path / "elsewhere.npz"
    outside.write_bytes(BODY)
    (tmp_path / "elsewhere.npz.sha256.json").write_text((cache_dir() / "file.npz.sha256.json").read_text())
    assert recorded(outside) is None  # another file's record
    fetch(f"{server}/range/a.npz", tmp_path / "fetched.npz", progress=False, timeout=5)
    assert recorded(tmp_path / "fetched.npz") == SHA
    assert cached_digest(tmp_path / "fetched.npz") is None  # outside the cache nothing vouches for it


def test_converting_a_cached_download_does_not_hash_it_again(tiny_npz: Path, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    """The digest recorded while downloading is the source's sha256 in the output; the file is not read for it."""
    import shutil

    from safetensors import safe_open

    import converters.digest as digest
    from parityport.cli import main

    cached = cache_dir() / "BiT-M-R50x1-ILSVRC2012.npz"
    cached.parent.mkdir(parents=True)
    shutil.copy(tiny_npz, cached)
    true = hashlib.sha256(cached.read_bytes()).hexdigest()
    digest.record(cached, true)
    hash_file = digest.sha256_file

    def never_the_source(path: Path) -> str:
        assert Path(path) != cached, "the cached source was hashed again"
        return hash_file(path)

    monkeypatch.setattr(digest, "sha256_file", never_the_source)
    assert main(["convert", "BiT-M-R50x1-ILSVRC2012", "--out", str(tmp_path / "out"), "--no-parity"]) == 0
    with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
        assert f.metadata()["source_sha256"] == true


def test_parity_takes_a_catalog_name_like_convert(tiny_npz: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import shutil

    from parityport.cli import main

    cache_dir().mkdir(parents=True)
    shutil.copy(tiny_npz, cache_dir() / "BiT-M-R50x1-ILSVRC2012.npz")
    out = tmp_path / "out"
    assert main(["convert", "BiT-M-R50x1-ILSVRC2012", "--out", str(out), "--no-parity"]) == 0
    assert main(["parity", "BiT-M-R50x1-ILSVRC2012", str(out)]) == 0
    assert "Verdict: **PASSED**" in capsys.readouterr().out
    monkeypatch.setenv("PARITYPORT_BASE_URL", _closed_port_url())
    assert main(["parity", "BiT-M-R101x1-ILSVRC2012", str(out)]) == 2  # not cached, and cannot be fetched
    assert "BiT-M-R101x1-ILSVRC2012" in capsys.readouterr().err.splitlines()[-1]

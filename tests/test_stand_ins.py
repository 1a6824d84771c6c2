"""Offline stand-ins: every catalog entry has one or a one-line error saying what to do instead;
stand-ins live in the download cache, are reused, and a failed or interrupted run leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import offline
from checkpoints.catalog import format_table, load_catalog, lookup
from checkpoints.synthetic import DEPTHS, bit_arrays, write_bit_npz
from converters.errors import InputError
from parityport.cli import main

ENTRIES = list(load_catalog().values())
OFFLINE = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
CANNOT_CONNECT = "could not be downloaded (cannot connect: [Errno 111] Connection refused)"
TRAINERS = {"fixture-BiT-R14x0.5-shapes10": "checkpoints.fixtures.train_bit",
            "fixture-data2vec-vision-tiny-shapes10": "checkpoints.fixtures.train_data2vec"}
# What the real files would be, by arch: the stand-in must have the same layout.
D2V_VARIANT = {"ViT-B/16": "base", "ViT-L/16": "large", "ViT-H/14": "huge"}


@pytest.fixture(autouse=True)
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PARITYPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITYPORT_BASE_URL", OFFLINE)
    return tmp_path / "cache"


def _what_to_do_instead(name: str, cache: Path) -> str | None:
    """The one line an entry without a stand-in is refused with; None for an entry that has one."""
    entry = lookup(name)
    if entry.kind == "fixture":
        return (f"checkpoint '{name}' is a fixture the project trains, not a download: make it with "
                f"`python -m {TRAINERS[name]} --out DIR` and convert DIR/{entry.filename}, or save that file "
                f"as {cache / entry.filename}")
    if entry.broken:
        return f"checkpoint '{name}' cannot be converted: {entry.broken}"
    return None


def _tiny_bit(entry, path):  # the entry's container with a small BiT inside, where a test needs no full size
    from checkpoints.synthetic import write_bit_h5

    arrays = bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3)
    (write_bit_h5 if entry.format == "h5" else write_bit_npz)(path, arrays)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_every_catalog_entry_has_a_stand_in_or_says_how_to_get_the_file(entry, offline_cache):
    """Cheap for every entry: the stand-in is planned (its layout checked), not written."""
    instead = _what_to_do_instead(entry.name, offline_cache)
    if instead is not None:
        with pytest.raises(InputError) as caught:
            offline.stand_in(entry)
        assert str(caught.value) == instead
    else:
        plan = offline.stand_in(entry)
        stem = entry.filename.removesuffix("." + entry.format)
        assert plan.path == offline_cache / "synthetic" / f"{stem}.synthetic.{entry.format}"
        assert offline.names_stand_in(plan.path.name) and not plan.exists
        if entry.family == "bit":
            depth, width = entry.arch.removeprefix("R").split("x")
            assert offline._bit_layout(entry) == (DEPTHS[int(depth)], int(width))
        else:
            assert offline._d2v_variant(entry) == D2V_VARIANT[entry.arch]
    assert _files(offline_cache.parent) == []  # nothing was written


REFUSED = [e.name for e in ENTRIES if e.kind == "fixture" or e.broken]


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("synthetic", [True, False], ids=["synthetic-if-offline", "plain"])
def test_an_entry_without_a_stand_in_is_refused_in_one_line_and_leaves_nothing(
        name, synthetic, tmp_path, offline_cache, capsys):
    argv = ["convert", name, "--out", str(tmp_path / "out" / "X")] + (["--synthetic-if-offline"] if synthetic else [])
    assert main(argv) == 2
    assert capsys.readouterr().err == f"parityport: error: {_what_to_do_instead(name, offline_cache)}\n"
    assert _files(tmp_path) == []


@pytest.mark.parametrize("parity", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no-parity", "parity"])
@pytest.mark.parametrize("name", ["BiT-M-R50x1-CIFAR10", "BiT-S-R50x1.h5"])
def test_the_smallest_stand_ins_convert(name, parity, tmp_path, offline_cache, capsys):
    """Fully, at the published size, offline: the npz path and the Keras h5 path (with parity: about
    3 min each on two loaded cores, so behind `slow`; without, about 12 s)."""
    entry = lookup(name)
    out = tmp_path / "out" / "X"
    flags = ["--synthetic-if-offline"] + ([] if parity else ["--no-parity"])
    assert main(["convert", name, "--out", str(out), *flags]) == 0
    stem = entry.filename.removesuffix("." + entry.format)
    stand_in = offline_cache / "synthetic" / f"{stem}.synthetic.{entry.format}"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"parityport: NOT the real weights: converting a synthetic stand-in in the exact {name} "
                        f"layout (random values), writing it to {stand_in}")
    assert lines[1] == (f"parityport: checkpoint '{name}' is not in the cache and {CANNOT_CONNECT}; download "
                        f"{OFFLINE}{entry.url.removeprefix('https://storage.googleapis.com')} and save it as "
                        f"{offline_cache / entry.filename}")
    assert lines[2].startswith(f"parityport: {stand_in.name}: bit R50x1, 153 tensors (0 dropped by rule)")
    done = "parity passed; " if parity else ""
    assert lines[-1] == (f"parityport: wrote {out} ({done}SYNTHETIC weights (random values), "
                         "not the published checkpoint)")
    assert offline.is_stand_in(stand_in) and _files(offline_cache) == ["synthetic", f"synthetic/{stand_in.name}"]
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == entry.classes
    if parity:
        report = json.loads((out / "parity.json").read_text())
        assert report["passed"] and report["variant"].startswith(entry.arch)


def test_a_stand_in_is_kept_in_the_cache_and_reused(tmp_path, offline_cache, monkeypatch, capsys):
    monkeypatch.setitem(offline.WRITERS, "bit", _tiny_bit)
    name = "BiT-M-R50x1-ILSVRC2012"
    stand_in = offline_cache / "synthetic" / f"{name}.synthetic.npz"
    assert main(["convert", name, "--out", str(tmp_path / "a"), "--no-parity", "--synthetic-if-offline"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith(f"(random values), writing it to {stand_in}")
    written = stand_in.stat()
    monkeypatch.setitem(offline.WRITERS, "bit", lambda entry, path: pytest.fail("a complete stand-in was rewritten"))
    assert main(["convert", name, "--out", str(tmp_path / "b"), "--no-parity", "--synthetic-if-offline"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first == (f"parityport: NOT the real weights: converting a synthetic stand-in in the exact {name} "
                     f"layout (random values), kept from an earlier run in {stand_in}")
    assert (stand_in.stat().st_ino, stand_in.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert not (tmp_path / "synthetic").exists()  # nothing beside --out any more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cache"]


def test_an_interrupted_stand_in_leaves_no_file_and_no_folder(tmp_path, offline_cache, monkeypatch, capsys):
    def interrupted(entry, path):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setitem(offline.WRITERS, "bit", interrupted)
    assert main(["convert", "BiT-M-R50x1-ILSVRC2012", "--out", str(tmp_path / "o"), "--synthetic-if-offline"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "parityport: interrupted; no output folder was changed"
    assert _files(tmp_path) == []


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(tmp_path, offline_cache, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    folder = offline_cache / "synthetic"
    folder.mkdir(parents=True)
    abandoned = folder / f".BiT-M-R50x1-ILSVRC2012.synthetic.npz.{dead}.partial"
    running = folder / f".BiT-M-R50x1-ILSVRC2012.synthetic.npz.{os.getppid()}.partial"  # a live process's
    abandoned.write_bytes(b"half a file")
    running.write_bytes(b"being written")
    monkeypatch.setitem(offline.WRITERS, "bit", _tiny_bit)
    path = offline.synthetic_stand_in(lookup("BiT-M-R50x1-ILSVRC2012"))
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, running.name])


def test_a_missing_stand_in_still_says_where_the_real_file_comes_from(tmp_path, offline_cache, monkeypatch, capsys):
    monkeypatch.delitem(offline.WRITERS, "bit")
    assert main(["convert", "BiT-M-R50x1", "--out", str(tmp_path / "o"), "--synthetic-if-offline"]) == 2
    assert capsys.readouterr().err == (
        f"parityport: error: checkpoint 'BiT-M-R50x1' is not in the cache and {CANNOT_CONNECT}; download "
        f"{OFFLINE}/bit_models/BiT-M-R50x1.npz and save it as {offline_cache / 'BiT-M-R50x1.npz'}; "
        "no synthetic stand-in for BiT-M-R50x1 (bit, npz): no writer for this layout\n")
    assert _files(tmp_path) == []


def test_the_catalog_shows_why_an_entry_is_broken(capsys):
    assert main(["catalog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("BiT-S-R50x3.h5 "))
    assert row.split()[2:4] == ["h5", "(broken)"]
    assert lines[-2:] == [
        "BiT-S-R50x3.h5 (broken): root kernel is (7,7,3,64), not the x3 width (google-research/big_transfer#47); "
        "convert the .npz instead",
        "BiT-S-R101x1.h5 (broken): root kernel is (7,7,3,256), not the x1 width (google-research/big_transfer#47); "
        "convert the .npz instead"]
    assert format_table([lookup("BiT-M-R50x1")]).count("\n") == 1  # no reasons below a table without broken files


def test_a_broken_entry_is_refused_even_when_cached(tmp_path, offline_cache, capsys):
    offline_cache.mkdir()
    (offline_cache / "BiT-S-R50x3.h5").write_bytes(b"whatever was saved there")
    assert main(["convert", "BiT-S-R50x3.h5", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "parityport: error: checkpoint 'BiT-S-R50x3.h5' cannot be converted: root kernel is (7,7,3,64), not the "
        "x3 width (google-research/big_transfer#47); convert the .npz instead\n")

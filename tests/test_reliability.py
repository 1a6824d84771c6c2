"""Reliability of `parityport convert`: atomic folders under kill -9, no-op re-runs,
refused destinations, non-finite weights and colliding names, all through the command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from checkpoints.synthetic import DEPTHS, TINY_BIT, bit_arrays, write_bit_npz
from converters.errors import InputError
from converters.export import LOCK_SUFFIX, check_destination, safe_file_name, staging
from converters.tensors import LazyTensor
from converters.writer import check_sha256sums, write_safetensors
from parityport.cli import main

CLI = [sys.executable, "-m", "parityport.cli"]
ENV = dict(os.environ, TQDM_DISABLE="1")


@pytest.fixture(scope="module")
def r50_npz(tmp_path_factory) -> Path:
    """A full-size BiT-M-R50x1 layout (~100 MB), big enough that writing takes a while."""
    path = tmp_path_factory.mktemp("r50") / "BiT-M-R50x1.npz"
    write_bit_npz(path, bit_arrays(DEPTHS[50], 1, 1000, seed=3))
    return path


def verifies(folder: Path, with_parity: bool) -> bool:
    """A complete conversion: every checksum matches, the weights open, parity passed if it ran."""
    if check_sha256sums(folder):
        return False
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        if not f.metadata().get("source_sha256"):
            return False
    if with_parity:
        report = folder / "parity.json"
        return report.is_file() and json.loads(report.read_text()).get("passed") is True
    return True


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


# ---------------------------------------------------------------------------
# kill -9 at random moments

def _convert(src: Path, dest: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "convert", str(src), "--out", str(dest), "--no-parity", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)


def _wait_for_staging(proc: subprocess.Popen, dest: Path, limit: float = 120.0) -> float:
    """Seconds until the staging folder appears (the start of writing), or the process ends."""
    start = time.monotonic()
    while proc.poll() is None and not any(dest.parent.glob(f".{dest.name}.partial-*")):
        if time.monotonic() - start > limit:
            raise TimeoutError("no staging folder appeared")
        time.sleep(0.002)
    return time.monotonic() - start


def _kill_at_random_moments(src: Path, dest: Path, kills: int, seed: int) -> list[str]:
    """Kill conversions at seeded random moments of their writing phase; check the destination
    after each. Even kills start with no folder; odd ones run with --force over whatever the
    previous kill left (a complete folder, which must then survive whole, or none)."""
    first = _convert(src, dest)
    _wait_for_staging(first, dest)
    t0 = time.monotonic()
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    writing = time.monotonic() - t0  # staging appeared → committed
    assert verifies(dest, with_parity=False)
    rng = np.random.default_rng(seed)
    outcomes = []
    for i in range(kills):
        replacing = i % 2 == 1
        if not replacing:
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        had = dest.exists()
        proc = _convert(src, dest, *(["--force"] if replacing else []))
        _wait_for_staging(proc, dest)
        time.sleep(rng.uniform(0.0, 1.2 * writing))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        if dest.exists():
            assert verifies(dest, with_parity=False), f"kill {i}: {dest} exists but does not verify"
        else:
            assert not had, f"kill {i}: the previous complete folder vanished"
        outcomes.append(("killed" if killed else "finished") + (" replacing" if had else " creating")
                        + (", complete" if dest.exists() else ", absent"))
    rerun = _convert(src, dest, "--force")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    assert verifies(dest, with_parity=False) and leftovers(dest) == []
    return outcomes


def test_kill_9_never_leaves_an_unverified_folder(r50_npz, tmp_path):
    outcomes = _kill_at_random_moments(r50_npz, tmp_path / "out", kills=5, seed=0)
    assert any(o.startswith("killed") for o in outcomes), outcomes


@pytest.mark.slow
def test_kill_9_at_twenty_moments(r50_npz, tmp_path):
    outcomes = _kill_at_random_moments(r50_npz, tmp_path / "out", kills=20, seed=1)
    print("\n".join(outcomes))
    assert sum(o.startswith("killed") for o in outcomes) >= 10, outcomes


# ---------------------------------------------------------------------------
# Re-runs, destinations

def test_rerun_is_a_no_op_unless_forced(tiny_npz, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(dest)]) == 0
    model = dest / "model.safetensors"
    before = (model.stat().st_ino, model.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(["convert", str(tiny_npz), "--out", str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == before
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--force"]) == 0
    assert (model.stat().st_ino, model.stat().st_mtime_ns) != before
    assert verifies(dest, with_parity=True) and leftovers(dest) == []


def test_transformers_loading_bars_stay_off_a_log(tiny_npz, tmp_path, capsys, monkeypatch):
    from transformers.utils import logging

    monkeypatch.setattr(logging, "_tqdm_hook", None)  # as in a fresh process; restored after
    assert main(["convert", str(tiny_npz), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "parity" in err and "Loading weights" not in err  # stderr is no TTY here


def test_a_different_source_is_not_a_no_op(tiny_npz, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 0
    other = tmp_path / "other.npz"
    write_bit_npz(other, bit_arrays(**TINY_BIT, seed=2))
    capsys.readouterr()
    assert main(["convert", str(other), "--out", str(dest)]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_leftovers_of_a_killed_run_are_swept(tiny_npz, tmp_path):
    dest = tmp_path / "out"
    for stale in (f".{dest.name}.partial-abc", f".{dest.name}.old-def"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_bytes(b"half")
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 0
    assert leftovers(dest) == []


def test_a_live_runs_staging_folder_is_not_swept(tmp_path):
    """A second run to the same destination sweeps only what dead runs left, never the folder a
    running conversion is writing (its owner holds the lock beside it)."""
    dest = tmp_path / "out"
    with staging(dest) as live:
        (live / "model.safetensors").write_bytes(b"being written")
        dead = tmp_path / f".{dest.name}.partial-dead"  # killed before locks, or by kill -9:
        dead.mkdir()
        killed = tmp_path / f".{dest.name}.partial-killed"
        killed.mkdir()
        Path(f"{killed}{LOCK_SUFFIX}").touch()  # its lock file outlived its owner, unlocked
        with staging(dest) as other:
            assert (live / "model.safetensors").read_bytes() == b"being written"
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                p.name + suffix for p in (live, other) for suffix in ("", LOCK_SUFFIX))
    assert leftovers(dest) == sorted([live.name, other.name])  # not committed, and now unlocked
    with pytest.raises(RuntimeError):
        with staging(dest):  # sweeps both, and removes its own folder as it fails
            raise RuntimeError("failed")
    assert leftovers(dest) == []


@pytest.mark.parametrize("where", ["input", "input folder", "above input folder", "under input"])
def test_output_may_not_be_or_hold_the_input(tiny_npz, tmp_path, where, capsys):
    dest = {"input": tiny_npz, "input folder": tiny_npz.parent, "above input folder": tiny_npz.parent.parent,
            "under input": tiny_npz / "out"}[where]
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"parityport: error: {dest}: the output folder may not be, contain or be inside the input {tiny_npz}"]
    assert sorted(p.name for p in tiny_npz.parent.iterdir()) == ["tiny.npz"]


def test_output_may_not_lie_inside_a_converted_folder(tiny_npz, tmp_path, capsys):
    outer = tmp_path / "outer"
    assert main(["convert", str(tiny_npz), "--out", str(outer), "--no-parity"]) == 0
    before = sorted(p.name for p in outer.iterdir())
    capsys.readouterr()
    inner = outer / "deeper" / "inner"
    assert main(["convert", str(tiny_npz), "--out", str(inner), "--no-parity"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"parityport: error: {inner}: lies inside {outer}, a folder parityport converted: its SHA256SUMS would not "
        "list the new folder, and converting that one again with --force would delete it; choose an --out outside it"]
    assert sorted(p.name for p in outer.iterdir()) == before


@pytest.mark.parametrize("target", ["input", "input folder", "elsewhere", "nowhere"])
def test_output_may_not_be_a_symlink(tiny_npz, tmp_path, target, capsys):
    aims = {"input": tiny_npz, "input folder": tiny_npz.parent,
            "elsewhere": tmp_path / "real", "nowhere": tmp_path / "missing"}[target]
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(aims)
    assert main(["convert", str(tiny_npz), "--out", str(link), "--no-parity", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0]
    assert link.is_symlink() and os.readlink(link) == str(aims)
    assert list((tmp_path / "real").iterdir()) == []
    with pytest.raises(InputError):
        check_destination(tiny_npz, link)


def test_an_output_that_cannot_be_made_is_one_line(tiny_npz, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    dest = tmp_path / "a-file" / "out"
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"parityport: error: {tmp_path / 'a-file'}: is not a folder, so --out {dest} cannot be made in it"]


def test_an_unexpected_exception_exits_3_not_as_a_failed_check(monkeypatch, capsys):
    import parityport.cli as cli

    def broken(args):
        raise RuntimeError("something nobody foresaw\nand a second line")

    monkeypatch.setattr(cli, "cmd_catalog", broken)
    assert main(["catalog"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == ("parityport: internal error: RuntimeError: something nobody foresaw (a fault in parityport, "
                       "not a failed check or bad input: the traceback above says where)")


@pytest.mark.parametrize("argv, line", [
    (["convert"], "parityport convert: error: the following arguments are required: src, --out "
                  "(see parityport convert --help)"),
    (["convert", "x.npz", "--out", "o", "--dtype", "int8"],
     "parityport convert: error: argument --dtype: invalid choice: 'int8' (choose from 'float32', 'bfloat16', "
     "'float16') (see parityport convert --help)"),
    (["frob"], "parityport: error: argument command: invalid choice: 'frob' (choose from 'convert', 'parity', "
               "'catalog', 'eval', 'verify', 'publish') (see parityport --help)"),
])
def test_usage_errors_are_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]



# ---------------------------------------------------------------------------
# Non-finite weights, colliding and tricky names

@pytest.fixture(scope="module")
def nan_npz(tmp_path_factory) -> Path:
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays["resnet/block2/unit01/b/standardized_conv2d/kernel"][0, 0, 0, :3] = np.nan
    arrays["resnet/block2/unit01/b/standardized_conv2d/kernel"][1, 1, 1, 0] = np.inf
    path = tmp_path_factory.mktemp("nan") / "nan.npz"
    write_bit_npz(path, arrays)
    return path


def test_nonfinite_weights_refused_by_name(nan_npz, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["convert", str(nan_npz), "--out", str(dest)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert str(nan_npz) in errors[0] and "bit.encoder.stages.1.layers.0.conv2.weight" in errors[0]
    assert "4 non-finite" in errors[0] and "--allow-nonfinite" in errors[0]
    assert not dest.exists() and leftovers(dest) == []


def test_allow_nonfinite_converts_and_parity_matches_nan_positions(tmp_path, capsys):
    arrays = bit_arrays(**TINY_BIT, seed=1)
    arrays["resnet/head/conv2d/bias"][[1, 4]] = np.nan, np.inf  # two classes' logits, and nothing else
    write_bit_npz(tmp_path / "head.npz", arrays)
    dest = tmp_path / "out"
    assert main(["convert", str(tmp_path / "head.npz"), "--out", str(dest), "--allow-nonfinite"]) == 0
    assert "NaN/Inf from the source weights reach" in capsys.readouterr().err
    with safe_open(dest / "model.safetensors", framework="numpy") as f:
        bias = f.get_tensor("classifier.1.bias")
    assert np.isnan(bias[1]) and np.isinf(bias[4]) and np.isfinite(np.delete(bias, [1, 4])).all()
    report = json.loads((dest / "parity.json").read_text())
    taps = {t["tap"]: t for t in report["runs"][0]["taps"]}
    assert report["passed"] and taps["pre_logits"]["nonfinite"] == 0
    assert taps["logits"]["nonfinite"] == 2 * taps["logits"]["shape"][0] and taps["logits"]["max_abs"] < 1e-4
    assert verifies(dest, with_parity=True)


def test_nan_everywhere_leaves_nothing_to_compare_and_fails(nan_npz, tmp_path, capsys):
    """One NaN weight spreads through GroupNorm to every later value: equal NaN on both sides proves nothing."""
    dest = tmp_path / "out"
    assert main(["convert", str(nan_npz), "--out", str(dest), "--allow-nonfinite"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"parityport: {nan_npz}: parity FAILED (first diverging tap: block2.unit01 (NaN/Inf in every value on both "
        "sides: nothing to compare))")
    assert not dest.exists()
    report = json.loads((tmp_path / "out.parity-failed" / "parity.json").read_text(),
                        parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))
    logits = next(t for t in report["runs"][0]["taps"] if t["tap"] == "logits")
    assert (report["passed"], logits["passed"], logits["max_abs"], logits["cosine"]) == (False, False, None, None)


def test_nan_at_different_positions_fails_parity():
    from parity.compare import Tolerance, compare_tap

    ref = np.array([1.0, np.nan, 3.0])
    assert compare_tap("t", ref, np.array([1.0, np.nan, 3.0]), Tolerance(0, 0)).passed
    assert not compare_tap("t", ref, np.array([np.nan, 2.0, 3.0]), Tolerance(0, 0)).passed
    assert not compare_tap("t", ref, np.array([1.0, np.inf, 3.0]), Tolerance(0, 0)).passed
    assert not compare_tap("t", np.array([1.0, 2.0]), np.array([1.0, np.nan]), Tolerance(1, 1)).passed


def test_two_source_keys_for_one_target_refused(tmp_path, capsys):
    arrays = bit_arrays(**TINY_BIT, seed=1)
    kernel = "resnet/block1/unit01/a/standardized_conv2d/kernel"
    arrays[kernel.replace("standardized_conv2d", "standardized_conv2d_7")] = arrays[kernel]
    src = tmp_path / "collide.npz"
    write_bit_npz(src, arrays)
    dest = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(dest)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(src) in errors[0] and kernel in errors[0]
    assert not dest.exists() and leftovers(dest) == []


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/b.json", "..\\x.json",
                                  "C:evil.json", "", "..", "nul\x00.json"])
def test_output_file_names_with_path_tricks_refused(name):
    with pytest.raises(InputError, match="path trick"):
        safe_file_name(name)


@pytest.mark.parametrize("name", ["__metadata__", ""])
def test_tensor_names_that_break_the_header_refused(tmp_path, name):
    with pytest.raises(InputError, match="tensor name"):
        write_safetensors(tmp_path / "m.safetensors", {name: LazyTensor.of(np.ones(2, np.float32))})


@pytest.mark.parametrize("layout", ["dense (C, R) <- (R, C)", "kernel (O, I, H, W) <- (H, W, I, O)", "other view"])
def test_transposed_tensors_are_written_without_a_full_copy(tmp_path, monkeypatch, layout):
    """A strided (transposed) tensor is written a block at a time: the writer's peak allocation stays
    under four chunks (a block copied, its bytes, bookkeeping; about 2.1 measured), not the tensor's
    size, and the file still reads back exact."""
    import tracemalloc

    from converters import writer

    chunk = 256 << 10  # under memory.HUGE_PAGE, so every piece comes from numpy and tracemalloc sees it
    monkeypatch.setattr(writer, "_CHUNK", chunk)
    shape, axes = {"dense (C, R) <- (R, C)": ((2048, 2048), (1, 0)),
                   "kernel (O, I, H, W) <- (H, W, I, O)": ((3, 3, 512, 512), (3, 2, 0, 1)),
                   "other view": ((64, 256, 256), (2, 0, 1))}[layout]
    base = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    view = np.transpose(base, axes)
    assert not view.flags.c_contiguous and base.nbytes >= 8 << 20
    tracemalloc.start()
    try:
        write_safetensors(tmp_path / "m.safetensors", {"w": LazyTensor(view.shape, view.dtype, lambda: view)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * chunk, f"{layout}: the writer allocated {peak / 2**20:.1f} MiB at its peak"
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), view)


def test_a_rerun_is_a_no_op_only_for_the_same_request(tiny_npz, tmp_path, capsys):
    """Same source and version but another dtype, or parity asked of an unverified folder: not a no-op."""
    dest = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 0
    assert "already a float32 conversion of tiny.npz; nothing to do" in capsys.readouterr().err
    for request in (["--no-parity", "--dtype", "bfloat16"], []):  # other dtype; verification asked
        assert main(["convert", str(tiny_npz), "--out", str(dest), *request]) == 2
        assert capsys.readouterr().err.strip() == f"parityport: error: {dest}: exists; pass --force to replace it"


def test_a_source_changed_during_conversion_is_refused(tiny_npz, tmp_path, monkeypatch, capsys):
    """Its hash, CRC-checked bytes and mapped pages could disagree: nothing is published."""
    import shutil

    import converters.export as export

    src = tmp_path / "src.npz"
    shutil.copy(tiny_npz, src)
    write_model = export.write_model

    def write_then_touch(*args, **kwargs):
        write_model(*args, **kwargs)
        os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # as another writer would

    monkeypatch.setattr(export, "write_model", write_then_touch)
    dest = tmp_path / "out"
    assert main(["convert", str(src), "--out", str(dest), "--no-parity"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "src.npz: changed while it was being converted; nothing was written")
    assert not dest.exists() and leftovers(dest) == []


def test_a_commit_parking_the_old_folder_is_not_swept_under_it(tiny_npz, tmp_path, monkeypatch):
    """Where folders cannot be swapped in one step, the replaced folder is parked as `.NAME.old-X`;
    a second run sweeping then (its start) leaves it, as its owner still holds the lock."""
    import converters.export as export

    dest = tmp_path / "out"
    assert main(["convert", str(tiny_npz), "--out", str(dest), "--no-parity"]) == 0
    monkeypatch.setattr(export, "_exchange", lambda a, b: False)  # as on a file system without renameat2
    replace = os.replace

    def sweep_then_replace(src, dst):
        if Path(src) == dest:  # parked next: another run starting now sweeps
            export._sweep(dest)
            assert Path(dst).parent.is_dir(), "the parking folder of a live commit was swept"
        replace(src, dst)

    monkeypatch.setattr(export.os, "replace", sweep_then_replace)
    with staging(dest) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        export.commit(tmp, dest)
    assert (dest / "model.safetensors").read_bytes() == b"new"
    assert leftovers(dest) == []

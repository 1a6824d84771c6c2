"""Targeted attacks on the zip readers and on the shape and cfg checks (`tests/attacks_zip.py`),
each through the command: exit 2, one line naming the file and the problem, nothing written,
in bounded memory and time."""

from __future__ import annotations

import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.errors import InputError
from converters.readers.npz import read_npz
from converters.readers.torch_pickle import read_torch
from tests.attacks_zip import SEEDS
from tests.measure import run_measured

ADDRESS_SPACE = 3 << 30  # soft RLIMIT_AS of the command: an allocation past it fails fast
MAX_RSS = 512 << 20      # peak resident memory of the command and its isolated parse
MAX_CPU_S = 5.0          # CPU seconds of both (wall time varies with a shared machine's load)
WALL_LIMIT_S = 120.0     # a command still running then is killed, and fails its test

D2V1 = "mp_rank_00_model_states"
EXPECTED = {
    "pt_storage_bad_crc": f"member '{D2V1}/data/39': bad CRC-32 (corrupt, or changed since it was opened)",
    "pt_dropped_storage_bad_crc": "member 'checkpoint-799/data/65': bad CRC-32 (corrupt, or changed since "
                                  "it was opened)",
    "pt_entry_at_other_member": f"member '{D2V1}/data/7': local header names b'{D2V1}/data/8'",
    "pt_entry_inside_member": f"members '{D2V1}/data/16' and '{D2V1}/data/7' overlap (the directory points "
                              "one entry into another member's bytes); corrupt or forged archive",
    "npz_entry_inside_member": "members 'resnet/block1/unit01/b/standardized_conv2d/kernel.npy' and "
                               "'resnet/head/conv2d/bias.npy' overlap (the directory points one entry into "
                               "another member's bytes); corrupt or forged archive",
    "npz_zero_dim_classes": "member 'resnet/head/conv2d/bias.npy' declares an absurd shape [1000000000000, 0]",
    "h5_zero_dim_classes": "dataset '/head/dense/resnet/head/dense/bias:0' declares shape [1000000000000, 0], "
                           "over the 64 GiB limit (a zero dimension counted as one)",
    "pt_zero_dim_classes": "tensor 'module.head.weight' declares shape [1000000000000, 0], past what the file "
                           "could hold (a zero dimension counted as one)",
    "npz_zero_dim_10m_classes": "resnet/head/conv2d/bias has shape [10000000, 0]; expected 1 dimension, "
                                "each from 1 to 131072",
    "h5_zero_dim_10m_classes": "resnet/head/dense/bias has shape [10000000, 0]; expected 1 dimension, "
                               "each from 1 to 131072",
    "pt_zero_dim_10m_classes": "module.head.weight has shape [10000000, 0]; expected 2 dimensions, "
                               "each from 1 to 131072",
    "npz_dim_digits": "member 'resnet/head/conv2d/bias.npy' declares an absurd shape "
                      "[<an integer of 3001 digits>, 0]",
    "npz_dims_product_digits": "member 'resnet/head/conv2d/bias.npy' declares an absurd shape "
                               "[<an integer of 2501 digits>, <an integer of 2501 digits>, 0]",
    "bit_width_overflow": "member 'resnet/root_block/standardized_conv2d/kernel.npy' declares an absurd shape "
                          "[7, 7, 0, <an integer of 333 digits>]",
    "pt_dim_digits": "tensor 'module.head.weight' declares shape [<an integer of 5001 digits>, 0], "
                     "stride [1, 1], offset 0: past torch's int64",
    "pt_dim_digits_nonzero": "tensor 'module.head.weight' declares shape [<an integer of 5001 digits>, 64], "
                             "stride [64, 1], offset 0: past torch's int64",
    "d2v2_cfg_heads_digits": "cfg field 'num_heads' gives <an integer of 5001 digits> attention heads, which "
                             "do not split the width 64 evenly",
    "d2v2_cfg_eps_huge": "cfg field 'norm_eps' is <an integer of 401 digits>; a LayerNorm eps is at most 0.1",
}
# Item 3 of the attacks: numbers that broke arithmetic or formatting; refused in bounded cost.
BOUNDED = {"npz_dim_digits", "npz_dims_product_digits", "bit_width_overflow", "pt_dim_digits",
           "pt_dim_digits_nonzero", "d2v2_cfg_heads_digits", "d2v2_cfg_eps_huge"}


def _convert(src: Path, out: Path) -> tuple[int, list[str], int, float]:
    """Run `parityport convert` under an address-space limit; return its exit code, stderr lines, peak
    RSS in bytes and CPU seconds (its isolated parse included)."""
    return run_measured(["convert", str(src), "--out", str(out), "--no-parity"], ADDRESS_SPACE, WALL_LIMIT_S,
                        cwd=src.parent)


def test_every_seed_has_an_expected_refusal():
    assert sorted(SEEDS) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(SEEDS))
def test_attack_is_refused_with_one_line_and_nothing_written(tmp_path: Path, name: str) -> None:
    src = SEEDS[name](tmp_path)
    assert src.stat().st_size < 2 << 20
    out = tmp_path / "out"
    start = time.monotonic()
    code, err, rss, cpu = _convert(src, out)
    wall = time.monotonic() - start
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert (code, errors) == (2, [f"parityport: error: {src}: {EXPECTED[name]}"]), err
    assert err[-1] == errors[0]  # at most the line announcing the conversion comes before it
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert wall < WALL_LIMIT_S
    if name in BOUNDED:
        assert src.stat().st_size < 1 << 20
        assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB"
        assert cpu < MAX_CPU_S, f"{cpu:.1f} CPU seconds"


# ---------------------------------------------------------------- the running CRC, piece by piece


def _shared_storage_file(path: Path) -> tuple[Path, bytes]:
    """Two views of one 4096-float storage: its first and last quarters; the middle half is
    touched by no tensor. Returns the path and the storage's bytes."""
    base = torch.arange(4096, dtype=torch.float32)
    torch.save({"head": base[:1024], "tail": base[3072:]}, path)
    return path, base.numpy().tobytes()


def _member_data(raw: bytes, header_offset: int) -> int:
    """Where a zip member's data starts: after its local header, by that header's own lengths."""
    name_len, extra_len = struct.unpack_from("<2H", raw, header_offset + 26)
    return header_offset + 30 + name_len + extra_len


def _corrupt(path: Path, data: bytes, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[raw.find(data) + at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_views_of_one_storage_are_crc_checked_once_and_whole(tmp_path: Path, monkeypatch) -> None:
    """Loads add each byte to the member's CRC once, in order, whatever the views read; the bytes no
    view reads are added by `verify_unread`, and a good file passes."""
    from converters.readers import zipcheck

    path, data = _shared_storage_file(tmp_path / "views.pt")
    covered = []
    real = zipcheck.crc32
    monkeypatch.setattr(zipcheck, "crc32", lambda chunk, crc=0: covered.append(len(chunk)) or real(chunk, crc))
    checkpoint = read_torch(path)
    np.testing.assert_array_equal(checkpoint.tensors["tail"].load(), np.arange(3072, 4096, dtype=np.float32))
    np.testing.assert_array_equal(checkpoint.tensors["head"].load(), np.arange(1024, dtype=np.float32))
    assert covered == [len(data)]  # the tail reached the last byte: all of it, once; the head added nothing
    checkpoint.verify_unread()
    assert sum(covered[1:]) < 4096  # the rest: small members (byteorder, version, ...) only


@pytest.mark.parametrize("at", [8, 4096 * 2, 4096 * 4 - 8])
def test_a_corrupt_byte_is_found_wherever_it_lies(tmp_path: Path, at: int) -> None:
    """In the first view, between the views (read by no tensor) or in the last: found by the load
    that reaches the member's end, or by `verify_unread` when no load does."""
    path, data = _shared_storage_file(tmp_path / "views.pt")
    _corrupt(path, data, at)
    checkpoint = read_torch(path)
    checkpoint.tensors["head"].load()  # never reaches the end: not checked yet
    with pytest.raises(InputError, match=r"member 'views/data/0': bad CRC-32") as error:
        checkpoint.verify_unread()
    assert str(error.value).startswith(f"{path}: ")
    with pytest.raises(InputError, match=r"member 'views/data/0': bad CRC-32"):
        read_torch(path).tensors["tail"].load()


def test_a_corrupt_small_member_is_found_by_verify_unread(tmp_path: Path) -> None:
    """A member no tensor reads (`version`) is checked too."""
    path = tmp_path / "small.pt"
    torch.save({"w": torch.ones(4)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo("small/version").header_offset
    raw[_member_data(raw, offset)] ^= 0x01
    path.write_bytes(bytes(raw))
    checkpoint = read_torch(path)
    checkpoint.tensors["w"].load()
    with pytest.raises(InputError, match=r"member 'small/version': bad CRC-32"):
        checkpoint.verify_unread()


def test_npz_members_no_load_read_are_crc_checked_by_verify_unread(tmp_path: Path) -> None:
    path = tmp_path / "two.npz"
    b = np.arange(2**14, dtype=np.float32) + 1  # past what reading its header buffers
    np.savez(path, a=np.arange(64, dtype=np.float32), b=b)
    _corrupt(path, b.tobytes(), b.nbytes - 100)
    checkpoint = read_npz(path)
    checkpoint.tensors["a"].load()
    with pytest.raises(InputError, match=r"member 'b.npy': bad CRC-32"):
        checkpoint.verify_unread()


def test_a_corrupt_deflate_stream_in_an_npz_is_refused_as_corrupt(tmp_path: Path) -> None:
    """A deflated member whose stream does not inflate is bad input (zlib.error), not a fault of ours."""
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, w=np.arange(4096, dtype=np.float32))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("w.npy")
    start = _member_data(data, info.header_offset)
    data[start:start + 8] = b"\xff" * 8  # the first deflate block's header: invalid
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"member 'w\.npy': truncated or corrupt \(Error -3 while decompressing"):
        read_npz(path)


def test_an_npy_header_that_does_not_tokenize_is_a_bad_header(tmp_path: Path) -> None:
    """numpy's 1.0 header filter raises tokenize.TokenError on an unclosed bracket: bad input too."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': ((1,), }"
    header += b" " * (118 - len(header)) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 4
    path = tmp_path / "bad-header.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", member)
    with pytest.raises(InputError, match=r"member 'w\.npy': bad \.npy header \(\('EOF in multi-line statement'"):
        read_npz(path)

"""Parsing in a limited child process: crashes and memory blow-ups become one-line errors."""

import pickle
import zipfile

import numpy as np
import pytest

from checkpoints.synthetic import bit_arrays, write_bit_h5, write_bit_npz
from converters.errors import InputError, UnsafeInputError
from converters.readers import isolate


def test_clean_file_opens(tmp_path):
    write_bit_npz(tmp_path / "a.npz", bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3))
    checkpoint = isolate.open_isolated(tmp_path / "a.npz")
    assert checkpoint.format == "npz" and len(checkpoint.tensors) == 45


def test_the_child_runs_our_code_not_the_current_folders(tmp_path, monkeypatch):
    write_bit_npz(tmp_path / "a.npz", bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3))
    planted = tmp_path / "converters" / "readers"
    planted.mkdir(parents=True)
    for package in (planted.parent, planted):
        (package / "__init__.py").write_text("")
    (planted / "isolate.py").write_text("open('PLANTED', 'w').close(); print('{\"ok\": true}')\n")
    monkeypatch.chdir(tmp_path)
    isolate.preflight(tmp_path / "a.npz")
    assert not (tmp_path / "PLANTED").exists()


def test_child_errors_come_back_with_their_class(tmp_path):
    class Boom:
        def __reduce__(self):
            import os
            return os.system, ("true",)

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": Boom()}, protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeInputError, match=r"refusing to load: pickle calls (posix|os)\.system"):
        isolate.preflight(path)


def test_a_crashing_parser_is_a_clean_error(tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(3))
    real_run = isolate.subprocess.run

    def crash(command, **kw):  # the same child machinery, made to segfault like a broken C parser
        return real_run([command[0], "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], **kw)

    monkeypatch.setattr(isolate.subprocess, "run", crash)
    with pytest.raises(InputError, match=r"x\.npz: the SIGSEGV signal killed the parser on this file"):
        isolate.preflight(path)


def test_memory_limit_is_enforced(tmp_path):
    path = tmp_path / "big.pt"
    # a small pickle that builds a two-million-element list while parsing: fine with the
    # default limit, refused under a 64 MiB one instead of taking the converter down
    payload = b"\x80\x04" + b"(" + b"K\x01" * 2_000_000 + b"l."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    with pytest.raises(InputError, match=r"big\.pt: parsing needs more than 0\.0625 GiB of memory; refused"):
        isolate.preflight(path, memory=64 << 20)
    isolate.preflight(path)


def test_timeout_is_enforced(tmp_path, monkeypatch):
    path = tmp_path / "slow.npz"
    np.savez(path, a=np.zeros(3))
    real_run = isolate.subprocess.run
    monkeypatch.setattr(isolate.subprocess, "run",
                        lambda command, **kw: real_run([command[0], "-c", "import time; time.sleep(30)"], **kw))
    with pytest.raises(InputError, match=r"slow\.npz: parsing the file took longer than 1 s; refused"):
        isolate.preflight(path, timeout=1)


@pytest.mark.parametrize("fmt", ["npz", "pth", "h5"])
def test_a_stand_ins_mark_changes_nothing_a_reader_sees(tmp_path, monkeypatch, fmt):
    """`synthetic_stand_in` ends its file (a zip archive's comment; bytes after an HDF5 file) with a
    mark that names it a stand-in under any file name; the readers, numpy, torch and h5py read the
    same tensors from it as from the unmarked file."""
    import shutil

    import torch

    from checkpoints import offline
    from checkpoints.catalog import lookup

    def tiny(entry, path):  # a small file in the entry's container, in place of the full-size one
        if fmt == "npz":
            write_bit_npz(path, bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3))
        elif fmt == "h5":
            write_bit_h5(path, bit_arrays(depths=(1, 1, 1, 1), root_width=32, num_classes=3))
        else:
            torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}}, path)

    name = {"npz": "BiT-M-R50x1-ILSVRC2012", "pth": "data2vec-vision-base-800ep", "h5": "BiT-S-R50x1.h5"}[fmt]
    monkeypatch.setitem(offline.WRITERS, lookup(name).family, tiny)
    marked = offline.synthetic_stand_in(lookup(name), tmp_path / "synthetic")
    assert marked.name == f"{name.removesuffix('.h5')}.synthetic.{fmt}"
    renamed = shutil.copy(marked, tmp_path / f"{name}.{fmt}")
    plain = tmp_path / f"plain.{fmt}"
    tiny(None, plain)
    assert offline.is_stand_in(renamed) and not offline.is_stand_in(plain)
    assert not offline.is_stand_in(tmp_path / "missing.npz") and not offline.is_stand_in(tmp_path)
    ours, theirs = isolate.open_isolated(renamed), isolate.open_isolated(plain)
    assert ours.tensors.keys() == theirs.tensors.keys()
    for key in ours.tensors:
        np.testing.assert_array_equal(ours.tensors[key].load(), theirs.tensors[key].load())
    if fmt == "npz":
        with np.load(renamed) as a, np.load(plain) as b:
            assert all(np.array_equal(a[k], b[k]) for k in b.files) and a.files == b.files
    elif fmt == "h5":
        import h5py

        with h5py.File(renamed, "r") as a, h5py.File(plain, "r") as b:
            assert list(a.attrs["layer_names"]) == list(b.attrs["layer_names"])
    else:
        assert torch.equal(torch.load(renamed)["model"]["w"], torch.arange(6.0).reshape(2, 3))

"""The targeted fuzz corpus: every attack of every `tests/attacks_*.py`, as it is and mutated.

Each module's `SEEDS` maps a name to a function that writes one attack file into a folder and returns
its path. A regular file is run as written and then mutated (bytes overwritten, or the file cut);
anything else (a FIFO, a device link) runs as it is. Every case is read the way `convert` reads a
source in its own process, in a worker process that reports per case: it must end in a clean read
or the readers' InputError (never another exception: that is exit 3), within `HANG_SECONDS`, with
a peak RSS under `MAX_RSS`. `make test` runs a few cases per seed; `make fuzz` 5,000 per reader.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import select
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import converters
from converters.readers.detect import HDF5_OFFSETS, HDF5_SIGNATURE, ZIP_MAGICS

REPO = Path(converters.__file__).resolve().parents[1]
HANG_SECONDS = 10.0
MAX_RSS = 1 << 30
FAST_CASES_PER_SEED = 20
LONG_CASES_PER_READER = 5000
READERS = ("npz", "h5", "torch")
# A safety valve for the machine, well above MAX_RSS: past it an allocation fails in the worker.
WORKER_ADDRESS_SPACE = 6 << 30

# The worker reads one case per line of stdin (a path) and answers one JSON line: the outcome, the
# seconds it took and the peak RSS while it ran (the kernel's high-water mark, reset per case).
_WORKER = r"""
import json, resource, sys, time, traceback
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
from converters.errors import InputError
from converters.family import detect_family
from converters.readers.detect import open_checkpoint
from converters.readers.source import open_source
from converters.registry import CONVERTERS, DETECTORS

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def read(path):
    source = open_source(path)
    checkpoint = open_checkpoint(source.handle)
    for tensor in checkpoint.tensors.values():
        tensor.load()
    CONVERTERS[detect_family(checkpoint, DETECTORS)](checkpoint)

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.monotonic()
    try:
        read(line.rstrip("\n"))
        outcome, detail = "read", ""
    except InputError as error:
        outcome, detail = "refused", str(error)
    except BaseException:
        outcome, detail = "internal", traceback.format_exc()
    print(json.dumps({"outcome": outcome, "detail": detail, "seconds": time.monotonic() - start,
                      "peak_rss": peak_rss()}), flush=True)
"""


@dataclass(frozen=True)
class Case:
    """One file to read: `seed` as written (`mutation` None) or mutated by `mutation`'s (seed, number)."""

    seed: str
    reader: str
    path: Path
    original: bytes | None  # None: not a regular file, run as it is
    mutation: int | None = None

    def write(self) -> Path:
        if self.mutation is None:
            return self.path
        target = self.path.with_name("mutant-" + self.path.name)
        fresh = target.with_name(target.name + ".new")
        fresh.write_bytes(mutate(self.original, random.Random(f"{self.seed}/{self.mutation}")))
        # a new file, not the last case's rewritten in place: a mapping of that one the worker still
        # holds would fault (SIGBUS) on pages past a shorter file's end, a fault of the harness
        os.replace(fresh, target)
        return target


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to four bytes overwritten, or (one time in eight) cut short."""
    if rng.random() < 0.125:
        return data[: rng.randrange(len(data))]
    changed = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        changed[rng.randrange(len(changed))] = rng.randrange(256)
    return bytes(changed)


def seed_writers() -> dict[str, Callable[[Path], Path]]:
    """Every `SEEDS` entry of every `tests/attacks_*.py`, as "module:name"."""
    seeds = {}
    for module_file in sorted(Path(__file__).parent.glob("attacks_*.py")):
        module = importlib.import_module(module_file.stem)
        seeds.update({f"{module_file.stem}:{name}": write for name, write in module.SEEDS.items()})
    return seeds


def reader_of(data: bytes) -> str:
    """Which reader a file's bytes reach (as detection decides it, roughly: this only groups cases)."""
    if any(data[offset:offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE for offset in HDF5_OFFSETS):
        return "h5"
    if data.startswith(ZIP_MAGICS):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except Exception:  # noqa: BLE001  a broken archive: whichever reader, it is refused
            names = []
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
    return "torch"


def build_seeds(folder: Path) -> list[Case]:
    """Each seed written into a folder of its own, as an unmutated case."""
    cases = []
    for i, (name, write) in enumerate(seed_writers().items()):
        (folder / str(i)).mkdir()
        path = write(folder / str(i))
        regular = os.path.exists(path) and stat.S_ISREG(os.stat(path).st_mode)
        original = path.read_bytes() if regular else None
        cases.append(Case(name, reader_of(original) if regular else "special", path, original))
    return cases


def corpus(seeds: list[Case], per_seed: int | None = None, per_reader: int | None = None,
           reader: str | None = None) -> list[Case]:
    """The seeds as they are, then mutants: `per_seed` of every regular seed, or `per_reader` in all
    for `reader`'s seeds, taken in turn."""
    chosen = [c for c in seeds if reader is None or c.reader in (reader, "special")]
    mutable = [c for c in chosen if c.original and c.reader != "special"]
    count = per_seed * len(mutable) if per_seed is not None else per_reader
    mutants = [Case(**{**vars(mutable[i % len(mutable)]), "mutation": i}) for i in range(count if mutable else 0)]
    return chosen + mutants


class Worker:
    """A process that reads cases and reports each; replaced when a case hangs or kills it."""

    def __init__(self) -> None:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER, str(REPO), str(WORKER_ADDRESS_SPACE)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        ready = self._answer(120.0)
        assert ready == {"ready": True}, f"the fuzz worker did not start: {ready}"

    def _answer(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return {"outcome": "hang", "detail": f"no answer in {timeout:g} s"}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            return {"outcome": "crash", "detail": f"the worker died (exit {code}): "
                                                  f"{self.process.stderr.read()[-2000:]}"}
        return json.loads(line)

    def run(self, path: Path) -> dict:
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        return self._answer(HANG_SECONDS)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def fuzz(cases: list[Case]) -> tuple[list[str], dict[str, int]]:
    """Run every case; return the failures (one line each) and a count per outcome."""
    failures, counts = [], {}
    worker = Worker()
    try:
        for case in cases:
            answer = worker.run(case.write())
            outcome = answer["outcome"]
            counts[outcome] = counts.get(outcome, 0) + 1
            where = f"{case.seed} mutation {case.mutation}" if case.mutation is not None else case.seed
            if outcome in ("hang", "crash", "internal"):
                failures.append(f"{where}: {outcome}: {answer['detail'].strip().splitlines()[-1:]}")
            elif answer["peak_rss"] > MAX_RSS:
                failures.append(f"{where}: peak RSS {answer['peak_rss'] / (1 << 20):.0f} MiB")
            if outcome in ("hang", "crash"):
                worker.close()
                worker = Worker()
    finally:
        worker.close()
    return failures, counts


def test_the_corpus_holds_every_attack_module(tmp_path: Path) -> None:
    seeds = build_seeds(tmp_path)
    modules = {c.seed.split(":")[0] for c in seeds}
    assert modules == {p.stem for p in Path(__file__).parent.glob("attacks_*.py")} and "attacks_special" in modules
    mutants = corpus(seeds, per_seed=3)
    assert all(c.write().read_bytes() != c.original for c in mutants if c.mutation is not None)
    assert len(mutants) == len(seeds) + 3 * sum(c.original is not None for c in seeds)


def test_fuzz_targeted_corpus(tmp_path: Path) -> None:
    failures, counts = fuzz(corpus(build_seeds(tmp_path), per_seed=FAST_CASES_PER_SEED))
    assert not failures, f"{len(failures)} failures ({counts}):\n" + "\n".join(failures[:20])


@pytest.mark.fuzz_long
@pytest.mark.parametrize("reader", READERS)
def test_fuzz_targeted_corpus_long(tmp_path: Path, reader: str) -> None:
    failures, counts = fuzz(corpus(build_seeds(tmp_path), per_reader=LONG_CASES_PER_READER, reader=reader))
    print(f"{reader}: {counts}")  # what `make fuzz` reports of each reader's cases
    assert not failures, f"{len(failures)} failures ({counts}):\n" + "\n".join(failures[:20])

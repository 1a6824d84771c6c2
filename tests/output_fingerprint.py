"""What a user sees, as one JSON: the check that a refactoring changed nothing.

`python tests/output_fingerprint.py record FILE` converts the default BiT, data2vec 1.0 and
data2vec 2.0 stand-ins (offline, in a fresh cache) and runs a set of bad-input commands; it
records the sha256 of model.safetensors, config.json and preprocessor_config.json, parity.json
(timings aside), the CLI's messages (temporary paths replaced) and exit codes.
`python tests/output_fingerprint.py check FILE` does the same and prints every difference
from FILE (exit 1 when there is one). Not collected by pytest: it takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONVERSIONS = {"bit": "BiT-M-R50x1-ILSVRC2012", "data2vec1": "data2vec-vision-base-ft1k",
               "data2vec2": "data2vec2-vision-base-ft1k"}
FOLDER_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")
TIMING_WORDS = ("time", "seconds", "elapsed", "duration")  # keys whose values differ run to run


def _bad_inputs(work: Path) -> dict[str, list[str]]:
    """Commands that must be refused, each with the files it needs written under `work`."""
    (work / "not-a-checkpoint.npz").write_bytes(b"hello")
    (work / "empty.pt").write_bytes(b"")
    (work / "exists").mkdir()
    (work / "exists" / "x").write_text("x")
    return {
        "missing file": ["convert", str(work / "nope.npz"), "--out", str(work / "o1")],
        "not a checkpoint": ["convert", str(work / "not-a-checkpoint.npz"), "--out", str(work / "o2")],
        "empty .pt": ["convert", str(work / "empty.pt"), "--out", str(work / "o3")],
        "unknown name": ["convert", "BiT-Q-R7x9", "--out", str(work / "o4")],
        "no --out": ["convert", str(work / "not-a-checkpoint.npz")],
        "bad dtype": ["convert", str(work / "not-a-checkpoint.npz"), "--out", str(work / "o5"),
                      "--dtype", "int8"],
        "parity on no folder": ["parity", str(work / "not-a-checkpoint.npz"), str(work / "nodir")],
        "verify no folder": ["verify", str(work / "nodir")],
        "verify user folder": ["verify", str(work / "exists")],
        "publish no repo": ["publish", str(work / "exists")],
        "eval no data": ["eval", "--model", str(work / "exists"), "--data", str(work / "nodata")],
        "eval bad expect": ["eval", "--model", str(work / "exists"), "--data", str(work),
                            "--expect", "101"],
        "unknown command": ["frobnicate"],
    }


def _run(argv: list[str], env: dict[str, str], work: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "parityport.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=1800)

    def clean(text: str) -> list[str]:
        lines = [line.replace(str(work), "<work>") for line in text.splitlines()]
        return [line for line in lines if line.strip() and "\r" not in line]  # progress bars aside

    return {"exit": done.returncode, "stdout": clean(done.stdout), "stderr": clean(done.stderr)}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if not any(word in k.lower() for word in TIMING_WORDS)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def fingerprint() -> dict:
    """Run every conversion and bad-input command; return what a user would see of each."""
    with tempfile.TemporaryDirectory(prefix="fingerprint-") as tmp:
        work = Path(tmp)
        # a port nothing listens on: every download is refused at once, so stand-ins are used
        env = {**os.environ, "PARITYPORT_CACHE": str(work / "cache"), "PARITYPORT_BASE_URL": "http://127.0.0.1:9",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        result: dict = {"conversions": {}, "bad_inputs": {}}
        for family, name in CONVERSIONS.items():
            out = work / "out" / name
            run = _run(["convert", name, "--out", str(out), "--synthetic-if-offline"], env, work)
            files = {f: _sha256(out / f) for f in FOLDER_FILES}
            if (out / "parity.json").exists():
                parity = _without_timings(json.loads((out / "parity.json").read_text()))
                files["parity.json"] = hashlib.sha256(json.dumps(parity, sort_keys=True).encode()).hexdigest()
            result["conversions"][family] = {**run, "files": files}
            print(f"{family}: exit {run['exit']}", file=sys.stderr, flush=True)
        (work / "bad").mkdir()
        for label, argv in _bad_inputs(work / "bad").items():
            result["bad_inputs"][label] = _run(argv, env, work)
        return result


def _differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{where}/{k}")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    now = fingerprint()
    if argv[0] == "record":
        path.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {path}")
        return 0
    differences = _differences(json.loads(path.read_text()), now)
    for line in differences:
        print(line)
    print(f"{len(differences)} difference(s) from {path}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

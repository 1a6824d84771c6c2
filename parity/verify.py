"""`parityport verify DIR`: is this folder still the verified conversion it claims to be?

Checks, in order: every file against SHA256SUMS (changed, missing, unlisted);
parity.json present and passed; a strict load in transformers (no missing,
unexpected or mismatched keys; `trust_remote_code` only when config.json has
an `auto_map`, and only after the checksums match); and a smoke run on the
standard photo at the size parity.json recorded: finite logits of the recorded
shape. Nothing is recomputed that has no recorded value to compare with.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown
from converters.errors import CheckFailed, InputError

SUMS_FILE = "SHA256SUMS"
PARITY_FILE = "parity.json"
SUMS_MISSING = f"{SUMS_FILE}: missing (no checksums to verify against)"


def checksum_problems(folder: Path) -> list[str]:
    """One line per file that is changed, missing, or not listed in SHA256SUMS (or one saying that
    SHA256SUMS itself is missing)."""
    from converters.writer import check_sha256sums, listed_sha256sums

    if not (folder / SUMS_FILE).is_file():
        return [SUMS_MISSING]
    listed = listed_sha256sums(folder)
    problems = []
    for name in check_sha256sums(folder):
        if name not in listed:
            problems.append(f"{name}: not listed in {SUMS_FILE}")
        elif not (folder / name).is_file():
            problems.append(f"{name}: missing (listed in {SUMS_FILE})")
        else:
            problems.append(f"{name}: sha256 does not match {SUMS_FILE} (changed since conversion)")
    return problems


def read_parity(folder: Path) -> dict[str, Any] | None:
    """parity.json as a dict, or None when it is missing or unreadable."""
    try:
        report = json.loads((folder / PARITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def parity_problems(folder: Path) -> list[str]:
    """A line when parity.json is missing, unreadable or records a failed comparison."""
    report = read_parity(folder)
    if report is None:
        state = "unreadable" if (folder / PARITY_FILE).is_file() else "missing (converted with --no-parity?)"
        return [f"{PARITY_FILE}: {state}; the folder is not verified"]
    if report.get("passed") is not True:
        from parity.report import recorded_failure

        return [f"{PARITY_FILE}: parity FAILED ({recorded_failure(report)})"]
    return []


def record_problems(folder: Path) -> tuple[list[str], bool]:
    """What the folder's own records (SHA256SUMS, parity.json) say against it, the leading line first,
    and whether the lead is a check that ran and failed (True, exit 1) rather than a folder that cannot
    be checked for what it is (False, exit 2: no SHA256SUMS, no readable parity record).

    A recorded parity failure leads: it is why a `.parity-failed` folder has no SHA256SUMS. Then what
    the folder lacks, then files that do not match SHA256SUMS.
    """
    checksums, parity = checksum_problems(folder), parity_problems(folder)
    failed_parity = parity if read_parity(folder) is not None else []  # else parity says it is missing
    lacking = [p for p in checksums if p == SUMS_MISSING] + [p for p in parity if p not in failed_parity]
    mismatched = [p for p in checksums if p != SUMS_MISSING]
    problems = failed_parity + lacking + mismatched
    return problems, bool(problems) and problems[0] not in lacking


def refuse(folder: Path, doing: str, problems: list[str], failed: bool) -> None:
    """Raise for `problems` (non-empty), leading line first: CheckFailed when `failed` (a check ran
    and failed, exit 1), else InputError (the folder cannot be checked for what it is, exit 2)."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if failed:
        raise CheckFailed(f"{folder}: {doing}: {problems[0]}{more}")
    raise InputError(folder, f"{doing}: {problems[0]}{more}")


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise InputError(folder / "config.json", f"cannot read: {error}") from None


def code_problems(folder: Path) -> list[str]:
    """A line for each way a folder's custom code (its config's `auto_map`) is not the code parityport
    ships byte for byte: such code is never run (`verify`, `parity`) nor published. A folder with
    no `auto_map` runs none."""
    from converters.data2vec import AUTO_MAP, hf_code_files

    auto_map = _config(folder).get("auto_map")
    if auto_map is None:
        return []
    if not isinstance(auto_map, dict) or any(v not in AUTO_MAP.values() for v in auto_map.values()):
        return [f"config.json: auto_map {auto_map!r} names code parityport does not ship; refusing to run it"]
    return [f"{name}: missing or differs from the code parityport ships; refusing to run it with trust_remote_code"
            for name, data in hf_code_files().items()
            if not (folder / name).is_file() or (folder / name).read_bytes() != data]


def check_code(folder: Path) -> None:
    """Raise InputError with the first of `code_problems`: called before any trust_remote_code load."""
    problems = code_problems(folder)
    if problems:
        raise InputError(folder, problems[0])


def load_strict(folder: Path):
    """Load as its users do: AutoModelForImageClassification, or AutoModel for an encoder without a
    head; returns (model, problems naming bad keys)."""
    import torch
    from transformers import AutoModel, AutoModelForImageClassification

    from parity.card import is_classifier

    config = _config(folder)
    loader = AutoModelForImageClassification if is_classifier(config) else AutoModel
    model, info = loader.from_pretrained(
        str(folder), trust_remote_code="auto_map" in config, dtype=torch.float32, output_loading_info=True)
    problems = [f"weights: {kind.replace('_', ' ')}: {sorted(map(str, keys))[:5]}"
                for kind, keys in info.items() if keys]
    return model.eval(), problems


def _photo_size(report: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the first run's input, e.g. `noise 224x224` → (224, 224)."""
    runs = report.get("runs") or [{}]
    match = re.search(r"(\d+)x(\d+)", str(runs[0].get("input", "")))
    return (int(match.group(1)), int(match.group(2))) if match else (224, 224)


def _recorded_logits_shape(report: dict[str, Any], size: tuple[int, int]) -> list[int] | None:
    """The logits shape parity.json recorded for the target on the photo at `size`."""
    name = f"photo {size[0]}x{size[1]}"
    for run in report.get("runs", []):
        if run.get("role") == "target" and run.get("input") == name:
            return next((t["shape"] for t in run.get("taps", []) if t.get("tap") == "logits"), None)
    return None


def smoke_problems(folder: Path, model, report: dict[str, Any]) -> list[str]:
    """Run the standard photo through `model`: logits must be finite and of the recorded shape (an
    encoder's features finite and of its hidden size)."""
    import torch

    from parity.inputs import standard_inputs

    preprocessor = json.loads((folder / "preprocessor_config.json").read_text()) \
        if (folder / "preprocessor_config.json").is_file() else {}
    size = _photo_size(report)
    inputs = standard_inputs([size], preprocessor.get("image_mean", [0.5] * 3), preprocessor.get("image_std", [0.5] * 3))
    photo = next(i for i in inputs if i.name.startswith("photo"))
    with torch.no_grad():
        output = model(pixel_values=torch.from_numpy(photo.pixels))
    if not hasattr(output, "logits"):  # an encoder: its features, one vector of hidden_size per token
        features = output.last_hidden_state
        problems = [] if torch.isfinite(features).all() else [f"features: non-finite values on {photo.name}"]
        if features.shape[-1] != model.config.hidden_size:
            problems.append(f"features: width {features.shape[-1]}, config.json says {model.config.hidden_size}")
        return problems
    logits = output.logits
    expected = _recorded_logits_shape(report, size) or [1, model.config.num_labels]
    problems = []
    if list(logits.shape) != list(expected):
        problems.append(f"logits: shape {list(logits.shape)} on {photo.name}, parity.json recorded {expected}")
    if not torch.isfinite(logits).all():
        problems.append(f"logits: non-finite values on {photo.name}")
    return problems


def verify(folder: Path) -> list[str]:
    """Every problem found in `folder`, one line each naming the file; empty when it verifies.

    The model is loaded (and, with an `auto_map`, its code run) only when the
    checksums match, parity.json records a pass and the code is parityport's own.
    """
    return verify_folder(folder)[0]


def verify_folder(folder: Path) -> tuple[list[str], bool]:
    """`verify`'s problems and whether they are a check that ran and failed (True) rather than a
    folder that cannot be verified for what it is (False: no SHA256SUMS, no parity record)."""
    folder = Path(folder)
    problems, failed = record_problems(folder)
    if problems:
        return problems, failed
    problems = code_problems(folder)
    if problems:
        return problems, True
    try:
        model, problems = load_strict(folder)
    except Exception as error:  # noqa: BLE001  any failure to load is the finding
        return [f"{folder}: does not load in transformers: {type(error).__name__}: {str(error).splitlines()[0]}"], True
    return problems + smoke_problems(folder, model, read_parity(folder) or {}), True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `parityport verify`."""
    parser.add_argument("dir", type=Path, help="a converted folder")


def run(args: argparse.Namespace) -> int:
    """Verify DIR: exit 0 when every check passes; 1 naming the first check that failed; 2 when the
    folder cannot be verified for what it is (no SHA256SUMS, no parity record)."""
    folder = Path(args.dir)
    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    problems, failed = verify_folder(folder)
    if problems and not failed:
        refuse(folder, "cannot be verified", problems, failed)
    for problem in problems:  # a problem names a file listed in the folder's SHA256SUMS
        print(f"  {shown(problem, MESSAGE_LIMIT)}")
    if problems:
        refuse(folder, "verification FAILED", problems, failed)
    from parity.card import folder_is_synthetic, is_classifier

    synthetic = "; its weights are a SYNTHETIC stand-in (random values), not the published checkpoint"
    outputs = "logits" if is_classifier(_config(folder)) else "features"
    print(f"{shown(folder, PATH_LIMIT)}: verified (checksums, parity record, strict load, finite {outputs} on the photo)"
          + (synthetic if folder_is_synthetic(folder) else ""))
    return 0

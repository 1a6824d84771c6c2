"""`parityport publish DIR --repo-id ORG/NAME`: upload a verified folder to the Hugging Face Hub.

A folder is published only when its files match SHA256SUMS, parity.json
records a pass and its weights are not a synthetic stand-in. The model card (README.md) is regenerated first, with any
attached `parityport eval --json` results, and SHA256SUMS is updated for it;
then one commit adds every file through huggingface_hub's own API
(`HfApi.create_repo`, `HfApi.create_commit` with `CommitOperationAdd`).
`--dry-run` refuses what the real run refuses, then builds the same operations
and prints them without any network; `--card-out` writes the card to upload.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from converters.errors import InputError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `parityport publish`."""
    parser.add_argument("dir", type=Path, help="a converted, verified folder")
    parser.add_argument("--repo-id", required=True, help="the hub repository, ORG/NAME")
    parser.add_argument("--dry-run", action="store_true",
                        help="refuse what a real run refuses, else list what would be uploaded; no network")
    parser.add_argument("--card-out", type=Path, metavar="PATH",
                        help="also write the model card that would be uploaded to PATH (outside DIR)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--eval", dest="evals", type=Path, nargs="+", action="extend", default=[],
                        metavar="EVAL.json", help="`parityport eval --json` results to put on the card")
    parser.add_argument("--token", help="hub token (default: HF_TOKEN or the one saved by `hf auth login`)")


# ---- what is published -------------------------------------------------------------------------

def check_publishable(folder: Path) -> None:
    """Refuse a folder the hub must not receive, with one line naming the file, the same for a dry run
    and a real one: a recorded parity failure, a file that does not match SHA256SUMS or custom code
    that is not parityport's own is a check that failed (CheckFailed, exit 1); synthetic weights, no
    SHA256SUMS or no parity record make a folder unpublishable for what it is (InputError, exit 2)."""
    from parity.verify import code_problems, record_problems, refuse

    if not folder.is_dir():
        raise InputError(folder, "no such folder")
    problems, failed = record_problems(folder)
    if not failed and _is_synthetic(folder):
        problems, failed = [SYNTHETIC_REFUSAL, *problems], False
    if not problems:
        problems, failed = code_problems(folder), True
    if problems:
        refuse(folder, "refusing to publish", problems, failed)


SYNTHETIC_REFUSAL = ("its weights are SYNTHETIC (random values in the original layout), not the published "
                     "checkpoint")


def _is_synthetic(folder: Path) -> bool:
    from parity.card import folder_is_synthetic

    try:
        return folder_is_synthetic(folder)
    except InputError:  # no readable config.json: SHA256SUMS names it
        return False


def read_evals(path: Path, folder: Path) -> list[dict[str, Any]]:
    """The results in one `parityport eval --json` file (one, or one per protocol when several were
    evaluated side by side), each checked to be a measurement of this folder's weights."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the eval result: {error}") from None
    from parity.eval_run import side_by_side_runs

    runs = side_by_side_runs(data)
    results = [data] if runs is None else list(runs.values())
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("top1"), (int, float)):
            raise InputError(path, "not a `parityport eval --json` result (no numeric top1)")
        measured = Path(str(result.get("model", "")))
        if result.get("model") and measured.is_dir() and not _same_weights(folder, measured):
            raise InputError(path, f"measures {measured}, whose weights differ from {folder}")
    return results


def _same_weights(folder: Path, other: Path) -> bool:
    """True when both folders list the same weight files with the same sha256 (or are one folder)."""
    from converters.writer import listed_sha256sums

    if folder.resolve() == other.resolve():
        return True
    weights = lambda sums: {n: h for n, h in sums.items() if n.endswith(".safetensors")}  # noqa: E731
    return weights(listed_sha256sums(folder)) == weights(listed_sha256sums(other))


def staged_files(folder: Path, evals: list[dict[str, Any]], repo_id: str) -> dict[str, bytes | Path]:
    """`{path in repo: content}`: every listed file, the regenerated README.md and the updated SHA256SUMS."""
    from converters.writer import listed_sha256sums
    from parity.card import CARD_FILE, model_card
    from parity.verify import SUMS_FILE

    card = model_card(folder, evals, None, model_id=repo_id).encode()
    sums = listed_sha256sums(folder) | {CARD_FILE: hashlib.sha256(card).hexdigest()}
    listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())).encode()
    files: dict[str, bytes | Path] = {name: folder / name for name in sorted({*sums, SUMS_FILE})}
    return files | {CARD_FILE: card, SUMS_FILE: listing}


def commit_operations(files: dict[str, bytes | Path]) -> list:
    """One `CommitOperationAdd` per file, in name order."""
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes)
                               else str(content)) for name, content in files.items()]


def describe(operations: list) -> str:
    """The operations as a table: path in repo, size in bytes, sha256."""
    lines = [f"{len(operations)} files:"]
    for op in operations:
        lines.append(f"  add  {op.path_in_repo:<40} {op.upload_info.size:>14,d}  {op.upload_info.sha256.hex()}")
    return "\n".join(lines)


# ---- the hub -----------------------------------------------------------------------------------

def _hub_token(explicit: str | None) -> str:
    """The token to publish with; InputError when offline or when there is none."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise InputError(None, "HF_HUB_OFFLINE is set: cannot publish offline (--dry-run shows what would be uploaded)")
    token = explicit or get_token()
    if not token:
        raise InputError(None, "no Hugging Face token: run `hf auth login`, set HF_TOKEN or pass --token")
    return token


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the hub could not be reached (huggingface_hub's HTTP client's, and OSError)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def upload(operations: list, repo_id: str, token: str, private: bool, message: str) -> str:
    """Create the repository if needed and add every file in one commit; return the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except HfHubHTTPError as error:
        raise InputError(None, f"{repo_id}: the hub refused: {_first_line(error)}") from None
    except _network_errors() as error:
        raise InputError(None, f"cannot reach the Hugging Face Hub ({_first_line(error)}); "
                               "check the network, or use --dry-run") from None
    return info.commit_url


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def run(args: argparse.Namespace) -> int:
    """Publish DIR (or with --dry-run, print what would be published)."""
    from parity.card import CARD_FILE
    from parity.verify import SUMS_FILE

    folder = Path(args.dir)
    if not _REPO_ID.fullmatch(args.repo_id):
        raise InputError(None, f"--repo-id {args.repo_id!r} is not ORG/NAME")
    if args.card_out is not None and Path(args.card_out).resolve().is_relative_to(folder.resolve()):
        raise InputError(args.card_out, f"--card-out lies inside {folder}, which publishing must not change "
                                        "before the upload; give a path outside it")
    check_publishable(folder)
    evals = [result for path in args.evals for result in read_evals(path, folder)]
    files = staged_files(folder, evals, args.repo_id)
    operations = commit_operations(files)
    print(f"{'dry run: ' if args.dry_run else ''}{folder} -> {args.repo_id}")
    print(describe(operations))
    if args.card_out is not None:
        _write_atomically(Path(args.card_out), files[CARD_FILE])
        print(f"the model card to upload: {args.card_out}")
    if args.dry_run:
        return 0
    token = _hub_token(args.token)
    for name in (CARD_FILE, SUMS_FILE):  # the folder keeps the card it was published with
        _write_atomically(folder / name, files[name])
    print(f"uploading {len(operations)} files to {args.repo_id}")
    url = upload(operations, args.repo_id, token, args.private, f"Upload {folder.name} (converted by parityport)")
    print(f"published: {url}")
    return 0

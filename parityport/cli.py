"""The `parityport` command: convert, parity, eval, publish, catalog.

Exit codes: 0 success; 1 a parity or expected-accuracy check failed; 2 bad
input or usage, with one line on stderr naming the file and the problem (a
traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown
from converters.errors import CheckFailed, InputError, UsageParser, internal_error, print_traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# convert / parity

def resolve_source(name: str, synthetic_if_offline: bool,
                   say: Callable[[str], None] = _say) -> tuple[Path, bool, str | None]:
    """A local file for SRC; with `synthetic_if_offline`, a stand-in in the exact layout (kept in the
    cache's `synthetic/` folder) when the catalog file cannot be had, told to `say`. Returns (path,
    is_synthetic, the sha256 its download recorded)."""
    # a file, or a link (even dangling, which open_source names): no catalog, no downloader, no numpy
    if os.path.lexists(Path(name).expanduser()):
        return Path(name).expanduser(), False, None
    from checkpoints.download import cached_digest, resolve

    try:
        path = resolve(name)
        return path, False, cached_digest(path)
    except InputError as e:
        if not synthetic_if_offline:
            raise
        from checkpoints.catalog import lookup
        from checkpoints.offline import stand_in

        try:
            entry = lookup(name)
        except InputError:  # not a catalog name: the first error says what SRC is not
            raise e from None
        if entry.kind == "fixture" or entry.broken:  # the first error already says what to do instead
            raise
        try:
            plan = stand_in(entry)
        except InputError as none:  # still say where the real file comes from and goes
            raise InputError(None, f"{e.problem}; {none.problem}") from None
        where = (f"kept from an earlier run in {shown(plan.path, PATH_LIMIT)}" if plan.exists
                 else f"writing it to {shown(plan.path, PATH_LIMIT)}")
        say(f"parityport: NOT the real weights: converting a synthetic stand-in in the exact {entry.name} "
            f"layout (random values), {where}")
        say(f"parityport: {shown(e.problem, MESSAGE_LIMIT)}")
        return plan.write(), True, None


def _progress(total_bytes: int, label: str):
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=None, leave=False)
    return bar, (lambda name, n: bar.update(n))


def cmd_convert(args: argparse.Namespace) -> int:
    from checkpoints.offline import is_stand_in, names_stand_in
    from converters.digest import hash_in_background, identity, recorded
    from converters.readers.source import open_source

    dest = Path(args.out)
    held: list[str] = []  # what resolve_source says, said once the folder is known to need the work
    src, synthetic, known = resolve_source(args.src, args.synthetic_if_offline, held.append)
    opened = open_source(src)  # anything but a regular file is refused here, before any other work
    # a stand-in given by its path is no less random: by its name, or under any name by its mark
    synthetic = synthetic or names_stand_in(str(src)) or is_stand_in(opened.handle)
    # First, before numpy loads: the output's hash waits for this one (hashlib releases the GIL).
    # A download's digest vouches for the opened file only if that is the file it was recorded for.
    known = recorded(src, opened.identity) if known is not None else None
    digest = hash_in_background(opened.handle, known)

    from converters.export import (check_destination, check_replaceable, commit, failed_folder, staging,
                                   up_to_date, write_model)
    from converters.readers.isolate import open_isolated
    from converters.shards import parse_size
    from converters.writer import write_sha256sums

    max_shard_size = parse_size(args.max_shard_size)
    check_destination(src, dest)
    if not args.no_parity:  # a failed run replaces DIR.parity-failed: first make sure nothing of yours is lost
        check_replaceable(failed_folder(dest))
    if dest.exists() and any(dest.iterdir()) and not args.force:  # an empty folder has nothing to lose
        if up_to_date(dest, digest.result(), args.dtype, verified=not args.no_parity):
            _say(f"parityport: {shown(dest, PATH_LIMIT)} is already a{'' if args.no_parity else ' verified'} "
                 f"{args.dtype} conversion of {shown(src.name, PATH_LIMIT)}; nothing to do")
            return 0
        raise InputError(dest, "exists; pass --force to replace it")
    for line in held:
        _say(line)
    checkpoint = open_isolated(opened)
    family, conversion = convert_checkpoint(checkpoint)
    _say(f"parityport: {shown(src.name, PATH_LIMIT)}: {family} {conversion.variant}, {len(conversion.tensors)} "
         f"tensors ({len(conversion.dropped)} dropped by rule) -> {shown(dest, PATH_LIMIT)} [{args.dtype}]")
    with staging(dest) as tmp:
        bar, on_tensor = _progress(sum(t.nbytes for t in conversion.tensors.values()), "writing")
        with bar:
            write_model(tmp, conversion, checkpoint, digest, args.dtype, args.allow_nonfinite, on_tensor,
                        max_shard_size=max_shard_size, synthetic=synthetic)
        checkpoint.verify_unread()  # the CRC-32 of member bytes no tensor load read (dropped keys)
        if not args.no_parity:
            report = _parity(checkpoint, conversion, tmp, args.dtype, synthetic, args.allow_nonfinite)
            if not report.passed:
                failed = failed_folder(dest)
                write_sha256sums(tmp)  # so that a --force over it knows which files are parityport's
                check_replaceable(failed)  # again: a file may have been put there meanwhile
                shutil.rmtree(failed, ignore_errors=True)
                os.replace(tmp, failed)
                raise CheckFailed(f"{src}: parity FAILED ({report.failure}); "
                                  f"report kept in {failed}, nothing written to {dest}")
        if identity(src) != opened.identity:  # its hash, CRCs and mapped pages may disagree with each other
            raise InputError(src, "changed while it was being converted; nothing was written")
        _write_card(tmp, dest)
        write_sha256sums(tmp)
        commit(tmp, dest)
    done = [] if args.no_parity else ["parity passed"]
    done += ["SYNTHETIC weights (random values), not the published checkpoint"] if synthetic else []
    _say(f"parityport: wrote {shown(dest, PATH_LIMIT)}" + (f" ({'; '.join(done)})" if done else ""))
    return 0


def _write_card(tmp: Path, dest: Path) -> None:
    """The model card (README.md) with provenance, the exact command and the parity table."""
    import shlex

    from parity.card import write_card

    write_card(tmp, command=shlex.join(["parityport", *sys.argv[1:]]), model_id=str(dest.resolve()))


def convert_checkpoint(checkpoint):
    """Detect the family from the contents and run its converter."""
    from converters.family import detect_family
    from converters.registry import CONVERTERS, DETECTORS

    family = detect_family(checkpoint, DETECTORS)
    return family, CONVERTERS[family](checkpoint)


def _parity(checkpoint, conversion, folder: Path, dtype: str, synthetic: bool, allow_nonfinite: bool = False):
    from parity.families import verify_conversion
    from parity.report import write_reports

    report = verify_conversion(checkpoint, conversion, folder, dtype, allow_nonfinite)
    if synthetic:
        report.notes.insert(0, "SYNTHETIC source: random weights in the exact original layout, "
                               "not the published checkpoint.")
    write_reports(report, folder, {"source_file": checkpoint.path.name, "dropped": conversion.dropped}, synthetic)
    _say(_summary(report))
    return report


def _summary(report) -> str:
    from parity.report import verdict

    lines = [f"parity: {report.family} {report.variant} vs {report.source}"]
    for r in report.results:
        last = next((t for t in r.taps if t.tap == "logits"), r.taps[-1])  # encoders end at "norm"
        lines.append(f"  {r.side:<42} {r.input:<16} {r.dtype:<9} max|d {last.tap}| {last.max_abs:.2e}  "
                     f"{verdict(r) if r.passed or r.role == 'measured' else 'FAIL at ' + str(r.first_divergence)}")
    nonfinite = list(dict.fromkeys(t.tap for r in report.results for t in r.taps if t.nonfinite))
    if nonfinite:
        lines.append(f"  note: NaN/Inf from the source weights reach {len(nonfinite)} taps (from "
                     f"{nonfinite[0]}); they must sit at the same positions on both sides, and errors "
                     f"are measured over the finite values")
    lines += [f"  {'ok' if ok else 'FAILED'}: {name}" for name, ok in report.checks.items()]
    lines.append("  verdict: " + ("PASSED" if report.passed else "FAILED"))
    return "\n".join(lines)


def cmd_parity(args: argparse.Namespace) -> int:
    from converters.readers.source import open_source

    folder = Path(args.dir)
    src, _, _ = resolve_source(args.src, False)  # a file, or a catalog name's cached file
    opened = open_source(src)  # anything but a regular file is refused here, before any other work
    if not (folder / "config.json").is_file():
        raise InputError(folder, "not a converted folder (no config.json)")

    from converters.readers.isolate import open_isolated
    from parity.families import verify_conversion
    from parity.report import report_markdown

    checkpoint = open_isolated(opened)
    _, conversion = convert_checkpoint(checkpoint)
    _check_same_tensors(conversion, folder, src)

    report = verify_conversion(checkpoint, conversion, folder, _stored_dtype(folder))
    checkpoint.verify_unread()
    print(report_markdown(report))
    if not report.passed:
        raise CheckFailed(f"{folder}: parity FAILED ({report.failure})")
    return 0


def _check_same_tensors(conversion, folder: Path, src: Path) -> None:
    """Raise InputError when `folder` does not hold the tensors (names and shapes) `src` converts to:
    then it holds another model, and a layer-by-layer comparison has nothing to compare."""
    from converters.shards import stored_shapes
    from parity.protocols import read_json

    stored = stored_shapes(folder)
    expected = {key: tuple(t.shape) for key, t in conversion.tensors.items()}
    missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
    if missing or extra or reshaped:
        found = read_json(folder / "config.json").get("model_type", "none")
        example = (f"{shown(missing[0])} missing" if missing else f"{shown(extra[0])} not in {src.name}" if extra
                   else f"{shown(reshaped[0])} is {list(stored[reshaped[0]])}, not {list(expected[reshaped[0]])}")
        raise InputError(folder, f"does not hold the model {src} converts to ({conversion.family} "
                                 f"{conversion.variant}; the folder's model_type: {found}): {len(missing)} tensors missing, "
                                 f"{len(extra)} unexpected, {len(reshaped)} of other shapes (e.g. {example})")


def _stored_dtype(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text()).get("torch_dtype", "float32")


def cmd_catalog(args: argparse.Namespace) -> int:
    from checkpoints.catalog import format_table, load_catalog

    print(format_table(load_catalog().values()))
    return 0


# ---------------------------------------------------------------------------

def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = UsageParser(prog="parityport", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an original checkpoint into a verified folder")
    p.add_argument("src", help="a checkpoint file or a catalog name (parityport catalog)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-parity", action="store_true", help="skip the layer-by-layer comparison")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN/Inf")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split the weights into shards above this size, e.g. 500MB (default 5GB)")
    p.add_argument("--synthetic-if-offline", action="store_true",
                   help="when a catalog file cannot be had, convert a synthetic file in its exact layout")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("parity", help="re-run the layer-by-layer comparison of SRC and DIR")
    p.add_argument("src", help="the original checkpoint: a file or a catalog name (parityport catalog)")
    p.add_argument("dir", help="the folder to check: what parityport convert wrote (--out) from SRC, or a copy of it")
    p.set_defaults(run=cmd_parity)

    p = sub.add_parser("catalog", help="list the official checkpoints")
    p.set_defaults(run=cmd_catalog)

    _add_optional_commands(sub, argv)
    for command in sub.choices.values():  # --debug after the command too; SUPPRESS keeps one given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


# Commands defined elsewhere: (name, help, the module:function adding its arguments, the module:function
# running it). A module is imported only when its command is chosen, and the one that runs only after
# the arguments parse (eval's imports torch, about 4 s), so `convert`, `--help` and a usage error never
# pay for it.
COMMANDS = [
    ("eval", "ImageNet top-1 of a converted folder", "parity.eval_args:add_eval_arguments", "parity.eval_run:run_eval"),
    ("verify", "check a folder's checksums, load and parity record", "parity.verify:add_arguments", "parity.verify:run"),
    ("publish", "upload a verified folder to the Hugging Face Hub", "parityport.publish:add_arguments",
     "parityport.publish:run"),
]


def _function(where: str):
    """The function named "module:function", importing its module."""
    import importlib

    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


def _add_optional_commands(sub, argv: list[str] | None) -> None:
    chosen = _command_name(sys.argv[1:] if argv is None else argv)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            _function(add)(p)
            p.set_defaults(run=lambda args, run=run: _function(run)(args))


def _command_name(argv: list[str]) -> str | None:
    """The subcommand in `argv`: the first word that is not an option (the only global option,
    --debug, takes no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


# The commands that load models through transformers, whose own bars ("Loading weights") print even
# into a log file: under these they follow parityport's rule, shown on a TTY only.
LOADS_MODELS = {"convert", "parity", "eval", "verify"}


def _transformers_bars_on_a_tty_only() -> None:
    from transformers.utils import logging

    if hasattr(logging, "set_tqdm_hook"):  # transformers 5
        logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{"disable": None, **kwargs}))


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """Say `message` and return `code`; --debug prints the traceback first but keeps the exit code,
    so a script still tells bad input (2) from a failed check (1)."""
    if args.debug:
        print_traceback()
    _say(message)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    if args.command == "eval":  # what it can refuse without torch and transformers (4 s, 0.9 GB) it refuses at once
        from parity.eval_args import refuse_early

        if (code := refuse_early(args)) is not None:
            return code
    if args.command in LOADS_MODELS and not getattr(args, "no_parity", False):
        _transformers_bars_on_a_tty_only()
    try:
        return args.run(args)
    except InputError as e:
        return _failed(args, f"parityport: error: {e}", 2)
    except CheckFailed as e:
        return _failed(args, f"parityport: {e}", 1)
    except OSError as e:  # where parityport writes: a full disk, no permission, a parent that is a file
        where = f"{shown(e.filename, PATH_LIMIT)}: " if e.filename else ""
        return _failed(args, f"parityport: error: {where}{shown(e.strerror or e, MESSAGE_LIMIT)}", 2)
    except KeyboardInterrupt:
        _say("parityport: interrupted; no output folder was changed")
        return 130
    except Exception:
        return internal_error("parityport")


if __name__ == "__main__":
    sys.exit(main())

"""The catalog of official checkpoints: `catalog.json` read into typed, frozen records.

Each entry in `catalog.json` describes one published file:

- `name`: what users type (`BiT-M-R50x1-ILSVRC2012`, `BiT-M-R50x1.h5`,
  `data2vec-vision-base-ft1k`); unique. A name ending in a file extension is
  also its cache file name; otherwise the URL's extension is appended.
- `kind`: `"official"` (published by the authors) or `"fixture"` (a file the
  project writes itself in the original layout).
- `family`: `"bit"`, `"data2vec1"` or `"data2vec2"`; `arch`: `R50x1`, `ViT-B/16`, ...
- `url`: where the authors publish it (null only for fixtures); `format`: `npz`,
  `h5`, `pth` or `pt`; `classes`: head width, null for a headless pretrained model.
- `published`: accuracy figures, best first. The first is a measurement of this
  exact file where one exists. Each has `top1` (percent), `dataset`, `image_size`,
  `protocol` (a key of `eval`, or null when not recorded), `source`, `confirmed`.
- `eval`: named preprocessing protocols (`original`, `timm`, `hub`), each with
  `resize` (`shortest_edge` keeps the aspect ratio, `squash` does not),
  `resize_size`, `crop_size` (null: no crop), `interpolation`, `mean`, `std`, `source`.
- `license`: the original repository's terms and the hub card's, with sources.
- `sha256`, `size` (bytes): null where unknown. `hub_id`: the matching hub repo.
- `broken`: null, or why the published file cannot be converted.
- `notes`: free text. Any other field is kept, unvalidated, in `Entry.extra`.
"""

from __future__ import annotations

import difflib
import functools
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlparse

from converters.errors import InputError

CATALOG_PATH = Path(__file__).with_name("catalog.json")
FAMILIES = ("bit", "data2vec1", "data2vec2")
KINDS = ("official", "fixture")
FORMATS = ("npz", "h5", "pth", "pt")
RESIZES = ("shortest_edge", "squash")
_KNOWN_FIELDS = {
    "name", "kind", "family", "arch", "url", "format", "classes", "published", "eval",
    "license", "sha256", "size", "hub_id", "broken", "notes",
}


@dataclass(frozen=True)
class Protocol:
    """How to preprocess images for one evaluation: resize, optional centre crop, normalise."""

    resize: str
    resize_size: int
    crop_size: int | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


@dataclass(frozen=True)
class Published:
    """One published accuracy figure for a checkpoint, with where it comes from."""

    top1: float
    dataset: str
    image_size: int | None
    protocol: str | None
    source: str
    confirmed: bool

    @property
    def cited(self) -> str:
        """The source, marked "(unconfirmed)" where the figure is not confirmed, wherever it is shown."""
        return self.source + ("" if self.confirmed else " (unconfirmed)")


@dataclass(frozen=True)
class License:
    """The checkpoint's terms as its original repository and its hub card state them."""

    original: str | None
    original_source: str | None
    hub_card: str | None
    hub_card_source: str | None


@dataclass(frozen=True)
class Entry:
    """One catalogued checkpoint file; see the module docstring for every field."""

    name: str
    kind: str
    family: str
    arch: str
    url: str | None
    format: str
    classes: int | None
    published: tuple[Published, ...]
    eval: Mapping[str, Protocol]
    license: License
    sha256: str | None
    size: int | None
    hub_id: str | None
    broken: str | None
    notes: str
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def filename(self) -> str:
        """The file's name in the download cache."""
        suffix = "." + self.format
        return self.name if self.name.endswith(suffix) else self.name + suffix

    @property
    def url_basename(self) -> str | None:
        """The last path segment of the URL (`R50x1_224.npz`), or None without a URL."""
        return posixpath.basename(urlparse(self.url).path) if self.url else None

    @property
    def top1(self) -> float | None:
        """The first published top-1 (a measurement of this exact file where one exists)."""
        return self.published[0].top1 if self.published else None

    @property
    def top1_source(self) -> str | None:
        """Where `top1` comes from."""
        return self.published[0].source if self.published else None


def load_catalog(path: Path | None = None) -> dict[str, Entry]:
    """Read and validate the catalog (default: `checkpoints/catalog.json`) into `{name: Entry}`.

    Every entry is checked field by field; a malformed entry or a duplicate name
    raises `InputError` naming the catalog file, the entry and the field. The
    default catalog is read once per process.
    """
    if path is None:
        return dict(_default_catalog())
    return _read_catalog(Path(path))


@functools.cache
def _default_catalog() -> Mapping[str, Entry]:
    return _read_catalog(CATALOG_PATH)


def _read_catalog(path: Path) -> dict[str, Entry]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the catalog: {error}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise InputError(path, "the catalog must be an object with an 'entries' list")
    entries: dict[str, Entry] = {}
    for raw in doc["entries"]:
        entry = _parse_entry(path, raw)
        if entry.name in entries:
            raise InputError(path, f"duplicate catalog name '{entry.name}'")
        entries[entry.name] = entry
    return entries


def _parse_entry(path: Path, raw: Any) -> Entry:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InputError(path, f"catalog entry without a name: {str(raw)[:80]}")
    check = _Checker(path, raw["name"], raw)
    kind = check.choice("kind", KINDS)
    protocols = check.typed("eval", dict, optional=False)
    return Entry(
        name=raw["name"],
        kind=kind,
        family=check.choice("family", FAMILIES),
        arch=check.typed("arch", str, optional=False),
        url=check.typed("url", str, optional=kind == "fixture"),
        format=check.choice("format", FORMATS),
        classes=check.positive_int("classes"),
        published=tuple(_parse_published(check, p) for p in check.typed("published", list, optional=False)),
        eval=MappingProxyType({key: _parse_protocol(check, key, p) for key, p in protocols.items()}),
        license=_parse_license(check, check.typed("license", dict, optional=False)),
        sha256=check.sha256("sha256"),
        size=check.positive_int("size"),
        hub_id=check.typed("hub_id", str),
        broken=check.typed("broken", str),
        notes=check.typed("notes", str, optional=False),
        extra=MappingProxyType({k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}),
    )


def _parse_published(check: _Checker, raw: Any) -> Published:
    sub = check.sub("published", raw)
    top1 = sub.typed("top1", (int, float), optional=False)
    if not 0.0 < top1 <= 100.0:
        raise sub.error("top1", "must be a percentage in (0, 100]")
    protocol = sub.typed("protocol", str)
    if protocol is not None and protocol not in check.raw.get("eval", {}):
        raise sub.error("protocol", f"names no protocol of this entry's 'eval' ({protocol!r})")
    return Published(
        top1=float(top1),
        dataset=sub.typed("dataset", str, optional=False),
        image_size=sub.positive_int("image_size"),
        protocol=protocol,
        source=sub.typed("source", str, optional=False),
        confirmed=sub.typed("confirmed", bool, optional=False),
    )


def _parse_protocol(check: _Checker, key: str, raw: Any) -> Protocol:
    sub = check.sub(f"eval.{key}", raw)
    size = sub.positive_int("resize_size")
    if size is None:
        raise sub.error("resize_size", "is required")
    return Protocol(
        resize=sub.choice("resize", RESIZES),
        resize_size=size,
        crop_size=sub.positive_int("crop_size"),
        interpolation=sub.typed("interpolation", str, optional=False),
        mean=sub.triple("mean"),
        std=sub.triple("std"),
        source=sub.typed("source", str, optional=False),
    )


def _parse_license(check: _Checker, raw: dict) -> License:
    sub = check.sub("license", raw)
    return License(*(sub.typed(k, str) for k in ("original", "original_source", "hub_card", "hub_card_source")))


class _Checker:
    """Field checks for one catalog entry (or one nested object of it) with precise errors."""

    def __init__(self, path: Path, name: str, raw: Any, where: str = "") -> None:
        if not isinstance(raw, dict):
            raise InputError(path, f"catalog entry '{name}': '{where}' must be an object")
        self.path, self.name, self.raw, self.where = path, name, raw, where

    def sub(self, where: str, raw: Any) -> _Checker:
        return _Checker(self.path, self.name, raw, where)

    def error(self, key: str, problem: str) -> InputError:
        field_name = f"{self.where}.{key}" if self.where else key
        return InputError(self.path, f"catalog entry '{self.name}': field '{field_name}' {problem}")

    def typed(self, key: str, types: type | tuple[type, ...], optional: bool = True) -> Any:
        value = self.raw.get(key)
        if value is None and optional:
            return None
        is_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if value is None or is_bool or not isinstance(value, types):
            raise self.error(key, f"must be {_type_names(types)}{' or null' if optional else ''}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.raw.get(key)
        if value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)} (got {value!r})")
        return value

    def positive_int(self, key: str) -> int | None:
        value = self.typed(key, int)
        if value is not None and value <= 0:
            raise self.error(key, "must be a positive integer or null")
        return value

    def sha256(self, key: str) -> str | None:
        value = self.typed(key, str)
        if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise self.error(key, "must be 64 lowercase hex digits or null")
        return value

    def triple(self, key: str) -> tuple[float, float, float]:
        value = self.raw.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
            raise self.error(key, "must be a list of three numbers")
        return (float(value[0]), float(value[1]), float(value[2]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list": "a list", "dict": "an object"}
    items = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names[t.__name__] for t in items))


def lookup(name: str) -> Entry:
    """Return the catalog entry called `name`, or raise `InputError` suggesting close names.

    Matching tries the exact name, then the name ignoring case, then the cache
    file name (`BiT-M-R50x1.npz`), then the URL's file name when exactly one
    entry has it (`R50x1_224.npz`).
    """
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    for matches in (
        [e for e in catalog.values() if e.name.lower() == name.lower()],
        [e for e in catalog.values() if e.filename.lower() == name.lower()],
        [e for e in catalog.values() if e.url_basename == name],
    ):
        if len(matches) == 1:
            return matches[0]
    raise InputError(None, _unknown_message(name, list(catalog)))


def _unknown_message(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:
        return f"unknown checkpoint '{name}' (parityport catalog lists them)"
    quoted = [f"'{c}'" for c in close]
    alternatives = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"unknown checkpoint '{name}'; did you mean {alternatives}? (parityport catalog lists them)"


def format_table(entries: Iterable[Entry]) -> str:
    """Render entries as the aligned plain-text table printed by `parityport catalog`.

    Columns: name, family, format (marked "(broken)" for a file known to be
    unconvertible), classes ("-" for a headless model), published top-1 with its
    image size, and the figure's source. Below the table, one line per broken
    file gives the catalog's reason.
    """
    entries = list(entries)
    header = ("name", "family", "format", "classes", "top-1", "source")
    rows = [header] + [_table_row(e) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    broken = [f"{e.name} (broken): {e.broken}" for e in entries if e.broken]
    return "\n".join([line.rstrip() for line in lines] + ([""] + broken if broken else []))


def _table_row(entry: Entry) -> tuple[str, str, str, str, str, str]:
    fmt = entry.format + (" (broken)" if entry.broken else "")
    classes = "-" if entry.classes is None else str(entry.classes)
    if not entry.published:
        return (entry.name, entry.family, fmt, classes, "-", "-")
    first = entry.published[0]
    top1 = f"{first.top1:g}" + (f" @{first.image_size}" if first.image_size else "")
    return (entry.name, entry.family, fmt, classes, top1, first.cited)

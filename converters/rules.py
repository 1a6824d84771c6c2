"""Ordered, invertible key-mapping rules over lazy tensors.

A converter is a table of rules. Each rule names its source and target keys with
templates such as ``"resnet/block{b}/unit{u:02d}/a/group_norm/gamma"`` →
``"bit.encoder.stages.{b-1}.layers.{u-1}.norm1.weight"`` and may apply a small
layout operation (`Transpose`, `SplitRows`, ...) that knows its own inverse, so
`invert(rules)` maps converted weights back and `invert(convert(x)) == x` is a test.

`apply_rules` is strict: every source key is consumed by the FIRST rule that
matches it (a rename or a named drop), every expected target key is filled with
the expected shape, and anything left over is an `InputError` naming the keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from converters.display import shown_list
from converters.errors import InputError
from converters.tensors import SAFETENSORS_TAGS, LazyTensor, described

# A converted tensor of any other dtype (uint16-64, complex) is refused here, naming it, rather
# than when the writer meets it.
CONVERTIBLE_DTYPES = frozenset(SAFETENSORS_TAGS)

# ----------------------------------------------------------------------------
# Templates: "{name}" digits, "{name:02d}" zero-padded digits, "{name:w}" a word
# (no '.' or '/'), "{name-1}" / "{name+1}" the same field shifted.

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?(?::(\w+))?\}")


@dataclass(frozen=True)
class _Field:
    name: str
    offset: int
    spec: str  # "", "02d", "w"

    def pattern(self) -> str:
        return rf"(?P<{self.name}>[^./]+)" if self.spec == "w" else rf"(?P<{self.name}>\d+)"

    def decode(self, text: str) -> int | str:
        return text if self.spec == "w" else int(text) - self.offset

    def encode(self, value: int | str) -> str:
        if self.spec == "w":
            return str(value)
        return format(int(value) + self.offset, self.spec or "d")


@dataclass(frozen=True)
class Template:
    """A key pattern with named fields; `match` extracts them, `render` fills them."""

    text: str

    def _parts(self) -> list[str | _Field]:
        parts: list[str | _Field] = []
        pos = 0
        for m in _FIELD.finditer(self.text):
            parts.append(self.text[pos:m.start()])
            parts.append(_Field(m.group(1), int(m.group(2) or 0), m.group(3) or ""))
            pos = m.end()
        parts.append(self.text[pos:])
        return parts

    def match(self, key: str) -> dict[str, int | str] | None:
        regex, seen = [], set()
        for p in self._parts():
            if not isinstance(p, _Field):
                regex.append(re.escape(p))
            elif p.name in seen:  # a field used twice must repeat its value
                regex.append(f"(?P={p.name})")
            else:
                seen.add(p.name)
                regex.append(p.pattern())
        m = re.fullmatch("".join(regex), key)
        if m is None:
            return None
        values = {f.name: f.decode(m.group(f.name))
                  for f in self._parts() if isinstance(f, _Field)}
        return values if self.render(values) == key else None  # reject "unit2" for "{u:02d}"

    def render(self, values: Mapping[str, int | str]) -> str:
        return "".join(p.encode(values[p.name]) if isinstance(p, _Field) else p
                       for p in self._parts())


# ----------------------------------------------------------------------------
# Layout operations: arrays in → arrays out, shapes in → shapes out, and an inverse.

class Op:
    """A layout change from the rule's source tensors to its target tensors."""

    def shapes(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def inverse(self) -> "Op":
        raise NotImplementedError


@dataclass(frozen=True)
class Identity(Op):
    def shapes(self, shapes):
        return list(shapes)

    def __call__(self, arrays):
        return list(arrays)

    def inverse(self):
        return self


@dataclass(frozen=True)
class Transpose(Op):
    """np.transpose with `axes` (HWIO → OIHW is ``Transpose((3, 2, 0, 1))``).

    Returns a strided VIEW, not a copy: the writer reorders it a block at a time,
    so a transposed tensor costs its own size in memory, not twice that.
    """

    axes: tuple[int, ...]

    def shapes(self, shapes):
        return [tuple(s[a] for a in self.axes) for s in shapes]

    def __call__(self, arrays):
        return [np.transpose(a, self.axes) for a in arrays]

    def inverse(self):
        return Transpose(tuple(int(i) for i in np.argsort(self.axes)))


@dataclass(frozen=True)
class Reshape(Op):
    """Reshape between two fixed shapes (e.g. a (1,1,C,K) head to (C,K))."""

    source: tuple[int, ...]
    target: tuple[int, ...]

    def shapes(self, shapes):
        _expect_shapes(shapes, [self.source])
        return [self.target]

    def __call__(self, arrays):
        return [a.reshape(self.target) for a in arrays]

    def inverse(self):
        return Reshape(self.target, self.source)


@dataclass(frozen=True)
class Compose(Op):
    """Apply `ops` left to right; the inverse applies their inverses right to left."""

    ops: tuple[Op, ...]

    def shapes(self, shapes):
        for op in self.ops:
            shapes = op.shapes(shapes)
        return list(shapes)

    def __call__(self, arrays):
        for op in self.ops:
            arrays = op(arrays)
        return list(arrays)

    def inverse(self):
        return Compose(tuple(op.inverse() for op in reversed(self.ops)))


@dataclass(frozen=True)
class SplitRows(Op):
    """Split one tensor into `parts` equal blocks along axis 0 (fused qkv → q, k, v)."""

    parts: int

    def shapes(self, shapes):
        (shape,) = shapes
        if shape[0] % self.parts:
            raise ValueError(f"{shape[0]} rows do not split into {self.parts}")
        return [(shape[0] // self.parts, *shape[1:])] * self.parts

    def __call__(self, arrays):
        return list(np.split(arrays[0], self.parts, axis=0))

    def inverse(self):
        return ConcatRows(self.parts)


@dataclass(frozen=True)
class ConcatRows(Op):
    """Concatenate `parts` tensors along axis 0; the inverse of `SplitRows`."""

    parts: int

    def shapes(self, shapes):
        _expect_count(shapes, self.parts)
        return [(sum(s[0] for s in shapes), *shapes[0][1:])]

    def __call__(self, arrays):
        return [np.concatenate(list(arrays), axis=0)]

    def inverse(self):
        return SplitRows(self.parts)


@dataclass(frozen=True)
class Broadcast(Op):
    """Copy one tensor into `copies` targets (a shared table into every layer)."""

    copies: int

    def shapes(self, shapes):
        return list(shapes) * self.copies

    def __call__(self, arrays):
        return [arrays[0]] * self.copies

    def inverse(self):
        return TakeShared(self.copies)


@dataclass(frozen=True)
class TakeShared(Op):
    """Many identical tensors back to one; refuses copies that differ."""

    copies: int

    def shapes(self, shapes):
        _expect_count(shapes, self.copies)
        return [shapes[0]]

    def __call__(self, arrays):
        if any(not np.array_equal(arrays[0], a) for a in arrays[1:]):
            raise ValueError("copies of a shared tensor differ")
        return [arrays[0]]

    def inverse(self):
        return Broadcast(self.copies)


def _expect_shapes(got, want) -> None:
    if [tuple(s) for s in got] != [tuple(s) for s in want]:
        raise ValueError(f"expected shapes {want}, got {list(got)}")


def _expect_count(shapes, n: int) -> None:
    if len(shapes) != n:
        raise ValueError(f"expected {n} tensors, got {len(shapes)}")


# ----------------------------------------------------------------------------
# Rules

@dataclass(frozen=True)
class Rename:
    """Source key(s) → target key(s), through `op`.

    With several sources, the FIRST source template is the one matched against
    the checkpoint; the others are rendered from its fields and consumed with it.
    Targets may be plain keys without fields (used by `Broadcast`).
    """

    source: str | tuple[str, ...]
    target: str | tuple[str, ...]
    op: Op = field(default_factory=Identity)

    @property
    def sources(self) -> tuple[Template, ...]:
        return tuple(Template(t) for t in _as_tuple(self.source))

    @property
    def targets(self) -> tuple[Template, ...]:
        return tuple(Template(t) for t in _as_tuple(self.target))

    def inverse(self) -> "Rename":
        return Rename(self.target, self.source, self.op.inverse())


@dataclass(frozen=True)
class Drop:
    """Source keys that are deliberately not converted, and why (shown in reports)."""

    source: str
    why: str

    @property
    def sources(self) -> tuple[Template, ...]:
        return (Template(self.source),)


Rule = Rename | Drop


def _as_tuple(x: str | tuple[str, ...]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


def invert(rules: Sequence[Rule]) -> list[Rename]:
    """The rule table that maps converted keys back to the source (drops have no inverse)."""
    return [r.inverse() for r in rules if isinstance(r, Rename)]


@dataclass
class Converted:
    """The result of `apply_rules`: target tensors plus what was dropped and why."""

    tensors: dict[str, LazyTensor]
    dropped: dict[str, str]  # source key → reason


def apply_rules(tensors: Mapping[str, LazyTensor], rules: Sequence[Rule],
                expected: Mapping[str, tuple[int, ...]] | None = None,
                path: str | None = None) -> Converted:
    """Map `tensors` through `rules`, strictly, without reading any tensor data.

    Every source key must be consumed by the first rule that matches it; every
    key of `expected` (target name → shape) must be produced with that shape and
    nothing else may be. Violations raise `InputError(path, ...)` naming up to a
    few keys and the count, e.g. "unexpected keys: resnet/foo (+2 more)".
    """
    out: dict[str, LazyTensor] = {}
    dropped: dict[str, str] = {}
    consumed: set[str] = set()
    for key in tensors:
        if key in consumed:
            continue
        rule, values = _first_match(rules, key)
        if rule is None:
            unmatched = [k for k in tensors if _first_match(rules, k)[0] is None]
            raise InputError(path, f"no rule for {some_names(unmatched)}")
        if isinstance(rule, Drop):
            dropped[key] = rule.why
            consumed.add(key)
            continue
        sources = [t.render(values) for t in rule.sources]
        missing = [s for s in sources if s not in tensors]
        if missing:
            raise InputError(path, f"missing keys: {some_names(missing)} (needed with {key})")
        targets = [t.render(values) for t in rule.targets]
        _check_dtypes({s: tensors[s] for s in sources}, targets, path)
        consumed.update(sources)
        for name, tensor in zip(targets, _lazy_outputs(rule.op, [tensors[s] for s in sources], sources, path)):
            if name in out:
                raise InputError(path, f"{', '.join(out[name].origin)} and {', '.join(tensor.origin)} "
                                       f"both map to {name}")
            out[name] = tensor
    if expected is not None:
        _check_expected(out, expected, rules, tensors, path)
    return Converted(out, dropped)


def _check_dtypes(tensors: Mapping[str, LazyTensor], targets: Sequence[str], path: str | None) -> None:
    for key, tensor in tensors.items():
        if np.dtype(tensor.dtype) not in CONVERTIBLE_DTYPES:
            raise InputError(path, f"{', '.join(_origin(key, tensor))} (converted to {', '.join(targets)}) has "
                                   f"dtype {np.dtype(tensor.dtype)}, which does not convert "
                                   "(float, signed integer, uint8 or bool only)")


def _origin(key: str, tensor: LazyTensor) -> tuple[str, ...]:
    """The names in the file `tensor` came from (`key` itself for a tensor that does not know them)."""
    return tensor.origin or (key,)


def _first_match(rules: Sequence[Rule], key: str):
    for rule in rules:
        values = rule.sources[0].match(key)
        if values is not None:
            return rule, values
    return None, None


def _lazy_outputs(op: Op, inputs: list[LazyTensor], sources: list[str], path: str | None) -> list[LazyTensor]:
    key = sources[0]
    try:
        shapes = op.shapes([t.shape for t in inputs])
    except ValueError as e:
        raise InputError(path, f"{key}: {e}") from None
    dtype = np.result_type(*[t.dtype for t in inputs])
    origin = tuple(dict.fromkeys(name for t, s in zip(inputs, sources) for name in _origin(s, t)))

    def output(i: int) -> Callable[[], np.ndarray]:
        return lambda: op([t.load() for t in inputs])[i]

    return [LazyTensor(tuple(s), dtype, output(i), origin) for i, s in enumerate(shapes)]


def _check_expected(out: Mapping[str, LazyTensor], expected: Mapping[str, tuple[int, ...]],
                    rules: Sequence[Rule], tensors: Mapping[str, LazyTensor], path: str | None) -> None:
    missing = [k for k in expected if k not in out]
    if missing:
        names = list(dict.fromkeys(_source_name(rules, k) for k in missing))
        raise InputError(path, f"missing keys: {some_names(names)}")
    extra = [k for k in out if k not in expected]
    if extra:
        raise InputError(path, f"unexpected keys: {some_names([described(k, out[k]) for k in extra])}")
    for k, shape in expected.items():
        if tuple(out[k].shape) != tuple(shape):
            raise InputError(path, f"{_with_shapes(out[k].origin, tensors)} converts to {k} of shape "
                                   f"{list(out[k].shape)}, expected {list(shape)}")


def _with_shapes(origin: Sequence[str], tensors: Mapping[str, LazyTensor]) -> str:
    """The source tensors `origin` names, each with its shape in the file: "a/kernel [3, 3, 32, 16]"."""
    shapes = {_origin(k, t): t.shape for k, t in tensors.items()}
    return ", ".join(f"{name} {list(shapes[(name,)])}" if (name,) in shapes else name for name in origin)


def _source_name(rules: Sequence[Rule], target: str) -> str:
    """The source key that would have produced `target` (the target itself if none would)."""
    for rule in invert(rules):
        values = rule.sources[0].match(target)
        if values is not None:
            return rule.targets[0].render(values)
    return target


def some_names(keys: Sequence[str], n: int = 3) -> str:
    """The first `n` of `keys`, each shown escaped, and how many more there are: "a, b, c (+2 more)"."""
    return shown_list(keys, n)


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest N of keys `<prefix>N.…` (0 when there are none): a depth read off the names."""
    ids = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return 1 + max(ids) if ids else 0


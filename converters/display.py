"""Text that came from a file (a key, a member or link name, the path itself), made safe to print.

A name is shown with every character a terminal or a Markdown renderer would act on escaped, and
cut to a readable length with a count of what was cut, so that a file can neither write lines of
its own onto the user's terminal (a newline, ESC sequences, a bidi override reordering what
follows) nor flood it with a 50 MB key.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import islice

# The longest key of a real checkpoint is about 70 characters; a longer name is cut in its middle.
NAME_LIMIT = 80
# A path is the user's own choice, so it gets more room than a name from inside a file.
PATH_LIMIT = 400
# A whole problem: a few names and our own words fit; one name of a hostile length is cut.
MESSAGE_LIMIT = 600
# How many names a list of keys shows before it only counts the rest.
LIST_LIMIT = 3

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MARKDOWN_ACTIVE = frozenset("\\`*_[]<>|&~")


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _NAMED_ESCAPES.get(c) or _code(ord(c)) for c in text)


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def shown(text: object, limit: int = NAME_LIMIT) -> str:
    """`text` as it may be printed: every non-printable character escaped, and cut to `limit`.

    Non-printable is Python's `str.isprintable` (what `repr` escapes): control characters
    (newline, ESC, BEL), format characters (the bidi overrides and isolates U+202A-202E and
    U+2066-2069, zero-width joiners), separators other than the space, surrogates, private-use and
    unassigned code points; each is written as `\\n`, `\\x1b`, `\\u202e`. Backslashes are kept as
    they are, so text already escaped by `repr` reads the same. Text longer than `limit`
    characters keeps its first three quarters and its last quarter of `limit` around a count of
    the characters cut, e.g. ``kkk…(+49,999,920 chars)…kkk``; only the kept characters are
    examined, so a huge name costs no more than a short one.
    """
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return _escaped(text)
    tail = limit // 4
    head = text[:limit - tail]
    end = text[len(text) - tail:] if tail else ""
    return f"{_escaped(head)}…(+{len(text) - limit:,} chars)…{_escaped(end)}"


def shown_list(names: Collection[object], count: int = LIST_LIMIT, limit: int = NAME_LIMIT) -> str:
    """The first `count` of `names`, each `shown`, comma-separated, and how many more there are,
    e.g. ``"a, b, c (+999,997 more)"``: a file with a million unexpected keys names three."""
    head = ", ".join(shown(name, limit) for name in islice(names, count))
    return head + (f" (+{len(names) - count:,} more)" if len(names) > count else "")


def shown_markdown(text: object, limit: int = NAME_LIMIT) -> str:
    """`shown(text, limit)` for Markdown prose or a table cell: the characters Markdown acts on
    there (emphasis, code, links, raw HTML and entities, table pipes) are backslash-escaped too."""
    return _markdown_escaped(shown(text, limit))


def shown_markdown_code(text: object, limit: int = NAME_LIMIT) -> str:
    """`shown(text, limit)` as a Markdown code span, which nothing inside can end or split; text
    holding a backtick or a table pipe (which would) is given as `shown_markdown` prose instead."""
    text = shown(text, limit)
    return _markdown_escaped(text) if "`" in text or "|" in text else f"`{text}`"


def _markdown_escaped(text: str) -> str:
    return "".join("\\" + c if c in _MARKDOWN_ACTIVE else c for c in text)

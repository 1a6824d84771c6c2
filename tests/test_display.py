"""The one function that shows text from a file: what it escapes, where it cuts, and its users."""

from __future__ import annotations

import re

import numpy as np
import pytest

from converters.display import MESSAGE_LIMIT, NAME_LIMIT, shown, shown_list, shown_markdown, shown_markdown_code
from converters.errors import CheckFailed, InputError, internal_error
from converters.rules import _check_expected
from converters.tensors import LazyTensor

INJECTION = "\n parityport: wrote out (parity passed)\x1b]0;pwned\x07\u202e"
CUT = re.compile(r"…\(\+[\d,]+ chars\)…")


def _printable(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def test_a_50_mb_key_is_cut_with_the_count_of_what_was_cut() -> None:
    key = "k" * 50_000_000
    assert shown(key) == f"{'k' * 60}…(+49,999,920 chars)…{'k' * 20}"
    assert shown(key, 8) == "kkkkkk…(+49,999,992 chars)…kk"
    assert shown("k" * NAME_LIMIT) == "k" * NAME_LIMIT  # at the limit: whole


@pytest.mark.parametrize("char, escape", [
    ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\x00", "\\x00"), ("\x07", "\\x07"), ("\x1b", "\\x1b"),
    ("\x7f", "\\x7f"), ("\x9b", "\\x9b"), ("\u00a0", "\\xa0"), ("\u200f", "\\u200f"), ("\u202a", "\\u202a"),
    ("\u202e", "\\u202e"), ("\u2066", "\\u2066"), ("\u2069", "\\u2069"), ("\u2028", "\\u2028"),
    ("\ufeff", "\\ufeff"), ("\ud800", "\\ud800"), ("\U000e0001", "\\U000e0001"),
])
def test_control_format_and_bidi_characters_are_escaped(char: str, escape: str) -> None:
    assert shown(f"a{char}b") == f"a{escape}b"


def test_printable_text_is_kept_as_it_is() -> None:
    for text in ("resnet/block1/unit01/a/standardized_conv2d/kernel", "blocks.0.attn.q_bias",
                 "Gewichte/ä中文", "a\\x1b"):  # a backslash stays one: repr-escaped text reads the same
        assert shown(text) == text


def test_a_million_names_are_three_and_a_count() -> None:
    names = [f"key{i}\x1b[2K" for i in range(1_000_000)]
    assert shown_list(names) == "key0\\x1b[2K, key1\\x1b[2K, key2\\x1b[2K (+999,997 more)"
    assert shown_list(["a" * 200]) == f"{'a' * 60}…(+120 chars)…{'a' * 20}"
    assert shown_list([]) == ""


def test_the_rules_step_names_three_of_a_million_unexpected_keys() -> None:
    tensor = LazyTensor((1,), np.dtype(np.float32), lambda: np.zeros(1, np.float32))
    produced = {f"y{i}\x1b]0;t\x07": tensor for i in range(1_000_000)}
    with pytest.raises(InputError) as error:
        _check_expected(produced, {"y0\x1b]0;t\x07": (1,)}, [], produced, "f.npz")
    assert str(error.value) == ("f.npz: unexpected keys: y1\\x1b]0;t\\x07, y2\\x1b]0;t\\x07, y3\\x1b]0;t\\x07 "
                                "(+999,996 more)")


def test_errors_keep_the_exact_text_and_show_it_escaped() -> None:
    error = InputError("dir/a\nb.npz", "member 'x\x1b[2K' is \u202eodd")
    assert error.path == "dir/a\nb.npz" and error.problem == "member 'x\x1b[2K' is \u202eodd"
    assert str(error) == "dir/a\\nb.npz: member 'x\\x1b[2K' is \\u202eodd"
    long = InputError(None, "k" * 10**6)
    assert len(str(long)) < MESSAGE_LIMIT + 30 and CUT.search(str(long))
    assert str(CheckFailed("a\x1b]0;x\x07: parity FAILED")) == "a\\x1b]0;x\\x07: parity FAILED"


def test_an_internal_error_quoting_a_name_prints_it_escaped(capsys) -> None:
    try:
        try:
            raise KeyError("first")
        except KeyError:
            raise ValueError(f"w{INJECTION}") from None
    except ValueError:
        assert internal_error("parityport") == 3
    err = capsys.readouterr().err
    assert _printable(err) and f"\nValueError: {shown('w' + INJECTION)}\n" in err
    assert not any(line.startswith(" parityport: wrote") for line in err.splitlines())
    assert err.startswith("Traceback (most recent call last):\n") and "KeyError" not in err
    assert err.splitlines()[-1].startswith("parityport: internal error: ValueError: w (a fault in parityport")


def test_markdown_escapes_what_would_render() -> None:
    assert shown_markdown("a|b_*`<img src=x>&#x202e;[l](u)~\n") == \
        "a\\|b\\_\\*\\`\\<img src=x\\>\\&#x202e;\\[l\\](u)\\~\\\\n"
    assert shown_markdown_code("BiT-M-R50x1.npz") == "`BiT-M-R50x1.npz`"
    assert shown_markdown_code("a`b|c") == "a\\`b\\|c"  # a backtick or pipe would end or split the span



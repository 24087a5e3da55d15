"""The import's fast paths give what the general rules give: here the ASCII shortcut of the
text normalisation (the audit events' fast path is held equal in tests/test_audit.py)."""

from __future__ import annotations

import itertools
import unicodedata

from usermgr.schemas import ImportRow, _nfkc_stripped

ASCII = [chr(code) for code in range(128)]


def full_rule(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def test_ascii_text_takes_a_shortcut_to_the_same_value() -> None:
    """NFKC composes only neighbours: every ASCII character and every pair of them covers
    every ASCII text."""
    texts = [*ASCII, *("".join(pair) for pair in itertools.product(ASCII, repeat=2))]
    texts += [" \t Ada Lovelace \n", "\x0bx\x0c", "\x1c\x1d\x1e\x1f y "]
    assert [_nfkc_stripped(text) for text in texts] == [full_rule(text) for text in texts]


def test_other_text_still_takes_the_full_rule() -> None:
    fields = {"email": " ＡＤＡ@example.com ", "username": "\u00a0ada\u2003", "full_name": " Ｚoë "}
    row = ImportRow.model_validate(fields)
    assert (row.email, row.username, row.full_name) == ("ada@example.com", "ada", "Zoë")

"""The full-name rule's character check answers from Unicode's categories for every code point,
whichever way it takes (str.isprintable first, the category scan after)."""

from __future__ import annotations

import sys
import unicodedata

from usermgr.schemas import UNPRINTABLE_CATEGORIES, _has_invisible_or_control


def test_every_code_point_is_refused_exactly_when_its_category_is_unprintable() -> None:
    wrong = [
        hex(point)
        for point in range(sys.maxunicode + 1)
        if _has_invisible_or_control(f"Ada {chr(point)} Lovelace")
        != (unicodedata.category(chr(point)) in UNPRINTABLE_CATEGORIES)
    ]
    assert wrong == []


def test_a_name_with_a_separator_or_an_unassigned_character_but_nothing_unprintable_passes() -> None:
    """Not printable to str.isprintable, yet in none of the refused categories: scanned, and passed."""
    for name in ("Zoë\u3000Ångström", "Ada\u00a0Lovelace", "Li \ue000 Wei", "Li \u0378 Wei"):
        assert not name.isprintable()
        assert not _has_invisible_or_control(name), name

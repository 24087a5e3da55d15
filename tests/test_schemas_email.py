"""The validated-domain cache in front of email-validator (schemas.valid_email): for every
input, the answer email-validator itself gives, through pydantic's EmailStr, the cache cold
or warm."""

from __future__ import annotations

from typing import Annotated, Any

import email_validator
import pytest
from pydantic import AfterValidator, BeforeValidator, EmailStr, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from usermgr import schemas

LONG_LABELS = "b" * 63 + "." + "c" * 63 + "."  # 128 characters: addresses near the 254-byte limit

# One domain for each of the three forms email-validator checks the length of being the longest.
LONGEST_AS_GIVEN = LONG_LABELS + "eＸＡＭＰＬＥ.com"  # full-width letters: 3 bytes each, 1 once normalised
LONGEST_NORMALISED = LONG_LABELS + "xn--fsqaaaa881pbabbb.com"  # 例子例子例子例子例子.com: 34 bytes
LONGEST_IN_ASCII = LONG_LABELS + "bücher.example"  # xn--bcher-kva.example: 21 characters
# Kelvin signs (U+212A, 3 bytes each) are "k" (1 byte) once lowercased, as email-validator
# normalises them: a cache keyed on the lowercased domain would measure the shorter spelling
# and pass addresses up to 20 bytes too long as given. Its lowercase twin comes first in
# DOMAINS, so a cache keyed on the lowercased domain holds the short spelling when it is reused.
LONGEST_BEFORE_LOWERCASING = LONG_LABELS + "\u212a" * 10 + ".com"

DOMAINS = [
    "example.com",
    "Example.COM",
    "EXAMPLE.com",
    "example.com.",
    "example..com",
    ".example.com",
    "-example.com",
    "example-.com",
    "exa_mple.com",
    "exa mple.com",
    "localhost",
    "example.test",
    "x.invalid",
    "xn--bcher-kva.example",
    "XN--BCHER-KVA.example",
    "bücher.example",
    "BÜCHER.example",
    "münchen.de",
    "xn--mnchen-3ya.de",
    "xn--zca.de",
    "ß.de",
    "xn--.com",
    "xn--zz.com",
    "xn--fsqu00a.xn--3lr804guic",
    "ex\u0430mple.com",  # a Cyrillic a
    "xn--80ak6aa92e.com",  # аррӏе.com, all Cyrillic
    "\u0435xample.com",  # a Cyrillic first letter
    "ﬁ.example",
    "aﬁ.example",
    "example。com",
    "a\u0301.com",
    "example.com\u0301",
    "example.com\u200b",
    "ex\u202eample.com",
    "ex\x00ample.com",
    "[127.0.0.1]",
    "[IPv6:::1]",
    "example.com>",
    "exa<mple.com",
    'exa"mple.com',
    "a" * 63 + ".com",
    "a" * 64 + ".com",
    ("a" * 63 + ".") * 3 + "a" * 61,
    ("a" * 63 + ".") * 3 + "a" * 62,
    LONGEST_AS_GIVEN,
    LONGEST_NORMALISED,
    LONGEST_IN_ASCII,
    LONGEST_BEFORE_LOWERCASING.lower(),
    LONGEST_BEFORE_LOWERCASING,
]

LOCAL_PARTS = [
    "user",
    "User.Name+tag",
    "a",
    "x" * 64,
    "x" * 65,
    "postmaster",
    "POSTMASTER",
    "Info",
    "www",
    "not-postmaster",
    "o'brien",
    "a!#$%&'*+/=?^_`{|}~-z",
    ".dot",
    "dot.",
    "two..dots",
    '"john doe"',
    '"john"',
    '"a\\"b"',
    "jörg",
    "用户",
    "a\u0301",
    "a b",
    "",
]

# What pydantic's EmailStr takes off or refuses before email-validator sees the address.
PYDANTIC_WRAPPED = [
    "Name <user@example.com>",
    "<user@example.com>",
    "<POSTMASTER@Example.com>",
    " user@example.com ",
    "user@example.com\n",
    "user@example.com\r",
    "x" * 2049,
]

WHOLE = [
    "user@@example.com",
    "user@",
    "@example.com",
    "user",
    "user＠example.com",
    "user@example.com@example.com",
    "user@" + "a" * 2000 + ".com",
    "",
]


def _near_the_limit() -> list[str]:
    """For each domain whose length form is the longest, addresses from 4 bytes under the
    254-byte limit to 4 over it, in that form."""
    addresses = []
    for domain in (LONGEST_AS_GIVEN, LONGEST_NORMALISED, LONGEST_IN_ASCII, LONGEST_BEFORE_LOWERCASING):
        checked = email_validator.validate_email("a@" + domain, check_deliverability=False)
        longest = max(len(form.encode()) for form in (domain, checked.domain, checked.ascii_domain))
        room = email_validator.rfc_constants.EMAIL_MAX_LENGTH - 1 - longest
        addresses += ["x" * length + "@" + domain for length in range(room - 4, room + 5)]
    return addresses


CORPUS = [f"{local}@{domain}" for local in LOCAL_PARTS for domain in DOMAINS] + WHOLE + _near_the_limit()


def _email_validators_answer(text: str) -> str:
    """The normalised address as email-validator gives it, called directly as pydantic calls
    it, or its refusal in pydantic's words."""
    try:
        return email_validator.validate_email(text, check_deliverability=False).normalized
    except email_validator.EmailNotValidError as error:
        return f"value is not a valid email address: {error}"


def _ours(text: str) -> str:
    try:
        return schemas.valid_email(text)
    except PydanticCustomError as error:
        return str(error)


def test_the_corpus_holds_addresses_on_both_sides_of_the_length_limit() -> None:
    answers = [_email_validators_answer(text) for text in _near_the_limit()]
    assert any("too long" in answer for answer in answers)
    assert any("@" in answer and "too long" not in answer for answer in answers)


def test_valid_email_answers_as_email_validator_for_every_input_cache_cold_and_warm() -> None:
    """The first pass fills the cache with every domain (valid or not); the second answers
    the plain addresses from it. Each time every answer, address or error, is email-validator's."""
    schemas.checked_domain.cache_clear()
    for attempt in ("cold", "warm"):
        for text in CORPUS:
            assert _ours(text) == _email_validators_answer(text), (attempt, text)
    assert schemas.checked_domain.cache_info().hits > len(LOCAL_PARTS)  # the warm pass used the cache


def test_the_email_type_validates_as_emailstr_did_errors_included() -> None:
    """The Email type (NFKC, the cache, lowercase) against the type it replaced, built on
    pydantic's EmailStr: the same value, or the same errors (type, message, context)."""
    before = TypeAdapter(
        Annotated[EmailStr, BeforeValidator(schemas._nfkc_stripped), AfterValidator(str.lower)]  # type: ignore[misc]
    )
    after: TypeAdapter[Any] = TypeAdapter(schemas.Email)

    def answer(adapter: TypeAdapter[Any], text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as error:
            return error.errors(include_url=False)

    for text in [*CORPUS, *PYDANTIC_WRAPPED] * 2:  # twice: the cache warm the second time
        assert answer(after, text) == answer(before, text), text


def test_the_domain_cache_is_bounded() -> None:
    """A run with more distinct domains than the cache holds keeps only the last ones."""
    schemas.checked_domain.cache_clear()
    maxsize = schemas.checked_domain.cache_info().maxsize
    assert maxsize is not None
    for n in range(maxsize + 500):
        assert schemas.valid_email(f"user@d{n}.example.com") == f"user@d{n}.example.com"
    assert schemas.checked_domain.cache_info().currsize <= maxsize


def test_an_address_longer_than_any_valid_one_never_reaches_the_domain_cache() -> None:
    """A huge domain is refused by email-validator, as before, and is not kept: 4096 cached
    megabyte-long domains from a hostile import file would be gigabytes."""
    schemas.checked_domain.cache_clear()
    huge = "user@" + "d" * 100_000 + ".example.com"
    with pytest.raises(PydanticCustomError):
        schemas.valid_email(huge)
    assert schemas.checked_domain.cache_info().currsize == 0


@pytest.mark.parametrize("text", ["user@example.com", "USER@EXAMPLE.COM", "user@bücher.example"])
def test_a_valid_address_twice_is_the_same_address(text: str) -> None:
    assert schemas.valid_email(text) == schemas.valid_email(text) == _email_validators_answer(text)

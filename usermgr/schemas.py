"""pydantic 2 schemas: what a user may be created, updated, imported and shown as.

Every normalisation rule (email lowercased, NFKC, the password policy) lives here once.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any

from email_validator import EmailNotValidError
from email_validator import validate_email as validate_email_address
from email_validator.rfc_constants import ATEXT, CASE_INSENSITIVE_MAILBOX_NAMES, EMAIL_MAX_LENGTH
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.networks import validate_email as pydantic_validate_email

# The role-name rule lives in contract.py (no pydantic there); api.py imports it from here.
from usermgr.contract import (
    EVENT_RECORD,
    IMPORTED_FIELDS,
    UNPRINTABLE_CATEGORIES,
    USER_RECORD,
    is_uid,
    validate_role_name,
)
from usermgr.contract import ROLE_NAME as ROLE_NAME

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 1024
USERNAME = re.compile(r"[A-Za-z0-9_.@+-]{1,150}")
UID_AS_USERNAME = "invalid username: it must not be a UUID (a USER of that form is a uid)"
FULL_NAME_MAX_LENGTH = 300
# Hash formats `import` stores as they are: argon2 (PHC) and bcrypt (modular crypt).
_HAS_OFFSET = re.compile(r"(Z|[+-]\d\d:?\d\d)$")
_DATE = re.compile(r"\d{4}-\d\d-\d\d", re.ASCII)
HASH_FORMAT = re.compile(
    r"\$argon2(id|i|d)\$v=\d+\$m=(?P<m>\d+),t=(?P<t>\d+),p=(?P<p>\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
    r"|\$2[aby]\$(?P<rounds>\d\d)\$[./A-Za-z0-9]{53}"
)
HASH_COST_CAPS = {"m": 1024 * 1024, "t": 16, "p": 16, "rounds": 16}
"""The most an imported hash may ask of each login to its account (argon2's memory in KiB,
passes and lanes; bcrypt's log2 rounds): anyone may try a login, and a hash of t=999999999 or
bcrypt cost 31 would hold a worker for hours a try. RFC 9106's and argon2-cffi's profiles and
bcrypt's usual 10 to 14 are well within."""
_COST_LIMITS = "at most argon2 m={m}, t={t}, p={p}, or bcrypt cost {rounds}".format(**HASH_COST_CAPS)


_SURROGATE = re.compile("[\ud800-\udfff]")  # exactly Unicode's category Cs


def reject_surrogates(text: str, what: str = "text") -> str:
    """`text` unless it holds a surrogate code point (U+D800 to U+DFFF, category Cs).

    No valid Unicode text holds one, yet Python makes them from undecodable bytes in an
    argument (0xff becomes U+DCFF) and JSON lets `"\\udcff"` through; no database, hash or
    JSON encoder downstream can store or write them. The message never quotes the text.
    """
    if _SURROGATE.search(text):
        raise ValueError(f"{what} is not valid Unicode: it holds a surrogate code point (U+D800 to U+DFFF)")
    return text


def _nfkc_stripped(value: Any) -> Any:
    """NFKC and surrounding white space removed, for every text field but the password.
    ASCII text is already in NFKC and holds no surrogate: only its white space goes (most
    of an import's cells, three a row)."""
    if not isinstance(value, str):
        return value
    if value.isascii():
        return value.strip()
    return unicodedata.normalize("NFKC", reject_surrogates(value)).strip()


# Printable ASCII (space to ~) is in none of those categories: only the other characters
# of a text need their category looked up, so a name costs one regex scan, not a call a character.
_BEYOND_PRINTABLE_ASCII = re.compile("[^\x20-\x7e]")


def _has_invisible_or_control(text: str) -> bool:
    """Whether a character of `text` is in UNPRINTABLE_CATEGORIES. str.isprintable is False for
    every character in Unicode's C and Z categories but the space, so a text it passes (nearly
    every name) has none, and is answered in one C call; only the others are scanned."""
    if text.isprintable():
        return False
    return any(unicodedata.category(char) in UNPRINTABLE_CATEGORIES for char in _BEYOND_PRINTABLE_ASCII.findall(text))


def validate_password(password: str) -> str:
    """The password policy, in one place: 8 to 1024 characters after NFKC normalisation.

    Returns the normalised password, which is what gets hashed and verified.
    """
    normalized = unicodedata.normalize("NFKC", reject_surrogates(password, "password"))
    if len(normalized) < PASSWORD_MIN_LENGTH:
        raise ValueError(f"password too short: use at least {PASSWORD_MIN_LENGTH} characters")
    if len(normalized) > PASSWORD_MAX_LENGTH:
        raise ValueError(f"password too long: use at most {PASSWORD_MAX_LENGTH} characters")
    return normalized


def _check_username(value: str) -> str:
    if not USERNAME.fullmatch(value):
        raise ValueError("invalid username: use 1 to 150 of A-Z, a-z, 0-9 and . _ @ + -")
    if value.isdigit():
        raise ValueError("invalid username: it must not be all digits (a USER of digits is an id)")
    if is_uid(value.lower()):  # else a user named after a deleted user's uid hides their audit trail
        raise ValueError(UID_AS_USERNAME)
    return value


def _check_full_name(value: str) -> str:
    if not value:
        raise ValueError("full name must not be empty")
    if len(value) > FULL_NAME_MAX_LENGTH:
        raise ValueError(f"full name too long: use at most {FULL_NAME_MAX_LENGTH} characters")
    if _has_invisible_or_control(value):
        raise ValueError("full name must not contain control or invisible formatting characters")
    return value


def _check_uid(value: str) -> str:
    """A user's stable identity as usermgr writes it: a UUID in canonical (lowercase) form."""
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise ValueError("invalid uid: give a UUID such as 123e4567-e89b-42d3-a456-426614174000") from None
    if canonical != value:
        raise ValueError(f"invalid uid: write it as {canonical}")
    return value


HASH_MAX_LENGTH = 512  # users.hashed_password's column (models.py): PostgreSQL refuses longer text


def _check_hash(value: str) -> str:
    if len(value) > HASH_MAX_LENGTH:  # an argon2 salt and hash may be any length
        raise ValueError(f"unsupported hashed_password: longer than {HASH_MAX_LENGTH} characters")
    parsed = HASH_FORMAT.fullmatch(value)
    if parsed is None:
        raise ValueError("unsupported hashed_password: give an argon2 ($argon2id$...) or bcrypt ($2b$...) hash")
    if any(int(parsed[name] or 0) > cap for name, cap in HASH_COST_CAPS.items()):
        raise ValueError(f"unsupported hashed_password: its cost is beyond what a login can pay ({_COST_LIMITS})")
    return value


# An address email-validator reads the plain way: a dot-atom of ASCII (its ATEXT, as in its DOT_ATOM_TEXT), one
# @, and a domain without white space, angle brackets or quotes (nothing for pydantic's EmailStr
# to take off before email-validator sees it). For such an address email-validator's answer is
# the local part as it is, "@", and the domain as its domain check normalises it (IDNA, case),
# unless the address is too long or the local part is a mailbox name it lowercases (`postmaster`).
_PLAIN_ADDRESS = re.compile(rf"([{ATEXT}]+(?:\.[{ATEXT}]+)*)@([^@\s<>\"]+)")
_CASE_FOLDED_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


@lru_cache(maxsize=4096)
def checked_domain(domain: str) -> tuple[str, int] | None:
    """email-validator's normalised form of `domain`, and the most UTF-8 bytes
    the domain's part of an address takes in any of the three forms whose length it checks
    (as given, normalised, IDNA ASCII), "@" included; None for a domain it refuses. Checked
    on an address with the shortest local part there is: the domain check reads the domain
    alone. Bounded: a million distinct domains keep the last 4096."""
    try:
        checked = validate_email_address(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    forms = (domain, checked.domain, checked.ascii_domain)
    return checked.domain, 1 + max(len(form.encode()) for form in forms)


def valid_email(text: str) -> str:
    """`text` as pydantic's EmailStr validates it (email-validator's normalised address), or
    its PydanticCustomError; an import's rows share a few domains, so a plain address whose
    domain email-validator already passed costs a regex and a cache look-up, not email-
    validator's parse of the whole address. Anything else, including every address that
    fails, goes through EmailStr's own validation, so the rules and messages are its own.
    Text longer than any valid address never reaches the cache: a hostile file of huge
    distinct domains would otherwise keep 4096 of them in memory."""
    plain = _PLAIN_ADDRESS.fullmatch(text) if len(text) <= EMAIL_MAX_LENGTH else None
    if plain is not None:
        local, domain = plain.groups()
        checked = checked_domain(domain)
        if (
            checked is not None
            and len(local) + checked[1] <= EMAIL_MAX_LENGTH
            and local.lower() not in _CASE_FOLDED_MAILBOXES
        ):
            return f"{local}@{checked[0]}"
    return pydantic_validate_email(text)[1]


Email = Annotated[
    str,
    AfterValidator(valid_email),  # first, as EmailStr was: the NFKC below runs before it, wrapping it
    BeforeValidator(_nfkc_stripped),
    AfterValidator(str.lower),
    WithJsonSchema({"type": "string", "format": "email"}),
]
Username = Annotated[str, BeforeValidator(_nfkc_stripped), AfterValidator(_check_username)]
FullName = Annotated[str, BeforeValidator(_nfkc_stripped), AfterValidator(_check_full_name)]
Password = Annotated[str, AfterValidator(validate_password)]
RoleName = Annotated[str, AfterValidator(validate_role_name)]
HashedPassword = Annotated[str, AfterValidator(_check_hash)]
Uid = Annotated[str, AfterValidator(_check_uid)]


def _naive_is_utc(value: Any) -> Any:
    """Timestamps without an offset are taken as UTC, as usermgr writes them; a date alone is its start.
    A number is refused, as `--expires` refuses one: pydantic would take it as seconds, and
    20270331 would be 1970-08-23."""
    if isinstance(value, int | float) and not isinstance(value, bool):  # a JSON number
        raise ValueError(
            "a number is not a time: give an ISO 8601 date or time such as 2027-01-31 or 2027-01-31T17:00Z"
        )
    if isinstance(value, str) and _DATE.fullmatch(value):
        return value + "T00:00:00+00:00"
    if isinstance(value, str) and value and not _HAS_OFFSET.search(value):
        return value + "+00:00"
    return value


def _in_utc(value: datetime) -> datetime:
    """Stored in UTC: a time with no UTC equivalent (`9999-12-31T23:00:00-05:00` is in
    the year 10000) is refused here, with its line, before anything is written."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range in UTC: use a time from 0001-01-01 to 9999-12-31 UTC") from None


UtcTime = Annotated[AwareDatetime, BeforeValidator(_naive_is_utc), AfterValidator(_in_utc)]
"""An ISO 8601 date and time in UTC: one without an offset is taken as UTC, a date alone as its start."""

_UTC_TIME: TypeAdapter[datetime] | None = None


def utc_time(text: str) -> datetime:
    """`text` as a UtcTime; ValueError with a one-line reason if it is none."""
    global _UTC_TIME
    if _UTC_TIME is None:
        _UTC_TIME = TypeAdapter(UtcTime, config=ConfigDict(hide_input_in_errors=True))
    try:
        return _UTC_TIME.validate_python(text)
    except ValidationError as error:
        raise ValueError(first_error(error)) from None


def latin_lookalike(email: str) -> str | None:
    """The all-Latin email that `email` can be mistaken for, when it has letters from
    another script that look like Latin ones (Unicode's confusables data, through
    confusable-homoglyphs); None for an email with nothing to mistake."""
    if email.isascii():
        return None
    from confusable_homoglyphs import confusables

    found = confusables.is_confusable(email, greedy=True, preferred_aliases=["latin"]) or []
    replacements = {
        item["character"]: latin[0]["c"]
        for item in found
        if (latin := [glyph for glyph in item["homoglyphs"] if glyph["n"].startswith("LATIN") or glyph["c"].isascii()])
    }
    lookalike = "".join(replacements.get(char, char) for char in email).lower()
    return lookalike if lookalike != email else None


_EMAIL: TypeAdapter[str] | None = None


def normalize_email(text: str) -> str | None:
    """`text` as the Email type stores it (validated, NFKC, lowercased), or None if it is
    no email: so a lookup finds a user by every form `create` accepted for them."""
    global _EMAIL
    if _EMAIL is None:
        _EMAIL = TypeAdapter(Email)
    try:
        return _EMAIL.validate_python(text)
    except ValidationError:
        return None


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    email: Email
    username: Username | None = None
    full_name: FullName | None = None
    password: Password | None = Field(default=None, repr=False)


class UserUpdate(BaseModel):
    """Only the fields that were given are applied (see `model_fields_set`)."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    username: Username | None = None
    full_name: FullName | None = None
    expires_at: UtcTime | None = Field(default=None, description="ISO 8601, UTC without an offset; null: never.")

    @model_validator(mode="after")
    def _email_stays(self) -> UserUpdate:
        if "email" in self.model_fields_set and self.email is None:
            raise ValueError("email cannot be removed, only changed")
        return self


class _UserRecord(BaseModel):
    """What UserResponse adds to the contract's fields: read from an ORM user, roles as names."""

    model_config = ConfigDict(from_attributes=True)

    @field_validator("roles", mode="before", check_fields=False)
    @classmethod
    def _role_names(cls, value: Any) -> Any:
        return [getattr(role, "name", role) for role in value]


UserResponse = create_model(
    "UserResponse",
    __base__=_UserRecord,
    __doc__="A user as shown to anyone: the contract's record (contract.USER_RECORD), never the password hash.",
    __module__=__name__,
    **{name: (kind, ...) for name, kind in USER_RECORD.items()},  # type: ignore[call-overload]
)


AuditEventResponse = create_model(
    "AuditEventResponse",
    __doc__="One event of the audit trail: the contract's event (contract.EVENT_RECORD).",
    __module__=__name__,
    **{name: (kind, ...) for name, kind in EVENT_RECORD.items()},  # type: ignore[call-overload]
)


class ImportRow(BaseModel):
    """One row of `usermgr import`: the contract's user fields, plus a password or a hash."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    uid: Uid | None = None
    email: Email
    username: Username | None = None
    full_name: FullName | None = None
    roles: list[RoleName] = Field(default_factory=list)  # a default [] is deep-copied for each row
    is_active: bool = True
    password: Password | None = Field(default=None, repr=False)
    hashed_password: HashedPassword | None = Field(default=None, repr=False)
    created_at: UtcTime | None = None
    last_login_at: UtcTime | None = None
    expires_at: UtcTime | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> ImportRow:
        if self.password is not None and self.hashed_password is not None:
            raise ValueError("give either password or hashed_password, not both")
        return self


def _check_import_fields() -> None:
    """ImportRow takes exactly the contract's imported fields (and a secret): a field added
    to the contract but not here would be dropped by every import without a word."""
    taken = set(ImportRow.model_fields) - {"password", "hashed_password"}
    if taken != set(IMPORTED_FIELDS):
        raise TypeError(
            f"ImportRow's fields {sorted(taken)} are not contract.IMPORTED_FIELDS {sorted(IMPORTED_FIELDS)}"
        )


_check_import_fields()


def first_error(error: ValidationError) -> str:
    """A one-line message from a pydantic ValidationError, naming the field."""
    details = error.errors()
    if not details:
        return str(error)
    detail = details[0]
    field = ".".join(str(part) for part in detail.get("loc", ()) if part != "__root__")
    message = detail.get("msg", "invalid value").removeprefix("Value error, ")
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    if field and not message.startswith(field):
        message = f"{field}: {message}"
    return f"{message}{more}"

"""Domain errors and the one table that maps each to a CLI exit code and an HTTP status.

This module imports nothing heavy: `usermgr verify` and `usermgr --help` load it.
"""

from __future__ import annotations

from typing import NamedTuple


class UsermgrError(Exception):
    """An error whose message is written for the user: what went wrong and what to do."""


class ConfigurationError(UsermgrError):
    """A setting is missing or unusable (no key file, an insecure key file, a bad value)."""


class DatabaseUnavailable(UsermgrError):
    """The database cannot be opened, is corrupt, or has no schema yet."""


def cut_repr(stored: object) -> str:
    """A stored value as an error names it: its repr (escaped, one line), cut to 40 characters."""
    shown = repr(stored)
    return shown if len(shown) <= 40 else shown[:37] + "..."


class UnreadableTimestamp(DatabaseUnavailable):
    """A stored timestamp that is not one (text written into the database by hand or by
    another tool): the database is damaged, not usermgr; the message names the value, cut short."""

    def __init__(self, stored: object) -> None:
        super().__init__(
            f"the database holds a timestamp usermgr cannot read ({cut_repr(stored)}): correct that row with SQL"
            " or restore a backup"
        )


class UnreadableBoolean(DatabaseUnavailable):
    """A stored true/false value that is neither (SQLite keeps any value in a BOOLEAN column:
    another tool's 'no', 'false', 2): read by its Python truth, 'no' would be an enabled user."""

    def __init__(self, stored: object) -> None:
        super().__init__(
            f"the database holds a true/false value usermgr cannot read ({cut_repr(stored)}): correct that row with"
            " SQL (0 or 1) or restore a backup"
        )


class InvalidInput(UsermgrError):
    """Bad email, weak password, malformed import row, bad role name, bad duration."""


class NotFound(UsermgrError):
    """No user (or role) matches."""


class Conflict(UsermgrError):
    """Already exists, or the change would remove the last active admin."""


class AlreadyExists(Conflict):
    """A unique index refused a write; `field` names the index's column (email, username, uid)
    or is None, for a caller that can then name the row at fault."""

    def __init__(self, field: str | None) -> None:
        super().__init__(f"already exists: a {'user with that ' + field if field else 'row with those values'}")
        self.field = field


class AuthenticationFailed(UsermgrError):
    """Wrong password, unknown user, disabled or locked: one message for all."""

    def __init__(
        self, message: str = "authentication failed: wrong email or password, or the account is disabled or locked"
    ) -> None:
        super().__init__(message)


class TokenInvalid(UsermgrError):
    """Bad signature, expired, malformed, wrong issuer or audience, revoked."""


class Forbidden(UsermgrError):
    """A valid token without the required role."""


class IntegrityCheckFailed(UsermgrError):
    """The audit trail's hash chain is broken: an event was edited, inserted or deleted."""


class Codes(NamedTuple):
    exit_code: int
    http_status: int
    meaning: str  # a few words: the exit-code line of `usermgr --help`


# error -> its codes. Exit codes are the command-line contract's (README, Exit codes); 1 stays
# "unexpected failure", which is also where an unusable database lands.
ERROR_TABLE: dict[type[UsermgrError], Codes] = {
    DatabaseUnavailable: Codes(1, 503, "unexpected"),
    ConfigurationError: Codes(2, 500, "usage or configuration"),
    InvalidInput: Codes(3, 422, "invalid input"),
    NotFound: Codes(4, 404, "not found"),
    Conflict: Codes(5, 409, "conflict"),
    AuthenticationFailed: Codes(6, 401, "authentication failed"),
    TokenInvalid: Codes(7, 401, "token invalid"),
    Forbidden: Codes(8, 403, "forbidden"),
    # 500, not 409: a broken chain is damage to the server's own data that no request can
    # resolve (409 tells a client to change its request and retry).
    IntegrityCheckFailed: Codes(9, 500, "integrity check failed"),
}

UNEXPECTED_EXIT_CODE = 1


def exit_code_summary() -> str:
    """The exit codes in one line, from the table: what `usermgr --help` prints."""
    meanings = {0: "ok", UNEXPECTED_EXIT_CODE: "unexpected"}
    for codes in ERROR_TABLE.values():
        meanings.setdefault(codes.exit_code, codes.meaning)
    return ", ".join(f"{code} {meaning}" for code, meaning in sorted(meanings.items()))


def _codes(error: UsermgrError) -> Codes:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return Codes(UNEXPECTED_EXIT_CODE, 500, "unexpected")


def exit_code(error: UsermgrError) -> int:
    """The CLI exit code for a domain error."""
    return _codes(error).exit_code


def http_status(error: UsermgrError) -> int:
    """The HTTP status for a domain error."""
    return _codes(error).http_status

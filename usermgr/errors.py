"""Domain errors and the one table that maps each to a CLI exit code and an HTTP status.

This module imports nothing heavy: `usermgr verify` and `usermgr --help` load it.
"""

from __future__ import annotations


class UsermgrError(Exception):
    """An error whose message is written for the user: what went wrong and what to do."""

    meaning = "an error"  # a few words for the exit-code summary in `usermgr --help`


class ConfigurationError(UsermgrError):
    """A setting is missing or unusable (no key file, an insecure key file, a bad value)."""

    meaning = "usage or configuration"


class DatabaseUnavailable(UsermgrError):
    """The database cannot be opened, is corrupt, or has no schema yet."""

    meaning = "unexpected"


class InvalidInput(UsermgrError):
    """Bad email, weak password, malformed import row, bad role name, bad duration."""

    meaning = "invalid input"


class NotFound(UsermgrError):
    """No user (or role) matches."""

    meaning = "not found"


class Conflict(UsermgrError):
    """Already exists, or the change would remove the last active admin."""

    meaning = "conflict"


class AuthenticationFailed(UsermgrError):
    """Wrong password, unknown user, disabled or locked: one message for all."""

    meaning = "authentication failed"

    def __init__(
        self, message: str = "authentication failed: wrong email or password, or the account is disabled or locked"
    ) -> None:
        super().__init__(message)


class TokenInvalid(UsermgrError):
    """Bad signature, expired, malformed, wrong issuer or audience, revoked."""

    meaning = "token invalid"


class Forbidden(UsermgrError):
    """A valid token without the required role."""

    meaning = "forbidden"


# error -> (CLI exit code, HTTP status). Exit codes are the command-line contract's (README, Exit codes);
# 1 stays "unexpected failure", which is also where an unusable database lands.
ERROR_TABLE: dict[type[UsermgrError], tuple[int, int]] = {
    DatabaseUnavailable: (1, 503),
    ConfigurationError: (2, 500),
    InvalidInput: (3, 422),
    NotFound: (4, 404),
    Conflict: (5, 409),
    AuthenticationFailed: (6, 401),
    TokenInvalid: (7, 401),
    Forbidden: (8, 403),
}

UNEXPECTED_EXIT_CODE = 1


def exit_code_summary() -> str:
    """The exit codes in one line, from the table: what `usermgr --help` prints."""
    meanings = {0: "ok", UNEXPECTED_EXIT_CODE: "unexpected"}
    for cls, (code, _status) in ERROR_TABLE.items():
        meanings.setdefault(code, cls.meaning)
    return ", ".join(f"{code} {meaning}" for code, meaning in sorted(meanings.items()))


def _codes(error: UsermgrError) -> tuple[int, int]:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return UNEXPECTED_EXIT_CODE, 500


def exit_code(error: UsermgrError) -> int:
    """The CLI exit code for a domain error."""
    return _codes(error)[0]


def http_status(error: UsermgrError) -> int:
    """The HTTP status for a domain error."""
    return _codes(error)[1]

"""Password hashing: argon2id for new hashes; bcrypt verified for imported ones and upgraded."""

from __future__ import annotations

import base64
import contextlib
import secrets
from functools import cache
from typing import NamedTuple

import argon2
from passlib.context import CryptContext

BCRYPT_MAX_BYTES = 72


class _Argon2Params(NamedTuple):
    time_cost: int
    memory_cost: int
    parallelism: int


# A cheap argon2 profile for test suites only (USERMGR_HASH_PROFILE=test).
_TEST_PROFILE = _Argon2Params(time_cost=1, memory_cost=1024, parallelism=1)


def _argon2_params(profile: str) -> _Argon2Params:
    if profile == "test":
        return _TEST_PROFILE
    defaults = argon2.PasswordHasher()
    return _Argon2Params(defaults.time_cost, defaults.memory_cost, defaults.parallelism)


@cache
def context(profile: str = "default") -> CryptContext:
    """The CryptContext for a hash profile: argon2-cffi's own defaults unless `test`."""
    params = _argon2_params(profile)
    return CryptContext(
        schemes=["argon2", "bcrypt"],
        deprecated=["bcrypt"],
        argon2__type="ID",
        argon2__time_cost=params.time_cost,
        argon2__memory_cost=params.memory_cost,
        argon2__parallelism=params.parallelism,
    )


def hash_password(password: str, profile: str = "default") -> str:
    """Hash an already policy-checked (NFKC-normalised) password with argon2id."""
    return context(profile).hash(password)


def _is_bcrypt(hashed: str) -> bool:
    return hashed.startswith(("$2a$", "$2b$", "$2y$"))


def verify_password(password: str, hashed: str | None, profile: str = "default") -> tuple[bool, str | None]:
    """Check a password; on success also return a new argon2id hash when the stored one is
    deprecated (bcrypt) or weaker than today's parameters, else None.

    bcrypt only ever looked at the first 72 bytes and bcrypt 5 raises on longer input,
    so such a password is checked on its first 72 bytes and rehashed from all of it.
    """
    if hashed is None:
        verify_dummy(password, profile)
        return False, None
    ctx = context(profile)
    candidate: str | bytes = password
    if _is_bcrypt(hashed) and len(password.encode()) > BCRYPT_MAX_BYTES:
        candidate = password.encode()[:BCRYPT_MAX_BYTES]
    try:
        ok = ctx.verify(candidate, hashed)
    except (ValueError, TypeError):
        return False, None  # a stored value that is not a hash we know never matches
    if not ok:
        return False, None
    return True, ctx.hash(password) if ctx.needs_update(hashed) else None


@cache
def _dummy_hash(profile: str) -> str:
    """An argon2id hash with today's parameters and random salt and digest.

    Checking a password against it costs exactly what a real check costs, and nothing
    matches it; building it costs nothing, so even the first unknown user is not faster.
    """
    params = _argon2_params(profile)

    def b64(size: int) -> str:
        return base64.b64encode(secrets.token_bytes(size)).decode().rstrip("=")

    settings = f"m={params.memory_cost},t={params.time_cost},p={params.parallelism}"
    return f"$argon2id$v=19${settings}${b64(16)}${b64(32)}"


def verify_dummy(password: str, profile: str = "default") -> None:
    """Spend the time of a real check, so an unknown user answers as slowly as a known one.

    A password passlib refuses outright (over 4 KiB) is refused here as `verify_password`
    refuses it for a known user: the same answer, so the two cannot be told apart."""
    with contextlib.suppress(ValueError):
        context(profile).verify(password, _dummy_hash(profile))

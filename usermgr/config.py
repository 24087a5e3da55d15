"""Settings: global options and USERMGR_* environment variables, with documented defaults.

Stdlib only, so that `usermgr --help` and `usermgr verify` start fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from usermgr.errors import ConfigurationError, InvalidInput

DEFAULT_DATABASE_URL = "sqlite:///users.db"
KEY_FILE_NAME = "usermgr.key"
KEY_ALGORITHMS = ("HS256", "EdDSA", "ES256", "RS256")
"""The algorithms a key of the ring may have; USERMGR_TOKEN_ALGORITHM picks the one of new keys."""

ACCEPTED_DATABASE_URLS = (
    "use a SQLite file path (./NAME if the name has a colon), sqlite:///PATH,"
    " or postgresql://USER:PASSWORD@HOST[:PORT]/DBNAME"
)

_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_DAYS = 36500
"""The longest duration accepted (100 years): `now` plus any duration must still be a
datetime (year 9999 at most), or a lock period would end nowhere and a token's `exp`
could not be shown."""


def parse_duration(text: str, *, what: str = "duration") -> int:
    """Seconds in a duration such as `90s`, `15m`, `8h`, `7d` or a bare number of seconds."""
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    match = _DURATION.match(text)
    digits = match.group(1).lstrip("0") if match else ""
    if not match or not digits:
        raise InvalidInput(f"invalid {what} {shown}: use a positive number with s, m, h or d, such as 15m or 8h")
    # Past 20 digits it is too long anyway (and int() refuses some thousands of them).
    if len(digits) > 20 or int(digits) * _UNIT_SECONDS[match.group(2)] > MAX_DURATION_DAYS * 86400:
        raise InvalidInput(f"invalid {what} {shown}: too long, the most is {MAX_DURATION_DAYS}d (100 years)")
    return int(digits) * _UNIT_SECONDS[match.group(2)]


def normalize_database_url(url: str) -> str:
    """Accept a SQLAlchemy URL or a bare SQLite path such as `users.db.sample`.

    Text that starts like a URL (`sqlite:`, `postgresql:x`, `foo://`) is passed on as a URL,
    for `database.configure` to refuse, rather than read as a file of that name.
    """
    if not url.strip():
        raise ConfigurationError(
            "the database URL (--db or USERMGR_DATABASE_URL) is empty: leave it out (unset the variable) for the"
            f" default {DEFAULT_DATABASE_URL},"
            f" or {ACCEPTED_DATABASE_URLS}"
        )
    if "://" in url or urlsplit(url).scheme:
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            # psycopg 3 is the driver we ship in the `postgres` extra.
            return "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
    return f"sqlite:///{url}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise ConfigurationError(f"{name}={raw!r} must not be negative")
    return value


def _env_duration(name: str, default: str) -> int:
    raw = os.environ.get(name) or default
    try:
        return parse_duration(raw, what=name)
    except InvalidInput as error:
        raise ConfigurationError(str(error)) from None


def env_flag(name: str) -> bool:
    """A yes/no variable: 1, true, yes or on (any case) is yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Everything usermgr can be told; built once per process by `load_settings`."""

    database_url: str = DEFAULT_DATABASE_URL
    key_file: Path | None = None
    secret_key: str | None = field(default=None, repr=False)
    debug: bool = False
    token_algorithm: str = "HS256"
    """The algorithm of keys created from now on (`init`, `keys add`): a token's own key decides its algorithm."""
    token_ttl: int = 3600
    token_max_ttl: int = 30 * 86400
    token_issuer: str = "usermgr"
    token_audience: str | None = None
    token_leeway: int = 10
    lockout_threshold: int = 5
    lockout_period: int = 15 * 60
    hash_profile: str = "default"


def default_key_file(database_url: str) -> Path | None:
    """`usermgr.key` beside a SQLite database; no default for other databases."""
    path = sqlite_path(database_url)
    return path.parent / KEY_FILE_NAME if path is not None else None


def load_settings(database_url: str | None = None, key_file: str | None = None, debug: bool = False) -> Settings:
    """Settings from the given global options, then USERMGR_* variables, then defaults."""
    # An empty --db or USERMGR_DATABASE_URL is refused, not read as "the default": it is
    # usually a script's unset variable, and ./users.db would then be the wrong database.
    if database_url is None:
        database_url = os.environ.get("USERMGR_DATABASE_URL", DEFAULT_DATABASE_URL)
    url = normalize_database_url(database_url)
    key_path = key_file or os.environ.get("USERMGR_KEY_FILE")
    algorithm = os.environ.get("USERMGR_TOKEN_ALGORITHM", "HS256") or "HS256"
    if algorithm not in KEY_ALGORITHMS:
        raise ConfigurationError(f"USERMGR_TOKEN_ALGORITHM={algorithm!r}: use {', '.join(KEY_ALGORITHMS)}")
    profile = os.environ.get("USERMGR_HASH_PROFILE", "default") or "default"
    if profile not in ("default", "test"):
        raise ConfigurationError(f"USERMGR_HASH_PROFILE={profile!r}: use default (or test, for test suites only)")
    return Settings(
        database_url=url,
        key_file=Path(key_path) if key_path else default_key_file(url),
        secret_key=os.environ.get("USERMGR_SECRET_KEY") or None,
        debug=debug or env_flag("USERMGR_DEBUG"),
        token_algorithm=algorithm,
        token_ttl=_env_duration("USERMGR_TOKEN_TTL", "1h"),
        token_max_ttl=_env_duration("USERMGR_TOKEN_MAX_TTL", "30d"),
        token_issuer=os.environ.get("USERMGR_TOKEN_ISSUER") or "usermgr",
        token_audience=os.environ.get("USERMGR_TOKEN_AUDIENCE") or None,
        token_leeway=_env_int("USERMGR_TOKEN_LEEWAY", 10),
        lockout_threshold=_env_int("USERMGR_LOCKOUT_THRESHOLD", 5),
        lockout_period=_env_duration("USERMGR_LOCKOUT_PERIOD", "15m"),
        hash_profile=profile,
    )

"""The contract's names, declared once: the user record's fields and the built-in admin role.

Stdlib only and cheap to import, so the faces (`usermgr --help`, `usermgr verify`) and the
heavy modules (models, service, schemas) can all derive from it.

Adding a field to the record touches four places: the column in models.py, its migration,
USER_RECORD here, and the field's validation in schemas.ImportRow. Every output (show,
list, export, the API's user) and import carry it from there.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime

ADMIN_ROLE = "admin"

UID_LENGTH = 36
"""A uid's text: a UUID in its canonical form (lowercase hex, dashed)."""


def is_uid(value: object) -> bool:
    """True for a UUID in its canonical text form, as a uid is stored and a token's `sub` holds it."""
    if not isinstance(value, str) or len(value) != UID_LENGTH:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


ROLE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
"""What a role may be called. Checked here, without pydantic, so that `usermgr list --role R`
and `revoke-role` do not load it; schemas.RoleName and the API use the same rule."""


def validate_role_name(name: str) -> str:
    if not isinstance(name, str) or not ROLE_NAME.fullmatch(name):
        raise ValueError(f"invalid role name {name!r}: use 1 to 64 of a-z, 0-9, _ and -")
    return name


UNPRINTABLE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")
"""Unicode categories no name may hold and no table shows as they are: Cc, control characters
(NUL, newline, ESC); Cf, format characters (a right-to-left override); Zl and Zp, the line and
paragraph separators, which split lines for many readers. schemas refuses them in names;
output escapes them in table, email and id cells."""


USER_RECORD: dict[str, object] = {
    "id": int,
    "uid": str,
    "email": str,
    "username": str | None,
    "full_name": str | None,
    "is_active": bool,
    "roles": list[str],
    "created_at": datetime,
    "last_login_at": datetime | None,
    "locked_until": datetime | None,
    "expires_at": datetime | None,
}
"""A user in JSON, JSONL, CSV and the API: each field, in this order, with the type it holds
(../shared/spec/cli.md, Output). Times are in UTC."""

USER_FIELDS = tuple(USER_RECORD)

NOT_IMPORTED = ("id", "locked_until")
"""Record fields `import` reads past: the database gives each user its id, and a lock is
the database's own answer to failed logins."""

IMPORTED_FIELDS = tuple(name for name in USER_FIELDS if name not in NOT_IMPORTED)
"""The record fields `import` takes back (schemas.ImportRow validates exactly these)."""

EVENT_RECORD: dict[str, object] = {
    "id": int,
    "occurred_at": datetime,
    "actor": str,
    "on_behalf_of": str | None,
    "client_address": str | None,
    "action": str,
    "target_uid": str | None,
    "target_email": str | None,
    "changes": dict[str, object],
    "prev_hash": str,
    "hash": str,
}
"""An audit event as `usermgr audit` and `GET /audit` show it: each field, in this order, with
the type it holds (never a password, a hash of one, or a token)."""

EVENT_FIELDS = tuple(EVENT_RECORD)

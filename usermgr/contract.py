"""The contract's names, declared once: the user record's fields and the built-in admin role.

Stdlib only and import-free, so the faces (`usermgr --help`, `usermgr verify`) and the
heavy modules (models, service, schemas) can all derive from it.
"""

from __future__ import annotations

import re

ADMIN_ROLE = "admin"

ROLE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
"""What a role may be called. Checked here, without pydantic, so that `usermgr list --role R`
and `revoke-role` do not load it; schemas.RoleName and the API use the same rule."""


def validate_role_name(name: str) -> str:
    if not isinstance(name, str) or not ROLE_NAME.fullmatch(name):
        raise ValueError(f"invalid role name {name!r}: use 1 to 64 of a-z, 0-9, _ and -")
    return name


USER_FIELDS = (
    "id",
    "uid",
    "email",
    "username",
    "full_name",
    "is_active",
    "roles",
    "created_at",
    "last_login_at",
    "locked_until",
)
"""A user in JSON, JSONL, CSV and the API, in this order (../shared/spec/cli.md, Output)."""

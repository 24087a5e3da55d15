"""The contract's names, declared once: the user record's fields and the built-in admin role.

Stdlib only and import-free, so the faces (`usermgr --help`, `usermgr verify`) and the
heavy modules (models, service, schemas) can all derive from it.
"""

from __future__ import annotations

ADMIN_ROLE = "admin"

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

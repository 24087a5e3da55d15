"""The rules. Every operation is one transaction; every failure is a domain error.

Both faces (cli.py, api.py) call `service.<name>` and add no rule of their own. The rules
live by concern, imports flowing one way:

    core        transactions, and finding the users a USER names
    audit       the audit trail: events recorded with each change, the hash chain, prune
    revocation  which changes end a user's tokens (one rule for every path)
    roles       roles, and the guard that keeps an active admin
    records     the contract's record; filtered lists, streamed
    users       create and change users
    auth        logins, lockout, token holders
    bulk        import: validate all, hash on every core, one transaction

passlib, PyJWT and pydantic are imported inside the functions that use them, so that
`usermgr show` and `usermgr list` never pay for loading them; and each name below is
imported from its module when it is first read (lazy.lazy_exports), so that `usermgr
disable` does not load the import machinery (bulk), nor `usermgr show` the logins (auth).
"""

from typing import TYPE_CHECKING

from usermgr.lazy import import_once, lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and readers
    from usermgr.service.audit import (
        ACTIONS,
        ANONYMOUS,
        Actor,
        AuditFilter,
        ChainReport,
        act_as,
        acting_user,
        audit_filter,
        change_keys_audited,
        iter_events,
        parse_time,
        prune,
        recorded_address,
        verify_chain,
    )
    from usermgr.service.auth import authenticate, check_token_holder, holder_of_token, holder_record, login
    from usermgr.service.bulk import (
        ON_CONFLICT,
        ImportPlan,
        ImportResult,
        apply_import,
        check_import,
        hash_passwords,
        plan_import,
        seconds_to_hash,
    )
    from usermgr.service.core import MAX_ROW_COUNT, MAX_USER_ID, get_user, ping, unreachable_usernames
    from usermgr.service.records import UserFilter, iter_user_records, iter_user_rows, list_roles, user_record
    from usermgr.service.revocation import Access, access_of, revoke_tokens, revokes_tokens
    from usermgr.service.roles import grant_role, revoke_role
    from usermgr.service.users import (
        check_new_user,
        create_user,
        delete_users,
        expiry,
        new_user,
        set_active,
        set_password,
        unlock,
        update_user,
        user_changes,
    )

_EXPORTS = {
    "core": ("MAX_ROW_COUNT", "MAX_USER_ID", "get_user", "ping", "unreachable_usernames"),
    "audit": (
        "ACTIONS",
        "ANONYMOUS",
        "Actor",
        "AuditFilter",
        "ChainReport",
        "act_as",
        "acting_user",
        "audit_filter",
        "change_keys_audited",
        "iter_events",
        "parse_time",
        "prune",
        "recorded_address",
        "verify_chain",
    ),
    "revocation": ("Access", "access_of", "revoke_tokens", "revokes_tokens"),
    "roles": ("grant_role", "revoke_role"),
    "records": ("UserFilter", "iter_user_records", "iter_user_rows", "list_roles", "user_record"),
    "users": (
        "check_new_user",
        "create_user",
        "delete_users",
        "expiry",
        "new_user",
        "set_active",
        "set_password",
        "unlock",
        "update_user",
        "user_changes",
    ),
    "auth": ("authenticate", "check_token_holder", "holder_of_token", "holder_record", "login"),
    "bulk": (
        "ON_CONFLICT",
        "ImportPlan",
        "ImportResult",
        "apply_import",
        "check_import",
        "hash_passwords",
        "plan_import",
        "seconds_to_hash",
    ),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)


def load_all() -> None:
    """Import every module of the service now: a server does it once at start, so that no
    request waits for an import, nor runs while the collector is paused for one."""
    for module in _EXPORTS:
        import_once(f"{__name__}.{module}")


__all__ = [
    "ACTIONS",
    "ANONYMOUS",
    "MAX_ROW_COUNT",
    "MAX_USER_ID",
    "ON_CONFLICT",
    "Access",
    "Actor",
    "AuditFilter",
    "ChainReport",
    "ImportPlan",
    "ImportResult",
    "UserFilter",
    "access_of",
    "act_as",
    "acting_user",
    "apply_import",
    "audit_filter",
    "authenticate",
    "change_keys_audited",
    "check_import",
    "check_new_user",
    "check_token_holder",
    "create_user",
    "delete_users",
    "expiry",
    "get_user",
    "grant_role",
    "hash_passwords",
    "holder_of_token",
    "holder_record",
    "iter_events",
    "iter_user_records",
    "iter_user_rows",
    "list_roles",
    "login",
    "new_user",
    "parse_time",
    "ping",
    "plan_import",
    "prune",
    "recorded_address",
    "revoke_role",
    "revoke_tokens",
    "revokes_tokens",
    "seconds_to_hash",
    "set_active",
    "set_password",
    "unlock",
    "unreachable_usernames",
    "update_user",
    "user_changes",
    "user_record",
    "verify_chain",
]

"""Bulk import: validate every row first, hash on every core, then one transaction."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from usermgr.config import Settings
from usermgr.contract import IMPORTED_FIELDS
from usermgr.database import utcnow
from usermgr.errors import AlreadyExists, Conflict, InvalidInput
from usermgr.models import DeletedUid, Role, User, new_uids, user_roles

if TYPE_CHECKING:
    from usermgr.schemas import ImportRow
from usermgr.service.audit import (
    COLUMN_FIELDS,
    TRACKED_FIELDS,
    State,
    StoredEvent,
    canonical_changes,
    created_changes_texts,
    diff,
    jsonable,
    record_stored,
)
from usermgr.service.core import insert_many, reading, writing
from usermgr.service.revocation import Access, revokes_tokens
from usermgr.service.roles import ensured_role, keeping_an_admin
from usermgr.service.users import refuse_lookalike

USERS = User.metadata.tables[User.__tablename__]  # the Core table, for bulk statements
_IDS_BY_EMAIL = select(USERS.c.email, USERS.c.id).where(USERS.c.email.in_(bindparam("emails", expanding=True)))
"""A chunk's users by email: one statement, its list bound whole (an `in_(list)` coerces each
of a thousand emails into a literal of its own, twice a chunk)."""
MAX_REPORTED_ROW_ERRORS = 20


SpooledRow = dict[str, Any]


_IMPORT_CHUNK = 1000


ON_CONFLICT = ("error", "skip", "update")


class _Spool:
    """Lists of picklable things kept in a private temporary file (this process's own, unlinked),
    read back in the order they were put: what an import holds a chunk at a time, so that its
    memory stays flat. A list a record, behind its length, pickled: one C call a thousand rows,
    and it takes datetimes as they are."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (close() closes it)
        self._records = 0

    def put(self, items: list[Any]) -> None:
        if items:
            record = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.write(len(record).to_bytes(8, "big") + record)
            self._records += 1

    def __iter__(self) -> Iterator[list[Any]]:
        self._file.seek(0)
        for _ in range(self._records):
            size = int.from_bytes(self._file.read(8), "big")
            yield pickle.loads(self._file.read(size))

    def close(self) -> None:
        self._file.close()


@dataclass
class ImportPlan:
    """Rows that passed validation, spooled so memory stays flat, and the plaintext passwords
    still to be hashed (by line number)."""

    spool: _Spool = field(default_factory=_Spool, repr=False)
    rows: int = 0
    passwords: dict[int, str] = field(default_factory=dict, repr=False)
    hashes: dict[int, str] = field(default_factory=dict, repr=False)
    _pending: list[SpooledRow] = field(default_factory=list, repr=False)

    def add(self, line: int, row: ImportRow) -> None:
        """Spool a valid row: its fields as validated (the model's own dict, copied, times as
        datetimes), its roles sorted and once each, never its plaintext password."""
        spooled = row.__dict__.copy()
        password = spooled.pop("password")
        if password is not None:
            self.passwords[line] = password
        spooled["line"] = line
        if spooled["roles"]:
            spooled["roles"] = sorted(set(spooled["roles"]))
        self._pending.append(spooled)
        self.rows += 1
        if len(self._pending) == _IMPORT_CHUNK:
            self._spool_pending()

    def _spool_pending(self) -> None:
        self.spool.put(self._pending)
        self._pending = []

    def chunks(self) -> Iterator[list[SpooledRow]]:
        """The spooled rows, a chunk of up to a thousand at a time, in input order."""
        self._spool_pending()
        return iter(self.spool)

    def close(self) -> None:
        self.spool.close()
        self.passwords.clear()


@dataclass
class ImportResult:
    created: int = 0
    updated: int = 0
    skipped: int = 0


_WRITTEN = tuple(name for name in IMPORTED_FIELDS if name not in ("uid", "roles"))
"""The users columns a row sets as they are (the uid and the roles have rules of their own)."""


def plan_import(rows: Iterable[Any]) -> ImportPlan:
    """Validate every row first; nothing is written while any row is bad.

    `rows` are `output.InputRow`s. Bad rows are reported with their line numbers, the
    first twenty and then a count, as one InvalidInput.
    """
    plan = ImportPlan()
    try:
        _validate_into(plan, rows)
    except BaseException:
        plan.close()  # a bad row, or input that could not be read: the spool goes now
        raise
    return plan


def _validate_into(plan: ImportPlan, rows: Iterable[Any]) -> None:
    from pydantic import ValidationError

    from usermgr.schemas import ImportRow, first_error

    problems: list[str] = []
    bad = 0
    for row in rows:
        problem = row.problem
        if problem is None:
            try:
                valid = ImportRow.model_validate(row.fields)
            except ValidationError as error:
                problem = first_error(error)
        if problem is not None:
            bad += 1
            if len(problems) < MAX_REPORTED_ROW_ERRORS:
                problems.append(f"line {row.line}: {problem}")
            continue
        if bad:
            continue  # only counting now: nothing of this input will be written
        plan.add(row.line, valid)
    if bad:
        more = f" (the first {MAX_REPORTED_ROW_ERRORS} shown)" if bad > MAX_REPORTED_ROW_ERRORS else ""
        raise InvalidInput(
            "\n".join([*problems, f"{bad} invalid row{'s' if bad != 1 else ''}{more}; nothing was imported"])
        )


def seconds_to_hash(plan: ImportPlan, settings: Settings) -> float:
    """How long hashing the plan's plaintext passwords will take, from one measured hash."""
    from usermgr import security

    if not plan.passwords:
        return 0.0
    started = time.perf_counter()
    security.hash_password("measure-the-cost", settings.hash_profile)
    return (time.perf_counter() - started) * len(plan.passwords) / _hash_workers()


def _hash_workers() -> int:
    return os.cpu_count() or 1


def hash_passwords(plan: ImportPlan, settings: Settings, progress: Callable[[int], None] | None = None) -> None:
    """Hash the plan's plaintext passwords on every core, then forget the plaintext.

    argon2-cffi releases the GIL, so a thread per core adds to argon2's own lanes: by up
    to a third on an idle machine, by little when other work holds the cores (bench/RESULTS.md).
    """
    from usermgr import security

    lines = list(plan.passwords)

    def hash_one(line: int) -> tuple[int, str]:
        return line, security.hash_password(plan.passwords[line], settings.hash_profile)

    with ThreadPoolExecutor(max_workers=_hash_workers()) as pool:
        for line, hashed in pool.map(hash_one, lines):
            plan.hashes[line] = hashed
            if progress is not None:
                progress(1)
    plan.passwords.clear()


class _RoleIds:
    """Role name -> id, creating roles on first use, within the import's transaction, as
    grant-role does (`ensured_role`): a role another process creates meanwhile is taken."""

    def __init__(self, db: Session) -> None:
        self.db = db
        self.ids = {name: role_id for role_id, name in db.execute(select(Role.id, Role.name))}

    def __call__(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = ensured_role(self.db, name).id
        return self.ids[name]


def apply_import(
    db: Session,
    plan: ImportPlan,
    *,
    on_conflict: str = "error",
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Write the plan in one transaction: all of it, or with --dry-run none of it.

    An email already in the database (or earlier in the same input) is a Conflict unless
    `on_conflict` is `skip` or `update`; `update` makes the user match the row, roles included.
    `progress` is told how many rows each chunk held once it is written (not yet committed).
    """
    result = ImportResult()
    events = _Spool()
    try:
        with writing(db, dry_run=dry_run), keeping_an_admin(db), _import_page_cache(db):
            role_ids = _RoleIds(db)
            for chunk in plan.chunks():
                events.put(_import_chunk(db, plan, chunk, role_ids, on_conflict, result))
                if progress is not None:
                    progress(len(chunk))
            summary = {"created": result.created, "updated": result.updated, "skipped": result.skipped}
            events.put([("import.summary", None, None, canonical_changes(summary))])
            _append_events(db, events)
    except AlreadyExists as refused:
        if refused.field != "username":
            raise
        raise _username_clash(db, plan, on_conflict) or refused from None
    finally:
        events.close()
    return result


def _username_clash(db: Session, plan: ImportPlan, on_conflict: str) -> Conflict | None:
    """The line whose username the index refused without naming it: the first one whose
    username another email holds, in the database as it was (the import rolled back) or on
    an earlier line, unless an earlier line moved that email to another username. Read only
    on this error path; a chunk's own clash is caught in `_claim_username` as it is written."""
    holders: dict[str, str] = {}  # username -> the email that lines gave it
    names: dict[str, str | None] = {}  # email -> the username lines gave it
    with reading(db):
        for chunk in plan.chunks():
            wanted = [row["username"] for row in chunk if row["username"] is not None]
            stored = dict(db.execute(select(User.username, User.email).where(User.username.in_(wanted))).all())
            existing = set(db.scalars(select(User.email).where(User.email.in_([row["email"] for row in chunk]))))
            for row in chunk:
                email, name = row["email"], row["username"]
                if on_conflict == "skip" and email in existing:
                    continue
                holder = next((other for other in (holders.get(name), stored.get(name)) if other), None)
                if name is not None and holder not in (None, email) and names.get(holder, name) == name:
                    return Conflict(
                        f"line {row['line']}: the username {name!r} is {holder}'s already; nothing was imported"
                    )
                if name is not None:
                    holders[name] = email
                names[email] = name
    return None


def _append_events(db: Session, events: _Spool) -> None:
    """Append the spooled events to the audit trail, once every row is written: the chain's lock
    (PostgreSQL) is then the import's last, as it is every command's. Taken after the first
    chunk, it would be held while the import waits on a row a command has locked, the command
    waiting on the chain: a deadlock, and PostgreSQL ends one of them."""
    head = None  # the audit chain's newest hash, once this import has appended to it
    for batch in events:
        head = record_stored(db, batch, head=head)


IMPORT_PAGE_CACHE_KIB = 32 * 1024


@contextmanager
def _import_page_cache(db: Session) -> Iterator[None]:
    """On SQLite, a 32 MiB page cache for the import's transaction, then the connection's own
    again (2 MiB by default). An import touches the pages of the users' and the audit events'
    indexes all over (a new uid or event hash lands anywhere in its index): with the default
    cache SQLite reads the same pages back from the file again and again, about a third of
    the import's writing time at 100,000 rows (bench/RESULTS.md, figure 4). The cache grows
    only as pages are used, and the setting is the connection's alone."""
    connection = db.connection()
    if connection.dialect.name != "sqlite":
        yield
        return
    before = int(connection.exec_driver_sql("PRAGMA cache_size").scalar_one())
    connection.exec_driver_sql(f"PRAGMA cache_size = -{IMPORT_PAGE_CACHE_KIB}")
    try:
        yield
    finally:
        connection.exec_driver_sql(f"PRAGMA cache_size = {before}")


def check_import(db: Session, plan: ImportPlan, *, on_conflict: str = "error") -> None:
    """Raise now what `apply_import` would raise (a conflicting email or uid, a lookalike,
    the last admin), writing nothing: call it before `hash_passwords`, so that a bad row
    costs a dry run, not an argon2 hash for every password before it."""
    apply_import(db, plan, on_conflict=on_conflict, dry_run=True)


def _import_chunk(
    db: Session,
    plan: ImportPlan,
    chunk: list[SpooledRow],
    role_ids: _RoleIds,
    on_conflict: str,
    result: ImportResult,
) -> list[StoredEvent]:
    """Write one chunk; its events, for the audit trail once the import is written."""
    emails = [row["email"] for row in chunk]
    existing: dict[str, int] = {email: user_id for email, user_id in db.execute(_IDS_BY_EMAIL, {"emails": emails})}
    _check_uids(db, chunk)
    pending: dict[str, SpooledRow] = {}  # to be inserted, by email; a later row with that email meets it
    usernames: dict[str, SpooledRow] = {}  # the rows written so far, by username
    events: list[StoredEvent] = []  # one per user changed, written with the chunk

    def insert_pending() -> None:
        rows = list(pending.values())
        for row, user_id in zip(rows, _insert_rows(db, plan, rows, role_ids, events), strict=True):
            existing[row["email"]] = user_id
        result.created += len(rows)
        pending.clear()

    for row in chunk:
        line, email = row["line"], row["email"]
        if email not in existing and email not in pending:
            if not email.isascii():
                refuse_lookalike(db, email, line, pending)
            _claim_username(usernames, row)
            pending[email] = row
        elif on_conflict == "error":
            raise Conflict(f"line {line}: a user with email {email!r} already exists; use --on-conflict skip or update")
        elif on_conflict == "skip":
            result.skipped += 1
        else:
            _claim_username(usernames, row)
            if email in pending:
                insert_pending()
            _update_from_row(db, plan, existing[email], row, role_ids, events)
            result.updated += 1
    if pending:
        insert_pending()
    return events


def _claim_username(usernames: dict[str, SpooledRow], row: SpooledRow) -> None:
    """Refuse a username that an earlier written row of the chunk gave another email: its line
    named, where the unique index would only say that some username was taken. (Across chunks,
    and against the database, the index still refuses it.)"""
    name = row["username"]
    if name is None:
        return
    first = usernames.setdefault(name, row)
    if first["email"] != row["email"]:
        raise Conflict(
            f"line {row['line']}: the username {name!r} is also line {first['line']}'s ({first['email']});"
            " nothing was imported"
        )


def _check_uids(db: Session, chunk: list[SpooledRow]) -> None:
    """A row's uid may only be its own user's: one that names a user with another email
    (in the database or earlier in the input) is a Conflict, so an import never hands
    one person's identity, and with it their tokens, to another. A deleted user's uid is
    never given again, to anyone (their tokens would pass again): a Conflict too."""
    uids = {row["uid"]: row for row in chunk if row["uid"] is not None}
    if not uids:
        return
    owners = dict(db.execute(select(User.uid, User.email).where(User.uid.in_(list(uids)))).all())
    deleted = set(db.scalars(select(DeletedUid.uid).where(DeletedUid.uid.in_(list(uids)))))
    seen: dict[str, str] = {}
    for row in chunk:
        uid = row["uid"]
        if uid is None:
            continue
        if uid in deleted and uid not in owners:  # held again (restored by hand): that user's own
            raise Conflict(
                f"line {row['line']}: uid {uid} belonged to a deleted user and is never given again;"
                " leave it out to give the row a new identity; nothing was imported"
            )
        owner = owners.get(uid) or seen.get(uid)
        if owner is not None and owner != row["email"]:
            raise Conflict(f"line {row['line']}: uid {uid} already belongs to another user; nothing was imported")
        seen[uid] = row["email"]


def _user_values(plan: ImportPlan, row: SpooledRow) -> dict[str, Any]:
    values = {name: row[name] for name in _WRITTEN}
    values["hashed_password"] = plan.hashes.get(row["line"], row["hashed_password"])
    if values["created_at"] is None:
        del values["created_at"]  # a new user's is now, and an existing user keeps theirs
    return values


_SET_ONCE = {"failed_logins": 0, "token_version": 0}
"""Columns with a default that a new user's row starts from (insert_many, straight to the driver, applies none)."""


def _bound(dialect: Any, name: str, values: list[Any]) -> list[Any]:
    """A column's values as the driver takes them (its type's bind processing, as SQLAlchemy
    applies it), each distinct value processed once."""
    process = USERS.c[name].type.dialect_impl(dialect).bind_processor(dialect)
    if process is None:
        return values
    bound: dict[Any, Any] = {None: None}
    return [bound[value] if value in bound else bound.setdefault(value, process(value)) for value in values]


def _insert_rows(
    db: Session, plan: ImportPlan, rows: list[SpooledRow], role_ids: _RoleIds, events: list[StoredEvent]
) -> list[int]:
    """Insert new users with their roles and their `user.create` events, one insert_many each,
    the values gathered and bound a column at a time (most columns hold one or two values)."""
    dialect = db.get_bind().dialect
    count = len(rows)
    now = utcnow()
    columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in _WRITTEN}
    fresh = iter(new_uids(sum(row["uid"] is None for row in rows)))
    columns["uid"] = [next(fresh) if row["uid"] is None else row["uid"] for row in rows]
    columns["hashed_password"] = [plan.hashes.get(row["line"], row["hashed_password"]) for row in rows]
    columns["created_at"] = [now if created is None else created for created in columns["created_at"]]
    columns["updated_at"] = [now] * count
    roles = [row["roles"] for row in rows]
    events.extend(
        zip(
            ["user.create"] * count,
            columns["uid"],
            columns["email"],
            created_changes_texts(columns, roles),
            strict=True,
        )
    )
    for name, value in _SET_ONCE.items():
        columns[name] = [value] * count
    keys = [column.name for column in USERS.columns if column.name in columns]  # the table's order
    # One insert_many, then the ids by email: RETURNING in parameter order would make
    # SQLAlchemy insert row by row on SQLite, which cannot promise that order.
    insert_many(db, USERS, keys, list(zip(*(_bound(dialect, name, columns[name]) for name in keys), strict=True)))
    emails = [row["email"] for row in rows]
    ids = dict(db.execute(_IDS_BY_EMAIL, {"emails": emails}).all())
    inserted = [ids[email] for email in emails]
    links = [(user_id, role_ids(name)) for user_id, row in zip(inserted, rows, strict=True) for name in row["roles"]]
    if links:
        insert_many(db, user_roles, ("user_id", "role_id"), links)
    return inserted


def _update_from_row(
    db: Session, plan: ImportPlan, user_id: int, row: SpooledRow, role_ids: _RoleIds, events: list[StoredEvent]
) -> None:
    """Make an existing user match the row (a row naming another uid is a Conflict), revoking the
    user's tokens where the change calls for it, exactly as the single-user commands do.
    The user's row is locked first (FOR UPDATE: PostgreSQL's writers run at once) so that
    nothing deletes it between these reads and the writes; one deleted since the chunk found
    it is a Conflict, never an update of nobody or a role link to no user."""
    uid = db.scalar(select(User.uid).where(User.id == user_id).with_for_update())
    if uid is None:
        raise Conflict(
            f"line {row['line']}: the user {row['email']} was deleted while the import ran; nothing was imported"
        )
    if row["uid"] is not None and row["uid"] != uid:
        raise Conflict(f"line {row['line']}: {row['email']} is uid {uid} here, not {row['uid']}; nothing was imported")
    values = _user_values(plan, row)
    if values["hashed_password"] is None:
        del values["hashed_password"]  # a row without a secret keeps the user's password
    values.pop("created_at", None)
    before = _access_of_row(db, user_id)
    audited_before = _audit_state(db, user_id, before)
    after = Access(
        email=values["email"],
        hashed_password=values.get("hashed_password", before.hashed_password),
        is_active=values["is_active"],
        roles=frozenset(row["roles"]),
    )
    revokes = revokes_tokens(before, after)
    if revokes:
        values["token_version"] = USERS.c.token_version + 1
    audited_after = State(
        {
            name: sorted(row["roles"]) if name == "roles" else jsonable(values.get(name, audited_before.fields[name]))
            for name in TRACKED_FIELDS
        },
        after.hashed_password,
        audited_before.token_version + revokes,
        audited_before.failed_logins,
    )
    changes = diff(audited_before, audited_after)
    if changes:
        events.append(("user.update", uid, after.email, canonical_changes(changes)))
    db.execute(update(USERS).where(USERS.c.id == user_id).values(updated_at=utcnow(), **values))
    db.execute(delete(user_roles).where(user_roles.c.user_id == user_id))
    if row["roles"]:
        db.execute(insert(user_roles), [{"user_id": user_id, "role_id": role_ids(name)} for name in row["roles"]])


def _audit_state(db: Session, user_id: int, access: Access) -> State:
    """The user as the audit trail compares it, read with Core (the import writes with Core)."""
    row = db.execute(
        select(*(getattr(User, name) for name in COLUMN_FIELDS), User.token_version, User.failed_logins).where(
            User.id == user_id
        )
    ).one()
    fields = {name: jsonable(getattr(row, name)) for name in COLUMN_FIELDS}
    fields["roles"] = sorted(access.roles)
    return State(
        {name: fields[name] for name in TRACKED_FIELDS}, access.hashed_password, row.token_version, row.failed_logins
    )


def _access_of_row(db: Session, user_id: int) -> Access:
    email, hashed, active = db.execute(
        select(User.email, User.hashed_password, User.is_active).where(User.id == user_id)
    ).one()
    names = db.scalars(
        select(Role.name).join(user_roles, user_roles.c.role_id == Role.id).where(user_roles.c.user_id == user_id)
    )
    return Access(email=email, hashed_password=hashed, is_active=active, roles=frozenset(names))

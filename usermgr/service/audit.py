"""The audit trail: who did what to whom, and when; hash-chained so that tampering shows.

Every rule that changes a user or a role records its events here, through `record` or
`audited`, in the same transaction as the change: a rolled-back change (a conflict, a
dry run) leaves no event, and no event stands without its change.

Each event's hash is SHA-256 over a canonical serialisation of its content and the hash
of the event before it. Appends are serialised (on PostgreSQL by a transaction-level
advisory lock taken just before the insert; SQLite's write transactions already begin
IMMEDIATE, one writer at a time), so concurrent writers leave one unbroken chain.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import CursorResult, String, delete, func, or_, select, text, type_coerce
from sqlalchemy.orm import Session

from usermgr.config import parse_duration
from usermgr.contract import EVENT_FIELDS, USER_FIELDS, is_uid
from usermgr.database import undecodable_text_as_bytes, utcnow
from usermgr.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    IntegrityCheckFailed,
    InvalidInput,
    NotFound,
    UnreadableTimestamp,
)
from usermgr.models import ADDRESS_LENGTH, AuditEvent, User
from usermgr.service.core import (
    MAX_ROW_COUNT,
    email_named,
    find_user,
    insert_many,
    reading,
    shown_ref,
    storable,
    writing,
)

EVENTS = AuditEvent.metadata.tables[AuditEvent.__tablename__]  # the Core table, for batched inserts

ACTIONS = (
    "user.create",
    "user.update",
    "user.delete",
    "user.disable",
    "user.enable",
    "user.unlock",
    "user.password",
    "role.grant",
    "role.revoke",
    "tokens.revoke",
    "login.success",
    "login.failure",
    "login.locked",
    "import.summary",
    "audit.prune",
    "key.add",
    "key.activate",
    "key.deactivate",
    "key.retire",
)
"""The fixed vocabulary of actions."""


GENESIS = "0" * 64
"""The `prev_hash` of the first event ever recorded."""

TRACKED_FIELDS = tuple(name for name in USER_FIELDS if name not in ("id", "uid", "created_at", "last_login_at"))
"""The contract's fields whose changes an event lists as `field: [old, new]` (the identity is
the event's target; times of creation and login are the events themselves)."""

COLUMN_FIELDS = tuple(name for name in TRACKED_FIELDS if name != "roles")

_CHAIN_LOCK = 0x7573_6D67_7261_7564  # "usmgraud": the PostgreSQL advisory lock that orders appends
_STREAM_CHUNK = 2000
MAX_ACTOR_LENGTH = 400
ANONYMOUS = "anonymous"


# ---- the actor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who acts: `os:user@host` on the CLI, `uid:<uuid>` for an API token's holder, else
    `anonymous`; beside it, never instead, who an automated run acts for (USERMGR_ACTOR),
    and the API caller's address as the server sees it."""

    name: str
    on_behalf_of: str | None = None
    address: str | None = None


_ACTOR_KEY = "usermgr_actor"


def os_actor() -> Actor:
    """The CLI's actor: the operating-system user and host, and USERMGR_ACTOR beside them."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container): its number
        user = str(os.getuid())
    name = f"os:{user}@{socket.gethostname()}"
    if not _recordable(name):
        raise ConfigurationError(
            "the operating-system user and host (from $LOGNAME or $USER, and the host name)"
            f" must be at most {MAX_ACTOR_LENGTH} printable characters"
        )
    on_behalf_of = os.environ.get("USERMGR_ACTOR") or None
    if on_behalf_of is not None and not _recordable(on_behalf_of):
        raise ConfigurationError(f"USERMGR_ACTOR must be at most {MAX_ACTOR_LENGTH} printable characters")
    return Actor(name, on_behalf_of)


def _recordable(text: str) -> bool:
    """Whether `text` may stand in an event as who acted: it fits the column, and every admin
    who reads the trail on a terminal sees it as it is (str.isprintable: no control, escape or
    formatting character, no line or paragraph break, no lone surrogate)."""
    return len(text) <= MAX_ACTOR_LENGTH and text.isprintable()


def recorded_address(host: str | None) -> str | None:
    """The API caller's address as an event records it. The server takes it from the
    connection, or from X-Forwarded-For when the request comes through a proxy it trusts
    (127.0.0.1 by default): then it is whatever that header said. An IP address is recorded
    in its canonical form; other text is recorded escaped (no control or formatting character
    reaches an admin's terminal) and cut to fit the column: it must never fail the event's
    transaction, which holds the failed-login count that a lockout is made of. An IPv6 address
    with a zone (`fe80::1%eth0`) is other text: ipaddress takes any text at all as the zone."""
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and getattr(address, "scope_id", None) is None:
        return str(address)
    shown = host.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= ADDRESS_LENGTH else shown[: ADDRESS_LENGTH - 1] + "…"


def act_as(db: Session, actor: Actor) -> None:
    """Record `actor` on every event this session writes from now on."""
    db.info[_ACTOR_KEY] = actor


def acting_user(db: Session, uid: str) -> None:
    """The API's actor once a token is checked: its holder, at the caller's address."""
    act_as(db, replace(actor_of(db), name=f"uid:{uid}"))


def actor_of(db: Session) -> Actor:
    """The session's actor; one that was never told (the CLI, a script) is the OS user."""
    actor = db.info.get(_ACTOR_KEY)
    if actor is None:
        actor = os_actor()
        act_as(db, actor)
    return actor


# ---- what changed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """A user as an event compares it: the contract's fields (JSON-ready), and what may only
    be told as "changed" (the password hash, the token version)."""

    fields: dict[str, Any]
    hashed_password: str | None = field(default=None, repr=False)
    token_version: int = 0
    failed_logins: int = 0


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


def state_of(user: User) -> State:
    fields = {name: user.role_names if name == "roles" else jsonable(getattr(user, name)) for name in TRACKED_FIELDS}
    return State(fields, user.hashed_password, user.token_version or 0, user.failed_logins or 0)


def created_changes(values: Mapping[str, Any], roles: Sequence[str]) -> dict[str, Any]:
    """What `diff(None, state)` says of a new user, straight from its column values: the
    import's path, where this runs once a row."""
    changes: dict[str, Any] = {
        name: [None, jsonable(values.get(name))] for name in COLUMN_FIELDS if values.get(name) is not None
    }
    if roles:
        changes["roles"] = [None, sorted(roles)]
    if values.get("hashed_password") is not None:
        changes["password"] = "set"
    return changes


def diff(before: State | None, after: State | None) -> dict[str, Any]:
    """`field: [old, new]` for each contract field that differs; a password only as "set" or
    "changed", token revocation as "revoked". Never a hash."""
    old = before.fields if before is not None else {}
    new = after.fields if after is not None else {}
    changes: dict[str, Any] = {
        name: [old.get(name), new.get(name)]
        for name in TRACKED_FIELDS
        if old.get(name) != new.get(name) and not (_empty(old.get(name)) and _empty(new.get(name)))
    }
    if before is not None and after is not None:
        if before.hashed_password != after.hashed_password:
            changes["password"] = "changed"
        if after.token_version > before.token_version:
            changes["tokens"] = "revoked"
        if before.failed_logins != after.failed_logins:
            changes["failed_logins"] = [before.failed_logins, after.failed_logins]
    elif before is None and after is not None and after.hashed_password is not None:
        changes["password"] = "set"
    return changes


def _empty(value: Any) -> bool:
    return value is None or value == []


# ---- recording -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    action: str
    target_uid: str | None = None
    target_email: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)


def event_for(action: str, user: User | None = None, changes: dict[str, Any] | None = None) -> Event:
    return Event(action, user.uid if user else None, user.email if user else None, changes or {})


def record(db: Session, action: str, user: User | None = None, changes: dict[str, Any] | None = None) -> None:
    """Append one event, in the caller's open write transaction."""
    record_events(db, [event_for(action, user, changes)])


class KeyChangeLike(Protocol):
    """keyring.KeyChange, as the service sees it (the service does not import the key ring)."""

    @property
    def action(self) -> str: ...
    @property
    def kid(self) -> str: ...
    @property
    def alg(self) -> str: ...


KeyChanges = TypeVar("KeyChanges", bound=Sequence[KeyChangeLike])


def change_keys_audited(db: Session, change: Callable[[], KeyChanges]) -> KeyChanges:
    """Change the key ring (a file, written by `change`) inside a write transaction that then
    records a `key.<action>` event for each key changed: the ring is touched only once the
    database has taken the write lock, and a change that fails leaves no event. A file cannot
    roll back, so a commit that fails after the ring was written (rare: the lock is held)
    leaves the change unrecorded, and the command fails saying so."""
    with writing(db):
        changes = change()
        record_events(db, [Event(f"key.{item.action}", changes={"kid": item.kid, "alg": item.alg}) for item in changes])
    return changes


@contextmanager
def audited(db: Session, users: Sequence[User], action: str) -> Iterator[None]:
    """Record `action` for each of `users` that the block changed, with what changed."""
    before = {id(user): state_of(user) for user in users}
    yield
    events = []
    for user in users:
        changes = diff(before[id(user)], state_of(user))
        if changes:
            events.append(event_for(action, user, changes))
    record_events(db, events)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""The one serialisation of `changes`, stored as this text so that the hash covers exactly the
stored bytes (and an import serialises each event once)."""
_FLAT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_json_string = json.encoder.encode_basestring
"""A str as both encoders write it (JSONEncoder with ensure_ascii=False uses this very function),
called without the encoder's own dispatch: the import's events call it a few times a row."""


def canonical_changes(changes: dict[str, Any]) -> str:
    return _CANONICAL.encode(changes)


def event_hash(row: Mapping[str, Any]) -> str:
    """The hash an event must carry (what `audit verify` checks): `chain_hash` of its content."""
    return chain_hash(
        row["prev_hash"],
        _who_and_when(jsonable(row["occurred_at"]), row["actor"], row["on_behalf_of"], row["client_address"]),
        row["action"],
        row["target_uid"],
        row["target_email"],
        row["changes"],
    )


def _who_and_when(when: str, actor: str, on_behalf_of: str | None, address: str | None) -> str:
    """The event's time and actor as they stand in the hashed array (`chain_hash`): the part
    every event of one batch shares, so the writer encodes it once a batch."""
    return _FLAT.encode([when, actor, on_behalf_of, address])[1:-1]


def chain_hash(previous: str, who_and_when: str, action: str, uid: str | None, email: str | None, changes: str) -> str:
    """SHA-256 over the event's content (its `changes` as stored, canonical JSON text) and the
    hash of the event before it, serialised as one JSON array, UTF-8:
    `[prev_hash, occurred_at, actor, on_behalf_of, client_address, action, target_uid,
    target_email, changes]`, compact, not ASCII-escaped (the bytes `_FLAT.encode` writes of
    that list; tests/test_audit.py holds a golden hash). The one definition: the writer calls
    it for every event and `audit verify` for every event it checks."""
    encode = _json_string
    content = (
        f"[{encode(previous)},{who_and_when},{encode(action)},{'null' if uid is None else encode(uid)},"
        f"{'null' if email is None else encode(email)},{encode(changes)}]"
    )
    return hashlib.sha256(content.encode()).hexdigest()


def _lock_chain(db: Session) -> None:
    """Take the chain's lock until the transaction ends: on PostgreSQL a transaction-level
    advisory lock; SQLite's write transaction (BEGIN IMMEDIATE) already holds its one."""
    if db.get_bind().dialect.name == "postgresql":
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})


def _head(db: Session) -> str:
    return db.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)) or GENESIS


def record_events(db: Session, events: Sequence[Event], *, head: str | None = None) -> None:
    """Chain `events` after the newest one (or `head`, read earlier under the chain's lock)
    and insert them, in one statement."""
    record_stored(
        db,
        [(event.action, event.target_uid, event.target_email, canonical_changes(event.changes)) for event in events],
        head=head,
    )


StoredEvent = tuple[str, str | None, str | None, str]
"""An event as it is stored: its action, target uid, target email, and its changes already as
canonical JSON text (`canonical_changes`)."""


def created_changes_texts(columns: Mapping[str, Sequence[Any]], roles: Sequence[Sequence[str]]) -> list[str]:
    """`canonical_changes(created_changes(row, row_roles))` for each new user of a batch given
    column by column (`columns` holds at least COLUMN_FIELDS and hashed_password): the
    import's path. Each `,"field":[null,value]` is encoded a column at a time (a field that is
    not set: ""), in the sorted order of the canonical text, and a user's text is the join of
    their fields, its first comma dropped (tests/test_audit.py holds it equal to the generic
    path, field for field). A column no user of the batch sets is left out whole."""
    parts: dict[str, Sequence[str] | None] = {
        name: _created_column(name, columns[name]) for name in COLUMN_FIELDS if name in columns
    }
    sorted_roles = [tuple(sorted(names)) if names else None for names in roles]
    parts["roles"] = _created_column("roles", sorted_roles) or [""] * len(roles)  # kept: zip checks its length
    parts["password"] = [',"password":"set"' if hashed is not None else "" for hashed in columns["hashed_password"]]
    ordered = [part for _, part in sorted(parts.items()) if part is not None]
    return ["{" + text[1:] + "}" for text in map("".join, zip(*ordered, strict=True))]


def _created_column(name: str, values: Sequence[Any]) -> list[str] | None:
    """`,"name":[null,value]` for each value that is set ("" for one that is not), as the
    canonical encoder writes it; None if no value is set."""
    if all(value is None for value in values):
        return None
    prefix = f",{_json_string(name)}:[null,"
    encoded: dict[Any, str] = {}  # booleans, role lists and other repeated values: encoded once
    texts: list[str] = []
    append = texts.append
    for value in values:
        if value is None:
            append("")
        elif type(value) is str:
            append(f"{prefix}{_json_string(value)}]")
        else:
            text = encoded.get(value)  # a role list comes as a tuple
            if text is None:
                text = encoded[value] = f"{prefix}{_CANONICAL.encode(jsonable(value))}]"
            append(text)
    return texts


_EVENT_COLUMNS = (
    "occurred_at",
    "actor",
    "on_behalf_of",
    "client_address",
    "action",
    "target_uid",
    "target_email",
    "changes",
    "prev_hash",
    "hash",
)


def record_stored(db: Session, events: Sequence[StoredEvent], *, head: str | None = None) -> str | None:
    """`record_events` for events whose changes are already canonical text: chain them after
    the newest event (or `head`, read earlier in this transaction, under the chain's lock)
    and insert them in one executemany. Returns the new head (`head` itself if there was no event):
    a caller that appends batch after batch in one transaction (the import) passes it as the
    next batch's `head` instead of reading it back a batch at a time."""
    if not events:
        return head
    actor = actor_of(db)
    _lock_chain(db)
    previous = head if head is not None else _head(db)
    now = utcnow()
    shared = _who_and_when(jsonable(now), actor.name, actor.on_behalf_of, actor.address)
    when, name, on_behalf_of, address = _bound_time(db, now), actor.name, actor.on_behalf_of, actor.address
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for action, uid, email, changes in events:
        digest = chain_hash(previous, shared, action, uid, email, changes)
        append((when, name, on_behalf_of, address, action, uid, email, changes, previous, digest))
        previous = digest
    insert_many(db, EVENTS, _EVENT_COLUMNS, rows)
    return previous


def _bound_time(db: Session, moment: datetime) -> Any:
    """`moment` as the driver takes it for an event's time (its column type's bind processor)."""
    dialect = db.connection().dialect
    bind = EVENTS.c.occurred_at.type.dialect_impl(dialect).bind_processor(dialect)
    return bind(moment) if bind is not None else moment


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    user: str | None = None
    actor: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None
    offset: int = 0


def audit_filter(
    user: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    *,
    time_option: str = "{}",
) -> AuditFilter:
    """The filters as a face takes them, times as text (see parse_time); `time_option` names
    the time options in a message (`--{}` on the CLI, the query parameter's name on the API)."""

    def moment(text: str | None, name: str) -> datetime | None:
        return None if text is None else parse_time(text, time_option.format(name))

    return AuditFilter(user, actor, action, moment(since, "since"), moment(until, "until"), limit, offset)


def parse_time(value: str, what: str) -> datetime:
    """An ISO 8601 date or time (UTC unless it names a zone), or a duration ago (`7d`)."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        try:
            return utcnow() - timedelta(seconds=parse_duration(value, what=what))
        except InvalidInput:
            raise InvalidInput(f"{what} must be an ISO 8601 date or time, or a duration ago such as 7d") from None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # a zone that takes the first or last day of year 1 or 9999 out of range
        raise InvalidInput(f"{what} is out of range: give a time between the years 1 and 9999") from None


def _target_condition(db: Session, ref: str) -> Any:
    """The events about USER: by their uid while they exist; a deleted user by uid or email.
    A uid names its one identity first: a username may be written like one. A UUID's text
    is read in either case, as RFC 9562 says; a uid is stored lowercase."""
    text_ref = ref.strip()
    if is_uid(text_ref.lower()):
        return AuditEvent.target_uid == text_ref.lower()
    user = find_user(db, ref)
    if user is not None:
        return AuditEvent.target_uid == user.uid
    if "@" in text_ref:  # as stored when written; text no email can be, as it is
        return AuditEvent.target_email == (email_named(ref) or text_ref.lower())
    if len(text_ref) == 36 and storable(text_ref):
        return AuditEvent.target_uid == text_ref
    raise NotFound(
        f"no user matches {shown_ref(ref)}: give an email, a username, an id or a deleted user's uid or email"
    )


def _filtered(db: Session, filters: AuditFilter) -> Any:
    if (filters.limit is not None and filters.limit < 0) or filters.offset < 0:
        raise InvalidInput("limit and offset must not be negative")
    if filters.offset > MAX_ROW_COUNT or (filters.limit or 0) > MAX_ROW_COUNT:
        raise InvalidInput(f"limit and offset must be at most {MAX_ROW_COUNT}")
    if filters.action is not None and filters.action not in ACTIONS:
        raise InvalidInput(f"unknown action {filters.action!r}: one of {', '.join(ACTIONS)}")
    statement = select(*(getattr(AuditEvent, name) for name in EVENT_FIELDS)).order_by(AuditEvent.id)
    if filters.user is not None:
        statement = statement.where(_target_condition(db, filters.user))
    if filters.actor is not None:
        if not storable(filters.actor):
            raise InvalidInput("the actor must not contain a NUL character or bytes that are not UTF-8")
        statement = statement.where(or_(AuditEvent.actor == filters.actor, AuditEvent.on_behalf_of == filters.actor))
    if filters.action is not None:
        statement = statement.where(AuditEvent.action == filters.action)
    if filters.since is not None:
        statement = statement.where(AuditEvent.occurred_at >= filters.since)
    if filters.until is not None:
        statement = statement.where(AuditEvent.occurred_at < filters.until)
    if filters.offset:
        statement = statement.offset(filters.offset)
    if filters.limit is not None:
        statement = statement.limit(filters.limit)
    return statement


def iter_events(db: Session, filters: AuditFilter = AuditFilter()) -> Iterator[dict[str, Any]]:
    """Events oldest first, streamed."""
    with reading(db):
        statement = _filtered(db, filters)
        for row in db.execute(statement.execution_options(yield_per=_STREAM_CHUNK)):
            event = row._asdict()
            event["changes"] = _stored_changes(event)
            yield event


def _stored_changes(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event's `changes` read back: usermgr only ever stores a JSON object there, so anything
    else (text that is no JSON, a list, SQLite's BLOB or number) was put there by an edit, and
    reading the trail refuses it, naming the event, rather than fail somewhere inside."""
    stored = event["changes"]
    try:
        changes = json.loads(stored) if isinstance(stored, str) else None
    except ValueError:
        changes = None
    if not isinstance(changes, dict):
        raise DatabaseUnavailable(
            f"audit event {event['id']} holds changes that are not a JSON object (it was edited: see"
            " `usermgr audit verify`): correct that row with SQL or restore a backup"
        )
    return changes


# ---- verifying and pruning -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    events: int
    head: str


def _anchor(db: Session) -> str:
    """What the oldest kept event must follow: the last prune's checkpoint, or the genesis. A
    prune event whose checkpoint cannot be read (no JSON object, no text there) was edited."""
    last_prune = db.execute(
        select(AuditEvent.id, AuditEvent.changes)
        .where(AuditEvent.action == "audit.prune")
        .order_by(AuditEvent.id.desc())
        .limit(1)
    ).first()
    if last_prune is None:
        return GENESIS
    try:
        checkpoint = _stored_changes(last_prune._asdict()).get("checkpoint")
    except DatabaseUnavailable:
        checkpoint = None
    if not isinstance(checkpoint, str):
        raise IntegrityCheckFailed(
            f"audit chain broken at event {last_prune.id}: its checkpoint cannot be read (it was edited)"
        )
    return checkpoint


def _one_snapshot(db: Session) -> None:
    """Read the anchor and the events from one state of the trail: on PostgreSQL (READ
    COMMITTED, each statement its own snapshot) a prune committed between the two would make
    an untouched trail look broken. SQLite's read transaction keeps one snapshot already."""
    if db.get_bind().dialect.name == "postgresql":
        db.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def verify_chain(db: Session) -> ChainReport:
    """Walk the chain oldest first (streamed); IntegrityCheckFailed naming the first event
    that was edited, inserted or that follows deleted ones (on SQLite, also the newest
    deleted). Any stored value usermgr never writes is an edit, never a crash."""
    with reading(db):
        _one_snapshot(db)  # first: it chooses how the transaction's connection begins
        with undecodable_text_as_bytes(db.connection()):
            expected = _anchor(db)
            columns = [_STORED_TIME if name == "occurred_at" else getattr(AuditEvent, name) for name in EVENT_FIELDS]
            rows = db.execute(select(*columns).order_by(AuditEvent.id))
            read_time = _time_reader(db)
            events = iter(_with_time(row._asdict(), read_time) for row in rows.yield_per(_STREAM_CHUNK))
            count, before_previous, previous_id = 0, None, None
            row = next(events, None)
            while row is not None:
                following = next(events, None)
                if not _matches_its_hash(row):
                    raise IntegrityCheckFailed(
                        f"audit chain broken at event {row['id']}: it does not match its hash (it was edited)"
                    )
                if row["prev_hash"] != expected:
                    _broken_link(row, following, before_previous, previous_id, expected)
                before_previous, expected, previous_id = expected, row["hash"], row["id"]
                count += 1
                row = following
            _check_nothing_newer(db, previous_id)
            return ChainReport(count, expected)


def _check_nothing_newer(db: Session, newest: int | None) -> None:
    """On SQLite, the table's AUTOINCREMENT counter (sqlite_sequence) remembers the highest id
    ever recorded, and a rolled-back insert takes its count back: an event newer than the
    newest left was deleted (a cut tail links up). PostgreSQL's sequence also counts
    rolled-back inserts, so there only a head kept elsewhere shows a cut tail."""
    if db.get_bind().dialect.name != "sqlite":
        return
    recorded = db.scalar(text("SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'"))
    if type(recorded) is int and recorded > (newest or 0):
        if newest is None:
            raise IntegrityCheckFailed(
                f"audit chain broken at the start of the trail: events up to {recorded} were recorded"
                " (all were deleted)"
            )
        raise IntegrityCheckFailed(
            f"audit chain broken after event {newest}: events up to {recorded} were recorded (the newest were deleted)"
        )


_TEXT_COLUMNS = tuple(name for name in EVENT_FIELDS if name not in ("id", "occurred_at"))


def _matches_its_hash(row: Mapping[str, Any]) -> bool:
    """Whether the event still carries the hash of its content. usermgr stores text (or NULL)
    in every column but the id and the time: a value of another type (SQLite keeps a BLOB in
    any column) was put there by an edit, and cannot be hashed as the writer hashed it."""
    if any(not isinstance(row[name], str) for name in _TEXT_COLUMNS if row[name] is not None):
        return False
    return event_hash(row) == row["hash"]


_STORED_TIME = type_coerce(AuditEvent.occurred_at, String).label("occurred_at")
"""The event's time as the driver gives it (SQLite: the stored text), read in `_with_time`,
where an edit that left no timestamp can still be pinned to its event."""


def _time_reader(db: Session) -> Callable[[Any], Any]:
    """How a stored event time is read everywhere else: UtcDateTime's processing for this database."""
    dialect = db.get_bind().dialect
    read = AuditEvent.__table__.c.occurred_at.type.dialect_impl(dialect).result_processor(dialect, None)
    return read if read is not None else (lambda value: value)


def _with_time(event: dict[str, Any], read_time: Callable[[Any], Any]) -> dict[str, Any]:
    try:
        event["occurred_at"] = read_time(event["occurred_at"])
    except UnreadableTimestamp:
        raise IntegrityCheckFailed(
            f"audit chain broken at event {event['id']}: its time is not a timestamp (it was edited)"
        ) from None
    return event


def _broken_link(
    row: dict[str, Any],
    following: dict[str, Any] | None,
    before_previous: str | None,
    previous_id: int | None,
    expected: str,
) -> None:
    """Say which event a broken link points at: the previous one if this one follows the event
    before it (the previous was inserted), this one if the next follows the previous (this one
    was inserted), else this one follows deleted events."""
    if previous_id is not None and row["prev_hash"] == before_previous:
        raise IntegrityCheckFailed(f"audit chain broken at event {previous_id}: it was inserted into the chain")
    if following is not None and following["prev_hash"] == expected:
        raise IntegrityCheckFailed(f"audit chain broken at event {row['id']}: it was inserted into the chain")
    after = f"event {previous_id}" if previous_id is not None else "the start of the trail"
    raise IntegrityCheckFailed(
        f"audit chain broken at event {row['id']}: it does not follow {after}"
        " (events between them were deleted, or the one before was edited)"
    )


def prune(db: Session, before: datetime) -> int:
    """Delete the events older than `before` (the oldest ones, up to the first that is not),
    keeping the chain verifiable: the prune is itself an event, carrying the last removed
    event's hash as the checkpoint the oldest kept event follows. A broken chain is refused
    (exit 9): a prune must not wash away the evidence of tampering."""
    verify_chain(db)
    with writing(db):
        _lock_chain(db)
        head = _head(db)  # a prune removes only the oldest events: the head stays, or was the last removed
        first_kept = db.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.occurred_at >= before))
        doomed = AuditEvent.id < first_kept if first_kept is not None else AuditEvent.id.is_not(None)
        last = db.execute(
            select(AuditEvent.id, AuditEvent.hash).where(doomed).order_by(AuditEvent.id.desc()).limit(1)
        ).first()
        if last is None:
            checkpoint, removed = _anchor(db), 0
        else:
            checkpoint = last.hash
            removed = cast("CursorResult[Any]", db.execute(delete(AuditEvent).where(AuditEvent.id <= last.id))).rowcount
        record_events(
            db,
            [Event("audit.prune", changes={"before": jsonable(before), "removed": removed, "checkpoint": checkpoint})],
            head=head,
        )
    return removed

"""`usermgr login`: the token, one message for every failure, lockout, revocation and rehashing.

Every test here runs on SQLite and on PostgreSQL (through `run` and `db`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import argon2
import bcrypt
import jwt
import pytest
from click.testing import Result
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.conftest import AUTH_FAILED_LINE, PASSWORD, Runner, create_user, login, shown, token_of, uid_of
from usermgr import security
from usermgr.models import User

THRESHOLD = 3


@pytest.fixture
def run(env: dict[str, str]) -> Runner:
    """The suite's runner, with the lockout threshold at 3 failed logins."""
    return Runner({**env, "USERMGR_LOCKOUT_THRESHOLD": str(THRESHOLD)})


# ---- helpers ---------------------------------------------------------------------------------


def assert_refused(result: Result) -> None:
    """Exit 6 with the one message every login failure shares, and nothing on stdout."""
    assert result.exit_code == 6, result.stderr
    assert result.stdout == ""
    assert result.stderr == AUTH_FAILED_LINE


def stored(db: Session, email: str) -> User:
    """The user as the database holds it now (not as this session last saw it)."""
    db.expire_all()
    with db.begin():
        return db.scalars(select(User).where(User.email == email)).one()


def store_hash(db: Session, email: str, hashed: str) -> None:
    """Put a hash in place as an import from another system would have left it."""
    with db.begin():
        db.execute(update(User).where(User.email == email).values(hashed_password=hashed))


def fail_until_locked(run: Runner, email: str, env: dict[str, str] | None = None) -> None:
    for _ in range(THRESHOLD):
        assert_refused(login(run, email, "wrong-password", env=env))


def claims_of(run: Runner, token: str) -> dict:
    result = run("verify", token, "-o", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ---- a good login ----------------------------------------------------------------------------


def test_login_prints_only_the_token(run: Runner) -> None:
    user_id = create_user(run, "ada@example.com", "--role", "beta")
    result = login(run, "ADA@example.com")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    token = result.stdout.strip()
    assert token.count(".") == 2 and " " not in token
    claims = claims_of(run, token)
    assert (claims["sub"], claims["email"], claims["roles"], claims["ver"]) == (
        uid_of(run, str(user_id)),
        "ada@example.com",
        ["beta"],
        0,
    )


def test_login_by_id(run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    assert claims_of(run, token_of(run, str(user_id)))["email"] == "ada@example.com"


# ---- every failure looks the same ------------------------------------------------------------


def _wrong_password(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com")
    return "ada@example.com", "not-the-password"


def _unknown_email(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com")
    return "nobody@example.com", PASSWORD


def _unknown_id(run: Runner) -> tuple[str, str]:
    user_id = create_user(run, "ada@example.com")
    return str(user_id + 1000), PASSWORD


def _empty_user(run: Runner) -> tuple[str, str]:
    return "", PASSWORD


def _disabled(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com")
    assert run("disable", "ada@example.com").exit_code == 0
    return "ada@example.com", PASSWORD


def _locked(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com")
    fail_until_locked(run, "ada@example.com")
    return "ada@example.com", PASSWORD


def _no_password(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com", password=None)
    return "ada@example.com", ""


def _no_password_any_guess(run: Runner) -> tuple[str, str]:
    create_user(run, "ada@example.com", password=None)
    return "ada@example.com", PASSWORD


def _not_a_hash(run: Runner, db: Session) -> tuple[str, str]:
    create_user(run, "ada@example.com", password=None)
    store_hash(db, "ada@example.com", "plaintext-from-a-broken-import")
    return "ada@example.com", "plaintext-from-a-broken-import"


FAILURES: dict[str, Callable[..., tuple[str, str]]] = {
    "wrong-password": _wrong_password,
    "unknown-email": _unknown_email,
    "unknown-id": _unknown_id,
    "empty-user": _empty_user,
    "disabled-user": _disabled,
    "locked-user": _locked,
    "no-password-empty-guess": _no_password,
    "no-password-any-guess": _no_password_any_guess,
    "stored-value-not-a-hash": _not_a_hash,
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_every_failure_has_the_same_message(run: Runner, db: Session, case: str) -> None:
    setup = FAILURES[case]
    user, password = setup(run, db) if case == "stored-value-not-a-hash" else setup(run)
    assert_refused(login(run, user, password))


@pytest.mark.parametrize("user", ["99999999999999999999999", "²"], ids=["beyond-bigint", "superscript"])
def test_odd_numeric_user_is_an_unknown_user(run: Runner, user: str) -> None:
    create_user(run, "ada@example.com")
    assert_refused(login(run, user, "wrong-password"))
    assert_refused(login(run, user))


def test_unknown_user_is_checked_against_the_dummy_hash(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Observed, not mocked: the wrapper counts the calls and still does the real work."""
    create_user(run, "ada@example.com")
    create_user(run, "nopw@example.com", password=None)
    calls: list[str] = []
    original = security.verify_dummy

    def counting(password: str, profile: str = "default") -> None:
        calls.append(password)
        original(password, profile)

    monkeypatch.setattr(security, "verify_dummy", counting)
    assert_refused(login(run, "nobody@example.com", "guess-one"))
    assert calls == ["guess-one"]
    assert_refused(login(run, "nopw@example.com", "guess-two"))
    assert calls == ["guess-one", "guess-two"]
    assert_refused(login(run, "ada@example.com", "guess-three"))  # a real hash: no dummy needed
    assert calls == ["guess-one", "guess-two"]


# ---- the password comes from standard input --------------------------------------------------


def test_login_without_password_stdin_and_without_a_terminal(run: Runner) -> None:
    create_user(run, "ada@example.com")
    result = run("login", "ada@example.com", input=PASSWORD + "\n")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usermgr: error: ")
    assert "--password-stdin" in result.stderr
    assert result.stderr.count("\n") == 1


def test_login_with_empty_standard_input(run: Runner) -> None:
    create_user(run, "ada@example.com")
    result = run("login", "ada@example.com", "--password-stdin", input="")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr == "usermgr: error: no password on standard input\n"


def test_only_the_first_line_is_the_password(run: Runner) -> None:
    create_user(run, "ada@example.com")
    result = run("login", "ada@example.com", "--password-stdin", input=PASSWORD + "\r\nsecond line\n")
    assert result.exit_code == 0, result.stderr


# ---- token lifetime --------------------------------------------------------------------------


@pytest.mark.parametrize("ttl, seconds", [("4500s", 4500), ("15m", 900), ("8h", 28800), ("7d", 604800), ("5400", 5400)])
def test_ttl_sets_the_lifetime(run: Runner, ttl: str, seconds: int) -> None:
    create_user(run, "ada@example.com")
    claims = claims_of(run, token_of(run, "ada@example.com", PASSWORD, "--ttl", ttl))
    assert claims["exp"] - claims["iat"] == seconds


def test_default_lifetime_comes_from_the_settings(run: Runner) -> None:
    create_user(run, "ada@example.com")
    assert (lambda c: c["exp"] - c["iat"])(claims_of(run, token_of(run, "ada@example.com"))) == 3600
    result = login(run, "ada@example.com", env={"USERMGR_TOKEN_TTL": "2h"})
    assert result.exit_code == 0, result.stderr
    claims = claims_of(run, result.stdout.strip())
    assert claims["exp"] - claims["iat"] == 7200


@pytest.mark.parametrize("ttl", ["0", "0s", "abc", "15x", "1w", "1.5h", "-5m", "", "15 minutes", "1e3"])
def test_bad_ttl_is_invalid_input(run: Runner, ttl: str) -> None:
    create_user(run, "ada@example.com")
    result = login(run, "ada@example.com", PASSWORD, "--ttl", ttl)
    assert result.exit_code == 3, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("usermgr: error: invalid --ttl ")
    assert result.stderr.count("\n") == 1


def test_ttl_above_the_maximum_is_refused(run: Runner) -> None:
    create_user(run, "ada@example.com")
    over = login(run, "ada@example.com", PASSWORD, "--ttl", "31d")
    assert over.exit_code == 3
    assert over.stdout == ""
    assert over.stderr == (
        "usermgr: error: token lifetime 2678400s is above the maximum of 2592000s (USERMGR_TOKEN_MAX_TTL)\n"
    )
    capped = {"USERMGR_TOKEN_MAX_TTL": "1h"}
    assert login(run, "ada@example.com", PASSWORD, "--ttl", "61m", env=capped).exit_code == 3
    assert login(run, "ada@example.com", PASSWORD, "--ttl", "60m", env=capped).exit_code == 0


def test_ttl_refusal_counts_no_failure(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    for _ in range(THRESHOLD):
        assert login(run, "ada@example.com", "wrong", "--ttl", "99d").exit_code == 3
    assert stored(db, "ada@example.com").failed_logins == 0
    assert login(run, "ada@example.com").exit_code == 0


# ---- lockout ---------------------------------------------------------------------------------


def test_threshold_failures_lock_out_the_right_password_too(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    for _ in range(THRESHOLD - 1):
        assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert stored(db, "ada@example.com").locked_until is None
    assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert stored(db, "ada@example.com").locked_until is not None
    assert_refused(login(run, "ada@example.com"))


def test_unlock_clears_the_lock(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    fail_until_locked(run, "ada@example.com")
    result = run("unlock", "ada@example.com")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "usermgr: unlocked 1 user\n"
    user = stored(db, "ada@example.com")
    assert (user.failed_logins, user.locked_until) == (0, None)
    assert login(run, "ada@example.com").exit_code == 0


def test_a_success_resets_the_counter(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    for _ in range(THRESHOLD - 1):
        assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert stored(db, "ada@example.com").failed_logins == THRESHOLD - 1
    assert login(run, "ada@example.com").exit_code == 0
    for _ in range(THRESHOLD - 1):
        assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert login(run, "ada@example.com").exit_code == 0
    assert stored(db, "ada@example.com").locked_until is None


def test_enable_does_not_clear_a_lock(run: Runner) -> None:
    """Documented: `enable` undoes `disable`; only `unlock` (or time) ends a lock."""
    create_user(run, "ada@example.com")
    fail_until_locked(run, "ada@example.com")
    assert run("enable", "ada@example.com").exit_code == 0
    assert_refused(login(run, "ada@example.com"))
    assert run("disable", "ada@example.com").exit_code == 0
    assert run("enable", "ada@example.com").exit_code == 0
    assert_refused(login(run, "ada@example.com"))
    assert run("unlock", "ada@example.com").exit_code == 0
    assert login(run, "ada@example.com").exit_code == 0


def test_unlock_does_not_enable(run: Runner) -> None:
    create_user(run, "ada@example.com")
    assert run("disable", "ada@example.com").exit_code == 0
    assert run("unlock", "ada@example.com").exit_code == 0
    assert_refused(login(run, "ada@example.com"))


def test_lock_expires_after_the_period(run: Runner, db: Session) -> None:
    """The lock ends USERMGR_LOCKOUT_PERIOD after the locking guess, and once its end has passed
    the right password gets in. The end is moved into the past rather than waited for: with a
    real short period, the check that the lock holds would race the machine's speed."""
    period = {"USERMGR_LOCKOUT_PERIOD": "2h"}
    create_user(run, "ada@example.com")
    before = datetime.now(UTC)
    fail_until_locked(run, "ada@example.com", env=period)
    after = datetime.now(UTC)
    locked_until = stored(db, "ada@example.com").locked_until
    assert locked_until is not None
    assert before + timedelta(hours=2) <= locked_until <= after + timedelta(hours=2)
    assert_refused(login(run, "ada@example.com", env=period))
    with db.begin():
        db.execute(update(User).where(User.email == "ada@example.com").values(locked_until=before))
    assert login(run, "ada@example.com", env=period).exit_code == 0


def test_threshold_zero_never_locks(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    off = {"USERMGR_LOCKOUT_THRESHOLD": "0"}
    for _ in range(THRESHOLD + 2):
        assert_refused(login(run, "ada@example.com", "wrong-password", env=off))
    assert stored(db, "ada@example.com").locked_until is None
    assert login(run, "ada@example.com", env=off).exit_code == 0


# ---- what a success records ------------------------------------------------------------------


def test_success_records_the_login_and_resets_failures(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    assert shown(run, "ada@example.com")["last_login_at"] is None
    assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert stored(db, "ada@example.com").failed_logins == 1
    before = datetime.now(UTC)
    assert login(run, "ada@example.com").exit_code == 0
    after = datetime.now(UTC)
    record = shown(run, "ada@example.com")
    assert before <= datetime.fromisoformat(record["last_login_at"]) <= after
    user = stored(db, "ada@example.com")
    assert user.failed_logins == 0
    assert user.last_login_at is not None and before <= user.last_login_at <= after


def test_a_failure_does_not_record_a_login(run: Runner, db: Session) -> None:
    create_user(run, "ada@example.com")
    assert_refused(login(run, "ada@example.com", "wrong-password"))
    assert stored(db, "ada@example.com").last_login_at is None


# ---- revocation, checked against the database ------------------------------------------------


def verify_db(run: Runner, token: str, *extra: str) -> Result:
    return run("verify", token, "--check-db", *extra)


def test_check_db_accepts_a_current_token(run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    result = run("verify", token_of(run, "ada@example.com"), "--check-db", "-o", "id")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{uid_of(run, str(user_id))}\n"  # a token's id is its subject, the uid


REVOCATIONS: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "revoke-tokens": (("revoke-tokens", "ada@example.com"), None, "revoked"),
    "set-password": (("set-password", "ada@example.com", "--password-stdin"), "another-long-password\n", "revoked"),
    "disable": (("disable", "ada@example.com"), None, "the user is disabled"),
    "delete": (("delete", "ada@example.com", "--yes"), None, "the user no longer exists"),
    "revoke-role": (("revoke-role", "ada@example.com", "beta"), None, "revoked"),
    "update --email": (("update", "ada@example.com", "--email", "ada@new.example"), None, "revoked"),
}


@pytest.mark.parametrize("case", REVOCATIONS, ids=list(REVOCATIONS))
def test_check_db_refuses_a_revoked_token(run: Runner, case: str) -> None:
    args, stdin, reason = REVOCATIONS[case]
    create_user(run, "ada@example.com", "--role", "beta")
    token = token_of(run, "ada@example.com")
    assert verify_db(run, token).exit_code == 0
    change = run(*args, input=stdin)
    assert change.exit_code == 0, change.stderr
    result = verify_db(run, token)
    assert result.exit_code == 7
    assert result.stdout == ""
    assert result.stderr == f"usermgr: error: token invalid: {reason}\n"
    offline = run("verify", token, "-o", "email")  # the documented trade-off: offline cannot know
    assert (offline.exit_code, offline.stdout) == (0, "ada@example.com\n")


KEEPING: dict[str, tuple[str, ...]] = {
    "update --full-name": ("update", "ada@example.com", "--full-name", "Ada King"),
    "update --username": ("update", "ada@example.com", "--username", "ada_k"),
    "grant-role": ("grant-role", "ada@example.com", "gamma"),
    "enable": ("enable", "ada@example.com"),
    "unlock": ("unlock", "ada@example.com"),
}


@pytest.mark.parametrize("case", KEEPING, ids=list(KEEPING))
def test_changes_that_vouch_for_nothing_in_a_token_keep_it(run: Runner, case: str) -> None:
    create_user(run, "ada@example.com", "--role", "beta")
    token = token_of(run, "ada@example.com")
    change = run(*KEEPING[case])
    assert change.exit_code == 0, change.stderr
    assert verify_db(run, token).exit_code == 0


def test_a_new_token_after_revocation_verifies(run: Runner) -> None:
    create_user(run, "ada@example.com")
    old = token_of(run, "ada@example.com")
    assert run("revoke-tokens", "ada@example.com").exit_code == 0
    new = token_of(run, "ada@example.com")
    assert verify_db(run, new).exit_code == 0
    assert verify_db(run, old).exit_code == 7
    assert claims_of(run, new)["ver"] == claims_of(run, old)["ver"] + 1


def test_enable_does_not_revive_tokens_of_a_disabled_user(run: Runner) -> None:
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    assert run("disable", "ada@example.com").exit_code == 0
    assert run("enable", "ada@example.com").exit_code == 0
    assert run("verify", token, "--check-db").stderr == "usermgr: error: token invalid: revoked\n"


def test_check_db_refuses_a_locked_user(run: Runner) -> None:
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    fail_until_locked(run, "ada@example.com")
    result = verify_db(run, token)
    assert (result.exit_code, result.stderr) == (7, "usermgr: error: token invalid: the user is locked\n")


def test_revocation_only_touches_the_named_user(run: Runner) -> None:
    create_user(run, "ada@example.com")
    create_user(run, "bob@example.com")
    ada, bob = token_of(run, "ada@example.com"), token_of(run, "bob@example.com")
    assert run("revoke-tokens", "ada@example.com").exit_code == 0
    result = run("verify", "-", "--check-db", input=f"{ada}\n{bob}\n")
    assert result.exit_code == 7
    assert [json.loads(line)["valid"] for line in result.stdout.splitlines()] == [False, True]


def test_check_db_role_uses_the_current_roles(run: Runner) -> None:
    create_user(run, "ada@example.com", "--admin")
    create_user(run, "bob@example.com", "--admin")
    token = token_of(run, "bob@example.com")
    assert verify_db(run, token, "--role", "admin").exit_code == 0
    assert run("revoke-admin", "bob@example.com").exit_code == 0
    result = verify_db(run, token, "--role", "admin")  # a token that names a role lost is revoked
    assert (result.exit_code, result.stdout) == (7, "")
    assert result.stderr == "usermgr: error: token invalid: revoked\n"
    assert run("grant-admin", "bob@example.com").exit_code == 0
    assert verify_db(run, token, "--role", "admin").exit_code == 7  # a revoked token never comes back
    offline = run("verify", token, "--role", "admin")  # the token still says admin until it expires
    assert offline.exit_code == 0, offline.stderr


def test_check_db_role_also_needs_the_role_in_the_token(run: Runner) -> None:
    """A role granted after login needs a new token: the token's claims are checked first."""
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    assert run("grant-role", "ada@example.com", "beta").exit_code == 0
    assert verify_db(run, token, "--role", "beta").exit_code == 8
    assert verify_db(run, token_of(run, "ada@example.com"), "--role", "beta").exit_code == 0


# ---- rehash on login -------------------------------------------------------------------------


@pytest.fixture
def imported(run: Runner, db: Session) -> Iterator[Callable[[str], None]]:
    """A user `old@example.com` whose hash came from elsewhere: pass the hash to store."""
    create_user(run, "old@example.com", password=None)

    def place(hashed: str) -> None:
        store_hash(db, "old@example.com", hashed)

    yield place


def argon2_params(hashed: str) -> tuple[str, int, int, int]:
    params = argon2.extract_parameters(hashed)
    return params.type.name, params.time_cost, params.memory_cost, params.parallelism


def test_bcrypt_hash_is_upgraded_on_login(run: Runner, db: Session, imported: Callable[[str], None]) -> None:
    imported(bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode())
    assert login(run, "old@example.com").exit_code == 0
    hashed = stored(db, "old@example.com").hashed_password
    assert hashed.startswith("$argon2id$")
    assert argon2_params(hashed) == ("ID", 1, 1024, 1)  # the test profile (USERMGR_HASH_PROFILE=test)
    assert login(run, "old@example.com").exit_code == 0
    assert stored(db, "old@example.com").hashed_password == hashed  # up to date now: not hashed again
    assert_refused(login(run, "old@example.com", "wrong-password"))


def test_failed_login_does_not_touch_an_old_hash(run: Runner, db: Session, imported: Callable[[str], None]) -> None:
    old = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    imported(old)
    assert_refused(login(run, "old@example.com", "wrong-password"))
    assert stored(db, "old@example.com").hashed_password == old


@pytest.mark.parametrize(
    "profile, weaker",
    [
        ("default", {"time_cost": 1}),  # argon2-cffi's defaults, but one pass instead of three
        ("default", {"parallelism": 1}),
        ("test", {"time_cost": 1, "memory_cost": 512, "parallelism": 1}),
    ],
    ids=["lower-time-cost", "lower-parallelism", "lower-memory-cost"],
)
def test_weaker_argon2_hash_is_upgraded(
    run: Runner, db: Session, imported: Callable[[str], None], profile: str, weaker: dict[str, int]
) -> None:
    base = (
        argon2.PasswordHasher()
        if profile == "default"
        else argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    wanted = ("ID", base.time_cost, base.memory_cost, base.parallelism)
    old = argon2.PasswordHasher(
        **{"time_cost": base.time_cost, "memory_cost": base.memory_cost, "parallelism": base.parallelism, **weaker}
    ).hash(PASSWORD)
    assert argon2_params(old) != wanted
    imported(old)
    assert login(run, "old@example.com", env={"USERMGR_HASH_PROFILE": profile}).exit_code == 0
    assert argon2_params(stored(db, "old@example.com").hashed_password) == wanted


def test_argon2i_hash_is_upgraded_to_argon2id(run: Runner, db: Session, imported: Callable[[str], None]) -> None:
    imported(argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.I).hash(PASSWORD))
    assert login(run, "old@example.com").exit_code == 0
    assert stored(db, "old@example.com").hashed_password.startswith("$argon2id$")


@pytest.mark.parametrize(
    "password",
    ["p" * 80, "a" + "é" * 40, "ünïcødé-" * 12 + "tail"],
    ids=["ascii-80-bytes", "cut-inside-a-character", "long-unicode"],
)
def test_long_password_against_bcrypt(run: Runner, db: Session, imported: Callable[[str], None], password: str) -> None:
    """bcrypt only ever saw the first 72 bytes; the new hash must cover all of the password."""
    encoded = password.encode()
    assert len(encoded) > 72
    imported(bcrypt.hashpw(encoded[:72], bcrypt.gensalt(rounds=4)).decode())
    assert login(run, "old@example.com", password).exit_code == 0
    assert stored(db, "old@example.com").hashed_password.startswith("$argon2id$")
    assert login(run, "old@example.com", password).exit_code == 0
    first_72 = encoded[:72].decode(errors="ignore")
    assert_refused(login(run, "old@example.com", first_72))
    assert_refused(login(run, "old@example.com", first_72 + "something-else"))


@pytest.mark.parametrize("variant", ["$2a$", "$2b$", "$2y$"])
def test_long_password_against_each_bcrypt_variant(
    run: Runner, db: Session, imported: Callable[[str], None], variant: str
) -> None:
    """Other systems write bcrypt as $2a$ (older libraries) or $2y$ (PHP): the same
    algorithm, so each is checked on a long password's first 72 bytes like $2b$."""
    password = "p" * 80
    hashed = bcrypt.hashpw(password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    imported(variant + hashed.removeprefix("$2b$"))
    assert login(run, "old@example.com", password).exit_code == 0
    assert stored(db, "old@example.com").hashed_password.startswith("$argon2id$")


def test_password_of_exactly_72_bytes_against_bcrypt(run: Runner, db: Session, imported: Callable[[str], None]) -> None:
    password = "x" * 72
    imported(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    assert_refused(login(run, "old@example.com", password[:71]))
    assert login(run, "old@example.com", password).exit_code == 0
    assert stored(db, "old@example.com").hashed_password.startswith("$argon2id$")


def test_rehash_does_not_revoke_tokens(run: Runner, imported: Callable[[str], None]) -> None:
    """Rehashing is not a password change: the token version stays, earlier tokens keep working."""
    imported(bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode())
    token = token_of(run, "old@example.com")
    assert jwt.decode(token, options={"verify_signature": False})["ver"] == 0
    imported(argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1).hash(PASSWORD))
    assert login(run, "old@example.com").exit_code == 0
    result = run("verify", token, "--check-db")
    assert result.exit_code == 0, result.stderr

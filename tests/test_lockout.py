"""Lockout under concurrency: at most USERMGR_LOCKOUT_THRESHOLD guesses are checked per lock period.

Every test runs on SQLite and on PostgreSQL. The concurrent ones send real simultaneous
requests to a real `usermgr serve` and run real `usermgr login` processes beside them.

What is observable: a guess is counted (in `failed_logins`) before its password is checked,
and the threshold-th one sets `locked_until` and restarts the count from zero. So "the lock
first seen is still the lock, and the count is still zero, after every request has answered"
means nothing was counted after the lock was set: no guess was checked during it, none
extended it, and the next period starts from zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, select, update

from tests.conftest import (
    AUTH_FAILED_LINE,
    HANG_TIMEOUT,
    PASSWORD,
    Runner,
    api_login,
    create_user,
    login,
    login_process,
    run_usermgr,
    serving,
)
from usermgr import api
from usermgr.config import Settings
from usermgr.models import User

THRESHOLD = 3
EMAIL = "ada@example.com"
WRONG = "not the password"


@pytest.fixture
def lock_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "USERMGR_LOCKOUT_THRESHOLD": str(THRESHOLD)}


@pytest.fixture
def lock_run(lock_env: dict[str, str]) -> Runner:
    return Runner(lock_env)


class Probe:
    """Reads (and, to set the scene, writes) the users table through its own connection."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)

    def state(self, email: str = EMAIL) -> tuple[int, datetime | None]:
        """(failed_logins, locked_until) as the database holds them now."""
        with self.engine.connect() as connection:
            row = connection.execute(select(User.failed_logins, User.locked_until).where(User.email == email)).one()
        return row.failed_logins, row.locked_until

    def wait_for_lock(self, email: str = EMAIL) -> datetime:
        deadline = time.monotonic() + HANG_TIMEOUT
        while time.monotonic() < deadline:
            locked_until = self.state(email)[1]
            if locked_until is not None:
                return locked_until
            time.sleep(0.01)
        pytest.fail(f"{email} was never locked")

    def end_lock(self, email: str = EMAIL) -> None:
        """Move the lock's end one second into the past, as waiting out the period would."""
        with self.engine.begin() as connection:
            connection.execute(
                update(User).where(User.email == email).values(locked_until=datetime.now(UTC) - timedelta(seconds=1))
            )

    def slow_down(self, email: str = EMAIL) -> None:
        """Store the password as a bcrypt hash (as an import from another system leaves it),
        so that each check takes a while and simultaneous guesses overlap, as they do with a
        production hash cost. Nothing asserted depends on how long a check takes."""
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=11)).decode()
        with self.engine.begin() as connection:
            connection.execute(update(User).where(User.email == email).values(hashed_password=hashed))


@pytest.fixture
def probe(db_url: str) -> Iterator[Probe]:
    probe = Probe(db_url)
    yield probe
    probe.engine.dispose()


@pytest.fixture
def user(lock_run: Runner, probe: Probe) -> str:
    create_user(lock_run, EMAIL)
    probe.slow_down()
    return EMAIL


@contextmanager
def http_to_serve(env: dict[str, str], tmp_path: Path) -> Iterator[httpx.Client]:
    """A real `usermgr serve`, and an HTTP client for it that sends many requests at once."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    with serving(env, tmp_path / "serve.log") as served, served.client(limits=limits) as http:
        yield http


def api_guess(http: httpx.Client, password: str) -> int:
    """The status of one login attempt as ada over HTTP."""
    return api_login(http, EMAIL, password).status_code


def all_at_once(pool: ThreadPoolExecutor, calls: list[Callable[[], Any]]) -> list[Future[Any]]:
    """Start every call in its own thread, released together."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], Any]) -> Any:
        barrier.wait(timeout=HANG_TIMEOUT)
        return call()

    return [pool.submit(released, call) for call in calls]


# ---- under concurrency ------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_burst_of_wrong_guesses_locks_after_the_threshold_and_the_right_password_stays_out(
    user: str, lock_env: dict[str, str], lock_run: Runner, probe: Probe, tmp_path: Path
) -> None:
    """29 simultaneous wrong guesses, then the right password as soon as the lock shows (while
    the guesses are still being answered, on a machine as slow as a real hash makes it): it is
    refused, and only THRESHOLD guesses were ever counted (one lock, count zero)."""
    with http_to_serve(lock_env, tmp_path) as http, ThreadPoolExecutor(max_workers=29) as pool:
        wrong = all_at_once(pool, [lambda: api_guess(http, WRONG)] * 29)
        lock = probe.wait_for_lock()
        right = api_guess(http, PASSWORD)
        answers = [future.result() for future in wrong]
        assert (right, set(answers)) == (401, {401})
        assert probe.state() == (0, lock), "a guess was counted after the lock: it was checked"
        assert lock_run("unlock", user).exit_code == 0
        assert api_guess(http, PASSWORD) == 200


@pytest.mark.e2e
def test_b_cli_processes_and_api_requests_together_share_one_bounded_lockout(
    user: str, lock_env: dict[str, str], probe: Probe, tmp_path: Path
) -> None:
    with http_to_serve(lock_env, tmp_path) as http, ThreadPoolExecutor(max_workers=18) as pool:
        calls: list[Callable[[], Any]] = [lambda: login_process(lock_env, EMAIL, WRONG)] * 4
        calls += [lambda: api_guess(http, WRONG)] * 14
        futures = all_at_once(pool, calls)
        lock = probe.wait_for_lock()
        outcomes = [future.result() for future in futures]
        for outcome in outcomes[:4]:
            assert (outcome.returncode, outcome.stdout, outcome.stderr) == (6, "", AUTH_FAILED_LINE)
        assert set(outcomes[4:]) == {401}
        assert probe.state() == (0, lock), "a guess was counted after the lock: it was checked"
        assert login_process(lock_env, EMAIL, PASSWORD).returncode == 6, "the lock holds for the CLI"
        assert api_guess(http, PASSWORD) == 401, "and for the API"
        assert probe.state() == (0, lock)
        assert run_usermgr("unlock", user, env=lock_env).returncode == 0
        assert login_process(lock_env, EMAIL, PASSWORD).returncode == 0


@pytest.mark.e2e
def test_c_wrong_guesses_during_a_lock_do_not_extend_it(
    user: str, lock_env: dict[str, str], lock_run: Runner, probe: Probe, tmp_path: Path
) -> None:
    """Neither the guesses still in flight when the lock was set, nor those sent during it."""
    with http_to_serve(lock_env, tmp_path) as http, ThreadPoolExecutor(max_workers=12) as pool:
        first = all_at_once(pool, [lambda: api_guess(http, WRONG)] * 12)
        lock = probe.wait_for_lock()
        during = all_at_once(pool, [lambda: api_guess(http, WRONG)] * 12)
        for _ in range(THRESHOLD):
            assert login(lock_run, user, WRONG).exit_code == 6
        assert {future.result() for future in [*first, *during]} == {401}
    assert probe.state() == (0, lock)


# ---- one at a time ----------------------------------------------------------------------------


def test_d_after_a_lock_expires_the_count_starts_from_zero(user: str, lock_run: Runner, probe: Probe) -> None:
    period = {"USERMGR_LOCKOUT_PERIOD": "1s"}

    def guess(password: str) -> int:
        return login(lock_run, user, password, env=period).exit_code

    assert [guess(WRONG) for _ in range(THRESHOLD)] == [6] * THRESHOLD
    failed, lock = probe.state()
    assert failed == 0 and lock is not None
    while datetime.now(UTC) <= lock:  # expiry is by wall time: wait until it has passed
        time.sleep(0.05)
    assert [guess(WRONG) for _ in range(THRESHOLD - 1)] == [6] * (THRESHOLD - 1)
    assert guess(PASSWORD) == 0, "not locked again: the count restarted from zero"


@pytest.mark.e2e
def test_d_after_a_burst_the_next_period_starts_from_zero(
    user: str, lock_env: dict[str, str], lock_run: Runner, probe: Probe
) -> None:
    """Racing `usermgr login` processes lock the account; none of them counts once the lock is
    set, so when it ends (here: moved into the past, as time would) the count starts at zero."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = [
            future.result() for future in all_at_once(pool, [lambda: login_process(lock_env, EMAIL, WRONG)] * 6)
        ]
    assert {outcome.returncode for outcome in outcomes} == {6}
    failed, lock = probe.state()
    assert failed == 0 and lock is not None
    probe.end_lock()
    for _ in range(THRESHOLD - 1):
        assert login(lock_run, user, WRONG).exit_code == 6
    assert login(lock_run, user, PASSWORD).exit_code == 0


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(api.create_app(replace(settings, lockout_threshold=THRESHOLD))) as test_client:
        yield test_client


def test_e_the_right_password_as_the_thresholds_guess_gets_in_and_clears_its_own_lock(
    user: str, client: TestClient, probe: Probe
) -> None:
    for _ in range(THRESHOLD - 1):
        assert api_login(client, user, WRONG).status_code == 401
    assert probe.state() == (THRESHOLD - 1, None)
    assert api_login(client, user, PASSWORD).status_code == 200
    assert probe.state() == (0, None)


@pytest.mark.parametrize("digits", ["1", "０１"], ids=["ascii", "fullwidth"])
def test_f_the_api_takes_no_numeric_id_and_such_guesses_lock_no_one(
    user: str, client: TestClient, lock_run: Runner, probe: Probe, digits: str
) -> None:
    """An anonymous caller cannot lock accounts by counting ids; the CLI still takes an id."""
    assert lock_run("show", "1", "-o", "email").stdout == f"{user}\n"
    detail = api_login(client, user, WRONG).json()
    for password in [WRONG] * (THRESHOLD + 1) + [PASSWORD]:
        response = api_login(client, digits, password)
        assert (response.status_code, response.json()) == (401, detail)
    assert probe.state() == (1, None), "only the one guess by email counted"
    assert api_login(client, user, PASSWORD).status_code == 200
    assert login(lock_run, "1").exit_code == 0


def test_a_lock_stands_even_with_lockout_turned_off(user: str, lock_run: Runner, probe: Probe) -> None:
    """USERMGR_LOCKOUT_THRESHOLD=0 counts nothing more, but a lock already set still ends only
    with its period or `unlock`: a right password is taken only while the account is unlocked."""
    for _ in range(THRESHOLD):
        assert login(lock_run, user, WRONG).exit_code == 6
    off = {"USERMGR_LOCKOUT_THRESHOLD": "0"}
    assert login(lock_run, user, env=off).exit_code == 6
    assert probe.state()[1] is not None
    assert lock_run("unlock", user).exit_code == 0
    assert login(lock_run, user, env=off).exit_code == 0

"""`make loadtest`: usermgr's API and CLI at once on PostgreSQL, for a bounded time, then its rules checked.

Starts a throwaway PostgreSQL (tests/pg_server.py), `usermgr init`s it, and runs `usermgr serve
--workers 2` on 127.0.0.1. For `--seconds` (60 by default) it then drives, all at once:

- GET /users/me with the tokens of a few users (keep-alive connections);
- POST /auth/login with right passwords (real argon2id), and wrong ones against one user, on
  new connections, so that both workers count guesses toward the one lockout;
- admin writes: PATCH /users/{id}, PUT and DELETE /users/{id}/roles/{role}, and attempts to take
  the admin role from the one admin (which must fail: the last admin);
- the CLI: `usermgr import` of batches of new users, `usermgr disable -` of batches of them, and
  `disable -` of the one admin (which must fail).

Then it checks: no 5xx; every user seeded or imported is there exactly once (none lost, none
twice); the one admin is still an active admin; the attacked user was locked once and at most
`USERMGR_LOCKOUT_THRESHOLD` guesses were counted (the lock stands, the count is zero); a revoked
token is refused on every connection. Last, GET /users/me alone on usermgr and on the bare app
(bench/bare_api.py) with the same workers, in turns, and logins alone: the rates a host gives.

Prints a report and writes it into bench/RESULTS.md's hand-written part as the section
"Load test" (replacing an earlier one); `--no-write` leaves RESULTS.md alone. Exits 1 when a
check fails.

    python bench/loadtest.py [--seconds 60] [--workers 2] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # tests.pg_server, the suite's PostgreSQL starter

import perfapi_figures as figures  # noqa: E402
from harness import machine, progress  # noqa: E402
from workspace import commit  # noqa: E402

from tests.pg_server import PostgresServer  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
SECTION = "## Load test"
PYTHON = sys.executable
USERMGR = str(Path(sys.executable).parent / "usermgr")
ADMIN = "load-admin@example.com"
VICTIM = "victim@example.com"
PASSWORD = "load-test-password-1"
WRONG = "not-the-password"
READERS = 4  # users whose tokens GET /users/me
MEMBERS = 50  # password-less users the admin writes change
THRESHOLD = 5
IMPORT_BATCH = 200
TIMEOUT = 120.0  # one request or command: a guard against a hang, not a budget


# ---- the workload ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Answers by endpoint and status, and what the CLI did, under one lock."""

    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    commands: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    imported: set[str] = field(default_factory=set)
    disabled: set[str] = field(default_factory=set)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.statuses[endpoint, status] += 1


class Client:
    """One keep-alive connection to the server (or a new one per request)."""

    def __init__(self, port: int, tally: Tally, *, keep_alive: bool = True) -> None:
        self.port, self.tally, self.keep_alive = port, tally, keep_alive
        self.connection: http.client.HTTPConnection | None = None

    def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        token: str | None = None,
        form: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if not self.keep_alive:
            headers["Connection"] = "close"
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            self.connection.request(method, path, body=data, headers=headers)
            answer = self.connection.getresponse()
            status, content = answer.status, answer.read()
        except (OSError, http.client.HTTPException):
            status, content = 0, b""  # a transport error: counted as a failure
            self.close()
        if not self.keep_alive:
            self.close()
        self.tally.answer(endpoint, status)
        return status, content

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def token_of(port: int, email: str, password: str = PASSWORD) -> str:
    status, content = Client(port, Tally()).request(
        "login", "POST", "/auth/login", form={"username": email, "password": password}
    )
    if status != 200:
        raise RuntimeError(f"login of {email} answered {status}: {content[:200]!r}")
    token: str = json.loads(content)["access_token"]
    return token


def until(deadline: float, step: Any) -> None:
    while time.monotonic() < deadline:
        step()


def readers(port: int, tally: Tally, tokens: list[str], deadline: float) -> list[threading.Thread]:
    def read(token: str) -> None:
        client = Client(port, tally)
        until(deadline, lambda: client.request("GET /users/me", "GET", "/users/me", token=token))
        client.close()

    return [threading.Thread(target=read, args=(token,)) for token in tokens]


def logins(port: int, tally: Tally, deadline: float) -> list[threading.Thread]:
    """Right passwords of the readers, wrong ones for the victim: new connections each time."""

    def right(n: int) -> None:
        client = Client(port, tally, keep_alive=False)
        until(
            deadline,
            lambda: client.request(
                "POST /auth/login", "POST", "/auth/login", form={"username": reader(n), "password": PASSWORD}
            ),
        )

    def wrong() -> None:
        client = Client(port, tally, keep_alive=False)
        until(
            deadline,
            lambda: client.request(
                "POST /auth/login (wrong)", "POST", "/auth/login", form={"username": VICTIM, "password": WRONG}
            ),
        )

    return [threading.Thread(target=right, args=(n,)) for n in range(2)] + [
        threading.Thread(target=wrong) for _ in range(2)
    ]


def admin_writes(
    port: int, tally: Tally, token: str, admin_id: int, member_ids: list[int], deadline: float
) -> list[threading.Thread]:
    def write(offset: int) -> None:
        client, n = Client(port, tally), offset
        while time.monotonic() < deadline:
            user_id = member_ids[n % len(member_ids)]
            client.request(
                "PATCH /users/{id}", "PATCH", f"/users/{user_id}", token=token, body={"full_name": f"Member {n}"}
            )
            client.request("PUT /users/{id}/roles/{role}", "PUT", f"/users/{user_id}/roles/staff", token=token)
            client.request("DELETE /users/{id}/roles/{role}", "DELETE", f"/users/{user_id}/roles/staff", token=token)
            if n % 10 == 0:  # the last admin: must stay one (409), whichever worker answers
                client.request(
                    "DELETE /users/{id}/roles/admin (last admin)",
                    "DELETE",
                    f"/users/{admin_id}/roles/admin",
                    token=token,
                )
            n += 2

    return [threading.Thread(target=write, args=(offset,)) for offset in range(2)]


def cli_writes(env: dict[str, str], root: Path, tally: Tally, deadline: float) -> list[threading.Thread]:
    """Batches of `usermgr import`, then `disable -` of every other imported user, and now and
    then a `disable -` that names the one admin (refused, exit 5: nothing changes)."""

    def usermgr(name: str, args: list[str], stdin: str = "") -> int:
        result = subprocess.run([USERMGR, *args], input=stdin, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        with tally.lock:
            tally.commands[name, result.returncode] += 1
        return result.returncode

    def work() -> None:
        batch = 0
        while time.monotonic() < deadline:
            emails = [f"imported{batch:04d}-{n:04d}@example.com" for n in range(IMPORT_BATCH)]
            source = root / f"import-{batch}.csv"
            source.write_text("email,full_name\n" + "".join(f"{email},Imported {batch}\n" for email in emails))
            if usermgr("import", ["import", str(source)]) == 0:
                with tally.lock:
                    tally.imported.update(emails)
            chosen = emails[::2]
            if usermgr("disable -", ["disable", "-"], "".join(f"{email}\n" for email in chosen)) == 0:
                with tally.lock:
                    tally.disabled.update(chosen)
            if batch % 3 == 0:
                usermgr("disable - (with the last admin)", ["disable", "-"], f"{emails[1]}\n{ADMIN}\n")
            batch += 1

    return [threading.Thread(target=work)]


# ---- set-up ----------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    result = subprocess.run([USERMGR, *args], input=stdin, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"usermgr {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def reader(n: int) -> str:
    return f"reader{n}@example.com"


def seed(env: dict[str, str], root: Path) -> tuple[int, list[int]]:
    """The admin, the readers and the victim (real argon2id hashes), and the members; their ids."""
    progress("seeding: 1 admin, the readers and the victim with real argon2id passwords, and the members")
    admin_id = int(
        run_cli(env, "create", "--email", ADMIN, "--admin", "--password-stdin", "-o", "id", stdin=PASSWORD + "\n")
    )
    for email in [*map(reader, range(READERS)), VICTIM]:
        run_cli(env, "create", "--email", email, "--password-stdin", "-o", "id", stdin=PASSWORD + "\n")
    members = root / "members.csv"
    members.write_text("email\n" + "".join(f"member{n:03d}@example.com\n" for n in range(MEMBERS)))
    run_cli(env, "import", str(members))
    listed = json.loads(run_cli(env, "list", "--search", "member", "-o", "json"))
    return admin_id, [user["id"] for user in listed]


# ---- checks ----------------------------------------------------------------------------------


def database_state(url: str) -> dict[str, Any]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            emails = [row[0] for row in connection.execute(sa.text("SELECT email FROM users"))]
            uids = connection.execute(sa.text("SELECT count(DISTINCT uid) FROM users")).scalar_one()
            admins = (
                connection.execute(
                    sa.text(
                        "SELECT u.email FROM users u JOIN user_roles ur ON ur.user_id = u.id"
                        " JOIN roles r ON r.id = ur.role_id"
                        " WHERE r.name = 'admin' AND u.is_active"
                    )
                )
                .scalars()
                .all()
            )
            victim = connection.execute(
                sa.text("SELECT failed_logins, locked_until FROM users WHERE email = :email"), {"email": VICTIM}
            ).one()
            disabled = set(connection.execute(sa.text("SELECT email FROM users WHERE NOT is_active")).scalars())
    finally:
        engine.dispose()
    return {"emails": emails, "uids": uids, "admins": admins, "victim": victim, "disabled": disabled}


def checks(state: dict[str, Any], tally: Tally, seeded: set[str], lock_seen: Any) -> list[tuple[str, bool, str]]:
    server_errors = {key: count for key, count in tally.statuses.items() if key[1] >= 500 or key[1] == 0}
    emails: list[str] = state["emails"]
    expected = seeded | tally.imported
    failed_logins, locked_until = state["victim"]
    last_admin = tally.statuses.get(("DELETE /users/{id}/roles/admin (last admin)", 409), 0)
    refused = tally.commands.get(("disable - (with the last admin)", 5), 0)
    return [
        (
            "no 5xx and no transport error",
            not server_errors,
            f"{sum(server_errors.values())} ({dict(server_errors)})" if server_errors else "none",
        ),
        (
            "no user lost or duplicated",
            set(emails) == expected and len(emails) == len(expected) == state["uids"],
            f"{len(emails)} users, {state['uids']} distinct uids, {len(expected)} expected"
            f" ({len(seeded)} seeded, {len(tally.imported)} imported)",
        ),
        (
            "the disabled are those `disable -` disabled",
            state["disabled"] == tally.disabled,
            f"{len(state['disabled'])} disabled",
        ),
        (
            "the last admin kept",
            state["admins"] == [ADMIN]
            and refused > 0
            and last_admin > 0
            and not any(status == 200 for (endpoint, status) in tally.statuses if "last admin" in endpoint),
            f"active admins {state['admins']}; revoking their role refused {last_admin} times (409),"
            f" `disable -` naming them {refused} times (exit 5)",
        ),
        (
            "lockout bounded across workers",
            lock_seen is not None and locked_until == lock_seen and failed_logins == 0,
            f"{tally.statuses.get(('POST /auth/login (wrong)', 401), 0)} wrong guesses answered 401; one lock, until"
            f" {locked_until:%H:%M:%S}, never extended; count after it {failed_logins} (at most {THRESHOLD} checked)"
            if locked_until
            else "never locked",
        ),
    ]


def revocation_holds(port: int, env: dict[str, str]) -> tuple[str, bool, str]:
    """A token revoked by the CLI is refused on every new connection (both workers)."""
    token = token_of(port, reader(0))
    run_cli(env, "revoke-tokens", reader(0))
    tally = Tally()
    statuses = [
        Client(port, tally, keep_alive=False).request("me", "GET", "/users/me", token=token)[0] for _ in range(20)
    ]
    return (
        "a revoked token refused by every worker",
        set(statuses) == {401},
        f"20 requests on new connections: {sorted(set(statuses))}",
    )


# ---- the run ---------------------------------------------------------------------------------


def mixed(
    port: int, env: dict[str, str], root: Path, seconds: float, admin_id: int, member_ids: list[int]
) -> tuple[Tally, Any]:
    tally = Tally()
    tokens = [token_of(port, reader(n)) for n in range(READERS)]
    admin_token = token_of(port, ADMIN)
    deadline = time.monotonic() + seconds
    threads = [
        *readers(port, tally, tokens, deadline),
        *logins(port, tally, deadline),
        *admin_writes(port, tally, admin_token, admin_id, member_ids, deadline),
        *cli_writes(env, root, tally, deadline),
    ]
    lock_seen: list[Any] = []
    started = time.monotonic()
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=lambda: lock_seen.append(first_lock(env["USERMGR_DATABASE_URL"], deadline)))
    watcher.start()
    for thread in [*threads, watcher]:
        thread.join()
    tally.seconds = time.monotonic() - started  # each thread finishes the step it is in: a little over `seconds`
    return tally, lock_seen[0]


def first_lock(url: str, deadline: float) -> Any:
    """The victim's `locked_until` as first seen, polled through a connection of its own."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                lock = connection.execute(
                    sa.text("SELECT locked_until FROM users WHERE email = :e"), {"e": VICTIM}
                ).scalar()
            if lock is not None:
                return lock
            time.sleep(0.05)
        return None
    finally:
        engine.dispose()


def login_rate(port: int, seconds: float, threads: int) -> float:
    tally = Tally()
    deadline = time.monotonic() + seconds

    def login(n: int) -> None:
        client = Client(port, tally)
        until(
            deadline,
            lambda: client.request(
                "login", "POST", "/auth/login", form={"username": reader(n % READERS), "password": PASSWORD}
            ),
        )

    started = time.monotonic()
    pool = [threading.Thread(target=login, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return tally.statuses.get(("login", 200), 0) / (time.monotonic() - started)


def report(
    args: argparse.Namespace,
    tally: Tally,
    results: list[tuple[str, bool, str]],
    me: tuple[list[figures.Load], list[figures.Load]],
    login_per_s: float,
    started: str,
    load: str,
) -> str:
    seconds = tally.seconds
    cores = os.cpu_count() or 1
    lines = [
        SECTION,
        "",
        f"Written by `make loadtest` (bench/loadtest.py) on {started}, usermgr commit {commit()}: {cores} cores,"
        " load average at the start"
        f" {load}; PostgreSQL (tests/pg_server.py: fsync off) and"
        f" `usermgr serve --workers {args.workers}` on 127.0.0.1, everything driven at once for {seconds:.0f} s"
        " from this"
        " one machine, so the load generator and the CLI take CPU from the server.",
        "",
        "| endpoint or command | answers | per second | statuses |",
        "|---|---|---|---|",
    ]
    endpoints = sorted({endpoint for endpoint, _ in tally.statuses})
    for endpoint in endpoints:
        counts = {status: n for (name, status), n in tally.statuses.items() if name == endpoint}
        total = sum(counts.values())
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        lines.append(f"| `{endpoint}` | {total} | {total / seconds:.1f} | {shown} |")
    for name in sorted({name for name, _ in tally.commands}):
        counts = {code: n for (command, code), n in tally.commands.items() if command == name}
        total = sum(counts.values())
        shown = ", ".join(f"exit {code}: {n}" for code, n in sorted(counts.items()))
        lines.append(f"| `usermgr {name}` ({IMPORT_BATCH} users a batch) | {total} | {total / seconds:.2f} | {shown} |")
    ours, bare = me
    ours_rate = statistics.median(load.rate for load in ours)
    bare_rate = statistics.median(load.rate for load in bare)
    cpu_ours = statistics.median(load.cpu_per_request for load in ours)
    cpu_bare = statistics.median(load.cpu_per_request for load in bare)
    lines += [
        "",
        f"Alone, after the mixed run, with {figures.generator()}"
        f" ({len(ours)} turns of {args.turn_seconds:.0f} s a side):",
        "",
        "| what | usermgr | baseline | ratio |",
        "|---|---|---|---|",
        f"| `GET /users/me`, {args.workers} workers | {ours_rate:,.0f} req/s | {bare_rate:,.0f} req/s"
        f" (bench/bare_api.py, {args.workers} workers, same database) | {ours_rate / bare_rate:.2f} |",
        f"| CPU a `GET /users/me` (all server processes) | {cpu_ours * 1000:.2f} ms | {cpu_bare * 1000:.2f} ms"
        f" | {cpu_bare / cpu_ours:.2f} |",
        f"| `POST /auth/login`, right password, argon2id at its defaults | {login_per_s:.1f} logins/s"
        f" | {login_per_s / cores:.1f} logins/s a core | - |",
        "",
        "Checks:",
        "",
        *(f"- {'ok' if ok else '**FAILED**'}: {name} ({detail})" for name, ok, detail in results),
        "",
    ]
    if tally.statuses.get(("PUT /users/{id}/roles/{role}", 409)):
        lines += [
            "A 409 on `PUT /users/{id}/roles/staff` is the two admin writers' first grants of `staff`, a role",
            "that did not exist yet, racing to create it: `service.roles.ensured_role` adds the role and the",
            'second INSERT hits its unique name ("already exists: a row with those values"). A client error',
            "that retrying cures, not a lost write; reported, not changed by this load test.",
            "",
        ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Put the section into RESULTS.md's hand-written part, in place of an earlier one."""
    content = RESULTS.read_text(encoding="utf-8")
    if SECTION in content:
        start = content.index(SECTION)
        following = content.find("\n## ", start + len(SECTION))
        content = content[:start] + text + (content[following + 1 :] if following != -1 else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(content, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the mixed load runs (default 60)")
    parser.add_argument("--workers", type=int, default=2, help="usermgr serve --workers (default 2)")
    parser.add_argument("--turns", type=int, default=3, help="turns of GET /users/me alone, each side (default 3)")
    parser.add_argument("--turn-seconds", type=float, default=5.0, help="seconds of each turn (default 5)")
    parser.add_argument("--no-write", action="store_true", help="print the report only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = machine()["load average at start (1, 5, 15 min)"]
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="usermgr-loadtest-")))
        progress("starting PostgreSQL")
        server = PostgresServer()
        url = server.start()
        stack.callback(server.stop)
        env = {name: value for name, value in os.environ.items() if not name.startswith("USERMGR_")}
        env |= {
            "USERMGR_DATABASE_URL": url,
            "USERMGR_KEY_FILE": str(root / "usermgr.key"),
            "USERMGR_LOCKOUT_THRESHOLD": str(THRESHOLD),
        }
        run_cli(env, "init")
        admin_id, member_ids = seed(env, root)
        seeded = {ADMIN, VICTIM, *map(reader, range(READERS)), *(f"member{n:03d}@example.com" for n in range(MEMBERS))}
        workers = ["--workers", str(args.workers)]
        progress(f"starting usermgr serve --workers {args.workers} and the bare app")
        ours = stack.enter_context(
            figures.serving("usermgr serve", [USERMGR, "serve", "--port", "{port}", *workers], env, root / "serve.log")
        )
        progress(f"mixed load for {args.seconds:.0f} s: /users/me, logins, admin writes, CLI import and disable -")
        tally, lock_seen = mixed(ours.port, env, root, args.seconds, admin_id, member_ids)
        results = checks(database_state(url), tally, seeded, lock_seen)
        results.append(revocation_holds(ours.port, env))
        bare = stack.enter_context(
            figures.serving("bare app", figures.bare_api(PYTHON, *workers), env, root / "bare.log")
        )
        progress(f"GET /users/me alone, {args.turns} turns of {args.turn_seconds:.0f} s a side")
        me = figures.compare_me(ours, bare, token_of(ours.port, reader(1)), args.turns, args.turn_seconds)
        progress("logins alone, 10 s")
        login_per_s = login_rate(ours.port, 10.0, threads=4)
    text = report(args, tally, results, me, login_per_s, started, load)
    print(text)
    if not args.no_write:
        write_section(text)
        progress(f"wrote the section {SECTION!r} of {RESULTS}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

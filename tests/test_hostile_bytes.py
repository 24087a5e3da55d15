"""Any value, any byte, as a USER, a password, a name or a search: a clean answer, nothing changed.

The contract (../shared/spec/cli.md, issue 9): every USER-taking command answers arbitrary
input with an exit code from its documented set, one `usermgr: error:` line and never
"unexpected ... (a bug)"; and when it does not succeed, the database is as it was.

Invalid UTF-8 reaches Python in two ways. In argv it always arrives surrogate-escaped
(b"\\xff" becomes "\\udcff"). On standard input it depends on the locale: surrogate-escaped
under C and C.UTF-8, a UnicodeDecodeError under en_US.UTF-8 and the like (and in click's
in-process runner). The subprocess cases run both ways (PYTHONIOENCODING picks which).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from click.testing import Result
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.conftest import PASSWORD, Runner, usermgr_bytes

NEW_PASSWORD = "another good password"
RESTORED_TABLES = ("roles", "users", "user_roles")  # parents first

OK, INVALID, NOT_FOUND, CONFLICT, AUTH_FAILED = 0, 3, 4, 5, 6

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- the seeded database ------------------------------------------------------------------------


def snapshot(run: Runner) -> tuple[str, str]:
    """Every user with its hash, and every role with its count, as the CLI exports them."""
    exported = run("export", "--with-hashes", "-o", "jsonl")
    roles = run("roles", "-o", "jsonl")
    assert exported.exit_code == 0 and roles.exit_code == 0, exported.stderr + roles.stderr
    return exported.stdout, roles.stdout


def without_locks(state: tuple[str, str]) -> tuple[str, str]:
    """A snapshot without `locked_until`, which failed logins are meant to set."""
    users, roles = state
    lines = [json.loads(line) for line in users.splitlines()]
    return "".join(json.dumps({k: v for k, v in user.items() if k != "locked_until"}) + "\n" for user in lines), roles


@dataclass
class Seeded:
    """Four users (two admins, one disabled), and a way back to them after a change.

    Hypothesis runs every example in the same database: an example that changed it (a
    successful `delete 1`) is undone row by row, so that the next one starts from the seed.
    """

    run: Runner
    engine: Engine
    baseline: tuple[str, str] = ("", "")
    rows: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = field(default_factory=dict)

    def capture(self) -> None:
        self.baseline = snapshot(self.run)
        with self.engine.connect() as connection:
            for table in RESTORED_TABLES:
                result = connection.exec_driver_sql(f'SELECT * FROM "{table}"')
                self.rows[table] = (list(result.keys()), [tuple(row) for row in result])

    def restore(self, now: tuple[str, str]) -> None:
        """Put the seed back if `now` (a snapshot) differs from it."""
        if now == self.baseline:
            return
        with self.engine.begin() as connection:
            for table in reversed(RESTORED_TABLES):
                connection.exec_driver_sql(f'DELETE FROM "{table}"')
            for table in RESTORED_TABLES:
                columns, rows = self.rows[table]
                if rows:
                    names = ", ".join(f'"{column}"' for column in columns)
                    params = ", ".join(f":p{index}" for index in range(len(columns)))
                    statement = text(f'INSERT INTO "{table}" ({names}) VALUES ({params})')
                    connection.execute(statement, [{f"p{i}": value for i, value in enumerate(row)} for row in rows])
        assert snapshot(self.run) == self.baseline


SEED_USERS = [
    ("ada@example.com", "ada", "Ada Lovelace", ["--admin", "--role", "beta"]),
    ("bob@example.com", "bob", "Bob Babbage", ["--role", "beta"]),
    ("cy@example.com", "cy", "Cy Admin", ["--admin"]),
    ("dee@example.com", "dee", "Dee Disabled", []),
]


@pytest.fixture
def seeded(run: Runner, db_url: str) -> Iterator[Seeded]:
    for email, username, full_name, extra in SEED_USERS:
        created = run(
            "create",
            "--email",
            email,
            "--username",
            username,
            "--full-name",
            full_name,
            *extra,
            "--password-stdin",
            input=PASSWORD + "\n",
        )
        assert created.exit_code == 0, created.stderr
    assert run("disable", "dee@example.com").exit_code == 0
    engine = create_engine(db_url)
    seed = Seeded(run, engine)
    seed.capture()
    yield seed
    engine.dispose()


# ---- what a clean answer is ---------------------------------------------------------------------


def assert_clean(
    result: Result, codes: set[int], before: tuple[str, str], after: tuple[str, str], tried: object = None
) -> None:
    """An exit from `codes`, no crash, and when it failed: one error line and nothing changed."""
    detail = (result.exit_code, result.stdout[:300], result.stderr[:300], ascii(tried)[:200])
    assert result.exit_code in codes, detail
    assert "Traceback" not in result.stderr, detail
    assert "unexpected" not in result.stderr, detail
    if result.exit_code != OK:
        assert result.stdout == "", detail
        assert result.stderr.startswith("usermgr: error: "), detail
        assert result.stderr.count("\n") == 1, detail
        assert after == before, "the database changed although the command failed"


def piped(value: str) -> bytes:
    """The bytes a shell pipes in for `value`: a surrogate-escaped byte as that byte, another
    lone surrogate as its (invalid) UTF-8 encoding, everything else as UTF-8."""
    out = bytearray()
    for char in value:
        if 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(ord(char) - 0xDC00)
        else:
            out += char.encode("utf-8", "surrogatepass")
    return bytes(out)


# ---- hostile values ---------------------------------------------------------------------------------

KNOWN_REFS = ["1", "2", "3", "4", "ada@example.com", "ＢＯＢ@EXAMPLE.COM", " cy@example.com ", "１", "dee@example.com"]
EDGE_REFS = [
    *("", " ", "0", "5", "-", "--", "-1", "--help", "-h", "- ", "\t-", "-\n", "\n", "\r\n", "ada@example.com\n"),
    *("\x00", "1\x00", "a\x00b@example.com", "ada@example.com\x00", "\udcff", "ada\udcc3@example.com", "\ud800"),
    *("²", "١", "٣", "𝟏", "１２", "߁", "9223372036854775807", "9223372036854775808", "-9223372036854775809"),
    *("1e3", "0x1", "+1", "1_000", "1.0", " 1 ", "ＡＤＡ＠ｅｘａｍｐｌｅ．ｃｏｍ", "ａｄａ@example.com"),
]
ESCAPED_BYTE = st.sampled_from([chr(0xDC00 + byte) for byte in range(0x80, 0x100)])
ANY_CHAR = st.one_of(st.characters(), ESCAPED_BYTE, st.characters(categories=["Cs"]))

VALUES = st.one_of(
    st.sampled_from(KNOWN_REFS + EDGE_REFS),
    st.text(ANY_CHAR, max_size=40),
    st.binary(max_size=40).map(os.fsdecode),  # argv bytes as Python hands them over
    st.integers(min_value=2**63, max_value=10**60).map(str),
    st.integers(min_value=-(10**30), max_value=-1).map(str),
    st.text(st.characters(categories=["Nd"]), min_size=1, max_size=30),  # digits of every script
    st.text(st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E), min_size=1, max_size=30),  # full-width
    st.builds(
        lambda seed, size: (seed * size)[:size], st.text(ANY_CHAR, min_size=1, max_size=3), st.integers(256, 100_000)
    ),
    st.builds(lambda size: "a" * size + "@example.com", st.integers(250, 100_000)),
    st.builds(str.__add__, st.sampled_from(["-", "--", "- ", "-\udcff", "\udcff"]), st.sampled_from(KNOWN_REFS)),
)


# ---- property: every USER-taking command ----------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    options: tuple[str, ...]  # before USER
    trailing: tuple[str, ...]  # after USER
    codes: frozenset[int]
    password: str | None = None  # what --password-stdin reads
    batch: bool = False  # takes several USERs, and `-` for standard input

    def __str__(self) -> str:
        return self.name


BATCH = frozenset({OK, INVALID, NOT_FOUND})
BATCH_LAST_ADMIN = BATCH | {CONFLICT}  # can hit "would remove the last active admin"

COMMANDS = [
    Command("show", ("show",), (), frozenset({OK, INVALID, NOT_FOUND})),
    Command("update", ("update", "--full-name", "Renamed Person"), (), frozenset({OK, INVALID, NOT_FOUND})),
    Command(
        "set-password",
        ("set-password", "--password-stdin"),
        (),
        frozenset({OK, INVALID, NOT_FOUND}),
        password=NEW_PASSWORD,
    ),
    # An unknown user is "authentication failed" (6), never "not found": 4 would tell them apart.
    Command("login", ("login", "--password-stdin"), (), frozenset({OK, INVALID, AUTH_FAILED}), password=PASSWORD),
    Command("disable", ("disable",), (), BATCH_LAST_ADMIN, batch=True),
    Command("enable", ("enable",), (), BATCH, batch=True),
    Command("unlock", ("unlock",), (), BATCH, batch=True),
    Command("delete", ("delete", "--yes"), (), BATCH_LAST_ADMIN, batch=True),
    Command("grant-admin", ("grant-admin",), (), BATCH, batch=True),
    Command("revoke-admin", ("revoke-admin",), (), BATCH_LAST_ADMIN, batch=True),
    Command("grant-role", ("grant-role",), ("beta",), BATCH, batch=True),
    Command("revoke-role", ("revoke-role",), ("beta",), BATCH, batch=True),
    Command("revoke-tokens", ("revoke-tokens",), (), BATCH, batch=True),
]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
@PROPERTY_SETTINGS
@given(value=VALUES)
@example(value="\udcff\udcfe")  # b"\xff\xfe" in argv
@example(value="ada\udcc3@example.com")  # b"ada\xc3@example.com": must not find ada
@example(value="\ud800")
@example(value="1\x00")
@example(value="9" * 25)
@example(value="1" * 5000)  # beyond int()'s 4300-digit limit
@example(value="１")
@example(value="-")
@example(value="--help")
@example(value="a" * 100_000)
def test_any_value_as_the_user_argument(run: Runner, seeded: Seeded, command: Command, value: str) -> None:
    """`--` keeps a value such as `--help` a USER; a lone `-` still means standard input (empty here)."""
    stdin = b"" if command.password is None else piped(command.password + "\n")
    result = run(*command.options, "--", value, *command.trailing, input=stdin)
    after = snapshot(run)
    assert_clean(result, set(command.codes), seeded.baseline, after, value)
    if command.name == "show":
        assert after == seeded.baseline
    seeded.restore(after)


@pytest.mark.parametrize("command", [command for command in COMMANDS if command.batch], ids=str)
@PROPERTY_SETTINGS
@given(lines=st.lists(VALUES, min_size=1, max_size=4))
@example(lines=["\udcff\udcfe"])
@example(lines=["bob@example.com", "ada\udcc3@example.com"])
@example(lines=["\ud800"])
@example(lines=["1" * 5000])
@example(lines=["bob@example.com", "a" * 100_000])
def test_any_lines_on_standard_input_for_dash(run: Runner, seeded: Seeded, command: Command, lines: list[str]) -> None:
    stdin = piped("\n".join(lines) + "\n")
    result = run(*command.options, "-", *command.trailing, input=stdin)
    after = snapshot(run)
    assert_clean(result, set(command.codes), seeded.baseline, after, lines)
    seeded.restore(after)


PASSWORD_BYTES = st.one_of(
    st.binary(max_size=64),
    st.text(ANY_CHAR, max_size=64).map(piped),
    st.builds(lambda size: b"p" * size, st.integers(1000, 5000)),
    st.sampled_from([b"passw\x00rd!\n", b"\n", b""]),
)
INVALID_UTF8_PASSWORDS = [b"pw\xff\xfe\n", PASSWORD.encode() + b"\xc3\n", b"\xed\xa0\x80" * 4 + b"\n"]


@PROPERTY_SETTINGS
@given(password=PASSWORD_BYTES)
@example(password=INVALID_UTF8_PASSWORDS[0])
@example(password=INVALID_UTF8_PASSWORDS[1])
@example(password=INVALID_UTF8_PASSWORDS[2])
@example(password=b"p" * 4097 + b"\n")  # beyond passlib's 4096-byte limit
def test_any_password_bytes_get_the_same_login_answer_for_a_known_and_an_unknown_user(
    run: Runner, seeded: Seeded, password: bytes
) -> None:
    assume(password.split(b"\n")[0].removesuffix(b"\r") != PASSWORD.encode())
    known = run("login", "--password-stdin", "ada@example.com", input=password)
    unknown = run("login", "--password-stdin", "nobody@example.com", input=password)
    # A wrong password is counted toward the lockout: that, and only that, may change.
    assert_clean(known, {INVALID, AUTH_FAILED}, without_locks(seeded.baseline), without_locks(snapshot(run)), password)
    answers = [(result.exit_code, result.stdout, result.stderr) for result in (known, unknown)]
    assert answers[0] == answers[1], ascii(password)[:200]


@PROPERTY_SETTINGS
@given(password=PASSWORD_BYTES)
@example(password=INVALID_UTF8_PASSWORDS[0])
@example(password=INVALID_UTF8_PASSWORDS[2])
def test_any_password_bytes_for_set_password(run: Runner, seeded: Seeded, password: bytes) -> None:
    result = run("set-password", "--password-stdin", "bob@example.com", input=password)
    after = snapshot(run)
    assert_clean(result, {OK, INVALID}, seeded.baseline, after, password)
    seeded.restore(after)


# ---- real bytes through the installed executable -------------------------------------------------

STDIN_DECODING = {
    "stdin surrogateescape": {"PYTHONIOENCODING": "utf-8:surrogateescape"},  # C and C.UTF-8 locales
    "stdin strict": {"PYTHONIOENCODING": "utf-8:strict"},  # en_US.UTF-8 and most desktop locales
}
BAD_REFS = [b"\xff\xfe", b"ada\xc3@example.com"]


def answer(process: subprocess.CompletedProcess[bytes]) -> tuple[int, str]:
    return process.returncode, process.stderr.decode("utf-8", "backslashreplace")


def assert_clean_process(process: subprocess.CompletedProcess[bytes], codes: set[int]) -> str:
    code, stderr = answer(process)
    assert code in codes, (code, stderr[:300])
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr[:300]
    if code != OK:
        assert process.stdout == b"", process.stdout[:300]
        assert stderr.startswith("usermgr: error: ") and stderr.count("\n") == 1, stderr[:300]
    return stderr


@pytest.mark.parametrize("ref", BAD_REFS, ids=ascii)
def test_invalid_utf8_in_a_user_argument(env: dict[str, str], seeded: Seeded, ref: bytes) -> None:
    """`ada\\xc3@example.com` must not become ada by a dropped byte: it names no one."""
    for args, codes in (
        (["show", ref], {INVALID, NOT_FOUND}),
        (["disable", ref], {INVALID, NOT_FOUND}),
        (["grant-role", ref, "beta"], {INVALID, NOT_FOUND}),
        (["login", "--password-stdin", ref], {INVALID, AUTH_FAILED}),
    ):
        assert_clean_process(usermgr_bytes(*args, env=env, input=PASSWORD.encode() + b"\n"), codes)
    assert snapshot(seeded.run) == seeded.baseline


@pytest.mark.parametrize("decoding", STDIN_DECODING)
@pytest.mark.parametrize("ref", BAD_REFS, ids=ascii)
def test_invalid_utf8_on_standard_input_for_dash(
    env: dict[str, str], seeded: Seeded, ref: bytes, decoding: str
) -> None:
    extra = STDIN_DECODING[decoding]
    for args in (["disable", "-"], ["revoke-role", "-", "beta"]):
        process = usermgr_bytes(*args, env={**env, **extra}, input=b"bob@example.com\n" + ref + b"\n")
        assert_clean_process(process, {INVALID, NOT_FOUND})
    assert snapshot(seeded.run) == seeded.baseline


@pytest.mark.parametrize("decoding", STDIN_DECODING)
@pytest.mark.parametrize("password", [b"pw\xff\xfe", PASSWORD.encode() + b"\xc3"], ids=ascii)
def test_login_with_an_invalid_utf8_password_answers_known_and_unknown_users_alike(
    env: dict[str, str], seeded: Seeded, password: bytes, decoding: str
) -> None:
    """Today a known user gets 6 and an unknown one 1 ("unexpected"), which tells them apart."""
    extra = STDIN_DECODING[decoding]
    known = usermgr_bytes("login", "--password-stdin", "ada@example.com", env={**env, **extra}, input=password + b"\n")
    unknown = usermgr_bytes(
        "login", "--password-stdin", "nobody@example.com", env={**env, **extra}, input=password + b"\n"
    )
    assert_clean_process(known, {INVALID, AUTH_FAILED})
    assert answer(known) == answer(unknown)
    assert known.stdout == unknown.stdout == b""


@pytest.mark.parametrize("decoding", STDIN_DECODING)
def test_set_password_with_an_invalid_utf8_password(env: dict[str, str], seeded: Seeded, decoding: str) -> None:
    process = usermgr_bytes(
        "set-password",
        "--password-stdin",
        "bob@example.com",
        env={**env, **STDIN_DECODING[decoding]},
        input=b"new password \xff\xfe\n",
    )
    assert_clean_process(process, {INVALID})
    assert snapshot(seeded.run) == seeded.baseline


@pytest.mark.parametrize("command", ["create", "update"])
def test_full_name_with_invalid_utf8(env: dict[str, str], seeded: Seeded, command: str) -> None:
    name = b"Ada \xff King"
    if command == "create":
        args: list[str | bytes] = ["create", "--email", "new@example.com", "--full-name", name, "--no-password"]
    else:
        args = ["update", "bob@example.com", "--full-name", name]
    assert_clean_process(usermgr_bytes(*args, env=env), {INVALID})
    assert snapshot(seeded.run) == seeded.baseline


# ---- too long, and lone surrogates, in search text and USER ---------------------------------------


@pytest.mark.parametrize(
    "search", ["x" * 100_000, "ada\udcff", "\ud800"], ids=["100000 characters", "\\udcff", "\\ud800"]
)
def test_search_text_that_no_database_can_take_is_invalid_input(run: Runner, seeded: Seeded, search: str) -> None:
    result = run("list", "--search", search, "-o", "email")
    assert_clean(result, {INVALID}, seeded.baseline, snapshot(run))


MEGABYTE_REF = "a" * (1 << 20)
MEGABYTE_ID = "9" * (1 << 20)


@pytest.mark.parametrize(
    ("args", "stdin", "codes"),
    [
        (["show", MEGABYTE_REF], b"", {INVALID, NOT_FOUND}),
        (["update", MEGABYTE_REF, "--full-name", "Renamed"], b"", {INVALID, NOT_FOUND}),
        (["disable", MEGABYTE_REF], b"", {INVALID, NOT_FOUND}),
        (["disable", "-"], MEGABYTE_REF.encode() + b"\n", {INVALID, NOT_FOUND}),
        (["grant-role", "-", "beta"], b"bob@example.com\n" + MEGABYTE_REF.encode() + b"\n", {INVALID, NOT_FOUND}),
        (["login", "--password-stdin", MEGABYTE_REF], PASSWORD.encode() + b"\n", {INVALID, AUTH_FAILED}),
        (["show", MEGABYTE_ID], b"", {INVALID, NOT_FOUND}),
        (["disable", "-"], b"bob@example.com\n" + MEGABYTE_ID.encode() + b"\n", {INVALID, NOT_FOUND}),
        (["login", "--password-stdin", MEGABYTE_ID], PASSWORD.encode() + b"\n", {INVALID, AUTH_FAILED}),
    ],
    ids=[
        "show",
        "update",
        "disable",
        "disable -",
        "grant-role -",
        "login",
        "show digits",
        "disable - digits",
        "login digits",
    ],
)
def test_a_user_argument_of_a_megabyte(
    run: Runner, seeded: Seeded, args: list[str], stdin: bytes, codes: set[int]
) -> None:
    result = run(*args, input=stdin)
    assert_clean(result, codes, seeded.baseline, snapshot(run))


# ---- a lookup normalises exactly as a write does ---------------------------------------------------

# Each group: forms of one address. The first is the canonical (stored) form.
EMAIL_FORMS = {
    "case": ["ada.lovelace@example.com", "Ada.Lovelace@Example.COM", "  ADA.LOVELACE@EXAMPLE.COM  "],
    "full-width": ["ada2@example.com", "ＡＤＡ２@example.com", "ａｄａ２@ｅｘａｍｐｌｅ．ｃｏｍ"],
    "IDN": [
        "x@bücher.example",
        "x@xn--bcher-kva.example",
        "x@BÜCHER.example",
        "x@XN--BCHER-KVA.example",
        "x@bu\u0308cher.example",
        "x@bücher\u3002example",
    ],
    "display name": ["ada3@example.com", "Ada <ada3@example.com>", "<ada3@example.com>", '"Ada L" <ada3@example.com>'],
}
CREATE_CASES = [(group, form) for group, forms in EMAIL_FORMS.items() for form in forms]


@pytest.mark.parametrize(("group", "created_as"), CREATE_CASES, ids=[f"{g}: {f!a}" for g, f in CREATE_CASES])
def test_every_form_create_accepts_finds_the_user(run: Runner, group: str, created_as: str) -> None:
    """Create with one form; every form that `create` takes for the same address (it answers 5,
    conflict, now) must find that user through `show`, `login` and a batch command."""
    created = run("create", "--email", created_as, "--password-stdin", "-o", "json", input=PASSWORD + "\n")
    canonical = EMAIL_FORMS[group][0]
    if created.exit_code == INVALID and created_as != canonical:
        return  # create refuses this form: there is nothing it could have been stored as
    assert created.exit_code == OK, created.stderr
    user = json.loads(created.stdout)
    assert user["email"] == canonical
    missed: list[str] = []
    for form in EMAIL_FORMS[group]:
        again = run("create", "--email", form, "--no-password")
        if again.exit_code == INVALID:
            continue  # not a form create takes
        assert again.exit_code == CONFLICT, f"create --email {form!a}: {again.exit_code} {again.stderr}"
        shown = run("show", "-o", "json", "--", form)
        if shown.exit_code != OK or json.loads(shown.stdout)["id"] != user["id"]:
            missed.append(f"show {form!a}: exit {shown.exit_code} {shown.stderr.strip()}")
        login = run("login", "--password-stdin", "--", form, input=PASSWORD + "\n")
        if login.exit_code != OK:
            missed.append(f"login {form!a}: exit {login.exit_code} {login.stderr.strip()}")
        disabled = run("disable", "--", form)
        is_active = json.loads(run("show", "-o", "json", str(user["id"])).stdout)["is_active"]
        if disabled.exit_code != OK or is_active:
            missed.append(f"disable {form!a}: exit {disabled.exit_code} {disabled.stderr.strip()}")
        assert run("enable", str(user["id"])).exit_code == OK
    assert not missed, "\n".join(missed)

"""Files in and out (issue 9): import files as spreadsheets and editors write them, bytes
that are not text, deeply nested JSON, timestamps with no UTC equivalent, secrets kept out
of import errors, and CSV export that a spreadsheet cannot run as formulas."""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import Runner, _fresh_database, run_usermgr, user_count, usermgr_bytes, users
from usermgr import output

SECRET = "Pl41n-Secret-Passw0rd"
ARGON2 = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"


def import_bytes(env: dict[str, str], tmp_path: Path, data: bytes, fmt: str, source: str) -> tuple[int, str]:
    """Import `data` through the installed `usermgr`, from a FILE or from stdin; (exit, stderr)."""
    if source == "file":
        path = tmp_path / f"input.{fmt}"
        path.write_bytes(data)
        result = usermgr_bytes("import", str(path), env=env, input=b"")
    else:
        result = usermgr_bytes("import", "-", "--format", fmt, env=env, input=data)
    return result.returncode, result.stderr.decode("utf-8", "replace")


def assert_clean_refusal(code: int, stderr: str) -> None:
    assert code == 3, stderr
    assert "unexpected" not in stderr
    assert "Traceback" not in stderr
    assert all(line.startswith("usermgr: error: ") for line in stderr.splitlines()), stderr


# ---- encodings and line endings ------------------------------------------------------------

CSV_TEXT = "email,full_name,roles\nzoe@example.com,Zoë Ünïcode,staff\nann@example.com,Ann,beta;staff\n"
JSONL_TEXT = (
    '{"email": "zoe@example.com", "full_name": "Zoë Ünïcode", "roles": ["staff"]}\n'
    '{"email": "ann@example.com", "full_name": "Ann", "roles": ["beta", "staff"]}\n'
)
# roles is the last field of every row: a line ending left on it would make it invalid.
EXPECTED = [("zoe@example.com", "Zoë Ünïcode", ["staff"]), ("ann@example.com", "Ann", ["beta", "staff"])]

ENCODINGS: dict[str, Callable[[str], bytes]] = {
    "utf-8": lambda text: text.encode(),
    "utf-8 BOM (Excel CSV UTF-8)": lambda text: codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode(),
    "utf-8 BOM, LF": lambda text: codecs.BOM_UTF8 + text.encode(),
    "utf-16 LE BOM": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    "utf-16 BE BOM": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-16 LE BOM, CRLF": lambda text: codecs.BOM_UTF16_LE + text.replace("\n", "\r\n").encode("utf-16-le"),
    "CRLF": lambda text: text.replace("\n", "\r\n").encode(),
    "lone CR": lambda text: text.replace("\n", "\r").encode(),
    "no final newline": lambda text: text.rstrip("\n").encode(),
    "CRLF, no final newline": lambda text: text.rstrip("\n").replace("\n", "\r\n").encode(),
}


@pytest.mark.parametrize("backend", ["sqlite"])  # decoding happens before the database is touched
@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_import_reads_files_as_spreadsheets_and_editors_write_them(
    run: Runner, env: dict[str, str], tmp_path: Path, encoding: str, fmt: str, source: str
) -> None:
    data = ENCODINGS[encoding](CSV_TEXT if fmt == "csv" else JSONL_TEXT)
    code, stderr = import_bytes(env, tmp_path, data, fmt, source)
    assert code == 0, stderr
    assert "2 created" in stderr
    assert [(u["email"], u["full_name"], u["roles"]) for u in users(run)] == EXPECTED


OK_ROWS = {"csv": "email\nok@example.com\n", "jsonl": '{"email": "ok@example.com"}\n'}
UTF16_CUT = {fmt: codecs.BOM_UTF16_LE + rows.encode("utf-16-le") + b"\xff" for fmt, rows in OK_ROWS.items()}
UTF16_LONE = {fmt: codecs.BOM_UTF16_BE + rows.encode("utf-16-be") + b"\xd8\x00\x00a" for fmt, rows in OK_ROWS.items()}
# case -> format -> (the bytes, what the one line of error says)
NOT_TEXT = {
    "latin-1": {
        "csv": (
            "email,full_name\nok@example.com,Ok\njose@example.com,José\n".encode("latin-1"),
            "line 3: not UTF-8 text",
        ),
        "jsonl": (
            '{"email": "ok@example.com"}\n\n{"email": "jose@example.com", "full_name": "José"}\n'.encode("latin-1"),
            "line 3: not UTF-8 text",
        ),
    },
    "utf-16 cut short": {
        "csv": (UTF16_CUT["csv"], "line 3: not UTF-16 text"),
        "jsonl": (UTF16_CUT["jsonl"], "line 2: not UTF-16 text"),
    },
    "utf-16 lone surrogate": {
        "csv": (UTF16_LONE["csv"], "not UTF-16 text"),
        "jsonl": (UTF16_LONE["jsonl"], "not UTF-16 text"),
    },
    "utf-16 ends in half a surrogate pair": {
        "csv": (UTF16_LONE["csv"][:-2], "not UTF-16 text"),
        "jsonl": (UTF16_LONE["jsonl"][:-2], "not UTF-16 text"),
    },
}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("case", list(NOT_TEXT))
def test_bytes_that_are_not_text_are_one_line_naming_the_line(
    env: dict[str, str], db_url: str, tmp_path: Path, case: str, fmt: str, source: str
) -> None:
    data, problem = NOT_TEXT[case][fmt]
    code, stderr = import_bytes(env, tmp_path, data, fmt, source)
    assert_clean_refusal(code, stderr)
    assert len(stderr.splitlines()) == 1, stderr
    assert problem in stderr
    assert "nothing was imported" in stderr
    assert user_count(db_url) == 0


# ---- deeply nested JSON ---------------------------------------------------------------------

DEPTH = 100_000
NESTED = {
    "array": "[" * DEPTH + "]" * DEPTH,
    "object under email": '{"email": ' + '{"a": ' * DEPTH + "1" + "}" * DEPTH + "}",
}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("shape", list(NESTED))
def test_deeply_nested_json_is_that_lines_problem(
    env: dict[str, str], db_url: str, tmp_path: Path, shape: str, source: str
) -> None:
    data = ('{"email": "ok@example.com"}\n' + NESTED[shape] + "\n").encode()
    code, stderr = import_bytes(env, tmp_path, data, "jsonl", source)
    assert_clean_refusal(code, stderr)
    assert "line 2: not valid JSON" in stderr
    assert "nothing was imported" in stderr
    assert user_count(db_url) == 0


@pytest.mark.parametrize("backend", ["sqlite"])
def test_moderately_nested_json_is_an_ordinary_bad_field(env: dict[str, str], db_url: str) -> None:
    data = '{"email": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}\n"
    result = run_usermgr("import", "-", "--format", "jsonl", env=env, input=data)
    assert_clean_refusal(result.returncode, result.stderr)
    assert "line 1: email" in result.stderr
    assert user_count(db_url) == 0


# ---- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("created_at", "9999-12-31T23:00:00-05:00"), ("last_login_at", "0001-01-01T00:00:00+05:00")],
)
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_timestamp_with_no_utc_equivalent_is_a_row_error(
    run: Runner, db_url: str, fmt: str, field: str, value: str
) -> None:
    rows = [{"email": "ok@example.com", "password": SECRET}, {"email": "ts@example.com", field: value}]
    if fmt == "jsonl":
        data = "".join(json.dumps(row) + "\n" for row in rows)
    else:
        data = f"email,password,{field}\nok@example.com,{SECRET},\nts@example.com,,{value}\n"
    result = run("import", "-", "--format", fmt, input=data)
    assert_clean_refusal(result.exit_code, result.stderr)
    line = 3 if fmt == "csv" else 2
    assert f"line {line}: {field}: out of range" in result.stderr
    assert "nothing was imported" in result.stderr
    assert "hashing" not in result.stderr  # refused before any work was done
    assert user_count(db_url) == 0


def test_timestamps_are_stored_in_utc_up_to_the_edges(run: Runner) -> None:
    rows = [
        {"email": "a@example.com", "created_at": "2020-06-01T12:00:00-05:00"},
        {"email": "b@example.com", "created_at": "9999-12-31T18:59:59-05:00"},
        {"email": "c@example.com", "created_at": "0001-01-01T00:00:00-05:00", "last_login_at": "0001-01-01T00:00:00"},
    ]
    result = run("import", "-", "--format", "jsonl", input="".join(json.dumps(row) + "\n" for row in rows))
    assert result.exit_code == 0, result.stderr
    assert [(u["created_at"], u["last_login_at"]) for u in users(run)] == [
        ("2020-06-01T17:00:00+00:00", None),
        ("9999-12-31T23:59:59+00:00", None),
        ("0001-01-01T05:00:00+00:00", "0001-01-01T00:00:00+00:00"),
    ]


# ---- no SQL, no parameters, no hash, no password in any import error ------------------------

BAD_IMPORTS = {
    "created_at past 9999 in UTC": (
        "jsonl",
        json.dumps({"email": "t@example.com", "password": SECRET, "created_at": "9999-12-31T23:00:00-05:00"}) + "\n",
    ),
    "last_login_at before year 1 in UTC": (
        "csv",
        f"email,password,last_login_at\nt@example.com,{SECRET},0001-01-01T00:00:00+05:00\n",
    ),
    "existing email": ("jsonl", json.dumps({"email": "taken@example.com", "password": SECRET}) + "\n"),
    "bad email": ("csv", f"email,password\nnot-an-email,{SECRET}\n"),
    "password and hash": (
        "jsonl",
        json.dumps({"email": "t@example.com", "password": SECRET, "hashed_password": ARGON2}) + "\n",
    ),
    "short password": ("csv", "email,password\nt@example.com,Pl41n\n"),
    "deep JSON": ("jsonl", json.dumps({"email": "t@example.com", "password": SECRET}) + "\n" + "[" * DEPTH + "\n"),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_import_errors_never_show_sql_hashes_or_passwords(env: dict[str, str], db_url: str, case: str) -> None:
    assert run_usermgr("create", "--email", "taken@example.com", "--no-password", env=env).returncode == 0
    fmt, data = BAD_IMPORTS[case]
    before = run_usermgr("export", "--with-hashes", env=env).stdout
    result = run_usermgr("import", "-", "--format", fmt, env=env, input=data)
    assert result.returncode in (3, 5), result.stderr
    for leak in ("INSERT", "[SQL", "[parameters", "$argon2", SECRET, "Pl41n", "unexpected", "Traceback"):
        assert leak not in result.stderr
    assert run_usermgr("export", "--with-hashes", env=env).stdout == before


# ---- CSV formula guard ----------------------------------------------------------------------

HOSTILE = [
    {"email": "h@example.com", "username": "-dash", "full_name": '=HYPERLINK("http://x")', "roles": ["-neg", "ok"]},
    {"email": "p@example.com", "username": "+plus", "full_name": "+1"},
    {"email": "m@example.com", "full_name": "-x", "roles": ["-"]},
    {"email": "a@example.com", "username": "@at", "full_name": "@x"},
    {"email": "q@example.com", "full_name": "'quoted"},
    {"email": "qq@example.com", "full_name": "'=x"},
    {"email": "=cmd@example.com", "full_name": "plain"},
]
# Each field as `export -o csv` writes it (in HOSTILE's order).
GUARDED = [
    {"email": "h@example.com", "username": "'-dash", "full_name": '\'=HYPERLINK("http://x")', "roles": "'-neg;ok"},
    {"email": "p@example.com", "username": "'+plus", "full_name": "'+1", "roles": ""},
    {"email": "m@example.com", "username": "", "full_name": "'-x", "roles": "'-"},
    {"email": "a@example.com", "username": "'@at", "full_name": "'@x", "roles": ""},
    {"email": "q@example.com", "username": "", "full_name": "''quoted", "roles": ""},
    {"email": "qq@example.com", "username": "", "full_name": "''=x", "roles": ""},
    {"email": "'=cmd@example.com", "username": "", "full_name": "plain", "roles": ""},
]


@pytest.fixture
def hostile(run: Runner) -> list[dict]:
    """HOSTILE imported as JSONL (no CSV rule applies), as the database then holds them."""
    result = run("import", "-", "--format", "jsonl", input="".join(json.dumps(row) + "\n" for row in HOSTILE))
    assert result.exit_code == 0, result.stderr
    stored = users(run)
    assert [u["full_name"] for u in stored] == [row["full_name"] for row in HOSTILE]
    return stored


@pytest.fixture
def second_env(backend: str, request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str]) -> Iterator[dict]:
    """The environment of a second fresh database on the same backend."""
    (tmp_path / "second").mkdir()
    for url in _fresh_database(backend, request, tmp_path / "second", migrated=True):
        yield {**env, "USERMGR_DATABASE_URL": url}


def csv_fields(text: str) -> list[dict[str, str]]:
    return [
        {name: row[name] for name in ("email", "username", "full_name", "roles")}
        for row in csv.DictReader(io.StringIO(text))
    ]


def test_csv_export_guards_cells_a_spreadsheet_would_run(run: Runner, hostile: list[dict]) -> None:
    exported = run("export", "-o", "csv")
    assert exported.exit_code == 0, exported.stderr
    assert csv_fields(exported.stdout) == GUARDED
    listed = run("list", "-o", "csv")
    assert csv_fields(listed.stdout) == GUARDED  # every CSV usermgr writes, not only export's


def test_no_csv_guard_writes_cells_raw(run: Runner, hostile: list[dict]) -> None:
    exported = run("export", "-o", "csv", "--no-csv-guard")
    assert exported.exit_code == 0, exported.stderr
    assert csv_fields(exported.stdout) == [
        {
            "email": row["email"],
            "username": row.get("username", ""),
            "full_name": row["full_name"],
            "roles": ";".join(row.get("roles", [])),
        }
        for row in HOSTILE
    ]


def test_other_formats_are_not_guarded(run: Runner, hostile: list[dict]) -> None:
    listed = run("list", "-o", "json")
    assert [u["full_name"] for u in json.loads(listed.stdout)] == [row["full_name"] for row in HOSTILE]
    assert [u["full_name"] for u in hostile] == [row["full_name"] for row in HOSTILE]  # export -o jsonl
    table = run("list", "-o", "table").stdout
    assert '=HYPERLINK("http://x")' in table
    assert "'=HYPERLINK" not in table
    assert "'-dash" not in table


def test_csv_round_trip_keeps_stored_values_and_bytes(
    run: Runner, hostile: list[dict], second_env: dict[str, str]
) -> None:
    exported = run("export", "-o", "csv", "--with-hashes")
    assert exported.exit_code == 0, exported.stderr
    imported = run("import", "-", "--format", "csv", input=exported.stdout, env=second_env)
    assert imported.exit_code == 0, imported.stderr
    again = run("export", "-o", "jsonl", env=second_env)
    assert [json.loads(line) for line in again.stdout.splitlines()] == hostile
    assert run("export", "-o", "csv", "--with-hashes", env=second_env).stdout == exported.stdout


def test_import_no_csv_guard_takes_cells_literally(run: Runner) -> None:
    data = "email,full_name\na@example.com,'=x\nb@example.com,''quoted\n"
    result = run("import", "-", "--format", "csv", "--no-csv-guard", input=data)
    assert result.exit_code == 0, result.stderr
    assert [u["full_name"] for u in users(run)] == ["'=x", "''quoted"]


def test_import_removes_only_the_quote_export_adds(run: Runner) -> None:
    data = "email,full_name\na@example.com,'quoted\nb@example.com,''quoted\nc@example.com,'=x\nd@example.com,'\n"
    result = run("import", "-", "--format", "csv", input=data)
    assert result.exit_code == 0, result.stderr
    assert [u["full_name"] for u in users(run)] == ["'quoted", "'quoted", "=x", "'"]


@given(st.text())
def test_guard_is_reversible_and_never_leaves_a_formula(cell: str) -> None:
    guarded = output.guard_cell(cell)
    assert output.unguard_cell(guarded) == cell
    assert not guarded.startswith(output.FORMULA_STARTS)


# ---- any bytes at all -----------------------------------------------------------------------

BOMS = st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE])
# Text with lone surrogates, written as the bytes they stand for (surrogateescape).
ESCAPED_TEXT = st.text(
    st.characters(exclude_categories=("Cs",))
    | st.characters(categories=("Cs",), min_codepoint=0xDC80, max_codepoint=0xDCFF),
    max_size=80,
).map(lambda text: text.encode("utf-8", "surrogateescape"))
BODIES = st.binary(max_size=200) | ESCAPED_TEXT
PREFIXES = {
    "csv": st.sampled_from([b"", b"email,full_name,roles\n", b"email,password\nok@example.com,long-enough-pw\n"]),
    "jsonl": st.sampled_from([b"", b'{"email": "ok@example.com"}\n', b'{"email": "']),
}


@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_bytes_get_a_clean_answer_and_change_nothing_unless_imported(
    run: Runner, tmp_path: Path, fmt: str, source: str, data: st.DataObject
) -> None:
    raw = data.draw(st.tuples(BOMS, PREFIXES[fmt], BODIES).map(b"".join))
    before = run("export", "-o", "jsonl").stdout
    if source == "file":
        path = tmp_path / f"any.{fmt}"
        path.write_bytes(raw)
        result = run("import", str(path))
    else:
        result = run("import", "-", "--format", fmt, input=raw)  # type: ignore[arg-type]
    event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 3, 5), result.stderr
    assert "unexpected" not in result.stderr
    assert "Traceback" not in result.stderr
    if result.exit_code != 0:
        assert run("export", "-o", "jsonl").stdout == before

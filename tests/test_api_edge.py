"""The HTTP edge of usermgr.api: the body limit, what a 422 may say, the security headers,
and text that is no valid Unicode (lone surrogates) refused at every face.

The body limit is tested against a real `usermgr serve` over a real socket: only there does
"refused without being read" mean anything.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import h11
import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import (
    ADMIN,
    ADMIN_PASSWORD,
    HANG_TIMEOUT,
    PASSWORD,
    Runner,
    Served,
    api_token,
    create_user,
    run_usermgr,
    serving,
    uid_of,
    users,
)
from usermgr import api, service
from usermgr.config import Settings
from usermgr.errors import InvalidInput
from usermgr.schemas import UID_AS_USERNAME

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
LONE_SURROGATE = "\udcff"  # what Python makes of the byte 0xff in an argument: no valid Unicode
NOT_UNICODE = "is not valid Unicode: it holds a surrogate code point (U+D800 to U+DFFF)"


def assert_security_headers(headers: httpx.Headers | dict[str, str]) -> None:
    lowered = {name.lower(): value for name, value in headers.items()}
    assert {name: lowered.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS


# ---- a 422 says where and why, never what was sent ----------------------------------------------


@pytest.mark.parametrize("password", ["hunter2", "p" * 2000], ids=["too-short", "too-long"])
def test_a_422_never_echoes_the_password(client: TestClient, run: Runner, password: str) -> None:
    response = client.post("/auth/signup", json={"email": "ada@example.com", "password": password})
    assert response.status_code == 422
    assert password not in response.text
    issues = response.json()["detail"]
    assert [issue["loc"] for issue in issues] == [["body", "password"]]
    assert all(set(issue) == {"loc", "msg", "type"} for issue in issues)
    assert users(run) == []


def test_a_422_echoes_no_other_input_either(client: TestClient, admin: dict[str, str], run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    for response in (
        client.post("/auth/signup", json={"email": "not-an-email-SECRET", "password": PASSWORD}),
        client.patch(f"/users/{user_id}", headers=admin, json={"full_name": "SECRET" * 100}),
        client.get("/users", headers=admin, params={"limit": "SECRET"}),
        client.post("/auth/signup", content=b'{"email": "SECRET', headers={"content-type": "application/json"}),
    ):
        assert response.status_code == 422, response.text
        assert "SECRET" not in response.text
        assert all(set(issue) == {"loc", "msg", "type"} for issue in response.json()["detail"])


def test_the_openapi_document_says_what_a_422_holds_and_that_any_request_may_get_413(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    issue = schemas["ValidationIssue"]
    assert set(issue["properties"]) == {"loc", "msg", "type"}
    assert issue.get("additionalProperties") is False
    assert "HTTPValidationError" not in schemas
    for path, item in document["paths"].items():
        for method, operation in item.items():
            too_large = operation["responses"]["413"]["content"]["application/json"]["schema"]
            assert too_large == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)


# ---- lone surrogates: no valid Unicode, refused as invalid input everywhere ---------------------


def _raw_json(body: dict[str, Any]) -> bytes:
    """JSON text with a lone surrogate written as the escape `\\udcff`, as a hostile client sends it."""
    return json.dumps(body).encode("ascii")


@pytest.mark.parametrize("field", ["email", "username", "full_name", "password"])
def test_a_lone_surrogate_in_signup_is_422(client: TestClient, run: Runner, field: str) -> None:
    body = {"email": "ada@example.com", "password": PASSWORD, field: f"ada{LONE_SURROGATE}"}
    raw = _raw_json(body)
    assert b"\\udcff" in raw
    response = client.post("/auth/signup", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert [issue["loc"] for issue in response.json()["detail"]] == [["body", field]]
    what = "password" if field == "password" else "text"
    assert response.json()["detail"][0]["msg"] == f"{what} {NOT_UNICODE}"
    assert users(run) == []


def test_surrogates_anywhere_in_a_signup_body_are_a_clean_answer(client: TestClient, run: Runner) -> None:
    """As a key (echoed in `loc`), and as UTF-8-encoded surrogate bytes, which Python's JSON
    decoder lets through."""
    as_key = client.post(
        "/auth/signup",
        content=_raw_json({"email": "ada@example.com", "password": PASSWORD, LONE_SURROGATE: 1}),
        headers={"content-type": "application/json"},
    )
    assert as_key.status_code == 422, as_key.text
    as_bytes = client.post(
        "/auth/signup",
        content=b'{"email": "ada@example.com", "password": "' + PASSWORD.encode() + b'", "full_name": "\xed\xb3\xbf"}',
        headers={"content-type": "application/json"},
    )
    assert as_bytes.status_code in (400, 422), as_bytes.text
    assert users(run) == []


@pytest.mark.parametrize("field", ["email", "username", "full_name"])
def test_a_lone_surrogate_in_an_admin_patch_is_422(
    client: TestClient, run: Runner, admin: dict[str, str], field: str
) -> None:
    user_id = create_user(run, "ada@example.com", "--username", "ada", "--full-name", "Ada")
    before = users(run)
    response = client.patch(
        f"/users/{user_id}",
        headers={**admin, "content-type": "application/json"},
        content=_raw_json({field: f"ada{LONE_SURROGATE}"}),
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [{"loc": ["body", field], "msg": f"text {NOT_UNICODE}", "type": "value_error"}]
    assert users(run) == before


@pytest.mark.parametrize("command", ["create", "update"])
def test_a_lone_surrogate_in_full_name_is_invalid_input_on_the_cli(run: Runner, command: str) -> None:
    if command == "create":
        args = ["create", "--email", "ada@example.com", "--no-password"]
    else:
        create_user(run, "ada@example.com")
        args = ["update", "ada@example.com"]
    before = users(run)
    result = run(*args, "--full-name", f"Ada{LONE_SURROGATE}")
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith("usermgr: error: ")
    assert "surrogate" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert users(run) == before


@pytest.mark.e2e
def test_an_undecodable_full_name_argument_is_invalid_input(env: dict[str, str], run: Runner) -> None:
    """The byte 0xff in argv, as a shell passes it: the installed `usermgr` exits 3."""
    result = run_usermgr("create", "--email", "ada@example.com", "--no-password", "--full-name", "Ada\udcff", env=env)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("usermgr: error: ")
    assert "unexpected" not in result.stderr
    assert users(run) == []


def test_a_lone_surrogate_in_a_password_is_invalid_input_for_the_service(
    db: Any, settings: Settings, run: Runner
) -> None:
    create_user(run, "ada@example.com")
    with pytest.raises(InvalidInput, match="surrogate"):
        service.set_password(db, settings, "ada@example.com", f"long enough{LONE_SURROGATE}")
    with pytest.raises(InvalidInput, match="surrogate"):
        service.create_user(db, settings, service.new_user("bob@example.com", password=f"long enough{LONE_SURROGATE}"))
    assert [user["email"] for user in users(run)] == ["ada@example.com"]


# ---- the body limit, against a real `usermgr serve` ---------------------------------------------


@pytest.fixture
def sqlite_env(tmp_path: Path, sqlite_template: Path, key_file: Path) -> dict[str, str]:
    """The body limit is the server's, not the database's: SQLite alone is enough here."""
    database = tmp_path / "users.db"
    shutil.copy(sqlite_template, database)
    return {
        "USERMGR_DATABASE_URL": f"sqlite:///{database}",
        "USERMGR_KEY_FILE": str(key_file),
        "USERMGR_HASH_PROFILE": "test",
    }


@pytest.fixture
def served(sqlite_env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    """A running `usermgr serve` on that database."""
    with serving(sqlite_env, tmp_path / "serve.log") as server:
        yield server


@pytest.fixture
def served_run(sqlite_env: dict[str, str]) -> Runner:
    """The CLI, pointed at the served database."""
    return Runner(sqlite_env)


class Answer(NamedTuple):
    status_code: int
    headers: dict[str, str]
    body: bytes


def raw_exchange(port: int, method: str, path: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> Answer:
    """Send a request head and then `chunks` as they are (the body may be shorter than the
    Content-Length the head declares), stop sending if the server closes, and read its answer."""
    connection = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_TIMEOUT) as sock:
        sock.sendall(connection.send(h11.Request(method=method, target=path, headers=[("host", "edge"), *headers])))
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered early and closed: read what it said
        response: h11.Response | None = None
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    assert response is not None
    return Answer(response.status_code, {name.decode(): value.decode() for name, value in response.headers}, body)


def _json_signup_body(size: int, email: str = "ada@example.com") -> bytes:
    """A valid signup body padded with JSON whitespace to exactly `size` bytes."""
    body = json.dumps({"email": email, "password": PASSWORD}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def _chunked(body: bytes, piece: int = 65536) -> list[bytes]:
    """`body` in the chunked transfer coding, one list item per chunk, then the last chunk."""
    parts = [body[start : start + piece] for start in range(0, len(body), piece)]
    return [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]


@pytest.mark.e2e
def test_a_huge_content_length_is_refused_before_any_body_is_sent(served: Served, served_run: Runner) -> None:
    """Ten GiB declared and not one byte sent: the answer comes at once, from the head alone."""
    response = raw_exchange(
        served.port,
        "POST",
        "/auth/signup",
        [("content-type", "application/json"), ("content-length", str(10 * 2**30))],
        [],
    )
    assert response.status_code == 413
    assert json.loads(response.body) == {"detail": api.BODY_TOO_LARGE}
    assert_security_headers(response.headers)
    assert users(served_run) == []


@pytest.mark.e2e
def test_a_declared_oversize_body_never_reaches_a_route_that_ignores_its_body(
    served: Served, served_run: Runner
) -> None:
    """DELETE reads no body: refused only when it answers, the user would already be gone."""
    create_user(served_run, ADMIN, "--admin", password=ADMIN_PASSWORD)
    victim = create_user(served_run, "ada@example.com")
    with served.client() as http:
        token = api_token(http, ADMIN, ADMIN_PASSWORD)
    response = raw_exchange(
        served.port,
        "DELETE",
        f"/users/{victim}",
        [("authorization", f"Bearer {token}"), ("content-length", str(api.MAX_BODY_BYTES + 1))],
        [],
    )
    assert response.status_code == 413
    assert json.loads(response.body) == {"detail": api.BODY_TOO_LARGE}
    assert [user["email"] for user in users(served_run)] == [ADMIN, "ada@example.com"]


@pytest.mark.e2e
def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(served: Served, served_run: Runner) -> None:
    body = _json_signup_body(api.MAX_BODY_BYTES + 1)
    response = raw_exchange(
        served.port,
        "POST",
        "/auth/signup",
        [("content-type", "application/json"), ("transfer-encoding", "chunked")],
        _chunked(body),
    )
    assert response.status_code == 413
    assert json.loads(response.body) == {"detail": api.BODY_TOO_LARGE}
    assert_security_headers(response.headers)
    assert users(served_run) == []


@pytest.mark.e2e
def test_bodies_up_to_the_limit_are_processed_and_one_byte_more_is_not(served: Served, served_run: Runner) -> None:
    with served.client() as http:
        over = _json_signup_body(api.MAX_BODY_BYTES + 1, "over@example.com")
        refused = http.post("/auth/signup", content=over, headers={"content-type": "application/json"})
        assert refused.status_code == 413, refused.text
        at_limit = _json_signup_body(api.MAX_BODY_BYTES)
        created = http.post("/auth/signup", content=at_limit, headers={"content-type": "application/json"})
        assert created.status_code == 201, created.text
    streamed = raw_exchange(
        served.port,
        "POST",
        "/auth/signup",
        [("content-type", "application/json"), ("transfer-encoding", "chunked")],
        _chunked(_json_signup_body(api.MAX_BODY_BYTES, "streamed@example.com")),
    )
    assert streamed.status_code == 201, streamed.body
    assert [user["email"] for user in users(served_run)] == ["ada@example.com", "streamed@example.com"]


@pytest.mark.parametrize("route", ["signup", "login", "patch"])
def test_a_streamed_body_over_the_limit_is_413_on_every_route_that_reads_one(
    client: TestClient, run: Runner, admin: dict[str, str], route: str
) -> None:
    """No Content-Length: the limit counts the bytes as the route reads them."""
    user_id = create_user(run, "ada@example.com", "--full-name", "Ada")
    before = users(run)
    pieces = [b" " * 65536] * (api.MAX_BODY_BYTES // 65536) + [b"{}"]
    url, headers = {
        "signup": ("/auth/signup", {"content-type": "application/json"}),
        "login": ("/auth/login", {"content-type": "application/x-www-form-urlencoded"}),
        "patch": (f"/users/{user_id}", {**admin, "content-type": "application/json"}),
    }[route]
    response = client.request("PATCH" if route == "patch" else "POST", url, headers=headers, content=iter(pieces))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json() == {"detail": api.BODY_TOO_LARGE}
    assert users(run) == before


# ---- security headers on every response ---------------------------------------------------------


def _requests(client: TestClient, admin: dict[str, str], user_id: int) -> dict[str, tuple[int, httpx.Response]]:
    """One request of each kind of answer: what it must get, and what it got."""
    return {
        "health": (200, client.get("/healthz")),
        "token": (200, client.post("/auth/login", data={"username": ADMIN, "password": ADMIN_PASSWORD})),
        "user data": (200, client.get(f"/users/{user_id}", headers=admin)),
        "list": (200, client.get("/users", headers=admin)),
        "created": (201, client.post("/auth/signup", json={"email": "new@example.com", "password": PASSWORD})),
        "no content": (204, client.delete(f"/users/{user_id}", headers=admin)),
        "unauthorized": (401, client.get("/users/me")),
        "not found": (404, client.get("/nowhere")),
        "no such user": (404, client.get(f"/users/{user_id}", headers=admin)),
        "method not allowed": (405, client.put("/healthz")),
        "conflict": (409, client.post("/auth/signup", json={"email": ADMIN, "password": PASSWORD})),
        "too large": (413, client.post("/auth/signup", content=b" " * (api.MAX_BODY_BYTES + 1))),
        "invalid": (422, client.post("/auth/signup", json={"email": "x"})),
        "docs": (200, client.get("/docs")),
        "openapi": (200, client.get("/openapi.json")),
    }


def test_every_response_carries_the_security_headers(client: TestClient, admin: dict[str, str], run: Runner) -> None:
    user_id = create_user(run, "ada@example.com")
    for name, (expected, response) in _requests(client, admin, user_id).items():
        assert response.status_code == expected, (name, response.text)
        assert_security_headers(response.headers)


def test_a_server_error_carries_the_security_headers_and_no_traceback(settings: Settings) -> None:
    app = api.create_app(settings)

    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("internal detail: /secret/path")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/broken")
    assert response.status_code == 500
    assert response.json() == {"detail": api.SERVER_ERROR}
    assert "/secret/path" not in response.text
    assert_security_headers(response.headers)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/users/1", {"GET", "PATCH", "DELETE"}),
        ("PUT", "/auth/signup", {"POST"}),
        ("GET", "/auth/login", {"POST"}),
        ("POST", "/users/1/roles/editor", {"PUT", "DELETE"}),
        ("DELETE", "/healthz", {"GET"}),
    ],
)
def test_a_405_names_every_method_the_path_allows(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert {name.strip() for name in response.headers["allow"].split(",")} == allowed
    assert response.json() == {"detail": "Method Not Allowed"}


# ---- the server's log: no secret a client put in a URL -------------------------------------------


@pytest.mark.e2e
def test_the_access_log_leaves_out_query_values_where_a_client_may_put_a_secret(
    served: Served, served_run: Runner
) -> None:
    """The API takes no token and no password in a URL, but a client may still send one there
    (`?access_token=`, a login form as a query): uvicorn's access log would write it out for
    anyone who reads the log. The line keeps the method, the path and the status."""
    create_user(served_run, "ada@example.com")
    with served.client() as http:
        token = api_token(http, "ada@example.com")
        in_query = http.get("/users/me", params={"access_token": token})
        assert in_query.status_code == 401, in_query.text
        login_in_query = http.post("/auth/login", params={"username": "ada@example.com", "password": PASSWORD})
        assert login_in_query.status_code == 422, login_in_query.text
        bare = http.get(f"/users/me?{token}")
        assert bare.status_code == 401, bare.text
    # A WebSocket handshake (no route takes one) is logged by uvicorn's error logger, path and query.
    upgrade = [("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13")]
    upgrade.append(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="))
    assert raw_exchange(served.port, "GET", f"/users/me?access_token={token}", upgrade, []).status_code == 403
    log = served.log.read_text()
    assert token not in log
    assert PASSWORD.replace(" ", "+") not in log and PASSWORD.replace(" ", "%20") not in log
    assert '"GET /users/me?… HTTP/1.1" 401' in log
    assert '"POST /auth/login?… HTTP/1.1" 422' in log
    assert '"POST /auth/login HTTP/1.1" 200' in log  # a line without a query is as uvicorn writes it
    assert '"WebSocket /users/me?…" 403' in log


# ---- one value per name: a repeat is refused, not resolved by a rule the client cannot see ------


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("signup", b'{"email": "one@example.com", "email": "two@example.com", "password": "%s"}'),
        ("signup", b'{"email": "one@example.com", "password": "short", "password": "%s"}'),
        ("patch", b'{"full_name": "One", "full_name": "Two"}'),
    ],
    ids=["signup-email", "signup-password", "patch-full-name"],
)
@pytest.mark.parametrize("backend", ["sqlite"])  # the parsing is the API's, not the database's
def test_a_json_body_naming_a_field_twice_is_400_and_changes_nothing(
    client: TestClient, run: Runner, admin: dict[str, str], route: str, body: bytes
) -> None:
    """Python's JSON decoder keeps the last of two equal keys, where a proxy or a validator in
    front may read the first: the two would disagree on which email signed up."""
    user_id = create_user(run, "ada@example.com", "--full-name", "Ada")
    before = users(run)
    url, headers = {
        "signup": ("/auth/signup", {"content-type": "application/json"}),
        "patch": (f"/users/{user_id}", {**admin, "content-type": "application/json"}),
    }[route]
    content = body.replace(b"%s", PASSWORD.encode())
    response = client.request("POST" if route == "signup" else "PATCH", url, headers=headers, content=content)
    assert response.status_code == 400, response.text
    assert response.json() == {"detail": api.REPEATED_FIELD}
    assert users(run) == before


@pytest.mark.parametrize("backend", ["sqlite"])  # the parsing is the API's, not the database's
@pytest.mark.parametrize("form", ["username", "password"])
@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_a_login_form_naming_a_field_twice_is_400_and_counts_no_guess(
    client: TestClient, run: Runner, settings: Settings, form: str, encoding: str
) -> None:
    """Starlette keeps the last of two `username`s, where a proxy that counts guesses per
    account may read the first: a guess at one account passed as a guess at another."""
    create_user(run, "ada@example.com")
    fields = [("username", "decoy@example.com"), ("username", "ada@example.com"), ("password", PASSWORD)]
    if form == "password":
        fields = [("username", "ada@example.com"), ("password", "guess"), ("password", PASSWORD)]
    if encoding == "urlencoded":
        form_type = {"content-type": "application/x-www-form-urlencoded"}
        response = client.post("/auth/login", content=urlencode(fields), headers=form_type)
    else:
        response = client.post("/auth/login", files=[(name, (None, value)) for name, value in fields])
    assert response.status_code == 400, response.text
    assert response.json() == {"detail": api.REPEATED_FORM_FIELD}
    assert run("audit", "--action", "login.failure", "-o", "jsonl").stdout == ""
    assert run("audit", "--action", "login.success", "-o", "jsonl").stdout == ""


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/users", "role=admin&role=staff"),
        ("/users", "limit=1&offset=0&limit=1000"),
        ("/users", "active=true&active=false"),
        ("/audit", "user=ada@example.com&user=admin@example.com"),
        ("/audit", "since=1d&until=1d&since=2d"),
    ],
    ids=["role", "limit", "active", "audit-user", "audit-since"],
)
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_query_parameter_given_twice_is_422(
    client: TestClient, admin: dict[str, str], run: Runner, path: str, query: str
) -> None:
    """Starlette keeps the last of two, where a proxy or a cache in front may read the first."""
    create_user(run, "ada@example.com")
    name = query.split("=")[0]
    response = client.get(f"{path}?{query}", headers=admin)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "detail": [{"loc": ["query", name], "msg": "given more than once: give it once", "type": "repeated_parameter"}]
    }


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_repeated_query_parameter_the_route_does_not_take_is_ignored_as_before(
    client: TestClient, admin: dict[str, str]
) -> None:
    """Only the route's own parameters must be unambiguous: a cache buster sent twice is no one's business."""
    assert client.get("/users?_=1&_=2&limit=1", headers=admin).status_code == 200


# ---- X-Forwarded-For: the caller's say only through a proxy `serve` trusts ----------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("serve_options", "forwarded", "recorded"),
    [
        (["--forwarded-allow-ips", "10.0.0.2"], "198.51.100.7", "127.0.0.1"),
        (["--no-proxy-headers"], "198.51.100.7", "127.0.0.1"),
        ([], "127.0.0.1, 198.51.100.9", "198.51.100.9"),
    ],
    ids=["untrusted-peer", "proxy-headers-off", "spoofed-hop-before-the-proxys"],
)
def test_a_forwarded_address_from_a_peer_serve_does_not_trust_is_not_recorded(
    sqlite_env: dict[str, str],
    served_run: Runner,
    tmp_path: Path,
    serve_options: list[str],
    forwarded: str,
    recorded: str,
) -> None:
    """The address a failed login records is the connection's unless the peer is in
    --forwarded-allow-ips (and --proxy-headers is on); through a trusted proxy it is the
    nearest hop the proxy did not vouch for: text a client wrote before the proxy's own
    entry (nginx's $proxy_add_x_forwarded_for appends) is not believed."""
    create_user(served_run, "ada@example.com")
    with (
        serving(sqlite_env, tmp_path / "serve.log", *serve_options) as server,
        server.client(headers={"X-Forwarded-For": forwarded}) as http,
    ):
        assert http.post("/auth/login", data={"username": "ada@example.com", "password": "wrong"}).status_code == 401
    events = served_run("audit", "--action", "login.failure", "-o", "jsonl").stdout.splitlines()
    assert [json.loads(line)["client_address"] for line in events] == [recorded]


# ---- bodies no route can take: a 4xx of the contract's shape, never a 500 -----------------------

_FIELD = b"<full_name>"
"""Stands for the start of a body up to its full_name's value: the signup's fields or none (PATCH)."""
UNPARSEABLE = {"detail": "There was an error parsing the body"}


def _issues(loc: list[str], kind: str) -> Any:
    """A 422's one issue, as far as it is ours to say: where and what kind (pydantic words the why)."""
    return lambda body: (
        [(issue["loc"], issue["type"]) for issue in body["detail"]] == [(loc, kind)]
        and all(set(issue) == {"loc", "msg", "type"} for issue in body["detail"])
    )


@pytest.mark.parametrize("backend", ["sqlite"])  # the parsing is the API's, not the database's
@pytest.mark.parametrize(
    ("content", "content_type", "status", "body_is"),
    [
        (b"[]", "application/json", 422, _issues(["body"], "model_attributes_type")),
        (b'"text"', "application/json", 422, _issues(["body"], "model_attributes_type")),
        (b"null", "application/json", 422, _issues(["body"], "model_attributes_type")),
        (b"[" * 10_000 + b"]" * 10_000, "application/json", 400, UNPARSEABLE.__eq__),
        (b'{"a": ' * 10_000 + b"1" + b"}" * 10_000, "application/json", 400, UNPARSEABLE.__eq__),
        (_FIELD + b"9" * 5000 + b"}", "application/json", 400, UNPARSEABLE.__eq__),
        (_FIELD + b"1e400}", "application/json", 422, _issues(["body", "full_name"], "string_type")),
        (_FIELD + b"NaN}", "application/json", 422, _issues(["body", "full_name"], "string_type")),
        (_FIELD + b'"Ada \xff\xfe"}', "application/json", 400, UNPARSEABLE.__eq__),
        (_FIELD + b'"Ada"}', "text/plain", 422, _issues(["body"], "model_attributes_type")),
        (b"", "application/json", 422, _issues(["body"], "missing")),
    ],
    ids=[
        "array",
        "string",
        "null",
        "10000-nested-arrays",
        "10000-nested-objects",
        "5000-digit-integer",
        "1e400",
        "NaN",
        "invalid-utf8",
        "json-as-text-plain",
        "empty",
    ],
)
@pytest.mark.parametrize("route", ["signup", "patch"])
def test_a_body_no_route_can_take_is_a_4xx_of_the_contracts_shape(
    client: TestClient,
    run: Runner,
    admin: dict[str, str],
    route: str,
    content: bytes,
    content_type: str,
    status: int,
    body_is: Any,
) -> None:
    """Not a 500, no traceback, no input echoed; nothing created or changed. A JSON body sent
    as text/plain (what a cross-site form can send) is never parsed as JSON."""
    user_id = create_user(run, "ada@example.com", "--full-name", "Ada")
    before = users(run)
    url, headers = {
        "signup": ("/auth/signup", {"content-type": content_type}),
        "patch": (f"/users/{user_id}", {**admin, "content-type": content_type}),
    }[route]
    start = b'{"email": "new@example.com", "password": "%s", ' % PASSWORD.encode() if route == "signup" else b"{"
    content = content.replace(_FIELD, start + b'"full_name": ')
    response = client.request("POST" if route == "signup" else "PATCH", url, headers=headers, content=content)
    assert response.status_code == status, response.text
    assert body_is(response.json()), response.text
    assert PASSWORD not in response.text
    assert users(run) == before


# ---- no redirect built from the Host header ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])  # routing is the API's, not the database's
@pytest.mark.parametrize("path", ["/users/", "/users/me/", "/auth/login/", "/healthz/", "/audit/"])
def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_the_client_named(
    client: TestClient, admin: dict[str, str], path: str
) -> None:
    """Starlette answered 307 with `location: http://<Host header>/users`: a redirect to any host
    a client (or whoever poisons a cache keyed without Host) names. No route ends in a slash."""
    response = client.request(
        "POST" if path == "/auth/login/" else "GET",
        path,
        headers={**admin, "host": "evil.example"},
        follow_redirects=False,
    )
    assert response.status_code == 404, response.headers
    assert response.json() == {"detail": "Not Found"}
    assert "location" not in response.headers
    assert_security_headers(response.headers)


# ---- a body framed two ways is refused, not read one way ------------------------------------------


def _raw_request(port: int, request: bytes) -> bytes:
    """Send `request` as it is and read until the server closes the connection: h11 itself
    would refuse to send a request framed two ways."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_TIMEOUT) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.e2e
def test_a_request_with_both_content_length_and_transfer_encoding_is_400_and_closes(
    served: Served, served_run: Runner
) -> None:
    """uvicorn reads such a body by Transfer-Encoding (RFC 9112 allows it), where a proxy in front
    may have read it by Content-Length: the rest of the body then passes as a next request the
    proxy never saw (request smuggling). RFC 9112 says it "ought to be handled as an error"."""
    body = json.dumps({"email": "smuggled@example.com", "password": PASSWORD}).encode()
    head = (
        b"POST /auth/signup HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n"
        b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    answer = _raw_request(served.port, head + b"".join(_chunked(body)))
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request", answer
    assert json.loads(payload) == {"detail": api.AMBIGUOUS_LENGTH}
    assert b"connection: close" in headers.lower()
    assert users(served_run) == []


# ---- a username cannot take the form of a uid ---------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])  # the rule is the schema's, not the database's
@pytest.mark.parametrize("case", ["lower", "upper"])
def test_a_signup_cannot_take_a_deleted_users_uid_as_username_and_hide_their_audit_trail(
    client: TestClient, run: Runner, admin: dict[str, str], admin_id: int, case: str
) -> None:
    """`audit --user UID` (and GET /audit?user=) looks for a live user by the text first: a
    self-service signup named after a deleted user's uid (its owner knows it from /users/me)
    answered in that user's place, and their trail could no longer be found by uid."""
    gone = create_user(run, "mallory@example.com")
    uid = uid_of(run, str(gone))
    assert run("delete", "mallory@example.com", "--yes").exit_code == 0
    username = uid if case == "lower" else uid.upper()
    response = client.post(
        "/auth/signup", json={"email": "mallory2@example.com", "password": PASSWORD, "username": username}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [{"loc": ["body", "username"], "msg": UID_AS_USERNAME, "type": "value_error"}]
    patched = client.patch(f"/users/{admin_id}", headers=admin, json={"username": username})
    assert patched.status_code == 422, patched.text
    trail = client.get("/audit", headers=admin, params={"user": uid}).json()
    assert {event["target_email"] for event in trail} == {"mallory@example.com"}


# ---- one spelling per user id in a path -------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])  # the parsing is the API's, not the database's
@pytest.mark.parametrize("spelled", ["0{id}", "+{id}", "{id}.0", "%20{id}", "{id}%20", "{id}_0"], ids=ascii)
def test_a_user_id_spelled_other_than_in_plain_digits_is_422_and_changes_nothing(
    client: TestClient, run: Runner, admin: dict[str, str], spelled: str
) -> None:
    """pydantic's lax int took `01`, `+1`, `1.0`, ` 1` and `1_0` (10) as ids: one user under many
    paths, so a proxy rule or a cache keyed on `/users/2` was passed by `/users/02`."""
    user_id = create_user(run, "ada@example.com", "--full-name", "Ada")
    before = users(run)
    path = f"/users/{spelled.format(id=user_id)}"
    for method, url, body in (
        ("GET", path, None),
        ("PATCH", path, {"full_name": "Changed"}),
        ("PUT", f"{path}/roles/editor", None),
        ("DELETE", f"{path}/roles/editor", None),
        ("DELETE", path, None),
    ):
        response = client.request(method, url, headers=admin, json=body)
        assert response.status_code == 422, (method, url, response.text)
        assert response.json()["detail"] == [
            {"loc": ["path", "user_id"], "msg": api.USER_ID_DIGITS, "type": "value_error"}
        ], (method, url)
    assert users(run) == before


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_openapi_document_still_gives_the_user_ids_range(client: TestClient) -> None:
    """The plain-digits validator sits after Path(): before it, FastAPI wrote `ge`/`le` into the
    schema, which JSON Schema does not know, instead of `minimum`/`maximum`."""
    operation = client.get("/openapi.json").json()["paths"]["/users/{user_id}"]["get"]
    schema = next(parameter["schema"] for parameter in operation["parameters"] if parameter["name"] == "user_id")
    assert (schema["type"], schema["minimum"], schema["maximum"]) == ("integer", 1, service.MAX_USER_ID)
    assert not {"ge", "le"} & set(schema)

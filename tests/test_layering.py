"""The layers stay apart: the core never loads a face's framework, and the light paths
(`usermgr.tokens`, `usermgr --help`, `usermgr verify`) never load the database or pydantic.

Each import check runs in a fresh interpreter, so what this test process has loaded
does not count.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import usermgr
from tests.conftest import HANG_TIMEOUT
from usermgr import service, tokens
from usermgr.config import load_settings

PACKAGE = Path(usermgr.__file__).parent
FACE_FRAMEWORKS = {"click", "fastapi", "uvicorn", "starlette"}
FACES = {PACKAGE / "cli.py", PACKAGE / "api.py"}
CORE = ["service", "models", "schemas", "database", "security", "tokens"]

_REPORT = """
import json, sys
watched = {watched!r}
loaded = sorted(w for w in watched if any(name == w or name.startswith(w + ".") for name in sys.modules))
print(json.dumps({{"loaded": loaded, "code": code}}), file=sys.stderr)
"""


def loaded_after(code: str, watched: set[str], env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter (it may set `code`); which of `watched` (packages or
    modules) it loaded, and its standard output."""
    script = f"code = None\n{code}\n{_REPORT.format(watched=sorted(watched))}"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.splitlines()[-1])
    return {**report, "stdout": result.stdout}


def test_the_core_does_not_load_a_face_framework() -> None:
    imports = "\n".join(f"import usermgr.{name}" for name in CORE)
    report = loaded_after(imports, FACE_FRAMEWORKS | {"sqlalchemy"})
    assert report["loaded"] == ["sqlalchemy"]  # the check sees what is loaded: the core does use SQLAlchemy


def test_tokens_alone_loads_neither_sqlalchemy_nor_pydantic() -> None:
    report = loaded_after("import usermgr.tokens", {"sqlalchemy", "pydantic", "jwt"} | FACE_FRAMEWORKS)
    assert report["loaded"] == ["jwt"]


def test_help_loads_neither_sqlalchemy_nor_pydantic() -> None:
    code = """
from usermgr.cli import main
try:
    main(["--help"])
except SystemExit as exit:
    code = exit.code
"""
    report = loaded_after(code, {"sqlalchemy", "pydantic", "click"})
    assert report["code"] == 0
    assert "Usage: usermgr" in report["stdout"]
    assert report["loaded"] == ["click"]


def test_offline_verify_loads_neither_sqlalchemy_nor_pydantic(tmp_path: Path) -> None:
    key_file = tmp_path / "usermgr.key"
    tokens.create_key_file(key_file, "HS256")
    settings = load_settings(database_url=str(tmp_path / "absent.db"), key_file=str(key_file))
    token = tokens.issue_token(
        settings,
        subject="6f1c0de4-6d0b-4f7e-9a55-0d6f5a1b7c3e",
        email="ada@example.com",
        roles=["admin"],
        token_version=0,
        ttl=3600,  # the token must outlive the start of a fresh interpreter, however slow
    )
    code = f"""
from usermgr.cli import main
try:
    main(["verify", {token!r}, "--role", "admin", "-o", "json"])
except SystemExit as exit:
    code = exit.code
"""
    env = {"USERMGR_KEY_FILE": str(key_file), "USERMGR_DATABASE_URL": str(tmp_path / "absent.db")}
    report = loaded_after(code, {"sqlalchemy", "pydantic"}, env)
    assert report["code"] == 0
    assert json.loads(report["stdout"])["email"] == "ada@example.com"
    assert report["loaded"] == []


# ---- static: only the faces import a face's framework --------------------------------------------


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every import in a module, at any depth (lazy ones included)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize(
    "path", [path for path in MODULES if path not in FACES], ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_only_the_faces_import_click_or_fastapi(path: Path) -> None:
    assert imported_roots(path) & FACE_FRAMEWORKS == set(), f"{path.relative_to(PACKAGE)} imports a face's framework"


def test_the_static_check_sees_the_faces_imports() -> None:
    assert "click" in imported_roots(PACKAGE / "cli.py")
    assert "fastapi" in imported_roots(PACKAGE / "api.py")
    assert len(MODULES) > len(FACES)


SERVICE_ORDER = ["core", "audit", "revocation", "roles", "records", "users", "auth", "bulk"]


def test_the_service_modules_import_downward_only() -> None:
    """Each concern of usermgr/service/ imports only the concerns before it (its __init__
    lists the order): no circle, and a reader knows where each rule may lean."""
    service = PACKAGE / "service"
    assert sorted(path.stem for path in service.glob("*.py") if path.stem != "__init__") == sorted(SERVICE_ORDER)
    for position, name in enumerate(SERVICE_ORDER):
        tree = ast.parse((service / f"{name}.py").read_text())
        siblings = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("usermgr.service.")
        }
        assert siblings <= set(SERVICE_ORDER[:position]), (name, siblings)


@pytest.mark.parametrize(("role", "exit_code"), [("beta", 0), ("Not A Role!", 3)])
def test_list_by_role_checks_the_name_without_pydantic(tmp_path: Path, role: str, exit_code: int) -> None:
    db = tmp_path / "users.db"
    env = {"USERMGR_KEY_FILE": str(tmp_path / "usermgr.key")}
    subprocess.run(
        [sys.executable, "-m", "usermgr", "--db", str(db), "init"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=HANG_TIMEOUT,
    )
    report = loaded_after(_cli_main(db, ["list", "--role", role, "-o", "id"]), {"sqlalchemy", "pydantic"}, env)
    assert report["code"] == exit_code
    assert report["loaded"] == ["sqlalchemy"]


def _cli_main(db: Path, command: list[str]) -> str:
    """Code for `loaded_after` that runs usermgr's CLI on `db` and keeps its exit status in `code`."""
    return f"""
from usermgr.cli import main
try:
    main(["--db", {str(db)!r}, *{command!r}])
except SystemExit as exit:
    code = exit.code
"""


def _database_with_one_user(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    db = tmp_path / "users.db"
    env = {"USERMGR_KEY_FILE": str(tmp_path / "usermgr.key")}
    for args in (["init"], ["create", "--email", "ada@example.com", "--no-password", "-o", "id"]):
        subprocess.run(
            [sys.executable, "-m", "usermgr", "--db", str(db), *args],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=HANG_TIMEOUT,
        )
    return db, env


SERVICE_MODULES = {f"usermgr.service.{name}" for name in SERVICE_ORDER}


@pytest.mark.parametrize(
    ("command", "needed"),
    [
        (["disable", "ada@example.com"], ["audit", "core", "revocation", "roles", "users"]),
        (["show", "ada@example.com"], ["audit", "core", "records", "revocation", "roles"]),
    ],
)
def test_a_command_loads_only_the_service_modules_it_calls(
    tmp_path: Path, command: list[str], needed: list[str]
) -> None:
    """usermgr.service re-exports lazily: a one-user command does not pay for the import
    machinery (bulk) or the logins (auth) at start-up."""
    db, env = _database_with_one_user(tmp_path)
    report = loaded_after(_cli_main(db, command), SERVICE_MODULES, env)
    assert report["code"] == 0
    assert report["loaded"] == [f"usermgr.service.{name}" for name in needed]


@pytest.mark.parametrize(
    "command",
    [["list", "-o", "jsonl"], ["show", "ada@example.com"], ["disable", "ada@example.com"], ["audit", "-o", "jsonl"]],
)
def test_a_command_on_sqlite_does_not_load_the_postgresql_dialect(tmp_path: Path, command: list[str]) -> None:
    """SQLAlchemy's PostgreSQL support costs ~40 ms of start-up; naming one of its options in a
    model (`postgresql_where=`) loaded it in every command on SQLite."""
    db, env = _database_with_one_user(tmp_path)
    report = loaded_after(_cli_main(db, command), {"sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql"}, env)
    assert report["code"] == 0
    assert report["loaded"] == ["sqlalchemy.dialects.sqlite"]


def test_every_name_of_the_service_is_the_one_its_module_defines() -> None:
    """The lazy re-exports of usermgr.service (its _EXPORTS) name each name's real home."""
    for name in service.__all__:
        value = getattr(service, name)
        homes = [module for module, names in service._EXPORTS.items() if name in names]
        assert len(homes) == 1, name
        assert value is getattr(importlib.import_module(f"usermgr.service.{homes[0]}"), name)
    assert sorted(service.__all__) == sorted(name for names in service._EXPORTS.values() for name in names)


@pytest.mark.parametrize(
    "load",
    ['lazy_module("usermgr.models").User', 'getattr(importlib.import_module("usermgr.service"), "get_user")'],
)
def test_a_lazy_import_freezes_what_it_made_and_leaves_the_collector_on(load: str) -> None:
    """Lazy imports run with the collector paused (lazy.collector_paused); after them the
    collector is on again, for the command's own work, and never rescans the modules."""
    code = f"""
import gc, importlib
from usermgr.lazy import lazy_module
before = gc.get_freeze_count()
{load}
code = [gc.isenabled(), gc.get_freeze_count() > before]
"""
    assert loaded_after(code, set())["code"] == [True, True]


def test_a_collector_switched_off_stays_off_after_a_lazy_import() -> None:
    code = """
import gc
from usermgr.lazy import lazy_module
gc.disable()
lazy_module("usermgr.models").User
code = [gc.isenabled(), gc.get_freeze_count()]
"""
    assert loaded_after(code, set())["code"] == [False, 0]


def test_a_name_of_a_module_already_loaded_freezes_nothing_more() -> None:
    """A server's first request for a name of an already loaded module must not freeze the
    request's own objects."""
    code = """
import gc
from usermgr import service
service.get_user
frozen = gc.get_freeze_count()
request = [[] for _ in range(10)]  # the request's objects, that a freeze would keep from the collector
service.MAX_ROW_COUNT
code = gc.get_freeze_count() == frozen
"""
    assert loaded_after(code, set())["code"] is True


def test_threads_reading_service_names_at_once_all_get_them() -> None:
    """A server's first requests arrive together: every thread that reads a name while another
    thread is still importing its module must wait for that import, never meet the module half
    made (AttributeError: partially initialized module, a 500 in `make test` once)."""
    code = """
import sys, threading
from usermgr import service
sys.setswitchinterval(1e-6)  # threads take turns as often as they can: the race shows every time
names = ["login", "act_as", "apply_import", "iter_user_records", "create_user", "verify_chain"] * 4
start = threading.Barrier(len(names))
failed = []
def read(name):
    start.wait()
    try:
        getattr(service, name)
    except AttributeError as error:
        failed.append(str(error))
threads = [threading.Thread(target=read, args=(name,)) for name in names]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
code = failed
"""
    for _ in range(3):
        assert loaded_after(code, set())["code"] == []


def test_an_api_app_loads_every_service_module_when_it_is_made() -> None:
    """A server pays for its imports at start: no request waits for one, nor runs while the
    collector is paused for one (and has its objects frozen with the module's)."""
    modules = {f"usermgr.service.{module}" for module in service._EXPORTS}
    assert loaded_after("from usermgr import api\napi.create_app()", modules)["loaded"] == sorted(modules)


def test_making_a_second_api_app_freezes_nothing_more() -> None:
    """Only an import is worth pausing the collector for: a process that makes apps again (a
    test suite, an app that mounts several) must not have its live objects frozen each time."""
    code = """
import gc
from usermgr import api
api.create_app()
frozen = gc.get_freeze_count()
live = [[] for _ in range(10)]  # a caller's objects, that a freeze would keep from the collector
api.create_app()
code = gc.get_freeze_count() <= frozen  # fewer when frozen objects were freed meanwhile
"""
    assert loaded_after(code, set())["code"] is True
